import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from demo.world import build_private, build_web
from pipeline.config import load_config
from pipeline.runner import run_stages
from stages import STAGES

REPO = Path(__file__).resolve().parents[1]


class Planted:
    """What a hostile checkpoint would pickle: unpickling it runs code (here: creates ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outside_make() -> dict:
    """This environment without make's own variables: a make the tests start (under `make test`) prints
    and behaves as one started from a shell, not as a sub-make ("make[1]: Entering directory …")."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}


def torchrun_two_nodes(stage: str, config_file: Path, logs: Path, env=None, timeout=600) -> tuple[list[int], str]:
    """``webdistill <stage>`` under torchrun as two machines would run it, on loopback: ``--nnodes 2
    --nproc_per_node 1``, node ranks 0 and 1, one rendezvous (the run directory is shared, as a network
    filesystem would be). Returns both launchers' exit codes and the end of their output (in full in
    ``logs``/node<k>.log)."""
    port = free_port()
    procs = []
    for node in (0, 1):
        with open(logs / f"node{node}.log", "w") as log:  # files, not pipes: a full pipe would stall a rank
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                 "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                 "-m", "pipeline", stage, str(config_file)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=timeout) for p in procs]
    return codes, "".join((logs / f"node{node}.log").read_text()[-3000:] for node in (0, 1))


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
        "crawl.image_size=64",  # set: the crawled fixture is shared by configs with and without a teacher
        "synthesize.start=none",  # the default (auto) refines every kept image: tests that synthesise say so
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

    from stages.common.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "convnet5.pt"
    torch.save(create_model("convnet5", num_classes=10, in_chans=1, width=8).state_dict(), path)
    return {"path": path, "overrides": [
        "teacher.format=webdistill", "teacher.arch=convnet5", "teacher.arch_kwargs={width: 8}",
        f"teacher.checkpoint={path}", "teacher.class_names=[zero, one, two, three, four, five, six, seven, eight, nine]",
        "teacher.input_size=28", "teacher.channels=1", "teacher.mean=[0.13]", "teacher.std=[0.31]"]}



# ---------------------------------------------------------------- perturb → distill → evaluate → report
# A teacher trained on the demo's private MNIST split and the small web crawled, scored, filtered
# and perturbed once per session; tests copy the run directory with ``fresh``.

FAST = ["distill.epochs=3", "distill.batch_size=32", "distill.num_workers=0", "score.num_workers=0",
        "filter.policy=threshold", "filter.min_similarity=null", "filter.propensity=class_frequency"]


@pytest.fixture(scope="session")
def private(tmp_path_factory):
    folder = tmp_path_factory.mktemp("private")
    build_private(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def mnist_teacher(private, tmp_path_factory):
    """convnet5 (width 8) trained for 2 epochs on the private train split: ~90% top-1."""
    from demo.teacher import MNIST_MEAN, MNIST_STD, private_split
    from stages.common.models import create_model

    images, labels = private_split(private, "train")
    x = (torch.tensor(np.stack([np.asarray(im) for im in images]), dtype=torch.float32).div(255).unsqueeze(1)
         - MNIST_MEAN) / MNIST_STD
    torch.manual_seed(0)
    model = create_model("convnet5", num_classes=10, in_chans=1, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    y = torch.tensor(labels)
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("mnist_teacher") / "teacher.pt"
    torch.save(model.eval().state_dict(), path)
    return ["teacher.format=webdistill", "teacher.arch=convnet5", "teacher.arch_kwargs={width: 8}",
            f"teacher.checkpoint={path}", "teacher.class_names=[zero, one, two, three, four, five, six, seven, "
            "eight, nine]", "teacher.input_size=28", "teacher.channels=1", f"teacher.mean=[{MNIST_MEAN}]",
            f"teacher.std=[{MNIST_STD}]"]


def config(small_web, run_dir, teacher, private, *overrides):
    return web_config(small_web, run_dir, *teacher, *FAST, f"evaluate.test_set={private}/test-*.tar", *overrides)


@pytest.fixture(scope="session")
def upstream(small_web, crawled, mnist_teacher, private, tmp_path_factory):
    """A run directory with crawl, score, filter, synthesize (off) and perturb done (copied by each test)."""
    run_dir = copy_crawl(crawled, tmp_path_factory.mktemp("upstream") / "run")
    run_stages(config(small_web, run_dir, mnist_teacher, private), STAGES, only=UPSTREAM[1:])
    return run_dir


UPSTREAM = ("crawl", "score", "filter", "synthesize", "perturb")  # the stages before distill


def fresh(upstream: Path, dest: Path) -> Path:
    for stage in UPSTREAM:
        shutil.copytree(upstream / stage, dest / stage)
    return dest


def kill_stage_when(stage: str, config_file: Path, appears: Path, limit_s: float = 300) -> None:
    """Run ``webdistill <stage> <config_file>`` in a subprocess and SIGKILL it as soon as ``appears``
    exists (a safety limit of ``limit_s`` seconds, far above the slowest run seen): a kill part-way."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "pipeline", stage, str(config_file)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + limit_s
    while not appears.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"{stage} ended before {appears} appeared"


def student_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "distill" / "student.pt", weights_only=False)["state_dict"]
