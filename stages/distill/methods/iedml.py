"""IE-DML (Huang et al., CVPR 2021, "Revisiting Knowledge Distillation: An Inheritance and Exploration
Framework", its mutual-learning variant): two students of the same architecture learn together, each
with cross-entropy, deep mutual learning's KL towards the other's prediction (Zhang et al., CVPR 2018;
the authors' ``processors/DML.py``: CE + kl_loss_weight·KL, T = 1), and IE-KD's inheritance and
exploration towards the *other* network's factor (an auto-encoder of each network's own feature map,
trained online with the reconstruction loss, its factor a detached target for the partner). The two
are updated in one step on the sum of their losses, where the DML code alternates [R]. The first
student is the one distill keeps. The teacher's outputs are not used (``kd_weight`` 0; the labels are
the teacher's hard labels on web images, or the class folders with ``labels: folder``)."""

import torch.nn.functional as F

from stages.distill import losses

SETTINGS = {"mutual": "none",  # none | iedml
            "mutual_weight": 1.0}
PRESET = {"mutual": "iedml", "inherit_weight": 1.0, "explore_weight": 1.0, "kd_weight": 0.0, "ce_weight": 1.0}


def needs(r) -> set[str]:
    return {"peer"} if r.mutual == "iedml" else set()


def mutual_kl(logits, partner_logits):
    """KL(p_partner ‖ p) per sample at T = 1, the partner's prediction a fixed target."""
    return F.kl_div(F.log_softmax(logits, 1), F.softmax(partner_logits.detach(), 1), reduction="none").sum(1)


def terms(r, step) -> dict:
    if r.mutual != "iedml":
        return {}
    n, out = step.n, step.out
    peer = out["peer_logits"][:n]
    return {
        "mutual": (r.mutual_weight, losses.weighted_mean(mutual_kl(step.student_logits, peer), step.weight)),
        "peer_mutual": (r.mutual_weight, losses.weighted_mean(mutual_kl(peer, step.student_logits), step.weight)),
        "peer_ce": (r.ce_weight or 1.0, losses.weighted_mean(losses.ce_per_sample(peer, step.labels), step.weight)),
        "inherit": (r.inherit_weight, losses.inheritance_loss(out["inherit"][:n], out["peer_factor"][:n])),
        "explore": (r.explore_weight, losses.exploration_loss(out["explore"][:n], out["peer_factor"][:n])),
        "peer_inherit": (r.inherit_weight, losses.inheritance_loss(out["peer_inherit"][:n], out["factor"][:n])),
        "peer_explore": (r.explore_weight, losses.exploration_loss(out["peer_explore"][:n], out["factor"][:n])),
        "reconstruction": (1.0, out["reconstruction"] + out["peer_reconstruction"]),
    }
