"""IE-KD (Huang et al., CVPR 2021, "Revisiting Knowledge Distillation: An Inheritance and
Exploration Framework"), as the authors' code computes it: an auto-encoder (convolutional coders,
``model.AutoEncoder``) compresses the teacher's feature map into a factor with half its channels;
the student's feature map is split along its channels, the first half encoded into the inheritance
factor (pulled towards the teacher's), the second into the exploration factor (pushed away). The
factor distance is the official ``_factor_transfer``: flatten, L2-normalise per sample, mean absolute
difference. The preset is the official loss, CE + λ_inh·inheritance + λ_exp·exploration (λ = 1), no
KD term. Where the student's and the teacher's maps differ in size the student's factor is average-
pooled to the teacher's [R]."""

import torch.nn.functional as F

from stages.distill import losses

SETTINGS = {"inherit_weight": 0.0, "explore_weight": 0.0}
PRESET = {"inherit_weight": 1.0, "explore_weight": 1.0, "kd_weight": 0.0, "ce_weight": 1.0}


def needs(r) -> set[str]:
    """The teacher's auto-encoder (IE-DML learns from its peer's instead)."""
    return {"autoencoder"} if (r.inherit_weight > 0 or r.explore_weight > 0) and r.mutual == "none" else set()


def matched(student_factor, teacher_factor):
    """The student's factor at the teacher's spatial size."""
    if student_factor.shape[-2:] != teacher_factor.shape[-2:]:
        return F.adaptive_avg_pool2d(student_factor, teacher_factor.shape[-2:])
    return student_factor


def terms(r, step) -> dict:
    if step.autoencoder is None:
        return {}
    import torch

    with torch.no_grad():
        factor = step.autoencoder.encoder(step.teacher_map)
    inherit, explore = matched(step.out["inherit"][:step.n], factor), matched(step.out["explore"][:step.n], factor)
    return {"inherit": (r.inherit_weight, losses.inheritance_loss(inherit, factor)),
            "explore": (r.explore_weight, losses.exploration_loss(explore, factor))}
