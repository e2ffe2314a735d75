"""Benchmark: the crawl stage against raw img2dataset on the same URL list, in one run.

Both crawl the demo web (≥10,000 URLs, served once on loopback for both) with the same
img2dataset settings, alternately (raw, stage, stage, raw, ...) so that neither profits from a
warmer machine. The stage's time is the whole stage: URL list preparation, the download, the
shard checks and the manifest. Prints images/s of each and the stage's overhead.

    python bench/bench_crawl.py [--config configs/demo.yaml] [--repeats 2]
"""

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
from img2dataset import download  # noqa: E402

from demo.world import build_demo  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.runner import run_stages  # noqa: E402
from stages import STAGES  # noqa: E402
from stages.crawl.stage import stored_side  # noqa: E402
from stages.crawl.webserver import serve_folder  # noqa: E402

WORK = Path("bench/work/crawl")
RESULTS = Path("bench/results")


def raw_img2dataset(cfg, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    c = cfg.crawl
    t0 = time.perf_counter()
    download(url_list=cfg.data.url_list, input_format="parquet", url_col=cfg.data.url_col,
             output_folder=str(out), output_format="webdataset", enable_wandb=False, extract_exif=False,
             compute_hash="sha256", image_size=stored_side(cfg), resize_mode=c.resize_mode,
             processes_count=c.processes_count, thread_count=c.thread_count,
             number_sample_per_shard=c.number_sample_per_shard, timeout=c.timeout, retries=c.retries,
             encode_format=c.encode_format, encode_quality=c.encode_quality, distributor=c.distributor)
    return time.perf_counter() - t0


def crawl_stage(cfg) -> float:
    t0 = time.perf_counter()
    run_stages(cfg, STAGES, only=["crawl"], force=True)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (default 2)")
    args = parser.parse_args()

    cfg = load_config(args.config, [f"run_dir={WORK / 'run'}", "data.serve_folder=null"])
    build_demo(load_config(args.config))
    n_urls = len(pd.read_parquet(cfg.data.url_list))
    served = load_config(args.config).data
    times = {"raw img2dataset": [], "crawl stage": []}
    with serve_folder(served.serve_folder, served.serve_port):
        for i in range(args.repeats):
            order = ["raw img2dataset", "crawl stage"][:: 1 if i % 2 == 0 else -1]
            for name in order:
                seconds = raw_img2dataset(cfg, WORK / "raw") if name.startswith("raw") else crawl_stage(cfg)
                times[name].append(seconds)
                print(f"[bench] {name}: {seconds:.1f}s", flush=True)

    succeeded = json.loads((WORK / "run" / "crawl" / "summary.json").read_text())["succeeded"]
    rows = []
    for name, runs in times.items():
        median = statistics.median(runs)
        rows.append({"what": name, "urls": n_urls, "images": succeeded, "seconds_median": round(median, 2),
                     "seconds_all": [round(t, 2) for t in runs], "images_per_s": round(succeeded / median, 1)})
    overhead = rows[1]["seconds_median"] / rows[0]["seconds_median"] - 1
    c = cfg.crawl
    settings = (f"{c.processes_count} processes × {c.thread_count} threads, {c.number_sample_per_shard} per shard, "
                f"{stored_side(cfg)}px {c.resize_mode}, {args.repeats} runs each, median")
    table = "\n".join([f"| {r['what']} | {r['urls']:,} | {r['images']:,} | {r['seconds_median']:.1f} | "
                       f"{r['images_per_s']:.0f} |" for r in rows])
    report = (f"## crawl stage vs raw img2dataset\n\n{settings}\n\n"
              "| what | URLs | images | seconds | images/s |\n|---|---|---|---|---|\n"
              f"{table}\n\nstage / raw time ratio: {1 + overhead:.3f} (overhead {100 * overhead:+.1f}%, goal ≤ +5%)\n")
    print("\n" + report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "crawl.md").write_text(report)
    (RESULTS / "crawl.json").write_text(json.dumps({"settings": settings, "rows": rows, "overhead": overhead}, indent=2))


if __name__ == "__main__":
    main()
