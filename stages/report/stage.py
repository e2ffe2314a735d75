"""report: one page per run — what ran, what it kept, how the student learnt, how it scores.

Reads   every stage's completion record, and its declared outputs (manifests.artifacts): summaries,
        plots, training history, metrics; the resolved config
Writes  RUN/report/report.md     markdown, plots beside it in RUN/report/plots/
        RUN/report/report.html   the same page, self-contained (plots embedded): mail it, open it anywhere
        RUN/report/headline.json the numbers `webdistill run` prints last

The markdown is the single source: the HTML page is rendered from it (python-markdown) with every
image inlined as a data URI.
"""

import base64
import io
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from manifests import atomic_write_bytes
from manifests.artifacts import (
    CONFUSION,
    DISTILL_SUMMARY,
    FILTER_PLOTS,
    FILTER_SUMMARY,
    FILTER_SUMMARY_TEXT,
    HEADLINE,
    HISTORY,
    METRICS,
    PER_CLASS,
    PERTURB_SHARDS,
    PERTURB_SUMMARY,
    REPORT_HTML,
    REPORT_MD,
    SYNTHESIS_MANIFEST,
    SYNTHESIS_SHARDS,
    SYNTHESIS_SUMMARY,
    TEACHER_INFO,
)
from pipeline.config import dump_yaml
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from stages import STAGE_NAMES
from stages.common.images import image_key
from stages.common.plots import figure_png, pyplot

log = logging.getLogger("webdistill.report")

STAGE_ORDER = [name for name in STAGE_NAMES if name != "report"]
CSS = """body{font-family:system-ui,sans-serif;max-width:1050px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
pre{background:#f7f7f7;padding:.8em;white-space:pre-wrap;overflow-wrap:anywhere;font-size:.85em}
h1{border-bottom:2px solid #333}.warn{background:#fff4e5;border-left:4px solid #e69500;padding:.4em .8em}
table{display:block;overflow-x:auto;max-width:100%}"""

# a pool where one pseudo-class holds more than this share, or a class that keeps fewer images than
# FEW_KEPT, is worth a warning: the student will learn that class badly
DOMINANT_SHARE = 0.5
FEW_KEPT = 10


def _optional(run_dir: RunDir, artifact):
    """An upstream artifact, or None where that stage has not written it."""
    return run_dir.read(artifact) if run_dir.path(artifact).exists() else None


def _save(fig, path: Path) -> None:
    atomic_write_bytes(path, figure_png(fig, tight=False))  # the callers lay their figures out


