"""synthesize: DeepInversion's pixel optimisation on a tiny teacher — it lowers the BatchNorm and class
losses, it is deterministic (the basis of per-shard resume), and its priors equal hand computations — and
the stage: shards with lineage and teacher outputs, SIGKILL then resume gives the same bytes, the hybrid
starts from the kept images it names, balanced targets fill missing classes, distill learns from the
synthetic rows, a teacher without BatchNorm is refused before anything runs."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.errors import UserError
from stages.common.batchnorm import BatchNormStatistics
from stages.synthesize.inversion import (
    Inversion,
    balanced_targets,
    competition,
    invert,
    pixel_bounds,
    to_pixels,
    total_variation,
)

MEAN, STD = [0.5], [0.25]


def private_batch(n: int, generator: torch.Generator):
    """The tiny teacher's private data: a bright 4×4 blob in one of four quadrants (the class), normalised."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.rand(n, 1, 12, 12, generator=generator) * 0.2
    for i, c in enumerate(labels.tolist()):
        r, col = 1 + 6 * (c // 2), 1 + 6 * (c % 2)
        images[i, :, r:r + 4, col:col + 4] = 0.9
    return (images - MEAN[0]) / STD[0], labels


_TEACHER = {}


def tiny_teacher():
    """A conv net with BatchNorm trained for a moment on ``private_batch``: its running statistics
    are those of the blobs, not of noise."""
    if "net" not in _TEACHER:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(32, 4))
        optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(0)
        for _ in range(150):
            x, y = private_batch(64, generator)
            loss = nn.functional.cross_entropy(net(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        _TEACHER["net"] = net.eval()
    return _TEACHER["net"]


def run(settings, start=None, seed=0):
    teacher = tiny_teacher()
    start = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(seed)) if start is None else start
    return invert(teacher, start, balanced_targets(8, 4), settings, pixel_bounds(MEAN, STD),
                  torch.Generator().manual_seed(seed))


def losses(images):
    teacher = tiny_teacher()
    with BatchNormStatistics(teacher) as stats, torch.no_grad():
        logits = teacher(images)
        return stats.loss().item(), nn.functional.cross_entropy(logits, balanced_targets(8, 4)).item()


def test_inversion_lowers_the_batchnorm_and_class_losses_within_a_few_steps():
    start = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(0)).clamp(*[b.item() for b in
                                                                                          pixel_bounds(MEAN, STD)])
    images, terms = run(Inversion(steps=40, lr=0.1), start)
    bn_before, ce_before = losses(start)
    bn_after, ce_after = losses(images)
    assert bn_after < 0.5 * bn_before and ce_after < 0.5 * ce_before, (bn_before, bn_after, ce_before, ce_after)
    x, y = private_batch(64, torch.Generator().manual_seed(1))
    assert (tiny_teacher()(x).argmax(1) == y).float().mean() > 0.9  # the teacher knows its private data
    assert terms["step"] > 0 and set(terms) >= {"loss", "ce", "bn", "tv", "l2"}
    low, high = pixel_bounds(MEAN, STD)
    assert images.min() >= low.item() - 1e-6 and images.max() <= high.item() + 1e-6  # storable pixels


def test_the_same_start_and_seed_give_the_same_images():
    a, _ = run(Inversion(steps=10, lr=0.1, flip=True), seed=3)
    b, _ = run(Inversion(steps=10, lr=0.1, flip=True), seed=3)
    c, _ = run(Inversion(steps=10, lr=0.1, flip=True), seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_zero_steps_return_the_start_clipped_to_storable_pixels():
    start = torch.full((8, 1, 12, 12), 10.0)
    images, _ = run(Inversion(steps=0), start)
    assert torch.allclose(images, pixel_bounds(MEAN, STD)[1].view(1, 1, 1, 1).expand_as(images))


def test_priors_and_helpers_equal_hand_computations():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # right: (−1, −2), down: (−2, −3), down-left: (2 − 1), down-right: (0 − 4)
    assert total_variation(x).item() == pytest.approx(np.sqrt(5) + np.sqrt(13) + 1 + 4)
    assert balanced_targets(6, 4, start=1).tolist() == [1, 2, 3, 0, 1, 2]
    same = torch.tensor([[2.0, 0.0, -1.0]])
    assert competition(same, same).item() == pytest.approx(1.0)
    assert competition(torch.tensor([[9.0, 0.0, 0.0]]), torch.tensor([[0.0, 9.0, 0.0]])).item() < 0.9
    pixels = torch.tensor([[[[0.0, 255.0]]]]) / 255
    normalised = (pixels - 0.5) / 0.25
    assert to_pixels(normalised, MEAN, STD).flatten().tolist() == [0, 255]


# ---------------------------------------------------------------- the stage


def test_fill_targets_balances_classes_and_moves_the_least_confident_to_the_classes_they_score_highest():
    from stages.synthesize.stage import fill_targets

    # six images called class 0, none of class 2: the share is 6 / 3 = 2 per class
    labels = np.array([0, 0, 0, 0, 0, 0])
    scores = np.array([[9, 1, 0], [8, 0, 1], [7, 1, 3], [6, 3, 1], [5, 0, 4], [4, 2, 0]], float)
    targets = fill_targets(labels, scores)
    assert np.bincount(targets, minlength=3).tolist() == [2, 2, 2]
    assert targets[:2].tolist() == [0, 0]  # the two most confident keep their pseudo-label
    assert targets[4] == 2 and targets[3] == 1  # the movers go where they score highest while there is room
    already = np.array([0, 1, 2, 0, 1, 2])
    assert np.array_equal(fill_targets(already, np.eye(3)[already]), already)  # balanced: nothing moves


SYNTH = ["synthesize.batch_size=8", "synthesize.images_per_shard=16", "synthesize.steps=6"]


def synthesized(upstream, tmp_path, small_web, mnist_teacher, private, *overrides):
    from pipeline.runner import run_stages
    from stages import STAGES
    from tests.conftest import config, fresh

    run_dir = fresh(upstream, tmp_path / "run")
    cfg = config(small_web, run_dir, mnist_teacher, private, *SYNTH, *overrides)
    run_stages(cfg, STAGES, only=["synthesize"])
    return run_dir, cfg


def shard_samples(folder):
    import webdataset as wds

    return [s for s in wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False)]


