"""KD³ (Tang et al., ICCV 2023, "Distribution Shift Matters for Knowledge Distillation with
Webly Collected Images"), reconstructed where the paper leaves details open (docs/methods.md):
dynamic selection of each batch by λ·p_t + (1−λ)·p_s, weighted feature alignment ‖h(f_s) − f_t‖²,
the teacher's classifier shared on the projected student features (or the student's own aligned to
it), and InfoNCE between each image and its MixDistribution perturbation (on pixels, or on a shallow
feature map), on a projection head of its own (SimCLR's MLP) or on h."""

from pipeline.errors import UserError
from stages.distill import losses

SETTINGS = {"selection": "none",  # none | threshold | top_k
            "selection_tau": 0.5, "selection_ratio": 0.7, "selection_lambda": (1.0, 0.5),
            "feature_weight": 0.0, "classifier": "own",  # own | shared | aligned
            "contrastive_weight": 0.0, "contrastive_temperature": 0.1,
            "contrastive_head": "separate",  # separate (its own MLP projection) | projector (h, which feeds the classifier)
            "perturbation": "none"}  # none | offline | online
PRESET = {"selection": "threshold", "feature_weight": 1.0, "classifier": "shared", "contrastive_weight": 0.1,
          "perturbation": "offline"}


def check(r) -> None:
    if len(r.selection_lambda) != 2:
        raise UserError("distill.selection_lambda must be [first, last]")
    if r.contrastive_weight > 0 and r.perturbation == "none":
        raise UserError("distill.contrastive_weight needs a perturbed view: set distill.perturbation to offline "
                        "or online")


def needs(r) -> set[str]:
    wanted = set()
    if r.feature_weight > 0 or r.classifier != "own" or (r.contrastive_weight > 0 and r.contrastive_head == "projector"):
        wanted.add("projector")
    if r.contrastive_weight > 0 and r.contrastive_head == "separate":
        wanted.add("contrast_head")
    if r.feature_weight > 0:
        wanted.add("teacher_features")
    return wanted


def adjust(r, step) -> None:
    """Dynamic selection: the combined prediction's confident samples, its labels and confidence."""
    if r.selection == "none":
        return
    first, last = r.selection_lambda
    lam = first + (last - first) * step.epoch_fraction
    mask, step.labels, step.confidence = losses.combined_selection(
        step.teacher_logits, step.student_logits, lam, r.selection, r.selection_tau, r.selection_ratio)
    step.weight = step.weight * mask
    step.logged["selected"] = mask.mean()


def terms(r, step) -> dict:
    out, n = {}, step.n
    if r.feature_weight:
        feature = losses.feature_alignment_per_sample(step.out["projected"][:n], step.teacher_features)
        out["feature"] = (r.feature_weight, losses.weighted_mean(feature, step.weight * step.confidence))
    if r.classifier == "aligned":
        student = step.model.student
        out["classifier"] = (1.0, losses.classifier_alignment(student.net.classifier.weight, step.teacher_head,
                                                              student.projector.weight))
    if r.contrastive_weight:
        z = step.out["contrast" if r.contrastive_head == "separate" else "projected"]
        nce = losses.info_nce(z[:n], z[n:], r.contrastive_temperature)
        out["contrastive"] = (r.contrastive_weight, losses.weighted_mean(nce, step.weight))
    return out
