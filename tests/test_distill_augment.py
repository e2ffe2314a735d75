"""distill's augmentation: mixup, rotation/zoom and elastic distortion."""

import torch


def test_mixup_pairs_every_view_alike_and_blends_convexly():
    from stages.distill.augment import mixup

    # image i is the constant i: a mixed image is λ·i + (1 − λ)·j, between i and j
    x = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 1, 3, 3).clone()
    out, doubled = mixup([x, 2 * x], 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(doubled, 2 * out)  # the perturbed view got the same partners and λ
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))  # still constant per image
    assert ((out >= 0) & (out <= 5)).all() and not torch.allclose(out, x)


def test_rotate_scale_is_the_identity_at_zero_and_keeps_the_centre():
    from stages.distill.augment import rotate_scale

    x = torch.rand(4, 1, 9, 9, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rotate_scale(x, 0.0, 0.0, torch.Generator().manual_seed(1)), x, atol=1e-5)
    turned = rotate_scale(x, 30.0, 0.2, torch.Generator().manual_seed(1))
    assert torch.allclose(turned[:, :, 4, 4], x[:, :, 4, 4], atol=1e-5)  # about the centre
    assert not torch.allclose(turned, x, atol=1e-3)


def test_elastic_displaces_each_image_by_a_smooth_field_of_at_most_alpha_pixels():
    from stages.distill.augment import elastic

    h = w = 32
    ramp = torch.arange(w, dtype=torch.float32).expand(3, 1, h, w).clone()  # value = column index
    assert torch.allclose(elastic(ramp, 0.0, 4.0, torch.Generator().manual_seed(0)), ramp, atol=1e-4)
    moved = elastic(ramp, 34.0, 4.0, torch.Generator().manual_seed(0))
    dx = (moved - ramp)[:, 0, 6:-6, 6:-6]  # on a ramp the value read is the column it came from
    assert dx.abs().max() <= 34.0 and dx.abs().mean() > 0.3
    assert (dx[:, :, 1:] - dx[:, :, :-1]).abs().mean() < 0.25 * dx.abs().mean()  # smooth, not per-pixel noise
    assert not torch.allclose(dx[0], dx[1], atol=0.1)  # a field per image
