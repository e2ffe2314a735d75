"""The distillation losses, each a small function of tensors (tested against hand-computed values).

Per-sample functions return one value per sample (shape (N,)); ``weighted_mean`` combines them
with the per-sample weights (inverse propensities, KD³'s selection, DFND's batch selection).
Sources: Hinton et al. 2015 and mdistiller (KD); DFND (CVPR 2021) and mmrazor's port (noise adaptation);
KD³ (ICCV 2023, reconstructed [R] as docs/methods.md describes: selection, feature alignment, InfoNCE);
IE-KD (CVPR 2021) as the aliyun code computes it.
"""

import torch
import torch.nn.functional as F


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ wᵢ·lᵢ / N: weights scale each sample's share without renormalising the batch, so a batch
    whose samples all weigh 0 contributes nothing (the selection dropped it)."""
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights).sum() / max(len(per_sample), 1)


def kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD: T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) per sample, summed over classes."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature ** 2


def ce_per_sample(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels (the teacher's, or KD³'s combined pseudo-labels)."""
    return F.cross_entropy(student_logits, labels, reduction="none")


# ---------------------------------------------------------------- DFND

def transition_matrix(theta: torch.Tensor, accuracy: float) -> torch.Tensor:
    """DFND's noise-adaptation matrix Q (C×C): ``accuracy`` on the diagonal, each row's off-diagonal
    entries softmax(θ_row) · (1 − accuracy), so every row sums to 1. θ is (C, C−1), learned."""
    c = theta.shape[0]
    off = F.softmax(theta, dim=1) * (1 - accuracy)
    q = torch.zeros(c, c, dtype=theta.dtype, device=theta.device)
    mask = ~torch.eye(c, dtype=torch.bool, device=theta.device)
    q[mask] = off.reshape(-1)
    return q + torch.eye(c, dtype=theta.dtype, device=theta.device) * accuracy


def noise_adaptation_per_sample(student_logits: torch.Tensor, teacher_labels: torch.Tensor,
                                q: torch.Tensor) -> torch.Tensor:
    """DFND: NLL(log(softmax(z_s) · Q), ŷ_t) — the student's clean prediction, passed through the
    teacher's noise model Q, should explain the teacher's (noisy) hard labels."""
    noisy = F.softmax(student_logits, dim=1) @ q
    return F.nll_loss(noisy.clamp_min(1e-12).log(), teacher_labels, reduction="none")


def confident_share(teacher_logits: torch.Tensor, share: float) -> torch.Tensor:
    """DFND's per-batch selection (mmrazor ``batch_select``): 1 for the ``share`` of the batch with
    the lowest CE(z_t, argmax z_t), i.e. the teacher's most confident, 0 for the rest."""
    keep = max(1, round(share * len(teacher_logits)))
    confidence = F.softmax(teacher_logits, dim=1).amax(1)
    mask = torch.zeros_like(confidence)
    mask[confidence.topk(keep).indices] = 1.0
    return mask


# ---------------------------------------------------------------- KD³

def combined_selection(teacher_logits: torch.Tensor, student_logits: torch.Tensor, lam: float, mode: str,
                       tau: float, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD³ dynamic instance selection [R]: p_c = λ·softmax(z_t) + (1−λ)·softmax(z_s).

    Returns (mask, pseudo-labels argmax p_c, weights max p_c). ``threshold`` keeps samples with
    max p_c ≥ tau; ``top_k`` the ``ratio`` most confident of the batch."""
    p = lam * F.softmax(teacher_logits, 1) + (1 - lam) * F.softmax(student_logits.detach(), 1)
    confidence, labels = p.max(1)
    if mode == "threshold":
        mask = (confidence >= tau).to(p.dtype)
    elif mode == "top_k":
        mask = torch.zeros_like(confidence)
        mask[confidence.topk(max(1, round(ratio * len(p)))).indices] = 1.0
    else:
        raise ValueError(f"unknown selection mode {mode!r}")
    return mask, labels, confidence


def feature_alignment_per_sample(projected_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """KD³ knowledge memorisation: ‖h(f_s) − f_t‖² per sample, averaged over feature dimensions
    (so the weight does not depend on the feature size)."""
    return (projected_student - teacher_features).pow(2).mean(1)


def classifier_alignment(student_weight: torch.Tensor, teacher_weight: torch.Tensor,
                         projector_weight: torch.Tensor) -> torch.Tensor:
    """The "aligned" alternative to sharing: ‖W_s − W_t·P‖² (mean over entries), where P is the
    projector's weight, so the student's own classifier equals the shared one W_t·h(·) at the optimum."""
    return (student_weight - teacher_weight @ projector_weight).pow(2).mean()


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE between each instance and its perturbation (row i of both); the other rows of
    ``positive`` are the negatives. Cosine similarities, per-sample loss."""
    a, p = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
    logits = a @ p.t() / temperature
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device), reduction="none")


# ---------------------------------------------------------------- IE-KD

def factor_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """IE-KD's distance (aliyun code, ``_factor_transfer`` with p = 1) between factor maps (N, C, H, W):
    flatten, L2-normalise each sample, mean absolute difference over all entries."""
    if x.dim() != 4 or y.dim() != 4:
        raise ValueError(f"IE-KD's factor distance is between 4-D feature maps, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (F.normalize(x.flatten(1), dim=1) - F.normalize(y.flatten(1), dim=1)).abs().mean()


def inheritance_loss(inherit_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """The inheritance part of the student imitates the teacher's factor."""
    return factor_distance(inherit_factor, teacher_factor)


def exploration_loss(explore_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """The exploration part is pushed away from it (the negative distance)."""
    return -factor_distance(explore_factor, teacher_factor)


def reconstruction_loss(reconstructed: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The teacher-feature auto-encoder's loss: mean absolute error, as the code (not the paper's L2)."""
    return (reconstructed - features).abs().mean()
