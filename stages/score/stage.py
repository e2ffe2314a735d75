"""score: every crawled image through the teacher (and an optional open_clip embedder).

Reads   manifests.artifacts CRAWL_MANIFEST, CRAWL_SHARDS (crawl/manifest.parquet, crawl/shards/*.tar);
        cfg.teacher, cfg.score
Writes  RUN/score/manifest.parquet    one row per scored image: pseudo-label, confidence, entropy,
                                      margin, top-k (schema manifests.SCORE)
        RUN/score/logits.npy          float32, rows × classes   } row i belongs to row i
        RUN/score/features.npy        teacher penultimate       } of manifest.parquet
                                      features, float16 default }
        RUN/score/embeddings.npy      open_clip image embeddings, L2-normalised (if configured)
        RUN/score/failures.parquet    images that could not be used, with the reason
        RUN/score/teacher.json        class names, feature size, what the teacher and embedder are
        RUN/score/classifier.npz      the teacher's classifier weight/bias: one prototype per class
        RUN/score/feature_prior.npz   feature mean/std implied by the teacher's BatchNorm (if it has one)
        RUN/score/text_embeddings.npy the embedder's embedding of each class prompt (if configured)
        RUN/score/reference.npz       the same arrays for score.reference_shards (if configured)
        RUN/score/summary.json
        RUN/score/parts/              per-shard results: the unit of resume

Images stream from the crawl shards through a WebDataset pipeline (decoding and resizing in
DataLoader workers, batched there) to the teacher on the GPU when there is one. Each crawl shard's
results are written atomically to ``parts/`` as soon as its last image is scored, so a killed run
resumes from its finished shards. Under ``torchrun`` each rank scores every world_size-th shard
and rank 0 merges the parts: the result does not depend on the number of processes.
"""

import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image

from manifests import (
    SCORE,
    SCORE_FAILURES,
    ManifestWriter,
    atomic_write_bytes,
    concat_arrays,
    expand_shards,
    write_manifest,
)
from manifests.artifacts import CRAWL_INVENTORY, CRAWL_MANIFEST, CRAWL_SHARDS, SCORE_SUMMARY, TEACHER_INFO
from pipeline import devices
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from stages.common.batchnorm import BatchNormStatistics, batchnorm_layers
from stages.common.images import image_key, is_image_member
from stages.common.progress import progress
from stages.common.tar_stream import tar_samples
from stages.common.teacher import Embedder, Teacher, check_teacher, load_embedder, load_teacher
from stages.score.config import ScoreConfig

log = logging.getLogger("webdistill.score")

# ---------------------------------------------------------------- the loader (runs in workers)

def decode_sample(sample: dict, transforms: list, placeholders: list[torch.Tensor]) -> dict:
    """A WebDataset sample → its model inputs; a sample that does not decode keeps its error."""
    out = {"key": sample["__key__"], "shard": Path(sample["__url__"]).name, "error": None,
           "label": int(sample["cls"]) if "cls" in sample else -1}
    key = image_key(sample)
    data = sample[key] if key else None
    try:
        if data is None:
            raise ValueError(f"no image in the sample (keys: {sorted(k for k in sample if not k.startswith('__'))})")
        image = Image.open(io.BytesIO(data))
        image.load()
        image = image.convert("RGB")
        out["inputs"] = [t(image) for t in transforms]
    except Exception as e:  # a broken image is data, not a bug: record why and go on
        out["error"] = f"{type(e).__name__}: {e}"
        out["inputs"] = placeholders
    return out


def collate(samples: list[dict]) -> dict:
    return {"key": [s["key"] for s in samples], "shard": [s["shard"] for s in samples],
            "error": [s["error"] for s in samples], "label": [s["label"] for s in samples],
            "inputs": [torch.stack([s["inputs"][i] for s in samples]) for i in range(len(samples[0]["inputs"]))]}


def _damaged_tar(exn: Exception) -> bool:
    log.warning("score: a shard could not be read to the end (%s); its unread images are recorded as "
                "missing_from_shard", exn)
    return True


def make_loader(shards: list[Path], transforms: list, batch_size: int, num_workers: int, pin_memory: bool,
                with_labels: bool = False):
    """Batches of decoded images from ``shards`` (and their ``.cls`` labels, if asked), each shard
    read whole by one worker."""
    placeholders = [torch.zeros_like(t(Image.new("RGB", (8, 8)))) for t in transforms]
    dataset = wds.DataPipeline(
        wds.SimpleShardList([str(s) for s in shards]),
        wds.split_by_worker,
        # only the image of each sample is read (the uid comes from the crawl manifest by key), from a
        # memory map rather than with tarfile: half the loader's CPU time on small images
        partial(tar_samples, handler=_damaged_tar, select=_is_labelled_image if with_labels else _is_image),
        wds.map(partial(decode_sample, transforms=transforms, placeholders=placeholders)),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=min(num_workers, len(shards)), pin_memory=pin_memory)


