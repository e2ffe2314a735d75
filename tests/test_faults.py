"""Faults a user meets: each class of the reliability issue, with the one-line error (exit 2) where it is
a user error and, byte for byte, the finished outputs and records that were there before.

1 a user error never deletes finished work        2 pre-flight checks before the first stage
3 every user error is one line, exit 2            4 untrusted URL lists stay on the web
5 no partial input taken as complete              6 one writer per run directory
7 a run directory is what you name                8 checkpoints are data
9 logs a file can hold                            10 entry-point teachers beside their spec
11 the report says what went wrong
"""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from manifests import CRAWL, read_manifest
from pipeline.cli import cli
from pipeline.config import dump_yaml, load_config
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.runner import format_status, run_stages
from stages import STAGES
from tests.conftest import REPO, Planted, config, fresh, web_config
from tests.fake_stages import SPECS


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes): what must survive a failed run."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # the lock file is no output: it is empty when released


def cli_run(*args, cwd=None):
    """``webdistill ARGS`` in this process (as click runs it: exit status, stdout, stderr), from ``cwd``."""
    here = os.getcwd()
    os.chdir(cwd or REPO)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(here)


def cli_process(*args) -> subprocess.CompletedProcess:
    """``webdistill ARGS`` as its own process: what a user's shell sees, tracebacks included."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def one_error_line(result) -> str:
    """The error of a CLI call that must fail as a user error: exit 2, one `error:` line, no traceback."""
    code = getattr(result, "returncode", getattr(result, "exit_code", None))
    err = result.stderr
    assert code == 2, (err, getattr(result, "exception", None))
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1]


@pytest.fixture
def finished(upstream, tmp_path, small_web, mnist_teacher, private):
    """A copy of a run with crawl, score, filter, synthesize and perturb done, its config file, and its bytes."""
    run_dir = fresh(upstream, tmp_path / "run")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_yaml(config(small_web, run_dir, mnist_teacher, private)))
    return {"run": run_dir, "config": config_file, "before": snapshot(run_dir)}


# ---------------------------------------------------------------- 1 · a user error deletes nothing


@pytest.mark.parametrize("bad", [
    ["--set", "data.url_list=/nowhere/urls.parquet", "--force"],  # a typo in the URL list of a finished crawl
    ["--set", "teacher.checkpoint=CORRUPT", "--only", "score", "--force"],  # a teacher that fails to load
    ["--set", "crawl.number_sample_per_shard=0", "--force"],  # an invalid value
    ["--set", "distill.batch_size=0"],
], ids=["url-list-typo", "teacher-unloadable", "shard-size-0", "batch-size-0"])
def test_a_user_error_leaves_the_finished_run_byte_for_byte(finished, bad, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint")
    args = [a.replace("CORRUPT", str(corrupt)) for a in bad]
    line = one_error_line(cli_run("run", finished["config"], *args))
    assert snapshot(finished["run"]) == finished["before"], line
    status = cli_run("status", finished["config"]).stdout
    assert "perturb    done" in status and "interrupted" not in status, status


def test_a_failing_rerun_builds_beside_the_finished_stage_and_keeps_it(tmp_path):
    """A re-run with other settings that dies half-way leaves the last complete output and its record."""
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    run_stages(cfg, SPECS)
    before = snapshot(tmp_path / "run" / "first")
    dying = load_config(None, [f"run_dir={tmp_path / 'run'}", "crawl.retries=99"])  # fake stage: killed half-way
    with pytest.raises(KeyboardInterrupt):
        run_stages(dying, SPECS, force=True)
    assert snapshot(tmp_path / "run" / "first") == before
    assert (tmp_path / "run" / "first.partial" / "partial.txt").is_file()  # the new attempt, beside it
    status = format_status(dying, RunDir(dying.run_dir), SPECS)
    assert "first      stale" in status and "an interrupted re-run waits in first.partial/" in status
    run_stages(load_config(None, [f"run_dir={tmp_path / 'run'}", "crawl.timeout=5"]), SPECS)  # completes: replaces
    assert (tmp_path / "run" / "first" / "out.txt").read_text() == "5"
    assert not (tmp_path / "run" / "first.partial").exists()


def test_a_swap_cut_short_by_a_kill_is_repaired(tmp_path):
    run = RunDir(tmp_path / "run")
    run.begin("first", {"x": 1}, resume=False)
    (run.partial_dir("first") / "new.txt").write_text("new")
    (tmp_path / "run" / ".first.replaced").mkdir()  # killed between the two renames of finish()
    (tmp_path / "run" / ".first.replaced" / "_SUCCESS.json").write_text("{}")
    (run.partial_dir("first") / "_SUCCESS.json").write_text('{"run_id": "new"}')
    RunDir(tmp_path / "run").recover(["first"])
    assert (tmp_path / "run" / "first" / "new.txt").read_text() == "new"
    assert not (tmp_path / "run" / ".first.replaced").exists()


# ---------------------------------------------------------------- 2 · pre-flight


def test_a_torchscript_teacher_without_features_is_refused_before_the_crawl(small_web, tmp_path):
    class LogitsOnly(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    script = tmp_path / "teacher.ts"
    torch.jit.script(LogitsOnly()).save(str(script))
    cfg = web_config(small_web, tmp_path / "run", "teacher.format=torchscript", f"teacher.checkpoint={script}",
                     "teacher.class_names=[a, b, c, d, e, f, g, h, i, j]", "teacher.input_size=28",
                     "teacher.channels=1")
    (tmp_path / "c.yaml").write_text(dump_yaml(cfg))
    line = one_error_line(cli_run("run", tmp_path / "c.yaml"))
    assert "exports no feature method" in line
    assert not (tmp_path / "run" / "crawl").exists() and not (tmp_path / "run" / "crawl.partial").exists()


def test_diagnostics_sources_take_url_or_uid_and_a_wrong_schema_is_refused_before_the_crawl(small_web, mnist_teacher,
                                                                                            private, tmp_path):
    from stages.filter.stage import read_sources

    sources = small_web["sources"]
    by_url = tmp_path / "by_url.parquet"
    sources[["url", "source", "label"]].to_parquet(by_url)
    by_uid = tmp_path / "by_uid.parquet"
    sources[["uid", "source", "label"]].to_parquet(by_uid)
    assert read_sources(str(by_url))["uid"].tolist() == read_sources(str(by_uid))["uid"].tolist()

    wrong = tmp_path / "wrong.parquet"
    sources[["url", "label"]].rename(columns={"url": "link"}).to_parquet(wrong)
    cfg = config(small_web, tmp_path / "run", mnist_teacher, private, f"filter.diagnostics_sources={wrong}")
    (tmp_path / "c.yaml").write_text(dump_yaml(cfg))
    line = one_error_line(cli_run("run", tmp_path / "c.yaml"))
    assert "lacks column(s) source, uid or url" in line
    assert not (tmp_path / "run" / "crawl").exists()


def test_the_test_set_and_the_student_name_are_checked_before_the_crawl(small_web, mnist_teacher, private, tmp_path):
    for override, expected in [(f"evaluate.test_set={tmp_path}/none-*.tar", "matches no file"),
                               ("distill.student=resnet9000", "unknown webdistill model 'resnet9000'")]:
        cfg = config(small_web, tmp_path / "run", mnist_teacher, private, override)
        (tmp_path / "c.yaml").write_text(dump_yaml(cfg))
        assert expected in one_error_line(cli_run("run", tmp_path / "c.yaml"))
        assert not (tmp_path / "run" / "crawl.partial").exists()


# ---------------------------------------------------------------- 3 · one line, exit 2

BAD_SETTINGS = [
    "crawl.number_sample_per_shard=0", "crawl.processes_count=0", "crawl.thread_count=-1", "crawl.timeout=0",
    "crawl.image_size=0", "crawl.retries=-1", "crawl.max_image_area=-5", "data.serve_port=70000",
    "score.batch_size=0", "score.top_k=0", "score.num_workers=-1",
    "filter.budget=1.5", "filter.budget=-0.3", "filter.budget=0", "filter.k=0", "filter.target_recall=0",
    "filter.target_recall=1.5", "filter.min_confidence=2", "filter.weight_clip=[3, 1]", "filter.weight_clip=[0, 1]",
    "filter.temperature=0", "perturb.alpha=0", "perturb.variants=-1",
    "distill.epochs=0", "distill.batch_size=0", "distill.lr=0", "distill.batch_select=0",
    "distill.keep_checkpoints=0", "distill.teacher_accuracy=1.2", "evaluate.batch_size=0",
    "crawl.timeout=soon", "crawl.resize_mode=boarder", "crawl.procesess_count=2", "run_dir.sub=1",
    "crawl", "crawl.timeout=[1, 2", "teacher.channels=2", "distill.preset=kd4",
]


@pytest.mark.parametrize("setting", BAD_SETTINGS)
def test_a_bad_setting_is_one_error_line_naming_it(setting, tmp_path):
    result = CliRunner().invoke(cli, ["status", "--set", f"run_dir={tmp_path / 'run'}", "--set", setting])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert setting.split("=")[0].split(".")[-1] in lines[0] or setting in lines[0]
    assert not (tmp_path / "run").exists()


BAD_FILES = {
    "top-level list": b"- crawl\n- score\n",
    "top-level scalar": b"just words\n",
    "not utf-8": b"crawl:\n  timeout: \xff\xfe\n",
    "not yaml": b"crawl: [unclosed\n",
    "section is a value": b"crawl: 3\n",
    "budget share and count": b"filter:\n  budget: 1.5\n",
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_config_file_is_one_error_line_without_traceback(name, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(BAD_FILES[name])
    assert str(path) in one_error_line(cli_process("run", path))


def test_a_run_dir_that_is_a_file_is_one_error_line(tmp_path):
    (tmp_path / "taken").write_text("a file")
    line = one_error_line(cli_run("crawl", "--set", f"run_dir={tmp_path / 'taken'}", "--set",
                                  "data.url_list=" + str(tmp_path / "taken")))
    assert "is a file, not a folder" in line
    assert (tmp_path / "taken").read_text() == "a file"


def test_manifest_errors_name_the_stage_that_writes_them(finished):
    (finished["run"] / "filter" / "selection.parquet").write_bytes(b"PAR1 cut short")
    line = one_error_line(cli_run("run", finished["config"], "--only", "perturb", "--force"))
    assert "re-run the filter stage" in line and "selection stage" not in line


# ---------------------------------------------------------------- 4 · untrusted URL lists


class Hostile(BaseHTTPRequestHandler):
    """A web that misbehaves: drips bytes, redirects (to itself and to file://), serves a 50-megapixel PNG."""

    small_png: bytes = b""
    huge_png: bytes = b""

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, drip: bool = False):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not drip:
            self.wfile.write(body)
            return
        for byte in body:  # one byte a second: every read beats a socket timeout, the download never ends
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(1.0)

    def do_GET(self):
        if self.path == "/drip.png":
            self._send(self.small_png, drip=True)
        elif self.path == "/slow-headers.png":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(600):
                try:
                    self.wfile.write(b"X-Slow: 1\r\n")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.5)
        elif self.path == "/redirect.png":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.end_headers()
        elif self.path == "/to-file.png":
            self.send_response(302)
            self.send_header("Location", self.server.private_uri)
            self.end_headers()
        elif self.path == "/huge.png":
            self._send(self.huge_png)
        elif self.path == "/announced-huge.png":  # says 200 MB: refused before a byte of it is read
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(200 << 20))
            self.end_headers()
            self.wfile.write(self.small_png)
        else:
            self._send(self.small_png)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile_crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    private = root / "private.png"  # a private image on this machine: must never reach the shards
    Image.new("RGB", (40, 40), (200, 10, 10)).save(private)
    Hostile.small_png = _png(Image.new("RGB", (32, 32), (10, 200, 10)))
    Hostile.huge_png = _png(Image.new("L", (8000, 6300), 128))  # 50.4 megapixels, a few KB of PNG
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    server.private_uri = private.as_uri()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/ok.png", f"{base}/redirect.png", f"{base}/drip.png", f"{base}/slow-headers.png",
            f"{base}/to-file.png", f"{base}/huge.png", f"{base}/announced-huge.png", private.as_uri(), "data:image/png;base64,iVBORw0KGgo=",
            "ftp://127.0.0.1/x.png", "", None]
    pd.DataFrame({"url": urls}).to_parquet(root / "urls.parquet")
    cfg = load_config(None, [f"run_dir={root / 'run'}", f"data.url_list={root / 'urls.parquet'}",
                             "crawl.timeout=3", "crawl.processes_count=1", "crawl.thread_count=4"])
    t0 = time.time()
    run_stages(cfg, STAGES, only=["crawl"])
    seconds = time.time() - t0
    server.shutdown()
    run = RunDir(root / "run")
    manifest = read_manifest(run.stage_dir("crawl") / "manifest.parquet", CRAWL).set_index("url")
    yield {"manifest": manifest, "base": base, "private": private, "run": run, "seconds": seconds}


