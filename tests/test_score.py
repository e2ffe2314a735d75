"""The score stage: agreement with a direct forward pass, broken images, resume, torchrun, embedder."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from manifests import CRAWL, SCORE, SCORE_FAILURES, SELECTION, read_array, read_manifest
from manifests.artifacts import CRAWL_INVENTORY
from pipeline.config import dump_yaml, load_config, to_dict
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.runner import run_stages
from stages import STAGES
from stages.common.images import read_shard_images
from stages.common.models import create_model
from stages.common.teacher import load_teacher
from stages.score.stage import prediction_table
from tests.conftest import REPO, copy_crawl, torchrun_two_nodes, web_config


def score_config(small_web, tiny_teacher, run_dir, *overrides):
    return web_config(small_web, run_dir, *tiny_teacher["overrides"], "score.batch_size=32",
                      "score.num_workers=2", *overrides)


def cfg_overrides(cfg):
    """``cfg``'s data, crawl, teacher and score sections as --set overrides."""
    d = to_dict(cfg)
    return [f"{section}.{k}={json.dumps(v)}" for section in ("data", "crawl", "teacher", "score")
            for k, v in d[section].items()]


def score_config_from(cfg, run_dir, *overrides):
    return load_config(None, [f"run_dir={run_dir}", *cfg_overrides(cfg), *overrides])


def outputs(run_dir):
    folder = run_dir / "score"
    manifest = read_manifest(folder / "manifest.parquet", SCORE)
    arrays = {name: read_array(folder / f"{name}.npy", len(manifest), name, mmap=False)
              for name in ("logits", "features", "embeddings") if (folder / f"{name}.npy").exists()}
    failures = read_manifest(folder / "failures.parquet", SCORE_FAILURES)
    return manifest, arrays, failures


def assert_same_outputs(a, b):
    (ma, xa, fa), (mb, xb, fb) = a, b
    pd.testing.assert_frame_equal(ma.drop(columns=["confidence", "entropy", "margin", "topk_probs"]),
                                  mb.drop(columns=["confidence", "entropy", "margin", "topk_probs"]))
    np.testing.assert_allclose(ma["confidence"], mb["confidence"], atol=1e-5)
    assert xa.keys() == xb.keys()
    for name in xa:
        np.testing.assert_allclose(xa[name].astype(np.float32), xb[name].astype(np.float32), atol=2e-3, rtol=1e-3)
    pd.testing.assert_frame_equal(fa, fb)




@pytest.fixture(scope="module")
def scored(small_web, crawled, tiny_teacher, tmp_path_factory):
    run_dir = copy_crawl(crawled, tmp_path_factory.mktemp("scored") / "run")
    cfg = score_config(small_web, tiny_teacher, run_dir)
    run_stages(cfg, STAGES, only=["score"])
    return cfg, run_dir


def test_manifest_and_arrays_match_a_direct_forward_pass(scored):
    cfg, run_dir = scored
    manifest, arrays, failures = outputs(run_dir)
    crawl = read_manifest(run_dir / "crawl" / "manifest.parquet", CRAWL)
    assert set(manifest["uid"]) == set(crawl.loc[crawl["status"] == "success", "uid"])
    assert failures.empty

    teacher = load_teacher(cfg.teacher)
    uids, images = zip(*read_shard_images(run_dir / "crawl" / "shards"))
    with torch.no_grad():
        logits, features = teacher.model(torch.stack([teacher.transform(im) for im in images]))
    row = {uid: i for i, uid in enumerate(manifest["uid"])}
    order = [row[u] for u in uids]
    np.testing.assert_allclose(arrays["logits"][order], logits.numpy(), atol=1e-4, rtol=1e-4)
    assert arrays["logits"].dtype == np.float32 and arrays["features"].dtype == np.float16
    np.testing.assert_allclose(arrays["features"][order].astype(np.float32), features.numpy(), atol=2e-3, rtol=2e-3)

    expected = prediction_table(logits.numpy(), teacher.class_names, top_k=5)
    got = manifest.iloc[order].reset_index(drop=True)
    assert (got["pseudo_label"].to_numpy() == logits.argmax(1).numpy()).all()
    assert (got["pseudo_class"] == [teacher.class_names[i] for i in logits.argmax(1)]).all()
    probs = torch.softmax(logits.double(), 1)
    np.testing.assert_allclose(got["confidence"], probs.max(1).values, atol=1e-5)
    np.testing.assert_allclose(got["entropy"], -(probs * probs.log()).sum(1), atol=1e-4)
    top2 = probs.topk(2).values
    np.testing.assert_allclose(got["margin"], top2[:, 0] - top2[:, 1], atol=1e-5)
    np.testing.assert_array_equal(np.stack(got["topk_labels"]), np.stack(expected["topk_labels"]))


