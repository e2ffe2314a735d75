"""evaluate: the student and the teacher, side by side, on a labelled test set.

Reads   manifests.artifacts STUDENT (distill/student.pt); the teacher (cfg.teacher); the test set cfg.evaluate.test_set:
        WebDataset shards whose samples carry an image and a ``.cls`` label, or a folder with one
        subfolder per class (named as the teacher's class names, or sorted in class order)
Writes  RUN/evaluate/metrics.json       top-1, macro recall, ECE, teacher–student agreement, both models;
                                        top-1 on cfg.evaluate.val_set when set (for choosing settings)
        RUN/evaluate/per_class.csv      recall of each class, both models
        RUN/evaluate/predictions.parquet  label and both predictions per test image
        RUN/evaluate/confusion.png      confusion matrices of teacher and student

The test set is the user's labelled data (in the demo: the private test split, which neither the
filter nor the student ever sees). Both models see it through the teacher's input transform.
"""

import io
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import webdataset as wds
from PIL import Image

from manifests import atomic_write_bytes, expand_shards
from manifests.artifacts import CONFUSION, METRICS, PER_CLASS, STUDENT
from pipeline import devices
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from stages.common.images import IMAGE_SUFFIXES, image_key
from stages.common.plots import figure_png, pyplot
from stages.common.progress import progress
from stages.common.student import load_student
from stages.common.teacher import check_teacher, load_teacher

log = logging.getLogger("webdistill.evaluate")



# ---------------------------------------------------------------- metrics (plain arrays)

def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE: Σ_b (n_b/N)·|accuracy_b − confidence_b| over equal-width confidence bins."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs((predicted[in_bin] == labels[in_bin]).mean() - confidence[in_bin].mean())
    return float(ece)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, n_classes: int, bins: int) -> dict:
    """Top-1, per-class recall (NaN for a class absent from the test set), macro recall, ECE."""
    probs = torch.from_numpy(logits).float().softmax(1).numpy()
    predicted = probs.argmax(1)
    recall = np.array([(predicted[labels == c] == c).mean() if (labels == c).any() else np.nan
                       for c in range(n_classes)])
    return {"top1": float((predicted == labels).mean()), "macro_recall": float(np.nanmean(recall)),
            "ece": expected_calibration_error(probs, labels, bins), "per_class_recall": recall.tolist(),
            "confusion": confusion_matrix(labels, predicted, n_classes).tolist()}


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


# ---------------------------------------------------------------- the test set

def _test_shards(spec: str) -> list[Path] | None:
    """The test set's WebDataset shards, or None when it is a folder per class."""
    path = Path(spec)
    if path.is_dir() and not any(path.glob("*.tar")):
        return None
    return expand_shards(str(path / "*.tar") if path.is_dir() else spec, "evaluate.test_set")


def test_images(spec: str, class_names: list[str]):
    """(key, PIL image, label) of every test image: shards with .cls, or a folder per class."""
    shards = _test_shards(spec)
    if shards is None:
        yield from _folder_images(Path(spec), class_names)
        return
    for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False):
        ext = image_key(sample)
        if ext is None or "cls" not in sample:
            raise UserError(f"evaluate.test_set: sample {sample['__key__']} of {sample['__url__']} needs an image "
                            f"and a .cls label (it has {sorted(k for k in sample if not k.startswith('__'))})")
        yield sample["__key__"], Image.open(io.BytesIO(sample[ext])), int(sample["cls"])


def _folder_images(root: Path, class_names: list[str]):
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    names = [f.name for f in folders]
    if set(names) <= set(class_names):
        index = {n: class_names.index(n) for n in names}
    elif len(names) == len(class_names):
        log.warning("evaluate: class folders %s are not the teacher's class names; taken in sorted order", names)
        index = {n: i for i, n in enumerate(names)}
    else:
        raise UserError(f"evaluate.test_set {root}: its {len(names)} class folders match neither the teacher's "
                        f"{len(class_names)} class names nor their number")
    for folder in folders:
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                yield str(file.relative_to(root)), Image.open(file), index[folder.name]


def predict(models: dict, images, transform, batch_size: int, device: torch.device) -> tuple[list, np.ndarray, dict]:
    """(keys, labels, {model name: logits}) over the test images, batch by batch."""
    keys, labels, logits = [], [], {name: [] for name in models}

    def flush(batch):
        x = torch.stack(batch).to(device)
        with torch.no_grad():
            for name, model in models.items():
                logits[name].append(model(x)[0].float().cpu().numpy())

    batch = []
    for key, image, label in progress(images, desc="evaluate", unit="img"):
        keys.append(key)
        labels.append(label)
        batch.append(transform(image))
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if not keys:
        raise UserError("evaluate.test_set holds no image")
    return keys, np.array(labels), {name: np.concatenate(v) for name, v in logits.items()}


# ---------------------------------------------------------------- plots and the stage

