"""crawl: a URL list (or a folder of images) → WebDataset shards and the crawl manifest.

Reads   cfg.data (the URL list or folder), cfg.crawl (img2dataset settings).
Writes  RUN/crawl/urls.parquet       the de-duplicated input, with a uid per URL
        RUN/crawl/shards/NNNNN.tar   img2dataset's WebDataset shards (+ its .parquet, _stats.json)
        RUN/crawl/manifest.parquet   one row per URL: uid, status, reason, error, shard, key...
        RUN/crawl/summary.json       attempted, succeeded, failures by reason, images/s

The download itself is img2dataset's ``download()``. A shard is complete when img2dataset has
written its ``_stats.json`` (last, after the tar): a killed crawl re-run in img2dataset's
incremental mode redoes only the shards without one. Before and after the download each
finished shard is checked against its stats, and one that does not add up is deleted and
downloaded again, so a half-written shard is never taken for complete.
"""

import importlib.util
import inspect
import json
import logging
import math
import re
import tarfile
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
from img2dataset import download

from manifests import (
    atomic_write_bytes,
    atomic_write_json,
    uid_for,
)
from manifests.artifacts import CRAWL_INVENTORY, CRAWL_MANIFEST, CRAWL_SHARDS, CRAWL_SUMMARY
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from stages.common.images import IMAGE_SUFFIXES
from stages.crawl.config import CrawlConfig, DataConfig
from stages.crawl.guard import guarded_downloads
from stages.crawl.webserver import serve_folder

log = logging.getLogger("webdistill.crawl")

_READERS = {
    "parquet": pd.read_parquet,
    "csv": pd.read_csv,
    "tsv": lambda p: pd.read_csv(p, sep="\t"),
    "json": pd.read_json,
    "jsonl": lambda p: pd.read_json(p, lines=True),
    "txt": lambda p: pd.DataFrame({"url": Path(p).read_text().split()}),
}
# img2dataset arguments the stage sets itself: overriding them would break the stage's contract
_MANAGED = {"url_list", "output_folder", "output_format", "input_format", "url_col", "caption_col",
            "save_additional_columns", "incremental_mode", "compute_hash", "enable_wandb", "max_image_area"}

# img2dataset error message → short failure reason, first match wins
_REASONS = [
    (re.compile(r"HTTP Error (\d+)"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"Connection refused"), "connection_refused"),
    (re.compile(r"timed out", re.I), "timeout"),
    (re.compile(r"Name or service not known|getaddrinfo|nodename nor servname"), "dns"),
    (re.compile(r"No such file or directory"), "not_found"),
    (re.compile(r"Image decoding error"), "decode_error"),
    (re.compile(r"image too small|aspect ratio|image area", re.I), "filtered_size"),
    (re.compile(r"X-Robots-Tag"), "disallowed"),
    (re.compile(r"hash mismatch"), "hash_mismatch"),
    (re.compile(r"Connection reset|Remote end closed|IncompleteRead|EOF occurred", re.I), "connection_error"),
    (re.compile(r"refused scheme|unknown url type", re.I), "refused_scheme"),
    (re.compile(r"too large"), "too_large"),
]


def failure_reason(error: str) -> str:
    """Short category of an img2dataset error message (http_404, decode_error, ...)."""
    for pattern, reason in _REASONS:
        m = pattern.search(error)
        if m:
            return reason(m) if callable(reason) else reason
    return "other"


# ---------------------------------------------------------------- input

def read_url_list(data: DataConfig) -> pd.DataFrame:
    if not data.url_list:
        raise UserError("data.url_list is not set: give a URL list, or set data.source: folder")
    path = Path(data.url_list)
    if not path.is_file():
        raise UserError(f"URL list {path} not found (the demo's is built by `make demo-data`)")
    fmt = data.input_format or path.suffix.lstrip(".").lower()
    if fmt not in _READERS:
        raise UserError(f"URL list {path}: unknown format {fmt!r}; set data.input_format to one of {sorted(_READERS)}")
    try:
        df = _READERS[fmt](path)
    except Exception as e:  # a reader error is the user's file, not our bug: say which file
        raise UserError(f"URL list {path}: cannot read it as {fmt}: {e}") from e
    url_col = "url" if fmt == "txt" else data.url_col
    for col in (url_col, data.caption_col):
        if col and col not in df.columns:
            raise UserError(f"URL list {path} has no column {col!r} (columns: {list(df.columns)})")
    out = pd.DataFrame({"url": df[url_col].astype("string").str.strip()})
    out["identity"] = out["url"]
    out["caption"] = df[data.caption_col].astype("string") if data.caption_col else None
    return out


