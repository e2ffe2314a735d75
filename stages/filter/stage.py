"""filter: which scored web images the student learns from, and how much each one counts.

Reads   manifests.artifacts SCORE_MANIFEST, TEACHER_INFO, FEATURES (or EMBEDDINGS), and the
        reference that cfg.filter.reference names: FEATURE_PRIOR (bn_stats), CLASSIFIER
        (prototypes), TEXT_EMBEDDINGS (clip_text) or REFERENCE (reference_set); cfg.filter
Writes  RUN/filter/selection.parquet   one row per scored image: keep, weight, propensity, nearest
                                       reference class, similarity, why it was dropped
                                       (schema manifests.SELECTION)
        RUN/filter/summary.json, summary.txt, plots/*.png   diagnostics

Four steps, each a function of arrays (testable without a run directory):

1. ``match``: similarity of every sample to the reference that stands for the private data, with
   FAISS; the nearest reference class where the reference has classes.
2. ``gates`` and ``select``: the policy picks the kept samples among those that pass the gates.
3. ``propensity``: P(machine domain | x) of each kept sample (IPWD), by the configured formula.
4. ``normalised_weights``: weight = 1/propensity, scaled to mean 1 within the clip bounds.

Nothing here re-runs the teacher: changing a threshold or policy re-runs filter alone, in seconds.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from manifests import atomic_write_bytes, uid_for
from manifests.artifacts import (
    BN_DISTANCE,
    CLASSIFIER,
    EMBEDDINGS,
    FEATURE_PRIOR,
    FEATURES,
    FILTER_SUMMARY,
    FILTER_SUMMARY_TEXT,
    REFERENCE,
    SCORE_MANIFEST,
    SELECTION_MANIFEST,
    TEACHER_INFO,
    TEXT_EMBEDDINGS,
)
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from stages.common.plots import figure_png, pyplot
from stages.filter import knn
from stages.filter.config import FilterConfig

log = logging.getLogger("webdistill.filter")

CHUNK = 65536  # rows per block when a full (samples × prototypes) matrix would not fit


# ---------------------------------------------------------------- 1. matching

@dataclass
class Match:
    """How alike each sample is to the reference (higher: more alike)."""

    similarity: np.ndarray  # (n,) float32
    nearest_class: np.ndarray | None = None  # (n,) class of the nearest reference item
    class_probability: np.ndarray | None = None  # (n, classes) the reference's class probabilities
    density_ratio: np.ndarray | None = None  # (n,) kNN estimate of p_reference / p_pool
    index: dict | None = None  # the FAISS index used, with its recall when approximate


def match_prototypes(vectors: np.ndarray, prototypes: np.ndarray, labels: np.ndarray, n_classes: int,
                     metric: str, temperature: float) -> Match:
    """Similarity to the nearest of labelled prototypes (cosine for ``ip``, minus squared L2 for
    ``l2``); a class's score is its best prototype's, turned into probabilities by a softmax."""
    if metric == "ip":  # cosine: unit prototypes here, unit vectors chunk by chunk below
        prototypes = _unit(prototypes)
    index = knn.flat_index(prototypes, metric)
    similarity = np.empty(len(vectors), np.float32)
    scores = np.empty((len(vectors), n_classes), np.float32)
    for start in range(0, len(vectors), CHUNK):
        block = knn.as_float32(vectors[start:start + CHUNK])
        if metric == "ip":
            block = _unit(block)
        d, ids = index.search(block, len(prototypes))  # every prototype, sorted: un-sort by id
        s = np.empty_like(d)
        np.put_along_axis(s, ids, d if metric == "ip" else -d, axis=1)
        per_class = np.full((len(block), n_classes), -np.inf, np.float32)
        for c in np.unique(labels):
            per_class[:, c] = s[:, labels == c].max(axis=1)
        similarity[start:start + CHUNK] = per_class.max(axis=1)
        scores[start:start + CHUNK] = per_class
    nearest = scores.argmax(axis=1).astype(np.int32)
    if metric == "l2":  # squared distances have no natural scale: measure them in typical nearest distances
        scores = scores / max(float(np.median(-similarity)), 1e-12)
    return Match(similarity, nearest, softmax(scores / temperature),
                 index={"kind": "flat", "metric": metric, "vectors": len(prototypes), "backend": knn.backend()})


def match_bn_stats(features: np.ndarray, prior: dict) -> Match:
    """Minus the mean squared z-score of each feature under the BatchNorm prior (0 is the prior's
    mean; about -1 a typical training sample were the prior exact)."""
    mean, std = prior["mean"].astype(np.float32), prior["std"].astype(np.float32)
    similarity = np.empty(len(features), np.float32)
    for start in range(0, len(features), CHUNK):
        z = (knn.as_float32(features[start:start + CHUNK]) - mean) / std
        similarity[start:start + CHUNK] = -(z * z).mean(axis=1)
    return Match(similarity)


def match_reference_set(vectors: np.ndarray, reference: np.ndarray, labels: np.ndarray, n_classes: int,
                        settings: FilterConfig) -> Match:
    """Minus the mean squared L2 distance to the k nearest reference images; their majority class;
    and a kNN density ratio p_reference / p_pool: among the k nearest neighbours in the reference
    pooled with an equal-sized random subset of the web pool, (reference + 1) / (pool + 1)."""
    k = min(settings.k, len(reference))
    index = knn.build_index(reference, "l2", settings.exact_search_max, k, settings.target_recall,
                            settings.ivf_nprobe, seed=settings.seed)
    distances, ids = index.search(vectors, k)
    similarity = -distances.mean(axis=1).astype(np.float32)
    rows = np.repeat(np.arange(len(vectors)) * n_classes, k)
    votes = np.bincount(rows + labels[ids].ravel(), minlength=len(vectors) * n_classes).reshape(-1, n_classes)
    votes = votes.astype(np.float32)
    nearest = votes.argmax(axis=1).astype(np.int32)
    probability = (votes + 1) / (k + n_classes)  # Laplace-smoothed vote shares

    rng = np.random.default_rng(settings.seed)
    pool_sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), len(reference)), replace=False))]
    both = knn.build_index(np.concatenate([knn.as_float32(reference), knn.as_float32(pool_sample)]), "l2",
                           settings.exact_search_max, k, settings.target_recall, settings.ivf_nprobe,
                           seed=settings.seed)
    from_reference = (both.search(vectors, k)[1] < len(reference)).sum(axis=1)
    ratio = ((from_reference + 1) / (k - from_reference + 1)).astype(np.float32)
    return Match(similarity, nearest, probability, ratio, index.info())


def match(settings: FilterConfig, vectors: np.ndarray, manifest: pd.DataFrame, n_classes: int,
          refs: "References") -> Match:
    """The configured reference, matched against every sample's vector."""
    kind = settings.reference
    if kind in ("bn_stats", "bn_layers"):
        result = match_bn_stats(vectors, refs.need("feature_prior")) if kind == "bn_stats" \
            else Match(-refs.need("bn_distance"))
        if refs.classifier is not None:  # classes (agreement, ipwd) still come from the classifier
            by_class = match_prototypes(vectors, refs.classifier, np.arange(n_classes), n_classes, "ip",
                                        settings.temperature)
            result.nearest_class, result.class_probability = by_class.nearest_class, by_class.class_probability
            result.index = by_class.index
        return result
    if kind in ("prototypes", "clip_text"):
        prototypes = refs.need("classifier" if kind == "prototypes" else "text_embeddings")
        return match_prototypes(vectors, prototypes, np.arange(n_classes), n_classes, "ip", settings.temperature)
    if kind == "centroids":
        centroids, labels = confident_centroids(vectors, manifest, n_classes, settings)
        return match_prototypes(vectors, centroids, labels, n_classes, "l2", settings.temperature)
    reference, labels = refs.need("reference")
    return match_reference_set(vectors, reference, labels, n_classes, settings)