def test_only_http_and_https_are_fetched_and_refusals_are_counted(hostile_crawl):
    m, private = hostile_crawl["manifest"], hostile_crawl["private"]
    assert m.loc[private.as_uri(), "reason"] == "refused_scheme"
    assert m.loc["data:image/png;base64,iVBORw0KGgo=", "reason"] == "refused_scheme"
    assert m.loc["ftp://127.0.0.1/x.png", "reason"] == "refused_scheme"
    assert m.loc[f"{hostile_crawl['base']}/to-file.png", "status"] == "failed"  # a redirect to file:// too
    summary = json.loads((hostile_crawl["run"].stage_dir("crawl") / "summary.json").read_text())
    assert summary["failures_by_reason"]["refused_scheme"] == 3
    assert summary["empty_urls"] == 2
    red = 0
    for tar in (hostile_crawl["run"].stage_dir("crawl") / "shards").glob("*.tar"):
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=int)
            red += int((pixels[..., 0] > 150).mean() > 0.5)
    assert red == 0, "the private image reached the shards"


def test_redirects_within_http_are_followed(hostile_crawl):
    m = hostile_crawl["manifest"]
    assert m.loc[f"{hostile_crawl['base']}/ok.png", "status"] == "success"
    assert m.loc[f"{hostile_crawl['base']}/redirect.png", "status"] == "success"


