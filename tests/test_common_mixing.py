"""MixDistribution's operator: per-channel statistics mixing, offline and within a batch."""

import torch

from stages.common.mixing import channel_stats, mix_distribution, mix_within_batch


def test_mix_distribution_gives_the_mixed_channel_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g) * 2 + 5
    partner_mean, partner_std = torch.tensor([[0.0, 1.0, 2.0]] * 2), torch.tensor([[1.0, 0.5, 3.0]] * 2)
    lam = torch.tensor([0.25, 1.0])
    mixed = mix_distribution(x, partner_mean, partner_std, lam)
    mean, std = channel_stats(x)
    new_mean, new_std = channel_stats(mixed)
    assert torch.allclose(new_mean[0], 0.25 * mean[0] + 0.75 * partner_mean[0], atol=1e-4)
    assert torch.allclose(new_std[0], 0.25 * std[0] + 0.75 * partner_std[0], atol=1e-4)
    assert torch.allclose(mixed[1], x[1], atol=1e-4)  # λ = 1: unchanged


def test_online_mixing_pairs_within_class_when_asked():
    x = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 2, 2) + torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    g = torch.Generator().manual_seed(0)
    out = mix_within_batch(x, 0.5, g, same_class=labels)
    # each image's mean moves towards its class partner's mean, never towards the other class
    means = channel_stats(out)[0].flatten()
    assert means[0] >= 1.5 - 1e-5 and means[0] <= 2.5 + 1e-5  # between 1.5 (own) and 2.5 (partner 1)
    assert means[2] >= 3.5 - 1e-5 and means[2] <= 4.5 + 1e-5
