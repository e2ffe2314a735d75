"""crawl: real img2dataset crawls of a web served on loopback — accounting, failure reasons, damaged
shards, the Spark distributor, and a crawl killed with SIGKILL then resumed."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from manifests import CRAWL, read_manifest
from pipeline.config import dump_yaml, load_config
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.runner import run_stages
from stages import STAGES
from stages.crawl.stage import drop_incomplete_shards, failure_reason
from tests.conftest import REPO, web_config


@pytest.fixture(scope="module")
def crawled(small_web, tmp_path_factory):
    cfg = web_config(small_web, tmp_path_factory.mktemp("crawl") / "run")
    run_stages(cfg, STAGES, only=["crawl"])
    out = RunDir(cfg.run_dir).stage_dir("crawl")
    return {"cfg": cfg, "out": out, "manifest": read_manifest(out / "manifest.parquet", CRAWL)}


def shard_samples(folder):
    """(uid, decoded image) of every sample in every shard of ``folder``."""
    samples = []
    for tar in sorted(folder.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            samples.append((json.loads(s["json"])["uid"], Image.open(io.BytesIO(s["jpg"])).convert("RGB")))
    return samples


def test_failures_are_counted_exactly_as_planted(crawled, small_web):
    m, sources = crawled["manifest"], small_web["sources"]
    assert len(m) == len(sources)
    assert set(m["uid"]) == set(sources["uid"])
    planted = sources["expected_reason"].value_counts().to_dict()
    assert planted == {"decode_error": 12, "http_404": 6, "connection_refused": 6}
    assert m["reason"].value_counts().to_dict() == planted
    # and each failure is the one planted in that very URL
    joined = m.merge(sources, on="uid")
    assert (joined["reason"].fillna("ok") == joined["expected_reason"].fillna("ok")).all()
    assert joined.loc[joined["status"] == "failed", "error"].notna().all()


def test_every_success_decodes_from_the_shards_once(crawled):
    m = crawled["manifest"]
    samples = shard_samples(crawled["out"] / "shards")
    uids = [u for u, _ in samples]
    assert len(uids) == len(set(uids))
    assert set(uids) == set(m.loc[m["status"] == "success", "uid"])
    assert all(img.size == (64, 64) for _, img in samples)


def test_summary_and_record(crawled):
    summary = json.loads((crawled["out"] / "summary.json").read_text())
    assert summary["attempted"] == 324 and summary["succeeded"] == 300
    assert summary["failures_by_reason"] == {"decode_error": 12, "http_404": 6, "connection_refused": 6}
    assert summary["images_per_s"] > 0
    record = RunDir(crawled["cfg"].run_dir).record("crawl")
    assert record["counts"]["succeeded"] == 300 and record["counts"]["shards"] == 4


def test_incomplete_shards_are_dropped(crawled, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(crawled["out"] / "shards", folder)
    tar = folder / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])  # killed while writing, stats file from a previous run
    (folder / "00002_stats.json").unlink()  # killed before img2dataset wrote the stats
    assert drop_incomplete_shards(folder) == ["00001", "00002"]
    assert sorted(p.name for p in folder.glob("*.tar")) == ["00000.tar", "00003.tar"]
    assert drop_incomplete_shards(folder) == []


def test_folder_source(tmp_path):
    images = tmp_path / "images"
    for cls in ("cats", "dogs"):
        (images / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20 + i, 30), (i * 40, 0, 0)).save(images / cls / f"{i}.png")
    (images / "notes.txt").write_text("not an image")
    (images / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.source=folder", f"data.folder={images}",
                             "crawl.processes_count=1", "crawl.thread_count=2"])
    run_stages(cfg, STAGES, only=["crawl"])
    m = read_manifest(tmp_path / "run" / "crawl" / "manifest.parquet", CRAWL)
    assert len(m) == 7
    assert m.loc[m["status"] == "failed", "reason"].tolist() == ["decode_error"]
    ok = m[m["status"] == "success"]
    assert sorted(ok["caption"]) == ["cats"] * 3 + ["dogs"] * 3
    assert len(shard_samples(tmp_path / "run" / "crawl" / "shards")) == 6


@pytest.mark.parametrize("overrides, message", [
    (["data.url_list=/nowhere/urls.parquet"], r"URL list /nowhere/urls.parquet not found .*make demo-data"),
    (["crawl.img2dataset_args={resize_mdoe: border}"], r"img2dataset_args.resize_mdoe is not an img2dataset"),
    (["crawl.img2dataset_args={output_format: files}"], r"output_format is set by the crawl stage"),
    (["data.url_col=link"], r"has no column 'link'"),
    (["crawl.distributor=ray"], r"crawl.distributor: ray is not installed here: `pip install ray`"),
])
def test_bad_input_is_a_clear_error(small_web, tmp_path, overrides, message):
    cfg = web_config(small_web, tmp_path / "run", *overrides)
    with pytest.raises(UserError, match=message):
        run_stages(cfg, STAGES, only=["crawl"])
    assert RunDir(cfg.run_dir).record("crawl") is None


def test_nothing_downloaded_is_an_error_not_an_empty_success(tmp_path):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:1/a.jpg\nhttp://127.0.0.1:1/b.jpg\n")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.url_list={tmp_path / 'urls.txt'}",
                             "crawl.processes_count=1"])
    with pytest.raises(UserError, match=r"no image could be downloaded \(connection_refused 2\)"):
        run_stages(cfg, STAGES, only=["crawl"])
    assert RunDir(cfg.run_dir).record("crawl") is None


def test_empty_url_list(tmp_path):
    (tmp_path / "urls.csv").write_text("url\n\n")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.url_list={tmp_path / 'urls.csv'}"])
    with pytest.raises(UserError, match=r"urls.csv\) lists no URL"):
        run_stages(cfg, STAGES, only=["crawl"])


def test_unreadable_url_list(tmp_path):
    bad = tmp_path / "urls.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.url_list={bad}"])
    with pytest.raises(UserError, match=r"urls.parquet: cannot read it as parquet"):
        run_stages(cfg, STAGES, only=["crawl"])


@pytest.mark.parametrize("error, reason", [
    ("HTTP Error 404: File not found", "http_404"),
    ("HTTP Error 503: Service Unavailable", "http_503"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
    ("The read operation timed out", "timeout"),
    ("Image decoding error", "decode_error"),
    ("something new", "other"),
])
def test_failure_reason(error, reason):
    assert failure_reason(error) == reason


def test_txt_and_csv_url_lists(small_web, tmp_path):
    urls = pd.read_parquet(small_web["urls"])["url"].head(30)
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n" + urls.iloc[0] + "\n")  # one duplicate
    cfg = web_config(small_web, tmp_path / "run", f"data.url_list={tmp_path / 'urls.txt'}")
    run_stages(cfg, STAGES, only=["crawl"])
    details = RunDir(cfg.run_dir).record("crawl")["details"]
    assert details["duplicate_urls"] == 1 and details["listed"] == 31
    assert RunDir(cfg.run_dir).record("crawl")["counts"]["attempted"] == 30
    with tarfile.open(tmp_path / "run" / "crawl" / "shards" / "00000.tar") as tar:
        assert any(n.endswith(".jpg") for n in tar.getnames())


@pytest.mark.skipif(shutil.which("java") is None, reason="pyspark needs a Java runtime")
def test_pyspark_distributor_crawls_the_same(small_web, crawled, tmp_path, monkeypatch, capfd):
    """img2dataset's pyspark distributor in Spark local mode: the multi-machine path, on one machine."""
    pytest.importorskip("pyspark")
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    cfg = web_config(small_web, tmp_path / "run", "crawl.distributor=pyspark")
    run_stages(cfg, STAGES, only=["crawl"])
    assert "No pyspark session found, creating a new one!" in capfd.readouterr().out  # Spark did the work
    m = read_manifest(tmp_path / "run" / "crawl" / "manifest.parquet", CRAWL)
    expected = crawled["manifest"]
    assert m.set_index("uid")["reason"].sort_index().equals(expected.set_index("uid")["reason"].sort_index())
    assert len(shard_samples(tmp_path / "run" / "crawl" / "shards")) == 300


