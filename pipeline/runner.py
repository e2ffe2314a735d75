"""The stage runner: runs stages in order, skips what is done, re-runs what is stale.

A stage is *done* when its completion record matches the current config (fingerprint of the
config sections it reads) and the outputs of its upstream stages (their ``run_id``). Re-running
a stage gives it a new ``run_id``, which makes every later stage stale by itself.
"""

import contextlib
import importlib
import logging
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from manifests import atomic_write_bytes
from pipeline import __version__, devices
from pipeline.config import dump_yaml, fingerprint
from pipeline.errors import UserError
from pipeline.rundir import PARTIAL, RunDir, shown

log = logging.getLogger("webdistill")

_VERSIONED = ("img2dataset", "webdataset", "pyarrow", "pandas", "numpy", "torch", "torchvision",
              "open_clip_torch", "faiss-cpu", "faiss-gpu")


@dataclass(frozen=True)
class StageSpec:
    """What the runner knows of a stage: where its code is and what it depends on."""

    name: str
    summary: str
    upstream: tuple[str, ...]  # stages whose outputs it reads
    # the config sections the stage owns (name → dataclass, declared beside its code): the root
    # config is assembled from them
    sections: dict[str, type] = field(default_factory=dict)
    # config sections whose change makes the stage stale (default: the ones it owns)
    reads_config: tuple[str, ...] | None = None
    # "module" or "module:function" with ``function(cfg, run_dir) -> counts`` (default name: run);
    # None: the stage is not built yet
    module: str | None = None
    # True: under torchrun every rank runs the stage function (it splits the work itself);
    # False: rank 0 runs it alone while the other ranks wait
    distributed: bool = False
    # files outside the run directory the stage reads (a URL list, a checkpoint): a new
    # version of one (size or modification time) makes the stage stale, like a config change
    input_files: Callable[[object], list[str | None]] | None = None
    # settings the code derives from the config (distill: the loss recipe a preset name stands
    # for): a new meaning of the same name makes the stage stale too
    derived: Callable[[object], dict] | None = None
    # "module:function" with ``function(cfg) -> None`` that raises UserError for settings or input
    # files the stage cannot run with: called for every stage a run will execute before the first
    # one starts (it reads only the config and files outside the run directory)
    preflight: str | None = None

    def __post_init__(self):
        if self.reads_config is None:
            object.__setattr__(self, "reads_config", tuple(self.sections))

    def fingerprint(self, cfg) -> str:
        return fingerprint(cfg, self.reads_config, self.input_files(cfg) if self.input_files else (),
                           self.derived(cfg) if self.derived else None)

    def function(self):
        return _resolve(self.module, "run")

    def check(self, cfg) -> None:
        if self.preflight:
            _resolve(self.preflight, "preflight")(cfg)


def _resolve(spec: str, default: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or default)


@dataclass
class StageState:
    name: str
    status: str  # done | stale | missing | not built
    why: str
    record: dict | None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "webdistill": __version__}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def stale_reason(record: dict, fingerprint: str, upstream: dict, reads_config) -> str:
    """Why a completion record is not current ("" when it is): made from another config
    fingerprint, or from other upstream outputs (their run ids) than ``upstream``."""
    if record.get("config_fingerprint") != fingerprint:
        return f"config or input files changed ({', '.join(reads_config)})"
    changed = [u for u, run_id in upstream.items() if record.get("upstream", {}).get(u) != run_id]
    return f"upstream {changed[0]} was re-run" if changed else ""


def record_is_current(record: dict | None, fingerprint: str, upstream: dict) -> bool:
    """The rule of "done", as the runner applies it: the benchmark shares stages between run
    directories by it."""
    return bool(record) and not stale_reason(record, fingerprint, upstream, ())


def _upstream_ids(run: RunDir, spec: StageSpec) -> dict[str, str | None]:
    return {u: (run.record(u) or {}).get("run_id") for u in spec.upstream}


def stage_states(cfg, run: RunDir, specs: list[StageSpec]) -> dict[str, StageState]:
    """Status of every stage, in pipeline order (a stage after a stale one is stale too)."""
    states: dict[str, StageState] = {}
    for spec in specs:
        record = run.record(spec.name)
        if spec.module is None:
            states[spec.name] = StageState(spec.name, "not built", "not built yet", None)
            continue
        if record is None:
            why = "interrupted: a re-run resumes it" if run.has_partial(spec.name) else "not run yet"
            states[spec.name] = StageState(spec.name, "missing", why, None)
            continue
        ups = {u: states.get(u) for u in spec.upstream}
        done_ups = {u: up.record.get("run_id") for u, up in ups.items() if up is not None and up.status == "done"}
        not_done = [f"upstream {u} is {up.status if up else 'unknown'}" for u, up in ups.items() if u not in done_ups]
        why = stale_reason(record, spec.fingerprint(cfg), done_ups, spec.reads_config) or next(iter(not_done), "")
        states[spec.name] = StageState(spec.name, "stale" if why else "done", why, record)
    return states


