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
