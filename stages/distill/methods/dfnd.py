"""DFND (Chen et al., CVPR 2021, "Learning Student Networks in the Wild"): KD plus noise
adaptation, NLL(log(softmax(z_s)·Q), ŷ_t) with a learned transition matrix Q whose diagonal is the
teacher's accuracy. As mmrazor's DFNDLoss: the KD term on the confident part of each batch only
(``batch_select``, summed over it and divided by the batch size), the noise term on every sample."""

from pipeline.errors import UserError
from stages.distill import losses

SETTINGS = {"batch_select": 1.0, "noise_adaptation_weight": 0.0, "teacher_accuracy": 0.95}
PRESET = {"kd_weight": 1.0, "ce_weight": 0.0, "noise_adaptation_weight": 1.0, "batch_select": 0.5}


def check(r) -> None:
    if not 0 < r.batch_select <= 1:
        raise UserError(f"distill.batch_select must be in (0, 1], got {r.batch_select}")
    if not 0 < r.teacher_accuracy <= 1:
        raise UserError(f"distill.teacher_accuracy must be in (0, 1], got {r.teacher_accuracy}")


def adjust(r, step) -> None:
    if r.batch_select < 1:
        step.weight = step.weight * losses.confident_share(step.teacher_logits, r.batch_select)


def terms(r, step) -> dict:
    if not r.noise_adaptation_weight:
        return {}
    q = losses.transition_matrix(step.model.theta, r.teacher_accuracy)
    noise = losses.noise_adaptation_per_sample(step.student_logits, step.labels, q)
    return {"noise": (r.noise_adaptation_weight, losses.weighted_mean(noise, step.sample_weight))}
