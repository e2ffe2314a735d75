"""The architecture's rules, checked on the source: stages meet only through the artifacts declared
in manifests/, manifests/ depends on nothing of ours, pipeline/ loads no ML library."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from manifests import artifacts
from manifests.artifacts import ARTIFACTS, Artifact
from manifests.errors import UserError
from manifests.schemas import SCORE
from pipeline.app import STAGE_NAMES
from tests.conftest import REPO


def stage_sources(stage: str) -> list[Path]:
    return sorted((REPO / "stages" / stage).rglob("*.py"))


def boundary_violations(source: str, stage: str) -> list[str]:
    """Where code of ``stage`` opens another stage's folder other than through a declared artifact:
    ``stage_dir`` of another stage, the run directory's root, or the file name of another stage's
    declared artifact (joined onto a path) that is not also one of its own."""
    own = {a.path for a in ARTIFACTS if a.stage == stage}
    foreign = {a.path for a in ARTIFACTS if a.stage != stage and a.path} - own
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "stage_dir":
            arg = node.args[0] if node.args else None
            if not (isinstance(arg, ast.Constant) and arg.value == stage):
                found.append(f"line {node.lineno}: stage_dir({ast.unparse(arg) if arg else ''})")
        elif isinstance(node, ast.Attribute) and node.attr == "root":
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and node.right.value in foreign:  # folder / "logits.npy"
            found.append(f"line {node.lineno}: {node.right.value!r} names another stage's file")
    return found


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_a_stage_reaches_other_stages_only_through_declared_artifacts(stage):
    for path in stage_sources(stage):
        assert boundary_violations(path.read_text(), stage) == [], path


def test_the_boundary_check_catches_a_stray_stage_dir():
    stray = 'def run(cfg, run_dir):\n    return run_dir.stage_dir("score") / "logits.npy"\n'
    assert len(boundary_violations(stray, "filter")) == 2  # the folder and the file name
    assert boundary_violations('run_dir.stage_dir("filter")', "filter") == []
    assert boundary_violations("run_dir.root / 'x'", "report") != []


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_manifests_import_nothing_of_pipeline_or_stages():
    for path in (REPO / "manifests").glob("*.py"):
        assert not _imports(path) & {"pipeline", "stages", "demo", "bench"}, path


def test_pipeline_imports_no_ml_library():
    ml = {"torch", "torchvision", "timm", "open_clip", "faiss", "webdataset", "img2dataset", "sklearn"}
    for path in (REPO / "pipeline").glob("*.py"):  # devices.py imports torch inside its functions
        assert not _imports(path, top_level_only=True) & ml, path
    code = ("import sys, pipeline.cli, pipeline.runner, pipeline.app; "
            "print(sorted(m for m in ('torch', 'faiss', 'webdataset', 'img2dataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stderr


def test_every_artifact_belongs_to_a_stage_and_is_declared_once():
    assert {a.stage for a in ARTIFACTS} <= set(STAGE_NAMES)
    assert len({a.name for a in ARTIFACTS}) == len(ARTIFACTS)
    assert all(a.rows_of in ARTIFACTS for a in ARTIFACTS if a.kind == "array")


def _score_run(tmp_path, uids, rows=None):
    df = pd.DataFrame({"uid": uids, "shard": "shards/00000.tar", "key": uids, "pseudo_label": 0,
                       "pseudo_class": "a", "confidence": 1.0, "entropy": 0.0, "margin": 1.0,
                       "topk_labels": [[0]] * len(uids), "topk_probs": [[1.0]] * len(uids)})
    artifacts.write(tmp_path, artifacts.SCORE_MANIFEST, df)
    logits = np.arange(len(uids) if rows is None else rows, dtype=np.float32)[:, None] * [1, -1]
    np.save(artifacts.LOGITS.location(tmp_path), logits)


def test_rows_are_joined_on_uid_not_position(tmp_path):
    _score_run(tmp_path, ["a", "b", "c", "d"])
    assert artifacts.rows(tmp_path, artifacts.LOGITS, ["c", "a"]).tolist() == [[2, -2], [0, 0]]
    with pytest.raises(UserError, match="1 uid.*not in score/manifest.parquet.*first: zz"):
        artifacts.rows(tmp_path, artifacts.LOGITS, ["a", "zz"])


def test_an_array_that_does_not_match_its_manifest_is_refused(tmp_path):
    _score_run(tmp_path, ["a", "b", "c"], rows=2)
    with pytest.raises(UserError, match="2 rows, but its manifest has 3"):
        artifacts.rows(tmp_path, artifacts.LOGITS, ["a"])
    assert "2 rows" in artifacts.check(tmp_path, artifacts.LOGITS)
    assert artifacts.check(tmp_path, artifacts.SCORE_MANIFEST) is None
    assert artifacts.check(tmp_path, artifacts.EMBEDDINGS) is None  # optional and absent: fine
    assert "not found" in artifacts.check(tmp_path, artifacts.FEATURES)


def test_json_artifacts_must_hold_their_declared_keys(tmp_path):
    artifacts.write(tmp_path, artifacts.TEACHER_INFO, {"num_classes": 1})
    with pytest.raises(UserError, match=r"teacher description lacks \['class_names'\]"):
        artifacts.read(tmp_path, artifacts.TEACHER_INFO)
    broken = Artifact("score", "teacher.json", "json", "teacher description")
    broken.location(tmp_path).write_text('{"class_na')
    assert "not complete json" in artifacts.check(tmp_path, broken)


def test_score_manifest_schema_is_the_declared_one():
    assert artifacts.SCORE_MANIFEST.schema is SCORE


def test_the_makefile_lists_the_registered_stages_in_order():
    # `make <stage>` targets come from this one Makefile line (make cannot import the registry before set-up)
    line = next(x for x in (REPO / "Makefile").read_text().splitlines() if x.startswith("STAGES :="))
    assert line.split(":=")[1].split() == list(STAGE_NAMES)
