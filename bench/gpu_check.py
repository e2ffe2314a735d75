"""`make gpu-check`: what the pipeline does on a GPU, measured by one script (sized for ≤ 8 minutes on one
GPU; not yet run on one).

1. score: a ResNet-50 teacher (timm, random weights, 224 px) and an open_clip ViT-B-32 embedder
   (random weights) at batch 256 under autocast, over a generated pool of 20,000 images (bench_scale's
   crawl-shaped pool: no URL is fetched): the score stage end to end (decode, both models, manifests)
   against the two models' bare forward pass over images already in memory. Anchor: clip-retrieval
   reports ~1,500 images/s end to end on an RTX 3080 (its ViT-B-32 alone).
2. filter: the whole filter stage on 10M synthetic 512-d vectors (bench_filter's pool), with faiss-gpu
   when it is installed (`make setup GPU=1`).
3. distill: the student's step rate with AMP (ResNet-18 from timm, batch 256), fed by the stage's loader
   against tensors in memory (bench_distill's comparison), on the pool of 1 filtered and perturbed.
4. torchrun: the distill stage on 2 GPUs (DistributedDataParallel, NCCL) against 1, where there are 2.

Without CUDA (or with --reduced) every part runs on a few images and 20,000 vectors: `make test` runs
that mode, so the script cannot rot; its figures say only that it ran.

    python bench/gpu_check.py [--reduced] [--work bench/work/gpu] [--results bench/results]

Writes RESULTS/gpu.{md,json}.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import bench_filter, bench_scale  # noqa: E402
from bench.bench_distill import throughput  # noqa: E402
from bench.bench_score import bare_forward, in_memory_inputs  # noqa: E402
from bench.methods import machine  # noqa: E402
from pipeline import devices  # noqa: E402
from pipeline.config import dump_yaml, load_config  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.runner import run_stages  # noqa: E402
from stages.common.teacher import load_embedder, load_teacher  # noqa: E402
from stages.filter import knn  # noqa: E402

FULL = {"pool": 20000, "side": 224, "bare_images": 5000, "score_batch": 256, "vectors": 10_000_000,
        "distill_batch": 256, "distill_epochs": 3}
# the same parts on a few images at 64 px (the embedder keeps its 224) and 20,000 vectors: ~30 s on 2 cores
REDUCED = {"pool": 24, "side": 64, "bare_images": 8, "score_batch": 8, "vectors": 20000, "distill_batch": 4,
           "distill_epochs": 1}
CLASSES = [f"class{i}" for i in range(10)]


def check_config(work: Path, size: dict, reduced: bool):
    """The pipeline's default recipe with a ResNet-50 teacher and a ViT-B-32 embedder (both random)."""
    checkpoint = work / "resnet50.pt"
    if not checkpoint.is_file():
        import timm

        torch.manual_seed(0)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(timm.create_model("resnet50", num_classes=len(CLASSES)).state_dict(), checkpoint)
    workers = 0 if reduced else min(8, os.cpu_count() or 1)
    return load_config(None, [
        f"run_dir={work / 'run'}", "teacher.format=timm", "teacher.arch=resnet50", f"teacher.checkpoint={checkpoint}",
        f"teacher.class_names={CLASSES}", f"teacher.input_size={size['side']}", "teacher.channels=3",
        "score.embedder_model=ViT-B-32", "score.embedder_checkpoint=random", f"score.batch_size={size['score_batch']}",
        f"score.num_workers={workers}", f"crawl.processes_count={max(1, workers)}", "synthesize.start=none",
        "distill.student=resnet18", "distill.student_library=timm", f"distill.batch_size={size['distill_batch']}",
        f"distill.epochs={size['distill_epochs']}", f"distill.num_workers={workers}",
        "distill.split=sample"])  # every torchrun rank a share of every shard, however few the shards


def score_check(cfg, size: dict) -> dict:
    run_stages(cfg, bench_scale.SPECS, only=["crawl"], force=True)
    device = devices.pick_device(cfg.score.device)
    teacher = load_teacher(cfg.teacher, device)
    embedder = load_embedder("ViT-B-32", "random", teacher.class_names, cfg.teacher.prompt_template, device)
    inputs = in_memory_inputs(RunDir(cfg.run_dir).stage_dir("crawl") / "shards",
                              [teacher.transform, embedder.transform], limit=size["bare_images"])
    models, precision = [teacher.model, embedder.encoder], cfg.score.precision
    bare_forward(models, inputs, cfg.score.batch_size, device, precision)  # warm-up: cuDNN picks its kernels
    bare = len(inputs[0]) / bare_forward(models, inputs, cfg.score.batch_size, device, precision)
    del teacher, embedder
    run_stages(cfg, bench_scale.SPECS, only=["score"], force=True)
    stage = RunDir(cfg.run_dir).record("score")["counts"]["images_per_s"]
    return {"images": size["pool"], "side": size["side"], "batch": cfg.score.batch_size, "device": str(device),
            "precision": autocast_name(device, cfg.score.precision),
            "stage_img_s": stage, "bare_forward_img_s": round(bare, 1), "stage_vs_bare": round(stage / bare, 3)}


