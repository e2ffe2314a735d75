"""Every file that crosses a stage boundary, declared once: who writes it, where, what it holds.

A stage writes its own folder ``RUN/<stage>/``; another stage (or the report, the benchmark, the
CLI) reaches into it only through an ``Artifact`` declared here, with ``path``, ``read``,
``write`` and ``rows``. The runner checks a stage's declared outputs (``check``) before it writes
the completion record, so a stage that forgot or half-wrote an output is never taken for done.

Arrays travel with a manifest (``rows_of``): row i of ``score/logits.npy`` belongs to row i of
``score/manifest.parquet``. Readers never join on row positions of their own: ``rows`` takes the
rows of given uids through the manifest's uid column, and a uid it does not hold is an error.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.errors import UserError
from manifests.io import (
    ManifestError,
    atomic_write_bytes,
    atomic_write_json,
    read_array,
    read_manifest,
    write_manifest,
)
from manifests.schemas import CRAWL, PERTURBATION, SCORE, SCORE_FAILURES, SELECTION, SYNTHESIS, ManifestSchema

KINDS = ("manifest", "array", "json", "file", "folder")


@dataclass(frozen=True)
class Artifact:
    stage: str  # the stage that writes it
    path: str  # relative to that stage's folder ("" is the folder itself)
    kind: str  # one of KINDS
    about: str
    schema: ManifestSchema | None = None  # manifest: its parquet schema (keyed by uid)
    rows_of: "Artifact | None" = None  # array: the manifest whose rows (and uids) it is aligned with
    keys: tuple[str, ...] = ()  # json: keys a reader relies on
    optional: bool = False  # written only by some configurations (checked when present)

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        assert (self.kind == "manifest") == (self.schema is not None), self
        assert (self.kind == "array") == (self.rows_of is not None), self

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.path}" if self.path else self.stage

    def location(self, root) -> Path:
        """Where it is in run directory ``root``: a path, or an object whose ``stage_dir(stage)`` says
        where a stage's folder is (a run directory building a stage in a partial folder)."""
        folder = root.stage_dir(self.stage) if hasattr(root, "stage_dir") else Path(root) / self.stage
        return folder / self.path if self.path else folder


def _missing(root: Path, a: Artifact) -> ManifestError:
    return ManifestError(f"{a.location(root)}: {a.about} not found (has the {a.stage} stage run?)")


def read(root: Path, a: Artifact, columns: list[str] | None = None, arrow: bool = False):
    """A manifest as a DataFrame (``arrow``: a pyarrow Table), an array (memory-mapped, checked against
    its manifest's rows), a json object; the path of a file or folder (checked to exist)."""
    path = a.location(root)
    if a.kind == "manifest":
        return read_manifest(path, a.schema, columns, stage=a.stage, arrow=arrow)
    if a.kind == "array":
        return read_array(path, read(root, a.rows_of, ["uid"], arrow=True).num_rows, a.about, stage=a.stage)
    if not path.exists():
        raise _missing(root, a)
    if a.kind == "json":
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: not complete json ({e}); re-run the {a.stage} stage with --force") from e
        lacking = [k for k in a.keys if not isinstance(obj, dict) or k not in obj]
        if lacking:
            raise ManifestError(f"{path}: {a.about} lacks {lacking}; re-run the {a.stage} stage with --force")
        return obj
    return path


def write(root: Path, a: Artifact, data) -> Path:
    """Write an artifact atomically: a DataFrame (manifest, validated), an object (json), bytes
    (file). Arrays are written by the stage as row-aligned .npy files (``concat_arrays``)."""
    path = a.location(root)
    if a.kind == "manifest":
        return write_manifest(data, path, a.schema)
    if a.kind == "json":
        atomic_write_json(path, data)
    elif a.kind == "file":
        atomic_write_bytes(path, data)
    else:
        raise TypeError(f"write() does not write {a.kind} artifacts ({a.name})")
    return path


def rows(root: Path, a: Artifact, uids) -> np.ndarray:
    """The rows of array ``a`` that belong to ``uids``, in that order, in memory (its own dtype)."""
    uid_column = read(root, a.rows_of, ["uid"], arrow=True)["uid"]  # read once: it also gives the row count
    wanted = pa.array(list(uids), uid_column.type)
    position = pc.index_in(wanted, value_set=uid_column)  # Arrow's hash join: no Python object per row
    if position.null_count:
        unknown = wanted.filter(position.is_null())
        raise ManifestError(f"{a.location(root)}: {len(unknown)} uid(s) are not in {a.rows_of.name} (first: "
                            f"{unknown[0]}); re-run the {a.stage} stage and the ones after it with --force")
    array = read_array(a.location(root), len(uid_column), a.about, stage=a.stage)
    return np.asarray(array[position.to_numpy().astype(np.int64)])


