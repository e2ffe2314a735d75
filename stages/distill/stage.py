"""distill: train the student on the transfer set to match the teacher.

Reads   manifests.artifacts PERTURB_COUNTS, PERTURB_FOLDER   the transfer-set shards (kept images
                                                             and their perturbations)
        SELECTION_MANIFEST                                   the kept uids and their IPW weights
        LOGITS, FEATURES (by uid)                            cached teacher outputs (un-augmented
                                                             views, IE-KD's auto-encoder, KDDM)
        the teacher (cfg.teacher); cfg.distill
Writes  RUN/distill/student.pt          the trained student (``stages.common.student.load_student``)
        RUN/distill/history.csv         per epoch: every loss term, lr, selected share, teacher
                                        agreement, images/s
        RUN/distill/checkpoints/epoch_NNN.pt   after every epoch (the newest keep_checkpoints)
        RUN/distill/summary.json

One training step: a batch of kept images (augmented on the device, ``augment.py``), the teacher's
logits and features (online, or cached by score), the student's forward pass (on the batch and its
perturbed view when a loss needs one), the summed loss terms of every method of the recipe
(``methods/``, one file per method), one optimiser step. The run resumes from its newest
checkpoint after a kill and ends with the same weights as an uninterrupted run: every epoch's data
order, augmentation and mixing draw from (seed, epoch) alone. Under torchrun the student is
DistributedDataParallel and each rank reads its own shards.
"""

import io
import itertools
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from manifests import atomic_write_bytes
from manifests.artifacts import (
    CRAWL_MANIFEST,
    DISTILL_SUMMARY,
    FEATURES,
    HISTORY,
    LOGITS,
    PERTURB_COUNTS,
    PERTURB_FOLDER,
    PERTURB_INVENTORY,
    SELECTION_MANIFEST,
    STUDENT,
    SYNTHESIS_COUNTS,
    SYNTHESIS_FEATURES,
    SYNTHESIS_FOLDER,
    SYNTHESIS_INVENTORY,
    SYNTHESIS_LOGITS,
    SYNTHESIS_MANIFEST,
)
from pipeline import devices
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from stages.common.progress import progress
from stages.common.student import Student, save_student
from stages.common.teacher import Teacher, check_teacher, load_teacher
from stages.distill import methods
from stages.distill.augment import augment, augments, mixup
from stages.distill.config import DistillConfig
from stages.distill.data import TransferSet
from stages.distill.methods import SAMPLE_WEIGHTS, Recipe, Step, describe, kddm, pskd, resolve
from stages.distill.model import AutoEncoder, DistillModel, FeatureMapTap, train_autoencoder

log = logging.getLogger("webdistill.distill")


# ---------------------------------------------------------------- inputs

def _shards(run_dir: RunDir, folder, counts, inventory) -> dict[str, int]:
    """A stage's shards (absolute paths) with their sample counts, each checked to be as the stage wrote it
    (never a short epoch)."""
    counts = {s: n for s, n in run_dir.read(counts).items() if n > 0}
    run_dir.verified(inventory, counts)
    return {str(run_dir.path(folder) / s): n for s, n in counts.items()}


