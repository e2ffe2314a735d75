import socket
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.demo import build_web

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def small_web(tmp_path_factory):
    """A 300-image demo web with 8% broken URLs (6 of each planted kind), not yet served."""
    root = tmp_path_factory.mktemp("web")
    port = free_port()
    sources = build_web(root / "web", pool_size=300, broken_fraction=0.08,
                        base_url=f"http://127.0.0.1:{port}", seed=1)
    sources[["url"]].to_parquet(root / "urls.parquet", index=False)
    return {"root": root, "port": port, "sources": sources, "urls": root / "urls.parquet"}


def web_config(web, run_dir, *overrides):
    """Config that crawls ``web`` (served on loopback while crawling) into ``run_dir``."""
    return load_config(None, [
        f"run_dir={run_dir}", f"data.url_list={web['urls']}", f"data.serve_folder={web['root'] / 'web'}",
        f"data.serve_port={web['port']}", "crawl.number_sample_per_shard=100", "crawl.thread_count=8",
        *overrides])


@pytest.fixture(scope="session")
def crawled(small_web, tmp_path_factory):
    """``small_web`` crawled once (100 URLs per shard); tests copy it with ``copy_crawl``."""
    from pipeline.runner import run_stages
    from stages import STAGES

    run_dir = tmp_path_factory.mktemp("crawled") / "run"
    run_stages(web_config(small_web, run_dir), STAGES, only=["crawl"])
    return run_dir


def copy_crawl(crawled_run: Path, run_dir: Path) -> Path:
    """A new run directory holding a copy of a finished crawl (records and all)."""
    import shutil

    shutil.copytree(crawled_run / "crawl", run_dir / "crawl")
    return run_dir


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A convnet5 teacher with random weights (grey 28 px, 10 classes) and its spec as --set overrides."""
    import torch

    from pipeline.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "convnet5.pt"
    torch.save(create_model("convnet5", num_classes=10, in_chans=1, width=8).state_dict(), path)
    return {"path": path, "overrides": [
        "teacher.format=webdistill", "teacher.arch=convnet5", "teacher.arch_kwargs={width: 8}",
        f"teacher.checkpoint={path}", "teacher.class_names=[zero, one, two, three, four, five, six, seven, eight, nine]",
        "teacher.input_size=28", "teacher.channels=1", "teacher.mean=[0.13]", "teacher.std=[0.31]"]}
