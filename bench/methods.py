"""The benchmark: does filtering and weighting web data make a better student, and by how much?

``webdistill bench CONFIG`` trains a student for every method × seed on CONFIG's web pool and
scores it on ``evaluate.test_set`` (the private test split, never trained on). A method is a
name, a sentence, and config overrides (``configs/bench_methods.yaml``: data, as open_clip keeps
its model configs); each
(method, seed) is its own run directory ``bench.work_dir/runs/<method>/seed<k>``, which
``webdistill run`` can re-run alone. Every student sees the same number of training images
(``bench.train_images``): epochs = train_images / its transfer set, so a bigger transfer set
buys no extra compute.

Stages are shared, not recomputed: before a run, each of its upstream stages that another run
directory has already done with the same config fingerprint and the same upstream outputs is
linked (a relative symlink) instead of run. So crawl and score run once for the whole bench (or
not at all after ``make all``), a filter once per filter setting, and a second ``bench`` finds
every stage done and only rebuilds the tables.

Writes, under ``bench.results_dir``: methods.csv (one row per run), methods.md (mean ± std per
method, share of the upper bound, the goal check), methods.png, ablation.csv (webdistill
changed by one component at a time), timings.{csv,md} and scaling.png (seconds per stage against
pool size), bench.json (all of it).
"""

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from manifests import atomic_write_bytes, atomic_write_json
from manifests.artifacts import FILTER_SUMMARY, METRICS, PERTURB_COUNTS, SYNTHESIS_COUNTS, SYNTHESIS_SUMMARY
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.runner import record_is_current, run_stages
from stages import STAGES
from stages.common.plots import figure_png, pyplot

log = logging.getLogger("webdistill.bench")

UPSTREAM = ("crawl", "score", "filter", "synthesize", "perturb")
TABLE = Path(__file__).resolve().parents[1] / "configs" / "bench_methods.yaml"


@dataclass(frozen=True)
class Method:
    about: str
    overrides: dict = field(default_factory=dict)  # config key → value; "{seed}" is replaced by the seed


def _method_table(path: Path = TABLE) -> tuple[dict, dict, list, dict]:
    """The methods, ablations, ablation components and sweep variants of ``configs/bench_methods.yaml``.
    A variant ``method@name`` is the method with the sweep's overrides on top."""
    raw = yaml.safe_load(path.read_text())

    def methods(section):
        return {name: Method(m["about"], m.get("overrides") or {}) for name, m in raw[section].items()}

    found = methods("methods")
    variants = {f"{name}@{variant}": Method(f"{found[name].about} — {variant}: "
                                            + ", ".join(f"{k} {v}" for k, v in changes.items()),
                                            {**found[name].overrides, **changes})
                for name, sweep in (raw.get("sweeps") or {}).items() for variant, changes in sweep.items()}
    return found, methods("ablations"), [tuple(c) for c in raw["components"]], variants


METHODS, ABLATIONS, COMPONENTS, VARIANTS = _method_table()


# ---------------------------------------------------------------- stage sharing

def link_done_stages(cfg, run: RunDir, donors: list[RunDir], stages=UPSTREAM) -> list[str]:
    """Link each of ``stages`` that a donor run has done with this config and these upstream
    outputs; drop links that no longer match (the runner then recomputes or relinks). Returns the
    stages linked now."""
    run.root.mkdir(parents=True, exist_ok=True)
    linked = []
    for spec in (s for s in STAGES if s.name in stages):
        path, fingerprint = run.stage_dir(spec.name), spec.fingerprint(cfg)
        upstream = {u: (run.record(u) or {}).get("run_id") for u in spec.upstream}
        if path.is_symlink() and not record_is_current(run.record(spec.name), fingerprint, upstream):
            path.unlink()
        if path.exists():
            continue
        for donor in donors:
            if donor.root.resolve() != run.root.resolve() and \
                    record_is_current(donor.record(spec.name), fingerprint, upstream):
                target = os.path.relpath(donor.stage_dir(spec.name).resolve(), run.root.resolve())
                path.symlink_to(target, target_is_directory=True)
                linked.append(spec.name)
                break
    return linked


# ---------------------------------------------------------------- one run