# ---------------------------------------------------------------- killed and resumed


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
    shards = tmp_path / "run" / "crawl.partial" / "shards"  # where the crawl is built until it completes

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
    assert not (tmp_path / "run" / "crawl").exists()  # nothing incomplete stands where the finished crawl goes

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
    shards = tmp_path / "run" / "crawl" / "shards"
    uids = [u for u, _ in shard_samples(shards)]
    assert len(uids) == len(set(uids)) == (sources["planted"].isna()).sum()
    assert set(uids) == set(m.loc[m["status"] == "success", "uid"])
    stats = [json.loads(p.read_text()) for p in shards.glob("*_stats.json")]
    assert sum(s["count"] for s in stats) == len(sources)


def test_the_stored_side_follows_the_teacher_unless_set(mnist_teacher):
    from stages import STAGES
    from stages.crawl.stage import CRAWL_ONLY_SIDE, stored_side

    crawl = next(s for s in STAGES if s.name == "crawl")
    follows = load_config(None, mnist_teacher)  # teacher.input_size 28, crawl.image_size unset
    assert stored_side(follows) == 28 and crawl.derived(follows) == {"image_size": 28}
    assert load_config(None, mnist_teacher).crawl.resize_mode == "center_crop"
    fixed = load_config(None, [*mnist_teacher, "crawl.image_size=48"])
    assert stored_side(fixed) == 48 and crawl.derived(fixed) is None
    other_teacher = load_config(None, [*mnist_teacher, "teacher.input_size=32"])
    assert crawl.fingerprint(other_teacher) != crawl.fingerprint(follows)  # a new teacher side re-crawls
    assert stored_side(load_config(None, [])) == CRAWL_ONLY_SIDE  # a crawl on its own, no teacher