def test_synthesis_from_noise_writes_shards_with_lineage_and_the_teachers_outputs(upstream, small_web, mnist_teacher,
                                                                                  private, tmp_path):
    import json

    from manifests import SYNTHESIS, read_manifest

    run_dir, _ = synthesized(upstream, tmp_path, small_web, mnist_teacher, private, "synthesize.start=noise",
                             "synthesize.images=40")
    manifest = read_manifest(run_dir / "synthesize" / "manifest.parquet", SYNTHESIS)
    assert len(manifest) == 40 and manifest["uid"].is_unique
    assert manifest["shard"].value_counts().sort_index().tolist() == [16, 16, 8]
    assert manifest["target"].value_counts().tolist() == [4] * 10  # balanced over the ten classes
    assert (manifest["start"] == "noise").all() and manifest["source_uid"].isna().all()
    assert (manifest["steps"] == 6).all() and manifest["best_step"].between(0, 5).all()
    assert (manifest["batch_bn"] > 0).all() and (manifest["bn_distance"] > 0).all()
    logits = np.load(run_dir / "synthesize" / "logits.npy")
    assert logits.shape == (40, 10) and np.load(run_dir / "synthesize" / "features.npy").shape[0] == 40
    assert np.array_equal(logits.argmax(1), manifest["pseudo_label"])  # row i of the array is manifest row i
    probability = np.exp(logits - logits.max(1, keepdims=True))
    probability /= probability.sum(1, keepdims=True)
    assert np.allclose(probability[np.arange(40), manifest["target"]], manifest["target_probability"], atol=1e-5)
    samples = shard_samples(run_dir / "synthesize" / "shards")
    assert [s["__key__"] for s in samples] == manifest["uid"].tolist()
    assert all(set(s) >= {"png", "json"} for s in samples)
    assert [json.loads(s["json"])["target"] for s in samples] == manifest["target"].tolist()
    summary = json.loads((run_dir / "synthesize" / "summary.json").read_text())
    assert summary["images"] == 40 and summary["seconds_per_1000"] > 0


def test_the_hybrid_starts_from_the_kept_images_it_names(upstream, small_web, mnist_teacher, private, tmp_path):
    from manifests import SCORE, SYNTHESIS, read_manifest
    from stages.common.images import read_shard_images
    from stages.common.teacher import load_teacher

    # one step at a negligible rate: the stored image is its start, the kept web image
    run_dir, cfg = synthesized(upstream, tmp_path, small_web, mnist_teacher, private, "synthesize.start=kept",
                               "synthesize.steps=1", "synthesize.lr=1e-6", "synthesize.images=24")
    manifest = read_manifest(run_dir / "synthesize" / "manifest.parquet", SYNTHESIS)
    kept = pd.read_parquet(run_dir / "filter" / "selection.parquet").query("keep")
    assert len(manifest) == 24 and set(manifest["source_uid"]) <= set(kept["uid"])
    transform = load_teacher(cfg.teacher).transform
    web = dict(read_shard_images(run_dir / "crawl" / "shards"))
    samples = {s["__key__"]: s["png"] for s in shard_samples(run_dir / "synthesize" / "shards")}
    for row in manifest.itertuples():
        stored = transform(Image.open(io.BytesIO(samples[row.uid])))
        assert (stored - transform(web[row.source_uid])).abs().max() < 0.05, row.uid  # a level or two of 255
    scores = read_manifest(run_dir / "score" / "manifest.parquet", SCORE).set_index("uid")
    assert len(scores) >= len(kept)


