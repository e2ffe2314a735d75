"""The pipeline's stages, one folder each, in the order they run.

``stages/<stage>/`` holds everything about a stage: ``config.py`` (its config section, every key
with its help text), ``stage.py`` (``run(cfg, run_dir) -> counts``) and its helpers. A stage
writes its own folder of the run directory and reads its upstream stages' outputs only through
the artifacts declared in ``manifests.artifacts``. What several stages share (model registry,
teacher and student loading, image helpers, plots) is ``stages.common``. The runner
(``pipeline.runner``) decides what to run, skip or resume; a stage only does its own work. A
``distributed`` stage runs on every torchrun rank and splits its work by
``pipeline.devices.rank()``; the others run on rank 0 alone.

Importing this package loads no torch: the stages' code is imported when a stage runs.
"""

from manifests import expand_shards
from pipeline.runner import StageSpec
from stages.common.config import TeacherConfig
from stages.crawl.config import CrawlConfig, DataConfig
from stages.distill.config import DistillConfig
from stages.evaluate.config import EvaluateConfig
from stages.filter.config import FilterConfig
from stages.perturb.config import PerturbConfig
from stages.score.config import ScoreConfig
from stages.synthesize.config import SynthesizeConfig


def distill_recipe(cfg) -> dict:
    """The loss recipe distill's preset resolves to: a new meaning of a preset name makes distill
    stale (imported here, not at start-up: the loss methods load torch)."""
    from stages.distill.methods import resolve

    return dict(vars(resolve(cfg.distill)))


def crawl_side(cfg) -> dict | None:
    """The stored side the crawl derives from the teacher when crawl.image_size is unset (a new teacher
    input size makes the crawl stale)."""
    if cfg.crawl.image_size:
        return None
    from stages.crawl.stage import stored_side

    return {"image_size": stored_side(cfg)}


STAGES = [
    StageSpec("crawl", "URL list → WebDataset shards with img2dataset, crawl manifest", upstream=(),
              sections={"data": DataConfig, "crawl": CrawlConfig}, module="stages.crawl.stage",
              preflight="stages.crawl.stage:preflight", derived=crawl_side,
              input_files=lambda cfg: [cfg.data.url_list] if cfg.data.source == "urls" else []),
    StageSpec("score", "teacher pseudo-labels, features, open_clip embeddings", upstream=("crawl",),
              sections={"teacher": TeacherConfig, "score": ScoreConfig}, module="stages.score.stage",
              preflight="stages.score.stage:preflight",
              distributed=True,
              input_files=lambda cfg: [cfg.teacher.checkpoint, cfg.teacher.spec_file]
              + expand_shards(cfg.score.reference_shards, "score.reference_shards", must_exist=False)),
    StageSpec("filter", "FAISS distribution matching and inverse-propensity weights", upstream=("score",),
              sections={"filter": FilterConfig}, module="stages.filter.stage",
              preflight="stages.filter.stage:preflight",
              input_files=lambda cfg: [cfg.filter.diagnostics_sources]),
    StageSpec("synthesize", "images optimised toward the teacher's BatchNorm statistics, from noise or kept "
              "web images (DeepInversion; by default the kept images when the teacher has BatchNorm)",
              upstream=("filter",),
              sections={"synthesize": SynthesizeConfig}, module="stages.synthesize.stage",
              preflight="stages.synthesize.stage:preflight"),
    StageSpec("perturb", "MixDistribution images of the selected samples", upstream=("filter",),
              sections={"perturb": PerturbConfig}, module="stages.perturb.stage"),
    StageSpec("distill", "student training on the selected images", upstream=("filter", "synthesize", "perturb"),
              sections={"distill": DistillConfig}, module="stages.distill.stage",
              preflight="stages.distill.stage:preflight", distributed=True,
              derived=distill_recipe),
    StageSpec("evaluate", "student and teacher on the labelled test set", upstream=("distill",),
              sections={"evaluate": EvaluateConfig}, module="stages.evaluate.stage",
              preflight="stages.evaluate.stage:preflight",
              input_files=lambda cfg: expand_shards(cfg.evaluate.test_set, "evaluate.test_set", must_exist=False)),
    StageSpec("report", "markdown and HTML report", upstream=("evaluate",), module="stages.report.stage"),
]

STAGE_NAMES = [s.name for s in STAGES]
