"""`make all` on a copy of the repository: set-up skipped (stamp), demo and teacher built, every stage run,
the report written; the second run skips everything."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, outside_make

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The committed and new files of this checkout, with their times (so the set-up stamp holds)."""
    dest = tmp_path_factory.mktemp("checkout")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


# Two settings that cost minutes on 2 cores and change no step of the pipeline (the benchmark measures the
# default recipe itself): two batches of the kept images refined (synthesis of all 3,000 is ~200 s, two thirds
# of `make all`) and the demo teacher trained for 8 epochs instead of 24 (~97.7% instead of 98.8%; ~55 s less).
SET = "synthesize.images=256 demo.teacher_epochs=8 demo.teacher_min_accuracy=0.97"  # make all SET="…"


def make(checkout: Path, *targets):
    venv = Path(sys.executable).parent.parent  # the venv running the tests, already set up
    return subprocess.run(["make", *targets, f"VENV={venv}", f"SET={SET}"], cwd=checkout, env=outside_make(),
                          capture_output=True, text=True, timeout=2400)  # a safety net: ≥ 4× a busy run


def test_make_all_runs_every_stage_and_ends_with_the_report(checkout):
    first = make(checkout, "all")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert "pip install" not in first.stdout  # the stamp file skipped the set-up
    log = first.stdout + first.stderr
    assert "✓ demo data: demo_data (private train 4000 / test 1000; 10,200 URLs, 200 broken)" in log
    assert "crawl: 10,200 rows listed, 0 dropped before the crawl (empty or duplicate URLs); 10,200 attempted, " \
           "10,000 succeeded, 200 failed" in log
    teacher = json.loads((checkout / "demo_data" / "teacher" / "_SUCCESS.json").read_text())
    assert teacher["test_accuracy"] >= 0.97 and teacher["test_images"] == 1000 and teacher["settings"]["epochs"] == 8
    assert f"✓ demo teacher: top-1 {100 * teacher['test_accuracy']:.2f}% on the 1000 private test images" in log
    assert "score: 10,000 images, 10,000 scored, 0 could not be used" in log
    assert "not built yet" not in log
    # the filter keeps a purer set than the pool: the teacher's BatchNorm statistics tell digits from photos
    truth = json.loads((checkout / "runs" / "demo" / "filter" / "summary.json").read_text())["truth"]
    assert truth["precision"] > truth["pool_precision"] + 0.15
    assert "filter: kept 3,000 of 10,000 scored images" in log
    assert "perturb: 3000 kept images, 3000 perturbations" in log
    # the student, trained on web images only, on the private test split it never saw
    metrics = json.loads((checkout / "runs" / "demo" / "evaluate" / "metrics.json").read_text())
    assert metrics["images"] == 1000 and metrics["student"]["top1"] > 0.8
    assert first.stdout.rstrip().endswith("on 1,000 test images")
    assert "report: runs/demo/report/report.html" in first.stdout
    assert (checkout / "runs" / "demo" / "report" / "report.html").stat().st_size > 50_000
    for stage in ("crawl", "score", "filter", "synthesize", "perturb", "distill", "evaluate", "report"):
        assert (checkout / "runs" / "demo" / stage / "_SUCCESS.json").is_file()
    # the default recipe: kept images refined for 50 steps, the student taught on them and the kept ones for 5 epochs
    synthesis = json.loads((checkout / "runs" / "demo" / "synthesize" / "summary.json").read_text())
    assert synthesis["steps"] == 50 and synthesis["start"] == "kept" and synthesis["images"] == 256
    assert re.search(r"distill\s+done\s+epochs 5, transfer_set 3,256", log)

    again = make(checkout, "all")
    log = again.stdout + again.stderr
    assert again.returncode == 0
    assert "demo data: already built" in log
    assert "demo teacher: up to date, skipped" in log
    assert "crawl: up to date, skipped" in log
    assert "score: up to date, skipped" in log
    for stage in ("filter", "synthesize", "perturb", "distill", "evaluate", "report"):
        assert f"{stage}: up to date, skipped" in log
    assert "crawl      done       attempted 10,200, succeeded 10,000, failed 200" in log
