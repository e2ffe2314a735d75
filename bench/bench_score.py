"""Benchmark: the score stage against the models' bare forward pass on the same images, in one run.

Reference: every image of the demo crawl decoded and transformed once into an in-memory tensor,
then the bare forward pass (``teacher.model`` under ``torch.inference_mode``) over it with the
same batch size. Measured: the score stage streaming the same shards (decoding in DataLoader
workers), both as its scoring loop and as the whole stage (model loading, merge, manifests).
The two alternate (reference, stage, stage, reference, ...), median of ``--repeats``.

The same for the teacher plus an open_clip ViT-S-32 embedder with random weights, on the first
``--embedder-shards`` shards (ViT-S-32 at 224 px runs at tens of images/s on a small CPU).
A ratio ≥ 0.8 means the loader is not the bottleneck.

    python bench/bench_score.py [--config configs/demo.yaml] [--repeats 2] [--embedder-shards 1]
"""

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from manifests import CRAWL, read_manifest  # noqa: E402
from pipeline import devices  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.runner import run_stages  # noqa: E402
from stages import STAGES  # noqa: E402
from stages.common.images import read_shard_images  # noqa: E402
from stages.common.teacher import load_embedder, load_teacher  # noqa: E402
from stages.score import stage as score_stage  # noqa: E402

WORK = Path("bench/work/score")
RESULTS = Path("bench/results")


def in_memory_inputs(shards_dir: Path, transforms, shard_names=None, limit: int | None = None) -> list[torch.Tensor]:
    """The shards' images (the first ``limit`` of them, if given) through each transform, stacked."""
    images = [im for uid, im in islice(read_shard_images(shards_dir, shard_names), limit)]
    return [torch.stack([t(im) for im in images]) for t in transforms]


