"""Augmentation of the transfer set, on the device: per-image geometric transforms drawn from a
seeded generator (so a resumed run repeats them) and mixup between images of a batch."""

import math

import torch
import torch.nn.functional as F

from stages.common.mixing import beta
from stages.distill.config import DistillConfig


def augments(settings: DistillConfig) -> bool:
    """Whether any augmentation is on (then the teacher must label every view online)."""
    return bool(settings.augment_shift or settings.augment_hflip or settings.augment_rotate
                or settings.augment_scale or settings.augment_elastic or settings.augment_mixup)


def shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pixels`` in each direction; border pixels repeat."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)).to(x.device)  # (n, w)
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def rotate_scale(x: torch.Tensor, degrees: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Random rotation within ±``degrees`` and zoom within 1 ± ``scale`` about the centre; border pixels repeat."""
    n = len(x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    theta = torch.zeros(n, 2, 3)
    # affine_grid maps output to input coordinates: dividing by the zoom enlarges the content
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / zoom, -torch.sin(angle) / zoom
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / zoom, torch.cos(angle) / zoom
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def elastic(x: torch.Tensor, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Simard et al.'s (2003) elastic distortion: a uniform random displacement field in [−1, 1]
    per pixel, smoothed by a Gaussian of ``sigma`` pixels and scaled by ``alpha`` pixels (their
    MNIST setting: alpha 34, sigma 4); border pixels repeat."""
    n, _, h, w = x.shape
    field = torch.rand(n, 2, h, w, generator=generator) * 2 - 1
    radius = max(1, int(2 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    field = F.conv2d(field, taps.expand(2, 1, 1, -1), padding=(0, radius), groups=2)  # smooth along x,
    field = F.conv2d(field, taps[:, None].expand(2, 1, -1, 1), padding=(radius, 0), groups=2)  # then along y
    field = field * alpha * torch.tensor([2 / w, 2 / h])[None, :, None, None]  # pixels → grid units
    identity = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    grid = identity + field.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid.to(x.device, x.dtype), padding_mode="border", align_corners=False)


def augment(x: torch.Tensor, settings: DistillConfig, generator: torch.Generator) -> torch.Tensor:
    """The geometric augmentations of ``settings`` (shift, rotation/zoom, elastic, flip), per image, on the device."""
    if settings.augment_elastic:
        x = elastic(x, settings.augment_elastic, settings.augment_elastic_sigma, generator)
    if settings.augment_shift:
        x = shift(x, settings.augment_shift, generator)
    if settings.augment_rotate or settings.augment_scale:
        x = rotate_scale(x, settings.augment_rotate, settings.augment_scale, generator)
    if settings.augment_hflip:
        flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def mixup(views: list[torch.Tensor], alpha: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Each image blended with another of the batch, λ ~ Beta(alpha, alpha) per image; every view
    gets the same partners and λ so that an image and its perturbation stay a pair."""
    n = len(views[0])
    partner = torch.randperm(n, generator=generator)
    lam = beta(alpha, n, generator).to(views[0].device)[:, None, None, None]
    return [lam * v + (1 - lam) * v[partner.to(v.device)] for v in views]
