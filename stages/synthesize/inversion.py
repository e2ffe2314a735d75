"""Model inversion: optimise the pixels of a batch so that the teacher sees images like its private data.

DeepInversion (Yin et al., CVPR 2020; the official CIFAR-10 code's settings are the defaults here):
starting from noise (or, for webdistill's hybrid, from web images), minimise with Adam over the
pixels, each step on a randomly shifted copy of the batch (jitter),

    ce_weight · CE(teacher(x), targets)                     the class each image should become
  + bn_weight · Σ_l ‖μ_l(x) − running_mean_l‖₂ + ‖σ²_l(x) − running_var_l‖₂   (stages.common.batchnorm)
  + tv_weight · TV_l2(x) + l2_weight · ‖x‖₂                 image priors
  + competition_weight · (1 − JS(student ‖ teacher))         Adaptive DeepInversion: images they disagree on

and keep, per batch, the pixels of the step with the lowest total loss. Pixels live in the teacher's
normalised input space and are clipped after each step to what a stored image can hold (as
Fast-Datafree's synthesiser does), so the images written are the images optimised.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.common.batchnorm import BatchNormStatistics


@dataclass(frozen=True)
class Inversion:
    steps: int = 2000  # iters_mi
    lr: float = 0.05  # di_lr of the paper's CIFAR parameters
    ce_weight: float = 1.0
    bn_weight: float = 10.0  # r_feature_weight of the paper's CIFAR parameters
    first_bn_weight: float = 1.0  # the official ImageNet code's first_bn_multiplier is 10
    tv_weight: float = 2.5e-5  # di_var_scale
    l2_weight: float = 0.0  # di_l2_scale
    jitter: int = 2  # random shift of up to this many pixels per step (lim_0, lim_1)
    flip: bool = False  # random horizontal flips per step (the ImageNet code's)
    competition_weight: float = 0.0  # cig_scale: Adaptive DeepInversion against a student


def balanced_targets(count: int, classes: int, start: int = 0) -> torch.Tensor:
    """Class targets cycling through every class (the official code's ``[0, 1, …, 9] * 25 + …``)."""
    return (torch.arange(count) + start) % classes


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's TV prior: L2 norms of the differences to the right, down and both diagonals."""
    return (torch.linalg.vector_norm(x[:, :, :, :-1] - x[:, :, :, 1:])
            + torch.linalg.vector_norm(x[:, :, :-1, :] - x[:, :, 1:, :])
            + torch.linalg.vector_norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:])
            + torch.linalg.vector_norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:]))


def competition(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """1 − Jensen–Shannon divergence of student and teacher (the official code's clamped form): low when
    they disagree, so minimising it seeks images the student has not learnt yet."""
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")
    return 1.0 - js.clamp(0.0, 1.0)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out  # webdistill's teachers return (logits, features)


def invert(teacher: nn.Module, start: torch.Tensor, targets: torch.Tensor, settings: Inversion,
           bounds: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator,
           student: nn.Module | None = None, after_step=None) -> tuple[torch.Tensor, dict]:
    """The pixels of ``start`` (normalised, batch × channels × H × W) optimised toward ``targets``; returns
    the batch of the step with the lowest loss and that step's loss terms. ``bounds``: per-channel lowest
    and highest normalised value (pixel 0 and 1). Jitter draws from ``generator``: the same start, targets
    and generator state give the same images. ``after_step(steps_done, best_so_far)``, if given, sees the
    batch that would be returned had the run stopped there (a steps-to-quality curve from one run)."""
    teacher.eval()
    low, high = (b.view(1, -1, 1, 1).to(start) for b in bounds)
    x = start.detach().clone().clamp(low, high).requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=settings.lr)
    best, best_loss, best_terms = x.detach().clone(), float("inf"), {}
    with BatchNormStatistics(teacher, per="batch", first_layer_weight=settings.first_bn_weight) as stats:
        for step in range(settings.steps):
            shift = torch.randint(-settings.jitter, settings.jitter + 1, (2,), generator=generator).tolist()
            view = torch.roll(x, shifts=shift, dims=(2, 3)) if settings.jitter else x
            if settings.flip and torch.rand((), generator=generator) < 0.5:
                view = torch.flip(view, dims=(3,))
            logits = _logits(teacher, view)
            terms = {"ce": F.cross_entropy(logits, targets), "bn": stats.loss(), "tv": total_variation(view),
                     "l2": torch.linalg.vector_norm(view)}
            loss = (settings.ce_weight * terms["ce"] + settings.bn_weight * terms["bn"]
                    + settings.tv_weight * terms["tv"] + settings.l2_weight * terms["l2"])
            if settings.competition_weight and student is not None:
                student.eval()
                terms["competition"] = competition(_logits(student, view), logits)
                loss = loss + settings.competition_weight * terms["competition"]
            if loss.item() < best_loss:  # the pixels this loss was computed on, before the step moves them
                best, best_loss = x.detach().clone(), loss.item()
                best_terms = {"step": step, "loss": best_loss, **{k: v.item() for k, v in terms.items()}}
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))
            if after_step is not None:
                after_step(step + 1, best)
    return best, best_terms


def to_pixels(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised images back to uint8 pixels (batch × H × W × channels)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x.detach().cpu() * s + m).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def pixel_bounds(mean: list[float], std: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised values of pixel 0 and pixel 1 per channel."""
    m, s = torch.tensor(mean), torch.tensor(std)
    return (0 - m) / s, (1 - m) / s
