"""bench: stage sharing between run directories, the method comparison, the ablation table."""


import numpy as np
import pandas as pd
import pytest

from pipeline.config import dump_yaml
from stages import STAGES
from tests.conftest import config, fresh


def test_bench_links_done_stages_and_drops_links_that_no_longer_match(upstream, small_web, mnist_teacher, private,
                                                                      tmp_path):
    from bench.methods import link_done_stages
    from pipeline.rundir import RunDir

    donor = RunDir(upstream)
    run = RunDir(tmp_path / "run")
    same = config(small_web, run.root, mnist_teacher, private)
    assert link_done_stages(same, run, [donor]) == ["crawl", "score", "filter", "synthesize", "perturb"]
    assert (run.root / "filter").resolve() == (upstream / "filter").resolve()
    assert {s.name: s.status for s in __import__("pipeline.runner", fromlist=["x"]).stage_states(
        same, run, STAGES).values()}["perturb"] == "done"
    # another filter budget: crawl and score stay linked, the filter link and what follows go
    other = config(small_web, run.root, mnist_teacher, private, "filter.policy=random", "filter.budget=0.5")
    assert link_done_stages(other, run, [donor]) == []
    assert (run.root / "score").is_symlink()
    assert not any((run.root / s).exists() for s in ("filter", "synthesize", "perturb"))


def test_bench_compares_methods_over_seeds_and_a_second_bench_reruns_nothing(upstream, small_web, mnist_teacher,
                                                                             private, tmp_path):
    from bench.methods import run_bench
    from demo.teacher import private_split
    from pipeline.rundir import RunDir

    # the upper bound's private images: 20 per class, as a folder per class
    images, labels = private_split(private, "train")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for i in np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(10)]):
        (tmp_path / "private_train" / names[labels[i]]).mkdir(parents=True, exist_ok=True)
        images[i].save(tmp_path / "private_train" / names[labels[i]] / f"{i}.png")
    base = fresh(upstream, tmp_path / "base")
    cfg = config(small_web, base, mnist_teacher, private, "filter.policy=balanced", "filter.budget=0.4",
                 "bench.methods=[upper_bound, random_kd, webdistill]", "bench.ablations=false", "bench.seeds=[0, 1]",
                 "bench.train_images=400", f"bench.upper_bound_data={tmp_path / 'private_train'}",
                 "bench.reference=random_kd", "bench.pool_sizes=[150]", f"bench.work_dir={tmp_path / 'work'}",
                 f"bench.results_dir={tmp_path / 'results'}", "distill.num_workers=1")
    (tmp_path / "bench.yaml").write_text(dump_yaml(cfg))
    first = run_bench(str(tmp_path / "bench.yaml"))

    runs = pd.read_csv(tmp_path / "results" / "methods.csv")
    assert sorted(zip(runs["method"], runs["seed"])) == [(m, s) for m in ("random_kd", "upper_bound", "webdistill")
                                                         for s in (0, 1)]
    summary = pd.read_csv(tmp_path / "results" / "methods_summary.csv").set_index("method")
    rnd = runs[runs["method"] == "random_kd"]["student_top1"]
    assert summary.loc["random_kd", "top1_mean"] == pytest.approx(rnd.mean())
    assert summary.loc["random_kd", "top1_std"] == pytest.approx(rnd.std(ddof=1))
    assert summary.loc["webdistill", "of_upper_bound"] == pytest.approx(
        summary.loc["webdistill", "top1_mean"] / summary.loc["upper_bound", "top1_mean"])
    # the upper bound trains on the 200 private images; the random subset is as large as the kept set
    assert (runs[runs["method"] == "upper_bound"]["transfer_set"] == 200).all()
    assert summary.loc["random_kd", "transfer_set"] == summary.loc["webdistill", "transfer_set"] == 120
    # every student saw about train_images images
    assert ((runs["epochs"] * runs["transfer_set"] - 400).abs() <= runs["transfer_set"] / 2).all()

    work = tmp_path / "work" / "runs"
    # the web pool is crawled and scored once (the config's own run), the private folder once
    for method in ("random_kd", "webdistill"):
        for seed in (0, 1):
            assert (work / method / f"seed{seed}" / "score").resolve() == (base / "score").resolve()
    assert (work / "upper_bound" / "seed1" / "crawl").resolve() == (work / "upper_bound" / "seed0" / "crawl").resolve()
    # webdistill's seeds share one filter; random_kd draws a subset per seed
    assert (work / "webdistill" / "seed1" / "perturb").resolve() == (work / "webdistill" / "seed0" / "perturb").resolve()
    assert not (work / "random_kd" / "seed1" / "filter").is_symlink()
    kept = [set(pd.read_parquet(work / "random_kd" / f"seed{s}" / "filter" / "selection.parquet")
                .query("keep")["uid"]) for s in (0, 1)]
    assert kept[0] != kept[1]

    timings = pd.read_csv(tmp_path / "results" / "timings.csv")
    # 150 of the 324 URLs (24 are broken), and the full pool of 300 images
    assert 120 <= timings["pool"][0] <= 150 and timings["pool"][1] == 300
    assert (timings[["crawl", "score", "filter", "perturb", "distill", "evaluate"]] > 0).all().all()
    text = (tmp_path / "results" / "methods.md").read_text()
    assert "of the upper bound" in text and "random_kd" in text
    paired = text.split("## Every method against random_kd (paired: same seeds)")[1]  # bench.reference
    assert "| webdistill " in paired and "| upper_bound " in paired and "| random_kd " not in paired
    assert (tmp_path / "results" / "methods.png").stat().st_size > 0 and (tmp_path / "results" / "scaling.png").is_file()

    def run_ids():
        return {(str(d), s): (RunDir(d).record(s) or {}).get("run_id") for d in work.glob("*/seed*")
                for s in ("crawl", "score", "filter", "perturb", "distill", "evaluate")}

    before = run_ids()
    second = run_bench(str(tmp_path / "bench.yaml"))
    assert run_ids() == before
    pd.testing.assert_frame_equal(pd.DataFrame(second["summary"]), pd.DataFrame(first["summary"]))


