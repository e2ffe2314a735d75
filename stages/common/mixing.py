"""MixDistribution: give an image (or a feature map) the channel statistics of a mixture.

KD³ (Tang et al., ICCV 2023, §3.4) perturbs each web instance into one "with a new
distribution" and aligns the two contrastively. Its exact operator is not public; this is the
MixStyle-like reconstruction (docs/methods.md, KD³) [R]: per instance and channel, standardise with
the instance's own mean and std, then de-standardise with a mixture of its statistics and a
partner's,

    μ_mix = λ μ_i + (1 − λ) μ_j,   σ_mix = λ σ_i + (1 − λ) σ_j,   λ ~ Beta(α, α),
    x̃_i = σ_mix · (x_i − μ_i) / σ_i + μ_mix.

The same function serves the perturb stage (pixels, partner statistics from another selected
image) and distill's online option (a shallow feature map, partner from the same batch).
"""

import torch

EPS = 1e-6


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance, per-channel mean and std of ``x`` (N, C, ...) → two (N, C) tensors."""
    flat = x.flatten(2)
    return flat.mean(-1), flat.std(-1, unbiased=False)


def mix_distribution(x: torch.Tensor, partner_mean: torch.Tensor, partner_std: torch.Tensor,
                     lam: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, ...) with per-channel statistics λ·own + (1 − λ)·partner's; ``lam`` is (N,)."""
    mean, std = channel_stats(x)
    lam = lam.reshape(-1, 1).to(x.dtype)
    mix_mean = lam * mean + (1 - lam) * partner_mean
    mix_std = lam * std + (1 - lam) * partner_std
    shape = (*x.shape[:2],) + (1,) * (x.ndim - 2)
    standardised = (x - mean.reshape(shape)) / (std.reshape(shape) + EPS)
    return standardised * mix_std.reshape(shape) + mix_mean.reshape(shape)


def mix_within_batch(x: torch.Tensor, alpha: float, generator: torch.Generator | None = None,
                     same_class: torch.Tensor | None = None) -> torch.Tensor:
    """MixStyle on a batch: each instance's partner is another instance of the batch (of the same
    pseudo-class when ``same_class`` labels are given and the class has another member).
    Statistics are detached, as MixStyle does: the perturbation is data, not a path for gradients."""
    n = len(x)
    lam = torch.distributions.Beta(alpha, alpha).sample((n,)).to(x.device) if generator is None else \
        beta(alpha, n, generator).to(x.device)
    partner = _partners(n, same_class, generator).to(x.device)
    mean, std = channel_stats(x.detach())
    return mix_distribution(x, mean[partner], std[partner], lam)


def beta(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Beta(α, α) samples from a seeded generator, as X/(X+Y) with X, Y ~ Gamma(α):
    torch.distributions.Beta draws from the global RNG only."""
    gx = torch._standard_gamma(torch.full((n,), float(alpha)), generator=generator)
    gy = torch._standard_gamma(torch.full((n,), float(alpha)), generator=generator)
    return gx / (gx + gy).clamp_min(EPS)


def _partners(n: int, labels: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """A random partner index for each of ``n`` instances, never itself when n > 1."""
    shift = torch.randint(1, max(n, 2), (n,), generator=generator) if n > 1 else torch.zeros(1, dtype=torch.long)
    partner = (torch.arange(n) + shift) % max(n, 1)
    if labels is None:
        return partner
    labels = labels.cpu()
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        if len(members) > 1:  # a partner among the other members of the class
            step = torch.randint(1, len(members), (len(members),), generator=generator)
            partner[members] = members[(torch.arange(len(members)) + step) % len(members)]
    return partner