def _list_folder(data: DataConfig) -> pd.DataFrame:
    if not data.folder or not Path(data.folder).is_dir():
        raise UserError(f"data.folder {data.folder!r} is not a folder of images (needed for source: folder)")
    root = Path(data.folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"data.folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    rel = [p.relative_to(root).as_posix() for p in files]
    # img2dataset reads file:// URLs with urllib like any other; the uid comes from the
    # relative path so that moving the folder keeps the uids; the sub-folder is the caption
    return pd.DataFrame({"url": [p.as_uri() for p in files], "identity": rel,
                         "caption": [str(Path(r).parent) if "/" in r else None for r in rel]})


def allowed_schemes(cfg) -> tuple[str, ...]:
    """The schemes the crawl fetches: the configured ones; a folder source's own file:// URLs too."""
    return tuple(cfg.crawl.allowed_schemes) + (("file",) if cfg.data.source == "folder" else ())


def prepare_inputs(data: DataConfig, path: Path, schemes: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The URL list de-duplicated and keyed by uid, written to ``path`` (kept on resume), and the rows
    whose scheme is not fetched (``refused.parquet`` beside it)."""
    refused_path = path.with_name("refused.parquet")
    if path.is_file():
        return pd.read_parquet(path), pd.read_parquet(refused_path), json.loads(path.with_suffix(".json").read_text())
    df = read_url_list(data) if data.source == "urls" else _list_folder(data)
    n_in = len(df)
    df = df[df["url"].notna() & (df["url"] != "")]
    n_empty = n_in - len(df)
    df = df.drop_duplicates("url")
    if df.empty:
        raise UserError(f"the input ({data.url_list or data.folder}) lists no URL")
    df = pd.DataFrame({"url": df["url"].to_numpy(), "uid": [uid_for(i) for i in df["identity"]],
                       "caption": df["caption"].to_numpy()})
    scheme = df["url"].str.extract(r"^([A-Za-z][A-Za-z0-9+.-]*):", expand=False).str.lower()
    fetched = scheme.isin(schemes).to_numpy()
    refused = df[~fetched].assign(error=[f"refused scheme {s if isinstance(s, str) else 'none'!r}: only "
                                         f"{', '.join(schemes)} are fetched (crawl.allowed_schemes)"
                                         for s in scheme[~fetched]])
    df = df[fetched]
    info = {"listed": n_in, "empty_urls": n_empty, "duplicate_urls": n_in - n_empty - len(df) - len(refused),
            "refused_scheme": len(refused)}
    if df.empty:
        raise UserError(f"the input ({data.url_list or data.folder}) lists no URL the crawl fetches: all "
                        f"{len(refused):,} have a scheme other than {', '.join(schemes)} (crawl.allowed_schemes)")
    atomic_write_json(path.with_suffix(".json"), info)
    atomic_write_bytes(refused_path, refused.to_parquet(index=False))
    atomic_write_bytes(path, df.to_parquet(index=False))  # last: its presence means all three are there
    return df, refused, info


# ---------------------------------------------------------------- shards

def _shard_ok(stats_file: Path) -> bool:
    """A finished shard: readable stats, a parquet with one row per URL, a tar with every success."""
    stem = stats_file.name.removesuffix("_stats.json")
    try:
        stats = json.loads(stats_file.read_text())
        rows = pd.read_parquet(stats_file.with_name(f"{stem}.parquet"), columns=["key"])
        with tarfile.open(stats_file.with_name(f"{stem}.tar")) as tar:
            images = {m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")}
    except Exception:  # any unreadable part means the shard is incomplete
        return False
    return len(rows) == stats["count"] and len(images) == stats["successes"]


def drop_incomplete_shards(folder: Path) -> list[str]:
    """Delete shard files that are not part of a complete shard; return the shard ids dropped."""
    if not folder.is_dir():
        return []
    complete = {f.name.removesuffix("_stats.json") for f in folder.glob("*_stats.json") if _shard_ok(f)}
    dropped = set()
    for f in folder.iterdir():
        stem = f.name.split("_")[0].split(".")[0]
        if f.is_file() and stem.isdigit() and stem not in complete:
            f.unlink()
            dropped.add(stem)
    return sorted(dropped)


def _check_distributor(distributor: str) -> None:
    """img2dataset quietly does nothing when ray is missing: say so before it starts."""
    if distributor != "multiprocessing" and importlib.util.find_spec(distributor) is None:
        raise UserError(f"crawl.distributor: {distributor} is not installed here: `pip install {distributor}`, "
                        "then start its cluster before the crawl (see README, 'Crawling on many machines')")


CRAWL_ONLY_SIDE = 64  # the stored side of a crawl run on its own, with no teacher configured


def stored_side(cfg) -> int:
    """The side of the stored images: crawl.image_size, else the teacher's input side."""
    if cfg.crawl.image_size:
        return cfg.crawl.image_size
    if cfg.teacher.input_size:
        return cfg.teacher.input_size
    if not (cfg.teacher.arch or cfg.teacher.checkpoint or cfg.teacher.spec_file):
        return CRAWL_ONLY_SIDE
    from stages.common.teacher import check_teacher  # the architecture's own size (timm, open_clip)

    return check_teacher(cfg.teacher).input_size


def _download_args(cfg: CrawlConfig, urls: Path, shards: Path, has_caption: bool, image_size: int) -> dict:
    _check_distributor(cfg.distributor)
    extra = dict(cfg.img2dataset_args)
    known = set(inspect.signature(download).parameters)
    for key in extra:
        if key in _MANAGED:
            raise UserError(f"crawl.img2dataset_args.{key} is set by the crawl stage and cannot be overridden")
        if key not in known:
            raise UserError(f"crawl.img2dataset_args.{key} is not an img2dataset.download() argument")
    return dict(
        url_list=str(urls), input_format="parquet", url_col="url",
        caption_col="caption" if has_caption else None, save_additional_columns=["uid"],
        output_folder=str(shards), output_format="webdataset", incremental_mode="incremental",
        compute_hash="sha256", enable_wandb=False, extract_exif=False,
        image_size=image_size, resize_mode=cfg.resize_mode, processes_count=cfg.processes_count,
        thread_count=cfg.thread_count, number_sample_per_shard=cfg.number_sample_per_shard,
        timeout=cfg.timeout, retries=cfg.retries, encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality, min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area or float("inf"),
        distributor=cfg.distributor, **extra,
    )


def gather_manifest(shards: Path, refused: pd.DataFrame) -> pd.DataFrame:
    """img2dataset's per-shard parquet files as one crawl manifest, with the refused rows (failed)."""
    parts = []
    for stats in sorted(shards.glob("*_stats.json")):
        stem = stats.name.removesuffix("_stats.json")
        part = pd.read_parquet(shards / f"{stem}.parquet")
        part["shard"] = f"shards/{stem}.tar"
        parts.append(part)
    df = pd.concat(parts, ignore_index=True)
    ok = df["status"] == "success"
    error = df["error_message"].astype("string")
    crawled = pd.DataFrame({
        "uid": df["uid"], "url": df["url"],
        "status": ok.map({True: "success", False: "failed"}),
        "reason": [None if good else failure_reason(str(e)) for good, e in zip(ok, error)],
        "error": error.where(~ok, None),
        "shard": df["shard"].where(ok, None), "key": df["key"],
        "sha256": df["sha256"],
        **{c: df[c].astype("Int32") for c in ("width", "height", "original_width", "original_height")},
        "caption": df["caption"] if "caption" in df else None,
    })
    if refused.empty:
        return crawled
    return pd.concat([crawled, pd.DataFrame({"uid": refused["uid"], "url": refused["url"], "status": "failed",
                                             "reason": "refused_scheme", "error": refused["error"],
                                             "caption": refused["caption"]})], ignore_index=True)


# ---------------------------------------------------------------- stage

def preflight(cfg) -> None:
    """What the crawl can check before anything runs: the URL list (or folder) reads and has its
    columns, img2dataset accepts the extra arguments, the distributor and served folder exist."""
    if cfg.data.source == "urls":
        read_url_list(cfg.data)
    else:
        _list_folder(cfg.data)
    _download_args(cfg.crawl, Path("urls.parquet"), Path("shards"), False, stored_side(cfg))
    if cfg.data.serve_folder and not Path(cfg.data.serve_folder).is_dir():
        raise UserError(f"data.serve_folder {cfg.data.serve_folder} is not a folder (the demo web is built by "
                        "`make demo-data`)")


def run(cfg, run_dir: RunDir) -> dict:
    out = run_dir.stage_dir("crawl")
    urls, refused, info = prepare_inputs(cfg.data, out / "urls.parquet", allowed_schemes(cfg))
    shards = run_dir.path(CRAWL_SHARDS)
    dropped = drop_incomplete_shards(shards)
    if dropped:
        log.info("crawl: re-downloading %d incomplete shard(s) left by an interrupted run: %s",
                 len(dropped), ", ".join(dropped))
    expected = math.ceil(len(urls) / cfg.crawl.number_sample_per_shard)
    done_before = set(shards.glob("*_stats.json"))
    log.info("crawl: %s rows listed (%s empty, %s duplicate, %s of a refused scheme): %s URLs in %d shard(s), "
             "%d already done; img2dataset with %d process(es) × %d threads", f"{info['listed']:,}",
             f"{info['empty_urls']:,}", f"{info['duplicate_urls']:,}", f"{info['refused_scheme']:,}",
             f"{len(urls):,}", expected, len(done_before), cfg.crawl.processes_count, cfg.crawl.thread_count)

    args = _download_args(cfg.crawl, out / "urls.parquet", shards, urls["caption"].notna().any(), stored_side(cfg))
    serving = serve_folder(cfg.data.serve_folder, cfg.data.serve_port) if cfg.data.serve_folder else nullcontext()
    t0 = time.time()
    with serving, guarded_downloads(allowed_schemes(cfg), int(cfg.crawl.max_download_mb * (1 << 20)),
                                    cfg.crawl.max_image_area or float("inf")):
        download(**args)
    seconds = time.time() - t0

    failed_shards = drop_incomplete_shards(shards)
    stats = set(shards.glob("*_stats.json"))
    finished = len(stats)
    if finished < expected:
        raise UserError(f"crawl: {expected - finished} of {expected} shard(s) did not finish "
                        f"{failed_shards or ''} (see img2dataset's messages above); re-run the crawl "
                        "to retry them: finished shards are kept")

    manifest = gather_manifest(shards, refused)
    run_dir.write_inventory(CRAWL_INVENTORY, [f"shards/{tar.name}" for tar in shards.glob("*.tar")])
    run_dir.write(CRAWL_MANIFEST, manifest)
    # images/s of this run: a resumed crawl does not count the shards it found done
    new_images = sum(json.loads(f.read_text())["successes"] for f in stats - done_before)
    summary = summarize(manifest, info, seconds, new_images)
    run_dir.write(CRAWL_SUMMARY, summary)
    reasons = ", ".join(f"{r} {n}" for r, n in summary["failures_by_reason"].items()) or "none"
    log.info("crawl: %s rows listed, %s dropped before the crawl (empty or duplicate URLs); %s attempted, %s "
             "succeeded, %s failed (%s); %.1f images/s", f"{info['listed']:,}",
             f"{info['empty_urls'] + info['duplicate_urls']:,}", f"{summary['attempted']:,}",
             f"{summary['succeeded']:,}", f"{summary['failed']:,}", reasons, summary["images_per_s"] or 0)
    if summary["succeeded"] == 0:
        raise UserError(f"crawl: no image could be downloaded ({reasons}); see the error column of "
                        f"{out / 'manifest.parquet'}: are the URLs reachable from this machine?")
    return {
        "attempted": summary["attempted"], "succeeded": summary["succeeded"], "failed": summary["failed"],
        "shards": finished, "images_per_s": summary["images_per_s"],
        "timings": {"download_s": summary["download_seconds"]},
        "details": {"failures_by_reason": summary["failures_by_reason"], **info},
    }


def summarize(manifest: pd.DataFrame, info: dict, seconds: float, new_images: int) -> dict:
    ok = manifest["status"] == "success"
    return {
        **info,
        "attempted": len(manifest),
        "succeeded": int(ok.sum()),
        "failed": int((~ok).sum()),
        "failures_by_reason": dict(Counter(manifest.loc[~ok, "reason"]).most_common()),
        "download_seconds": round(seconds, 2),
        "images_per_s": round(new_images / seconds, 1) if seconds else None,
    }
