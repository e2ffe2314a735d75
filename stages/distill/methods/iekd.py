"""IE-KD (Huang et al., CVPR 2021, "Revisiting Knowledge Distillation: An Inheritance and
Exploration Framework"), as the authors' code computes it: an auto-encoder compresses the teacher's
features into a factor; the student's inheritance head imitates it, its exploration head is pushed
away from it (factor distance: L2-normalised, mean absolute difference). λ_inh = λ_exp = 1."""

from stages.distill import losses

SETTINGS = {"inherit_weight": 0.0, "explore_weight": 0.0}
PRESET = {"inherit_weight": 1.0, "explore_weight": 1.0}


def needs(r) -> set[str]:
    return {"teacher_features", "autoencoder"} if r.inherit_weight > 0 or r.explore_weight > 0 else set()


def terms(r, step) -> dict:
    if step.autoencoder is None:
        return {}
    import torch

    with torch.no_grad():
        factor = step.autoencoder.encoder(step.teacher_features)
    return {"inherit": (r.inherit_weight, losses.inheritance_loss(step.out["inherit"][:step.n], factor)),
            "explore": (r.explore_weight, losses.exploration_loss(step.out["explore"][:step.n], factor))}
