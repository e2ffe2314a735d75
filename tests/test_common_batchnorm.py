"""BatchNorm statistics: DeepInversion's loss against a hand computation, per image, as a score."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from manifests import SCORE, read_manifest
from pipeline.errors import UserError
from stages.common.batchnorm import BatchNormStatistics, batchnorm_layers


def tiny_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(2 * 3 * 3, 4), nn.BatchNorm1d(4)).eval()
    net[1].running_mean.copy_(torch.tensor([0.5, -1.0]))
    net[1].running_var.copy_(torch.tensor([2.0, 0.5]))
    net[5].running_mean.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    net[5].running_var.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    return net


def by_hand(net, x):
    """Each BatchNorm's input in numpy, and R_feature over the batch and per image."""
    with torch.no_grad():
        a = net[0](x).numpy()  # N × 2 × 3 × 3: the first BatchNorm's input
        b = net[4](net[3](net[2](net[1](net[0](x))))).numpy()  # N × 4: the second's
    rm1, rv1 = net[1].running_mean.numpy(), net[1].running_var.numpy()
    rm2, rv2 = net[5].running_mean.numpy(), net[5].running_var.numpy()
    batch = (np.linalg.norm(a.mean((0, 2, 3)) - rm1) + np.linalg.norm(a.var((0, 2, 3)) - rv1)
             + np.linalg.norm(b.mean(0) - rm2) + np.linalg.norm(b.var(0) - rv2))
    image = [np.linalg.norm(a[i].mean((1, 2)) - rm1) + np.linalg.norm(a[i].var((1, 2)) - rv1)
             + np.linalg.norm(b[i] - rm2) for i in range(len(x))]
    return batch, np.array(image)


def test_the_loss_and_the_per_image_distance_equal_a_hand_computation():
    net, x = tiny_net(), torch.randn(5, 1, 3, 3)
    batch, image = by_hand(net, x)
    with BatchNormStatistics(net, per="batch") as stats:
        net(x)
        assert stats.loss().item() == pytest.approx(batch, rel=1e-5)
    with BatchNormStatistics(net, per="image") as stats:
        net(x)
        assert np.allclose(stats.per_image().detach().numpy(), image, rtol=1e-5)
    with BatchNormStatistics(net, per="batch", first_layer_weight=10.0) as stats:
        net(x)
        first = np.linalg.norm(net[0](x).detach().numpy().mean((0, 2, 3)) - [0.5, -1.0]) + \
            np.linalg.norm(net[0](x).detach().numpy().var((0, 2, 3)) - [2.0, 0.5])
        assert stats.loss().item() == pytest.approx(batch + 9 * first, rel=1e-5)
    assert all(not layer._forward_hooks for layer in batchnorm_layers(net))  # removed on exit


def test_optimising_pixels_lowers_the_loss_within_a_few_steps():
    net = tiny_net()
    x = torch.randn(8, 1, 3, 3, requires_grad=True)
    optimiser = torch.optim.Adam([x], lr=0.1)
    with BatchNormStatistics(net) as stats:
        losses = []
        for _ in range(30):
            net(x)
            loss = stats.loss()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses


def test_a_teacher_without_batchnorm_gets_a_clear_message():
    with pytest.raises(UserError, match="has no BatchNorm layer with running statistics"):
        BatchNormStatistics(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()))


def test_score_writes_the_distance_and_it_tells_digits_from_the_rest(upstream, small_web):
    """On the small web, the MNIST teacher's BatchNorm layers find its digits closer than photos,
    letters and noise (AUROC 0.77 when written; chance is 0.5)."""
    manifest = read_manifest(upstream / "score" / "manifest.parquet", SCORE)
    distance = np.load(upstream / "score" / "bn_distance.npy")
    assert distance.shape == (len(manifest),) and np.isfinite(distance).all() and (distance > 0).all()
    truth = manifest[["uid"]].merge(small_web["sources"], on="uid", how="left")
    digits = truth["label"].notna().to_numpy()
    assert roc_auc_score(digits, -distance) > 0.7


def test_the_filter_keeps_the_images_closest_to_every_layer(upstream, small_web, mnist_teacher, private, tmp_path):
    from pipeline.runner import run_stages
    from stages import STAGES
    from tests.conftest import config, fresh

    run_dir = fresh(upstream, tmp_path / "run")
    cfg = config(small_web, run_dir, mnist_teacher, private, "filter.reference=bn_layers", "filter.policy=threshold",
                 "filter.min_similarity=-20")
    run_stages(cfg, STAGES, only=["filter"])
    selection = pd.read_parquet(run_dir / "filter" / "selection.parquet")
    distance = np.load(run_dir / "score" / "bn_distance.npy")
    assert np.allclose(selection["similarity"], -distance)
    assert selection["keep"].tolist() == (-distance >= -20).tolist()
