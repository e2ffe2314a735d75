"""Benchmark of the filter stage.

1. Scale: the whole filter stage (reference_set matching + kNN-density IPW weights, FAISS) on
   100k and 1M synthetic 512-d embeddings, its time and peak memory, against scikit-learn's
   brute-force kNN (``NearestNeighbors(algorithm="brute")``, numpy BLAS underneath) answering the
   same neighbour queries on the same data in the same run. Each side runs in its own process so
   its peak memory (ru_maxrss) is its own. Brute force is timed on a sample of the queries and
   scaled to all of them (stated in the table): at 1M it would take hours.
2. Demo: precision of the kept set (share of kept images that are digits, from the demo's side
   file of true sources) and per-class coverage for each policy and reference, on the demo's
   score outputs (`make all` first, or this script runs crawl and score).

    python bench/bench_filter.py [--config configs/demo.yaml] [--sizes 100000 1000000]

Writes bench/results/filter.{md,json}.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from manifests import artifacts  # noqa: E402
from manifests.artifacts import FEATURES, SCORE_MANIFEST, SELECTION_MANIFEST, TEACHER_INFO  # noqa: E402
from manifests.artifacts import REFERENCE as REFERENCE_SET  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.runner import run_stages  # noqa: E402
from stages import STAGES  # noqa: E402
from stages.filter import stage as filter_stage  # noqa: E402

WORK = ROOT / "bench" / "work" / "filter"
RESULTS = ROOT / "bench" / "results"
DIM, CLASSES, REFERENCE = 512, 10, 1000
SCALE_SETTINGS = ["filter.reference=reference_set", "filter.policy=threshold", "filter.min_similarity=-1.5",
                  "filter.propensity=class_frequency_x_density", "filter.k=10"]
BRUTE_QUERIES = 20000


# ---------------------------------------------------------------- synthetic pool

def synthetic_pool(n: int, work: Path = WORK) -> Path:
    """The score stage's declared outputs (manifests.artifacts) for ``n`` unit-norm 512-d features:
    40% in ten class clusters, 60% spread out, plus a 1,000-image reference set drawn from the
    clusters. Built once per size, in ``work``/pool-<n>."""
    run = work / f"pool-{n}"
    if SCORE_MANIFEST.location(run).is_file():
        return run
    FEATURES.location(run).parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (CLASSES, DIM)).astype(np.float32)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def clustered(m):
        labels = rng.integers(0, CLASSES, m)
        return unit(centres[labels] + rng.normal(0, 0.9, (m, DIM)).astype(np.float32)), labels

    n_in = int(0.4 * n)
    features = np.lib.format.open_memmap(FEATURES.location(run), mode="w+", dtype=np.float16, shape=(n, DIM))
    labels = np.empty(n, np.int32)
    for start in range(0, n, 100000):
        stop = min(n, start + 100000)
        block = np.empty((stop - start, DIM), np.float32)
        inside = np.arange(start, stop) < n_in
        block[inside], labels[start:stop][inside] = clustered(int(inside.sum()))
        block[~inside] = unit(rng.normal(0, 1, (int((~inside).sum()), DIM)).astype(np.float32))
        labels[start:stop][~inside] = rng.integers(0, CLASSES, int((~inside).sum()))
        features[start:stop] = block
    features.flush()
    del features
    confidence = rng.uniform(0.3, 1.0, n).astype(np.float32)
    names = [f"class{c}" for c in range(CLASSES)]
    artifacts.write(run, SCORE_MANIFEST, pd.DataFrame({
        "uid": [f"u{i:08d}" for i in range(n)], "shard": "shards/00000.tar", "key": [f"{i:09d}" for i in range(n)],
        "pseudo_label": labels, "pseudo_class": np.asarray(names, dtype=object)[labels], "confidence": confidence,
        "entropy": np.float32(1.0), "margin": np.float32(0.1), "topk_labels": list(labels[:, None]),
        "topk_probs": list(confidence[:, None])}))
    artifacts.write(run, TEACHER_INFO, {"class_names": names, "num_classes": CLASSES, "feature_dim": DIM})
    reference, ref_labels = clustered(REFERENCE)
    np.savez(REFERENCE_SET.location(run), features=reference, labels=ref_labels, logits=np.eye(CLASSES)[ref_labels])
    return run


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_filter(run: Path) -> dict:
    """The filter stage itself, as the pipeline runs it."""
    cfg = load_config(None, [f"run_dir={run}", *SCALE_SETTINGS])
    t0 = time.time()
    counts = filter_stage.run(cfg, RunDir(run))
    return {"seconds": time.time() - t0, "peak_mb": peak_memory_mb(), "kept": counts["kept"],
            "timings": counts["timings"], "density_index": counts["details"]["density_index"]}


def worker_brute(run: Path) -> dict:
    """The same neighbour queries with scikit-learn brute force: every pool vector against the
    reference set, every kept vector against (up to density_max_points of) the kept ones."""
    from sklearn.neighbors import NearestNeighbors

    from stages.filter import knn

    settings = load_config(None, [f"run_dir={run}", *SCALE_SETTINGS]).filter
    vectors = knn.as_float32(artifacts.read(run, FEATURES))
    with np.load(REFERENCE_SET.location(run)) as z:
        reference = z["features"]
    keep = artifacts.read(run, SELECTION_MANIFEST, columns=["keep"])["keep"].to_numpy()
    kept = vectors[keep]
    rng = np.random.default_rng(settings.seed)
    database = kept if len(kept) <= settings.density_max_points else kept[
        np.sort(rng.choice(len(kept), settings.density_max_points, replace=False))]
    seconds = 0.0
    sampled = {}
    for name, base, queries, k in (("reference", reference, vectors, settings.k),
                                   ("density", database, kept, settings.k + 1)):
        index = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(base)
        sample = queries[rng.choice(len(queries), min(len(queries), BRUTE_QUERIES), replace=False)]
        t0 = time.time()
        index.kneighbors(sample)
        elapsed = time.time() - t0
        seconds += elapsed * len(queries) / len(sample)  # scaled to all queries
        sampled[name] = {"queries": len(queries), "timed": len(sample), "database": len(base)}
    return {"seconds": seconds, "peak_mb": peak_memory_mb(), "sampled": sampled}


def in_subprocess(kind: str, run: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--run", str(run)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- demo precision

DEMO_ROWS = [
    ("balanced, bn_stats (demo default)", []),
    ("balanced, bn_stats, no gate", ["filter.min_similarity=null"]),
    ("balanced, prototypes", ["filter.reference=prototypes", "filter.min_similarity=null"]),
    ("balanced, centroids", ["filter.reference=centroids", "filter.min_similarity=null"]),
    ("threshold, bn_stats ≥ -1", ["filter.policy=threshold"]),
    ("dfnd (confidence top-N)", ["filter.policy=dfnd", "filter.min_similarity=null"]),
    ("random", ["filter.policy=random", "filter.min_similarity=null"]),
    ("none (whole pool)", ["filter.policy=none"]),
]


def demo_precision(config: str) -> list[dict]:
    demo = load_config(config)
    run_stages(demo, STAGES, only=["crawl", "score"])  # skipped when done
    run = RunDir(demo.run_dir)
    manifest = run.read(SCORE_MANIFEST)
    names = run.read(TEACHER_INFO)["class_names"]
    rows = []
    for label, overrides in DEMO_ROWS:
        settings = load_config(config, overrides).filter
        t0 = time.time()
        vectors = filter_stage.load_vectors(run, settings.vectors)
        selection, _ = filter_stage.filter_pool(settings, manifest, vectors, len(names),
                                                filter_stage.References(run, settings.vectors))
        seconds = time.time() - t0
        truth = filter_stage.against_sources(selection, settings.diagnostics_sources, names)
        coverage = truth["class_coverage"]
        rows.append({"selection": label, "kept": int(selection["keep"].sum()), "precision": truth["precision"],
                     "recall": truth["recall"], "min_class_coverage": min(coverage.values()),
                     "max_class_coverage": max(coverage.values()), "seconds": round(seconds, 2),
                     "kept_by_source": truth["kept_by_source"]})
        print(f"  {label}: kept {rows[-1]['kept']}, precision {truth['precision']:.3f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100000, 1000000])
    parser.add_argument("--worker", choices=["filter", "brute"], help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (worker_filter if args.worker == "filter" else worker_brute)(Path(args.run))
        print(json.dumps(result, default=str))
        return

    print("demo: precision of the kept set per selection", flush=True)
    demo_rows = demo_precision(args.config)
    scale_rows = []
    for n in args.sizes:
        print(f"scale: {n:,} synthetic {DIM}-d embeddings", flush=True)
        run = synthetic_pool(n)
        stage = in_subprocess("filter", run)
        brute = in_subprocess("brute", run)
        scale_rows.append({"vectors": n, "kept": stage["kept"], "filter_s": round(stage["seconds"], 1),
                           "filter_peak_mb": round(stage["peak_mb"]), "brute_knn_s": round(brute["seconds"], 1),
                           "brute_peak_mb": round(brute["peak_mb"]), "speedup": round(brute["seconds"] / stage["seconds"], 1),
                           "density_index": stage["density_index"], "brute_sampled": brute["sampled"],
                           "filter_timings": stage["timings"]})
        print(f"  filter {stage['seconds']:.1f}s ({stage['peak_mb']:.0f} MB) vs brute-force kNN "
              f"{brute['seconds']:.1f}s ({brute['peak_mb']:.0f} MB)", flush=True)

    import os
    machine = f"{platform.machine()}, {os.cpu_count()} CPU(s), faiss {__import__('faiss').__version__}"
    lines = ["# filter stage", "", f"Machine: {machine}.", "",
             "## Scale: whole filter stage vs brute-force kNN (same queries, same data)", "",
             f"Settings: {' '.join(SCALE_SETTINGS)}; 1,000 reference vectors, {DIM}-d, float16 on disk. Brute force: "
             f"scikit-learn NearestNeighbors(algorithm='brute') timed on {BRUTE_QUERIES:,} queries per search and "
             "scaled to all of them.", "",
             "| vectors | kept | filter stage s | peak MB | density index | brute-force kNN s | peak MB | brute / filter |",
             "|---|---|---|---|---|---|---|---|"]
    for r in scale_rows:
        d = r["density_index"] or {}
        index = (f"IVF nlist {d['nlist']} nprobe {d['nprobe']}, recall@{d['k']} {d['recall_at_k']}"
                 if d.get("kind") == "ivf" else "exact")
        lines.append(f"| {r['vectors']:,} | {r['kept']:,} | {r['filter_s']} | {r['filter_peak_mb']:,} | {index} | "
                     f"{r['brute_knn_s']} | {r['brute_peak_mb']:,} | {r['speedup']}× |")
    lines += ["", "## Demo web: precision of the kept set (share of digits; true sources used only to score)", "",
              "| selection | kept | precision | recall of digits | class coverage min–max | seconds |",
              "|---|---|---|---|---|---|"]
    for r in demo_rows:
        lines.append(f"| {r['selection']} | {r['kept']:,} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['min_class_coverage']:.2f}–{r['max_class_coverage']:.2f} | {r['seconds']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "filter.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "filter.json").write_text(json.dumps({"machine": machine, "scale": scale_rows, "demo": demo_rows},
                                                    indent=2, default=str) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
