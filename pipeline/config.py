"""The run configuration: typed sections with documented defaults, loaded from YAML.

Each section is a dataclass; every field carries its help text, so ``webdistill defaults``
prints the full, commented default config. Loading is strict: an unknown or misspelt key is an
error naming the key, the file and the closest valid key, and a value of the wrong type or
outside its choices or its range is an error too. Relative paths are relative to the working
directory and made absolute as the config loads, so a run directory's ``config.yaml`` means the
same files wherever the tool runs from.
"""

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import field
from pathlib import Path

import yaml

from pipeline.errors import UserError

# the ranges a numeric field may declare: name → (test, what the error says the value must be)
RANGES = {
    "> 0": (lambda v: v > 0, "> 0"),
    ">= 0": (lambda v: v >= 0, "≥ 0"),
    ">= 1": (lambda v: v >= 1, "≥ 1"),
    ">= 2": (lambda v: v >= 2, "≥ 2"),
    "(0, 1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "[0, 1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "[0, 1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "port": (lambda v: 0 <= v <= 65535, "in 0–65535"),
    "share or count": (lambda v: 0 < v <= 1 or (v > 1 and float(v).is_integer()),
                       "a share in (0, 1] or a whole count above 1"),
    "[min, max] > 0": (lambda v: len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and 0 < v[0] <= v[1],
                       "[min, max] with 0 < min ≤ max"),
}


def opt(default, help: str, choices: tuple | None = None, valid: str | None = None, path: bool = False):
    """A config field with its documentation, its allowed values (``choices``, or a range of
    ``RANGES``), and ``path``: a file or folder name, made absolute as the config loads."""
    assert valid is None or valid in RANGES, valid
    meta = {"help": help, "choices": choices, "valid": valid, "path": path}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)



def root_config(sections: dict[str, type]) -> type:
    """The root config class: ``run_dir`` and one field per section, in the order given. Each
    stage declares its own sections beside its code; the application lists them once
    (``pipeline.app``), so adding a section touches no file here."""
    fields = [("run_dir", str, opt("runs/demo", "run directory: one folder per stage, completion records, "
                                               "resolved config", path=True))]
    fields += [(name, cls, field(default_factory=cls, metadata={"help": cls.__doc__}))
               for name, cls in sections.items()]
    return dataclasses.make_dataclass("Config", fields)


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(value, hint, where: str, origin: str):
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise UserError(f"{origin}: {where} must not be empty")
    for t in allowed:
        base = typing.get_origin(t) or t
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads YAML 1.1, where 1e-6 (no dot) is a string
        if base is int and isinstance(value, bool):
            continue
        if isinstance(value, base):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise UserError(f"{origin}: {where} must be {names}, got {value!r}")


def _build(cls, values: dict, prefix: str, origin: str):
    if not isinstance(values, dict):
        raise UserError(f"{origin}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise UserError(f"{origin}: unknown key {prefix + str(key)!r}{_closest(str(key), list(fields))}")
    kwargs = {}
    for name, value in values.items():
        hint, where = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, where + ".", origin)
            continue
        value = _check_type(value, hint, where, origin)
        meta = fields[name].metadata
        choices = meta.get("choices")
        if choices and value not in choices:
            raise UserError(f"{origin}: {where} = {value!r} is not one of {list(choices)}"
                            f"{_closest(str(value), [str(c) for c in choices])}")
        if meta.get("valid") and value is not None and not RANGES[meta["valid"]][0](value):
            raise UserError(f"{origin}: {where} = {value!r} must be {RANGES[meta['valid']][1]}")
        kwargs[name] = value
    for name, f in fields.items():  # defaults too: a default path means the same file from anywhere
        if dataclasses.is_dataclass(hints[name]) and name not in kwargs:
            kwargs[name] = _build(hints[name], {}, prefix + name + ".", origin)
        if f.metadata.get("path"):
            kwargs[name] = _absolute(kwargs[name] if name in kwargs else _default(f))
    return cls(**kwargs)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# values of path fields that name no file (the benchmark's random embedder weights)
_NOT_PATHS = ("random",)


