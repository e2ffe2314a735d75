"""bench/gpu_check.py in its reduced mode (what it runs without CUDA): every part runs and is reported."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_reduced_mode_runs_every_part(tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--reduced", "--work", str(tmp_path / "work"),
                           "--results", str(tmp_path / "results")], cwd=REPO, capture_output=True, text=True,
                          timeout=900)  # a safety net: ~40 s on a busy 2-core machine
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "gpu.json").read_text())
    assert results["mode"] == "reduced"
    score, kept = results["score"], results["filter"]["kept"]
    assert score["images"] == 24 and score["stage_img_s"] > 0 and score["bare_forward_img_s"] > 0
    assert results["filter"]["vectors"] == 20000 and 0 < kept < 20000
    assert results["distill"]["stage_images_per_s"] > 0 and results["distill"]["in_memory_images_per_s"] > 0
    assert results["distill"]["student"] == "resnet18"
    table = (tmp_path / "results" / "gpu.md").read_text()
    for part in ("| score: ResNet-50 teacher", "| filter: whole stage on 20,000", "| distill: resnet18", "| torchrun"):
        assert part in table