def plot_training(history: pd.DataFrame, path: Path) -> None:
    """Loss terms, teacher agreement and learning rate per epoch."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    skip = {"epoch", "lr", "images", "seconds", "images_per_s", "agreement", "selected"}
    for name in [c for c in history.columns if c not in skip]:
        axes[0].plot(history["epoch"], history[name], label=name, marker=".")
    axes[0].set_title("loss terms (per sample)")
    axes[0].legend(fontsize=8)
    for name in ("agreement", "selected"):
        if name in history:
            axes[1].plot(history["epoch"], history[name], label=name, marker=".")
    axes[1].set_title("student = teacher on the transfer set; selected share")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=8)
    axes[2].plot(history["epoch"], history["lr"], marker=".")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    _save(fig, path)


def plot_perturbations(shard_dir: Path, path: Path, n: int = 8) -> bool:
    """The first ``n`` kept images of the first shard above their MixDistribution versions."""
    import webdataset as wds
    from PIL import Image

    shards = sorted(shard_dir.glob("*.tar"))
    pairs = []
    for sample in wds.WebDataset([str(s) for s in shards[:1]], shardshuffle=False, empty_check=False):
        mix = next((k for k in sample if k.startswith("mix")), None)
        original = image_key(sample)
        if mix and original:
            pairs.append([Image.open(io.BytesIO(sample[k])).convert("RGB") for k in (original, mix)])
        if len(pairs) == n:
            break
    if not pairs:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(2, len(pairs), figsize=(1.4 * len(pairs), 3))
    axes = np.asarray(axes).reshape(2, -1)
    for j, (original, mixed) in enumerate(pairs):
        for i, image in enumerate((original, mixed)):
            axes[i, j].imshow(image)
            axes[i, j].axis("off")
    axes[0, 0].set_title("kept", fontsize=8, loc="left")
    axes[1, 0].set_title("MixDistribution", fontsize=8, loc="left")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_synthesis(shard_dir: Path, class_names: list[str], path: Path, n: int = 16) -> bool:
    """The first ``n`` synthesised images, titled with their target class."""
    import json

    import webdataset as wds
    from PIL import Image

    shards = sorted(shard_dir.glob("*.tar"))
    samples = [s for _, s in zip(range(n), wds.WebDataset([str(s) for s in shards[:1]], shardshuffle=False,
                                                           empty_check=False))]
    if not samples:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(samples), figsize=(1.1 * len(samples), 1.4))
    for ax, sample in zip(np.atleast_1d(axes), samples):
        ax.imshow(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        ax.set_title(class_names[json.loads(sample["json"])["target"]], fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    return True


def synthesis_rows(manifest: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """Per target class: images synthesised toward it and the share the teacher labels as that class."""
    by_target = manifest.assign(agree=manifest["pseudo_label"] == manifest["target"]).groupby("target")["agree"]
    return pd.DataFrame({"class": [class_names[t] for t in by_target.groups], "images": by_target.size().to_numpy(),
                         "teacher agrees": [_pct(x) for x in by_target.mean()]})


def _table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".4g")


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.2f}%"


def headline(run_dir: RunDir) -> dict | None:
    """The numbers that sum a run up (None until evaluate has run)."""
    metrics = _optional(run_dir, METRICS)
    if metrics is None:
        return None
    distill = _optional(run_dir, DISTILL_SUMMARY) or {}
    return {"teacher_top1": metrics["teacher"]["top1"], "student_top1": metrics["student"]["top1"],
            "student_over_teacher": metrics["student_over_teacher"],
            "student_macro_recall": metrics["student"]["macro_recall"], "student_ece": metrics["student"]["ece"],
            "agreement": metrics["agreement"], "test_images": metrics["images"], "preset": distill.get("preset"),
            "student": distill.get("student")}


def headline_text(h: dict) -> str:
    return (f"student {h['student']} ({h['preset']}): top-1 {_pct(h['student_top1'])} vs teacher "
            f"{_pct(h['teacher_top1'])} ({100 * h['student_over_teacher']:.1f}% of it), macro recall "
            f"{_pct(h['student_macro_recall'])}, ECE {h['student_ece']:.3f}, on {h['test_images']:,} test images")


def _reasons(counts: dict | None) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in (counts or {}).items())


def _stage_rows(run_dir: RunDir) -> pd.DataFrame:
    """One row per stage: its counts, and what it failed on or dropped (by reason)."""
    rows = []
    filter_summary = _optional(run_dir, FILTER_SUMMARY) or {}
    for name in STAGE_ORDER:
        record = run_dir.record(name) or {}
        counts = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in record.get("counts", {}).items())
        failed = (record.get("details") or {}).get("failures_by_reason")
        if name == "filter":
            failed = filter_summary.get("dropped_by_reason")
        rows.append({"stage": name, "seconds": record.get("duration_s"), "counts": counts or "not run",
                     "failed or dropped, by reason": _reasons(failed) or "–", "finished": record.get("finished_at", "")})
    return pd.DataFrame(rows)


def _pseudo_classes(filter_summary: dict) -> tuple[dict, dict]:
    """Images per pseudo-class in the scored pool and in the kept set, as the filter's summary has them."""
    histogram = filter_summary.get("pseudo_class_histogram", {})
    return histogram.get("before", {}), histogram.get("after", {})


