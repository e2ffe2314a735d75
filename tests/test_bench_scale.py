"""bench/bench_scale.py: its generated pool stands in for the crawl, and the real stages accept it."""

import os

import numpy as np

from manifests import CRAWL, read_manifest
from pipeline.config import load_config
from pipeline.rundir import RunDir
from pipeline.runner import run_stages, stage_states
from stages.common.images import read_shard_images


def test_the_generated_pool_is_read_as_a_crawl_and_scored(mnist_teacher, monkeypatch, tmp_path):
    from bench import bench_scale

    monkeypatch.setenv("WEBDISTILL_SCALE_POOL", "250")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *mnist_teacher, "crawl.processes_count=1",
                             "score.num_workers=0", *bench_scale.SETTINGS])
    run_stages(cfg, bench_scale.SPECS, only=["crawl", "score"])
    run = RunDir(tmp_path / "run")
    crawl = read_manifest(tmp_path / "run" / "crawl" / "manifest.parquet", CRAWL)
    assert len(crawl) == 250 and crawl["uid"].is_unique and (crawl["status"] == "success").all()
    images = dict(read_shard_images(tmp_path / "run" / "crawl" / "shards"))
    assert set(images) == set(crawl["uid"]) and {im.size for im in images.values()} == {(28, 28)}
    assert len({np.asarray(im).tobytes() for im in images.values()}) == 250  # every image its own
    assert run.record("score")["counts"]["scored"] == 250
    # another pool size is another crawl: the fingerprint holds the size
    monkeypatch.setenv("WEBDISTILL_SCALE_POOL", "300")
    assert stage_states(cfg, run, bench_scale.SPECS)["crawl"].status == "stale"
    assert bench_scale.tree_pss_mb(os.getpid()) > 10  # this process, measured from /proc
