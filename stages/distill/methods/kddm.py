"""KDDM (Nguyen et al., ECML-PKDD 2021, "Knowledge Distillation with Distribution Mismatch"):
first learn a distribution over the student's training data from which to sample the images the
teacher classifies well, then train on batches drawn from it. The paper's text beyond its abstract
was not available, so the form of the distribution, its objective and the loss are reconstructions
[R], each switchable (docs/methods.md):

- the distribution: π = softmax(φ) over clusters of the teacher's features (k-means, FAISS), uniform
  within a cluster (``kddm_clusters``; 0: one parameter per sample);
- its objective, maximised by Adam on φ at every step: Σ_k π_k·r_k + γ·H(π), r_k the running mean of
  the teacher's confidence (max softmax) on the cluster's images as the student sees them, with H(π)
  kept at or above ``kddm_entropy_floor``·log K (φ is tempered back whenever a step goes below);
- drawing: each batch is resampled from the loader's batch with probabilities π_{c(i)}/|c(i)|
  (sampling–importance resampling with the uniform stream as proposal);
- the loss (``kddm_loss``): kd (Hinton KD, the default) or confidence (each sample's KD and CE
  weighted by the teacher's confidence, mean 1 in the batch).
"""

import math

import numpy as np
import torch

SETTINGS = {"sampler": "none",  # none | kddm: batches drawn from the learned distribution
            "kddm_gamma": 0.1, "kddm_entropy_floor": 0.5, "kddm_clusters": 64, "kddm_lr": 0.05,
            "kddm_loss": "kd"}  # kd | confidence
PRESET = {"sampler": "kddm"}


def needs(r) -> set[str]:
    return {"teacher_features"} if r.sampler == "kddm" and r.kddm_clusters else set()


def adjust(r, step) -> None:
    if r.kddm_loss == "confidence":
        confidence = step.teacher_logits.softmax(1).amax(1)
        step.weight = step.weight * confidence / confidence.mean()


def terms(r, step) -> dict:
    return {}


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum()


def temper_to_floor(phi: torch.Tensor, floor: float) -> torch.Tensor:
    """φ·t with the largest t in [0, 1] whose softmax keeps entropy ≥ floor (H(softmax(tφ)) falls as t grows)."""
    if entropy(phi.softmax(0)) >= floor:
        return phi
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if entropy((phi * mid).softmax(0)) >= floor else (low, mid)
    return phi * low


def clusters_of(features: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    """Cluster id of each row: k-means (FAISS) on the teacher's features, or one cluster per row (k = 0)."""
    n = len(features) if features is not None else 0
    if not k:
        return np.arange(n)
    from stages.common.faiss_import import faiss

    x = np.ascontiguousarray(features, np.float32)
    k = max(1, min(k, n // 10))  # at least ~10 images per cluster
    kmeans = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, verbose=False)
    kmeans.train(x)
    return kmeans.index.search(x, 1)[1][:, 0].astype(np.int64)


class Sampler:
    """KDDM's learned sampling distribution over the transfer set's rows (module docstring)."""

    def __init__(self, clusters: np.ndarray, confidence: np.ndarray, gamma: float, entropy_floor: float, lr: float,
                 momentum: float = 0.9):
        self.cluster = torch.as_tensor(clusters, dtype=torch.long)
        k = int(self.cluster.max()) + 1
        self.size = torch.bincount(self.cluster, minlength=k).float()
        # the reward starts at the cached (un-augmented) confidence, then follows what the student is shown
        self.reward = torch.zeros(k).index_add_(0, self.cluster, torch.as_tensor(confidence, dtype=torch.float32))
        self.reward /= self.size.clamp_min(1)
        self.phi = torch.zeros(k, requires_grad=True)
        self.gamma, self.floor, self.momentum = gamma, entropy_floor * math.log(k), momentum
        self.optimizer = torch.optim.Adam([self.phi], lr=lr)

    def distribution(self) -> torch.Tensor:
        """π over clusters."""
        return self.phi.detach().softmax(0)

    def row_probability(self, rows: torch.Tensor) -> torch.Tensor:
        c = self.cluster[rows]
        return self.distribution()[c] / self.size[c]

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        """This batch resampled (with replacement) in proportion to each row's probability."""
        p = self.row_probability(batch["row"])
        picks = torch.multinomial(p / p.sum(), len(p), replacement=True, generator=generator)
        return {key: value[picks] for key, value in batch.items()}

    def observe(self, rows: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """Update the clusters' rewards with the teacher's confidence on these images, then one step on φ."""
        confidence = teacher_logits.detach().float().softmax(1).amax(1).cpu()
        c = self.cluster[rows.cpu()]
        seen = torch.zeros_like(self.reward).index_add_(0, c, torch.ones_like(confidence))
        mean = torch.zeros_like(self.reward).index_add_(0, c, confidence) / seen.clamp_min(1)
        self.reward = torch.where(seen > 0, self.momentum * self.reward + (1 - self.momentum) * mean, self.reward)
        pi = self.phi.softmax(0)
        objective = (pi * self.reward).sum() + self.gamma * entropy(pi)
        self.optimizer.zero_grad()
        (-objective).backward()
        self.optimizer.step()
        with torch.no_grad():
            self.phi.copy_(temper_to_floor(self.phi, self.floor))

    def state_dict(self) -> dict:
        return {"phi": self.phi.detach().clone(), "reward": self.reward.clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.phi.copy_(state["phi"])
        self.reward = state["reward"].clone()
        self.optimizer.load_state_dict(state["optimizer"])

    def summary(self) -> dict:
        pi = self.distribution()
        return {"kddm_entropy": round(float(entropy(pi)) / max(math.log(len(pi)), 1e-12), 4),
                "kddm_top_share": round(float(pi.max()), 4)}


def build_sampler(r, features: np.ndarray | None, logits: np.ndarray, seed: int) -> Sampler | None:
    if r.sampler != "kddm":
        return None
    confidence = torch.from_numpy(np.asarray(logits, np.float32)).softmax(1).amax(1).numpy()
    clusters = clusters_of(features, r.kddm_clusters, seed) if r.kddm_clusters else np.arange(len(logits))
    return Sampler(clusters, confidence, r.kddm_gamma, r.kddm_entropy_floor, r.kddm_lr)

