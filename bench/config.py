"""Config section of the method benchmark (`webdistill bench`)."""

from dataclasses import dataclass

from pipeline.config import opt


@dataclass
class BenchConfig:
    """`webdistill bench`: a student per method and seed on this config's web pool, scored on evaluate.test_set."""

    methods: list = opt(["upper_bound", "oracle_filter", "pool_kd", "random_kd", "dfnd", "filter_kd", "filter_cfw",
                         "kd3", "iekd", "kd3_ipw", "webdistill"],
                        "methods compared (configs/bench_methods.yaml: name, what it trains on, its config "
                        "overrides; `webdistill bench --list`)")
    ablations: bool = opt(True, "also train kd3_ipw with one component removed at a time (the ablations "
                          "of configs/bench_methods.yaml); the ablation table adds the methods that differ from "
                          "webdistill by one part")
    seeds: list = opt([0, 1, 2], "seeds of every method (distill.seed; the random subset's filter.seed)")
    train_images: int = opt(60000, "training images every student sees: epochs = train_images / its transfer set "
                            "(rounded, at least 1), so every method gets the same compute", valid="> 0")
    upper_bound_data: str | None = opt(None, "labelled private training images (WebDataset shards with .cls, or a "
                                       "folder per class) for the upper_bound method: KD on the private data itself", path=True)
    pool_sizes: list = opt([], "smaller pools (URL-list rows, a seeded sample) run end to end with webdistill to "
                           "time each stage against pool size; the full pool is always timed")
    reference: str = opt("webdistill", "the method every other one is paired against (same seeds) in methods.md: "
                         "the default recipe, or e.g. kd_labelled for the labelled settings")
    work_dir: str = opt("bench/work", "where each method's run directories go (runs/<method>/seed<k>)", path=True)
    results_dir: str = opt("bench/results", "where the tables and plots go", path=True)