@dataclass
class Bench:
    """One bench invocation: the config file, its overrides, where runs and results go."""

    config: str
    overrides: tuple
    cfg: object  # the loaded config
    donors: list = field(default_factory=list)

    @property
    def work(self) -> Path:
        return Path(self.cfg.bench.work_dir)

    def load(self, run_dir: Path, method: Method, seed: int, extra=()):
        values = {"private_images": str(self.work / "private_train_images"), "seed": seed,
                  "oracle_urls": str(self.work / "oracle_urls.parquet")}
        # a string is filled in and read as YAML ("{seed}" → an int), anything else as JSON
        sets = [f"{k}={v.format(**values) if isinstance(v, str) else json.dumps(v)}"
                for k, v in method.overrides.items()]
        return load_config(self.config, [*self.overrides, *sets, f"run_dir={run_dir}", f"distill.seed={seed}",
                                         *extra])

    def run_dir(self, name: str, seed: int) -> Path:
        return self.work / "runs" / name / f"seed{seed}"

    def run(self, name: str, method: Method, seed: int, run_dir: Path | None = None, extra=()) -> RunDir:
        """Upstream stages (linked from a donor when one has them), then distill and evaluate with
        epochs set so that the student sees ``bench.train_images`` images."""
        run_dir = run_dir or self.run_dir(name, seed)
        cfg = self.load(run_dir, method, seed, extra)
        run = RunDir(run_dir)
        linked = link_done_stages(cfg, run, self.donors)
        if linked:
            log.info("bench: %s seed %d re-uses %s", name, seed, ", ".join(linked))
        run_stages(cfg, STAGES, only=list(UPSTREAM))
        if all(d.root.resolve() != run.root.resolve() for d in self.donors):
            self.donors.append(run)
        if not any(e.startswith("distill.epochs=") for e in extra):
            epochs = epochs_for(run, cfg.distill.transfer_set, self.cfg.bench.train_images)
            extra = (*extra, f"distill.epochs={epochs}")
        run_stages(self.load(run_dir, method, seed, extra), STAGES, only=["distill", "evaluate"])
        return run


def transfer_size(run: RunDir, which: str) -> int:
    """Images in the transfer set distill.transfer_set names: the web's (perturb), the synthesised, or both."""
    web = sum(run.read(PERTURB_COUNTS).values())
    synthetic = sum(run.read(SYNTHESIS_COUNTS).values())
    return {"web": web, "synthetic": synthetic, "both": web + synthetic}[which]


def epochs_for(run: RunDir, which: str, train_images: int) -> int:
    return max(1, round(train_images / max(1, transfer_size(run, which))))


def result_row(name: str, seed: int, run: RunDir) -> dict:
    metrics = run.read(METRICS)
    distill = run.record("distill")
    precision = (run.read(FILTER_SUMMARY).get("truth") or {}).get("precision")
    synthesis = run.read(SYNTHESIS_SUMMARY)
    if synthesis["start"] == "noise" and distill["counts"]["transfer_set"] == synthesis["images"]:
        precision = None  # no web image in the transfer set
    validation = metrics.get("validation") or {}
    return {"method": name, "seed": seed, "student_top1": metrics["student"]["top1"],
            "student_val_top1": validation.get("student_top1", np.nan),
            "student_macro_recall": metrics["student"]["macro_recall"], "student_ece": metrics["student"]["ece"],
            "teacher_top1": metrics["teacher"]["top1"], "agreement": metrics["agreement"],
            "transfer_set": distill["counts"]["transfer_set"], "epochs": distill["counts"]["epochs"],
            "kept_precision": precision, "distill_s": distill["duration_s"], "run_dir": str(run.root)}


# ---------------------------------------------------------------- the upper bound's data

def export_private_images(spec: str, class_names: list[str], folder: Path) -> Path:
    """The labelled private images as a folder per class (what ``data.source: folder`` crawls)."""
    from stages.evaluate.stage import test_images

    done = folder / "_SUCCESS"
    if done.is_file():
        return folder
    count = 0
    try:
        images = list(test_images(spec, class_names))
    except UserError as e:  # test_images speaks of evaluate.test_set
        raise UserError(f"bench.upper_bound_data {spec!r}: {e}".replace("evaluate.test_set", "it")) from e
    for key, image, label in images:
        target = folder / class_names[label] / f"{Path(key).name.replace('/', '_')}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
        count += 1
    if not count:
        raise UserError(f"bench.upper_bound_data {spec}: no labelled images found")
    done.write_text(f"{count}\n")
    return folder