def test_a_dripping_server_is_cut_at_the_timeout_in_body_and_headers(hostile_crawl):
    m = hostile_crawl["manifest"]
    for path in ("drip.png", "slow-headers.png"):
        assert m.loc[f"{hostile_crawl['base']}/{path}", "reason"] == "timeout", m.loc[f"{hostile_crawl['base']}/{path}"]
    # a safety net, not a timing claim: unbounded, the drip alone would hold the crawl for 100+ seconds
    # and the header drip for 300
    assert hostile_crawl["seconds"] < 240


def test_a_50_megapixel_image_is_refused_by_default_before_it_is_decoded(hostile_crawl):
    row = hostile_crawl["manifest"].loc[f"{hostile_crawl['base']}/huge.png"]
    assert (row["status"], row["reason"]) == ("failed", "filtered_size"), row["error"]
    assert "50,400,000 pixels" in row["error"] and "not decoded" in row["error"]


def test_a_download_announcing_more_than_the_cap_is_refused_unread(hostile_crawl):
    row = hostile_crawl["manifest"].loc[f"{hostile_crawl['base']}/announced-huge.png"]
    assert (row["status"], row["reason"]) == ("failed", "too_large"), row["error"]


def test_a_folder_source_still_reads_its_own_files(tmp_path):
    folder = tmp_path / "images" / "cats"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(folder / f"{i}.png")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.source=folder", f"data.folder={tmp_path / 'images'}",
                             "crawl.processes_count=1"])
    run_stages(cfg, STAGES, only=["crawl"])
    assert RunDir(cfg.run_dir).record("crawl")["counts"]["succeeded"] == 3