def _counts_line(record: dict | None) -> str:
    if not record:
        return ""
    counts = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in record.get("counts", {}).items())
    return f"{counts} ({record.get('duration_s', 0):.1f}s)"


def format_status(cfg, run: RunDir, specs: list[StageSpec]) -> str:
    lines = [f"run directory {shown(run.root)}"]
    for state in stage_states(cfg, run, specs).values():
        detail = _counts_line(state.record) if state.status == "done" else state.why
        if state.status == "stale":
            detail = f"{state.why}; last run: {_counts_line(state.record)}"
        if state.record and run.has_partial(state.name):
            detail += f" [an interrupted re-run waits in {state.name}{PARTIAL}/]"
        lines.append(f"  {state.name:<10} {state.status:<10} {detail}")
    return "\n".join(lines)


def _execute(cfg, run: RunDir, spec: StageSpec, force: bool) -> dict | None:
    """Run one stage and write its record. Under torchrun rank 0 alone opens and closes the
    stage folder; the barriers keep the other ranks from reading it in between."""
    started = {"config_fingerprint": spec.fingerprint(cfg), "upstream": _upstream_ids(run, spec)}
    resumed = False
    if devices.is_main():
        _, resumed = run.begin(spec.name, started, resume=not force)
        log.info("▶ %s: %s%s", spec.name, spec.summary, " (resuming interrupted run)" if resumed else "")
    devices.barrier()
    run.building(spec.name)
    t0, started_at = time.time(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    counts = (spec.function()(cfg, run) or {}) if spec.distributed or devices.is_main() else None
    if not devices.is_main():
        devices.barrier()
        return None
    problems = run.output_problems(spec.name)
    if problems:  # no record: the stage stays incomplete, and a re-run redoes it
        raise UserError(f"stage {spec.name} finished without valid outputs, so it is not recorded as done "
                        f"(the last complete output, if any, is kept): {problems[0]}")
    timings, details = counts.pop("timings", {}), counts.pop("details", {})
    record = {
        "stage": spec.name,
        "run_id": uuid.uuid4().hex,
        **started,
        "counts": counts,
        "duration_s": round(time.time() - t0, 3),
        "timings": timings,
        "details": details,
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resumed": resumed,
        "versions": package_versions(),
    }
    run.finish(spec.name, record)
    log.info("✓ %s: done — %s", spec.name, _counts_line(record))
    devices.barrier()
    return record


def run_stages(cfg, specs: list[StageSpec], only: list[str] | None = None, force: bool = False) -> RunDir:
    """Run the pipeline (or only the named stages) in order; skip stages that are done.

    ``force`` re-runs the selected stages from scratch even if they are done; the stages
    after them then become stale and run too when they are selected. Every stage that will run is
    checked (its ``preflight``) before the first one starts, and the run directory is locked
    against a second writer.
    """
    names = [s.name for s in specs]
    for name in only or []:
        if name not in names:
            raise UserError(f"unknown stage {name!r}; stages are {', '.join(names)}")
    run = RunDir(cfg.run_dir)
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"run_dir {run.root} is a file, not a folder: name a folder for the run")
    devices.init_distributed()
    with run.lock() if devices.is_main() else contextlib.nullcontext():
        if devices.is_main():
            run.recover(names)
        selected = [s for s in specs if not only or s.name in only]
        _preflight(cfg, run, specs, selected, force)
        if devices.is_main():
            atomic_write_bytes(run.root / "config.yaml", dump_yaml(cfg).encode())
        devices.barrier()
        for spec in selected:
            if spec.module is None:
                continue
            state = stage_states(cfg, run, specs)[spec.name]
            if state.status == "done" and not force:
                log.info("✓ %s: up to date, skipped — %s (use --force to re-run)", spec.name,
                         _counts_line(state.record))
                continue
            if state.status == "stale":
                log.info("↻ %s: stale (%s)", spec.name, state.why)
            _execute(cfg, run, spec, force)
    not_built = [s.name for s in selected if s.module is None]
    if not_built:
        log.info("· not built yet: %s", ", ".join(not_built))
    return run


def _preflight(cfg, run: RunDir, specs: list[StageSpec], selected: list[StageSpec], force: bool) -> None:
    """Refuse, before anything runs, a run that cannot complete: a stage whose upstream is neither
    done nor part of this run, or a stage whose settings or input files its check rejects."""
    states = stage_states(cfg, run, specs)
    will_run = {s.name for s in selected if s.module and (force or states[s.name].status != "done")}
    for spec in selected:
        if spec.name not in will_run:
            continue
        blocked = [u for u in spec.upstream if states[u].status != "done" and u not in will_run]
        if blocked:
            raise UserError(
                f"stage {spec.name} needs {', '.join(blocked)} to be done first: "
                f"run `webdistill run CONFIG` or `webdistill {blocked[0]} {run.root}`")
        spec.check(cfg)