def oracle_url_list(cfg, path: Path) -> Path:
    """The URLs of the pool whose true class is known (``filter.diagnostics_sources``)."""
    if not cfg.filter.diagnostics_sources or not Path(cfg.filter.diagnostics_sources).is_file():
        raise UserError("bench method oracle_filter needs filter.diagnostics_sources, the true sources of the web "
                        "pool (the demo's: demo_data/web_sources.parquet); drop oracle_filter otherwise")
    if not path.is_file():
        truth = pd.read_parquet(cfg.filter.diagnostics_sources, columns=["url", "label"])
        atomic_write_bytes(path, truth[truth["label"].notna()][["url"]].to_parquet(index=False))
    return path


# ---------------------------------------------------------------- tables and plots

def summarize(runs: pd.DataFrame, reference: str | None = "upper_bound") -> pd.DataFrame:
    """Mean ± std (over seeds) per method, in the order the methods ran, and the share of the reference."""
    g = runs.groupby("method", sort=False)
    out = pd.DataFrame({
        "seeds": g["seed"].count(),
        "transfer_set": g["transfer_set"].mean().round().astype(int),
        "epochs": g["epochs"].mean().round(1),
        "kept_precision": g["kept_precision"].mean(),
        "top1_mean": g["student_top1"].mean(), "top1_std": g["student_top1"].std(ddof=1),
        "val_top1_mean": g["student_val_top1"].mean(), "val_top1_std": g["student_val_top1"].std(ddof=1),
        "macro_recall_mean": g["student_macro_recall"].mean(), "macro_recall_std": g["student_macro_recall"].std(ddof=1),
        "ece_mean": g["student_ece"].mean(), "distill_s": g["distill_s"].mean().round(1),
    })
    if reference in out.index:
        out["of_upper_bound"] = out["top1_mean"] / out.loc[reference, "top1_mean"]
    return out.reset_index()


def pooled_std(a: pd.Series, b: pd.Series) -> float:
    return float(np.sqrt((a["top1_std"] ** 2 + b["top1_std"] ** 2) / 2))


def paired_test(runs: pd.DataFrame, method: str, baseline: str) -> dict | None:
    """Mean top-1 difference over the seeds both ran, its 95% confidence interval and the paired t-test's p."""
    from scipy import stats

    top1 = runs.pivot_table(index="seed", columns="method", values="student_top1")
    if method not in top1 or baseline not in top1:
        return None
    diff = (top1[method] - top1[baseline]).dropna()
    if len(diff) < 2:
        return None
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    p = stats.ttest_rel(top1.loc[diff.index, method], top1.loc[diff.index, baseline]).pvalue
    return {"seeds": len(diff), "mean": float(diff.mean()), "ci95": float(half), "p": float(p)}


def goal_check(summary: pd.DataFrame, runs: pd.DataFrame, method: str = "webdistill") -> list[str]:
    """The benchmark's goal: ≥ 95% of the upper bound and above pool KD by > 2 pooled std; paired tests
    (same seeds) against pool KD, the random subset and filter + KD."""
    rows = summary.set_index("method")
    if method not in rows.index:
        return []
    ours, lines = rows.loc[method], []
    if "upper_bound" in rows.index:
        share = ours["top1_mean"] / rows.loc["upper_bound", "top1_mean"]
        lines.append(f"- {method} reaches {100 * share:.1f}% of the upper bound's top-1 (goal ≥ 95%): "
                     f"{'met' if share >= 0.95 else 'NOT met'}")
    for baseline in ("pool_kd", "random_kd", "filter_kd"):
        if baseline not in rows.index or baseline == method:
            continue
        gap, sd = ours["top1_mean"] - rows.loc[baseline, "top1_mean"], pooled_std(ours, rows.loc[baseline])
        k = gap / sd if sd > 0 else float("inf") if gap > 0 else float("-inf")
        line = f"- {method} − {baseline}: {100 * gap:+.2f} points = {k:+.1f} pooled std"
        if baseline == "pool_kd":
            line += f" (goal > 2): {'met' if k > 2 else 'NOT met'}"
        paired = paired_test(runs, method, baseline)
        if paired:
            line += (f"; paired over {paired['seeds']} seeds: {100 * paired['mean']:+.2f} ± "
                     f"{100 * paired['ci95']:.2f} points (95% CI), p = {paired['p']:.3g}")
        lines.append(line)
    return lines