def test_ablation_table_reads_each_change_from_its_method_and_skips_what_did_not_run():
    from bench.methods import ablation_table, summarize

    top1 = {"webdistill": [0.90, 0.92], "pool_kd": [0.50, 0.56], "kd3_ipw": [0.88, 0.88], "random_kd": [0.3, 0.3]}
    val = {"webdistill": [0.8, 0.8], "pool_kd": [0.9, 0.9], "kd3_ipw": [0.7, 0.7], "random_kd": [np.nan, np.nan]}
    runs = pd.DataFrame([{"method": m, "seed": s, "student_top1": v, "student_val_top1": val[m][s],
                          "student_macro_recall": v, "student_ece": 0.0, "transfer_set": 10, "epochs": 1,
                          "kept_precision": None, "distill_s": 1.0}
                         for m, values in top1.items() for s, v in enumerate(values)])
    table = ablation_table(summarize(runs)).set_index("method")
    assert list(table.index) == ["webdistill", "pool_kd", "kd3_ipw"]  # in COMPONENTS order; random_kd is no change
    assert table.loc["pool_kd", "change"].startswith("− the FAISS filter")
    assert table.loc["pool_kd", "delta_vs_webdistill"] == pytest.approx(0.53 - 0.91)
    pooled = np.sqrt((np.std([0.90, 0.92], ddof=1) ** 2 + np.std([0.50, 0.56], ddof=1) ** 2) / 2)
    assert table.loc["pool_kd", "delta_in_pooled_std"] == pytest.approx((0.53 - 0.91) / pooled)
    assert table.loc["webdistill", "delta_vs_webdistill"] == 0
    assert ablation_table(summarize(runs[runs["method"] != "webdistill"])).empty