def test_record_and_summary(scored):
    _, run_dir = scored
    record = RunDir(run_dir).record("score")
    summary = json.loads((run_dir / "score" / "summary.json").read_text())
    assert record["counts"]["scored"] == summary["scored"] == sum(summary["pseudo_class_histogram"].values())
    assert 0.1 <= summary["mean_confidence"] <= 1
    info = json.loads((run_dir / "score" / "teacher.json").read_text())
    assert info["num_classes"] == 10 and info["feature_dim"] == 32
    with np.load(run_dir / "score" / "classifier.npz") as z:
        assert z["weight"].shape == (10, 32) and z["bias"].shape == (10,)


def test_prediction_table_by_hand():
    # logits ln(1), ln(2), ln(5) → probabilities 0.125, 0.25, 0.625
    table = prediction_table(np.log(np.array([[1.0, 2.0, 5.0]])), ["a", "b", "c"], top_k=2)
    row = table.iloc[0]
    assert row["pseudo_label"] == 2 and row["pseudo_class"] == "c"
    assert row["confidence"] == pytest.approx(0.625) and row["margin"] == pytest.approx(0.375)
    assert row["entropy"] == pytest.approx(-(0.125 * np.log(0.125) + 0.25 * np.log(0.25) + 0.625 * np.log(0.625)))
    assert list(row["topk_labels"]) == [2, 1]


def _rewrite_tar(path, transform):
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in transform(members):
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_broken_images_and_damaged_shards_are_recorded_not_fatal(small_web, crawled, tiny_teacher, tmp_path):
    run_dir = copy_crawl(crawled, tmp_path / "run")
    shards = sorted((run_dir / "crawl" / "shards").glob("*.tar"))
    crawl = read_manifest(run_dir / "crawl" / "manifest.parquet", CRAWL)
    ok = crawl[crawl["status"] == "success"]
    # shard 0: one image truncated to garbage; shard 1: the tar cut off half-way; shard 2: no image decodes;
    # shard 3: not a tar at all (it yields no sample)
    victim = ok[ok["shard"] == "shards/00000.tar"].iloc[3]
    _rewrite_tar(shards[0], lambda ms: [(m, d[:40] if m.name == f"{victim['key']}.jpg" else d) for m, d in ms])
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    _rewrite_tar(shards[2], lambda ms: [(m, b"<html>" if m.name.endswith(".jpg") else d) for m, d in ms])
    shards[3].write_bytes(b"not a tar " * 200)
    in_shard2 = ok.loc[ok["shard"] == "shards/00002.tar", "uid"]
    # as if the crawl had written them so (its inventory says so): damage after the crawl is refused (test_faults)
    RunDir(run_dir).write_inventory(CRAWL_INVENTORY, [f"shards/{s.name}" for s in shards])

    run_stages(score_config(small_web, tiny_teacher, run_dir), STAGES, only=["score"])
    manifest, arrays, failures = outputs(run_dir)
    decode = failures[failures["reason"] == "decode_error"]
    assert set(decode["uid"]) == {victim["uid"], *in_shard2}
    assert "truncated" in decode.set_index("uid").loc[victim["uid"], "error"].lower()
    assert "cannot identify image" in decode.set_index("uid").loc[in_shard2.iloc[0], "error"]
    missing = failures[failures["reason"] == "missing_from_shard"]
    cut_off = missing[missing["shard"] == "shards/00001.tar"]
    assert 10 < len(cut_off) < (ok["shard"] == "shards/00001.tar").sum()
    assert set(missing.loc[missing["shard"] != "shards/00001.tar", "uid"]) == set(ok.loc[ok["shard"] == "shards/00003.tar",
                                                                                          "uid"])
    # every crawled image is in exactly one of the two, and the arrays follow the manifest
    assert sorted(manifest["uid"].tolist() + failures["uid"].tolist()) == sorted(ok["uid"])
    assert len(arrays["logits"]) == len(manifest)


def slow_convnet5(delay: float = 0.0, width: int = 8) -> nn.Module:
    """convnet5 that sleeps ``delay`` s per batch: an entry-point teacher slow enough to be killed."""

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = create_model("convnet5", num_classes=10, in_chans=1, width=width)

        def forward(self, x):
            time.sleep(delay)
            return self.net(x)

    return Slow()


def _entrypoint_teacher(tiny_teacher, tmp_path, delay):
    sd = {f"net.{k}": v for k, v in torch.load(tiny_teacher["path"]).items()}
    path = tmp_path / "slow.pt"
    torch.save(sd, path)
    return [*tiny_teacher["overrides"], "teacher.format=entrypoint", "teacher.arch=tests.test_score:slow_convnet5",
            f"teacher.arch_kwargs={{delay: {delay}}}", f"teacher.checkpoint={path}"]