def paired_table(runs: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Each method − ``reference`` over the seeds both ran: mean difference of test and validation top-1
    with the test difference's 95% confidence interval and paired t-test p."""
    if reference not in set(runs["method"]):
        return pd.DataFrame()
    rows = []
    for method in dict.fromkeys(runs["method"]):
        test = paired_test(runs, method, reference) if method != reference else None
        if test is None:
            continue
        val = paired_test(runs.assign(student_top1=runs["student_val_top1"]), method, reference)
        rows.append({"method": method, "seeds": test["seeds"],
                     f"test Δ vs {reference} (points, 95% CI)": f"{100 * test['mean']:+.2f} ± {100 * test['ci95']:.2f}",
                     "p": f"{test['p']:.2g}", "val Δ (points)": "" if val is None else f"{100 * val['mean']:+.2f}"})
    return pd.DataFrame(rows)


def chosen_on_validation(summary: pd.DataFrame, candidates: list[str]) -> str | None:
    """Of ``candidates``, the method with the best mean top-1 on the validation split (never the test split)."""
    rows = summary.set_index("method").reindex(candidates).dropna(subset=["val_top1_mean"])
    return None if rows.empty else str(rows["val_top1_mean"].idxmax())


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * (0 if np.isnan(std) else std):.2f}"


def markdown_table(summary: pd.DataFrame, about: dict[str, str]) -> str:
    table = pd.DataFrame({
        "method": summary["method"],
        "what it trains on / with": [about.get(m, "") for m in summary["method"]],
        "transfer set": summary["transfer_set"],
        "epochs": summary["epochs"],
        "kept precision": summary["kept_precision"].map(lambda p: "" if pd.isna(p) else f"{p:.3f}"),
        "top-1 % (mean ± std)": [_pm(m, s) for m, s in zip(summary["top1_mean"], summary["top1_std"])],
        "val top-1 %": ["" if np.isnan(m) else _pm(m, s)
                        for m, s in zip(summary["val_top1_mean"], summary["val_top1_std"])],
        "macro recall %": [_pm(m, s) for m, s in zip(summary["macro_recall_mean"], summary["macro_recall_std"])],
        "ECE": summary["ece_mean"].map("{:.3f}".format),
    })
    if "of_upper_bound" in summary:
        table["of upper bound"] = summary["of_upper_bound"].map("{:.1%}".format)
    return table.to_markdown(index=False)


def ablation_table(summary: pd.DataFrame) -> pd.DataFrame:
    rows = summary.set_index("method")
    if "webdistill" not in rows.index:
        return pd.DataFrame()
    full = rows.loc["webdistill"]
    changes = [("(nothing)", "webdistill"), *((c, m) for c, m in COMPONENTS if m in rows.index)]
    methods = [m for _, m in changes]
    delta = rows.loc[methods, "top1_mean"].to_numpy() - full["top1_mean"]
    return pd.DataFrame({
        "change": [c for c, _ in changes],
        "method": methods,
        "top1_mean": rows.loc[methods, "top1_mean"].to_numpy(),
        "top1_std": rows.loc[methods, "top1_std"].to_numpy(),
        "delta_vs_webdistill": delta,
        "delta_in_pooled_std": delta / np.maximum([pooled_std(full, rows.loc[m]) for m in methods], 1e-9),
    })


def _figure(figsize: tuple):
    """A figure and its axes on the non-interactive backend (no display here)."""
    return pyplot().subplots(figsize=figsize)


def plot_methods(summary: pd.DataFrame, teacher_top1: float) -> bytes:
    fig, ax = _figure((7, 0.45 * len(summary) + 1.2))
    y = np.arange(len(summary))[::-1]
    ax.barh(y, 100 * summary["top1_mean"], xerr=100 * summary["top1_std"].fillna(0), color="#4c78a8", capsize=3)
    ax.axvline(100 * teacher_top1, color="#e45756", ls="--", label=f"teacher {100 * teacher_top1:.1f}%")
    ax.set_yticks(y, summary["method"])
    ax.set_xlabel("student top-1 on the private test split (%), mean ± std over seeds")
    ax.set_xlim(max(0, 100 * summary["top1_mean"].min() - 15), 100)
    ax.legend(loc="lower right")
    return _png(fig)


def plot_scaling(timings: pd.DataFrame) -> bytes:
    fig, ax = _figure((6, 4))
    for stage in (s for s in STAGES_TIMED if s in timings):
        ax.plot(timings["pool"], timings[stage], marker="o", label=stage)
    ax.set_xlabel("images in the web pool")
    ax.set_ylabel("seconds")
    ax.set_title("stage time against pool size")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def _png(fig) -> bytes:
    return figure_png(fig, dpi=110)


