"""IPWD (Niu et al., NeurIPS 2022, "Respecting Transfer Gap in Knowledge Distillation"): every
loss term weighted per sample by the inverse propensity 1/P(machine domain | x). The propensities
and weights come from the filter stage (``filter.propensity``, schema manifests.SELECTION); this
method only applies them."""

import numpy as np
import torch

SETTINGS: dict = {}
PRESET = {"sample_weights": "filter"}


def sample_weights(r, filter_weights: np.ndarray, logits: np.ndarray) -> torch.Tensor:
    """The filter's normalised, clipped inverse-propensity weight of each kept sample."""
    return torch.from_numpy(np.asarray(filter_weights, np.float32))


def terms(r, step) -> dict:
    return {}
