"""Benchmark: the pipeline on a generated pool of 100k to 1M images, time and peak memory per stage.

For each pool size a crawl-shaped pool of generated images (smooth grey noise at the teacher's
input side, JPEG, shards of 10,000 as img2dataset writes them, with the crawl's manifest and
inventory) stands in for the crawl: no URL is fetched. Then the real stages run on it with the
config's settings (synthesis off): score, filter, perturb, and one epoch of distill's loader (the
student's data path without training, which is what grows with the pool). Each stage runs in its
own process; its peak memory is sampled every 0.2 s as the proportional set size (PSS, Linux
``/proc/<pid>/smaps_rollup``) of the process and all its workers together, so pages the workers share
with it count once. The feature arrays travel with the score manifest and are memory-mapped; the table
gives their size beside the peaks, so a peak that grows faster than they do shows.

    python bench/bench_scale.py [--config configs/demo.yaml] [--sizes 100000 1000000]

Writes bench/results/scale.{md,json,png}; the pools stay in bench/work/scale/pool-<n> (delete it
afterwards: 1M images take about 4 GB); a re-run generates and times every stage again.
"""

import argparse
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from manifests import uid_for  # noqa: E402
from manifests.artifacts import CRAWL_INVENTORY, CRAWL_MANIFEST, CRAWL_SHARDS, CRAWL_SUMMARY  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.runner import run_stages  # noqa: E402
from stages import STAGES  # noqa: E402

WORK = ROOT / "bench" / "work" / "scale"
RESULTS = ROOT / "bench" / "results"
PER_SHARD = 10000
STAGE_NAMES = ("generate", "score", "filter", "perturb", "distill_loader")
SETTINGS = ["synthesize.start=none"]  # the web pool alone: synthesis does not grow with the pool


# ---------------------------------------------------------------- the generated pool (the crawl's outputs)

