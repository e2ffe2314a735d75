"""Benchmark: which settings of filter + KD help, judged on a validation split, not the test split.

`webdistill bench` ranks the methods on the private *test* split. Choosing settings on that same
split would overfit it, so this sweep scores each variant of the `filter_kd` method on the
private *train* split instead (``bench.upper_bound_data``): no web student ever trains on it, and
a user who owns the teacher owns such data. Every student sees ``bench.train_images`` images, as
in the bench (a smaller budget means more epochs); crawl and score are the config's own run.

    python bench/bench_variants.py [--config configs/demo.yaml] [--seeds 0 1] [--only kd,ipw]

Writes bench/results/variants.{csv,md}: top-1 % on the validation split, mean ± std over seeds.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from bench.methods import Bench, Method, result_row, summarize  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.runner import run_stages  # noqa: E402
from stages import STAGES  # noqa: E402

# each a change to filter_kd (the demo's own settings: budget 0.3, T 4, 0.9 KD + 0.1 CE, shift 2)
VARIANTS: dict[str, Method] = {
    "kd": Method("filter + KD as configured", {}),
    "no_ce": Method("KD only (no cross-entropy with the teacher's label)",
                    {"distill.ce_weight": 0.0, "distill.kd_weight": 1.0}),
    "t2": Method("KD temperature 2 instead of 4", {"distill.temperature": 2.0}),
    "budget_0.2": Method("keep 20% of the pool", {"filter.budget": 0.2}),
    "budget_0.4": Method("keep 40% of the pool", {"filter.budget": 0.4}),
    "ipw": Method("IPW weights (IPWD)", {"distill.preset": "ipwd"}),
    "ipw_sqrt": Method("IPW weights tempered: (1/propensity)^0.5", {"distill.preset": "ipwd",
                                                                    "filter.weight_power": 0.5}),
    "shift_0": Method("no random shift", {"distill.augment_shift": 0}),
    "shift_1": Method("shifts of up to 1 pixel", {"distill.augment_shift": 1}),
    "elastic_16": Method("elastic distortion α 16, σ 4", {"distill.augment_elastic": 16.0}),
    "elastic_34": Method("elastic distortion α 34, σ 4 (Simard's MNIST setting)", {"distill.augment_elastic": 34.0}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    if not cfg.bench.upper_bound_data:
        sys.exit(f"{args.config}: bench.upper_bound_data is not set; it is the validation split of this sweep")
    validation = f"evaluate.test_set={cfg.bench.upper_bound_data}"
    bench = Bench(args.config, (), cfg, [RunDir(cfg.run_dir)])
    run_stages(cfg, STAGES, only=["crawl", "score"])
    chosen = [v for v in args.only.split(",") if v] or list(VARIANTS)
    rows = []
    for name in chosen:
        for seed in args.seeds:
            run_dir = bench.work / "variants" / name / f"seed{seed}"
            rows.append(result_row(name, seed, bench.run(name, VARIANTS[name], seed, run_dir, (validation,))))
    runs = pd.DataFrame(rows)
    summary = summarize(runs, reference=None)
    shown = pd.DataFrame({
        "method": summary["method"], "what": [VARIANTS[n].about for n in summary["method"]],
        "transfer_set": summary["transfer_set"], "epochs": summary["epochs"], "seeds": summary["seeds"],
        "validation top-1 %": [f"{100 * m:.2f}" + ("" if pd.isna(s) else f" ± {100 * s:.2f}")
                               for m, s in zip(summary["top1_mean"], summary["top1_std"])]})
    results = Path(cfg.bench.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    runs.to_csv(results / "variants.csv", index=False)
    (results / "variants.md").write_text(shown.to_markdown(index=False) + "\n")
    print(shown.to_markdown(index=False))


if __name__ == "__main__":
    main()
