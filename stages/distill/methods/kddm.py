"""KDDM (Nguyen et al., ECML-PKDD 2021, "Knowledge Distillation with Distribution Mismatch"),
reconstructed: a sampling distribution over the transfer set that favours what the teacher
classifies well, q ∝ exp(confidence/γ), applied as importance weights N·q (clipped at 10, mean 1)."""

import numpy as np
import torch

from stages.distill import losses

SETTINGS = {"kddm_gamma": 0.25}
PRESET = {"sample_weights": "kddm"}


def sample_weights(r, filter_weights: np.ndarray, logits: np.ndarray) -> torch.Tensor:
    confidence = torch.from_numpy(np.asarray(logits, np.float32)).softmax(1).amax(1)
    w = losses.sampling_weights(confidence, r.kddm_gamma).clamp(max=10.0)
    return w / w.mean()


def terms(r, step) -> dict:
    return {}
