"""Benchmark: how well each class-agnostic in-distribution score tells the private domain from the rest.

On a run whose score stage is done and whose config names a diagnostics file of true sources
(`filter.diagnostics_sources`), every image is in-domain when its true class is known. Each score
ranks the scored pool; reported: AUROC (in-domain vs not), and the precision of the top share
`filter.budget` of the pool (what a budget filter keeps before its class quotas). The scores:

- ``bn_layers``: minus the distance of the image's channel statistics from every BatchNorm layer's
  running ones (DeepInversion's loss per image; score/bn_distance.npy);
- ``bn_stats``: minus the mean squared z-score of the penultimate features under the BatchNorm prior
  of the last layer (the filter's default reference);
- ``confidence``: the teacher's top-1 probability (what DFND selects by).

    python bench/bench_filter_scores.py [--config configs/demo.yaml] [--name digits]

Appends (or replaces) the scenario's rows in bench/results/filter_scores.{csv,md}.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from manifests.artifacts import BN_DISTANCE, FEATURE_PRIOR, FEATURES, SCORE_MANIFEST  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from stages.filter.stage import match_bn_stats, read_sources  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def scores(run: RunDir) -> dict[str, np.ndarray]:
    """Each class-agnostic score of every scored image, higher: more like the private data."""
    manifest = run.read(SCORE_MANIFEST, ["uid", "confidence"])
    out = {"confidence": manifest["confidence"].to_numpy(np.float32)}
    if run.path(BN_DISTANCE).is_file():  # teachers with BatchNorm, score.bn_distance on
        out["bn_layers"] = -np.asarray(run.read(BN_DISTANCE), np.float32)
    if run.path(FEATURE_PRIOR).is_file():
        with np.load(run.path(FEATURE_PRIOR)) as prior:
            out["bn_stats"] = match_bn_stats(run.read(FEATURES), {"mean": prior["mean"], "std": prior["std"]}).similarity
    return out


def compare(run: RunDir, sources: str, budget: float, scenario: str) -> pd.DataFrame:
    uids = run.read(SCORE_MANIFEST, ["uid"])
    truth = uids.merge(read_sources(sources).drop_duplicates("uid"), on="uid", how="left")
    in_domain = truth["label"].notna().to_numpy()
    top = int(round(budget * len(in_domain))) if budget <= 1 else int(budget)
    rows = []
    for name, score in scores(run).items():
        kept = np.argsort(-score, kind="stable")[:top]
        rows.append({"scenario": scenario, "score": name, "pool": len(score), "in_domain_share": in_domain.mean(),
                     "auroc": roc_auc_score(in_domain, score), "precision_top": in_domain[kept].mean(), "top": top})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--name", default="digits", help="scenario name in the table")
    args = parser.parse_args()
    cfg = load_config(args.config)
    if not cfg.filter.diagnostics_sources:
        raise SystemExit(f"{args.config}: set filter.diagnostics_sources (the true sources) to compare scores")
    try:
        table = compare(RunDir(cfg.run_dir), cfg.filter.diagnostics_sources, cfg.filter.budget, args.name)
    except UserError as e:
        raise SystemExit(f"error: {e} (run `webdistill run {args.config} --only crawl,score` first)") from None
    csv = RESULTS / "filter_scores.csv"
    if csv.is_file():
        table = pd.concat([pd.read_csv(csv).query("scenario != @args.name"), table], ignore_index=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv, index=False)
    (RESULTS / "filter_scores.md").write_text(
        "In-distribution scores of the scored pool against the true sources (`bench/bench_filter_scores.py`):\n"
        "AUROC in-domain vs not, precision of the top `filter.budget` share of the pool.\n\n"
        + table.to_markdown(index=False, floatfmt=".3f") + "\n")
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
