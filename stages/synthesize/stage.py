"""synthesize: images optimised toward the teacher's private statistics — from noise, or from kept web images.

Reads   manifests.artifacts SELECTION_MANIFEST, CRAWL_FOLDER (start: kept — the images to refine),
        LOGITS (by uid: the teacher's class scores of the kept images, for balanced targets)
        the teacher (cfg.teacher); cfg.synthesize
Writes  RUN/synthesize/shards/NNNNN.tar   one sample per image, keyed by its uid: ``png`` (the image at the
                                          teacher's input size) and ``json`` (its lineage)
        RUN/synthesize/manifest.parquet   one row per image: lineage and what the teacher makes of the
                                          stored image (schema manifests.SYNTHESIS)
        RUN/synthesize/logits.npy, features.npy   the teacher on the stored images (row i ↔ manifest row i)
        RUN/synthesize/shards.json, inventory.json, summary.json

``start: noise`` is DeepInversion (Yin et al., CVPR 2020) with the official CIFAR-10 settings: batches of
Gaussian noise optimised for 2,000 steps toward class-balanced targets (``inversion.py``). ``start: kept``
is webdistill's hybrid: the filter's kept web images, in their selection order, are the starting pixels, so
the optimisation only has to close the gap between a web image and the private statistics (50 steps by
default). ``none`` writes an empty synthesis, so distill reads one contract either way.

Every image's start, target and jitter are fixed before any is optimised: shard k depends on (seed, k) and
its own rows only, so a killed run resumes from the shards already written (each written atomically) and
ends with the same bytes as an uninterrupted one. The teacher's logits and features are computed at the end
from the stored PNGs: they are of the very pixels distill reads.
"""

import dataclasses
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import webdataset as wds
from PIL import Image

from manifests import SYNTHESIS, atomic_write_bytes, uid_for
from manifests.artifacts import (
    CRAWL_FOLDER,
    CRAWL_INVENTORY,
    LOGITS,
    SELECTION_MANIFEST,
    SYNTHESIS_COUNTS,
    SYNTHESIS_FEATURES,
    SYNTHESIS_INVENTORY,
    SYNTHESIS_LOGITS,
    SYNTHESIS_MANIFEST,
    SYNTHESIS_SHARDS,
    SYNTHESIS_SUMMARY,
)
from pipeline import devices
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from stages.common.batchnorm import BatchNormStatistics, batchnorm_layers
from stages.common.images import encode_image, images_with_keys
from stages.common.progress import progress
from stages.common.teacher import Teacher, check_teacher, load_teacher
from stages.synthesize.config import SynthesizeConfig
from stages.synthesize.inversion import Inversion, balanced_targets, invert, pixel_bounds, to_pixels

log = logging.getLogger("webdistill.synthesize")

DEFAULT_IMAGES_FROM_NOISE = 1000
DEFAULT_STEPS = {"noise": 2000, "kept": 50}


def inversion_settings(settings: SynthesizeConfig) -> Inversion:
    return Inversion(steps=settings.steps or DEFAULT_STEPS[settings.start], lr=settings.lr,
                     ce_weight=settings.ce_weight, bn_weight=settings.bn_weight,
                     first_bn_weight=settings.first_bn_weight, tv_weight=settings.tv_weight,
                     l2_weight=settings.l2_weight, jitter=settings.jitter, flip=settings.flip)


# ---------------------------------------------------------------- what each image starts from and becomes