def generated_image(rng: np.random.Generator, side: int) -> bytes:
    """Smooth grey noise: a random 7×7 grid upsampled to ``side``, as JPEG bytes."""
    from PIL import Image

    grid = Image.fromarray(rng.integers(0, 256, (7, 7), dtype=np.uint8))
    out = io.BytesIO()
    grid.resize((side, side), Image.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shard(job: tuple[Path, int, int, int]) -> list[dict]:
    """Shard ``shard`` of the pool (images ``start``…``start + count``), as img2dataset lays it out."""
    import webdataset as wds

    path, start, count, side = job
    rng = np.random.default_rng(start)
    rows = []
    with wds.TarWriter(str(path)) as sink:
        for i in range(start, start + count):
            url = f"https://generated.invalid/{i:09d}.jpg"  # an identity for the uid; never fetched
            data, key, uid = generated_image(rng, side), f"{i:09d}", uid_for(url)
            meta = {"uid": uid, "url": url, "key": key, "status": "success", "width": side, "height": side}
            sink.write({"__key__": key, "jpg": data, "json": json.dumps(meta).encode()})
            rows.append({"uid": uid, "url": url, "status": "success", "reason": None, "error": None,
                         "shard": f"shards/{path.name}", "key": key, "sha256": hashlib.sha256(data).hexdigest(),
                         "width": side, "height": side, "original_width": side, "original_height": side,
                         "caption": None})
    return rows


def generated_crawl(cfg, run_dir: RunDir) -> dict:
    """Stands in for the crawl stage: ``pool_size()`` generated images in crawl shards, manifest and inventory."""
    n, side = pool_size(), cfg.teacher.input_size
    shards = run_dir.path(CRAWL_SHARDS)
    shards.mkdir(parents=True, exist_ok=True)
    jobs = [(shards / f"{s:05d}.tar", start, min(PER_SHARD, n - start), side)
            for s, start in enumerate(range(0, n, PER_SHARD))]
    t0 = time.time()
    with Pool(cfg.crawl.processes_count) as pool:
        rows = [row for part in pool.imap(write_shard, jobs) for row in part]
    manifest = pd.DataFrame(rows)
    for c in ("width", "height", "original_width", "original_height"):
        manifest[c] = manifest[c].astype("Int32")
    run_dir.write_inventory(CRAWL_INVENTORY, [f"shards/{job[0].name}" for job in jobs])
    run_dir.write(CRAWL_MANIFEST, manifest)
    seconds = time.time() - t0
    run_dir.write(CRAWL_SUMMARY, {"attempted": n, "succeeded": n, "failed": 0, "generated": True,
                                  "download_seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1)})
    return {"attempted": n, "succeeded": n, "failed": 0, "shards": len(jobs), "images_per_s": round(n / seconds, 1)}


def pool_size() -> int:
    return int(os.environ["WEBDISTILL_SCALE_POOL"])  # set by the worker: the runner imports this module anew


# the crawl's place in the pipeline, taken by the generator: same name and config sections, so every
# later stage reads it as a crawl; the pool size is part of its fingerprint
SPECS = [dataclasses.replace(STAGES[0], module="bench.bench_scale:generated_crawl", preflight=None, input_files=None,
                             derived=lambda cfg: {"generated_pool": pool_size()}), *STAGES[1:]]
COUNTED = {"crawl": "succeeded", "score": "scored", "filter": "scored", "perturb": "perturbed"}


# ---------------------------------------------------------------- one stage in its own process

def tree_pss_mb(root: int) -> float:
    """PSS of process ``root`` and its descendants (MB): shared pages divided among their sharers."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return total / 1024


class PeakMemory(threading.Thread):
    """The highest ``tree_pss_mb`` of this process while it runs, sampled every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = 0.0, threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            self.peak = max(self.peak, tree_pss_mb(os.getpid()))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


def pool_config(config: str, n: int):
    return load_config(config, [f"run_dir={WORK / f'pool-{n}'}", *SETTINGS])


def distill_loader_epoch(cfg) -> int:
    """One epoch of distill's loader over the transfer set, as the stage would feed the student."""
    from pipeline import devices
    from stages.common.teacher import load_teacher
    from stages.distill.methods import resolve
    from stages.distill.stage import transfer_set

    settings, recipe = cfg.distill, resolve(cfg.distill)
    teacher = load_teacher(cfg.teacher, devices.pick_device(settings.device))
    data, kept, _, _ = transfer_set(RunDir(cfg.run_dir), settings.split, with_features=False)
    loader = data.loader(teacher.transform, 0, settings.seed, 0, 1, settings.batch_size, settings.num_workers,
                         settings.shuffle_buffer, recipe.perturbation == "offline", settings.cache_mb)
    steps = data.steps(0, settings.seed, 1, settings.num_workers, settings.batch_size)
    images = 0
    for _, batch in zip(range(steps), loader):
        images += len(batch["row"])
    return images


def worker(stage: str, config: str, n: int) -> dict:
    os.environ["WEBDISTILL_SCALE_POOL"] = str(n)
    cfg = pool_config(config, n)
    t0 = time.time()
    with PeakMemory() as memory:
        if stage == "distill_loader":
            run_stages(cfg, SPECS, only=["crawl", "score", "filter", "synthesize", "perturb"])  # all done: skipped
            images = distill_loader_epoch(cfg)
        else:
            name = "crawl" if stage == "generate" else stage
            run_stages(cfg, SPECS, only=[name], force=True)
            images = RunDir(cfg.run_dir).record(name)["counts"][COUNTED[name]]
    return {"stage": stage, "pool": n, "seconds": round(time.time() - t0, 2), "images": images,
            "peak_mb": round(memory.peak, 1)}


def in_subprocess(stage: str, config: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", stage, "--config", config, "--sizes", str(n)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- results

def array_mb(n: int) -> float:
    score = WORK / f"pool-{n}" / "score"
    return round(sum(p.stat().st_size for p in score.glob("*.npy")) / 2 ** 20, 1)


def write_results(rows: list[dict], config: str) -> None:
    from bench.methods import machine
    from stages.common.plots import pyplot

    table = pd.DataFrame(rows)
    table["images_per_s"] = (table["images"] / table["seconds"]).round(1)
    lines = ["# the pipeline at scale: a generated pool, stage by stage", "",
             f"Machine: {machine()}. Config: {config} (synthesis off); pools of generated grey images at the "
             "teacher's side, crawl-shaped shards of 10,000 (`python bench/bench_scale.py`). Peak memory: the "
             "stage's process and its workers together (PSS, sampled every 0.2 s); the score arrays (features, "
             "logits, BatchNorm distances) are memory-mapped, their size on disk beside.", "",
             "| pool | stage | seconds | images | images/s | peak MB | score arrays MB |", "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.pool:,} | {r.stage} | {r.seconds:.1f} | {r.images:,} | {r.images_per_s:,.0f} | "
                     f"{r.peak_mb:,.0f} | {array_mb(r.pool):,.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "scale.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for stage, part in table.groupby("stage", sort=False):
        axes[0].plot(part["pool"], part["seconds"], marker="o", label=stage)
        axes[1].plot(part["pool"], part["peak_mb"], marker="o", label=stage)
    for ax, what in zip(axes, ("seconds", "peak MB (PSS, process and workers)")):
        ax.set(xscale="log", yscale="log", xlabel="pool (images)", ylabel=what)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=100)
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100000, 1000000])
    parser.add_argument("--worker", choices=STAGE_NAMES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.config, args.sizes[0])))
        return
    rows = []
    for n in args.sizes:
        for stage in STAGE_NAMES:
            rows.append(in_subprocess(stage, args.config, n))
            print(f"pool {n:,}: {stage} {rows[-1]['seconds']:.1f}s, peak {rows[-1]['peak_mb']:,.0f} MB", flush=True)
    write_results(rows, args.config)


if __name__ == "__main__":
    main()
