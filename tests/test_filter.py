"""The filter stage: planted in-distribution cluster vs outliers, weights, IVF recall, policies, errors."""

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from manifests import SCORE, SELECTION, read_manifest, write_manifest
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.runner import run_stages
from stages import STAGES
from stages.filter import knn
from stages.filter import stage as filter_stage
from tests.conftest import REPO, copy_crawl, web_config

CLASSES = 4
DIM = 32


def planted_pool(tmp_path, n_in=800, n_out=400, seed=0, reference=40):
    """A fake score folder: ``n_in`` samples in four class clusters (the private distribution,
    moderately confident) and ``n_out`` outliers far from them that the teacher calls class 0 with
    confidence ~1 (the web's photos). Returns the run directory and the truth mask."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((CLASSES, DIM))
    centres[np.arange(CLASSES), np.arange(CLASSES)] = 4.0
    centres += 1.0

    def cluster(n):
        labels = rng.integers(0, CLASSES, n)
        return np.abs(centres[labels] + rng.normal(0, 0.5, (n, DIM))), labels

    inside, in_labels = cluster(n_in)
    outside = np.abs(rng.normal(0, 1, (n_out, DIM)) * 3 + rng.normal(0, 6, (1, DIM)))
    features = np.concatenate([inside, outside]).astype(np.float16)
    labels = np.concatenate([in_labels, np.zeros(n_out, int)])
    # the private classes are imbalanced in the teacher's eyes: class 0 also collects the outliers
    confidence = np.concatenate([rng.uniform(0.6, 0.95, n_in), rng.uniform(0.99, 1.0, n_out)])
    n = n_in + n_out
    names = ["a", "b", "c", "d"]
    manifest = pd.DataFrame({
        "uid": [f"u{i:05d}" for i in range(n)], "shard": "shards/00000.tar", "key": [f"{i:09d}" for i in range(n)],
        "pseudo_label": labels.astype(np.int32), "pseudo_class": [names[c] for c in labels],
        "confidence": confidence.astype(np.float32), "entropy": np.float32(0.5), "margin": np.float32(0.5),
        "topk_labels": [np.array([c], np.int32) for c in labels], "topk_probs": [np.array([p], np.float32) for p in confidence]})
    score = tmp_path / "run" / "score"
    score.mkdir(parents=True)
    write_manifest(manifest, score / "manifest.parquet", SCORE)
    np.save(score / "features.npy", features)
    (score / "teacher.json").write_text(json.dumps({"class_names": names}))
    np.savez(score / "classifier.npz", weight=centres.astype(np.float32), bias=np.zeros(CLASSES, np.float32))
    sample, _ = cluster(5000)
    np.savez(score / "feature_prior.npz", mean=sample.mean(0).astype(np.float32), std=sample.std(0).astype(np.float32))
    ref, ref_labels = cluster(reference)
    np.savez(score / "reference.npz", features=ref.astype(np.float32), labels=ref_labels,
             logits=np.eye(CLASSES)[ref_labels].astype(np.float32))
    truth = np.arange(n) < n_in
    return tmp_path / "run", truth


def filter_config(run_dir, *overrides):
    """bn_stats unless overridden: the planted pool has a feature prior, not per-layer distances."""
    return load_config(None, [f"run_dir={run_dir}", "filter.reference=bn_stats", *overrides])


def run_filter(run_dir, *overrides):
    filter_stage.run(filter_config(run_dir, *overrides), RunDir(run_dir))
    return read_manifest(run_dir / "filter" / "selection.parquet", SELECTION)


@pytest.mark.parametrize("reference", ["bn_stats", "prototypes", "reference_set"])
def test_planted_cluster_is_kept_and_outliers_dropped(tmp_path, reference):
    run_dir, truth = planted_pool(tmp_path)
    selection = run_filter(run_dir, f"filter.reference={reference}", "filter.policy=balanced",
                           f"filter.budget={truth.sum()}")
    keep = selection["keep"].to_numpy()
    precision, recall = truth[keep].mean(), keep[truth].mean()
    assert precision >= 0.95 and recall >= 0.95, (reference, precision, recall)
    assert set(selection.loc[~keep, "reason"]) == {"over_class_quota"}
    assert selection.loc[keep, "reason"].isna().all()
    # the kept samples are the most similar ones of their pseudo-class
    for c, group in selection.groupby("pseudo_label"):
        if group["keep"].any() and (~group["keep"]).any():
            assert group.loc[group["keep"], "similarity"].min() >= group.loc[~group["keep"], "similarity"].max()


def test_dfnd_confidence_selection_keeps_the_confident_outliers(tmp_path):
    """The failure the filter exists for: the teacher is most confident on what is unlike its data."""
    run_dir, truth = planted_pool(tmp_path)
    keep = run_filter(run_dir, "filter.policy=dfnd", "filter.budget=400")["keep"].to_numpy()
    assert keep.sum() == 400 and truth[keep].mean() < 0.05


def test_threshold_gate_and_reference_set_density_ratio(tmp_path):
    run_dir, truth = planted_pool(tmp_path)
    selection = run_filter(run_dir, "filter.reference=reference_set", "filter.policy=threshold",
                           "filter.min_similarity=-60")
    keep = selection["keep"].to_numpy()
    assert truth[keep].mean() >= 0.95 and keep[truth].mean() >= 0.95
    assert set(selection.loc[~keep, "reason"]) == {"below_min_similarity"}
    ratio = selection["density_ratio"].to_numpy()
    assert np.median(ratio[truth]) > 1 > np.median(ratio[~truth])
    assert (selection["nearest_class"][truth] == selection["pseudo_label"][truth]).mean() > 0.95


def test_weights_mean_one_within_clip_and_favour_rare_classes(tmp_path):
    run_dir, truth = planted_pool(tmp_path)
    selection = run_filter(run_dir, "filter.policy=none", "filter.propensity=class_frequency",
                           "filter.weight_clip=[0.5, 2.0]")
    w = selection["weight"].to_numpy()
    assert abs(w.mean() - 1) < 1e-4 and w.min() >= 0.5 - 1e-6 and w.max() <= 2.0 + 1e-6
    by_class = selection.groupby("pseudo_label")["weight"].mean()
    counts = selection["pseudo_label"].value_counts()
    assert counts.idxmax() == 0 and by_class[0] == by_class.min()
    assert (by_class.drop(0) > by_class[0]).all()
    assert (selection["propensity_formula"] == "class_frequency").all()
    # the propensity is the class's share over the uniform prior
    share = counts / counts.sum()
    np.testing.assert_allclose(selection["propensity"], share[selection["pseudo_label"]].to_numpy() * CLASSES,
                               rtol=1e-5)


def test_weight_power_tempers_the_inverse_propensities(tmp_path):
    run_dir, _ = planted_pool(tmp_path)
    tempered = run_filter(run_dir, "filter.policy=none", "filter.weight_power=0.5", "filter.weight_clip=[0.01, 100]")
    w, e = tempered["weight"].to_numpy(), tempered["propensity"].to_numpy()
    np.testing.assert_allclose(w * np.sqrt(e), (w * np.sqrt(e))[0], rtol=1e-4)  # w ∝ propensity^-0.5
    assert e.std() > 0.1  # the classes are unequal, so this was not a tautology
    off = run_filter(run_dir, "filter.policy=none", "filter.weight_power=0")
    np.testing.assert_allclose(off["weight"], 1.0, rtol=1e-6)


def test_normalised_weights_hits_mean_one_with_clipping():
    raw = np.array([0.01, 0.5, 1, 1, 2, 50, 1000])
    w = filter_stage.normalised_weights(raw, 0.1, 3.0)
    assert abs(w.mean() - 1) < 1e-9 and w.min() >= 0.1 and w.max() <= 3.0
    assert np.all(np.diff(w[np.argsort(raw)]) >= 0)  # the order of the raw weights survives
    assert w[0] == pytest.approx(0.1) and w[-1] == pytest.approx(3.0)


def test_ipwd_propensities_by_hand():
    settings = filter_config("unused").filter
    labels = np.array([0, 1])
    confidence = np.array([0.9, 0.5])
    reference = np.array([[0.3, 0.7], [0.2, 0.8]])
    e, _ = filter_stage.propensity("ipwd_bayes", labels, confidence, reference, None, 2, None, settings)
    np.testing.assert_allclose(e, [0.9 / (0.9 + 0.3), 0.5 / (0.5 + 0.8)])
    e, _ = filter_stage.propensity("ipwd_literal", labels, confidence, reference, None, 2, None, settings)
    np.testing.assert_allclose(1 / e, [1 + np.log(0.3) / np.log(0.9), 1 + np.log(0.8) / np.log(0.5)])


def test_water_fill_gives_short_classes_quota_to_the_others():
    np.testing.assert_array_equal(filter_stage.water_fill(np.array([2, 100, 100, 1]), 40), [2, 19, 18, 1])
    np.testing.assert_array_equal(filter_stage.water_fill(np.array([5, 5]), 40), [5, 5])


def test_ivf_index_recall_is_measured_and_reaches_target():
    # clusters varying along a few latent directions, as learned features do
    rng = np.random.default_rng(0)
    centres, directions = rng.normal(0, 1, (50, 64)), rng.normal(0, 0.3, (4, 64))
    data = (centres[rng.integers(0, 50, 20000)] + rng.normal(0, 1, (20000, 4)) @ directions
            + rng.normal(0, 0.01, (20000, 64))).astype(np.float32)
    index = knn.build_index(data, "l2", exact_max=5000, k=10, target_recall=0.95, recall_queries=500)
    assert index.kind == "ivf_pq" and index.nlist > 1 and index.nprobe <= index.nlist * knn.MAX_PROBED_SHARE
    assert index.recall >= 0.95
    # the recorded recall is true: re-measure it on other queries
    queries = data[rng.choice(len(data), 300, replace=False)]
    exact_distances, exact = knn.search(knn.flat_index(data), queries, 10)
    distances, found = index.search(queries, 10)
    assert knn.recall_at_k(found, exact) >= 0.93
    # the compressed codes only pick candidates: the distances returned (the density estimate reads them) are exact
    np.testing.assert_allclose(distances, ((queries[:, None, :] - data[found]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
    assert knn.describe(index.info()).startswith(f"IVF-PQ fast-scan nlist {index.nlist} nprobe {index.nprobe}")


def test_data_no_index_can_search_fast_falls_back_to_ivf_flat_or_exact_search():
    # isotropic noise: nearest neighbours are barely nearer than the rest, so quantised codes lose them
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(20000, 64)).astype(np.float32)
    exact = knn.build_index(noise, "l2", exact_max=5000, k=10, target_recall=0.99, recall_queries=300)
    assert exact.kind == "flat" and exact.info()["vectors"] == 20000  # probing 1/16 of the lists cannot reach 0.99
    # with a fixed nprobe the user asked for IVF: kept, and its (low) recall recorded rather than hidden
    fixed = knn.build_index(noise, "l2", exact_max=5000, k=10, target_recall=0.99, nprobe=4, recall_queries=300)
    assert fixed.kind == "ivf" and fixed.nprobe == 4 and fixed.recall < 0.99


def test_density_propensity_uses_ivf_above_the_exact_limit_and_records_recall(tmp_path):
    run_dir, _ = planted_pool(tmp_path, n_in=3000, n_out=200)
    # isotropic clusters in 32-d: no index reaches 0.95 probing 1/16 of the lists, so nprobe is fixed here
    run_filter(run_dir, "filter.policy=none", "filter.propensity=class_frequency_x_density",
               "filter.exact_search_max=1000", "filter.ivf_nprobe=16", "filter.target_recall=0.9")
    info = json.loads((run_dir / "filter" / "summary.json").read_text())["density_index"]
    assert info["kind"] in ("ivf", "ivf_pq") and info["recall_at_k"] >= 0.9 and info["vectors"] == 3200
    assert f"recall@11 {info['recall_at_k']} vs exact search" in (run_dir / "filter" / "summary.txt").read_text()


def test_nothing_passes_is_a_clear_error_naming_the_threshold(tmp_path):
    run_dir, _ = planted_pool(tmp_path)
    with pytest.raises(UserError, match=r"filter.min_similarity = 5.0 drops 1,200 of 1,200.*relax filter.min_similarity"):
        run_filter(run_dir, "filter.policy=threshold", "filter.min_similarity=5")
    with pytest.raises(UserError, match=r"filter.min_confidence = 1.01 must be in \[0, 1\]"):  # checked as it loads
        run_filter(run_dir, "filter.min_confidence=1.01")
    assert not (run_dir / "filter" / "selection.parquet").exists()


@pytest.mark.parametrize("overrides, message", [
    (["filter.reference=clip_text"], "clip_text needs open_clip embeddings"),
    (["filter.vectors=embeddings"], "embeddings.npy not found"),
    (["filter.reference=bn_stats", "filter.require_agreement=true", "filter.propensity=none"], None),
    (["filter.weight_clip=[2, 3]"], r"0 < min ≤ 1 ≤ max"),
    (["filter.class_prior=reference"], None),
])
def test_reference_errors_say_what_to_do(tmp_path, overrides, message):
    run_dir, _ = planted_pool(tmp_path)
    if message is None:  # these work: classes from the classifier, prior from the reference's labels
        assert run_filter(run_dir, *overrides)["keep"].any()
        return
    with pytest.raises(UserError, match=message):
        run_filter(run_dir, *overrides)


def test_bn_stats_without_a_prior_names_the_file(tmp_path):
    run_dir, _ = planted_pool(tmp_path)
    (run_dir / "score" / "feature_prior.npz").unlink()
    with pytest.raises(UserError, match=r"feature_prior.npz not found.*choose another filter.reference"):
        run_filter(run_dir, "filter.reference=bn_stats")


def test_diagnostics_against_true_sources(tmp_path):
    run_dir, truth = planted_pool(tmp_path)
    manifest = read_manifest(run_dir / "score" / "manifest.parquet", SCORE)
    sources = pd.DataFrame({"uid": manifest["uid"], "source": np.where(truth, "digits", "photos"),
                            "label": pd.array(np.where(truth, manifest["pseudo_label"], -1)).astype("Int64")})
    sources.loc[~truth, "label"] = pd.NA
    sources.to_parquet(tmp_path / "sources.parquet")
    run_filter(run_dir, "filter.policy=random", "filter.budget=600", f"filter.diagnostics_sources={tmp_path / 'sources.parquet'}")
    summary = json.loads((run_dir / "filter" / "summary.json").read_text())
    selection = read_manifest(run_dir / "filter" / "selection.parquet", SELECTION)
    kept_truth = truth[selection["keep"].to_numpy()]
    assert summary["truth"]["precision"] == pytest.approx(kept_truth.mean(), abs=1e-4)
    assert summary["truth"]["kept_by_source"] == {"digits": int(kept_truth.sum()), "photos": int((~kept_truth).sum())}
    assert set(summary["truth"]["class_coverage"]) == {"a", "b", "c", "d"}
    for png in ("classes", "similarity", "confidence", "weights"):
        assert (run_dir / "filter" / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    text = (run_dir / "filter" / "summary.txt").read_text()
    assert "kept 600 of 1,200" in text and "precision" in text


def test_filter_after_a_real_score_reruns_alone_when_its_settings_change(small_web, crawled, tiny_teacher, tmp_path):
    run_dir = copy_crawl(crawled, tmp_path / "run")
    cfg = web_config(small_web, run_dir, *tiny_teacher["overrides"], "score.batch_size=64", "filter.budget=0.5",
                     "filter.reference=prototypes")
    run_stages(cfg, STAGES, only=["score", "filter"])
    run = RunDir(run_dir)
    score_id, filter_id = run.record("score")["run_id"], run.record("filter")["run_id"]
    scored = read_manifest(run_dir / "score" / "manifest.parquet", SCORE)
    selection = read_manifest(run_dir / "filter" / "selection.parquet", SELECTION)
    assert list(selection["uid"]) == list(scored["uid"])
    assert selection["keep"].sum() == round(0.5 * len(scored))
    assert run.record("filter")["counts"]["kept"] == selection["keep"].sum()

    cfg = web_config(small_web, run_dir, *tiny_teacher["overrides"], "score.batch_size=64", "filter.budget=0.5",
                     "filter.reference=prototypes", "filter.policy=dfnd")
    run_stages(cfg, STAGES, only=["score", "filter"])
    assert run.record("score")["run_id"] == score_id  # not re-scored
    assert run.record("filter")["run_id"] != filter_id
    selection = read_manifest(run_dir / "filter" / "selection.parquet", SELECTION)
    kept = scored["confidence"][selection["keep"].to_numpy()]
    assert kept.min() >= scored["confidence"][~selection["keep"].to_numpy()].max()


def test_bn_stats_without_a_classifier_has_no_classes(tmp_path):
    """A teacher whose classifier webdistill cannot read (TorchScript): bn_stats still filters."""
    run_dir, truth = planted_pool(tmp_path)
    (run_dir / "score" / "classifier.npz").unlink()
    selection = run_filter(run_dir, "filter.policy=threshold", "filter.min_similarity=-3")
    assert selection["nearest_class"].isna().all() and selection["agrees"].isna().all()
    assert truth[selection["keep"].to_numpy()].mean() >= 0.95
    with pytest.raises(UserError, match="require_agreement needs a reference with classes"):
        run_filter(run_dir, "filter.require_agreement=true")


@pytest.mark.parametrize("reference,needs", [("bn_stats", "a BatchNorm layer feeding its features"),
                                             ("bn_layers", "a BatchNorm layer")])
def test_a_reference_the_teacher_cannot_give_is_refused_before_anything_runs(reference, needs, tmp_path):
    from pipeline.config import load_config
    from stages.filter.stage import preflight
    from tests.test_synthesize import NoBatchNorm

    torch.save(NoBatchNorm().state_dict(), tmp_path / "net.pt")
    cfg = load_config(None, ["teacher.format=entrypoint", "teacher.arch=tests.test_synthesize:NoBatchNorm",
                             f"teacher.checkpoint={tmp_path / 'net.pt'}", "teacher.input_size=28",
                             "teacher.channels=1", "teacher.class_names=[a, b, c, d, e, f, g, h, i, j]",
                             f"filter.reference={reference}"])
    with pytest.raises(UserError, match=f"filter.reference {reference} needs {needs}, which the teacher"):
        preflight(cfg)
    with pytest.raises(UserError, match="set score.bn_distance: true"):
        preflight(load_config(None, ["filter.reference=bn_layers", "score.bn_distance=false"]))


def test_without_faiss_the_stage_says_how_to_install_it():
    code = ("import sys; sys.modules['faiss'] = None\n"  # as if neither FAISS wheel were installed
            "from pipeline.errors import UserError\n"
            "try:\n    import stages.filter.knn\nexcept UserError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.startswith("FAISS is not installed in this environment: `make setup` installs faiss-cpu")
    assert "`make setup GPU=1` faiss-gpu" in out


def test_a_database_split_across_index_servers_searches_as_one(tmp_path):
    """The path for databases beyond one machine: each part served by FAISS's index server (here two on
    loopback, one of them approximate), merged by ShardedIndex into the whole database's neighbours."""
    import socket
    import threading

    rng = np.random.default_rng(0)
    centres, directions = rng.normal(0, 1, (20, 64)), rng.normal(0, 0.3, (4, 64))
    data = (centres[rng.integers(0, 20, 12000)] + rng.normal(0, 1, (12000, 4)) @ directions
            + rng.normal(0, 0.01, (12000, 64))).astype(np.float32)
    queries = data[rng.choice(len(data), 200, replace=False)]
    parts = []
    for first, stop, exact_max in ((0, 4000, 50000), (4000, 12000, 2000)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        threading.Thread(target=knn.serve_part, args=(data[first:stop], port), daemon=True,
                         kwargs={"exact_max": exact_max, "k": 10}).start()
        parts.append(("127.0.0.1", port, first))
    for attempt in range(200):  # the servers build their indexes, then listen
        try:
            sharded = knn.ShardedIndex(parts)
            break
        except ConnectionRefusedError:
            time.sleep(0.1)
    distances, found = sharded.search(queries, 10)
    exact_distances, exact = knn.search(knn.flat_index(data), queries, 10)
    assert knn.recall_at_k(found, exact) >= 0.95  # the second part's index is approximate
    assert (found[:, 0] == exact[:, 0]).mean() > 0.99 and set(found.ravel()) - set(range(len(data))) == set()
    assert (found >= 4000).any() and (found < 4000).any()  # both servers answered, ids in the whole's rows
    np.testing.assert_allclose(distances, ((queries[:, None, :] - data[found]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
