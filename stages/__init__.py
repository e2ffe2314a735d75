"""The pipeline's stages, one module each, in the order they run.

Each stage module exposes ``run(cfg, run_dir) -> counts``: it reads the outputs of its upstream
stages from the run directory and writes its own folder there. The runner (``pipeline.runner``)
decides what to run, skip or resume; a stage only does its own work. A ``distributed`` stage
runs on every torchrun rank and splits its work by ``pipeline.devices.rank()``; the others run
on rank 0 alone.
"""

import dataclasses

from manifests import expand_shards
from pipeline.runner import StageSpec


def distill_recipe(cfg) -> dict:
    """The loss recipe distill's preset resolves to (imported here, not at start-up: the distill
    package loads torch)."""
    from stages.distill.recipe import resolve

    return dataclasses.asdict(resolve(cfg.distill))


STAGES = [
    StageSpec("crawl", "URL list → WebDataset shards with img2dataset, crawl manifest",
              reads_config=("data", "crawl"), upstream=(), module="stages.crawl",
              input_files=lambda cfg: [cfg.data.url_list] if cfg.data.source == "urls" else []),
    StageSpec("score", "teacher pseudo-labels, features, open_clip embeddings",
              reads_config=("teacher", "score"), upstream=("crawl",), module="stages.score", distributed=True,
              input_files=lambda cfg: [cfg.teacher.checkpoint, cfg.teacher.spec_file]
              + expand_shards(cfg.score.reference_shards, "score.reference_shards", must_exist=False)),
    StageSpec("filter", "FAISS distribution matching and inverse-propensity weights",
              reads_config=("filter",), upstream=("score",), module="stages.filter",
              input_files=lambda cfg: [cfg.filter.diagnostics_sources]),
    StageSpec("perturb", "MixDistribution images of the selected samples",
              reads_config=("perturb",), upstream=("filter",), module="stages.perturb"),
    StageSpec("distill", "student training on the selected images", reads_config=("distill",),
              upstream=("filter", "perturb"), module="stages.distill", distributed=True,
              derived=distill_recipe),
    StageSpec("evaluate", "student and teacher on the labelled test set",
              reads_config=("evaluate",), upstream=("distill",), module="stages.evaluate",
              input_files=lambda cfg: expand_shards(cfg.evaluate.test_set, "evaluate.test_set", must_exist=False)),
    StageSpec("report", "markdown and HTML report", reads_config=(), upstream=("evaluate",), module="stages.report"),
]

STAGE_NAMES = [s.name for s in STAGES]
