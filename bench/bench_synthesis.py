"""Benchmark: how many optimisation steps the hybrid (kept web images refined) needs to reach the quality
DeepInversion reaches from noise, and what synthesis costs.

On a run whose filter is done, one batch of ``--images`` images is optimised from Gaussian noise toward
class-balanced targets (DeepInversion, ``--noise-steps`` steps), and one batch of the filter's kept web images
toward the synthesize stage's balanced targets (the hybrid, ``--kept-steps`` steps), with the synthesize
stage's settings. After chosen step counts the images the stage would store (the best step so far, as 8-bit
pixels) are measured:

- ``bn``: DeepInversion's BatchNorm-statistics loss of the batch (no jitter): how far the teacher's layers
  see it from their private statistics (lower: closer);
- ``agree``: the share the teacher labels as their target; ``p_target``: the mean probability of it.

Steps-to-quality: the fewest hybrid steps whose ``bn`` is at most noise's at its last step while ``agree`` is
at least noise's. Reported with the seconds per step per 1,000 images.

    python bench/bench_synthesis.py [--config configs/demo.yaml] [--name digits] [--set synthesize.bn_weight=1]

Writes (replacing the scenario's rows) bench/results/synthesis_steps.{csv,md} and synthesis_steps_<name>.png.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.methods import machine  # noqa: E402
from manifests import atomic_write_bytes  # noqa: E402
from manifests.artifacts import CRAWL_FOLDER  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.runner import run_stages  # noqa: E402
from stages import STAGES  # noqa: E402
from stages.common.batchnorm import BatchNormStatistics  # noqa: E402
from stages.common.plots import figure_png, pyplot  # noqa: E402
from stages.common.teacher import load_teacher  # noqa: E402
from stages.synthesize.inversion import balanced_targets, invert, pixel_bounds, to_pixels  # noqa: E402
from stages.synthesize.stage import inversion_settings, kept_images, plan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NOISE_CHECKPOINTS = (0, 10, 25, 50, 100, 200, 400, 800, 1200, 2000)
KEPT_CHECKPOINTS = (0, 5, 10, 20, 50, 100, 200, 400)


def quality(teacher, x: torch.Tensor, targets: torch.Tensor, spec: dict) -> dict:
    """The measures of a batch as the stage stores it (8-bit pixels, decoded and normalised again)."""
    pixels = to_pixels(x, spec["mean"], spec["std"]).permute(0, 3, 1, 2).float() / 255
    stored = (pixels - torch.tensor(spec["mean"]).view(1, -1, 1, 1)) / torch.tensor(spec["std"]).view(1, -1, 1, 1)
    with torch.no_grad(), BatchNormStatistics(teacher.model) as stats:
        logits, _ = teacher.model(stored)
        bn = stats.loss().item()
    probability = torch.softmax(logits, 1)
    return {"bn": bn, "agree": (logits.argmax(1) == targets).float().mean().item(),
            "p_target": probability[torch.arange(len(targets)), targets].mean().item()}


def curve(teacher, start: torch.Tensor, targets: torch.Tensor, settings, steps: int, checkpoints) -> pd.DataFrame:
    """The measures after each of ``checkpoints`` steps of one optimisation run, and its seconds per step."""
    spec = teacher.transform.spec
    snapshots = {0: start.clone()} if 0 in checkpoints else {}

    def keep(done, best):
        if done in checkpoints:
            snapshots[done] = best.clone()

    t0 = time.time()
    invert(teacher.model, start, targets, dataclasses.replace(settings, steps=steps),
           pixel_bounds(spec["mean"], spec["std"]), torch.Generator().manual_seed(0), after_step=keep)
    per_step = (time.time() - t0) / max(steps, 1)
    rows = [{"steps": s, **quality(teacher, snapshots[s], targets, spec)} for s in sorted(snapshots)]
    return pd.DataFrame(rows).assign(s_per_step_per_1000=per_step * 1000 / len(start))


def steps_to_quality(noise: pd.DataFrame, kept: pd.DataFrame) -> int | None:
    goal = noise.iloc[-1]
    reached = kept[(kept["bn"] <= goal["bn"]) & (kept["agree"] >= goal["agree"])]
    return int(reached["steps"].min()) if len(reached) else None


def plot(table: pd.DataFrame, name: str) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for start, part in table.groupby("start"):
        part = part[part["steps"] > 0]
        axes[0].plot(part["steps"], part["bn"], marker=".", label=start)
        axes[1].plot(part["steps"], part["agree"], marker=".", label=start)
    axes[0].set(xscale="log", yscale="log", xlabel="steps", title=f"{name}: BatchNorm-statistics loss (lower: closer)")
    axes[1].set(xscale="log", xlabel="steps", ylim=(0, 1.02), title="teacher labels it as its target")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    return figure_png(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--name", default="digits", help="scenario name in the result tables")
    parser.add_argument("--images", type=int, default=128, help="images per batch (one batch per start)")
    parser.add_argument("--noise-steps", type=int, default=2000)
    parser.add_argument("--kept-steps", type=int, default=400)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (e.g. synthesize.bn_weight=0.1); name such a run with --name")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config, [*args.set, "synthesize.start=kept", f"synthesize.images={args.images}"])
    run_stages(cfg, STAGES, only=["crawl", "score", "filter"])  # skipped when done
    run, teacher = RunDir(cfg.run_dir), load_teacher(cfg.teacher)
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    settings = inversion_settings(cfg.synthesize)

    rows = plan(cfg.synthesize, run, teacher.num_classes)  # kept images and their balanced targets
    kept_start = kept_images(run.path(CRAWL_FOLDER), rows, teacher.transform)
    kept_targets = torch.as_tensor(rows["target"].to_numpy(), dtype=torch.long)
    shape = (args.images, teacher.channels, teacher.input_size, teacher.input_size)
    noise_start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    noise_targets = balanced_targets(args.images, teacher.num_classes)

    print(f"{args.name}: {args.images} images from noise, {args.noise_steps} steps", flush=True)
    noise = curve(teacher, noise_start, noise_targets, settings, args.noise_steps, NOISE_CHECKPOINTS)
    print(noise.to_string(index=False), flush=True)
    print(f"{args.name}: {args.images} kept images, {args.kept_steps} steps", flush=True)
    kept = curve(teacher, kept_start, kept_targets, settings, args.kept_steps, KEPT_CHECKPOINTS)
    print(kept.to_string(index=False), flush=True)

    table = pd.concat([noise.assign(start="noise"), kept.assign(start="kept")]).assign(scenario=args.name)
    table = table[["scenario", "start", "steps", "bn", "agree", "p_target", "s_per_step_per_1000"]]
    needed = steps_to_quality(noise, kept)
    csv = RESULTS / "synthesis_steps.csv"
    old = pd.read_csv(csv) if csv.is_file() else pd.DataFrame()
    if len(old):
        old = old[old["scenario"] != args.name]
    both = pd.concat([old, table], ignore_index=True)
    atomic_write_bytes(csv, both.to_csv(index=False, float_format="%.5g").encode())
    atomic_write_bytes(RESULTS / f"synthesis_steps_{args.name}.png", plot(table, args.name))

    summary_file = RESULTS / "synthesis_steps_summary.csv"
    summary = pd.read_csv(summary_file) if summary_file.is_file() else pd.DataFrame()
    if len(summary):
        summary = summary[summary["scenario"] != args.name]
    last = noise.iloc[-1]
    summary = pd.concat([summary, pd.DataFrame([{
        "scenario": args.name, "images": args.images, "noise_steps": args.noise_steps, "noise_bn": last["bn"],
        "noise_agree": last["agree"], "kept_bn_at_0": kept.iloc[0]["bn"], "kept_agree_at_0": kept.iloc[0]["agree"],
        "kept_steps_to_noise_quality": needed,
        # 0: the kept images already beat noise's last step before any optimisation
        "fewer_steps": None if needed is None else float("inf") if needed == 0 else round(args.noise_steps / needed, 1),
        "s_per_1000_images_per_step": round(float(noise["s_per_step_per_1000"].iloc[0]), 3)}])], ignore_index=True)
    atomic_write_bytes(summary_file, summary.to_csv(index=False, float_format="%.5g").encode())
    lines = ["# Synthesis: steps to quality, hybrid (kept web images) vs DeepInversion from noise", "",
             f"Machine: {machine()}. `python bench/bench_synthesis.py --config CONFIG --name NAME`: one batch per "
             "start, the synthesize stage's settings; measures of the stored 8-bit images (see the script's "
             "docstring).", "", "## Summary", "", summary.to_markdown(index=False, floatfmt=".4g"), "",
             "## Curves", "", both.to_markdown(index=False, floatfmt=".4g"), ""]
    atomic_write_bytes(RESULTS / "synthesis_steps.md", "\n".join(lines).encode())
    print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
