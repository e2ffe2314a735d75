"""The run directory: one folder per stage, each closed by a completion record.

``RUN/config.yaml`` is the resolved config; ``RUN/<stage>/_SUCCESS.json`` is written last, so its
presence means the folder is complete. A stage runs in ``RUN/<stage>.partial/`` and replaces
``RUN/<stage>/`` only when it has finished: until then the last complete output and its record stay
as they were, whatever goes wrong (bad input, a crash, a kill). ``_STARTED.json`` in the partial
folder says which config and upstream outputs the run was working from: a re-run resumes from the
partial files only if those still match. ``RUN/.lock`` keeps a second writer out.
"""

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from manifests import artifacts, atomic_write_json
from pipeline.errors import UserError

RECORD = "_SUCCESS.json"
STARTED = "_STARTED.json"
PARTIAL = ".partial"  # suffix of the folder a stage is built in
OLD = ".replaced"  # suffix of a finished folder while its successor is moved in

log = logging.getLogger("webdistill")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._building: set[str] = set()  # stages this process is running (they write their .partial folder)

    def stage_dir(self, name: str) -> Path:
        """A stage's own folder: while the stage runs, the partial folder it is built in. Other
        stages' files are reached through their declared artifacts (``path``, ``read``, ``rows``)."""
        return self.partial_dir(name) if name in self._building else self.root / name

    def partial_dir(self, name: str) -> Path:
        return self.root / f"{name}{PARTIAL}"

    # the contracts of manifests.artifacts, on this run directory (a stage's own outputs in the
    # folder it is being built in)
    def path(self, artifact: artifacts.Artifact) -> Path:
        return artifact.location(self)

    def read(self, artifact: artifacts.Artifact, columns: list[str] | None = None, arrow: bool = False):
        return artifacts.read(self, artifact, columns, arrow)

    def write(self, artifact: artifacts.Artifact, data) -> Path:
        return artifacts.write(self, artifact, data)

    def rows(self, artifact: artifacts.Artifact, uids):
        return artifacts.rows(self, artifact, uids)

    def write_inventory(self, artifact: artifacts.Artifact, names) -> None:
        artifacts.write_inventory(self, artifact, names)

    def verified(self, artifact: artifacts.Artifact, names) -> list[Path]:
        return artifacts.verified(self, artifact, names)

    def valid(self, artifact: artifacts.Artifact) -> bool:
        return artifacts.check(self, artifact) is None

    def output_problems(self, name: str) -> list[str]:
        """What is wrong with the declared outputs of stage ``name`` (empty: all there and valid)."""
        return [p for a in artifacts.outputs(name) if (p := artifacts.check(self, a))]

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            # an unreadable record is no record: the stage is simply not complete
            return None

    def record(self, name: str) -> dict | None:
        """The completion record of a stage's finished output, or None if it has none."""
        return self._read(self.root / name / RECORD)

    def begin(self, name: str, started: dict, resume: bool) -> tuple[Path, bool]:
        """Open the partial folder of a stage's run; return it and whether earlier partial work is
        kept (only when ``resume`` and it was started from the same inputs). The finished folder is
        not touched: ``finish`` replaces it. The stage writes there once ``building`` is called."""
        folder = self.partial_dir(name)
        resumed = resume and self._read(folder / STARTED) == started
        if not resumed and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / STARTED, started)
        return folder, resumed

    def building(self, name: str) -> None:
        """From now on the stage's own folder is its partial folder (every torchrun rank calls it)."""
        self._building.add(name)

    def finish(self, name: str, record: dict) -> None:
        """Close the partial folder with the completion record and put it in place of the finished
        one. Killed between the two renames, the run directory is repaired by ``recover``."""
        partial, final, old = self.partial_dir(name), self.root / name, self.root / f".{name}{OLD}"
        atomic_write_json(partial / RECORD, record)
        self._building.discard(name)
        if final.exists() or final.is_symlink():
            _remove(old)
            final.rename(old)
        partial.rename(final)
        _remove(old)

    def recover(self, names: list[str]) -> None:
        """Finish a swap that a kill interrupted: the newer complete folder wins."""
        for name in names:
            partial, final, old = self.partial_dir(name), self.root / name, self.root / f".{name}{OLD}"
            if final.exists() or final.is_symlink():
                _remove(old)
            elif (partial / RECORD).is_file():
                partial.rename(final)
                _remove(old)
            elif old.exists():
                old.rename(final)

    def has_partial(self, name: str) -> bool:
        return (self.partial_dir(name) / STARTED).is_file()

    def lock(self) -> "RunLock":
        return RunLock(self.root / ".lock")


def shown(path: str | Path) -> str:
    """A path as the user would type it: relative to the working directory when it is below it (paths
    in the config are absolute since it loads)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _remove(path: Path) -> None:
    """Remove a folder, or only the link when it is one (the benchmark links stages it shares)."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


class RunLock:
    """One writer per run directory: an advisory lock (``flock``) on ``RUN/.lock``, which holds the
    holder's pid and host. The kernel drops the lock when its holder dies, so a lock file left by a
    dead process is simply taken over (and said so)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder()
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"{self.path.parent} is in use by another webdistill run ({holder}); wait for it to "
                            "finish, or stop it (`webdistill status` works meanwhile)") from None
        previous = self._holder()
        if previous != "no holder recorded":
            log.info("taking over the lock of %s, left by %s (no longer running)", self.path.parent, previous)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            holder = {}
        return f"pid {holder['pid']} on {holder.get('host', '?')}" if "pid" in holder else "no holder recorded"

    def __exit__(self, *exc):
        os.ftruncate(self._fd, 0)  # an empty lock file: released cleanly
        os.close(self._fd)  # closing drops the flock
        self._fd = None
