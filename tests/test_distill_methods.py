"""Every distillation loss against a value computed by hand on a tiny tensor (numbers in comments), and
the method registry: every method file keeps the same contract, the loop sums their named terms."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import UserError
from stages.distill import losses
from stages.distill.methods import METHODS, PRESETS, Recipe, configure, resolve


def close(a, b, tol=1e-5):
    return abs(float(torch.as_tensor(a).detach()) - float(torch.as_tensor(b).detach())) < tol


def test_kd_is_t_squared_kl_by_hand():
    # teacher logits [0, ln 3] at T=1 → p_t = [1/4, 3/4]; student [0, 0] → p_s = [1/2, 1/2]
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812...
    t = torch.tensor([[0.0, math.log(3)]])
    s = torch.zeros(1, 2)
    assert close(losses.kd_per_sample(s, t, 1.0)[0], 0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    # at T=2 the logits halve: p_t = [1/(1+√3), √3/(1+√3)], and the KL is multiplied by T² = 4
    a = 1 / (1 + math.sqrt(3))
    kl = a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a))
    assert close(losses.kd_per_sample(s, t, 2.0)[0], 4 * kl)
    assert close(losses.kd_per_sample(t, t, 4.0)[0], 0.0)


def test_weighted_mean_scales_samples_without_renormalising():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert close(losses.weighted_mean(per_sample), 2.5)
    # (2·1 + 0·2 + 1·3 + 1·4) / 4 = 9/4; an all-zero weight gives 0, not NaN
    assert close(losses.weighted_mean(per_sample, torch.tensor([2.0, 0.0, 1.0, 1.0])), 2.25)
    assert close(losses.weighted_mean(per_sample, torch.zeros(4)), 0.0)


def test_ce_with_hard_labels_by_hand():
    # logits [ln 1, ln 3] → p = [1/4, 3/4]; label 0 → −ln(1/4)
    assert close(losses.ce_per_sample(torch.tensor([[0.0, math.log(3)]]), torch.tensor([0]))[0], math.log(4))


def test_dfnd_transition_matrix_and_noise_adaptation_by_hand():
    # 3 classes, θ = 0: off-diagonal entries share 1 − 0.7 equally → 0.15 each
    q = losses.transition_matrix(torch.zeros(3, 2), 0.7)
    assert torch.allclose(q, torch.tensor([[0.7, 0.15, 0.15], [0.15, 0.7, 0.15], [0.15, 0.15, 0.7]]))
    assert torch.allclose(q.sum(1), torch.ones(3))
    # θ of row 0 = [ln 3, 0] → softmax [3/4, 1/4] · 0.3 = [0.225, 0.075] at columns 1 and 2
    theta = torch.zeros(3, 2)
    theta[0, 0] = math.log(3)
    assert torch.allclose(losses.transition_matrix(theta, 0.7)[0], torch.tensor([0.7, 0.225, 0.075]))
    # student p = [1, 0, 0] (logits 0/−inf-ish); (p·Q) = row 0 of Q; teacher label 1 → −ln(0.15)
    s = torch.tensor([[0.0, -60.0, -60.0]])
    assert close(losses.noise_adaptation_per_sample(s, torch.tensor([1]), q)[0], -math.log(0.15), 1e-4)
    assert close(losses.noise_adaptation_per_sample(s, torch.tensor([0]), q)[0], -math.log(0.7), 1e-4)


def test_dfnd_batch_selection_keeps_the_most_confident_share():
    t = torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 3.0], [0.0, 0.2]])  # confidences: high, low, high, low
    assert torch.equal(losses.confident_share(t, 0.5), torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_kd3_combined_selection_by_hand():
    # teacher p = [0.8, 0.2] (logits ln 4, 0); student p = [0.2, 0.8]; λ = 0.5 → p_c = [0.5, 0.5] → conf 0.5
    t = torch.tensor([[math.log(4), 0.0], [math.log(9), 0.0]])  # second sample: teacher [0.9, 0.1]
    s = torch.tensor([[0.0, math.log(4)], [math.log(9), 0.0]])  # student [0.2, 0.8], [0.9, 0.1]
    mask, labels, conf = losses.combined_selection(t, s, 0.5, "threshold", 0.6, 0.5)
    assert torch.allclose(conf, torch.tensor([0.5, 0.9]))
    assert torch.equal(mask, torch.tensor([0.0, 1.0]))
    assert labels[1] == 0
    # λ = 1: the teacher alone → confidences 0.8 and 0.9, both pass 0.6
    mask, _, conf = losses.combined_selection(t, s, 1.0, "threshold", 0.6, 0.5)
    assert torch.allclose(conf, torch.tensor([0.8, 0.9])) and mask.sum() == 2
    mask, _, _ = losses.combined_selection(t, s, 0.5, "top_k", 0.0, 0.5)
    assert torch.equal(mask, torch.tensor([0.0, 1.0]))


def test_feature_alignment_and_classifier_alignment_by_hand():
    h = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    f = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # sample 0: (0² + 2²)/2 = 2; sample 1: (9 + 16)/2 = 12.5
    assert torch.allclose(losses.feature_alignment_per_sample(h, f), torch.tensor([2.0, 12.5]))
    # W_t·P = [[1, 0]]·[[2, 0], [0, 2]] = [[2, 0]]; W_s = [[1, 1]] → ((1−2)² + (1−0)²)/2 = 1
    assert close(losses.classifier_alignment(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]),
                                             2 * torch.eye(2)), 1.0)


def test_info_nce_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # cosine matrix = I; at τ = 1 row 0 logits [1, 0] → −ln(e/(e+1))
    expected = -math.log(math.e / (math.e + 1))
    assert torch.allclose(losses.info_nce(a, p, 1.0), torch.full((2,), expected))
    # swapped positives: each anchor's positive is orthogonal, the negative aligned → −ln(1/(e+1))
    assert torch.allclose(losses.info_nce(a, p.flip(0), 1.0), torch.full((2,), math.log(math.e + 1)))
    # scale does not matter (cosine)
    assert torch.allclose(losses.info_nce(3 * a, p, 0.5), losses.info_nce(a, p, 0.5))


def test_iekd_factor_distance_inheritance_exploration_reconstruction_by_hand():
    x = torch.tensor([[3.0, 4.0]]).reshape(1, 2, 1, 1)  # unit: [0.6, 0.8]
    y = torch.tensor([[1.0, 0.0]]).reshape(1, 2, 1, 1)
    # |0.6 − 1| + |0.8 − 0| = 1.2, mean over 2 entries = 0.6
    assert close(losses.factor_distance(x, y), 0.6)
    assert close(losses.inheritance_loss(x, y), 0.6)
    assert close(losses.exploration_loss(x, y), -0.6)
    assert close(losses.inheritance_loss(2 * y, y), 0.0)
    assert close(losses.reconstruction_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])), 1.5)
    with pytest.raises(ValueError, match="4-D"):  # the official code asserts feature maps
        losses.factor_distance(torch.ones(2, 3), torch.ones(2, 3))


def test_iekd_factor_distance_is_the_official_formula_on_feature_maps():
    """The authors' ``_factor_transfer(x, y, p=1)``: per-sample L2 normalisation of the flattened maps,
    then ‖x − y‖_p^p / numel, to the power 1/p."""
    def official(x, y, p=1):
        x = x.reshape(len(x), -1) / x.reshape(len(x), -1).norm(dim=1, keepdim=True).clamp_min(1e-12)
        y = y.reshape(len(y), -1) / y.reshape(len(y), -1).norm(dim=1, keepdim=True).clamp_min(1e-12)
        diff = x - y
        return (torch.linalg.vector_norm(diff, ord=p) ** p / diff.numel()) ** (1 / p)

    torch.manual_seed(0)
    x, y = torch.randn(8, 32, 7, 7), torch.randn(8, 32, 7, 7)
    assert close(losses.factor_distance(x, y), official(x, y))
    assert close(losses.exploration_loss(x, y), -official(x, y))


def test_iekd_coder_tap_and_auto_encoder_on_feature_maps():
    from stages.common.models import create_model
    from stages.distill.model import AutoEncoder, FeatureMapTap, coder, train_autoencoder

    net = create_model("resnet8", "webdistill", num_classes=10, in_chans=1)
    tap = FeatureMapTap(net, "a test")
    net.eval()(torch.zeros(2, 1, 28, 28))
    fmap = tap.take()
    assert fmap.dim() == 4 and fmap.shape[2] * fmap.shape[3] > 1  # the map before global pooling
    # the official coder: LeakyReLU, then 3 × (conv 3×3 without bias, BN, LeakyReLU), c_in → c_in → c_out → c_out
    convs = [m for m in coder(64, 32).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (64, 64, (3, 3), None), (64, 32, (3, 3), None), (32, 32, (3, 3), None)]
    ae = AutoEncoder(64)
    factor, rebuilt = ae(torch.randn(4, 64, 7, 7))
    assert factor.shape == (4, 32, 7, 7) and rebuilt.shape == (4, 64, 7, 7)  # half the channels, as 64 → 32
    generator = torch.Generator().manual_seed(0)
    maps = [torch.relu(torch.randn(16, 8, 4, 4, generator=generator)) for _ in range(4)]
    _, history = train_autoencoder(lambda epoch: iter(maps), 8, epochs=8, seed=0, device="cpu")
    assert history[-1] < history[0]  # the reconstruction improves


def test_kddm_sampler_moves_towards_confident_images_and_keeps_entropy_above_its_floor():
    from stages.distill.methods.kddm import Sampler, entropy

    # 4 clusters of 10 rows; the teacher is confident on cluster 2, unsure elsewhere
    clusters = torch.arange(40) // 10
    confident = torch.where(clusters == 2, 0.99, 0.6)
    sampler = Sampler(clusters.numpy(), confident.numpy(), gamma=0.01, entropy_floor=0.6, lr=0.1)
    assert torch.allclose(sampler.distribution(), torch.full((4,), 0.25))  # it starts uniform
    logits = torch.stack([confident, 1 - confident], 1).log()  # max softmax = the confidence
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows = torch.randint(0, 40, (16,), generator=generator)
        sampler.observe(rows, logits[rows])
    pi = sampler.distribution()
    assert pi.argmax() == 2 and pi[2] > 0.5  # moved towards what the teacher classifies confidently
    assert entropy(pi) >= 0.6 * math.log(4) - 1e-4  # ... but not below the floor (γ alone would collapse it)
    assert entropy(pi) < 0.6 * math.log(4) + 1e-2  # the floor is what holds it
    # draws follow π: cluster 2's rows make up about π₂ of a large resampled batch
    batch = {"row": torch.arange(40).repeat(50), "image": torch.zeros(2000, 1)}
    drawn = sampler.draw(batch, torch.Generator().manual_seed(1))["row"]
    share = (clusters[drawn] == 2).float().mean()
    assert abs(share - pi[2]) < 0.04
    # its state round-trips (resume)
    other = Sampler(clusters.numpy(), confident.numpy(), gamma=0.01, entropy_floor=0.6, lr=0.1)
    other.load_state_dict(sampler.state_dict())
    assert torch.equal(other.distribution(), pi)


def test_kddm_temper_to_floor_by_hand():
    from stages.distill.methods.kddm import entropy, temper_to_floor

    phi = torch.tensor([3.0, 0.0, 0.0])
    floor = 0.9 * math.log(3)
    tempered = temper_to_floor(phi, floor)
    assert abs(entropy(tempered.softmax(0)) - floor) < 1e-4 and tempered[0] < phi[0]
    assert torch.equal(temper_to_floor(phi, 0.1), phi)  # above the floor: unchanged


def test_kddm_clusters_follow_the_features():
    from stages.distill.methods.kddm import clusters_of

    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 0.1, (50, 4)), rng.normal(5, 0.1, (50, 4))]).astype(np.float32)
    c = clusters_of(features, 2, seed=0)
    assert len(set(c[:50])) == 1 and len(set(c[50:])) == 1 and c[0] != c[50]
    assert (clusters_of(features, 0, seed=0) == np.arange(100)).all()


def test_presets_fill_nulls_and_explicit_keys_win():
    kd3 = resolve(load_config(None, ["distill.preset=kd3"]).distill)
    assert kd3.selection == "threshold" and kd3.classifier == "shared" and kd3.perturbation == "offline"
    mixed = resolve(load_config(None, ["distill.preset=kd3", "distill.classifier=own", "distill.temperature=2"]).distill)
    assert mixed.classifier == "own" and mixed.temperature == 2.0 and mixed.selection == "threshold"
    ipwd = resolve(load_config(None, ["distill.preset=ipwd"]).distill)
    assert ipwd.propensity == "two_head" and ipwd.ipwd_formula == "bayes" and ipwd.sample_weights == "none"
    assert set(PRESETS) == {"kd", "pskd", "dfnd", "ipwd", "kd3", "iekd", "iedml", "kddm", "pskd_ipwd", "kd3_ipw",
                            "webdistill"}
    # the bench's choice: webdistill is Hinton KD; the KD³ + IPW recipe it replaced lives on as kd3_ipw
    def recipe(preset):
        return resolve(load_config(None, [f"distill.preset={preset}"]).distill)

    assert recipe("webdistill") == recipe("kd")
    assert recipe("kd3_ipw") == Recipe(**{**vars(kd3), "sample_weights": "filter"})  # the filter's weights
    with pytest.raises(UserError, match="perturbed view"):
        resolve(load_config(None, ["distill.contrastive_weight=0.5"]).distill)
    with pytest.raises(UserError, match="did you mean 'temperature'"):
        load_config(None, ["distill.temprature=3"])




# ---------------------------------------------------------------- the registry (every method, the same contract)

@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_settings_of_the_config_and_named_terms(name):
    import dataclasses

    from stages.distill.config import DistillConfig
    from stages.distill.methods import Step

    method = METHODS[name]
    config_keys = {f.name for f in dataclasses.fields(DistillConfig)}
    assert set(method.SETTINGS) <= config_keys and set(method.PRESET) <= config_keys
    cfg = load_config(None, [f"distill.preset={name}"])
    recipe = configure(resolve(cfg.distill), cfg.teacher)
    n, classes = 4, 3
    torch.manual_seed(0)
    # every output a method may read: KD³'s projections, IPWD's heads, IE-DML's peer and factors
    out = {"projected": torch.randn(2 * n, 5), "contrast": torch.randn(2 * n, 7), "head_cls": torch.randn(n, classes),
           "head_kd": torch.randn(n, classes), "peer_logits": torch.randn(n, classes),
           **{f"{p}{k}": torch.randn(n, 2, 3, 3) for p in ("", "peer_") for k in ("factor", "inherit", "explore")},
           "reconstruction": torch.tensor(0.5), "peer_reconstruction": torch.tensor(0.25)}
    step = Step(torch.randn(n, classes), torch.randn(n, classes), torch.randn(n, 5), out, weight=torch.ones(n),
                labels=torch.zeros(n, dtype=torch.long), confidence=torch.ones(n), epoch_fraction=0.5,
                model=SimpleNamespace(theta=torch.zeros(classes, 2)),
                teacher_head=None, autoencoder=None, previous=torch.softmax(torch.randn(n, classes), 1))
    if hasattr(method, "adjust"):
        method.adjust(recipe, step)
    for term, (weight, value) in method.terms(recipe, step).items():
        assert isinstance(term, str) and weight > 0 and value.ndim == 0 and torch.isfinite(value)


def test_the_config_offers_exactly_the_registered_presets():
    import dataclasses

    from stages.distill.config import DistillConfig

    preset = next(f for f in dataclasses.fields(DistillConfig) if f.name == "preset")
    assert set(preset.metadata["choices"]) == set(PRESETS)


def test_the_loop_sums_every_methods_weighted_terms_in_registry_order():
    from stages.distill.methods import Step, loss

    recipe = resolve(load_config(None, ["distill.preset=kd3", "distill.selection=none"]).distill)
    torch.manual_seed(0)
    n = 4
    out = {"projected": torch.randn(2 * n, 5), "contrast": torch.randn(2 * n, 7)}
    step = Step(torch.randn(n, 3), torch.randn(n, 3), torch.randn(n, 5), out,
                weight=torch.ones(n), labels=torch.zeros(n, dtype=torch.long), confidence=torch.ones(n),
                epoch_fraction=0.0, model=None, teacher_head=None, autoencoder=None)
    total, terms = loss(recipe, step)
    # InfoNCE on its own projection head, not on h (which feeds the shared classifier)
    assert close(terms["contrastive"], losses.info_nce(out["contrast"][:n], out["contrast"][n:], 0.1).mean())
    assert list(terms) == ["kd", "ce", "feature", "contrastive"]  # classifier: shared has no term of its own
    expected = 0.9 * terms["kd"] + 0.1 * terms["ce"] + 1.0 * terms["feature"] + 0.1 * terms["contrastive"]
    assert torch.allclose(total, expected)


def test_dfnd_selects_for_the_kd_term_only_the_noise_term_sees_the_whole_batch():
    """mmrazor's DFNDLoss: KD summed over the confident half and divided by the batch size, the
    noise adaptation NLL averaged over every sample."""
    from stages.distill.methods import Step, loss

    cfg = load_config(None, ["distill.preset=dfnd"])
    recipe = configure(resolve(cfg.distill), cfg.teacher)  # no teacher accuracy reported: Q's diagonal 0.95
    assert recipe.batch_select == 0.5 and recipe.noise_adaptation_weight == 1.0 and recipe.teacher_accuracy == 0.95
    teacher = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.2]])  # confident: 0, 2
    student = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.5, 0.0, 0.0]])
    labels = teacher.argmax(1)
    step = Step(student, teacher, None, {}, weight=torch.ones(4), labels=labels, confidence=torch.ones(4),
                epoch_fraction=0.0, model=SimpleNamespace(theta=torch.zeros(3, 2)), teacher_head=None,
                autoencoder=None)
    _, terms = loss(recipe, step)
    kd = losses.kd_per_sample(student, teacher, recipe.temperature)
    assert close(terms["kd"], (kd[0] + kd[2]) / 4)
    noise = losses.noise_adaptation_per_sample(student, labels, losses.transition_matrix(torch.zeros(3, 2), 0.95))
    assert close(terms["noise"], noise.mean())
    assert not close(noise.mean(), (noise[0] + noise[2]) / 4)  # masking it would give another value


def test_dfnd_q_diagonal_is_the_teachers_reported_accuracy_unless_set():
    def diagonal(*overrides):
        cfg = load_config(None, ["distill.preset=dfnd", *overrides])
        return configure(resolve(cfg.distill), cfg.teacher).teacher_accuracy

    assert diagonal("teacher.accuracy=0.9913") == 0.9913
    assert diagonal("teacher.accuracy=0.9913", "distill.teacher_accuracy=0.8") == 0.8
    assert diagonal() == 0.95
    kd = load_config(None, ["teacher.accuracy=0.9913"])  # a recipe without noise adaptation is left as it is
    assert configure(resolve(kd.distill), kd.teacher).teacher_accuracy is None


# ---------------------------------------------------------------- IPWD

def test_ipwd_weights_both_formulas_by_hand():
    from stages.distill.methods.ipwd import logit_norm, propensity_weights

    z = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(logit_norm(z, 0.5), torch.tensor([[1.2, 1.6]]))  # z / (τ‖z‖), ‖z‖ = 5
    cls, kd = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1])
    p_cls = torch.softmax(logit_norm(cls, 1.0), 1)[[0, 1], labels]
    p_kd = torch.softmax(logit_norm(kd, 1.0), 1)[[0, 1], labels]
    bayes = 1 + p_cls / p_kd
    assert torch.allclose(propensity_weights(cls, kd, labels, "bayes", 1.0, 10.0), bayes / bayes.mean())
    literal = 1 + (-p_cls.log()) / (-p_kd.log())
    assert torch.allclose(propensity_weights(cls, kd, labels, "literal", 1.0, 10.0), literal / literal.mean())
    # a sample the KD head gives its label little probability gets the larger Bayes weight, clipped
    cls, kd = torch.tensor([[5.0, 0.0], [5.0, 0.0]]), torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    w = propensity_weights(cls, kd, torch.tensor([0, 0]), "bayes", 0.5, 1.5)
    assert w[1] == 1.5 and w[0] < 1


def test_ipwd_weights_only_the_kd_term():
    from stages.distill.methods import Step, loss

    cfg = load_config(None, ["distill.preset=ipwd"])
    recipe = configure(resolve(cfg.distill), cfg.teacher)
    torch.manual_seed(0)
    n, c = 6, 3
    out = {"head_cls": torch.randn(n, c), "head_kd": torch.randn(n, c)}
    student, teacher = torch.randn(n, c), torch.randn(n, c)
    step = Step(student, teacher, None, out, weight=torch.ones(n), labels=teacher.argmax(1),
                confidence=torch.ones(n), epoch_fraction=0.5, model=None, teacher_head=None, autoencoder=None)
    _, terms = loss(recipe, step)
    from stages.distill.methods.ipwd import propensity_weights

    w = propensity_weights(out["head_cls"], out["head_kd"], teacher.argmax(1), "bayes", 0.04, 10.0)
    assert close(terms["kd"], (losses.kd_per_sample(student, teacher, 4.0) * w).mean())
    assert close(terms["ce"], losses.ce_per_sample(student, teacher.argmax(1)).mean())  # unweighted
    assert {"head_ce", "head_kd", "ipwd_weight_max"} <= set(terms)


def test_two_head_propensities_up_weight_what_the_teacher_under_represents():
    """A planted imbalance: class 0 is 90% of the data and the teacher is sure of it; on the rare class 1
    the teacher gives the true label only 0.55. After training the heads as distill does, IPWD's weights
    are larger on the rare class."""
    from stages.distill.methods import Step, loss

    cfg = load_config(None, ["distill.preset=ipwd"])
    recipe = configure(resolve(cfg.distill), cfg.teacher)
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(400, generator=generator) < 0.1).long()
    features = torch.randn(400, 4, generator=generator) * 0.3 + torch.stack(
        [labels.float() * 2 - 1, 1 - labels.float() * 2, torch.zeros(400), torch.ones(400)], 1)
    p_true = torch.where(labels == 0, 0.95, 0.55)
    teacher = torch.stack([torch.where(labels == 0, p_true, 1 - p_true), torch.where(labels == 1, p_true, 1 - p_true)],
                          1).log()
    heads = torch.nn.ModuleDict({"cls": torch.nn.Linear(4, 2), "kd": torch.nn.Linear(4, 2)})
    optimizer = torch.optim.Adam(heads.parameters(), lr=0.05)
    for _ in range(150):
        out = {"head_cls": heads["cls"](features), "head_kd": heads["kd"](features)}
        step = Step(torch.zeros(400, 2), teacher, None, out, weight=torch.ones(400), labels=labels,
                    confidence=torch.ones(400), epoch_fraction=0.5, model=None, teacher_head=None, autoencoder=None)
        total, _ = loss(recipe, step)
        optimizer.zero_grad()
        total.backward()  # the kd and ce terms are constants here (fixed student logits, weights detached)
        optimizer.step()
    from stages.distill.methods.ipwd import propensity_weights

    with torch.no_grad():
        w = propensity_weights(heads["cls"](features), heads["kd"](features), labels, "bayes", 0.04, 10.0)
    assert w[labels == 1].mean() > 1.2 * w[labels == 0].mean()


# ---------------------------------------------------------------- PS-KD (IPWD's one-stage setting)

def test_pskd_target_schedule_and_loss_by_hand():
    from stages.distill.methods import Step, loss, pskd

    recipe = resolve(load_config(None, ["distill.preset=pskd"]).distill)
    assert recipe.labels == "folder" and recipe.kd_weight == 0 and recipe.ce_weight == 0
    # α_t = α_T·(epoch + 1)/epochs, as the official code: 0.16, 0.32, …, 0.8 over 5 epochs
    assert [round(pskd.alpha(recipe, e, 5), 4) for e in range(5)] == [0.16, 0.32, 0.48, 0.64, 0.8]
    store = torch.full((4, 3), 1 / 3)
    labels = torch.tensor([2, 0])
    first = pskd.previous_targets(store, torch.tensor([1, 3]), labels, epoch=0)
    assert torch.equal(first, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))  # one-hot in the first epoch
    later = pskd.previous_targets(store, torch.tensor([0]), torch.tensor([1]), epoch=3)
    assert torch.equal(later, torch.full((1, 3), 1 / 3))  # the stored predictions afterwards

    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    previous = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    labels = torch.tensor([0, 2])
    step = Step(student, torch.zeros(2, 3), None, {}, weight=torch.ones(2), labels=labels, confidence=torch.ones(2),
                epoch_fraction=0.5, model=None, teacher_head=None, autoencoder=None, previous=previous, epoch=2,
                epochs=5)
    _, terms = loss(recipe, step)
    assert set(terms) == {"pskd"}  # the preset's only term: no teacher KD, no plain CE
    a = 0.48
    target = (1 - a) * torch.nn.functional.one_hot(labels, 3).float() + a * previous
    expected = -(target * torch.log_softmax(student, 1)).sum(1).mean()
    assert close(terms["pskd"], expected)


def test_pskd_ipwd_weights_the_self_distilled_part_and_learns_the_previous_predictions():
    from stages.distill.methods import Step, loss
    from stages.distill.methods.ipwd import propensity_weights

    recipe = resolve(load_config(None, ["distill.preset=pskd_ipwd"]).distill)
    torch.manual_seed(1)
    student, previous = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    labels = torch.tensor([0, 1, 2, 0])
    out = {"head_cls": torch.randn(4, 3), "head_kd": torch.randn(4, 3)}
    step = Step(student, torch.zeros(4, 3), None, out, weight=torch.ones(4), labels=labels, confidence=torch.ones(4),
                epoch_fraction=0.9, model=None, teacher_head=None, autoencoder=None, previous=previous, epoch=4,
                epochs=5)
    _, terms = loss(recipe, step)
    w = propensity_weights(out["head_cls"], out["head_kd"], labels, "bayes", 0.04, 10.0)
    log_p = torch.log_softmax(student, 1)
    expected = (0.2 * -log_p[range(4), labels] + 0.8 * w * -(previous * log_p).sum(1)).mean()
    assert close(terms["pskd"], expected)
    # the KD head's target is the previous predictions (the "machine domain" of self-distillation), at T = 1
    kd_head = losses.kd_per_sample(ipwd_logit_norm(out["head_kd"]), previous.log(), 1.0).mean()
    assert close(terms["head_kd"], kd_head)


def ipwd_logit_norm(z):
    from stages.distill.methods.ipwd import logit_norm

    return logit_norm(z, 0.04)


# ---------------------------------------------------------------- IE-DML

def test_iedml_two_students_learn_from_each_others_factors():
    from stages.common.student import Student
    from stages.distill.methods import Step, loss
    from stages.distill.methods.iedml import mutual_kl
    from stages.distill.model import DistillModel

    recipe = resolve(load_config(None, ["distill.preset=iedml"]).distill)
    assert recipe.mutual == "iedml" and recipe.kd_weight == 0 and "autoencoder" not in METHODS["iekd"].needs(recipe)
    torch.manual_seed(0)
    first, second = (Student("resnet8", "webdistill", {}, 10, 1, input_size=28) for _ in range(2))
    model = DistillModel(first, 10, None, False, None, 0.3, input_size=28, peer=second)
    x, labels = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    out = model(x)
    assert out["factor"].shape == out["peer_factor"].shape and not out["factor"].requires_grad  # targets
    step = Step(out["logits"], torch.zeros(6, 10), None, out, weight=torch.ones(6), labels=labels,
                confidence=torch.ones(6), epoch_fraction=0.0, model=model, teacher_head=None, autoencoder=None)
    total, terms = loss(recipe, step)
    assert {"ce", "mutual", "peer_mutual", "peer_ce", "inherit", "explore", "peer_inherit", "peer_explore",
            "reconstruction"} == set(terms)
    assert "kd" not in terms  # no teacher
    assert close(terms["inherit"], losses.factor_distance(out["inherit"], out["peer_factor"]))  # the partner's factor
    assert close(terms["peer_explore"], -losses.factor_distance(out["peer_explore"], out["factor"]))
    assert close(terms["mutual"], mutual_kl(out["logits"], out["peer_logits"]).mean())
    total.backward()
    for net in (model.student, model.peer.student, model.own_autoencoder, model.peer.autoencoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
