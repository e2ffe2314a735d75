"""PS-KD (Kim et al., ICCV 2021, "Self-Knowledge Distillation with Progressive Refinement of
Targets"), as its official code (lgcnsai/PS-KD-Pytorch) computes it: no teacher; the target of each
image is (1 − α_t)·one-hot(y) + α_t·p_prev, p_prev the model's own softmax on that image in the
previous epoch (one-hot in the first), α_t = α_T·(epoch + 1)/epochs (α_T 0.8); the loss is the
cross-entropy with that soft target. IPWD's one-stage setting puts its weights on the self-distilled
part: (1 − α_t)·CE(y) + α_t·w·CE(p_prev), where the two heads' "machine domain" is p_prev.

Needs human labels (``labels: folder``); the teacher's outputs are not used."""

import torch
import torch.nn.functional as F

from pipeline.errors import UserError

SETTINGS = {"self_distill": "none",  # none | pskd
            "pskd_alpha": 0.8}
PRESET = {"self_distill": "pskd", "labels": "folder", "kd_weight": 0.0, "ce_weight": 0.0, "temperature": 1.0}


def check(r) -> None:
    if r.self_distill == "pskd" and r.labels != "folder":
        raise UserError("distill.self_distill pskd learns from human labels: set distill.labels: folder (a labelled "
                        "transfer set crawled with data.source: folder)")


def alpha(r, epoch: int, epochs: int) -> float:
    """PS-KD's α_t: α_T·(epoch + 1)/epochs (epoch counted from 0)."""
    return r.pskd_alpha * (epoch + 1) / epochs


def adjust(r, step) -> None:
    """The previous epoch's predictions stand in for the teacher (IPWD's KD head learns them)."""
    if r.self_distill == "pskd":
        step.teacher_logits = step.previous.clamp_min(1e-12).log()


def terms(r, step) -> dict:
    if r.self_distill != "pskd":
        return {}
    a = alpha(r, step.epoch, step.epochs)
    log_p = F.log_softmax(step.student_logits, 1)
    hard = F.nll_loss(log_p, step.labels, reduction="none")
    soft = -(step.previous * log_p).sum(1)
    per_sample = (1 - a) * hard + a * soft * step.kd_weight
    return {"pskd": (1.0, (per_sample * step.weight).mean())}


def previous_targets(store: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
    """p_prev of these rows: one-hot of the label in the first epoch (as the official code), else the
    stored predictions."""
    if epoch == 0:
        store[rows] = F.one_hot(labels.cpu(), store.shape[1]).float()
    return store[rows]