# ---------------------------------------------------------------- 5 · no partial input taken as complete


def test_a_truncated_transfer_set_shard_is_an_error_naming_it_and_the_stage(finished):
    shard = sorted((finished["run"] / "perturb" / "shards").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    line = one_error_line(cli_run("run", finished["config"], "--only", "distill"))
    assert shard.name in line and "re-run the perturb stage" in line
    assert not (finished["run"] / "distill").exists()


def test_a_replaced_crawl_shard_is_caught_by_its_sha256(finished):
    shard = sorted((finished["run"] / "crawl" / "shards").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    line = one_error_line(cli_run("run", finished["config"], "--only", "score", "--force"))
    assert shard.name in line and "sha256" in line and "re-run the crawl stage" in line


# ---------------------------------------------------------------- 6 · one writer per run directory


def test_a_second_writer_is_refused_naming_the_holder_and_status_needs_no_lock(finished):
    run = RunDir(finished["run"])
    with run.lock():
        line = one_error_line(cli_run("run", finished["config"]))
        assert f"pid {os.getpid()}" in line and "in use by another webdistill run" in line
        assert cli_run("status", finished["config"]).exit_code == 0
    assert snapshot(finished["run"]) == finished["before"]


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_message(tmp_path, caplog):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": 999999, "host": "gone"}))
    with caplog.at_level(logging.INFO, logger="webdistill"):
        run_stages(load_config(None, [f"run_dir={tmp_path / 'run'}"]), SPECS)
    assert "taking over the lock" in caplog.text and "pid 999999 on gone" in caplog.text
    assert lock.read_text() == ""  # released


# ---------------------------------------------------------------- 7 · a run directory is what you name


def test_a_copied_run_directory_acts_on_itself_and_opens_from_anywhere(finished, tmp_path):
    cli_run("run", finished["config"], "--only", "crawl")  # writes the resolved config.yaml
    copy = tmp_path / "copy"
    shutil.copytree(finished["run"], copy)
    original = snapshot(finished["run"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    status = cli_run("status", copy, cwd=elsewhere)
    assert f"run directory {copy}" in status.stdout
    assert "crawl      done" in status.stdout and "perturb    done" in status.stdout, status.stdout
    assert cli_run("run", copy, "--only", "filter", "--force", cwd=elsewhere).exit_code == 0
    assert snapshot(finished["run"]) == original
    assert RunDir(copy).record("filter")["run_id"] != RunDir(finished["run"]).record("filter")["run_id"]


def test_relative_paths_are_made_absolute_as_the_config_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.url_list=lists/urls.parquet", "score.embedder_checkpoint=random"])
    assert cfg.data.url_list == str(tmp_path / "lists" / "urls.parquet")
    assert cfg.run_dir == str(tmp_path / "runs" / "demo")
    assert cfg.score.embedder_checkpoint == "random"  # a value that names no file stays as it is


# ---------------------------------------------------------------- 8 · checkpoints are data


def test_resume_loads_checkpoints_as_data_and_skips_unusable_ones(tmp_path):
    from types import SimpleNamespace

    from stages.distill.stage import resume, save_checkpoint

    def trainer():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        return SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               theta_optimizer=None, sampler=None, previous=None,
                               scaler=torch.amp.GradScaler("cpu", enabled=False), device="cpu")

    saved = trainer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(saved.optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path, 1, saved, scheduler, [{"epoch": 1, "loss": 0.5}], keep=5)
    marker = tmp_path / "code_ran"
    torch.save({"epoch": 2, "model": Planted(marker)}, tmp_path / "epoch_002.pt")  # a planted pickle
    torch.save({"epoch": 3, "model": saved.model.state_dict()}, tmp_path / "epoch_003.pt")  # lacks keys
    loaded = trainer()
    epoch, history = resume(tmp_path, loaded, torch.optim.lr_scheduler.LambdaLR(loaded.optimizer, lambda s: 1.0))
    assert (epoch, history) == (1, [{"epoch": 1, "loss": 0.5}])
    assert not marker.exists()


# ---------------------------------------------------------------- 9 · logs a file can hold


def test_progress_off_a_terminal_is_log_lines_without_carriage_returns(caplog):
    from stages.common.progress import LoggedProgress

    with caplog.at_level(logging.INFO, logger="webdistill.progress"):
        for _ in LoggedProgress(range(1000), desc="score", unit="img"):
            pass
        with LoggedProgress(total=10, desc="demo teacher") as bar:
            for _ in range(10):
                bar.update()
                bar.set_postfix(loss=0.1)  # tqdm redraws on each: the log must not
    assert "\r" not in caplog.text
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("score: 1000/1000 (100%)") and messages[-1].startswith("demo teacher: 10/10")
    assert len(messages) <= 4, messages


def test_written_files_follow_the_umask(tmp_path):
    from manifests import atomic_write_bytes

    mask = os.umask(0)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "f", b"x")
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~mask


# ---------------------------------------------------------------- 10 · entry-point teachers


NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.ReLU())
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.body(x))
"""


@pytest.mark.parametrize("arch", ["net:Net", "net.py:Net", "ABSOLUTE"])
def test_an_entry_point_teacher_is_found_beside_its_spec_file(arch, tmp_path, monkeypatch):
    from stages.common.teacher import load_teacher

    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "net.py").write_text(NET)
    spec = {}
    exec(NET, spec)
    torch.save(spec["Net"]().state_dict(), folder / "net.pt")
    arch = f"{folder / 'net.py'}:Net" if arch == "ABSOLUTE" else arch
    (folder / "teacher.yaml").write_text(f"format: entrypoint\narch: '{arch}'\ncheckpoint: net.pt\n"
                                         "class_names: [a, b, c]\ninput_size: 28\nchannels: 1\n")
    monkeypatch.chdir(tmp_path)  # not the teacher's folder, and nothing on PYTHONPATH
    cfg = load_config(None, [f"teacher.spec_file={folder / 'teacher.yaml'}"])
    assert load_teacher(cfg.teacher).num_classes == 3


def test_an_entry_point_that_cannot_be_found_says_where_it_looked(tmp_path, monkeypatch):
    from stages.common.teacher import load_teacher

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["teacher.format=entrypoint", "teacher.arch=nowhere_net:Net", "teacher.class_names=[a, b]",
                             f"teacher.checkpoint={tmp_path}", "teacher.input_size=8"])
    with pytest.raises(UserError, match=f"cannot find nowhere_net .*{tmp_path}.*PYTHONPATH"):
        load_teacher(cfg.teacher)


# ---------------------------------------------------------------- 11 · the report says what went wrong


def test_the_report_warns_of_a_dominant_pseudo_class_and_classes_left_with_few_images():
    from stages.report.stage import class_coverage, warnings_of

    summary = {"pseudo_class_histogram": {"before": {"7": 630, "8": 300, "9": 70}, "after": {"7": 200, "8": 9}}}
    found = warnings_of(summary)
    assert any("63% of the scored pool '7'" in w for w in found)
    assert any("2 class(es) keep fewer than 10 images (8: 9, 9: 0)" in w for w in found), found
    balanced = {"pseudo_class_histogram": {"before": {"a": 50, "b": 50}, "after": {"a": 20, "b": 20}}}
    assert warnings_of(balanced) == []
    coverage = class_coverage(summary).set_index("class")
    assert coverage.loc["7", "pool share"] == "63.0%" and coverage.loc["9", "kept"] == 0
    assert coverage["note"].tolist() == ["", "⚠ few", "⚠ few"] and "synthesised" not in coverage
    filled = class_coverage(summary, {"7": 40, "8": 40, "9": 40}).set_index("class")  # synthesis fills the gaps
    assert filled.loc["9", "synthesised"] == 40 and filled.loc["9", "kept"] == 0
