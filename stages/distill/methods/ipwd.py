"""IPWD (Niu et al., NeurIPS 2022, "Respecting Transfer Gap in Knowledge Distillation"): the KD term
of each sample weighted by its inverse propensity 1/P(machine domain | x, y), so that the samples the
teacher's soft labels under-represent count more. No public code; docs/methods.md marks what is
reconstructed [R].

The propensity comes from two linear heads on the student's (detached) features, trained alongside:
one with cross-entropy on the labels (the "human domain": ``distill.labels``), one with KD on the
teacher's soft labels (the "machine domain"), both on normalised logits (LogitNorm, z / (τ‖z‖): the
paper's ablation finds normalisation essential; its exact form is [R]). The weight, by
``ipwd_formula``:

- ``bayes``: w = 1 + p_cls(y|x) / p_kd(y|x) (Bayes' rule with equal domain priors) [R];
- ``literal``: w = 1 + CE_cls / CE_kd (the formula as a secondary summary gives it; read literally it
  down-weights what the KD head fits badly) [R];

normalised to mean 1 in the batch and clipped at ``ipwd_clip`` [R]; 1 before ``ipwd_start`` (a share
of training: the paper finds a late start better in self-distillation).

``sample_weights: filter`` is another thing: the filter's class-frequency or density inverse-propensity
weights of the kept web images, on every term (``filter.propensity``).
"""

import numpy as np
import torch
import torch.nn.functional as F

from stages.distill import losses

SETTINGS = {"propensity": "none",  # none | two_head
            "ipwd_formula": "bayes", "ipwd_tau": 0.04, "ipwd_clip": 10.0, "ipwd_start": 0.0}
PRESET = {"propensity": "two_head"}


def needs(r) -> set[str]:
    return {"propensity_heads"} if r.propensity == "two_head" else set()


def sample_weights(r, filter_weights: np.ndarray, logits: np.ndarray) -> torch.Tensor:
    """The filter's normalised, clipped inverse-propensity weight of each kept sample
    (``sample_weights: filter``)."""
    return torch.from_numpy(np.asarray(filter_weights, np.float32))


def logit_norm(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """LogitNorm (Wei et al., ICML 2022): logits / (τ·‖logits‖)."""
    return logits / (tau * logits.norm(dim=1, keepdim=True).clamp_min(1e-7))


def propensity_weights(cls_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor, formula: str,
                       tau: float, clip: float) -> torch.Tensor:
    """Inverse-propensity weights of the batch from the two heads' (raw) logits: mean 1, clipped."""
    pick = labels[:, None]
    log_cls = F.log_softmax(logit_norm(cls_logits, tau), 1).gather(1, pick)[:, 0]
    log_kd = F.log_softmax(logit_norm(kd_logits, tau), 1).gather(1, pick)[:, 0]
    if formula == "bayes":
        w = 1 + (log_cls - log_kd).exp()
    else:
        w = 1 + (-log_cls) / (-log_kd).clamp_min(1e-6)
    return (w / w.mean()).clamp(max=clip)


def adjust(r, step) -> None:
    if r.propensity != "two_head" or step.epoch_fraction < r.ipwd_start:
        return
    n = step.n
    w = propensity_weights(step.out["head_cls"][:n].detach(), step.out["head_kd"][:n].detach(), step.labels,
                           r.ipwd_formula, r.ipwd_tau, r.ipwd_clip)
    step.kd_weight = step.kd_weight * w
    step.logged["ipwd_weight_max"] = w.max()


def terms(r, step) -> dict:
    """The two heads' own losses (they see detached features: they estimate, they do not shape the student)."""
    if r.propensity != "two_head":
        return {}
    n = step.n
    cls, kd = logit_norm(step.out["head_cls"][:n], r.ipwd_tau), logit_norm(step.out["head_kd"][:n], r.ipwd_tau)
    return {"head_ce": (1.0, F.cross_entropy(cls, step.labels)),
            "head_kd": (1.0, losses.kd_per_sample(kd, step.teacher_logits, r.temperature).mean())}