@torch.inference_mode()
def bare_forward(models, inputs: list[torch.Tensor], batch_size: int, device, precision: str = "fp32") -> float:
    """Seconds for the models' forward passes over tensors already in memory (under the stage's autocast
    for ``precision``)."""
    t0 = time.perf_counter()
    for i in range(0, len(inputs[0]), batch_size):
        with devices.autocast(device, precision):
            for model, x in zip(models, inputs):
                model(x[i:i + batch_size].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def loader_only(cfg, shards_dir: Path, transforms) -> float:
    """Seconds for the stage's loader alone (read, decode, transform, batch; no model)."""
    shards = sorted(shards_dir.glob("*.tar"))
    t0 = time.perf_counter()
    for _ in score_stage.make_loader(shards, transforms, cfg.score.batch_size, cfg.score.num_workers, False):
        pass
    return time.perf_counter() - t0


def stage_run(cfg, crawl_run: Path) -> tuple[float, dict]:
    """The whole score stage on a fresh copy of the crawl; (seconds, its summary)."""
    run_dir = WORK / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(crawl_run / "crawl", run_dir / "crawl")
    t0 = time.perf_counter()
    run_stages(cfg, STAGES, only=["score"], force=True)
    seconds = time.perf_counter() - t0
    return seconds, json.loads((run_dir / "score" / "summary.json").read_text())


def loop_run(cfg, crawl_run: Path, shard_names, embedder) -> tuple[float, int]:
    """The stage's scoring loop (``score_shards``) on some shards, embedder included."""
    parts = WORK / "parts"
    shutil.rmtree(parts, ignore_errors=True)
    device = devices.pick_device(cfg.score.device)
    scorer = score_stage.Scorer(load_teacher(cfg.teacher, device), cfg.score, device, embedder)
    expected = score_stage.CrawledImages(read_manifest(crawl_run / "crawl" / "manifest.parquet", CRAWL,
                                                       columns=["uid", "status", "shard", "key"], arrow=True))
    t0 = time.perf_counter()
    images = score_stage.score_shards([crawl_run / "crawl" / "shards" / s for s in shard_names], expected, scorer,
                                      parts, show_progress=False)
    return time.perf_counter() - t0, images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--embedder-shards", type=int, default=1, help="shards scored with the embedder (default 1)")
    args = parser.parse_args()

    demo = load_config(args.config)
    run_stages(demo, STAGES, only=["crawl"])  # the demo crawl, skipped when done
    crawl_run = Path(demo.run_dir)
    cfg = load_config(args.config, [f"run_dir={WORK / 'run'}"])
    device = devices.pick_device(cfg.score.device)
    teacher = load_teacher(cfg.teacher, device)
    bs = cfg.score.batch_size
    shards_dir = crawl_run / "crawl" / "shards"

    inputs = in_memory_inputs(shards_dir, [teacher.transform])
    n = len(inputs[0])
    bare, stage, loop = [], [], []
    loader_seconds = statistics.median(loader_only(cfg, shards_dir, [teacher.transform]) for _ in range(args.repeats))
    for i in range(args.repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                bare.append(bare_forward([lambda x: teacher.model(x)], inputs, bs, device))
            else:
                seconds, summary = stage_run(cfg, crawl_run)
                stage.append(seconds)
                loop.append(summary["score_seconds"])
    teacher_row = {
        "what": f"teacher {cfg.teacher.arch} ({teacher.channels}×{teacher.input_size}²)", "images": n,
        "loader_only_img_s": round(n / loader_seconds, 1),
        "bare_forward_img_s": round(n / statistics.median(bare), 1),
        "score_loop_img_s": round(n / statistics.median(loop), 1),
        "score_stage_img_s": round(n / statistics.median(stage), 1),
    }

    embedder = load_embedder("ViT-S-32", "random", teacher.class_names, cfg.teacher.prompt_template, device)
    shard_names = sorted(p.name for p in shards_dir.glob("*.tar"))[: args.embedder_shards]
    inputs = in_memory_inputs(shards_dir, [teacher.transform, embedder.transform], shard_names)
    n_emb = len(inputs[0])
    bare_e, loop_e = [], []
    for i in range(args.repeats):
        bare_e.append(bare_forward([lambda x: teacher.model(x), embedder.encoder], inputs, bs, device))
        seconds, images = loop_run(cfg, crawl_run, shard_names, embedder)
        assert images == n_emb
        loop_e.append(seconds)
    embedder_row = {"what": "teacher + open_clip ViT-S-32 (random weights, 224²)", "images": n_emb,
                    "loader_only_img_s": None,
                    "bare_forward_img_s": round(n_emb / statistics.median(bare_e), 1),
                    "score_loop_img_s": round(n_emb / statistics.median(loop_e), 1), "score_stage_img_s": None}

    rows = [teacher_row, embedder_row]
    for r in rows:
        r["loop_vs_bare"] = round(r["score_loop_img_s"] / r["bare_forward_img_s"], 3)
        r["stage_vs_bare"] = round(r["score_stage_img_s"] / r["bare_forward_img_s"], 3) if r["score_stage_img_s"] else None
    machine = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {device}, "
               f"batch {bs}, {cfg.score.num_workers} loader worker(s)")
    lines = ["# score stage vs bare forward pass", "", f"Machine: {machine}; median of {args.repeats} runs.", "",
             "| models | images | loader alone img/s | bare forward img/s | score loop img/s | loop/bare "
             "| whole stage img/s | stage/bare |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['images']:,} | {r['loader_only_img_s'] or '—'} | {r['bare_forward_img_s']} "
                     f"| {r['score_loop_img_s']} | "
                     f"{r['loop_vs_bare']} | {r['score_stage_img_s'] or '—'} | {r['stage_vs_bare'] or '—'} |")
    # on a CPU the loader and the model share the cores: with perfect sharing, images/s would be
    # 1 / (1/loader + 1/bare), i.e. a loop/bare ratio of loader / (loader + bare)
    ceiling = teacher_row["loader_only_img_s"] / (teacher_row["loader_only_img_s"] + teacher_row["bare_forward_img_s"])
    teacher_row["cpu_ceiling_ratio"] = round(ceiling, 3) if device.type == "cpu" else None
    lines += ["", "On a CPU the loader's worker processes and the forward pass share the same cores. With perfect "
              f"sharing the loop/bare ratio could reach loader / (loader + bare) = {ceiling:.3f} for the teacher "
              f"here; the stage reaches {teacher_row['loop_vs_bare'] / ceiling:.0%} of that. A GPU does not pay "
              "for the loader's cores."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "score.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "score.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