def _is_image(name: str) -> bool:
    return is_image_member(name)


def _is_labelled_image(name: str) -> bool:
    return _is_image(name) or name.endswith(".cls")


# ---------------------------------------------------------------- per-shard results

@dataclass
class ShardResult:
    """What has been scored of one crawl shard so far."""

    name: str  # e.g. 00003.tar
    expected: dict[str, str]  # key -> uid of every image the crawl put in the shard
    keys: list[str] = field(default_factory=list)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)

    def seen(self) -> int:
        return len(self.keys) + len(self.failures)

    def add(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        self.keys.append(key)
        for name, row in arrays.items():
            self.arrays.setdefault(name, []).append(row)

    def fail(self, key: str | None, uid: str, reason: str, error: str | None) -> None:
        self.failures.append({"uid": uid, "shard": f"shards/{self.name}", "key": key, "reason": reason, "error": error})

    def missing(self) -> None:
        """Record the images the shard was expected to hold but did not yield."""
        done = set(self.keys) | {f["key"] for f in self.failures}
        for key, uid in self.expected.items():
            if key not in done:
                self.fail(key, uid, "missing_from_shard", "not readable from the crawl shard")


def prediction_table(logits: np.ndarray, class_names: list[str], top_k: int) -> pd.DataFrame:
    """Pseudo-label, confidence, entropy, margin and top-k of each row of logits."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    k = min(top_k, p.shape[1])
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    top_p = np.take_along_axis(p, top, axis=1)
    second = top_p[:, 1] if k > 1 else np.zeros(len(p))
    return pd.DataFrame({
        "pseudo_label": top[:, 0].astype(np.int32),
        "pseudo_class": np.asarray(class_names, dtype=object)[top[:, 0]],
        "confidence": top_p[:, 0].astype(np.float32),
        "entropy": (-(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1)).astype(np.float32),
        "margin": (top_p[:, 0] - second).astype(np.float32),
        "topk_labels": list(top.astype(np.int32)),
        "topk_probs": list(top_p.astype(np.float32)),
    })


def _part_paths(parts: Path, shard: str) -> tuple[Path, Path, Path]:
    stem = shard.removesuffix(".tar")
    return parts / f"{stem}.parquet", parts / f"{stem}.npz", parts / f"{stem}.failures.parquet"


def write_part(parts: Path, result: ShardResult, class_names: list[str], top_k: int) -> None:
    """One shard's results: arrays and failures first, its manifest rows last (the marker of a done shard)."""
    rows_file, arrays_file, failures_file = _part_paths(parts, result.name)
    arrays = {name: np.stack(rows) for name, rows in result.arrays.items()}
    _save_npz(arrays_file, arrays)
    atomic_write_bytes(failures_file, pd.DataFrame(result.failures, columns=SCORE_FAILURES.schema.names)
                       .to_parquet(index=False))
    rows = pd.DataFrame({"uid": [result.expected[k] for k in result.keys], "shard": f"shards/{result.name}",
                         "key": result.keys})
    if result.keys:
        rows = pd.concat([rows, prediction_table(arrays["logits"], class_names, top_k)], axis=1)
    atomic_write_bytes(rows_file, rows.to_parquet(index=False))


# ---------------------------------------------------------------- scoring

class Scorer:
    """The teacher (and embedder) on one device, from a batch of inputs to per-image arrays."""

    def __init__(self, teacher: Teacher, settings: ScoreConfig, device: torch.device, embedder: Embedder | None = None):
        self.teacher, self.settings, self.device = teacher, settings, device
        self.embedder = embedder.encoder if embedder else None
        self.embedder_dim = embedder.dim if embedder else None
        self.transforms = [teacher.transform] + ([embedder.transform] if embedder else [])
        self.feature_dtype = np.dtype(settings.feature_dtype)
        # every BatchNorm layer's view of each image (the filter's bn_layers reference), when it has some
        self.batchnorm = BatchNormStatistics(teacher.model, per="image") \
            if settings.bn_distance and batchnorm_layers(teacher.model) else None

    @torch.inference_mode()
    def __call__(self, inputs: list[torch.Tensor]) -> dict[str, np.ndarray]:
        with devices.autocast(self.device, self.settings.precision):
            logits, features = self.teacher.model(inputs[0].to(self.device, non_blocking=True))
            out = {"logits": logits.float().cpu().numpy(),
                   "features": features.float().cpu().numpy().astype(self.feature_dtype)}
            if self.batchnorm is not None:
                out["bn_distance"] = self.batchnorm.per_image().cpu().numpy().astype(np.float32)
            if self.embedder is not None:
                embedding = self.embedder(inputs[1].to(self.device, non_blocking=True)).float()
                embedding = torch.nn.functional.normalize(embedding, dim=-1)
                out["embeddings"] = embedding.cpu().numpy().astype(self.feature_dtype)
        return out


def score_shards(shards: list[Path], expected: "CrawledImages", scorer: Scorer, parts: Path,
                 show_progress: bool = True) -> int:
    """Score ``shards`` and write one part per shard; returns the number of images read."""
    pending = {s.name for s in shards}
    results: dict[str, ShardResult] = {}  # the shards being read: a shard's key → uid map is built when it starts
    settings = scorer.settings
    loader = make_loader(shards, scorer.transforms, settings.batch_size, settings.num_workers,
                         pin_memory=scorer.device.type == "cuda")
    total = sum(expected.count(name) for name in pending)
    images = 0
    with progress(total=total, desc="score", unit="img", disable=not show_progress, smoothing=0.1) as bar:
        for batch in loader:
            ok = [i for i, e in enumerate(batch["error"]) if e is None]
            arrays = scorer([x[ok] for x in batch["inputs"]]) if ok else {}
            position = {i: j for j, i in enumerate(ok)}
            for i, (shard, key, error) in enumerate(zip(batch["shard"], batch["key"], batch["error"])):
                if shard in pending:
                    pending.discard(shard)
                    results[shard] = ShardResult(shard, expected.of(shard))
                result = results.get(shard)
                if result is None or key not in result.expected:  # none: its part is written already
                    log.warning("score: %s/%s is not in the crawl manifest, or twice in its shard: skipped", shard,
                                key)
                    continue
                if error is None:
                    result.add(key, {name: a[position[i]] for name, a in arrays.items()})
                else:
                    result.fail(key, result.expected[key], "decode_error", error)
                if result.seen() == len(result.expected):
                    write_part(parts, result, scorer.teacher.class_names, settings.top_k)
                    del results[shard]  # its rows are on disk: memory holds only the shards being read
            images += len(batch["key"])
            bar.update(len(batch["key"]))
    # a damaged tar ends early (or yields nothing): record what it did not yield
    unfinished = list(results.values()) + [ShardResult(name, expected.of(name)) for name in sorted(pending)]
    for result in unfinished:
        if result.seen() < len(result.expected):
            result.missing()
            write_part(parts, result, scorer.teacher.class_names, settings.top_k)
    return images


class CrawledImages:
    """The images the crawl downloaded, by shard: its manifest's key and uid columns kept as Arrow
    arrays sorted by shard (a few dozen bytes an image, not a Python object each), and one shard's
    key → uid map built when that shard is read."""

    def __init__(self, crawl: pa.Table):
        ok = crawl.filter(pc.equal(crawl["status"], "success"))
        name = pc.replace_substring_regex(ok["shard"], pattern=r"^.*/", replacement="")  # shards/00003.tar → 00003.tar
        self.table = pa.table({"name": name, "key": ok["key"], "uid": ok["uid"]}).sort_by("name")
        counts = self.table.group_by("name").aggregate([("key", "count")]).sort_by("name")
        self.names = counts["name"].to_pylist()
        starts = np.concatenate([[0], np.cumsum(counts["key_count"].to_numpy())])
        self._span = {n: (int(starts[i]), int(starts[i + 1] - starts[i])) for i, n in enumerate(self.names)}

    def __bool__(self) -> bool:
        return bool(self.names)

    def count(self, shard: str) -> int:
        return self._span[shard][1]

    def of(self, shard: str) -> dict[str, str]:
        """key → uid of every image the crawl put in ``shard`` (e.g. 00003.tar)."""
        rows = self.table.slice(*self._span[shard])
        return dict(zip(rows["key"].to_pylist(), rows["uid"].to_pylist()))


def merge_parts(out: Path, shards: list[str], expected: CrawledImages) -> tuple[pd.DataFrame, dict]:
    """Concatenate the per-shard parts (in shard order) into the manifest, arrays and failures, one
    part at a time (memory holds one shard's rows, whatever the pool's size). Returns the failures and
    the pseudo-class counts and confidence sum of the scored rows, for the summary."""
    parts = [_part_paths(out / "parts", shard) for shard in shards]
    failures, rows = [], []
    for shard, (rows_file, _, failures_file) in zip(shards, parts):
        uids = pq.read_table(rows_file, columns=["uid"])["uid"].to_pylist()
        failed = pd.read_parquet(failures_file)
        crawled = expected.of(shard).values()
        if set(uids) | set(failed["uid"]) != set(crawled) or len(uids) + len(failed) != len(crawled):
            raise UserError(f"score: the parts in {out / 'parts'} do not account for every image of {shard} exactly "
                            f"once ({len(uids) + len(failed)} rows for {len(crawled)} images); re-run with --force")
        failures.append(failed)
        rows.append(len(uids))
    failed = pd.concat(failures, ignore_index=True)
    if not sum(rows):
        reasons = ", ".join(f"{r} {n}" for r, n in Counter(failed["reason"]).most_common())
        raise UserError(f"score: not one crawled image could be used ({reasons}); see {out / 'parts'}/*.failures.parquet")

    scored = [files for files, n in zip(parts, rows) if n]
    with np.load(scored[0][1]) as z:
        names = z.files
    for name in names:
        concat_arrays(out / f"{name}.npy", (_load_array(arrays_file, name) for _, arrays_file, _ in scored), sum(rows))
    write_manifest(failed, out / "failures.parquet", SCORE_FAILURES)
    classes, confidence = Counter(), 0.0
    with ManifestWriter(out / "manifest.parquet", SCORE) as manifest:  # last: the stage's main output
        for rows_file, _, _ in scored:
            part = pq.read_table(rows_file)
            manifest.write(part)
            classes.update(part["pseudo_class"].to_pylist())
            confidence += float(pc.sum(part["confidence"]).as_py())
    return failed, {"pseudo_classes": classes, "confidence_sum": confidence, "scored": sum(rows)}


def _load_array(path: Path, name: str) -> np.ndarray:
    with np.load(path) as z:
        return z[name]


def _save_npz(path: Path, arrays: dict) -> None:
    """``arrays`` as one .npz file, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _write_references(out: Path, teacher: Teacher, embedder: Embedder | None) -> None:
    """What the teacher and embedder know of the private distribution, for the filter."""
    if teacher.classifier is not None:
        weight, bias = teacher.classifier
        _save_npz(out / "classifier.npz", {"weight": weight, **({"bias": bias} if bias is not None else {})})
    if teacher.feature_prior is not None:
        _save_npz(out / "feature_prior.npz", teacher.feature_prior)
    if embedder is not None:
        _save_npz(out / "text_embeddings.npz", {"embeddings": embedder.text_embeddings})


def score_reference(shards: list[Path], scorer: Scorer) -> dict[str, np.ndarray]:
    """A small reference set through the teacher (and embedder): its arrays and ``.cls`` labels
    (-1 where a sample has none), in memory: a reference set is a few images per class."""
    settings = scorer.settings
    loader = make_loader(shards, scorer.transforms, settings.batch_size, settings.num_workers,
                         pin_memory=scorer.device.type == "cuda", with_labels=True)
    arrays, labels, failed = {}, [], 0
    for batch in loader:
        ok = [i for i, e in enumerate(batch["error"]) if e is None]
        failed += len(batch["error"]) - len(ok)
        for name, a in (scorer([x[ok] for x in batch["inputs"]]) if ok else {}).items():
            arrays.setdefault(name, []).append(a)
        labels += [batch["label"][i] for i in ok]
    if not labels:
        raise UserError(f"score.reference_shards: no readable image in {', '.join(map(str, shards))}")
    if failed:
        log.warning("score: %d reference image(s) could not be decoded and were left out", failed)
    return {name: np.concatenate(parts) for name, parts in arrays.items()} | {"labels": np.asarray(labels, np.int64)}


def _teacher_info(teacher: Teacher, settings: ScoreConfig, embedder_dim: int | None) -> dict:
    return {"class_names": teacher.class_names, "num_classes": teacher.num_classes,
            "feature_dim": teacher.feature_dim, "input_size": teacher.input_size, "channels": teacher.channels,
            "description": teacher.description, "feature_dtype": settings.feature_dtype,
            "embedder": {"model": settings.embedder_model, "checkpoint": settings.embedder_checkpoint,
                         "dim": embedder_dim} if embedder_dim else None}


def summarize(scored: dict, failed: pd.DataFrame, class_names: list[str], seconds: float, images: int) -> dict:
    """The summary of the scored rows (``merge_parts``' counts) and the failures."""
    return {
        "images": scored["scored"] + len(failed),
        "scored": scored["scored"],
        "failed": len(failed),
        "failures_by_reason": dict(Counter(failed["reason"]).most_common()),
        "pseudo_class_histogram": {str(name): scored["pseudo_classes"][name] for name in class_names},
        "mean_confidence": round(scored["confidence_sum"] / scored["scored"], 4) if scored["scored"] else None,
        "score_seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1) if seconds and images else None,
    }


def _log_summary(s: dict, device: torch.device) -> None:
    histogram = ", ".join(f"{k}: {v}" for k, v in s["pseudo_class_histogram"].items())
    reasons = ", ".join(f"{k} {v}" for k, v in s["failures_by_reason"].items()) or "none"
    log.info("score: %s images, %s scored, %s could not be used (%s); %s images/s on %s. Pseudo-labels: %s. "
             "Mean teacher confidence %s.", f"{s['images']:,}", f"{s['scored']:,}", f"{s['failed']:,}", reasons,
             s["images_per_s"], device, histogram, s["mean_confidence"])


def preflight(cfg) -> None:
    """The teacher loads and runs (features included), the embedder's checkpoint and the reference
    shards exist: checked before the crawl starts."""
    check_teacher(cfg.teacher)
    checkpoint = cfg.score.embedder_checkpoint
    if cfg.score.embedder_model and checkpoint not in (None, "random") and not Path(checkpoint).is_file():
        raise UserError(f"score.embedder_checkpoint {checkpoint} not found (no downloads here: give a local "
                        f"open_clip checkpoint of {cfg.score.embedder_model})")
    expand_shards(cfg.score.reference_shards, "score.reference_shards")


def run(cfg, run_dir: RunDir) -> dict:
    out = run_dir.stage_dir("score")
    expected = CrawledImages(run_dir.read(CRAWL_MANIFEST, columns=["uid", "status", "shard", "key"], arrow=True))
    if not expected:
        raise UserError(f"score: the crawl manifest {run_dir.path(CRAWL_MANIFEST)} lists no downloaded image")
    shards, shard_dir = expected.names, run_dir.path(CRAWL_SHARDS)

    t0 = time.time()
    device = devices.pick_device(cfg.score.device)
    teacher = load_teacher(cfg.teacher, device)
    embedder = None
    if cfg.score.embedder_model:
        embedder = load_embedder(cfg.score.embedder_model, cfg.score.embedder_checkpoint, teacher.class_names,
                                 cfg.teacher.prompt_template, device)
    scorer = Scorer(teacher, cfg.score, device, embedder)
    load_seconds = time.time() - t0

    # every rank takes every world_size-th shard of the same sorted list, then skips its finished ones
    mine = shards[devices.rank()::devices.world_size()]
    parts = out / "parts"
    todo = [s for s in mine if not _part_paths(parts, s)[0].is_file()]
    run_dir.verified(CRAWL_INVENTORY, [f"{CRAWL_SHARDS.path}/{s}" for s in todo])  # each one as the crawl wrote it
    if len(todo) < len(mine):
        log.info("score: %d of %d shard(s) already scored by an interrupted run, resuming", len(mine) - len(todo),
                 len(mine))
    t1 = time.time()
    images = score_shards([shard_dir / s for s in todo], expected, scorer, parts,
                          show_progress=devices.is_main()) if todo else 0
    seconds = time.time() - t1
    images = devices.sum_over_ranks(images)  # also waits until every rank's parts are written
    if not devices.is_main():
        return {}

    t2 = time.time()
    failed, scored = merge_parts(out, shards, expected)
    run_dir.write(TEACHER_INFO, _teacher_info(teacher, cfg.score, scorer.embedder_dim))
    _write_references(out, teacher, embedder)
    if cfg.score.reference_shards:
        reference = score_reference(expand_shards(cfg.score.reference_shards, 'score.reference_shards'), scorer)
        _save_npz(out / "reference.npz", reference)
        log.info("score: %d reference images scored into %s", len(reference["logits"]), out / "reference.npz")
    summary = summarize(scored, failed, teacher.class_names, seconds, images)
    run_dir.write(SCORE_SUMMARY, summary)
    _log_summary(summary, device)
    return {
        "images": summary["images"], "scored": summary["scored"], "failed": summary["failed"], "shards": len(shards),
        "images_per_s": summary["images_per_s"],
        "timings": {"load_models_s": round(load_seconds, 2), "score_s": round(seconds, 2),
                    "merge_s": round(time.time() - t2, 2)},
        "details": {k: summary[k] for k in ("failures_by_reason", "pseudo_class_histogram", "mean_confidence")}
        | {"device": str(device), "world_size": devices.world_size(), "teacher": teacher.description},
    }