def _absolute(value):
    """A path made absolute against the working directory (not resolved: a symlink stays one)."""
    if isinstance(value, str) and value and value not in _NOT_PATHS:
        return os.path.abspath(os.path.expanduser(value))
    return value


def _apply_override(raw: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to a raw config mapping."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. crawl.processes_count=4")
    key, value = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = raw
    for depth, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {assignment!r}: {'.'.join(parents[:depth + 1])} is a value, not a section")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise UserError(f"--set {assignment!r}: the value is not valid YAML ({e.problem})") from e


def _read_yaml(path: Path, what: str):
    """The YAML document of ``path``; a file that is not UTF-8 YAML is a user error naming it."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{what}: not UTF-8 text (byte {e.start}): is it a YAML file?") from e
    except yaml.YAMLError as e:
        raise UserError(f"{what}: not valid YAML: {e}") from e
    except OSError as e:
        raise UserError(f"{what}: cannot be read ({e.strerror})") from e


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (), root: type | None = None):
    """Load a YAML config (defaults for what it leaves out) with ``KEY=VALUE`` overrides, as an
    instance of ``root`` (default: the application's, ``pipeline.app.Config``)."""
    if root is None:
        from pipeline.app import Config as root
    raw, origin = {}, "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found (the demo's is configs/demo.yaml)")
        raw = _read_yaml(path, str(path))
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections (crawl:, distill:, …), "
                            f"got a {type(raw).__name__}")
    for assignment in overrides:
        _apply_override(raw, assignment)
    if isinstance(raw.get("teacher"), dict) and isinstance(raw["teacher"].get("spec_file"), str):
        raw["teacher"] = _with_spec_file(raw["teacher"], origin)
    return _build(root, raw, "", origin)


_SPEC_PATHS = ("checkpoint", "class_names")  # keys of a teacher spec file that hold a path when a string


def _with_spec_file(teacher: dict, origin: str) -> dict:
    """The teacher section with the keys of its spec file underneath (the section's own keys win).

    A spec file that does not exist yet (the demo's, before `make teacher`) is left for the teacher
    loader to report, so that the config still loads for stages that do not need the teacher.
    """
    path = Path(teacher["spec_file"])
    if not path.is_file():
        return teacher
    spec = _read_yaml(path, f"{path} (teacher.spec_file of {origin})") or {}
    if not isinstance(spec, dict):
        raise UserError(f"{path} (teacher.spec_file of {origin}): must be a mapping of teacher keys")
    for key in _SPEC_PATHS:
        value = spec.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            spec[key] = str(path.parent / value)
    return {**spec, **teacher}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def fingerprint(cfg, sections: typing.Iterable[str], files: typing.Iterable[str | None] = (),
                derived: dict | None = None) -> str:
    """Hash of the named config sections, of the size and modification time of ``files`` and of
    ``derived`` settings: a stage is stale when the config it reads, what the code makes of it,
    or one of its input files changes."""
    d = to_dict(cfg)
    stamps = {}
    for f in files:
        if f and Path(f).is_file():
            st = Path(f).stat()
            stamps[str(f)] = [st.st_size, st.st_mtime_ns]
    blob = json.dumps({**{s: d[s] for s in sections}, "_files": stamps, **({"_derived": derived} if derived else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def commented_defaults(cls=None, indent: str = "") -> str:
    """The default config as YAML, each key preceded by its help text."""
    if cls is None:
        from pipeline.app import Config as cls
    lines = []
    for f in dataclasses.fields(cls):
        help_text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
        if choices:
            help_text += f" (one of: {', '.join(map(str, choices))})"
        if f.metadata.get("valid"):
            help_text += f" (must be {RANGES[f.metadata['valid']][1]})"
        lines.extend(f"{indent}# {line.strip()}" for line in help_text.splitlines() if line.strip())
        default = _default(f)
        if dataclasses.is_dataclass(default):
            lines.append(f"{indent}{f.name}:")
            lines.append(commented_defaults(type(default), indent + "  "))
        else:
            lines.append(f"{indent}{f.name}: {json.dumps(default)}")
    return "\n".join(lines)
