"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", with mdistiller's CIFAR
weights (mdistiller/distillers/KD.py): T²·KL(p_t^T ‖ p_s^T) and cross-entropy with the teacher's
hard label (or the human label of a labelled transfer set: ``labels: folder``). Every other method adds to these two terms."""

from pipeline.errors import UserError
from stages.distill import losses

SETTINGS = {"temperature": 4.0, "kd_weight": 0.9, "ce_weight": 0.1,
            "sample_weights": "none",  # none | filter (the filter's inverse propensities), on every term
            "labels": "teacher"}  # teacher (its hard labels) | folder (a labelled transfer set's class folders)
PRESET: dict = {}


def check(r) -> None:
    if r.temperature <= 0:
        raise UserError(f"distill.temperature must be > 0, got {r.temperature}")


def terms(r, step) -> dict:
    out = {}
    if r.kd_weight:
        kd = losses.kd_per_sample(step.student_logits, step.teacher_logits, r.temperature)
        out["kd"] = (r.kd_weight, losses.weighted_mean(kd, step.weight * step.kd_weight))
    if r.ce_weight:
        out["ce"] = (r.ce_weight, losses.weighted_mean(losses.ce_per_sample(step.student_logits, step.labels),
                                                       step.weight))
    return out
