"""DFND (Chen et al., CVPR 2021, "Learning Student Networks in the Wild"): KD plus noise
adaptation, NLL(log(softmax(z_s)·Q), ŷ_t) with a learned transition matrix Q whose diagonal is the
teacher's accuracy (``teacher.accuracy``, its owner's figure, as the official code takes its teacher's
test accuracy; 0.95 when unknown). As mmrazor's DFNDLoss: the KD term on the confident part of each batch only
(``batch_select``, summed over it and divided by the batch size), the noise term on every sample."""

import logging

from pipeline.errors import UserError
from stages.distill import losses

log = logging.getLogger("webdistill.distill")

SETTINGS = {"batch_select": 1.0, "noise_adaptation_weight": 0.0,
            "teacher_accuracy": None}  # None: the teacher's reported accuracy (``configure``)
UNKNOWN_ACCURACY = 0.95  # DFND's CIFAR-10 teacher (0.9523), for a teacher whose accuracy nobody reported
PRESET = {"kd_weight": 1.0, "ce_weight": 0.0, "noise_adaptation_weight": 1.0, "batch_select": 0.5}


def check(r) -> None:
    if not 0 < r.batch_select <= 1:
        raise UserError(f"distill.batch_select must be in (0, 1], got {r.batch_select}")
    if r.teacher_accuracy is not None and not 0 < r.teacher_accuracy <= 1:
        raise UserError(f"distill.teacher_accuracy must be in (0, 1], got {r.teacher_accuracy}")


def configure(r, teacher_cfg) -> None:
    """Q's diagonal: distill.teacher_accuracy if given, else the teacher's reported accuracy."""
    if r.noise_adaptation_weight and r.teacher_accuracy is None:
        r.teacher_accuracy = teacher_cfg.accuracy or UNKNOWN_ACCURACY
        if not teacher_cfg.accuracy:
            log.warning("distill: DFND's Q diagonal is %.2f: the teacher spec reports no accuracy (teacher.accuracy)",
                        UNKNOWN_ACCURACY)


def adjust(r, step) -> None:
    if r.batch_select < 1:
        step.weight = step.weight * losses.confident_share(step.teacher_logits, r.batch_select)


def terms(r, step) -> dict:
    if not r.noise_adaptation_weight:
        return {}
    q = losses.transition_matrix(step.model.theta, r.teacher_accuracy)
    noise = losses.noise_adaptation_per_sample(step.student_logits, step.labels, q)
    return {"noise": (r.noise_adaptation_weight, losses.weighted_mean(noise, step.sample_weight))}
