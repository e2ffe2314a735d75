"""synthesize: DeepInversion's pixel optimisation on a tiny teacher — it lowers the BatchNorm and class
losses, it is deterministic (the basis of per-shard resume), and its priors equal hand computations."""

import numpy as np
import pytest
import torch
from torch import nn

from stages.common.batchnorm import BatchNormStatistics
from stages.synthesize.inversion import (
    Inversion,
    balanced_targets,
    competition,
    invert,
    pixel_bounds,
    to_pixels,
    total_variation,
)

MEAN, STD = [0.5], [0.25]


def private_batch(n: int, generator: torch.Generator):
    """The tiny teacher's private data: a bright 4×4 blob in one of four quadrants (the class), normalised."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.rand(n, 1, 12, 12, generator=generator) * 0.2
    for i, c in enumerate(labels.tolist()):
        r, col = 1 + 6 * (c // 2), 1 + 6 * (c % 2)
        images[i, :, r:r + 4, col:col + 4] = 0.9
    return (images - MEAN[0]) / STD[0], labels


_TEACHER = {}


def tiny_teacher():
    """A conv net with BatchNorm trained for a moment on ``private_batch``: its running statistics
    are those of the blobs, not of noise."""
    if "net" not in _TEACHER:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(32, 4))
        optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(0)
        for _ in range(150):
            x, y = private_batch(64, generator)
            loss = nn.functional.cross_entropy(net(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        _TEACHER["net"] = net.eval()
    return _TEACHER["net"]


def run(settings, start=None, seed=0):
    teacher = tiny_teacher()
    start = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(seed)) if start is None else start
    return invert(teacher, start, balanced_targets(8, 4), settings, pixel_bounds(MEAN, STD),
                  torch.Generator().manual_seed(seed))


def losses(images):
    teacher = tiny_teacher()
    with BatchNormStatistics(teacher) as stats, torch.no_grad():
        logits = teacher(images)
        return stats.loss().item(), nn.functional.cross_entropy(logits, balanced_targets(8, 4)).item()


def test_inversion_lowers_the_batchnorm_and_class_losses_within_a_few_steps():
    start = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(0)).clamp(*[b.item() for b in
                                                                                          pixel_bounds(MEAN, STD)])
    images, terms = run(Inversion(steps=40, lr=0.1), start)
    bn_before, ce_before = losses(start)
    bn_after, ce_after = losses(images)
    assert bn_after < 0.5 * bn_before and ce_after < 0.5 * ce_before, (bn_before, bn_after, ce_before, ce_after)
    x, y = private_batch(64, torch.Generator().manual_seed(1))
    assert (tiny_teacher()(x).argmax(1) == y).float().mean() > 0.9  # the teacher knows its private data
    assert terms["step"] > 0 and set(terms) >= {"loss", "ce", "bn", "tv", "l2"}
    low, high = pixel_bounds(MEAN, STD)
    assert images.min() >= low.item() - 1e-6 and images.max() <= high.item() + 1e-6  # storable pixels


def test_the_same_start_and_seed_give_the_same_images():
    a, _ = run(Inversion(steps=10, lr=0.1, flip=True), seed=3)
    b, _ = run(Inversion(steps=10, lr=0.1, flip=True), seed=3)
    c, _ = run(Inversion(steps=10, lr=0.1, flip=True), seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_zero_steps_return_the_start_clipped_to_storable_pixels():
    start = torch.full((8, 1, 12, 12), 10.0)
    images, _ = run(Inversion(steps=0), start)
    assert torch.allclose(images, pixel_bounds(MEAN, STD)[1].view(1, 1, 1, 1).expand_as(images))


def test_priors_and_helpers_equal_hand_computations():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # right: (−1, −2), down: (−2, −3), down-left: (2 − 1), down-right: (0 − 4)
    assert total_variation(x).item() == pytest.approx(np.sqrt(5) + np.sqrt(13) + 1 + 4)
    assert balanced_targets(6, 4, start=1).tolist() == [1, 2, 3, 0, 1, 2]
    same = torch.tensor([[2.0, 0.0, -1.0]])
    assert competition(same, same).item() == pytest.approx(1.0)
    assert competition(torch.tensor([[9.0, 0.0, 0.0]]), torch.tensor([[0.0, 9.0, 0.0]])).item() < 0.9
    pixels = torch.tensor([[[[0.0, 255.0]]]]) / 255
    normalised = (pixels - 0.5) / 0.25
    assert to_pixels(normalised, MEAN, STD).flatten().tolist() == [0, 255]