def test_a_synthesis_killed_part_way_resumes_to_the_same_shards(upstream, small_web, mnist_teacher, private,
                                                                tmp_path):
    from pipeline.config import dump_yaml
    from pipeline.runner import run_stages
    from stages import STAGES
    from tests.conftest import config, fresh, kill_stage_when

    settings = [*SYNTH, "synthesize.start=noise", "synthesize.images=48", "synthesize.steps=50"]
    straight, _ = synthesized(upstream, tmp_path / "a", small_web, mnist_teacher, private, *settings[3:])
    killed = fresh(upstream, tmp_path / "killed")
    cfg = config(small_web, killed, mnist_teacher, private, *settings)
    (tmp_path / "killed.yaml").write_text(dump_yaml(cfg))
    kill_stage_when("synthesize", tmp_path / "killed.yaml", killed / "synthesize.partial" / "shards" / "00000.tar")
    # the finished synthesis (none) stays in place until the new one is complete
    assert json.loads((killed / "synthesize" / "_SUCCESS.json").read_text())["counts"]["images"] == 0
    assert not (killed / "synthesize.partial" / "shards" / "00002.tar").exists()  # killed part-way

    run_stages(cfg, STAGES, only=["synthesize"])
    assert json.loads((killed / "synthesize" / "_SUCCESS.json").read_text())["counts"]["resumed_shards"] >= 1
    names = sorted(p.name for p in (straight / "synthesize" / "shards").glob("*.tar"))
    assert names == ["00000.tar", "00001.tar", "00002.tar"]
    for name in names:
        assert (killed / "synthesize" / "shards" / name).read_bytes() == \
            (straight / "synthesize" / "shards" / name).read_bytes(), name


def test_distill_learns_from_the_synthetic_rows_joined_on_uid(upstream, small_web, mnist_teacher, private, tmp_path):
    from pipeline.rundir import RunDir
    from pipeline.runner import run_stages
    from stages import STAGES
    from stages.distill.stage import transfer_set
    from tests.conftest import config

    run_dir, _ = synthesized(upstream, tmp_path, small_web, mnist_teacher, private, "synthesize.start=noise",
                             "synthesize.images=20")
    run = RunDir(run_dir)
    data, rows, logits, _ = transfer_set(run, which="both")
    kept = pd.read_parquet(run_dir / "filter" / "selection.parquet").query("keep")
    assert data.size == len(kept) + 20 == len(rows) == len(logits)
    synthetic = np.load(run_dir / "synthesize" / "logits.npy")
    assert np.array_equal(logits[len(kept):], synthetic)  # the synthetic rows carry their own teacher outputs
    only, rows_only, _, _ = transfer_set(run, which="synthetic")
    assert only.size == 20 and all(Path(s).parent.parent.name == "synthesize" for s in only.counts)

    cfg = config(small_web, run_dir, mnist_teacher, private, *SYNTH, "synthesize.start=noise", "synthesize.images=20",
                 "distill.transfer_set=synthetic", "distill.epochs=1", "distill.batch_size=8")
    run_stages(cfg, STAGES, only=["distill", "evaluate", "report"])
    assert json.loads((run_dir / "distill" / "summary.json").read_text())["transfer_set"] == 20
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Synthesize" in report and "20 images optimised from Gaussian noise" in report
    assert re.search(r"\|\s+synthesised\s+\|", report)  # the class-coverage table shows what synthesis added
    assert "![synthesis](plots/synthesis.png)" in report and (run_dir / "report" / "plots" / "synthesis.png").is_file()


def test_synthetic_only_without_synthesis_is_refused_with_what_to_set(upstream, small_web, mnist_teacher, private,
                                                                     tmp_path):
    from pipeline.rundir import RunDir
    from stages.distill.stage import transfer_set

    run_dir, _ = synthesized(upstream, tmp_path, small_web, mnist_teacher, private)  # start: none
    with pytest.raises(UserError, match="synthesize.start is none"):
        transfer_set(RunDir(run_dir), which="synthetic")


class NoBatchNorm(nn.Module):
    """A teacher without BatchNorm (an entry point)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 28 * 28, 16), nn.ReLU())
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.classifier(self.body(x))


def test_a_teacher_without_batchnorm_is_refused_before_anything_runs_unless_start_is_auto(tmp_path, caplog):
    from pipeline.config import load_config
    from stages.common.teacher import load_teacher
    from stages.synthesize.stage import preflight, resolved_start

    torch.save(NoBatchNorm().state_dict(), tmp_path / "net.pt")
    teacher = ["teacher.format=entrypoint", "teacher.arch=tests.test_synthesize:NoBatchNorm",
               f"teacher.checkpoint={tmp_path / 'net.pt'}", "teacher.input_size=28", "teacher.channels=1",
               "teacher.class_names=[a, b, c, d, e, f, g, h, i, j]"]
    with pytest.raises(UserError, match="no BatchNorm layer.*synthesize.start: none"):
        preflight(load_config(None, [*teacher, "synthesize.start=noise"]))
    preflight(load_config(None, ["synthesize.start=none"]))  # none checks nothing (not even the teacher)
    # the default, auto, falls back to no synthesis, and says so
    cfg = load_config(None, teacher)
    assert cfg.synthesize.start == "auto"
    preflight(cfg)
    assert resolved_start("auto", load_teacher(cfg.teacher, torch.device("cpu"))) == "none"
    assert "no BatchNorm layer to match: no synthesis" in caplog.text
