"""The run directory: one folder per stage, each closed by a completion record.

``RUN/config.yaml`` is the resolved config; ``RUN/<stage>/_SUCCESS.json`` is written last and
atomically when a stage finishes, so its presence means the folder is complete.
``RUN/<stage>/_STARTED.json`` says which config and upstream outputs a run in progress was
working from: a re-run resumes from the files already there only if those still match.
"""

import json
import shutil
from pathlib import Path

from manifests import artifacts, atomic_write_json

RECORD = "_SUCCESS.json"
STARTED = "_STARTED.json"


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage_dir(self, name: str) -> Path:
        """A stage's own folder. Other stages' files are reached through their declared artifacts
        (``path``, ``read``, ``rows``), never through this."""
        return self.root / name

    # the contracts of manifests.artifacts, on this run directory
    def path(self, artifact: artifacts.Artifact) -> Path:
        return artifact.location(self.root)

    def read(self, artifact: artifacts.Artifact, columns: list[str] | None = None):
        return artifacts.read(self.root, artifact, columns)

    def write(self, artifact: artifacts.Artifact, data) -> Path:
        return artifacts.write(self.root, artifact, data)

    def rows(self, artifact: artifacts.Artifact, uids):
        return artifacts.rows(self.root, artifact, uids)

    def valid(self, artifact: artifacts.Artifact) -> bool:
        return artifacts.check(self.root, artifact) is None

    def output_problems(self, name: str) -> list[str]:
        """What is wrong with the declared outputs of stage ``name`` (empty: all there and valid)."""
        return [p for a in artifacts.outputs(name) if (p := artifacts.check(self.root, a))]

    def _read(self, name: str, file: str) -> dict | None:
        path = self.stage_dir(name) / file
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            # an unreadable record is no record: the stage is simply not complete
            return None

    def record(self, name: str) -> dict | None:
        """The completion record of a stage, or None if it has not completed."""
        return self._read(name, RECORD)

    def write_record(self, name: str, record: dict) -> None:
        atomic_write_json(self.stage_dir(name) / RECORD, record)

    def begin(self, name: str, started: dict, resume: bool) -> tuple[Path, bool]:
        """Open a stage's folder for a run; return it and whether earlier partial work is kept.

        The completion record goes first, so a run killed from here on never looks complete.
        Partial work is kept only when ``resume`` and it was started from the same inputs.
        """
        folder = self.stage_dir(name)
        (folder / RECORD).unlink(missing_ok=True)
        resumed = resume and self._read(name, STARTED) == started
        if not resumed and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / STARTED, started)
        return folder, resumed

    def has_partial(self, name: str) -> bool:
        return (self.stage_dir(name) / STARTED).exists() and self.record(name) is None