# ---------------------------------------------------------------- stage timings

STAGES_TIMED = ("crawl", "score", "filter", "perturb", "distill", "evaluate")


def stage_timings(run: RunDir) -> dict:
    row = {"pool": run.record("score")["counts"]["images"], "kept": transfer_size(run, "web")}
    for stage in STAGES_TIMED:
        row[stage] = run.record(stage)["duration_s"]
    row["crawl_images_per_s"] = run.record("crawl")["counts"].get("images_per_s")
    row["score_images_per_s"] = run.record("score")["counts"].get("images_per_s")
    row["distill_images_per_s"] = run.record("distill")["counts"].get("images_per_s")
    return row


def subsample_url_list(cfg, rows: int, path: Path) -> Path:
    """The first ``rows`` entries of a seeded shuffle of the URL list (broken URLs in proportion)."""
    if not path.is_file():
        from stages.crawl.stage import read_url_list

        df = read_url_list(cfg.data)
        if rows >= len(df):
            raise UserError(f"bench.pool_sizes: {rows} is not smaller than the URL list ({len(df)} rows)")
        subset = df.sample(n=rows, random_state=0)[["url"]]
        atomic_write_bytes(path, subset.to_parquet(index=False))
    return path


# ---------------------------------------------------------------- the bench

def chosen_methods(settings, only: list[str] | None) -> dict:
    """``only`` (any method, ablation or sweep variant of configs/bench_methods.yaml), else bench.methods and,
    with bench.ablations, the ablations; an unknown name is an error, never silently left out."""
    known = {**METHODS, **ABLATIONS, **VARIANTS}
    names = only or list(settings.methods) + (list(ABLATIONS) if settings.ablations else [])
    unknown = [n for n in names if n not in known]
    if unknown:
        where = "--only" if only else "bench.methods"
        raise UserError(f"{where}: unknown method {unknown[0]!r}; `webdistill bench --list` lists them")
    if settings.reference not in known:
        raise UserError(f"bench.reference: unknown method {settings.reference!r}; `webdistill bench --list` lists them")
    if settings.reference not in names:
        log.warning("bench: bench.reference %s is not among the methods run, so methods.md has no paired table",
                    settings.reference)
    return {n: known[n] for n in names}


def run_bench(config: str, overrides=(), only: list[str] | None = None) -> dict:
    cfg = load_config(config, overrides)
    settings = cfg.bench
    methods = chosen_methods(settings, only)
    bench = Bench(config, tuple(overrides), cfg, [RunDir(cfg.run_dir)])
    results = Path(settings.results_dir)
    labelled = [n for n, m in methods.items() if any("{private_images}" in str(v) for v in m.overrides.values())]
    if labelled:
        if not settings.upper_bound_data:
            raise UserError(f"bench.methods lists {labelled[0]}, which trains on the labelled private images, but "
                            "bench.upper_bound_data is not set: give them, or drop the method")
        from stages.common.teacher import class_names

        export_private_images(settings.upper_bound_data, class_names(cfg.teacher),
                              bench.work / "private_train_images")
    if "oracle_filter" in methods:
        oracle_url_list(cfg, bench.work / "oracle_urls.parquet")
    t0 = time.time()
    # the web pool once for every method: the config's own run directory (make all's, if it ran)
    run_stages(cfg, STAGES, only=["crawl", "score"])
    rows = []
    for name, method in methods.items():
        for seed in settings.seeds:
            log.info("bench: ── %s, seed %d ──", name, seed)
            rows.append(result_row(name, seed, bench.run(name, method, seed)))
    runs = pd.DataFrame(rows)
    timings = scaling(bench, methods.get("webdistill"), settings.pool_sizes)
    return write_results(results, cfg, runs, timings, {n: m.about for n, m in methods.items()}, time.time() - t0,
                         stage_seconds(bench.donors[1:]))  # the runs of the bench (their links included)


