"""perturb: MixDistribution versions of every selected image — the student's transfer set.

Reads   manifests.artifacts SELECTION_MANIFEST (the kept samples), CRAWL_FOLDER (their shards); cfg.perturb
Writes  RUN/perturb/shards/NNNNN.tar   one sample per kept image, keyed by its uid: the crawled
                                       image as it was (``jpg``/``png``…), its perturbations
                                       ``mix0.png`` … and ``json`` (pseudo-label, partners, λ)
        RUN/perturb/manifest.parquet   one row per perturbation: source uid, partner uid, λ
                                       (schema manifests.PERTURBATION)
        RUN/perturb/shards.json        samples per shard (what distill plans its epochs with)
        RUN/perturb/stats.npz          per-channel mean/std of every kept image (pass 1)
        RUN/perturb/summary.json

Two passes. Pass 1 measures each kept image's per-channel mean and std. Then every
(image, variant) draws its partner (another kept image, of another pseudo-class or the same one)
and λ ~ Beta(α, α) from one seeded generator, before any image is written: the result does not
depend on the order shards are processed in, or on how often the stage was interrupted. Pass 2
writes one output shard per crawl shard that holds kept images, atomically (a temporary file
renamed into place), so a killed run resumes from the shards already written.

The shards carry the kept originals too: distill reads one sequential stream of exactly the
samples it trains on, never the discarded part of the crawl.
"""

import io
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import webdataset as wds
from PIL import Image

from manifests import (
    PERTURBATION,
    atomic_write_bytes,
)
from manifests.artifacts import (
    CRAWL_FOLDER,
    CRAWL_INVENTORY,
    PERTURB_COUNTS,
    PERTURB_INVENTORY,
    PERTURB_SUMMARY,
    PERTURBATION_MANIFEST,
    SELECTION_MANIFEST,
)
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from stages.common.images import encode_image, images_with_keys
from stages.common.mixing import channel_stats, mix_distribution
from stages.common.progress import progress
from stages.perturb.config import PerturbConfig

log = logging.getLogger("webdistill.perturb")

# ---------------------------------------------------------------- pure steps

def image_array(data: bytes) -> np.ndarray:
    """Encoded image → float32 (3, H, W) on the 0–1 scale."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0


def perturb_image(pixels: np.ndarray, partner_mean: np.ndarray, partner_std: np.ndarray, lam: float) -> np.ndarray:
    """MixDistribution of one (3, H, W) image towards a partner's channel statistics, clipped to 0–1."""
    mixed = mix_distribution(torch.from_numpy(pixels)[None], torch.from_numpy(partner_mean)[None],
                             torch.from_numpy(partner_std)[None], torch.tensor([lam]))
    return mixed[0].clamp(0, 1).numpy()


def draw_partners(labels: np.ndarray, variants: int, how: str, alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Partner row and λ for each (sample, variant): two (n, variants) arrays.

    ``across``: a partner of another pseudo-class (any other sample when all share one class);
    ``within``: of the same pseudo-class (any other when the class has one member); ``any``."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    partners = np.empty((n, variants), np.int64)
    if n < 2:
        raise UserError(f"perturb needs at least 2 kept images to pair, the filter kept {n}")
    everyone = np.arange(n)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    for i in range(n):
        if how == "within" and len(by_class[labels[i]]) > 1:
            pool = by_class[labels[i]]
        elif how == "across" and len(by_class) > 1:
            pool = None  # rejection below: cheaper than building "everyone but my class" per sample
        else:
            pool = everyone
        for v in range(variants):
            while True:
                j = int(rng.integers(n)) if pool is None else int(pool[rng.integers(len(pool))])
                if j != i and (pool is not None or labels[j] != labels[i]):
                    break
            partners[i, v] = j
    lam = rng.beta(alpha, alpha, size=(n, variants)).astype(np.float32)
    return partners, lam


# ---------------------------------------------------------------- passes over the shards

def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Processes forked for the shards, each with one torch thread, as DataLoader's workers: GNU OpenMP
    is not fork-safe, so a child's first parallel region hangs for good once the parent has run one
    (a ResNet-50 teacher's forward pass before perturb, in the same process, did it)."""
    return ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))