def digest(path: Path) -> dict:
    """Size and sha256 of a file: what an inventory records of each shard."""
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _stage_folder(root, a: Artifact) -> Path:
    """The folder of the stage that writes ``a`` (inventory names are relative to it)."""
    return Artifact(a.stage, "", "folder", a.about).location(root)


def write_inventory(root, a: Artifact, names) -> None:
    """Record size and sha256 of the stage's files ``names`` (relative to its folder) in inventory ``a``."""
    folder = _stage_folder(root, a)
    write(root, a, {name: digest(folder / name) for name in sorted(names)})


def verified(root, a: Artifact, names) -> list[Path]:
    """The paths of the files ``names`` of inventory ``a``, each checked to be the very file the
    stage recorded (size, then sha256): a truncated or replaced shard is an error naming it and the
    stage to re-run, never a short epoch."""
    inventory, folder = read(root, a), _stage_folder(root, a)
    paths = []
    for name in names:
        path, recorded = folder / name, inventory.get(name)
        if recorded is None:
            raise ManifestError(f"{path}: not in {a.location(root)} ({a.about}); re-run the {a.stage} stage with --force")
        found = digest(path) if path.is_file() else None
        if found != recorded:
            what = "missing" if found is None else f"{found['bytes']:,} bytes" if found["bytes"] != recorded["bytes"] \
                else "different content (sha256)"
            raise ManifestError(f"{path}: {what}, but the {a.stage} stage wrote {recorded['bytes']:,} bytes with "
                                f"sha256 {recorded['sha256'][:12]}…: the shard was damaged or replaced since; re-run "
                                f"the {a.stage} stage with --force")
        paths.append(path)
    return paths


def check(root: Path, a: Artifact) -> str | None:
    """What is wrong with a written artifact, or None (an absent optional one is fine)."""
    if a.optional and not a.location(root).exists():
        return None
    try:
        read(root, a)
    except UserError as e:
        return str(e)
    return None


# ---------------------------------------------------------------- the declarations, by producing stage

CRAWL_FOLDER = Artifact("crawl", "", "folder", "crawl folder (the `shard` column of the crawl, score and "
                        "selection manifests is relative to it: shards/NNNNN.tar)")
CRAWL_SHARDS = Artifact("crawl", "shards", "folder", "img2dataset's WebDataset shards of the crawl")
CRAWL_MANIFEST = Artifact("crawl", "manifest.parquet", "manifest", "crawl manifest", schema=CRAWL)
CRAWL_SUMMARY = Artifact("crawl", "summary.json", "json", "crawl summary")
CRAWL_INVENTORY = Artifact("crawl", "inventory.json", "json", "size and sha256 of every crawl shard (names as "
                           "in the `shard` column), checked by every stage that opens one")

SCORE_MANIFEST = Artifact("score", "manifest.parquet", "manifest", "score manifest", schema=SCORE)
SCORE_FAILURES_MANIFEST = Artifact("score", "failures.parquet", "manifest", "score failures",
                                   schema=SCORE_FAILURES)
LOGITS = Artifact("score", "logits.npy", "array", "teacher logits", rows_of=SCORE_MANIFEST)
FEATURES = Artifact("score", "features.npy", "array", "teacher features", rows_of=SCORE_MANIFEST)
EMBEDDINGS = Artifact("score", "embeddings.npy", "array", "open_clip embeddings", rows_of=SCORE_MANIFEST,
                      optional=True)
BN_DISTANCE = Artifact("score", "bn_distance.npy", "array", "distance of each image's statistics from every "
                      "BatchNorm layer's running ones (teachers with BatchNorm)", rows_of=SCORE_MANIFEST, optional=True)
