"""Read, write and validate manifests; atomic file writes.

Every write goes to a temporary file in the same folder and is renamed into place, so a reader
never sees half a file: a stage killed while writing leaves either the old file or none.
"""

import itertools
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.errors import UserError
from manifests.schemas import ManifestSchema

_META_KEY = b"webdistill.manifest"
_ARROW_STRINGS = {pa.string(): pd.StringDtype("pyarrow"), pa.large_string(): pd.StringDtype("pyarrow")}


class ManifestError(UserError):
    """A manifest file that is missing, truncated, or does not follow its schema."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600: a written file gets the mode a plain open() would give it
_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def concat_arrays(path: Path, parts: Iterable[np.ndarray], rows: int | None = None) -> None:
    """Row-wise concatenation of ``parts`` into one ``.npy`` file, streamed through a memory map
    (the whole array is never in memory) and renamed into place when complete. With ``rows`` given,
    ``parts`` may be a generator that loads each part as it is needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rows is None:
        parts = list(parts)
        rows = sum(len(p) for p in parts)
    parts = iter(parts)
    first = next(parts)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=first.dtype, shape=(rows, *first.shape[1:]))
        start = 0
        for part in itertools.chain([first], parts):
            out[start:start + len(part)] = part
            start += len(part)
        if start != rows:
            raise ValueError(f"{path}: {start} rows written, {rows} expected")
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def expand_shards(pattern: str | None, what: str, must_exist: bool = True) -> list[Path]:
    """The files named by a brace pattern (``ref-{000..003}.tar``, as WebDataset writes them) or a
    glob, sorted; none at all is an error naming the setting ``what`` unless ``must_exist`` is off."""
    import glob

    import braceexpand

    if not pattern:
        return []
    paths = sorted({Path(p) for part in braceexpand.braceexpand(pattern) for p in glob.glob(part)})
    if not paths and must_exist:
        raise UserError(f"{what} {pattern!r} matches no file")
    return paths


def _writer(stage: str | None) -> str:
    return f"the {stage} stage" if stage else "the stage that writes it"


def _rerun(stage: str | None) -> str:
    return f"re-run {_writer(stage)} with --force"


def read_array(path: Path, rows: int, what: str, mmap: bool = True, stage: str | None = None) -> np.ndarray:
    """A row-aligned array, checked to have one row per manifest row (``stage``: the one that writes it,
    named in the error messages)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: {what} array not found (has {_writer(stage)} run?)")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ManifestError(f"{path}: not a complete .npy file ({e}); {_rerun(stage)}") from e
    if len(array) != rows:
        raise ManifestError(f"{path}: {len(array)} rows, but its manifest has {rows}: {_rerun(stage)}")
    return array


def _to_table(df: pd.DataFrame | pa.Table, spec: ManifestSchema, where: str) -> pa.Table:
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    missing = [n for n in spec.schema.names if n not in table.column_names]
    if missing:
        raise ManifestError(f"{where}: {spec.name} manifest lacks column(s) {missing}")
    table = table.select(spec.schema.names)
    for name in spec.required:
        if table[name].null_count:
            raise ManifestError(f"{where}: column {name!r} of the {spec.name} manifest has empty values")
    try:
        table = table.cast(spec.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        raise ManifestError(f"{where}: {spec.name} manifest has a column of the wrong type: {e}") from e
    counts = pc.value_counts(table[spec.key])  # in Arrow: no Python object per row
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        dup = repeated[0]["values"].as_py()
        raise ManifestError(f"{where}: {spec.key} {dup!r} appears more than once in the {spec.name} manifest")
    return table


def write_manifest(df: pd.DataFrame | pa.Table, path: Path, spec: ManifestSchema) -> Path:
    """Validate ``df`` against ``spec`` and write it as parquet, atomically."""
    path = Path(path)
    table = _to_table(df, spec, str(path))
    buffer = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(_metadata(table.schema, spec)), buffer)
    atomic_write_bytes(path, buffer.getvalue().to_pybytes())
    return path


def _metadata(schema: pa.Schema, spec: ManifestSchema) -> dict:
    return dict(schema.metadata or {}) | {_META_KEY: json.dumps({"name": spec.name, "version": spec.version}).encode()}


class ManifestWriter:
    """A manifest written part by part, each part validated as ``write_manifest`` validates a whole
    one, so memory holds one part; the file takes its name only when the writer closes without error.
    Keys are checked unique within a part: a caller whose parts could share keys checks across them."""

    def __init__(self, path: Path, spec: ManifestSchema):
        self.path, self.spec = Path(path), spec
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(self.tmp, spec.schema.with_metadata(_metadata(spec.schema, spec)))

    def write(self, df: pd.DataFrame | pa.Table) -> None:
        table = _to_table(df, self.spec, str(self.path))
        self.writer.write_table(table.replace_schema_metadata(None))

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, error_type, *_) -> None:
        self.writer.close()
        if error_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)


def read_manifest(path: Path, spec: ManifestSchema, columns: list[str] | None = None,
                  stage: str | None = None, arrow: bool = False) -> pd.DataFrame | pa.Table:
    """Read a manifest, checking it is complete parquet of the expected kind and schema (``stage``: the
    one that writes it, named in the error messages). ``arrow``: as a pyarrow Table, whose string
    columns take a few dozen bytes a row instead of a Python object each (pools of millions)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: {spec.name} manifest not found (has {_writer(stage)} run?)")
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(
            f"{path}: not a complete parquet file ({e}); {_rerun(stage)}"
        ) from e
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ManifestError(f"{path}: not a webdistill manifest (no schema metadata)")
    meta = json.loads(raw)
    if meta.get("name") != spec.name:
        raise ManifestError(f"{path}: is a {meta.get('name')} manifest, expected a {spec.name} manifest")
    if meta.get("version") != spec.version:
        raise ManifestError(
            f"{path}: {spec.name} manifest version {meta.get('version')}, this webdistill reads "
            f"version {spec.version}; {_rerun(stage)}"
        )
    if columns is None:
        _to_table(table, spec, str(path))
    # strings stay in Arrow's buffers (pandas' string[pyarrow]): a few dozen bytes a row, where an object
    # column holds a Python str per row (about 140 bytes each: 285 MB for uid and key at 1M rows)
    return table if arrow else table.to_pandas(types_mapper=_ARROW_STRINGS.get)