def test_sigkill_then_rerun_equals_an_uninterrupted_run(small_web, crawled, tiny_teacher, scored, tmp_path):
    run_dir = copy_crawl(crawled, tmp_path / "run")
    cfg = score_config(small_web, tiny_teacher, run_dir, *_entrypoint_teacher(tiny_teacher, tmp_path, 0.15),
                       "score.batch_size=8", "score.num_workers=1")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_yaml(cfg))
    command = [sys.executable, "-m", "pipeline", "score", str(config_file)]
    parts = run_dir / "score.partial" / "parts"  # the score is built there until complete

    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(parts.glob("*[0-9].parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(parts.glob("*[0-9].parquet")))
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= done_at_kill < 4, "the kill must land part-way through the score stage"
    assert RunDir(run_dir).record("score") is None

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{done_at_kill} of 4 shard(s) already scored" in rerun.stderr
    assert RunDir(run_dir).record("score")["resumed"] is True
    assert_same_outputs(outputs(run_dir), outputs(scored[1]))


def test_torchrun_on_two_nodes_equals_one_process(small_web, crawled, tiny_teacher, scored, tmp_path):
    run_dir = copy_crawl(crawled, tmp_path / "run")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_yaml(score_config(small_web, tiny_teacher, run_dir, "score.num_workers=1")))
    codes, output = torchrun_two_nodes("score", config_file, tmp_path)
    assert codes == [0, 0], output
    record = RunDir(run_dir).record("score")
    assert record["details"]["world_size"] == 2
    assert_same_outputs(outputs(run_dir), outputs(scored[1]))


def test_open_clip_embedder_adds_normalised_embeddings(small_web, crawled, tiny_teacher, tmp_path):
    run_dir = copy_crawl(crawled, tmp_path / "run")
    cfg = score_config(small_web, tiny_teacher, run_dir, "score.embedder_model=ViT-S-32",
                       "score.embedder_checkpoint=random", "score.batch_size=64")
    run_stages(cfg, STAGES, only=["score"])
    manifest, arrays, _ = outputs(run_dir)
    assert arrays["embeddings"].shape == (len(manifest), 384)
    np.testing.assert_allclose(np.linalg.norm(arrays["embeddings"].astype(np.float32), axis=1), 1, atol=2e-3)
    info = json.loads((run_dir / "score" / "teacher.json").read_text())
    assert info["embedder"] == {"model": "ViT-S-32", "checkpoint": "random", "dim": 384}
    with np.load(run_dir / "score" / "text_embeddings.npz") as z:
        text = z["embeddings"]
    assert text.shape == (10, 384)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)

    # the filter matches the images with the class prompts, in the embedder's space
    run_stages(load_config(None, [f"run_dir={run_dir}", "filter.vectors=embeddings", "filter.reference=clip_text",
                                  "filter.policy=none", *cfg_overrides(cfg)]), STAGES, only=["filter"])
    selection = read_manifest(run_dir / "filter" / "selection.parquet", SELECTION)
    cosine = arrays["embeddings"].astype(np.float32) @ text.T
    np.testing.assert_array_equal(selection["nearest_class"], cosine.argmax(1))
    np.testing.assert_allclose(selection["similarity"], cosine.max(1), atol=1e-3)


def test_reference_shards_and_bn_prior_are_written_for_the_filter(scored, tiny_teacher, tmp_path):
    """score.reference_shards: a few labelled images through the same teacher, into reference.npz."""
    import webdataset as wds

    cfg, run_dir = scored
    images = [im for _, im in read_shard_images(run_dir / "crawl" / "shards")][:7]
    with wds.TarWriter(str(tmp_path / "ref-000.tar")) as sink:
        for i, image in enumerate(images):
            sink.write({"__key__": f"r{i}", "png": image, "cls": i % 3})
    (tmp_path / "ref-001.tar").write_bytes(b"")  # an empty shard among them is no error
    ref_run = copy_crawl(run_dir, tmp_path / "run")
    ref_cfg = score_config_from(cfg, ref_run, f"score.reference_shards={tmp_path}/ref-{{000..001}}.tar")
    run_stages(ref_cfg, STAGES, only=["score"])
    teacher = load_teacher(cfg.teacher)
    with torch.no_grad():
        logits, features = teacher.model(torch.stack([teacher.transform(im) for im in images]))
    with np.load(ref_run / "score" / "reference.npz") as z:
        np.testing.assert_array_equal(z["labels"], [i % 3 for i in range(7)])
        np.testing.assert_allclose(z["logits"], logits.numpy(), atol=1e-4, rtol=1e-4)
    with np.load(ref_run / "score" / "feature_prior.npz") as z:
        np.testing.assert_allclose(z["mean"], teacher.feature_prior["mean"])
        assert z["mean"].shape == (teacher.feature_dim,) and (z["std"] > 0).all()

    bad = score_config_from(cfg, ref_run, f"score.reference_shards={tmp_path}/nothing-*.tar")
    with pytest.raises(UserError, match="score.reference_shards .*nothing-.* matches no file"):
        run_stages(bad, STAGES, only=["score"], force=True)


def test_embedder_without_checkpoint_is_a_clear_error(small_web, crawled, tiny_teacher, tmp_path):
    run_dir = copy_crawl(crawled, tmp_path / "run")
    cfg = score_config(small_web, tiny_teacher, run_dir, "score.embedder_model=ViT-S-32")
    with pytest.raises(UserError, match="give a local checkpoint of ViT-S-32"):
        run_stages(cfg, STAGES, only=["score"])
    assert RunDir(run_dir).record("score") is None