def transfer_set(run_dir: RunDir, split: str = "shard", which: str = "web", with_features: bool = True
                 ) -> tuple[TransferSet, pd.DataFrame, np.ndarray, np.ndarray | None]:
    """The shards the student learns from (``which``: web, synthetic or both), the samples' rows (uid,
    filter weight, pseudo-label, synthetic or not, the crawl's caption; web rows first, in selection order,
    then synthetic ones) and the teacher's cached logits and features of each row (joined on uid): row i of
    every per-sample array distill holds belongs to row i of the frame. The features are read only
    ``with_features`` (None otherwise)."""
    shards, parts, logits, features = {}, [], [], []
    if which in ("web", "both"):
        shards |= _shards(run_dir, PERTURB_FOLDER, PERTURB_COUNTS, PERTURB_INVENTORY)
        selection = run_dir.read(SELECTION_MANIFEST, columns=["uid", "keep", "weight", "pseudo_label"])
        kept = selection[selection["keep"]]
        parts.append(kept[["uid", "weight", "pseudo_label"]].assign(synthetic=False))
        logits.append(run_dir.rows(LOGITS, kept["uid"]))
        if with_features:
            features.append(run_dir.rows(FEATURES, kept["uid"]))
    if which in ("synthetic", "both"):
        synthetic = run_dir.read(SYNTHESIS_MANIFEST, columns=["uid", "pseudo_label"])
        if which == "synthetic" and synthetic.empty:
            raise UserError("distill.transfer_set synthetic: the synthesize stage wrote no image (synthesize.start "
                            "is none); set synthesize.start to noise or kept, or distill.transfer_set to web")
        if len(synthetic):
            shards |= _shards(run_dir, SYNTHESIS_FOLDER, SYNTHESIS_COUNTS, SYNTHESIS_INVENTORY)
            parts.append(synthetic.assign(weight=np.float32(1.0), synthetic=True)[["uid", "weight", "pseudo_label",
                                                                                "synthetic"]])
            logits.append(run_dir.rows(SYNTHESIS_LOGITS, synthetic["uid"]))
            if with_features:
                features.append(run_dir.rows(SYNTHESIS_FEATURES, synthetic["uid"]))
    rows = pd.concat(parts, ignore_index=True)
    captions = run_dir.read(CRAWL_MANIFEST, columns=["uid", "caption"]).set_index("uid")["caption"]
    rows["caption"] = rows["uid"].map(captions)  # a folder source's class folder; none for synthetic images
    data = TransferSet(shards, dict(zip(rows["uid"], rows.index)), split)
    return data, rows, np.concatenate(logits), \
        np.concatenate([f.astype(np.float32) for f in features]) if with_features else None


def class_labels(recipe: Recipe, rows: pd.DataFrame, class_names: list[str]) -> torch.Tensor | None:
    """The human labels of the transfer set (``distill.labels: folder``: each image's class folder, as
    ``data.source: folder`` crawls it; synthesised images keep their target class); None: the teacher's."""
    if recipe.labels != "folder":
        return None
    index = {name: i for i, name in enumerate(class_names)}
    labels = rows["caption"].map(index).where(~rows["synthetic"], rows["pseudo_label"])
    missing = rows.loc[labels.isna(), "caption"].fillna("(none)")
    if len(missing):
        shown = ", ".join(repr(c) for c in missing.drop_duplicates().head(3))
        raise UserError(f"distill.labels folder: {len(missing)} transfer-set images have no class folder named after "
                        f"a teacher class (e.g. {shown}); crawl a folder with one sub-folder per class name "
                        f"(data.source: folder), or set distill.labels: teacher")
    return torch.as_tensor(labels.to_numpy(np.int64))


def sample_weights(recipe: Recipe, kept: pd.DataFrame, logits: np.ndarray) -> torch.Tensor:
    """Per-sample loss weight of each kept row, by ``distill.sample_weights`` (the methods' registry)."""
    return SAMPLE_WEIGHTS[recipe.sample_weights](recipe, kept["weight"].to_numpy(np.float32), logits)


# ---------------------------------------------------------------- schedule

