"""A crawl killed with SIGKILL part-way, then re-run, ends as if it had never been killed."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from manifests import CRAWL, read_manifest
from pipeline.config import dump_yaml
from pipeline.rundir import RunDir
from tests.conftest import REPO, web_config
from tests.test_crawl import shard_samples


class SlowHandler(SimpleHTTPRequestHandler):
    """Each answer takes 30 ms, so that the crawl is still running when the test kills it."""

    def do_GET(self):
        time.sleep(0.03)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_server(small_web):
    server = ThreadingHTTPServer(("127.0.0.1", small_web["port"]),
                                 partial(SlowHandler, directory=str(small_web["root"] / "web")))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield
    server.shutdown()
    server.server_close()


def crawl_command(config_file):
    return [sys.executable, "-m", "pipeline", "crawl", str(config_file)]


def test_sigkill_then_rerun_gives_each_success_exactly_once(small_web, slow_server, tmp_path):
    cfg = web_config(small_web, tmp_path / "run", "data.serve_folder=null", "crawl.number_sample_per_shard=20",
                     "crawl.processes_count=1", "crawl.thread_count=2")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_yaml(cfg))
    shards = tmp_path / "run" / "crawl" / "shards"

    proc = subprocess.Popen(crawl_command(config_file), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(shards.glob("*_stats.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the crawl and all of img2dataset's processes
    proc.wait()
    done_at_kill = len(list(shards.glob("*_stats.json")))
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= done_at_kill < 17, "the kill must land part-way through the crawl"
    assert RunDir(cfg.run_dir).record("crawl") is None

    rerun = subprocess.run(crawl_command(config_file), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming interrupted run" in rerun.stderr
    record = RunDir(cfg.run_dir).record("crawl")
    assert record["resumed"] is True

    m = read_manifest(tmp_path / "run" / "crawl" / "manifest.parquet", CRAWL)
    sources = small_web["sources"]
    assert len(m) == len(sources) and m["uid"].is_unique
    joined = m.merge(sources, on="uid")
    assert (joined["reason"].fillna("ok") == joined["expected_reason"].fillna("ok")).all()
    uids = [u for u, _ in shard_samples(shards)]
    assert len(uids) == len(set(uids)) == (sources["planted"].isna()).sum()
    assert set(uids) == set(m.loc[m["status"] == "success", "uid"])
    stats = [json.loads(p.read_text()) for p in shards.glob("*_stats.json")]
    assert sum(s["count"] for s in stats) == len(sources)
