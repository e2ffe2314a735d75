"""Benchmark: distill's training throughput against an in-memory loop.

The same student, teacher, recipe and training step (``Trainer.epoch``), fed (a) by the stage's
WebDataset loader streaming perturb's shards (decoding in DataLoader workers), and (b) by
batches sliced from tensors decoded into memory beforehand. Both run ``--epochs`` epochs in
alternation; the ratio of their median images/s says whether the data path is the bottleneck
(goal ≥ 0.8). Student accuracy per method is ``webdistill bench`` (bench/methods.py).

    python bench/bench_distill.py [--config configs/demo.yaml] [--throughput-epochs 4]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.methods import machine  # noqa: E402
from pipeline import devices  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.runner import run_stages  # noqa: E402
from stages import STAGES  # noqa: E402
from stages.common.teacher import load_teacher  # noqa: E402
from stages.distill.data import decode  # noqa: E402
from stages.distill.methods import configure, resolve  # noqa: E402
from stages.distill.stage import Trainer, build_model, lr_factor, sample_weights, transfer_set  # noqa: E402

WORK = Path("bench/work/distill")
RESULTS = Path("bench/results")
UPSTREAM = ("crawl", "score", "filter", "synthesize", "perturb")


def in_memory(data, transform, with_mix: bool) -> dict:
    """Every transfer-set sample decoded once: the reference loop's tensors."""
    import webdataset as wds

    samples = [decode(s, transform, data.rows, with_mix) for s in
               wds.WebDataset(sorted(data.counts), shardshuffle=False)]
    out = {"row": torch.tensor([s["row"] for s in samples]), "image": torch.stack([s["image"] for s in samples])}
    if with_mix:
        out["mix"] = torch.stack([s["mix"] for s in samples])
    return out


def memory_batches(tensors: dict, batch_size: int, epoch: int):
    order = torch.randperm(len(tensors["row"]), generator=torch.Generator().manual_seed(epoch))
    for i in range(0, len(order), batch_size):
        yield {k: v[order[i:i + batch_size]] for k, v in tensors.items()}


def throughput(cfg, run: RunDir, epochs: int) -> dict:
    settings, recipe = cfg.distill, configure(resolve(cfg.distill), cfg.teacher)  # as the stage resolves it
    device = devices.pick_device(settings.device)
    teacher = load_teacher(cfg.teacher, device)
    data, kept, logits, _ = transfer_set(run, settings.split, with_features=False)
    model = build_model(settings, recipe, teacher, None).to(device)
    trainer = Trainer(settings, recipe, teacher, model, sample_weights(recipe, kept, logits), logits, None, None,
                      device)
    with_mix = recipe.perturbation == "offline"
    tensors = in_memory(data, teacher.transform, with_mix)
    loader = data.loader(teacher.transform, 0, 0, 0, 1, settings.batch_size, settings.num_workers,
                         settings.shuffle_buffer, with_mix, settings.cache_mb)
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: lr_factor(s, 10 ** 9, 0, "constant", []))
    stage, memory = [], []
    for epoch in range(epochs):
        steps = data.steps(epoch, 0, 1, settings.num_workers, settings.batch_size)
        stage.append(trainer.epoch(loader, steps, epoch, epochs, scheduler, 0)["images_per_s"])
        memory.append(trainer.epoch(memory_batches(tensors, settings.batch_size, epoch), steps, epoch, epochs,
                                    scheduler, 0)["images_per_s"])
        print(f"  epoch {epoch + 1}: stage {stage[-1]:.0f} img/s, in-memory {memory[-1]:.0f} img/s", flush=True)
    # the first epoch of each warms caches and starts workers: the median of the rest
    s, m = statistics.median(stage[1:] or stage), statistics.median(memory[1:] or memory)
    return {"preset": settings.preset, "student": settings.student, "batch_size": settings.batch_size,
            "num_workers": settings.num_workers, "teacher_logits": "online" if trainer.online else "cached",
            "stage_images_per_s": round(s, 1), "in_memory_images_per_s": round(m, 1), "ratio": round(s / m, 3),
            "epochs": epochs}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--throughput-epochs", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config(args.config)
    demo = RunDir(cfg.run_dir)
    run_stages(cfg, STAGES, only=list(UPSTREAM))  # the demo's upstream stages (skipped when done)

    print("throughput: distill's loader vs tensors in memory, same training step", flush=True)
    rows = [throughput(load_config(args.config, [f"distill.preset={p}"]), demo, args.throughput_epochs)
            for p in ("kd", "kd3")]
    lines = ["# distill throughput", "", f"Machine: {machine()}. Demo: {cfg.distill.student}, batch "
             f"{cfg.distill.batch_size}.", "", "## Images/s: the stage's loader vs tensors in memory", "",
             pd.DataFrame(rows).to_markdown(index=False), ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_throughput.md").write_text("\n".join(lines))
    (RESULTS / "distill_throughput.json").write_text(json.dumps({"throughput": rows}, indent=2, default=float))
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'distill_throughput.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