def lr_factor(step: int, total: int, warmup: int, kind: str, milestones: list) -> float:
    """Learning-rate multiplier at ``step`` of ``total``: linear warm-up, then the schedule.
    ``onecycle``: warm-up over the first 30%, cosine down to 0 (OneCycleLR's shape)."""
    if kind == "onecycle":
        warmup = max(1, int(0.3 * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind in ("cosine", "onecycle"):
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "step":
        return 0.1 ** sum(step >= m * total for m in milestones)
    return 1.0


# ---------------------------------------------------------------- one step

class Trainer:
    """Everything one training step needs, built once; ``epoch`` runs one pass."""

    def __init__(self, settings: DistillConfig, recipe: Recipe, teacher: Teacher, model: DistillModel,
                 weights: torch.Tensor, cached_logits: np.ndarray, cached_features: np.ndarray | None,
                 autoencoder, device: torch.device, sampler=None, labels: torch.Tensor | None = None,
                 teacher_map: FeatureMapTap | None = None):
        self.settings, self.recipe, self.teacher, self.model = settings, recipe, teacher, model
        self.labels = labels  # the human labels of each row (distill.labels: folder), or None: the teacher's
        # PS-KD: every row's prediction of the previous epoch (probabilities)
        self.previous = torch.zeros(len(weights), teacher.num_classes) if recipe.self_distill == "pskd" else None
        self.sampler = sampler  # KDDM's learned distribution the batches are drawn from (None: the stream's order)
        self.teacher_head = torch.as_tensor(teacher.classifier[0], device=device) \
            if recipe.classifier == "aligned" else None
        self.weights, self.device, self.autoencoder = weights, device, autoencoder
        self.cached_logits, self.cached_features = cached_logits, cached_features
        self.teacher_map = teacher_map  # IE-KD: the teacher's feature map of each batch (online teacher)
        self.online = settings.teacher_logits == "online" or teacher_map is not None or (
            settings.teacher_logits == "auto" and augments(settings))
        self.ddp = model
        if devices.world_size() > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        params = [p for n, p in model.named_parameters() if p.requires_grad and n != "theta"]
        if settings.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, nesterov=True,
                                             weight_decay=settings.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        # DFND learns the transition logits with Adam at 1e-3, apart from the student
        self.theta_optimizer = torch.optim.Adam([model.theta], lr=1e-3) if model.theta is not None else None
        fp16 = settings.precision == "fp16" or (settings.precision == "auto" and device.type == "cuda"
                                                 and not torch.cuda.is_bf16_supported())
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and fp16)  # bf16 needs no scaling

    def teacher_outputs(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.online:
            with torch.no_grad(), devices.autocast(self.device, self.settings.precision):
                logits, features = self.teacher.model(x)
            return logits.float(), features.float()
        idx = rows.numpy()
        logits = torch.from_numpy(np.asarray(self.cached_logits[idx], np.float32)).to(self.device)
        features = None
        if self.cached_features is not None:
            features = torch.from_numpy(np.asarray(self.cached_features[idx], np.float32)).to(self.device)
        return logits, features

    def loss(self, batch: dict, epoch: int, epochs: int, epoch_fraction: float,
             generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        r, s = self.recipe, self.settings
        views = [augment(batch[key].to(self.device, non_blocking=True), s, generator)
                 for key in ("image", "mix") if key == "image" or r.perturbation == "offline"]
        if s.augment_mixup:
            views = mixup(views, s.augment_mixup, generator)
        x, rows = views[0], batch["row"]
        t_logits, t_features = self.teacher_outputs(x, rows)
        t_map = self.teacher_map.take().float() if self.teacher_map is not None else None
        if self.sampler is not None:
            self.sampler.observe(rows, t_logits)
        n = len(x)
        mix_from = None
        if r.perturbation == "offline":
            inputs = torch.cat(views)
        elif r.perturbation == "online":
            inputs, mix_from = torch.cat([x, x]), n
        else:
            inputs = x
        with devices.autocast(self.device, s.precision):
            out = self.ddp(inputs, mix_from=mix_from)
        out = {k: v.float() for k, v in out.items()}
        s_logits = out["logits"][:n]

        labels = t_logits.argmax(1) if self.labels is None else self.labels[rows].to(self.device)
        previous = None
        if self.previous is not None:  # PS-KD: the previous epoch's predictions, then this epoch's kept for the next
            previous = pskd.previous_targets(self.previous, rows, labels, epoch).to(self.device)
            self.previous[rows] = s_logits.detach().softmax(1).cpu()
        step = Step(s_logits, t_logits, t_features, out, weight=self.weights[rows].to(self.device), labels=labels,
                    confidence=torch.ones(n, device=self.device), epoch_fraction=epoch_fraction, model=self.model,
                    teacher_head=self.teacher_head, autoencoder=self.autoencoder, previous=previous, epoch=epoch,
                    epochs=epochs, teacher_map=t_map)
        total, terms = methods.loss(r, step)
        terms["agreement"] = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean()
        return total, terms

    def epoch(self, loader, steps: int, epoch: int, epochs: int, scheduler, seed: int) -> dict:
        self.model.train()
        torch.manual_seed(seed * 100003 + epoch)  # online mixing draws from the global generator
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        sums, seen, t0 = defaultdict(float), 0, time.time()
        bar = progress(total=steps, desc=f"distill epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                   disable=not devices.is_main())
        for step, batch in enumerate(itertools.islice(loader, steps)):
            if len(batch["row"]) == 1:  # a worker's last batch: BatchNorm cannot train on one image
                batch = {k: torch.cat([v, v]) for k, v in batch.items()}  # (skipping it would stall DDP)
            if self.sampler is not None:
                batch = self.sampler.draw(batch, generator)
            loss, terms = self.loss(batch, epoch, epochs, (epoch + step / steps) / epochs, generator)  # progress 0 → 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.theta_optimizer:
                self.theta_optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            if self.theta_optimizer:
                self.scaler.step(self.theta_optimizer)
            self.scaler.update()
            scheduler.step()
            n = len(batch["row"])
            seen += n
            sums["loss"] += loss.item() * n
            for k, v in terms.items():
                sums[k] += float(v) * n
            bar.update()
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}")
        bar.close()
        seconds = time.time() - t0
        seen_all = devices.sum_over_ranks(seen)
        row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], "images": seen_all,
               "seconds": round(seconds, 3), "images_per_s": round(seen_all / max(seconds, 1e-9), 1)}
        row.update({k: round(v / max(seen, 1), 5) for k, v in sums.items()})
        if self.sampler is not None:
            row.update(self.sampler.summary())
        return row


# ---------------------------------------------------------------- checkpoints

def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("epoch_*.pt"))


