"""The run configuration: typed sections with documented defaults, loaded from YAML.

Each section is a dataclass; every field carries its help text, so ``webdistill defaults``
prints the full, commented default config. Loading is strict: an unknown or misspelt key is an
error naming the key, the file and the closest valid key, and a value of the wrong type or
outside its choices is an error too. Relative paths are relative to the working directory.
"""

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import UserError


def opt(default, help: str, choices: tuple | None = None):
    """A config field with its documentation (and allowed values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where the web images come from."""

    source: str = opt("urls", "'urls': crawl a URL list with img2dataset; 'folder': images already on disk",
                      choices=("urls", "folder"))
    url_list: str | None = opt("demo_data/web_urls.parquet",
                               "URL list (parquet, csv, tsv, txt, json, jsonl; as img2dataset reads) for source: urls")
    input_format: str | None = opt(None, "format of url_list; null: guessed from its extension")
    url_col: str = opt("url", "column of url_list that holds the URLs")
    caption_col: str | None = opt(None, "column of url_list kept as caption (e.g. alt text or a weak label)")
    folder: str | None = opt(None, "folder of images (searched recursively) for source: folder")
    serve_folder: str | None = opt(
        None, "serve this local folder on http://127.0.0.1:serve_port while crawling (the demo web, tests)")
    serve_port: int = opt(8765, "port of the loopback server for serve_folder")


@dataclass
class CrawlConfig:
    """img2dataset settings of the crawl stage (names as in img2dataset.download)."""

    image_size: int = opt(64, "side of the stored images, in pixels")
    resize_mode: str = opt("border", "how images are fitted to image_size",
                           choices=("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"))
    processes_count: int = opt(2, "download processes (use the number of cores)")
    thread_count: int = opt(32, "download threads per process")
    number_sample_per_shard: int = opt(1000, "URLs per WebDataset shard (the unit of resume)")
    timeout: int = opt(10, "seconds before a download gives up")
    retries: int = opt(0, "extra attempts for a failed download")
    encode_format: str = opt("jpg", "format images are re-encoded to", choices=("jpg", "png", "webp"))
    encode_quality: int = opt(95, "JPEG/WebP quality, or PNG compression")
    min_image_size: int = opt(0, "drop images whose smaller side is below this")
    distributor: str = opt(
        "multiprocessing",
        "'multiprocessing' (one machine); 'pyspark' or 'ray' to spread shards over a cluster "
        "(start the Spark session or Ray cluster first, as img2dataset documents)",
        choices=("multiprocessing", "pyspark", "ray"))
    img2dataset_args: dict = opt({}, "any other img2dataset.download() argument, passed through as is")


@dataclass
class DemoConfig:
    """The embedded demo: private MNIST split and a synthetic web pool (``webdistill demo-data``)."""

    dir: str = opt("demo_data", "where the demo data is built")
    pool_size: int = opt(10000, "images in the web pool (broken entries come on top)")
    broken_fraction: float = opt(0.02, "share of broken entries in the URL list (404, truncated, non-image, refused)")
    seed: int = opt(0, "seed of the demo data")


@dataclass
class Config:
    run_dir: str = opt("runs/demo", "run directory: one folder per stage, completion records, resolved config")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": DataConfig.__doc__})
    crawl: CrawlConfig = field(default_factory=CrawlConfig, metadata={"help": CrawlConfig.__doc__})
    demo: DemoConfig = field(default_factory=DemoConfig, metadata={"help": DemoConfig.__doc__})


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


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
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{origin}: {where} = {value!r} is not one of {list(choices)}{_closest(str(value), list(choices))}")
        kwargs[name] = value
    return cls(**kwargs)


def _apply_override(raw: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to a raw config mapping."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. crawl.processes_count=4")
    key, value = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config (defaults for what it leaves out) with ``KEY=VALUE`` overrides."""
    raw, origin = {}, "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found (the demo's is configs/demo.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {e}") from e
    for assignment in overrides:
        _apply_override(raw, assignment)
    return _build(Config, raw, "", origin)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def fingerprint(cfg: Config, sections: typing.Iterable[str]) -> str:
    """Hash of the named config sections: a stage is stale when the sections it reads change."""
    d = to_dict(cfg)
    blob = json.dumps({s: d[s] for s in sections}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def commented_defaults(cls=Config, indent: str = "") -> str:
    """The default config as YAML, each key preceded by its help text."""
    lines = []
    for f in dataclasses.fields(cls):
        help_text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
        if choices:
            help_text += f" (one of: {', '.join(choices)})"
        lines.append(f"{indent}# {help_text}")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            lines.append(f"{indent}{f.name}:")
            lines.append(commented_defaults(type(default), indent + "  "))
        else:
            lines.append(f"{indent}{f.name}: {json.dumps(default)}")
    return "\n".join(lines)
