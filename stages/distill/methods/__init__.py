"""The loss methods, one short file each behind a dict registry (as mdistiller keeps one
distiller per file). docs/methods.md describes each method, its formulas and its sources.

A method file declares
    SETTINGS          its loss settings (keys of the distill config section) and their values
                      when the method is off
    PRESET            the settings its preset turns on
    check(r)          (optional) refuses settings that cannot work together
    configure(r, teacher_cfg)  (optional) fills settings that come from the teacher (DFND's Q diagonal)
    needs(r)          (optional) what the step must provide: "projector", "teacher_features",
                      "autoencoder", "propensity_heads", "contrast_head", "peer"
    adjust(r, step)   (optional) per-sample weights, labels or confidences of the batch, before
                      any loss term (DFND's batch selection, KD³'s dynamic selection)
    terms(r, step)    its named loss terms: {name: (weight, value)}

The training step builds a ``Step``, lets every method adjust it and sums every method's
weighted terms in registry order: it has no per-method branch. A recipe (``resolve``) is every
method's settings, the preset's on top, the config's explicit (non-null) values on top of that.
"""

import types
from dataclasses import dataclass, field

import torch

from pipeline.errors import UserError
from stages.distill.methods import dfnd, iedml, iekd, ipwd, kd, kd3, kddm, pskd

# registry order is the order of ``adjust`` and of the terms: PS-KD's targets before IPWD reads them
METHODS = {"kd": kd, "pskd": pskd, "dfnd": dfnd, "ipwd": ipwd, "kd3": kd3, "iekd": iekd, "iedml": iedml,
           "kddm": kddm}

PRESETS: dict[str, dict] = {name: method.PRESET for name, method in METHODS.items()} | {
    # IPWD's one-stage setting: PS-KD with the two-head weights on its self-distilled part
    "pskd_ipwd": pskd.PRESET | ipwd.PRESET,
    # KD³'s recipe with the filter's class-frequency inverse-propensity weights on every term
    "kd3_ipw": kd3.PRESET | {"sample_weights": "filter"},
    # webdistill: Hinton KD on the FAISS filter's kept set. On the filtered set no published add-on
    # helped in the benchmark (IPW, KD³, IE-KD, tempered IPW, elastic views, other T: README
    # Results, bench/results/), so the preset is the loss they all build on; the filter does the work.
    "webdistill": {},
}

# per-sample loss weights by distill.sample_weights: (recipe, kept rows' filter weights, their
# teacher logits) → one weight per kept sample
SAMPLE_WEIGHTS = {"none": lambda r, filter_weights, logits: torch.ones(len(filter_weights)),
                  "filter": ipwd.sample_weights}


class Recipe(types.SimpleNamespace):
    """The resolved loss settings of one training run (attribute access: ``r.temperature``)."""


def defaults() -> dict:
    return {key: value for method in METHODS.values() for key, value in method.SETTINGS.items()}


def resolve(settings) -> Recipe:
    """The preset's recipe with the config's explicit (non-null) loss settings on top."""
    values = defaults() | PRESETS[settings.preset]
    for key in values:
        explicit = getattr(settings, key, None)
        if explicit is not None:
            values[key] = tuple(explicit) if isinstance(explicit, list) else explicit
    recipe = Recipe(**values)
    for method in METHODS.values():
        if hasattr(method, "check"):
            method.check(recipe)
    if recipe.sample_weights not in SAMPLE_WEIGHTS:
        raise UserError(f"distill.sample_weights must be one of {list(SAMPLE_WEIGHTS)}")
    return recipe


def configure(recipe: Recipe, teacher_cfg) -> Recipe:
    """Fill the settings that come from the teacher's spec (before training)."""
    for method in METHODS.values():
        if hasattr(method, "configure"):
            method.configure(recipe, teacher_cfg)
    return recipe


def needs(recipe: Recipe) -> set[str]:
    return set().union(*(method.needs(recipe) for method in METHODS.values() if hasattr(method, "needs")))


def describe(recipe: Recipe) -> str:
    """The non-default parts of a recipe, one line (for logs and the report)."""
    parts = [f"{k}={getattr(recipe, k)}" for k, v in defaults().items() if getattr(recipe, k) != v]
    return ", ".join(parts) or "Hinton KD (T=4, 0.9 KD + 0.1 CE)"


@dataclass
class Step:
    """One batch as the loss methods see it. ``weight`` (per sample, every term), ``kd_weight`` (per
    sample, the KD term), ``labels`` (the teacher's hard labels, or the human ones with ``labels:
    folder``) and ``confidence`` start neutral; methods' ``adjust`` may change them.
    ``sample_weight`` keeps the per-sample weights from before any batch selection (``adjust``
    masks ``weight`` only), for terms that see the whole batch (DFND's noise adaptation)."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    teacher_features: torch.Tensor | None
    out: dict  # every output of the student's forward pass (projected, inherit, explore...), both views
    weight: torch.Tensor
    labels: torch.Tensor
    confidence: torch.Tensor
    epoch_fraction: float  # progress through training, 0 → 1
    model: object  # the DistillModel (DFND's θ, the student's classifier and projector)
    teacher_head: torch.Tensor | None  # the teacher's classifier weight (classifier: aligned)
    autoencoder: object | None  # IE-KD's teacher-feature-map auto-encoder
    logged: dict = field(default_factory=dict)  # per-batch diagnostics for the history (not losses)
    previous: torch.Tensor | None = None  # PS-KD: the rows' predictions of the previous epoch (probabilities)
    epoch: int = 0
    epochs: int = 1
    teacher_map: torch.Tensor | None = None  # IE-KD: the teacher's feature map before global pooling
    sample_weight: torch.Tensor = field(init=False)
    kd_weight: torch.Tensor = field(init=False)  # per-sample weight of the KD term alone (IPWD's)

    def __post_init__(self):
        self.sample_weight = self.weight
        self.kd_weight = torch.ones_like(self.weight)

    @property
    def n(self) -> int:
        return len(self.student_logits)


def loss(recipe: Recipe, step: Step) -> tuple[torch.Tensor, dict]:
    """Σ weight · term over every method's terms (a term of weight 0 is skipped), and the terms."""
    for method in METHODS.values():
        if hasattr(method, "adjust"):
            method.adjust(recipe, step)
    total, terms = torch.zeros((), device=step.student_logits.device), dict(step.logged)
    for method in METHODS.values():
        for name, (weight, value) in method.terms(recipe, step).items():
            if weight:
                terms[name] = value.detach()
                total = total + weight * value
    return total, terms