def fill_targets(pseudo_labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Class-balanced targets for kept images: each keeps its pseudo-label while its class is within its
    share (n / classes, rounded up); the least confident members of an over-full class move, most
    confident first, to the class short of its share that they score highest. Classes the web lacks are
    filled with the images that resemble them most."""
    n, classes = scores.shape
    share = -(-n // classes)
    targets, counts = pseudo_labels.copy(), np.bincount(pseudo_labels, minlength=classes)
    own = scores[np.arange(n), pseudo_labels]
    movers = []
    for c in np.flatnonzero(counts > share):
        members = np.flatnonzero(pseudo_labels == c)
        movers.extend(members[np.argsort(-own[members], kind="stable")][share:])  # the least confident move
    counts = np.minimum(counts, share)
    for i in sorted(movers, key=lambda i: -scores[i].max()):
        open_classes = np.flatnonzero(counts < share)
        target = open_classes[np.argmax(scores[i, open_classes])]
        targets[i], counts[target] = target, counts[target] + 1
    return targets


def plan(settings: SynthesizeConfig, run_dir: RunDir, classes: int) -> pd.DataFrame:
    """One row per image to synthesise, in the order it is written: uid, target, start, the kept image it
    starts from (crawl shard and key), its shard."""
    if settings.start == "noise":
        n = settings.images or DEFAULT_IMAGES_FROM_NOISE
        rows = pd.DataFrame({"uid": [uid_for(f"synthesize:noise:{settings.seed}:{i}") for i in range(n)],
                             "target": balanced_targets(n, classes).numpy(), "source_uid": None,
                             "crawl_shard": None, "key": None})
    else:
        selection = run_dir.read(SELECTION_MANIFEST, columns=["uid", "shard", "key", "pseudo_label", "keep"])
        kept = selection[selection["keep"]].reset_index(drop=True)
        if settings.images:
            kept = kept.iloc[np.sort(np.random.default_rng(settings.seed).permutation(len(kept))[:settings.images])]
        if len(kept) < 2:
            raise UserError(f"synthesize: start kept needs at least 2 kept images, the filter kept {len(kept)}")
        targets = kept["pseudo_label"].to_numpy()
        if settings.targets == "balanced":
            targets = fill_targets(targets, run_dir.rows(LOGITS, kept["uid"]))
        rows = pd.DataFrame({"uid": [uid_for(f"synthesize:kept:{u}:{settings.seed}") for u in kept["uid"]],
                             "target": targets, "source_uid": kept["uid"].to_numpy(),
                             "crawl_shard": kept["shard"].to_numpy(), "key": kept["key"].to_numpy()})
    rows["shard"] = [f"{SYNTHESIS_SHARDS.path}/{i // settings.images_per_shard:05d}.tar" for i in range(len(rows))]
    return rows


def kept_images(crawl_dir: Path, rows: pd.DataFrame, transform) -> torch.Tensor:
    """The kept web images of ``rows`` (crawl shard, key), as the teacher's normalised inputs, in row order."""
    found = {}
    for shard, group in rows.groupby("crawl_shard", sort=True):
        for key, _, data in images_with_keys(crawl_dir / shard, set(group["key"])):
            with Image.open(io.BytesIO(data)) as image:
                found[(shard, key)] = transform(image)
    missing = [(s, k) for s, k in zip(rows["crawl_shard"], rows["key"]) if (s, k) not in found]
    if missing:
        raise UserError(f"synthesize: kept image {missing[0][1]} is no longer in crawl shard {missing[0][0]}; "
                        "re-run crawl, score and filter with --force")
    return torch.stack([found[(s, k)] for s, k in zip(rows["crawl_shard"], rows["key"])])


# ---------------------------------------------------------------- one shard

def write_shard(out: Path, rows: pd.DataFrame, teacher: Teacher, inversion: Inversion, settings: SynthesizeConfig,
                shard_index: int, crawl_dir: Path, device: torch.device, bar) -> None:
    """Optimise the images of one shard, batch by batch, and write them atomically."""
    spec = teacher.transform.spec
    bounds = pixel_bounds(spec["mean"], spec["std"])
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + shard_index)  # this shard's own draws
    samples = []
    for start in range(0, len(rows), settings.batch_size):
        batch = rows.iloc[start:start + settings.batch_size]
        shape = (len(batch), teacher.channels, teacher.input_size, teacher.input_size)
        x = torch.randn(shape, generator=generator) if settings.start == "noise" \
            else kept_images(crawl_dir, batch, teacher.transform)
        targets = torch.as_tensor(batch["target"].to_numpy(), dtype=torch.long)
        best, terms = invert(teacher.model, x.to(device), targets.to(device), inversion, bounds, generator)
        lineage = {"start": settings.start, "steps": inversion.steps, "best_step": terms["step"],
                   "batch_loss": terms["loss"], "batch_ce": terms["ce"], "batch_bn": terms["bn"],
                   "batch_tv": terms["tv"]}
        for row, pixels in zip(batch.itertuples(), to_pixels(best, spec["mean"], spec["std"])):
            samples.append({"__key__": row.uid, "png": encode_image(pixels.numpy(), "png"), "json": json.dumps(
                {"target": int(row.target), "source_uid": row.source_uid, **lineage}).encode()})
        bar.update(len(batch))
        bar.set_postfix(bn=f"{terms['bn']:.3f}", ce=f"{terms['ce']:.3f}")
    tmp = out.with_name(f".{out.name}.tmp")
    with wds.TarWriter(str(tmp), mtime=0) as sink:  # a fixed member time: the same seed gives the same bytes
        for sample in samples:
            sink.write(sample)
    os.replace(tmp, out)