TEACHER_INFO = Artifact("score", "teacher.json", "json", "teacher description", keys=("class_names",))
# what the teacher (and embedder) know of the private distribution: the filter's references
CLASSIFIER = Artifact("score", "classifier.npz", "file", "teacher classifier (weight, bias)", optional=True)
FEATURE_PRIOR = Artifact("score", "feature_prior.npz", "file", "BatchNorm feature prior (mean, std)", optional=True)
TEXT_EMBEDDINGS = Artifact("score", "text_embeddings.npz", "file", "class-prompt embeddings", optional=True)
REFERENCE = Artifact("score", "reference.npz", "file", "scored reference set", optional=True)
SCORE_SUMMARY = Artifact("score", "summary.json", "json", "score summary")

SELECTION_MANIFEST = Artifact("filter", "selection.parquet", "manifest", "filter selection", schema=SELECTION)
FILTER_SUMMARY = Artifact("filter", "summary.json", "json", "filter summary", keys=("scored", "kept"))
FILTER_SUMMARY_TEXT = Artifact("filter", "summary.txt", "file", "filter summary (text)")
FILTER_PLOTS = Artifact("filter", "plots", "folder", "filter diagnostics plots")

SYNTHESIS_FOLDER = Artifact("synthesize", "", "folder", "synthesize folder (shards.json names shards relative to it)")
SYNTHESIS_SHARDS = Artifact("synthesize", "shards", "folder", "synthesised shards (empty when synthesize.start is none)")
SYNTHESIS_MANIFEST = Artifact("synthesize", "manifest.parquet", "manifest", "synthesis manifest (lineage of every "
                              "synthesised image)", schema=SYNTHESIS)
SYNTHESIS_LOGITS = Artifact("synthesize", "logits.npy", "array", "teacher logits of the synthesised images",
                            rows_of=SYNTHESIS_MANIFEST)
SYNTHESIS_FEATURES = Artifact("synthesize", "features.npy", "array", "teacher features of the synthesised images",
                              rows_of=SYNTHESIS_MANIFEST)
SYNTHESIS_COUNTS = Artifact("synthesize", "shards.json", "json", "samples per synthesised shard (names relative "
                            "to the synthesize folder; empty when synthesize.start is none)")
SYNTHESIS_INVENTORY = Artifact("synthesize", "inventory.json", "json", "size and sha256 of every synthesised shard, "
                               "checked when distill opens them")
SYNTHESIS_SUMMARY = Artifact("synthesize", "summary.json", "json", "synthesize summary", keys=("start", "images"))

PERTURB_FOLDER = Artifact("perturb", "", "folder", "perturb folder (shards.json names shards relative to it)")
PERTURB_SHARDS = Artifact("perturb", "shards", "folder", "transfer-set shards (kept images + perturbations)")
PERTURB_COUNTS = Artifact("perturb", "shards.json", "json", "samples per transfer-set shard "
                          "(names relative to the perturb folder)")
PERTURB_INVENTORY = Artifact("perturb", "inventory.json", "json", "size and sha256 of every transfer-set shard "
                             "(names as in shards.json), checked when distill opens them")
PERTURBATION_MANIFEST = Artifact("perturb", "manifest.parquet", "manifest", "perturbation manifest",
                                 schema=PERTURBATION, optional=True)
PERTURB_SUMMARY = Artifact("perturb", "summary.json", "json", "perturb summary", keys=("kept", "perturbed"))

STUDENT = Artifact("distill", "student.pt", "file", "trained student")
HISTORY = Artifact("distill", "history.csv", "file", "training history")
DISTILL_SUMMARY = Artifact("distill", "summary.json", "json", "distill summary",
                           keys=("student", "preset", "epochs", "transfer_set"))

METRICS = Artifact("evaluate", "metrics.json", "json", "evaluation metrics",
                   keys=("teacher", "student", "agreement", "images"))
PER_CLASS = Artifact("evaluate", "per_class.csv", "file", "per-class recall")
CONFUSION = Artifact("evaluate", "confusion.png", "file", "confusion matrices")

REPORT_PLOTS = Artifact("report", "plots", "folder", "report plots (the HTML page inlines them)")
REPORT_HTML = Artifact("report", "report.html", "file", "report page")
REPORT_MD = Artifact("report", "report.md", "file", "report markdown")
HEADLINE = Artifact("report", "headline.json", "json", "report headline", keys=("text",))

ARTIFACTS = [v for v in list(globals().values()) if isinstance(v, Artifact)]


def outputs(stage: str) -> list[Artifact]:
    """The declared outputs of a stage (what the runner checks before it records the stage done)."""
    return [a for a in ARTIFACTS if a.stage == stage]