def scaling(bench: Bench, method: Method | None, sizes: list[int]) -> pd.DataFrame:
    """Seconds per stage at each pool size: the full pool (webdistill's first seed) and each of
    ``sizes``, with the same method and epochs, end to end."""
    if method is None:
        return pd.DataFrame()
    seed = bench.cfg.bench.seeds[0]
    full = RunDir(bench.run_dir("webdistill", seed))
    rows = [stage_timings(full)]
    epochs = full.record("distill")["counts"]["epochs"]
    for size in sorted(sizes):
        folder = bench.work / "scaling" / f"pool{size}"
        urls = subsample_url_list(bench.cfg, size, bench.work / "scaling" / f"urls{size}.parquet")
        run = bench.run(f"pool{size}", method, seed, folder,
                        (f"data.url_list={urls}", f"distill.epochs={epochs}"))
        rows.append(stage_timings(run))
    return pd.DataFrame(rows).sort_values("pool").reset_index(drop=True).astype({"pool": int, "kept": int})


def stage_seconds(runs: list[RunDir]) -> float:
    """Seconds all the bench's stages took when they ran (each shared stage counted once)."""
    seen = {}
    for run in runs:
        for spec in STAGES:
            record = run.record(spec.name)
            if record:
                seen[run.stage_dir(spec.name).resolve()] = record["duration_s"]
    return sum(seen.values())


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}"


def write_results(folder: Path, cfg, runs: pd.DataFrame, timings: pd.DataFrame, about: dict,
                  seconds: float, compute: float) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    teacher = float(runs["teacher_top1"].iloc[0])
    main = summary[~summary["method"].isin(ABLATIONS)]
    ablation = ablation_table(summary)
    # the upper bound trains on private data (for the digits, the validation shard is one of its own)
    best = chosen_on_validation(main, [m for m in main["method"] if m not in ("upper_bound", "oracle_filter")])
    # the goal is the default recipe's (webdistill: the config as given), else the best on validation
    goal = goal_check(summary, runs, "webdistill" if "webdistill" in set(main["method"]) else best or "webdistill")
    if best:
        goal.append(f"- best on the validation split ({cfg.evaluate.val_set}): {best}")
    header = (f"Machine: {machine()}. Config: web pool of {int(runs['transfer_set'].max()):,} images at most, "
              f"student {cfg.distill.student}, {cfg.bench.train_images:,} training images per student "
              f"(epochs = that / transfer set), seeds {cfg.bench.seeds}. Teacher top-1 {100 * teacher:.2f}%. "
              f"The stages took {compute / 60:.1f} min in all when they ran; this bench took {seconds / 60:.1f} "
              f"min (stages already done are re-used).")
    lines = ["# webdistill benchmark: student top-1 on the private test split", "", header, "",
             markdown_table(main, about), "", *goal, ""]
    paired = paired_table(runs, cfg.bench.reference)
    if not paired.empty:
        lines += [f"## Every method against {cfg.bench.reference} (paired: same seeds)", "",
                  paired.to_markdown(index=False), ""]
    if not ablation.empty:
        lines += ["## Ablation: webdistill changed by one component (each row a method's runs)", "",
                  pd.DataFrame({"change": ablation["change"], "method": ablation["method"],
                                "top-1 % (mean ± std)": [_pm(m, s) for m, s in zip(ablation["top1_mean"],
                                                                                      ablation["top1_std"])],
                                "Δ vs webdistill (points)": (100 * ablation["delta_vs_webdistill"]).map(
                                    "{:+.2f}".format),
                                "Δ / pooled std": ablation["delta_in_pooled_std"].map("{:+.1f}".format)}
                               ).to_markdown(index=False), ""]
    if not timings.empty:
        lines += ["## Stage seconds against pool size (webdistill, same epochs)", "",
                  timings.to_markdown(index=False, floatfmt=".1f"), ""]
    text = "\n".join(lines)
    atomic_write_bytes(folder / "methods.csv", runs.to_csv(index=False).encode())
    atomic_write_bytes(folder / "methods_summary.csv", summary.to_csv(index=False).encode())
    atomic_write_bytes(folder / "methods.md", text.encode())
    atomic_write_bytes(folder / "methods.png", plot_methods(main, teacher))
    if not ablation.empty:
        atomic_write_bytes(folder / "ablation.csv", ablation.to_csv(index=False).encode())
    if not timings.empty:
        atomic_write_bytes(folder / "timings.csv", timings.to_csv(index=False).encode())
        atomic_write_bytes(folder / "scaling.png", plot_scaling(timings))
    result = {"machine": machine(), "seconds": round(seconds, 1), "stage_seconds": round(compute, 1), "goal": goal,
              "summary": summary.to_dict("records"), "runs": runs.to_dict("records"),
              "timings": timings.to_dict("records")}
    atomic_write_json(folder / "bench.json", json.loads(json.dumps(result, default=float)))
    result["markdown"] = text
    return result