def class_coverage(filter_summary: dict, synthesised: dict | None = None) -> pd.DataFrame:
    """Per class: the pool's images the teacher gives that label (count, share) and how many the filter
    kept, a mark where it kept fewer than FEW_KEPT; with ``synthesised`` (class → images synthesised toward
    it), that count too."""
    before, after = _pseudo_classes(filter_summary)
    pool, kept = max(sum(before.values()), 1), max(sum(after.values()), 1)
    table = pd.DataFrame([{"class": name, "pool (pseudo-label)": n, "pool share": f"{100 * n / pool:.1f}%",
                           "kept": after.get(name, 0), "kept share": f"{100 * after.get(name, 0) / kept:.1f}%",
                           "note": "⚠ few" if after.get(name, 0) < FEW_KEPT else ""} for name, n in before.items()])
    if synthesised:
        table.insert(5, "synthesised", [synthesised.get(name, 0) for name in before])
    return table


def _synthesised(run_dir: RunDir) -> dict | None:
    """Images synthesised toward each class (by name), or None when synthesize wrote none."""
    summary = _optional(run_dir, SYNTHESIS_SUMMARY)
    if not summary or not summary["images"]:
        return None
    names = run_dir.read(TEACHER_INFO)["class_names"]
    return {names[int(c)]: n for c, n in summary["target_counts"].items()}


def warnings_of(filter_summary: dict | None) -> list[str]:
    """What in the filter's result makes a poor student likely: a pool one pseudo-class dominates,
    classes that keep (almost) no image."""
    if not filter_summary:
        return []
    before, after = _pseudo_classes(filter_summary)
    found = []
    pool = sum(before.values())
    if pool:
        name, n = max(before.items(), key=lambda item: item[1])
        if n / pool > DOMINANT_SHARE:
            found.append(f"the teacher calls {100 * n / pool:.0f}% of the scored pool {name!r}: the web pool is far "
                         "from the private data, or holds mostly one kind of image")
    few = {name: after.get(name, 0) for name in before if after.get(name, 0) < FEW_KEPT}
    if few:
        kept = ", ".join(f"{name}: {n}" for name, n in few.items())
        found.append(f"{len(few)} class(es) keep fewer than {FEW_KEPT} images ({kept}): the student will "
                     "hardly learn them; crawl more images of them, or relax the filter")
    return found


