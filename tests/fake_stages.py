"""Two tiny stages for the runner tests: they log each call and write one file."""

from pipeline.runner import StageSpec


def _work(name, cfg, run_dir, fail_after_partial=False):
    out = run_dir.stage_dir(name)
    with open(run_dir.root / "calls.txt", "a") as f:
        f.write(f"{name} resumed={(out / 'partial.txt').exists()}\n")
    (out / "partial.txt").write_text("half")
    if fail_after_partial:
        raise KeyboardInterrupt("killed")
    (out / "out.txt").write_text(str(cfg.crawl.timeout))
    return {"items": 3, "timings": {"work_s": 0.0}}


def first(cfg, run_dir):
    return _work("first", cfg, run_dir, fail_after_partial=cfg.crawl.retries == 99)


def second(cfg, run_dir):
    return _work("second", cfg, run_dir)


SPECS = [
    StageSpec("first", "first fake stage", reads_config=("crawl",), upstream=(), module="tests.fake_stages:first"),
    StageSpec("second", "second fake stage", reads_config=("data",), upstream=("first",),
              module="tests.fake_stages:second", input_files=lambda cfg: [cfg.data.url_list]),
    StageSpec("third", "not built", reads_config=(), upstream=("second",)),
]
