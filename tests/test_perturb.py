"""perturb: MixDistribution shards and manifest on the small crawled web (fixtures in conftest)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest

from manifests import PERTURBATION, read_manifest
from pipeline.errors import UserError
from pipeline.runner import run_stages
from stages import STAGES
from stages.perturb.stage import draw_partners
from tests.conftest import REPO, config, fresh


def test_perturb_shards_hold_each_kept_image_and_its_mix_keyed_by_uid(upstream):
    selection = pd.read_parquet(upstream / "filter" / "selection.parquet")
    kept = set(selection.loc[selection["keep"], "uid"])
    manifest = read_manifest(upstream / "perturb" / "manifest.parquet", PERTURBATION)
    assert set(manifest["uid"]) == kept and len(manifest) == len(kept)
    assert (manifest["uid"] != manifest["partner_uid"]).all() and manifest["partner_uid"].isin(kept).all()
    assert (manifest["pseudo_label"] != manifest["partner_pseudo_label"]).all()  # partner: across classes
    assert manifest["lam"].between(0, 1).all()
    keys = set()
    for shard in sorted((upstream / "perturb" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        keys |= {n.split(".")[0] for n in names}
        assert {n.split(".", 1)[1] for n in names} >= {"mix0.png", "json"}
    assert keys == kept
    counts = json.loads((upstream / "perturb" / "shards.json").read_text())
    assert sum(counts.values()) == len(kept)


def test_each_perturbation_is_its_source_mixed_with_the_manifest_partner_and_lambda(upstream):
    from stages.perturb.stage import image_array, perturb_image

    stats = np.load(upstream / "perturb" / "stats.npz")
    position = {u: i for i, u in enumerate(stats["uid"])}
    manifest = read_manifest(upstream / "perturb" / "manifest.parquet", PERTURBATION).set_index("uid")
    shard = sorted((upstream / "perturb" / "shards").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    mixes = [name for name in files if name.endswith(".mix0.png")][:20]
    assert len(mixes) >= 5
    for name in mixes:
        uid = name.split(".")[0]
        source = image_array(files[f"{uid}.jpg"])
        # float32 means of 4,096 pixels summed in another order differ by up to ~2e-5; another image by > 1e-3
        assert np.allclose(source.reshape(3, -1).mean(1), stats["mean"][position[uid]], atol=1e-4)
        row = manifest.loc[uid]
        j = position[row["partner_uid"]]
        expected = perturb_image(source, stats["mean"][j], stats["std"][j], row["lam"])
        assert np.abs(image_array(files[name]) - expected).max() <= 1 / 255 + 1e-6


def test_perturb_image_takes_the_mixed_statistics_when_nothing_clips():
    from stages.perturb.stage import perturb_image

    pixels = np.random.default_rng(0).uniform(0.4, 0.6, (3, 16, 16)).astype(np.float32)
    mean, std = pixels.reshape(3, -1).mean(1), pixels.reshape(3, -1).std(1)
    partner_mean, partner_std = np.array([0.3, 0.5, 0.7], np.float32), np.array([0.02, 0.05, 0.08], np.float32)
    out = perturb_image(pixels, partner_mean, partner_std, 0.25)
    assert np.allclose(out.reshape(3, -1).mean(1), 0.25 * mean + 0.75 * partner_mean, atol=1e-4)
    assert np.allclose(out.reshape(3, -1).std(1), 0.25 * std + 0.75 * partner_std, atol=1e-4)


def test_perturb_is_deterministic_and_resumes_per_shard(upstream, small_web, mnist_teacher, private, tmp_path):
    run_dir = fresh(upstream, tmp_path / "run")
    cfg = config(small_web, run_dir, mnist_teacher, private)
    shards = sorted((run_dir / "perturb" / "shards").glob("*.tar"))
    before = {s.name: s.read_bytes() for s in shards}
    # a stage killed after its first shard: its partial folder without a record and without the later shards
    partial = run_dir / "perturb.partial"
    (run_dir / "perturb").rename(partial)
    (partial / "_SUCCESS.json").unlink()
    for s in shards[1:]:
        (partial / "shards" / s.name).unlink()
    first_mtime = (partial / "shards" / shards[0].name).stat().st_mtime_ns
    run_stages(cfg, STAGES, only=["perturb"])
    record = json.loads((run_dir / "perturb" / "_SUCCESS.json").read_text())
    assert record["counts"]["resumed_shards"] == 1 and record["resumed"]
    assert shards[0].stat().st_mtime_ns == first_mtime  # not rewritten
    assert {s.name: s.read_bytes() for s in shards} == before  # same bytes as the uninterrupted run


def test_draw_partners_within_and_across_classes():
    labels = np.array([0, 0, 0, 1, 1, 2])
    partners, lam = draw_partners(labels, 3, "within", 0.5, seed=1)
    assert (partners != np.arange(6)[:, None]).all()
    assert (labels[partners[:3]] == 0).all() and (labels[partners[3:5]] == 1).all()
    assert partners[5].tolist() != [5] * 3  # class 2 has one member: any other sample
    across, _ = draw_partners(labels, 3, "across", 0.5, seed=1)
    assert (labels[across] != labels[:, None]).all()
    again, lam_again = draw_partners(labels, 3, "within", 0.5, seed=1)
    assert np.array_equal(partners, again) and np.array_equal(lam, lam_again)
    with pytest.raises(UserError, match="at least 2"):
        draw_partners(np.array([0]), 1, "any", 0.5, 0)


def parallel_op() -> float:
    """Large enough for torch to run it as an OpenMP parallel region (when it has more than one thread)."""
    import torch

    return float(torch.nn.functional.conv2d(torch.ones(8, 3, 224, 224), torch.ones(64, 3, 7, 7)).mean())


def test_shard_workers_run_torch_after_the_parent_did(tmp_path):
    """GNU OpenMP is not fork-safe: a worker forked after the parent ran a parallel region (a teacher's
    forward pass before perturb, in one `webdistill run`) hung for good in its own first one."""
    code = ("import torch\ntorch.set_num_threads(2)\n"
            "from tests.test_perturb import parallel_op\nfrom stages.perturb.stage import worker_pool\n"
            "parallel_op()\n"  # the parent's forward pass
            "pool = worker_pool(1)\ntry:\n    print(pool.submit(parallel_op).result(timeout=120))\n"
            "except TimeoutError:\n    print('the worker hung')\n    import os; os._exit(3)")  # not waiting for it
    with open(tmp_path / "out.txt", "w") as out:  # a file, not a pipe: a hung worker would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        exit_code = proc.wait(timeout=600)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # a hung worker, if any
    printed = (tmp_path / "out.txt").read_text()
    assert exit_code == 0, printed[-2000:]
    assert float(printed) == 147.0  # 3 × 7 × 7 ones