def filter_check(work: Path, size: dict) -> dict:
    run = bench_filter.synthetic_pool(size["vectors"], work / "filter")
    result = bench_filter.in_subprocess("filter", run)
    return {"vectors": size["vectors"], "backend": knn.backend(), "seconds": round(result["seconds"], 1),
            "peak_mb": round(result["peak_mb"]), "kept": result["kept"], "density_index": result["density_index"]}


def autocast_name(device, precision: str) -> str:
    """What ``devices.autocast`` runs with: bf16 or fp16 under autocast, else fp32."""
    context = devices.autocast(device, precision)
    return str(context.fast_dtype).removeprefix("torch.") if isinstance(context, torch.autocast) else "fp32"


def distill_check(cfg) -> dict:
    run_stages(cfg, bench_scale.SPECS, only=["filter", "synthesize", "perturb"])
    row = throughput(cfg, RunDir(cfg.run_dir), cfg.distill.epochs)
    device = devices.pick_device(cfg.distill.device)
    return {**row, "precision": autocast_name(device, cfg.distill.precision), "device": str(device)}


def distill_stage_img_s(cfg, work: Path, processes: int) -> float:
    """The distill stage from scratch under torchrun with ``processes`` ranks; its images/s. Each rank runs
    this script's --distill-stage, which passes bench_scale's stages (the generated pool as the crawl)."""
    config = work / f"distill-{processes}.yaml"
    config.write_text(dump_yaml(cfg))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), __file__,
                    "--distill-stage", str(config)], cwd=ROOT, check=True)
    return RunDir(cfg.run_dir).record("distill")["counts"]["images_per_s"]


def torchrun_check(cfg, work: Path) -> dict:
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return {"skipped": f"{gpus} GPU(s): DistributedDataParallel over 2 needs 2"}
    one, two = (distill_stage_img_s(cfg, work, p) for p in (1, 2))
    return {"gpus": 2, "one_gpu_img_s": one, "two_gpus_img_s": two, "scaling": round(two / one, 2)}


def report(results: dict) -> list[str]:
    s, f, d, t = (results[k] for k in ("score", "filter", "distill", "torchrun"))
    density = knn.describe(f["density_index"])
    lines = [
        "# GPU check", "", f"Machine: {results['machine']}. Mode: {results['mode']}. "
        f"`python bench/gpu_check.py` ({results['seconds']:.0f} s).", "",
        "| part | measured | reference | ratio |", "|---|---|---|---|",
        f"| score: ResNet-50 teacher ({s['side']} px) + ViT-B-32 embedder, batch {s['batch']}, {s['precision']}, "
        f"{s['images']:,} generated images on {s['device']} | {s['stage_img_s']:,} images/s, the whole stage | "
        "bare forward over tensors in "
        f"memory: {s['bare_forward_img_s']:,} images/s (clip-retrieval: ~1,500 end to end, RTX 3080) | "
        f"{s['stage_vs_bare']} |",
        f"| filter: whole stage on {f['vectors']:,} synthetic 512-d vectors ({f['backend']}; density index "
        f"{density}) | {f['seconds']} s, peak "
        f"{f['peak_mb']:,} MB, kept {f['kept']:,} | — | — |",
        f"| distill: {d['student']} student, batch {d['batch_size']}, precision {d['precision']}, {d['device']} | "
        f"{d['stage_images_per_s']:,} images/s through the stage's loader | tensors in memory: "
        f"{d['in_memory_images_per_s']:,} images/s | {d['ratio']} |",
    ]
    if "skipped" in t:
        lines.append(f"| torchrun: distill on 2 GPUs | skipped: {t['skipped']} | — | — |")
    else:
        lines.append(f"| torchrun: distill stage on 2 GPUs (DDP) | {t['two_gpus_img_s']:,} images/s | 1 GPU: "
                     f"{t['one_gpu_img_s']:,} images/s | {t['scaling']} |")
    if results["mode"].startswith("reduced"):
        lines += ["", "Reduced mode (the default without CUDA): a few images at 64 px and 20,000 vectors, so the "
                  "figures say only that every part ran; `make gpu-check` on a GPU machine measures them."]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="a few images and vectors (the default without CUDA)")
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "gpu"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--distill-stage", help=argparse.SUPPRESS)  # one torchrun rank of torchrun_check
    args = parser.parse_args(argv)
    if args.distill_stage:
        run_stages(load_config(args.distill_stage), bench_scale.SPECS, only=["distill"], force=True)
        return
    reduced = args.reduced or not torch.cuda.is_available()
    size, work, t0 = (REDUCED if reduced else FULL), Path(args.work), time.time()
    os.environ["WEBDISTILL_SCALE_POOL"] = str(size["pool"])  # bench_scale's generated crawl, read by the runner
    cfg = check_config(work, size, reduced)
    results = {"machine": machine(), "mode": "reduced" if reduced else "full",
               "score": score_check(cfg, size), "filter": filter_check(work, size), "distill": distill_check(cfg),
               "torchrun": torchrun_check(cfg, work)}
    results["seconds"] = round(time.time() - t0, 1)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    lines = report(results)
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    (out / "gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
