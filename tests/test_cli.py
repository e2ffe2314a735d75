import subprocess
import sys

from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import dump_yaml
from pipeline.rundir import RunDir
from tests.conftest import REPO, copy_crawl, outside_make, web_config


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_config_typo_is_one_line_without_traceback(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("crawl:\n  image_sise: 32\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {config}: unknown key 'crawl.image_sise'; "
                                   "did you mean 'image_size'?")


def test_status_of_a_crawled_run(small_web, crawled, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(dump_yaml(web_config(small_web, tmp_path / "run")))
    assert "crawl      missing    not run yet" in invoke("status", str(config)).output
    copy_crawl(crawled, tmp_path / "run")  # the session's crawl of the same web, with the same settings
    out = invoke("status", str(config)).output
    assert "crawl      done       attempted 324, succeeded 300, failed 24, shards 4" in out
    for stage in ("score", "filter", "perturb", "distill", "evaluate", "report"):
        assert f"{stage:<10} missing    not run yet" in out
    # skipped the second time, re-run with --force
    run_id = RunDir(tmp_path / "run").record("crawl")["run_id"]
    assert invoke("crawl", str(config)).exit_code == 0
    assert RunDir(tmp_path / "run").record("crawl")["run_id"] == run_id
    assert invoke("crawl", str(tmp_path / "run"), "--force").exit_code == 0  # a run directory works as its config
    assert RunDir(tmp_path / "run").record("crawl")["run_id"] != run_id
    assert "crawl      done       attempted 324, succeeded 300, failed 24, shards 4" in invoke(
        "status", str(tmp_path / "run")).output


def test_help_explains_stages_and_options():
    out = invoke("--help").output
    for word in ("crawl", "status", "demo-data", "defaults", "run"):
        assert word in out
    assert "--force" in invoke("crawl", "--help").output


def test_not_a_run_directory(tmp_path):
    result = CliRunner().invoke(cli, ["status", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a run directory (no config.yaml)" in result.output


def test_make_set_passes_overrides_to_the_demo_its_teacher_and_the_run():
    dry = subprocess.run(["make", "-n", "all", "SET=synthesize.steps=10 distill.epochs=2"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    for command in ("demo-data", "demo-teacher", "run"):
        line = next(x for x in dry.splitlines() if f"-m pipeline {command} " in x)
        assert line.endswith("--set synthesize.steps=10 --set distill.epochs=2"), line


def test_make_setup_gpu_swaps_faiss_cpu_for_faiss_gpu():
    def recipe(*args):
        return subprocess.run(["make", "-n", "setup", "VENV=/nonexistent/venv", *args], cwd=REPO, env=outside_make(),
                              capture_output=True, text=True, check=True).stdout

    gpu = recipe("GPU=1")
    # the other build goes before this one installs: both write the module `faiss`
    assert gpu.index("uninstall --quiet -y \\\n  faiss-cpu") < gpu.index("-e '.[test,gpu]'")
    assert gpu.rstrip().endswith("touch /nonexistent/venv/.webdistill-installed-gpu")
    cpu = recipe()
    assert "-e '.[test,cpu]'" in cpu and "faiss-gpu" in cpu and ".[test,gpu]" not in cpu