def test_the_paired_test_and_the_choice_on_validation_by_hand():
    from bench.methods import chosen_on_validation, goal_check, paired_table, paired_test, summarize

    test = {"webdistill": [0.90, 0.92, 0.95], "pool_kd": [0.50, 0.56, 0.53], "upper_bound": [0.95, 0.95, 0.96]}
    val = {"webdistill": [0.8, 0.8, 0.8], "pool_kd": [0.9, 0.9, 0.93], "upper_bound": [1.0, 0.99, 1.0]}
    runs = pd.DataFrame([{"method": m, "seed": s, "student_top1": v, "student_val_top1": val[m][s],
                          "student_macro_recall": v, "student_ece": 0.0, "transfer_set": 10, "epochs": 1,
                          "kept_precision": None, "distill_s": 1.0}
                         for m, values in test.items() for s, v in enumerate(values)])
    paired = paired_test(runs, "webdistill", "pool_kd")
    diff = np.array([0.40, 0.36, 0.42])  # per seed
    assert paired["mean"] == pytest.approx(diff.mean())
    assert paired["ci95"] == pytest.approx(4.302653 * diff.std(ddof=1) / np.sqrt(3), rel=1e-5)  # t(0.975, 2 dof)
    assert paired["p"] < 0.01
    summary = summarize(runs)
    # chosen on the validation split, where pool_kd is better, although webdistill wins on the test split
    assert chosen_on_validation(summary, ["webdistill", "pool_kd"]) == "pool_kd"
    assert chosen_on_validation(summary, ["nothing"]) is None
    lines = goal_check(summary, runs)
    assert "96.9% of the upper bound" in lines[0] and lines[0].endswith(": met")  # 92.33 / 95.33
    assert "pool_kd" in lines[1] and "(goal > 2): met" in lines[1] and "paired over 3 seeds" in lines[1]
    # every method against the default recipe: pool_kd is 39.33 points below on test, 11 above on val
    table = paired_table(runs, "webdistill").set_index("method")
    assert list(table.index) == ["pool_kd", "upper_bound"]
    assert table.loc["pool_kd", "test Δ vs webdistill (points, 95% CI)"].startswith("-39.33 ± ")
    assert table.loc["pool_kd", "val Δ (points)"] == "+11.00"


def test_filter_scores_are_compared_against_the_true_sources(upstream, small_web, tmp_path):
    from bench.bench_filter_scores import compare
    from pipeline.rundir import RunDir

    sources = tmp_path / "sources.parquet"
    small_web["sources"][["url", "source", "label"]].to_parquet(sources)
    table = compare(RunDir(upstream), str(sources), 0.3, "small web").set_index("score")
    assert set(table.index) == {"bn_layers", "bn_stats", "confidence"}
    assert table["top"].eq(round(0.3 * table["pool"].iloc[0])).all()
    assert table.loc["bn_layers", "auroc"] > 0.7 and table.loc["bn_layers", "precision_top"] > \
        table.loc["bn_layers", "in_domain_share"]  # better than the pool's own share


def test_only_picks_any_known_method_and_refuses_an_unknown_one(caplog):
    from bench.methods import ABLATIONS, chosen_methods
    from pipeline.config import load_config
    from pipeline.errors import UserError

    settings = load_config(None, ["bench.methods=[upper_bound, pool_kd]", "bench.ablations=false"]).bench
    assert list(chosen_methods(settings, None)) == ["upper_bound", "pool_kd"]
    # a method outside bench.methods runs when asked for (it was silently left out before)
    assert list(chosen_methods(settings, ["dfnd_selection", "pool_kd"])) == ["dfnd_selection", "pool_kd"]
    with pytest.raises(UserError, match=r"--only: unknown method 'dfdn'; `webdistill bench --list` lists them"):
        chosen_methods(settings, ["dfdn"])
    typo = load_config(None, ["bench.reference=kd_labeled"]).bench
    with pytest.raises(UserError, match=r"bench.reference: unknown method 'kd_labeled'"):
        chosen_methods(typo, ["kd_labelled"])
    assert "bench.reference webdistill is not among the methods run" in caplog.text  # left out, and said
    with_ablations = load_config(None, ["bench.methods=[kd3]", "bench.ablations=true"]).bench
    assert list(chosen_methods(with_ablations, None))[1:] == list(ABLATIONS)
    # a sweep variant is its method with the variant's overrides on top
    base, variant = chosen_methods(settings, ["ipwd", "ipwd@literal"]).values()
    assert variant.overrides == {**base.overrides, "distill.ipwd_formula": "literal"}
    assert "literal" in variant.about and base.about in variant.about


def test_every_method_and_variant_of_the_table_loads_as_a_config(tmp_path):
    """A typo in configs/bench_methods.yaml fails here, not an hour into a bench."""
    from bench.methods import ABLATIONS, METHODS, VARIANTS, Bench
    from pipeline.config import load_config
    from stages.distill.methods import resolve

    bench = Bench("configs/demo.yaml", (), load_config("configs/demo.yaml"))
    for name, method in {**METHODS, **ABLATIONS, **VARIANTS}.items():
        cfg = bench.load(tmp_path / name, method, seed=0)
        resolve(cfg.distill)  # the recipe's settings go together