def build(cfg, run_dir: RunDir, out: Path) -> str:
    """The report's markdown; its plots are written under ``out/plots``."""
    h = headline(run_dir)
    if h is None:
        raise UserError(f"{run_dir.path(METRICS)} not found: run the evaluate stage first")
    plots = out / "plots"
    md = [f"# webdistill report — {cfg.run_dir}", "", f"**{headline_text(h)}**", "",
          "Accuracies are on the labelled test set of `evaluate.test_set`; the student never saw it.", ""]

    warnings = warnings_of(_optional(run_dir, FILTER_SUMMARY))
    for warning in warnings:
        log.warning("report: %s", warning)
    if warnings:
        md += ['<div class="warn" markdown="1">', "", "**Warnings**", "", *[f"- {w}" for w in warnings], "",
               "</div>", ""]
    md += ["## Stages", "", _table(_stage_rows(run_dir)), ""]

    if run_dir.path(FILTER_SUMMARY_TEXT).is_file():
        md += ["## Filter", "", "```", run_dir.read(FILTER_SUMMARY_TEXT).read_text().strip(), "```", ""]
        filter_summary = _optional(run_dir, FILTER_SUMMARY)
        if filter_summary:
            md += ["Class coverage: what the teacher calls each class in the scored pool, what the filter "
                   "kept of it (and what synthesize made toward it).", "",
                   _table(class_coverage(filter_summary, _synthesised(run_dir))), ""]
        for name in ("classes", "similarity", "confidence", "weights"):
            source = run_dir.path(FILTER_PLOTS) / f"{name}.png"
            if source.is_file():
                atomic_write_bytes(plots / f"filter_{name}.png", source.read_bytes())
                md += [f"![filter {name}](plots/filter_{name}.png)", ""]

    synthesis = _optional(run_dir, SYNTHESIS_SUMMARY)
    if synthesis and synthesis["images"]:
        names = run_dir.read(TEACHER_INFO)["class_names"]
        start = {"noise": "Gaussian noise (DeepInversion)", "kept": "the filter's kept web images (the hybrid)"}
        md += ["## Synthesize", "", f"{synthesis['images']:,} images optimised from {start[synthesis['start']]} "
               f"for {synthesis['steps']} steps per batch of {synthesis['batch_size']} toward {synthesis['targets']} "
               f"targets; the teacher labels {_pct(synthesis['target_hit_rate'])} of them as their target. "
               f"{synthesis['seconds_per_1000'] or '–'} s per 1,000 images.", "",
               _table(synthesis_rows(run_dir.read(SYNTHESIS_MANIFEST), names)), ""]
        if plot_synthesis(run_dir.path(SYNTHESIS_SHARDS), names, plots / "synthesis.png"):
            md += ["![synthesis](plots/synthesis.png)", ""]

    perturb = _optional(run_dir, PERTURB_SUMMARY)
    if perturb:
        md += ["## Perturb", "", f"{perturb['perturbed']:,} MixDistribution images of {perturb['kept']:,} kept "
               f"images (α = {perturb['alpha']}, partner {perturb['partner']}, mean λ "
               f"{perturb['lam_mean'] if perturb['lam_mean'] is None else round(perturb['lam_mean'], 3)}).", ""]
        if plot_perturbations(run_dir.path(PERTURB_SHARDS), plots / "perturbations.png"):
            md += ["![perturbations](plots/perturbations.png)", ""]

    summary = _optional(run_dir, DISTILL_SUMMARY)
    if summary and run_dir.path(HISTORY).is_file():
        history = pd.read_csv(run_dir.read(HISTORY))
        plot_training(history, plots / "training.png")
        md += ["## Distill", "", f"Student **{summary['student']}** ({summary['parameters']:,} trainable "
               f"parameters), preset **{summary['preset']}**: {summary['recipe']}. {summary['epochs']} epochs on "
               f"{summary['transfer_set']:,} images, batch {summary['batch_size_per_rank']} × {summary['world_size']} "
               f"rank(s) on {summary['device']}, teacher logits {summary['teacher_logits']}; median "
               f"{summary['images_per_s']} images/s.", "", "![training](plots/training.png)", "",
               _table(history.drop(columns=["images"]).round(4)), ""]

    metrics = run_dir.read(METRICS)
    both = pd.DataFrame([{"model": name, "top-1": _pct(metrics[name]["top1"]),
                          "macro recall": _pct(metrics[name]["macro_recall"]), "ECE": round(metrics[name]["ece"], 4)}
                         for name in ("teacher", "student")])
    per_class = pd.read_csv(run_dir.read(PER_CLASS))
    atomic_write_bytes(plots / "evaluate_confusion.png", run_dir.read(CONFUSION).read_bytes())
    md += ["## Evaluate", "", f"{metrics['images']:,} test images from `{metrics['test_set']}`; the student agrees "
           f"with the teacher on {_pct(metrics['agreement'])} of them.", "", _table(both), "",
           _table(per_class.round(4)), "", "![confusion](plots/evaluate_confusion.png)", ""]

    md += ["## Configuration", "", "<details><summary>resolved config.yaml</summary>", "", "```yaml",
           dump_yaml(cfg).strip(), "```", "", "</details>", ""]
    return "\n".join(md)


def to_html(markdown_text: str, folder: Path, title: str) -> str:
    """A self-contained HTML page of the report: images inlined as data URIs."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code", "md_in_html"])

    def inline(match):
        data = base64.b64encode((folder / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


def run(cfg, run_dir: RunDir) -> dict:
    t0 = time.time()
    out = run_dir.stage_dir("report")
    text = build(cfg, run_dir, out)
    run_dir.write(REPORT_MD, text.encode())
    run_dir.write(REPORT_HTML, to_html(text, out, f"webdistill report — {cfg.run_dir}").encode())
    h = headline(run_dir)
    run_dir.write(HEADLINE, {**h, "text": headline_text(h)})  # `webdistill run` prints the text last
    return {"student_top1": round(h["student_top1"], 4), "teacher_top1": round(h["teacher_top1"], 4),
            "timings": {"total_s": round(time.time() - t0, 2)}}