def in_order(pool: ProcessPoolExecutor, function, calls: Iterable[tuple], ahead: int):
    """``function(*call)`` of each call on ``pool``, yielded in order, with at most ``ahead`` submitted
    and unfinished: a call's arguments exist only while it is near, whatever the number of shards."""
    waiting = deque()
    for call in calls:
        waiting.append(pool.submit(function, *call))
        if len(waiting) >= ahead:
            yield waiting.popleft().result()
    while waiting:
        yield waiting.popleft().result()


def shard_stats(shard: Path, keys: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pass 1 for one crawl shard: the keys found, and their channel means and stds."""
    found, means, stds = [], [], []
    for key, _, data in images_with_keys(shard, set(keys)):
        mean, std = channel_stats(torch.from_numpy(image_array(data))[None])
        found.append(key)
        means.append(mean[0].numpy())
        stds.append(std[0].numpy())
    return found, np.asarray(means, np.float32).reshape(-1, 3), np.asarray(stds, np.float32).reshape(-1, 3)


def write_shard(shard: Path, out: Path, jobs: pd.DataFrame, partner_mean: np.ndarray | None,
                partner_std: np.ndarray | None, fmt: str) -> int:
    """Pass 2 for one crawl shard: its kept images and their perturbations, written to ``out``
    atomically. ``jobs`` holds one row per (key, variant) with uid, λ and labels; ``partner_mean``
    and ``partner_std`` the partner's statistics of each row."""
    jobs = jobs.assign(position=np.arange(len(jobs)))
    by_key = {key: rows for key, rows in jobs.groupby("key", sort=False)}
    tmp = out.with_name(f".{out.name}.tmp")
    written = 0
    with wds.TarWriter(str(tmp), mtime=0) as sink:  # a fixed member time: the same seed gives the same bytes
        for key, ext, data in images_with_keys(shard, set(by_key)):
            rows = by_key[key]
            sample = {"__key__": rows["uid"].iloc[0], ext: data, "json": json.dumps({
                "crawl_key": key, "pseudo_label": int(rows["pseudo_label"].iloc[0]),
                "partners": rows["partner_uid"].dropna().tolist(), "lam": rows["lam"].dropna().tolist()}).encode()}
            pixels = image_array(data) if rows["lam"].notna().any() else None
            for row in rows.itertuples():
                if not np.isnan(row.lam):
                    mixed = perturb_image(pixels, partner_mean[row.position], partner_std[row.position], row.lam)
                    sample[f"mix{row.variant}.{fmt}"] = encode_image(
                        (mixed.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8), fmt)
            sink.write(sample)
            written += 1
    os.replace(tmp, out)
    return written


# ---------------------------------------------------------------- the stage

def _kept(run_dir: RunDir) -> pd.DataFrame:
    selection = run_dir.read(SELECTION_MANIFEST, columns=["uid", "shard", "key", "pseudo_label", "keep"])
    kept = selection[selection["keep"]].reset_index(drop=True)
    if kept.empty:
        raise UserError("perturb: the filter kept no image; relax the filter (see filter/summary.txt)")
    return kept


def _stats(kept: pd.DataFrame, crawl_dir: Path, out: Path, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 (or its saved result): per-channel mean and std of every kept image, in row order."""
    path, uids = out / "stats.npz", kept["uid"].to_numpy().astype(str)
    if path.is_file():
        saved = np.load(path)
        if np.array_equal(saved["uid"], uids):
            return saved["mean"], saved["std"]
    mean, std = np.full((len(kept), 3), np.nan, np.float32), np.full((len(kept), 3), np.nan, np.float32)
    groups, keys = kept.groupby("shard", sort=True).indices, kept["key"].to_numpy()  # shard → kept rows
    calls = ((crawl_dir / shard, keys[rows].tolist()) for shard, rows in groups.items())
    with worker_pool(workers) as pool:
        results = in_order(pool, shard_stats, calls, ahead=2 * workers)
        for rows, (found, means, stds) in progress(zip(groups.values(), results), total=len(groups),
                                                   desc="perturb: statistics", unit="shard"):
            position = pd.Index(keys[rows]).get_indexer(found)
            mean[rows[position]], std[rows[position]] = means, stds
    missing = np.flatnonzero(np.isnan(mean[:, 0]))
    if len(missing):
        first = kept.iloc[missing[0]]
        raise UserError(f"perturb: {len(missing)} kept image(s) are no longer in the crawl shards (first: "
                        f"{first['key']} in {first['shard']}); re-run crawl, score and filter with --force")
    buffer = io.BytesIO()
    np.savez(buffer, uid=uids, mean=mean, std=std)
    atomic_write_bytes(path, buffer.getvalue())
    return mean, std


def plan(kept: pd.DataFrame, settings: PerturbConfig) -> pd.DataFrame:
    """One row per (kept image, variant): partner (its row in ``kept``) and λ. With no variants, one
    row per image with no partner (the shard then carries the original alone)."""
    if settings.variants == 0:
        return kept.assign(variant=0, partner_uid=None, partner_pseudo_label=-1, lam=np.nan, partner_row=-1)
    labels = kept["pseudo_label"].to_numpy()
    partners, lam = draw_partners(labels, settings.variants, settings.partner, settings.alpha, settings.seed)
    rows = np.repeat(np.arange(len(kept)), settings.variants)
    flat = partners.reshape(-1)
    return kept.iloc[rows].reset_index(drop=True).assign(
        variant=np.tile(np.arange(settings.variants), len(kept)), partner_uid=kept["uid"].array.take(flat),
        partner_pseudo_label=labels[flat], lam=lam.reshape(-1), partner_row=flat)


def run(cfg, run_dir: RunDir) -> dict:
    # the selection's `shard` column is relative to the crawl folder (shards/NNNNN.tar)
    settings, crawl_dir, out = cfg.perturb, run_dir.path(CRAWL_FOLDER), run_dir.stage_dir("perturb")
    t0 = time.time()
    kept = _kept(run_dir)
    run_dir.verified(CRAWL_INVENTORY, sorted(kept["shard"].unique()))  # each one as the crawl wrote it
    workers = max(1, min(os.cpu_count() or 1, kept["shard"].nunique()))
    mean, std = _stats(kept, crawl_dir, out, workers) if settings.variants else (None, None)
    stats_s = time.time() - t0
    jobs = plan(kept, settings)
    jobs["out"] = "shards/" + jobs["shard"].str.replace(r"^.*/", "", regex=True)  # the crawl shard's name

    (out / "shards").mkdir(parents=True, exist_ok=True)
    groups = jobs.groupby("shard", sort=True).indices  # crawl shard → its rows of jobs
    todo = [shard for shard, rows in groups.items() if not (out / jobs["out"].iat[rows[0]]).is_file()]
    if len(todo) < len(groups):
        log.info("perturb: %d shard(s) already written, %d to go", len(groups) - len(todo), len(todo))

    def call(shard: str) -> tuple:  # made when its turn comes: one shard's jobs at a time
        g = jobs.iloc[groups[shard]]
        partner = (mean[g["partner_row"]], std[g["partner_row"]]) if settings.variants else (None, None)
        return crawl_dir / shard, out / g["out"].iloc[0], g, *partner, settings.encode_format

    with worker_pool(workers) as pool:
        results = in_order(pool, write_shard, map(call, todo), ahead=2 * workers)
        for shard, written in progress(zip(todo, results), total=len(todo), desc="perturb: writing shards",
                                       unit="shard"):
            if written != (expected := jobs["key"].iloc[groups[shard]].nunique()):
                raise UserError(f"perturb: crawl shard {shard} holds {written} of its {expected} kept "
                                "images; re-run crawl, score and filter with --force")
    run_dir.write_inventory(PERTURB_INVENTORY, jobs["out"].unique())
    run_dir.write(PERTURB_COUNTS, jobs.groupby("out")["key"].nunique().to_dict())

    manifest = jobs.rename(columns={"shard": "crawl_shard", "out": "shard"})
    if settings.variants:
        run_dir.write(PERTURBATION_MANIFEST, manifest[[f.name for f in PERTURBATION.schema]])
    counts = {"kept": len(kept), "perturbed": int(manifest["lam"].notna().sum()),
              "shards": int(jobs["out"].nunique()), "resumed_shards": len(groups) - len(todo)}
    summary = {**counts, "variants": settings.variants, "alpha": settings.alpha, "partner": settings.partner,
               "lam_mean": float(np.nanmean(manifest["lam"])) if settings.variants else None,
               "across_class_share": float((manifest["pseudo_label"] != manifest["partner_pseudo_label"]).mean())
               if settings.variants else None}
    run_dir.write(PERTURB_SUMMARY, summary)
    log.info("perturb: %d kept images, %d perturbations in %d shards", counts["kept"], counts["perturbed"],
             counts["shards"])
    return {**counts, "timings": {"stats_s": round(stats_s, 2), "total_s": round(time.time() - t0, 2)}}