# ---------------------------------------------------------------- the teacher on the stored images

def describe_shards(folder: Path, shards: list[str], teacher: Teacher, device: torch.device,
                    batch_size: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Lineage rows of every stored image, and the teacher's logits, features and per-image BatchNorm
    distance on the stored PNG (decoded as distill decodes it)."""
    rows, logits, features = [], [], []

    def flush(images, metas):
        x = torch.stack(images).to(device)
        with torch.no_grad(), BatchNormStatistics(teacher.model, per="image") as stats:
            out_logits, out_features = teacher.model(x)
            distance = stats.per_image().cpu().numpy()
        probabilities = torch.softmax(out_logits.float(), 1).cpu().numpy()
        for meta, p, d in zip(metas, probabilities, distance):
            rows.append({**meta, "pseudo_label": int(p.argmax()), "target_probability": float(p[meta["target"]]),
                         "bn_distance": float(d)})
        logits.append(out_logits.float().cpu().numpy())
        features.append(out_features.float().cpu().numpy())

    images, metas = [], []
    for shard in shards:
        for sample in wds.WebDataset(str(folder / shard), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            with Image.open(io.BytesIO(sample["png"])) as image:
                images.append(teacher.transform(image))
            metas.append({"uid": sample["__key__"], "shard": shard, **meta})
            if len(images) == batch_size:
                flush(images, metas)
                images, metas = [], []
    if images:
        flush(images, metas)
    return pd.DataFrame(rows), np.concatenate(logits), np.concatenate(features).astype(np.float16)


def _save_array(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- the stage

def require_batchnorm(teacher: Teacher, start: str) -> None:
    """Synthesis needs a teacher whose BatchNorm layers keep running statistics."""
    if not batchnorm_layers(teacher.model):
        raise UserError(f"synthesize.start {start}: the teacher ({teacher.description}) has no BatchNorm layer "
                        "with running statistics, which DeepInversion matches; set synthesize.start: none (a "
                        "TorchScript teacher: give its state_dict and spec instead)")


def preflight(cfg) -> None:
    if cfg.synthesize.start in ("noise", "kept"):  # auto falls back to none without BatchNorm
        require_batchnorm(check_teacher(cfg.teacher), cfg.synthesize.start)


def resolved_start(start: str, teacher: Teacher) -> str:
    """``auto``: the hybrid when the teacher has BatchNorm layers to match, else no synthesis; an explicit
    start needs them."""
    if start != "auto":
        require_batchnorm(teacher, start)
        return start
    if batchnorm_layers(teacher.model):
        return "kept"
    log.warning("synthesize: the teacher (%s) has no BatchNorm layer to match: no synthesis (synthesize.start "
                "auto); the student learns from the web images alone", teacher.description)
    return "none"


def _write_none(run_dir: RunDir) -> dict:
    run_dir.write(SYNTHESIS_MANIFEST, pd.DataFrame({f.name: pd.Series(dtype=object) for f in SYNTHESIS.schema}))
    for artifact in (SYNTHESIS_LOGITS, SYNTHESIS_FEATURES):
        _save_array(run_dir.path(artifact), np.zeros((0, 0), np.float32))
    run_dir.write(SYNTHESIS_COUNTS, {})
    run_dir.write(SYNTHESIS_INVENTORY, {})
    run_dir.write(SYNTHESIS_SUMMARY, {"start": "none", "images": 0})
    run_dir.path(SYNTHESIS_SHARDS).mkdir(parents=True, exist_ok=True)
    return {"images": 0}


def run(cfg, run_dir: RunDir) -> dict:
    settings = cfg.synthesize
    if settings.start == "none":
        return _write_none(run_dir)
    out, device = run_dir.stage_dir("synthesize"), devices.pick_device(settings.device)
    teacher = load_teacher(cfg.teacher, device)
    settings = dataclasses.replace(settings, start=resolved_start(settings.start, teacher))
    if settings.start == "none":
        return _write_none(run_dir)
    for p in teacher.model.parameters():
        p.requires_grad_(False)  # only the pixels learn
    inversion, crawl_dir = inversion_settings(settings), run_dir.path(CRAWL_FOLDER)
    rows = plan(settings, run_dir, teacher.num_classes)
    if settings.start == "kept":
        run_dir.verified(CRAWL_INVENTORY, sorted(rows["crawl_shard"].unique()))

    t0 = time.time()
    run_dir.path(SYNTHESIS_SHARDS).mkdir(parents=True, exist_ok=True)
    shards = sorted(rows["shard"].unique())
    todo = [s for s in shards if not (out / s).is_file()]
    if len(todo) < len(shards):
        log.info("synthesize: %d shard(s) already written, %d to go", len(shards) - len(todo), len(todo))
    log.info("synthesize: %d images from %s, %d steps per batch of %d, on %s", len(rows), settings.start,
             inversion.steps, settings.batch_size, device)
    bar = progress(total=int(rows["shard"].isin(todo).sum()), desc=f"synthesize ({settings.start})", unit="img")
    for shard in todo:
        write_shard(out / shard, rows[rows["shard"] == shard], teacher, inversion, settings, shards.index(shard),
                    crawl_dir, device, bar)
    bar.close()
    synth_s = time.time() - t0

    manifest, logits, features = describe_shards(out, shards, teacher, device, settings.batch_size)
    if manifest["uid"].tolist() != rows["uid"].tolist():
        raise UserError(f"synthesize: the shards in {run_dir.path(SYNTHESIS_SHARDS)} do not hold the planned images; "
                        "re-run the synthesize stage with --force")
    run_dir.write(SYNTHESIS_MANIFEST, manifest[[f.name for f in SYNTHESIS.schema]])
    _save_array(run_dir.path(SYNTHESIS_LOGITS), logits)
    _save_array(run_dir.path(SYNTHESIS_FEATURES), features)
    run_dir.write_inventory(SYNTHESIS_INVENTORY, shards)
    run_dir.write(SYNTHESIS_COUNTS, manifest.groupby("shard").size().astype(int).to_dict())
    summary = summarise(manifest, settings, inversion, synth_s, len(shards) - len(todo))
    run_dir.write(SYNTHESIS_SUMMARY, summary)
    log.info("synthesize: %d images, teacher agrees with the target on %.1f%%, BatchNorm distance %.3f; "
             "%.0f s per 1,000 images", summary["images"], 100 * summary["target_hit_rate"],
             summary["bn_distance_mean"], summary["seconds_per_1000"] or float("nan"))
    return {"images": summary["images"], "shards": len(shards), "resumed_shards": len(shards) - len(todo),
            "timings": {"synthesize_s": round(synth_s, 2), "total_s": round(time.time() - t0, 2)}}


def summarise(manifest: pd.DataFrame, settings: SynthesizeConfig, inversion: Inversion, seconds: float,
              resumed: int) -> dict:
    written = len(manifest) if not resumed else None  # a resumed run's time covers only part of the images
    return {"start": settings.start, "images": len(manifest), "steps": inversion.steps,
            "batch_size": settings.batch_size, "targets": settings.targets,
            "target_counts": manifest["target"].value_counts().sort_index().to_dict(),
            "target_hit_rate": float((manifest["pseudo_label"] == manifest["target"]).mean()),
            "target_probability_mean": float(manifest["target_probability"].mean()),
            "bn_distance_mean": float(manifest["bn_distance"].mean()),
            "batch_bn_mean": float(manifest["batch_bn"].mean()),
            "seconds_per_1000": round(1000 * seconds / written, 1) if written else None,
            "resumed_shards": resumed}
