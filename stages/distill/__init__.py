"""distill: train the student on the transfer set to match the teacher.

Reads   RUN/perturb/shards/*.tar, shards.json  the kept images (and their perturbations)
        RUN/filter/selection.parquet           the inverse-propensity weight of each kept image
        RUN/score/logits.npy, features.npy     cached teacher outputs (un-augmented views, IE-KD's
                                               auto-encoder, KDDM's sampling distribution)
        the teacher (cfg.teacher); cfg.distill
Writes  RUN/distill/student.pt                 the trained student (``pipeline.student.load_student``)
        RUN/distill/history.csv                per epoch: every loss term, lr, selected share,
                                               teacher agreement, images/s
        RUN/distill/checkpoints/epoch_NNN.pt   after every epoch (the newest keep_checkpoints)
        RUN/distill/summary.json

One training step: a batch of kept images (augmented on the device), the teacher's logits and
features (online, or cached by score), the student's forward pass (on the batch and its
perturbed view when a loss needs one), the loss terms of the recipe (``recipe.py``, the terms in
``losses.py``), one optimiser step. The run resumes from its newest checkpoint after a kill and
ends with the same weights as an uninterrupted run: every epoch's data order, augmentation and
mixing draw from (seed, epoch) alone. Under torchrun the student is DistributedDataParallel and
each rank reads its own shards.
"""

import io
import itertools
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from manifests import (
    SELECTION,
    atomic_write_bytes,
    atomic_write_json,
    read_array,
    read_manifest,
)
from pipeline import devices
from pipeline.config import Config, DistillConfig
from pipeline.errors import UserError
from pipeline.mixing import beta
from pipeline.rundir import RunDir
from pipeline.student import Student, save_student
from pipeline.teacher import Teacher, load_teacher
from stages.distill import losses
from stages.distill.data import TransferSet
from stages.distill.model import DistillModel, train_autoencoder
from stages.distill.recipe import Recipe, describe, resolve

log = logging.getLogger("webdistill.distill")


# ---------------------------------------------------------------- inputs

def transfer_set(run_dir: RunDir, split: str = "shard") -> tuple[TransferSet, pd.DataFrame]:
    """perturb's shards, and the selection rows of the kept samples (row = position in the score arrays)."""
    perturb = run_dir.stage_dir("perturb")
    counts_file = perturb / "shards.json"
    if not counts_file.is_file():
        raise UserError(f"{counts_file} not found: run the perturb stage first")
    counts = {s: n for s, n in json.loads(counts_file.read_text()).items() if n > 0}
    selection = read_manifest(run_dir.stage_dir("filter") / "selection.parquet", SELECTION,
                              columns=["uid", "keep", "weight", "pseudo_label"])
    kept = selection[selection["keep"]]
    missing = [s for s in counts if not (perturb / s).is_file()]
    if missing:
        raise UserError(f"perturb shard {perturb / missing[0]} is missing: re-run perturb with --force")
    return TransferSet(perturb, counts, dict(zip(kept["uid"], kept.index)), split), selection


def sample_weights(recipe: Recipe, selection: pd.DataFrame, logits: np.ndarray) -> torch.Tensor:
    """Per-row loss weight: 1, the filter's IPW weight, or KDDM's sampling weight (clipped at 10
    and renormalised to mean 1 over the kept rows)."""
    weights = torch.ones(len(selection))
    kept = torch.from_numpy(selection["keep"].to_numpy())
    if recipe.sample_weights == "filter":
        weights = torch.from_numpy(selection["weight"].to_numpy(np.float32))
    elif recipe.sample_weights == "kddm":
        confidence = torch.from_numpy(np.asarray(logits[kept.numpy()], np.float32)).softmax(1).amax(1)
        w = losses.sampling_weights(confidence, recipe.kddm_gamma).clamp(max=10.0)
        weights = torch.zeros(len(selection))
        weights[kept] = w / w.mean()
    return weights


# ---------------------------------------------------------------- schedule and augmentation

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


def augments(settings: DistillConfig) -> bool:
    """Whether any augmentation is on (then the teacher must label every view online)."""
    return bool(settings.augment_shift or settings.augment_hflip or settings.augment_rotate
                or settings.augment_scale or settings.augment_elastic or settings.augment_mixup)


def shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pixels`` in each direction; border pixels repeat."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)).to(x.device)  # (n, w)
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def rotate_scale(x: torch.Tensor, degrees: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Random rotation within ±``degrees`` and zoom within 1 ± ``scale`` about the centre; border pixels repeat."""
    n = len(x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    theta = torch.zeros(n, 2, 3)
    # affine_grid maps output to input coordinates: dividing by the zoom enlarges the content
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / zoom, -torch.sin(angle) / zoom
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / zoom, torch.cos(angle) / zoom
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def elastic(x: torch.Tensor, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Simard et al.'s (2003) elastic distortion: a uniform random displacement field in [−1, 1]
    per pixel, smoothed by a Gaussian of ``sigma`` pixels and scaled by ``alpha`` pixels (their
    MNIST setting: alpha 34, sigma 4); border pixels repeat."""
    n, _, h, w = x.shape
    field = torch.rand(n, 2, h, w, generator=generator) * 2 - 1
    radius = max(1, int(2 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    field = F.conv2d(field, taps.expand(2, 1, 1, -1), padding=(0, radius), groups=2)  # smooth along x,
    field = F.conv2d(field, taps[:, None].expand(2, 1, -1, 1), padding=(radius, 0), groups=2)  # then along y
    field = field * alpha * torch.tensor([2 / w, 2 / h])[None, :, None, None]  # pixels → grid units
    identity = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    grid = identity + field.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid.to(x.device, x.dtype), padding_mode="border", align_corners=False)


def augment(x: torch.Tensor, settings: DistillConfig, generator: torch.Generator) -> torch.Tensor:
    """The geometric augmentations of ``settings`` (shift, rotation/zoom, elastic, flip), per image, on the device."""
    if settings.augment_elastic:
        x = elastic(x, settings.augment_elastic, settings.augment_elastic_sigma, generator)
    if settings.augment_shift:
        x = shift(x, settings.augment_shift, generator)
    if settings.augment_rotate or settings.augment_scale:
        x = rotate_scale(x, settings.augment_rotate, settings.augment_scale, generator)
    if settings.augment_hflip:
        flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def mixup(views: list[torch.Tensor], alpha: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Each image blended with another of the batch, λ ~ Beta(alpha, alpha) per image; every view
    gets the same partners and λ so that an image and its perturbation stay a pair."""
    n = len(views[0])
    partner = torch.randperm(n, generator=generator)
    lam = beta(alpha, n, generator).to(views[0].device)[:, None, None, None]
    return [lam * v + (1 - lam) * v[partner.to(v.device)] for v in views]


# ---------------------------------------------------------------- one step

class Trainer:
    """Everything one training step needs, built once; ``epoch`` runs one pass."""

    def __init__(self, settings: DistillConfig, recipe: Recipe, teacher: Teacher, model: DistillModel,
                 weights: torch.Tensor, cached_logits: np.ndarray, cached_features: np.ndarray | None,
                 autoencoder, device: torch.device):
        self.settings, self.recipe, self.teacher, self.model = settings, recipe, teacher, model
        self.teacher_head = torch.as_tensor(teacher.classifier[0], device=device) \
            if recipe.classifier == "aligned" else None
        self.weights, self.device, self.autoencoder = weights, device, autoencoder
        self.cached_logits, self.cached_features = cached_logits, cached_features
        self.online = settings.teacher_logits == "online" or (
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

    def loss(self, batch: dict, epoch_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        r, s = self.recipe, self.settings
        views = [augment(batch[key].to(self.device, non_blocking=True), s, generator)
                 for key in ("image", "mix") if key == "image" or r.perturbation == "offline"]
        if s.augment_mixup:
            views = mixup(views, s.augment_mixup, generator)
        x, rows = views[0], batch["row"]
        t_logits, t_features = self.teacher_outputs(x, rows)
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

        weight = self.weights[rows].to(self.device)
        labels = t_logits.argmax(1)
        terms = {}
        if r.batch_select < 1:
            weight = weight * losses.confident_share(t_logits, r.batch_select)
        confidence = torch.ones(n, device=self.device)
        if r.selection != "none":
            lam = r.selection_lambda[0] + (r.selection_lambda[1] - r.selection_lambda[0]) * epoch_fraction
            mask, labels, confidence = losses.combined_selection(t_logits, s_logits, lam, r.selection,
                                                                 r.selection_tau, r.selection_ratio)
            weight = weight * mask
            terms["selected"] = mask.mean()
        total = torch.zeros((), device=self.device)

        def add(name, w, value):
            nonlocal total
            if w:
                terms[name] = value.detach()
                total = total + w * value

        add("kd", r.kd_weight, losses.weighted_mean(losses.kd_per_sample(s_logits, t_logits, r.temperature), weight))
        add("ce", r.ce_weight, losses.weighted_mean(losses.ce_per_sample(s_logits, labels), weight))
        if r.noise_adaptation_weight:
            q = losses.transition_matrix(self.model.theta, r.teacher_accuracy)
            add("noise", r.noise_adaptation_weight,
                losses.weighted_mean(losses.noise_adaptation_per_sample(s_logits, labels, q), weight))
        if r.feature_weight:
            add("feature", r.feature_weight, losses.weighted_mean(
                losses.feature_alignment_per_sample(out["projected"][:n], t_features), weight * confidence))
        if r.classifier == "aligned":
            add("classifier", 1.0, losses.classifier_alignment(
                self.model.student.net.classifier.weight, self.teacher_head, self.model.student.projector.weight))
        if r.contrastive_weight:
            add("contrastive", r.contrastive_weight, losses.weighted_mean(
                losses.info_nce(out["projected"][:n], out["projected"][n:], r.contrastive_temperature), weight))
        if self.autoencoder is not None:
            with torch.no_grad():
                factor = self.autoencoder.encoder(t_features)
            add("inherit", r.inherit_weight, losses.inheritance_loss(out["inherit"][:n], factor))
            add("explore", r.explore_weight, losses.exploration_loss(out["explore"][:n], factor))
        terms["agreement"] = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean()
        return total, terms

    def epoch(self, loader, steps: int, epoch: int, epochs: int, scheduler, seed: int) -> dict:
        self.model.train()
        torch.manual_seed(seed * 100003 + epoch)  # online mixing draws from the global generator
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        sums, seen, t0 = defaultdict(float), 0, time.time()
        bar = tqdm(total=steps, desc=f"distill epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                   disable=not devices.is_main())
        for step, batch in enumerate(itertools.islice(loader, steps)):
            if len(batch["row"]) == 1:  # a worker's last batch: BatchNorm cannot train on one image
                batch = {k: torch.cat([v, v]) for k, v in batch.items()}  # (skipping it would stall DDP)
            loss, terms = self.loss(batch, (epoch + step / steps) / epochs, generator)  # progress, 0 → 1
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
        return row


# ---------------------------------------------------------------- checkpoints

def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("epoch_*.pt"))


def save_checkpoint(folder: Path, epoch: int, trainer: Trainer, scheduler, history: list, keep: int) -> None:
    state = {"epoch": epoch, "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "theta_optimizer": trainer.theta_optimizer.state_dict() if trainer.theta_optimizer else None,
             "scheduler": scheduler.state_dict(), "scaler": trainer.scaler.state_dict(), "history": history}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(folder / f"epoch_{epoch:03d}.pt", buffer.getvalue())
    for old in _checkpoints(folder)[:-max(1, keep)]:
        old.unlink(missing_ok=True)


def resume(folder: Path, trainer: Trainer, scheduler) -> tuple[int, list]:
    """Load the newest readable checkpoint; (epochs done, history). A checkpoint cut short by a
    kill is skipped for the one before it."""
    for path in reversed(_checkpoints(folder)):
        try:
            state = torch.load(path, map_location=trainer.device, weights_only=False)
        except Exception as e:  # truncated by a kill mid-write (atomic writes make this rare)
            log.warning("distill: checkpoint %s is unreadable (%s); trying the one before", path, e)
            continue
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.theta_optimizer and state["theta_optimizer"]:
            trainer.theta_optimizer.load_state_dict(state["theta_optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        log.info("distill: resuming after epoch %d from %s", state["epoch"], path.name)
        return state["epoch"], state["history"]
    return 0, []


# ---------------------------------------------------------------- the stage

def build_model(settings: DistillConfig, recipe: Recipe, teacher: Teacher,
                kept_features: np.ndarray | None) -> tuple[DistillModel, object, list]:
    """The student and its helper modules (IE-KD's auto-encoder fitted first), seeded."""
    torch.manual_seed(settings.seed)
    shared = recipe.classifier == "shared"
    if (shared or recipe.classifier == "aligned") and teacher.classifier is None:
        raise UserError("distill.classifier shared/aligned needs the teacher's linear classifier, which this "
                        "teacher does not expose; use classifier: own")
    student = Student(settings.student, settings.student_library, settings.student_kwargs, teacher.num_classes,
                      teacher.channels, teacher.feature_dim if recipe.needs_projector else None, shared,
                      teacher.input_size)
    if shared:
        student.set_shared_head(*teacher.classifier)
    autoencoder, ae_history, factor_dim = None, [], None
    if recipe.needs_autoencoder:
        autoencoder, ae_history = train_autoencoder(torch.from_numpy(np.asarray(kept_features, np.float32)),
                                                    settings.ae_epochs, settings.seed)
        factor_dim = autoencoder.encoder[-1].out_features
        log.info("distill: IE-KD auto-encoder, %d epochs, reconstruction L1 %.4f", settings.ae_epochs,
                 ae_history[-1] if ae_history else float("nan"))
    model = DistillModel(student, teacher.num_classes, factor_dim, recipe.noise_adaptation_weight > 0,
                         settings.mix_layer if recipe.perturbation == "online" else None, settings.mix_alpha)
    return model, autoencoder, ae_history


def run(cfg: Config, run_dir: RunDir) -> dict:
    settings, recipe = cfg.distill, resolve(cfg.distill)
    out, score_dir = run_dir.stage_dir("distill"), run_dir.stage_dir("score")
    device = devices.pick_device(settings.device)
    log.info("distill: %s student, preset %s (%s), on %s", settings.student, settings.preset, describe(recipe), device)
    teacher = load_teacher(cfg.teacher, device)
    data, selection = transfer_set(run_dir, settings.split)
    kept_rows = np.flatnonzero(selection["keep"].to_numpy())
    logits = read_array(score_dir / "logits.npy", len(selection), "score logits")
    features = read_array(score_dir / "features.npy", len(selection), "score features") \
        if recipe.needs_teacher_features or recipe.needs_autoencoder else None
    model, autoencoder, ae_history = build_model(settings, recipe, teacher,
                                                 features[kept_rows] if features is not None else None)
    model.to(device)
    if autoencoder is not None:
        autoencoder.to(device)
    trainer = Trainer(settings, recipe, teacher, model, sample_weights(recipe, selection, logits), logits, features,
                      autoencoder, device)
    if not trainer.online and augments(settings):
        log.warning("distill: teacher_logits cached with augmentation: the cached logits are of the "
                    "un-augmented images")

    world, rank = devices.world_size(), devices.rank()
    with_mix = recipe.perturbation == "offline"
    steps = data.steps(0, settings.seed, world, settings.num_workers, settings.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: lr_factor(
        step, steps * settings.epochs, int(settings.warmup_epochs * steps), settings.schedule, settings.milestones))
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
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
    return finish(out, trainer, teacher, history, recipe, settings, data, ae_history, time.time() - t0, start)


def finish(out: Path, trainer: Trainer, teacher: Teacher, history: list, recipe: Recipe, settings: DistillConfig,
           data: TransferSet, ae_history: list, seconds: float, resumed_from: int) -> dict:
    """Write the student, the history and the summary (rank 0)."""
    student = trainer.model.student.cpu().eval()
    atomic_write_bytes(out / "history.csv", pd.DataFrame(history).to_csv(index=False).encode())
    summary = {"student": settings.student, "preset": settings.preset, "recipe": describe(recipe),
               "epochs": settings.epochs, "resumed_from_epoch": resumed_from, "world_size": devices.world_size(),
               "batch_size_per_rank": settings.batch_size, "device": str(trainer.device),
               "teacher_logits": "online" if trainer.online else "cached", "transfer_set": data.size,
               "parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
               "final": history[-1] if history else {}, "autoencoder_l1": ae_history[-1] if ae_history else None,
               "images_per_s": round(float(np.median([h["images_per_s"] for h in history])), 1) if history else None}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "student.pt", save_student(student, {
        "class_names": teacher.class_names, "input_size": teacher.input_size, "channels": teacher.channels,
        "transform": teacher.transform, "preset": settings.preset}))
    final = history[-1] if history else {}
    return {"epochs": settings.epochs, "transfer_set": data.size,
            "teacher_agreement": final.get("agreement"), "images_per_s": summary["images_per_s"],
            "timings": {"train_s": round(seconds, 2)}, "details": {"recipe": describe(recipe)}}