def plot_confusion(matrices: dict[str, np.ndarray], class_names: list[str], top1: dict[str, float]) -> bytes:
    fig, axes = pyplot().subplots(1, len(matrices), figsize=(5.2 * len(matrices), 4.6))
    for ax, (name, m) in zip(np.atleast_1d(axes), matrices.items()):
        rates = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{name}: top-1 {100 * top1[name]:.1f}%")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=90, fontsize=7)
        ax.set_yticks(ticks, class_names, fontsize=7)
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                if m[i, j]:
                    ax.text(j, i, m[i, j], ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    return figure_png(fig, dpi=110)


def _test_set(settings) -> str:
    if not settings.test_set:
        raise UserError("evaluate.test_set is not set: name labelled test shards (with .cls) or a folder per class")
    return settings.test_set


def test_labels(spec: str, class_names: list[str]) -> np.ndarray:
    """The labels of the test set (images not decoded), checked against the teacher's classes."""
    shards = _test_shards(spec)
    if shards is None:
        labels = [label for _, _, label in _folder_images(Path(spec), class_names)]
    else:
        labels = [int(s["cls"]) for s in wds.WebDataset([str(s) for s in shards], shardshuffle=False,
                                                          empty_check=False).select(lambda s: "cls" in s)]
    if not labels:
        raise UserError(f"evaluate.test_set {spec} holds no labelled image")
    return check_labels(np.asarray(labels), spec, len(class_names))


def check_labels(labels: np.ndarray, spec: str, classes: int) -> np.ndarray:
    if labels.max() >= classes or labels.min() < 0:
        raise UserError(f"evaluate.test_set {spec}: labels run from {labels.min()} to {labels.max()}, but the "
                        f"teacher has {classes} classes")
    return labels


def preflight(cfg) -> None:
    """The test set (and the validation set, if any) exists and its classes are the teacher's."""
    names = check_teacher(cfg.teacher).class_names
    test_labels(_test_set(cfg.evaluate), names)
    if cfg.evaluate.val_set:
        test_labels(cfg.evaluate.val_set, names)


def labelled_predictions(models: dict, spec: str, teacher, batch_size: int, device: torch.device):
    """(keys, labels, {model name: logits}) on the labelled images of ``spec``, labels checked."""
    keys, labels, logits = predict(models, test_images(spec, teacher.class_names), teacher.transform, batch_size,
                                   device)
    return keys, check_labels(labels, spec, len(teacher.class_names)), logits


def validation(models: dict, spec: str, teacher, batch_size: int, device: torch.device) -> dict:
    """Top-1 of each model on the validation set."""
    _, labels, logits = labelled_predictions(models, spec, teacher, batch_size, device)
    return {"val_set": spec, "images": len(labels),
            **{f"{name}_top1": float((v.argmax(1) == labels).mean()) for name, v in logits.items()}}


def run(cfg, run_dir: RunDir) -> dict:
    settings, out = cfg.evaluate, run_dir.stage_dir("evaluate")
    _test_set(settings)
    t0 = time.time()
    device = devices.pick_device(settings.device)
    teacher = load_teacher(cfg.teacher, device)
    student, _ = load_student(run_dir.read(STUDENT), device)
    names = teacher.class_names
    models = {"teacher": teacher.model, "student": student}
    keys, labels, logits = labelled_predictions(models, settings.test_set, teacher, settings.batch_size, device)
    val = validation(models, settings.val_set, teacher, settings.batch_size, device) if settings.val_set else None
    metrics = {name: classification_metrics(v, labels, len(names), settings.ece_bins) for name, v in logits.items()}
    agreement = float((logits["teacher"].argmax(1) == logits["student"].argmax(1)).mean())
    result = {"test_set": settings.test_set, "images": len(labels), "class_names": names, **metrics,
              "agreement": agreement,
              "student_over_teacher": metrics["student"]["top1"] / max(metrics["teacher"]["top1"], 1e-9),
              "validation": val}
    per_class = pd.DataFrame({"class": names, "test_images": np.bincount(labels, minlength=len(names)),
                              "teacher_recall": metrics["teacher"]["per_class_recall"],
                              "student_recall": metrics["student"]["per_class_recall"]})
    run_dir.write(PER_CLASS, per_class.to_csv(index=False).encode())
    predictions = pd.DataFrame({"key": keys, "label": labels, "teacher": logits["teacher"].argmax(1),
                                "student": logits["student"].argmax(1)})
    buffer = io.BytesIO()
    predictions.to_parquet(buffer, index=False)
    atomic_write_bytes(out / "predictions.parquet", buffer.getvalue())
    run_dir.write(CONFUSION, plot_confusion(
        {n: np.array(metrics[n]["confusion"]) for n in ("teacher", "student")}, names,
        {n: metrics[n]["top1"] for n in ("teacher", "student")}))
    run_dir.write(METRICS, result)
    log.info("evaluate: %d test images — teacher top-1 %.2f%%, student top-1 %.2f%% (macro recall %.2f%%, ECE "
             "%.3f), agreement %.2f%%", len(labels), 100 * metrics["teacher"]["top1"],
             100 * metrics["student"]["top1"], 100 * metrics["student"]["macro_recall"], metrics["student"]["ece"],
             100 * agreement)
    return {"test_images": len(labels), "teacher_top1": round(metrics["teacher"]["top1"], 4),
            "student_top1": round(metrics["student"]["top1"], 4),
            "student_macro_recall": round(metrics["student"]["macro_recall"], 4),
            "student_ece": round(metrics["student"]["ece"], 4),
            **({"student_val_top1": round(val["student_top1"], 4)} if val else {}),
            "timings": {"total_s": round(time.time() - t0, 2)}}