def confident_centroids(vectors: np.ndarray, manifest: pd.DataFrame, n_classes: int,
                        settings: FilterConfig) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means centroids of each pseudo-class's confidently scored samples, with their class."""
    confident = manifest["confidence"].to_numpy() >= settings.centroid_min_confidence
    labels = manifest["pseudo_label"].to_numpy()
    centroids, classes = [], []
    for c in range(n_classes):
        rows = np.flatnonzero(confident & (labels == c))
        if len(rows):
            found = knn.kmeans(vectors[rows], settings.centroids_per_class, seed=settings.seed)
            centroids.append(found)
            classes += [c] * len(found)
    if not centroids:
        raise UserError(f"filter: no sample has teacher confidence ≥ filter.centroid_min_confidence = "
                        f"{settings.centroid_min_confidence} to build centroids from; lower it")
    return np.concatenate(centroids), np.asarray(classes)


# ---------------------------------------------------------------- 2. gates and selection

GATES = ("min_similarity", "min_confidence", "require_agreement")


def gates(settings: FilterConfig, similarity: np.ndarray, confidence: np.ndarray, agrees: np.ndarray | None
          ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(passes, reason per sample, samples each gate drops): the first failing gate is the reason."""
    reason = np.full(len(similarity), None, dtype=object)
    dropped = {}
    checks = [("min_similarity", "below_min_similarity",
               None if settings.min_similarity is None else similarity < settings.min_similarity),
              ("min_confidence", "below_min_confidence",
               confidence < settings.min_confidence if settings.min_confidence > 0 else None)]
    if settings.require_agreement:
        if agrees is None:
            raise UserError(f"filter.require_agreement needs a reference with classes; {settings.reference} has none "
                            "here (set it to false, or use prototypes, centroids, reference_set or clip_text)")
        checks.append(("require_agreement", "disagrees_with_reference", ~agrees))
    for gate, why, fails in checks:
        if fails is not None:
            dropped[gate] = int(fails.sum())
            reason[fails & (reason == None)] = why  # noqa: E711 (elementwise on an object array)
    return reason == None, reason, dropped  # noqa: E711


def budget_count(budget: float, pool: int) -> int:
    return int(round(budget * pool)) if budget <= 1 else int(budget)


def water_fill(available: np.ndarray, budget: int) -> np.ndarray:
    """Per-class quotas summing to ``min(budget, available.sum())``, as equal as the classes allow:
    a class with fewer samples than its share gives the rest to the others."""
    quota = np.zeros(len(available), dtype=np.int64)
    left, open_classes = budget, len(available)
    for c in np.argsort(available, kind="stable"):
        share = left // open_classes + (1 if left % open_classes else 0)
        quota[c] = min(available[c], share)
        left -= quota[c]
        open_classes -= 1
    return quota


def select(settings: FilterConfig, passes: np.ndarray, similarity: np.ndarray, confidence: np.ndarray,
           pseudo_label: np.ndarray, n_classes: int) -> tuple[np.ndarray, str | None]:
    """(keep mask, reason for the eligible samples the policy leaves out)."""
    policy, n = settings.policy, len(passes)
    if policy == "none":
        return np.ones(n, bool), None
    if policy == "threshold":
        if settings.min_similarity is None and settings.min_confidence <= 0 and not settings.require_agreement:
            log.warning("filter: policy threshold with no gate set keeps every sample; set filter.min_similarity, "
                        "filter.min_confidence or filter.require_agreement")
        return passes.copy(), None
    budget = budget_count(settings.budget, n)
    eligible = np.flatnonzero(passes)
    keep = np.zeros(n, bool)
    if policy == "random":
        rng = np.random.default_rng(settings.seed)
        keep[rng.choice(eligible, min(budget, len(eligible)), replace=False)] = True
        return keep, "not_sampled"
    if policy == "dfnd":
        keep[eligible[np.argsort(-confidence[eligible], kind="stable")[:budget]]] = True
        return keep, "not_in_top_n"
    labels = pseudo_label[eligible]
    quota = water_fill(np.bincount(labels, minlength=n_classes), budget)
    for c in range(n_classes):
        rows = eligible[labels == c]
        keep[rows[np.argsort(-similarity[rows], kind="stable")[:quota[c]]]] = True
    return keep, "over_class_quota"


def explain_empty(settings: FilterConfig, dropped: dict[str, int], similarity: np.ndarray, n: int) -> str:
    """Why nothing was kept, and which setting to relax."""
    if not dropped or max(dropped.values()) == 0:
        return (f"filter: filter.budget = {settings.budget} keeps none of the {n:,} scored samples; raise "
                "filter.budget")
    gate = max(dropped, key=dropped.get)
    detail = ""
    if gate == "min_similarity":
        q = np.quantile(similarity, [0, 0.5, 1])
        detail = f" (similarities to the {settings.reference} reference run from {q[0]:.4g} to {q[2]:.4g}, median {q[1]:.4g})"
    value = getattr(settings, gate)
    return (f"filter: no sample passes the gates of policy {settings.policy}: filter.{gate} = {value} drops "
            f"{dropped[gate]:,} of {n:,}{detail}; relax filter.{gate}")


# ---------------------------------------------------------------- 3. propensity and 4. weights

def class_frequency_propensity(pseudo_label: np.ndarray, n_classes: int, prior: np.ndarray) -> np.ndarray:
    """Share of each sample's pseudo-class among the samples, over that class's prior share: the
    teacher's over-represented classes have a propensity above 1."""
    share = np.bincount(pseudo_label, minlength=n_classes) / len(pseudo_label)
    return (share / prior)[pseudo_label]


def density_propensity(vectors: np.ndarray, settings: FilterConfig) -> tuple[np.ndarray, dict]:
    """Local density relative to the median: median kNN distance over the sample's own mean
    distance to its k nearest neighbours among the (kept) samples; a dense region has more than 1."""
    rng = np.random.default_rng(settings.seed)
    database = vectors
    if len(vectors) > settings.density_max_points:
        database = vectors[np.sort(rng.choice(len(vectors), settings.density_max_points, replace=False))]
    k = min(settings.k, len(database) - 1)
    if k < 1:
        return np.ones(len(vectors)), {"kind": "none", "reason": "fewer than 2 samples"}
    index = knn.build_index(database, "l2", settings.exact_search_max, k + 1, settings.target_recall,
                            settings.ivf_nprobe, seed=settings.seed)
    distances, _ = index.search(vectors, k + 1)
    mean_distance = np.sqrt(np.maximum(distances[:, 1:], 0)).mean(axis=1)  # the nearest is the sample itself
    mean_distance = np.maximum(mean_distance, 1e-12)
    return np.median(mean_distance) / mean_distance, index.info()


DENSITY_PROPENSITIES = ("density", "class_frequency_x_density")  # the formulas that read the kept vectors


def propensity(formula: str, pseudo_label: np.ndarray, confidence: np.ndarray, reference_probability: np.ndarray | None,
               vectors: np.ndarray | None, n_classes: int, prior: np.ndarray, settings: FilterConfig
               ) -> tuple[np.ndarray, dict | None]:
    """P(machine domain | x) of each kept sample, up to a constant, by ``formula`` (see FilterConfig)."""
    index = None
    if formula == "none":
        return np.ones(len(pseudo_label)), None
    if formula in ("class_frequency", "class_frequency_x_density"):
        e = class_frequency_propensity(pseudo_label, n_classes, prior)
        if formula == "class_frequency_x_density":
            density, index = density_propensity(vectors, settings)
            e = e * density
        return e, index
    if formula == "density":
        return density_propensity(vectors, settings)
    if reference_probability is None:
        raise UserError(f"filter.propensity {formula} compares the teacher with a reference that has classes; "
                        f"the {settings.reference} reference has none here (use prototypes, centroids, reference_set "
                        "or clip_text, or another propensity)")
    p_teacher = np.clip(confidence, 1e-6, 1 - 1e-6)
    p_reference = np.clip(reference_probability[np.arange(len(pseudo_label)), pseudo_label], 1e-6, 1 - 1e-6)
    if formula == "ipwd_bayes":  # Bayes with equal domain priors: w = 1 + p_reference / p_teacher
        return p_teacher / (p_teacher + p_reference), None
    # ipwd_literal: w = 1 + CE_reference / CE_teacher, as the secondary summary gives it
    return 1 / (1 + np.log(p_reference) / np.log(p_teacher)), None


def normalised_weights(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """``raw`` scaled so that, once clipped to [low, high], the weights average exactly 1 (the
    scale is found by bisection: the clipped mean grows with it)."""
    raw = np.asarray(raw, dtype=np.float64)
    if len(raw) == 0:
        return raw
    lo, hi = 1e-12 / raw.max(), 1e12 / raw.min()
    for _ in range(200):
        mid = np.sqrt(lo * hi)
        if np.clip(mid * raw, low, high).mean() < 1:
            lo = mid
        else:
            hi = mid
    return np.clip(hi * raw, low, high)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = knn.as_float32(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- the score stage's outputs

class References:
    """The reference files the score stage wrote (manifests.artifacts CLASSIFIER, FEATURE_PRIOR,
    TEXT_EMBEDDINGS, REFERENCE), loaded on demand with a clear error when absent."""

    def __init__(self, run_dir: RunDir, vectors: str):
        self.run, self.vectors = run_dir, vectors
        self.classifier = self._load(CLASSIFIER, "weight") if vectors == "features" else None

    def _load(self, artifact, key: str):
        path = self.run.path(artifact)
        if not path.is_file():
            return None
        with np.load(path) as z:
            return z[key]

    def need(self, what: str):
        if what == "feature_prior":
            if self.vectors != "features":
                raise UserError("filter.reference bn_stats describes the teacher's features: set filter.vectors: features")
            path = self.run.path(FEATURE_PRIOR)
            if not path.is_file():
                raise UserError(f"filter.reference bn_stats: {path} not found: the teacher has no BatchNorm layer "
                                "feeding its features (or score ran before webdistill wrote it: re-run score with "
                                "--force); choose another filter.reference")
            with np.load(path) as z:
                return {"mean": z["mean"], "std": z["std"]}
        if what == "bn_distance":
            if not self.run.path(BN_DISTANCE).is_file():
                raise UserError(f"filter.reference bn_layers: {self.run.path(BN_DISTANCE)} not found: the teacher has "
                                "no BatchNorm layer webdistill can hook (or score ran before webdistill wrote it: "
                                "re-run score with --force); choose another filter.reference")
            return np.asarray(self.run.read(BN_DISTANCE), dtype=np.float32)
        if what == "classifier":
            if self.vectors != "features":
                raise UserError("filter.reference prototypes are the teacher's classifier weights, in the space of "
                                "its features: set filter.vectors: features")
            if self.classifier is None:
                raise UserError(f"filter.reference prototypes: {self.run.path(CLASSIFIER)} not found: the teacher's "
                                "classifier is not a Linear layer webdistill can read; choose another filter.reference")
            return self.classifier
        if what == "text_embeddings":
            path = self.run.path(TEXT_EMBEDDINGS)
            if self.vectors != "embeddings" or not path.is_file():
                raise UserError("filter.reference clip_text needs open_clip embeddings: set score.embedder_model and "
                                "score.embedder_checkpoint, re-run score, and set filter.vectors: embeddings")
            return self._load(TEXT_EMBEDDINGS, "embeddings")
        path = self.run.path(REFERENCE)
        if not path.is_file():
            raise UserError(f"filter.reference reference_set: {path} not found: set score.reference_shards to "
                            "WebDataset shards of your reference images and re-run score")
        with np.load(path) as z:
            if self.vectors not in z.files:
                raise UserError(f"filter.vectors {self.vectors}: {path} holds no {self.vectors} (set "
                                "score.embedder_model before scoring the reference)")
            labels = np.where(z["labels"] >= 0, z["labels"], z["logits"].argmax(axis=1))  # .cls, else the teacher's
            return z[self.vectors], labels

    def label_prior(self, n_classes: int) -> np.ndarray:
        _, labels = self.need("reference")
        return (np.bincount(labels, minlength=n_classes) + 1) / (len(labels) + n_classes)


def load_vectors(run_dir: RunDir, which: str) -> np.ndarray:
    """The score stage's features or embeddings, row i for row i of its manifest, in the dtype they
    were stored in (float16 by default): each step converts the rows it works on, never all at once."""
    artifact = FEATURES if which == "features" else EMBEDDINGS
    if which == "embeddings" and not run_dir.path(artifact).is_file():
        raise UserError(f"filter.vectors embeddings: {run_dir.path(artifact)} not found: set score.embedder_model "
                        "and score.embedder_checkpoint and re-run score")
    return run_dir.read(artifact)


# ---------------------------------------------------------------- the stage

def filter_pool(settings: FilterConfig, manifest: pd.DataFrame, vectors: np.ndarray, n_classes: int,
                refs: References) -> tuple[pd.DataFrame, dict]:
    """The selection manifest of a scored pool, and what was measured on the way."""
    low, high = settings.weight_clip if len(settings.weight_clip) == 2 else (None, None)
    if low is None or not 0 < low <= 1 <= high:
        raise UserError(f"filter.weight_clip {settings.weight_clip}: give [min, max] with 0 < min ≤ 1 ≤ max")
    timings, t0 = {}, time.time()
    found = match(settings, vectors, manifest, n_classes, refs)
    timings["match_s"] = time.time() - t0
    confidence = manifest["confidence"].to_numpy()
    labels = manifest["pseudo_label"].to_numpy()
    agrees = None if found.nearest_class is None else found.nearest_class == labels
    passes, reason, dropped = gates(settings, found.similarity, confidence, agrees)
    keep, left_out = select(settings, passes, found.similarity, confidence, labels, n_classes)
    if not keep.any():
        raise UserError(explain_empty(settings, dropped, found.similarity, len(keep)))
    reason[passes & ~keep] = left_out
    reason[keep] = None

    t1 = time.time()
    kept = np.flatnonzero(keep)
    prior = (refs.label_prior(n_classes) if settings.class_prior == "reference" else np.full(n_classes, 1 / n_classes))
    kept_propensity, density_index = propensity(
        settings.propensity, labels[kept], confidence[kept],
        None if found.class_probability is None else found.class_probability[kept],
        vectors[kept] if settings.propensity in DENSITY_PROPENSITIES else None, n_classes, prior, settings)
    weight = np.zeros(len(keep), np.float32)
    weight[kept] = normalised_weights(kept_propensity ** -settings.weight_power, low, high)
    propensity_column = np.full(len(keep), np.nan, np.float32)
    propensity_column[kept] = kept_propensity
    timings["propensity_s"] = time.time() - t1

    selection = pd.DataFrame({
        "uid": manifest["uid"], "shard": manifest["shard"], "key": manifest["key"], "pseudo_label": labels,
        "keep": keep, "weight": weight, "propensity": pd.array(propensity_column).astype("Float32"),
        "propensity_formula": settings.propensity,
        "nearest_class": None if found.nearest_class is None else found.nearest_class,
        "agrees": None if agrees is None else agrees, "similarity": found.similarity,
        "density_ratio": found.density_ratio, "reason": reason})
    details = {"dropped_by_gate": dropped, "match_index": found.index, "density_index": density_index,
               "timings": {k: round(v, 3) for k, v in timings.items()}}
    return selection, details


def run(cfg, run_dir: RunDir) -> dict:
    settings = cfg.filter
    out = run_dir.stage_dir("filter")
    t0 = time.time()
    manifest = run_dir.read(SCORE_MANIFEST, columns=["uid", "shard", "key", "pseudo_label", "pseudo_class",
                                                     "confidence"])
    class_names = run_dir.read(TEACHER_INFO)["class_names"]
    vectors = load_vectors(run_dir, settings.vectors)  # row i ↔ row i of the score manifest
    load_seconds = time.time() - t0

    references = References(run_dir, settings.vectors)
    selection, details = filter_pool(settings, manifest, vectors, len(class_names), references)
    summary = summarize(settings, selection, manifest, class_names, details)
    if settings.diagnostics_sources:
        summary["truth"] = against_sources(selection, settings.diagnostics_sources, class_names)
    plot_diagnostics(out / "plots", selection, manifest, class_names, settings)
    run_dir.write(FILTER_SUMMARY, summary)
    run_dir.write(FILTER_SUMMARY_TEXT, summary_text(summary).encode())
    run_dir.write(SELECTION_MANIFEST, selection)  # last: the stage's main output
    log.info("%s", summary_text(summary).strip())
    timings = {"load_s": round(load_seconds, 2), **details["timings"], "total_s": round(time.time() - t0, 2)}
    return {"scored": summary["scored"], "kept": summary["kept"], "dropped": summary["scored"] - summary["kept"],
            "timings": timings,
            "details": {k: summary[k] for k in ("reference", "policy", "propensity", "weights", "density_index")}
            | ({"precision": summary["truth"]["precision"]} if "truth" in summary else {})}


# ---------------------------------------------------------------- diagnostics

def summarize(settings: FilterConfig, selection: pd.DataFrame, manifest: pd.DataFrame, class_names: list[str],
              details: dict) -> dict:
    kept = selection[selection["keep"]]
    weights = kept["weight"].to_numpy()
    quantiles = [0, 0.1, 0.5, 0.9, 1]

    def histogram(labels):
        return {class_names[c]: int(n) for c, n in enumerate(np.bincount(labels, minlength=len(class_names)))}

    return {
        "reference": settings.reference, "vectors": settings.vectors, "policy": settings.policy,
        "propensity": settings.propensity, "budget": settings.budget,
        "scored": len(selection), "kept": len(kept),
        "dropped_by_reason": selection["reason"].value_counts().to_dict(),
        "dropped_by_gate": details["dropped_by_gate"],
        "pseudo_class_histogram": {"before": histogram(selection["pseudo_label"]), "after": histogram(kept["pseudo_label"])},
        "similarity_quantiles": {"all": _quantiles(selection["similarity"], quantiles),
                                 "kept": _quantiles(kept["similarity"], quantiles)},
        "confidence_mean": {"all": round(float(manifest["confidence"].mean()), 4),
                            "kept": round(float(manifest["confidence"][selection["keep"]].mean()), 4)},
        "agreement_rate": None if selection["agrees"].isna().all() else round(float(selection["agrees"].mean()), 4),
        "weights": {"mean": round(float(weights.mean()), 4), "min": round(float(weights.min()), 4),
                    "max": round(float(weights.max()), 4), "clip": list(settings.weight_clip),
                    "at_clip": int(((weights <= settings.weight_clip[0] + 1e-6)
                                    | (weights >= settings.weight_clip[1] - 1e-6)).sum())},
        "match_index": details["match_index"], "density_index": details["density_index"],
        "timings": details["timings"],
    }


def _quantiles(values, q) -> dict:
    return {f"q{int(100 * p)}": round(float(v), 4) for p, v in zip(q, np.quantile(np.asarray(values, float), q))}


def read_sources(sources_file: str) -> pd.DataFrame:
    """The diagnostics file of true sources, as (uid, source, label): a parquet or csv file with a
    ``uid`` column (as the crawl assigns) or a ``url`` column (as in the URL list; its uid is computed
    the crawl's way), ``source`` (a name: mnist, letters, noise…) and ``label`` (the true class index of
    an in-distribution image, empty for the others)."""
    path = Path(sources_file)
    what = f"filter.diagnostics_sources {path}"
    if not path.is_file():
        raise UserError(f"{what} not found (the demo's is built by `make demo-data`)")
    try:
        df = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as e:  # the user's file: name it, whatever pandas or pyarrow says
        raise UserError(f"{what}: cannot be read as {'csv' if path.suffix.lower() == '.csv' else 'parquet'} "
                        f"({e})") from e
    key = "uid" if "uid" in df.columns else "url" if "url" in df.columns else None
    missing = [c for c in ("source", "label") if c not in df.columns] + ([] if key else ["uid or url"])
    if missing:
        raise UserError(f"{what} lacks column(s) {', '.join(missing)} (it has {', '.join(map(str, df.columns))}): "
                        "see docs/reliability.md, 'The diagnostics file'")
    if not pd.api.types.is_numeric_dtype(df["label"]):
        raise UserError(f"{what}: column label must hold class indices (empty for out-of-distribution images)")
    uid = df["uid"].astype(str) if key == "uid" else df["url"].astype(str).str.strip().map(uid_for)
    return pd.DataFrame({"uid": uid, "source": df["source"].astype("string"), "label": df["label"]})


def preflight(cfg) -> None:
    """The diagnostics file reads, and the teacher has what the reference needs (before score runs)."""
    if cfg.filter.diagnostics_sources:
        read_sources(cfg.filter.diagnostics_sources)
    reference = cfg.filter.reference
    if reference == "bn_layers" and not cfg.score.bn_distance:
        raise UserError("filter.reference bn_layers reads score/bn_distance.npy: set score.bn_distance: true")
    if reference in ("bn_stats", "bn_layers", "prototypes"):
        from stages.common.batchnorm import batchnorm_layers
        from stages.common.teacher import check_teacher

        teacher = check_teacher(cfg.teacher)
        lacking = {"bn_stats": teacher.feature_prior is None and "a BatchNorm layer feeding its features",
                   "bn_layers": not batchnorm_layers(teacher.model) and "a BatchNorm layer",
                   "prototypes": teacher.classifier is None and "a linear classifier on its features"}[reference]
        if lacking:
            raise UserError(f"filter.reference {reference} needs {lacking}, which the teacher ({teacher.description}) "
                            "does not have; choose another filter.reference (bn_layers: every BatchNorm layer; "
                            "centroids: no teacher internals)")


def against_sources(selection: pd.DataFrame, sources_file: str, class_names: list[str]) -> dict:
    """Precision and class coverage of the kept set against the demo's true sources (diagnostics only:
    the selection is already made). A sample is in-distribution when its true class is known."""
    truth = selection[["uid", "keep"]].merge(read_sources(sources_file).drop_duplicates("uid"), on="uid", how="left")
    in_dist = truth["label"].notna()
    kept = truth[truth["keep"]]
    coverage = {}
    for c, name in enumerate(class_names):
        of_class = truth["label"] == c
        coverage[name] = round(float((of_class & truth["keep"]).sum() / max(of_class.sum(), 1)), 4)
    return {"precision": round(float(in_dist[truth["keep"]].mean()), 4),
            "pool_precision": round(float(in_dist.mean()), 4),
            "recall": round(float((in_dist & truth["keep"]).sum() / max(in_dist.sum(), 1)), 4),
            "class_coverage": coverage,
            "kept_by_source": kept["source"].fillna("unknown").value_counts().to_dict(),
            "pool_by_source": truth["source"].fillna("unknown").value_counts().to_dict()}


def summary_text(s: dict) -> str:
    lines = [f"filter: kept {s['kept']:,} of {s['scored']:,} scored images (policy {s['policy']}, reference "
             f"{s['reference']} on {s['vectors']}, propensity {s['propensity']}).",
             "  dropped: " + (", ".join(f"{k} {v:,}" for k, v in s["dropped_by_reason"].items()) or "none"),
             "  pseudo-classes before: " + _hist(s["pseudo_class_histogram"]["before"]),
             "  pseudo-classes after:  " + _hist(s["pseudo_class_histogram"]["after"]),
             "  similarity (all → kept): " + " ".join(f"{k} {v:.4g}" for k, v in s["similarity_quantiles"]["all"].items())
             + "  →  " + " ".join(f"{k} {v:.4g}" for k, v in s["similarity_quantiles"]["kept"].items()),
             f"  teacher confidence: {s['confidence_mean']['all']} overall, {s['confidence_mean']['kept']} kept",
             f"  weights: mean {s['weights']['mean']}, min {s['weights']['min']}, max {s['weights']['max']}, "
             f"{s['weights']['at_clip']} at the clip bounds {s['weights']['clip']}"]
    for name in ("match_index", "density_index"):
        if s.get(name) and s[name].get("kind") in knn.KINDS:
            lines.append(f"  {name.replace('_', ' ')}: {knn.describe(s[name])}")
    truth = s.get("truth")
    if truth:
        lines.append(f"  diagnostics (true sources, not used to select): precision {truth['precision']:.3f} (pool "
                     f"{truth['pool_precision']:.3f}), recall {truth['recall']:.3f}; kept by source: "
                     + ", ".join(f"{k} {v}" for k, v in truth["kept_by_source"].items()))
        lines.append("  class coverage: " + " ".join(f"{k} {v:.2f}" for k, v in truth["class_coverage"].items()))
    return "\n".join(lines) + "\n"


def _hist(h: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in h.items())


def plot_diagnostics(folder: Path, selection: pd.DataFrame, manifest: pd.DataFrame, class_names: list[str],
                     settings: FilterConfig) -> None:
    """PNG plots: pseudo-classes before/after, and similarity, confidence and weight distributions."""
    plt = pyplot()
    keep = selection["keep"].to_numpy()
    folder.mkdir(parents=True, exist_ok=True)
    x = np.arange(len(class_names))
    before = np.bincount(selection["pseudo_label"], minlength=len(class_names))
    after = np.bincount(selection["pseudo_label"][keep], minlength=len(class_names))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(class_names)), 3.5))
    ax.bar(x - 0.2, before, 0.4, label="scored")
    ax.bar(x + 0.2, after, 0.4, label="kept")
    ax.set_xticks(x, class_names, rotation=90 if len(class_names) > 20 else 0)
    ax.set(xlabel="teacher pseudo-class", ylabel="images", title="pseudo-classes before and after the filter")
    ax.legend()
    _save(fig, folder / "classes.png")
    for name, values, xlabel in (
            ("similarity", selection["similarity"].to_numpy(), f"similarity to the {settings.reference} reference"),
            ("confidence", manifest["confidence"].to_numpy(), "teacher confidence")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.histogram_bin_edges(values, bins=50)
        ax.hist(values[~keep], bins, alpha=0.6, label="dropped")
        ax.hist(values[keep], bins, alpha=0.6, label="kept")
        ax.set(xlabel=xlabel, ylabel="images", title=f"{name}: kept vs dropped")
        ax.legend()
        _save(fig, folder / f"{name}.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(selection["weight"].to_numpy()[keep], bins=50)
    ax.set(xlabel="weight (1 / propensity, normalised)", ylabel="kept images", yscale="log",
           title=f"weights ({settings.propensity})")
    _save(fig, folder / "weights.png")


def _save(fig, path: Path) -> None:
    atomic_write_bytes(path, figure_png(fig))