_CHECKPOINT_KEYS = {"epoch", "model", "optimizer", "theta_optimizer", "scheduler", "scaler", "history", "sampler",
                    "previous"}


def save_checkpoint(folder: Path, epoch: int, trainer: Trainer, scheduler, history: list, keep: int) -> None:
    state = {"epoch": epoch, "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "theta_optimizer": trainer.theta_optimizer.state_dict() if trainer.theta_optimizer else None,
             "scheduler": scheduler.state_dict(), "scaler": trainer.scaler.state_dict(), "history": history,
             "sampler": trainer.sampler.state_dict() if trainer.sampler else None, "previous": trainer.previous}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(folder / f"epoch_{epoch:03d}.pt", buffer.getvalue())
    for old in _checkpoints(folder)[:-max(1, keep)]:
        old.unlink(missing_ok=True)


def resume(folder: Path, trainer: Trainer, scheduler) -> tuple[int, list]:
    """Load the newest usable checkpoint; (epochs done, history). Checkpoints are data: loaded with
    ``weights_only`` (a planted pickle runs no code), and one that is unreadable (cut short by a
    kill) or lacks what resuming needs is skipped for the one before it."""
    for path in reversed(_checkpoints(folder)):
        try:
            state = torch.load(path, map_location=trainer.device, weights_only=True)
            lacking = _CHECKPOINT_KEYS - set(state)  # checked before anything is loaded from it
            if lacking:
                raise KeyError(f"lacks {sorted(lacking)}")
            trainer.model.load_state_dict(state["model"])
            trainer.optimizer.load_state_dict(state["optimizer"])
            if trainer.theta_optimizer and state["theta_optimizer"]:
                trainer.theta_optimizer.load_state_dict(state["theta_optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            trainer.scaler.load_state_dict(state["scaler"])
            if trainer.sampler and state["sampler"]:
                trainer.sampler.load_state_dict(state["sampler"])
            if trainer.previous is not None and state["previous"] is not None:
                trainer.previous.copy_(state["previous"])
            epoch, history = int(state["epoch"]), list(state["history"])
        except Exception as e:  # noqa: BLE001 — whatever is wrong with it, the one before may be fine
            log.warning("distill: checkpoint %s is not usable (%s); trying the one before", path,
                        str(e).splitlines()[0][:200])
            continue
        log.info("distill: resuming after epoch %d from %s", epoch, path.name)
        return epoch, history
    return 0, []


# ---------------------------------------------------------------- the stage

def fit_autoencoder(settings: DistillConfig, teacher: Teacher, data: TransferSet, folder: Path,
                    device: torch.device) -> tuple[object, list, FeatureMapTap]:
    """IE-KD stage 1: the auto-encoder of the teacher's feature maps, fitted on the transfer set (every rank
    reads all of it, so every rank fits the same one) and kept beside the checkpoints for a resumed run."""
    tap = FeatureMapTap(teacher.model, "the teacher")
    path = folder / "autoencoder.pt"
    loader = data.loader(teacher.transform, 0, settings.seed, 0, 1, settings.batch_size, settings.num_workers,
                         settings.shuffle_buffer, False, settings.cache_mb)

    def feature_maps(epoch: int):
        for batch in loader:
            with torch.no_grad():
                teacher.model(batch["image"].to(device))
            yield tap.take().float()

    channels = tap.channels(teacher.model, teacher.channels, teacher.input_size, device)
    if path.is_file():
        ae = AutoEncoder(channels)
        ae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return ae.to(device).eval().requires_grad_(False), [], tap
    ae, history = train_autoencoder(feature_maps, channels, settings.ae_epochs, settings.seed, device)
    if devices.is_main():
        buffer = io.BytesIO()
        torch.save(ae.state_dict(), buffer)
        atomic_write_bytes(path, buffer.getvalue())
    log.info("distill: IE-KD auto-encoder of the teacher's %d-channel feature maps, %d epochs, reconstruction L1 %.4f",
             channels, settings.ae_epochs, history[-1] if history else float("nan"))
    return ae, history, tap


def build_model(settings: DistillConfig, recipe: Recipe, teacher: Teacher, factor_channels: int | None) -> DistillModel:
    """The student and its helper modules, seeded."""
    torch.manual_seed(settings.seed)
    needs = methods.needs(recipe)
    shared = recipe.classifier == "shared"
    if (shared or recipe.classifier == "aligned") and teacher.classifier is None:
        raise UserError("distill.classifier shared/aligned needs the teacher's linear classifier, which this "
                        "teacher does not expose; use classifier: own")
    def make_student() -> Student:
        return Student(settings.student, settings.student_library, settings.student_kwargs, teacher.num_classes,
                       teacher.channels, teacher.feature_dim if "projector" in needs else None, shared,
                       teacher.input_size)

    student = make_student()
    if shared:
        student.set_shared_head(*teacher.classifier)
    peer = make_student() if "peer" in needs else None  # IE-DML's second student (drawn after the first)
    return DistillModel(student, teacher.num_classes, factor_channels, recipe.noise_adaptation_weight > 0,
                        settings.mix_layer if recipe.perturbation == "online" else None, settings.mix_alpha,
                        "propensity_heads" in needs, "contrast_head" in needs, teacher.input_size, peer)


def preflight(cfg) -> None:
    """The teacher loads, the preset resolves and the student can be built for the teacher's classes."""
    teacher = check_teacher(cfg.teacher)
    resolve(cfg.distill)
    Student(cfg.distill.student, cfg.distill.student_library, cfg.distill.student_kwargs, teacher.num_classes,
            teacher.channels, input_size=teacher.input_size)


def images_to_learn_from(which: str, perturbation: str, preset: str) -> str:
    """distill.transfer_set as the recipe can use it: perturb's MixDistribution images (perturbation offline)
    exist for the web images only, so such a recipe learns from the web alone when synthesis is on too."""
    if perturbation != "offline" or which == "web":
        return which
    if which == "synthetic":
        raise UserError(f"distill: preset {preset} reads perturb's MixDistribution images (perturbation offline), "
                        "which synthesised images do not have; set distill.transfer_set: web or "
                        "distill.perturbation: online")
    log.warning("distill: preset %s reads perturb's MixDistribution images, which synthesised images do not have: "
                "it learns from the web images alone (distill.perturbation: online uses both)", preset)
    return "web"


def run(cfg, run_dir: RunDir) -> dict:
    settings, recipe = cfg.distill, methods.configure(resolve(cfg.distill), cfg.teacher)
    out = run_dir.stage_dir("distill")
    device = devices.pick_device(settings.device)
    log.info("distill: %s student, preset %s (%s), on %s", settings.student, settings.preset, describe(recipe), device)
    teacher = load_teacher(cfg.teacher, device)
    which = images_to_learn_from(settings.transfer_set, recipe.perturbation, settings.preset)
    data, kept, logits, features = transfer_set(run_dir, settings.split, which,
                                                "teacher_features" in methods.needs(recipe))
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    autoencoder, ae_history, teacher_map = None, [], None
    if "autoencoder" in methods.needs(recipe):
        autoencoder, ae_history, teacher_map = fit_autoencoder(settings, teacher, data, checkpoints, device)
    model = build_model(settings, recipe, teacher, autoencoder.factor_channels if autoencoder else None).to(device)
    trainer = Trainer(settings, recipe, teacher, model, sample_weights(recipe, kept, logits), logits, features,
                      autoencoder, device, kddm.build_sampler(recipe, features, logits, settings.seed),
                      class_labels(recipe, kept, teacher.class_names), teacher_map)
    if not trainer.online and augments(settings):
        log.warning("distill: teacher_logits cached with augmentation: the cached logits are of the "
                    "un-augmented images")

    world, rank = devices.world_size(), devices.rank()
    with_mix = recipe.perturbation == "offline"
    steps = data.steps(0, settings.seed, world, settings.num_workers, settings.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: lr_factor(
        step, steps * settings.epochs, int(settings.warmup_epochs * steps), settings.schedule, settings.milestones))
    start, history = resume(checkpoints, trainer, scheduler)
    loader = data.loader(teacher.transform, start, settings.seed, rank, world, settings.batch_size,
                         settings.num_workers, settings.shuffle_buffer, with_mix, settings.cache_mb)

    t0 = time.time()
    for epoch in range(start, settings.epochs):
        steps = data.steps(epoch, settings.seed, world, settings.num_workers, settings.batch_size)
        row = trainer.epoch(loader, steps, epoch, settings.epochs, scheduler, settings.seed)
        history.append(row)
        log.info("distill: epoch %d/%d %s", epoch + 1, settings.epochs,
                 " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "images")))
        if devices.is_main():
            save_checkpoint(checkpoints, epoch + 1, trainer, scheduler, history, settings.keep_checkpoints)
        devices.barrier()
    if not devices.is_main():
        return {}
    return finish(run_dir, trainer, teacher, history, recipe, settings, data, ae_history, time.time() - t0, start)


def finish(run_dir: RunDir, trainer: Trainer, teacher: Teacher, history: list, recipe: Recipe, settings: DistillConfig,
           data: TransferSet, ae_history: list, seconds: float, resumed_from: int) -> dict:
    """Write the student, the history and the summary (rank 0)."""
    student = trainer.model.student.cpu().eval()
    run_dir.write(HISTORY, pd.DataFrame(history).to_csv(index=False).encode())
    summary = {"student": settings.student, "preset": settings.preset, "recipe": describe(recipe),
               "epochs": settings.epochs, "resumed_from_epoch": resumed_from, "world_size": devices.world_size(),
               "batch_size_per_rank": settings.batch_size, "device": str(trainer.device),
               "teacher_logits": "online" if trainer.online else "cached", "transfer_set": data.size,
               "parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
               "final": history[-1] if history else {}, "autoencoder_l1": ae_history[-1] if ae_history else None,
               "images_per_s": round(float(np.median([h["images_per_s"] for h in history])), 1) if history else None}
    run_dir.write(DISTILL_SUMMARY, summary)
    run_dir.write(STUDENT, save_student(student, {
        "class_names": teacher.class_names, "input_size": teacher.input_size, "channels": teacher.channels,
        "transform": teacher.transform.spec, "preset": settings.preset}))
    final = history[-1] if history else {}
    return {"epochs": settings.epochs, "transfer_set": data.size,
            "teacher_agreement": final.get("agreement"), "images_per_s": summary["images_per_s"],
            "timings": {"train_s": round(seconds, 2)}, "details": {"recipe": describe(recipe)}}
