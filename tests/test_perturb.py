"""perturb: MixDistribution shards and manifest on the small crawled web (fixtures in conftest)."""

import json
import tarfile

import numpy as np
import pandas as pd
import pytest

from manifests import PERTURBATION, read_manifest
from pipeline.errors import UserError
from pipeline.runner import run_stages
from stages import STAGES
from stages.perturb.stage import draw_partners
from tests.conftest import config, fresh


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
