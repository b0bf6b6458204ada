"""Fingerprinted, resumable pipeline stages: a rerun redoes exactly what its settings changed.

A multi-stage job (the demo today, evaluation sweeps later) must never report results made
under other settings, and must not redo an hour of work because a flag for the last stage
changed. Each `Stage` names the settings its output depends on and the earlier stages it
reads; its fingerprint hashes both, so a changed setting changes the fingerprint of that
stage and of every stage downstream of it, and nothing else.

On disk, under the runner's folder, each stage has:

- `<name>.json`, written atomically when the stage finishes: its fingerprint, settings,
  input fingerprints, result and run time. A stage whose file carries the current
  fingerprint is skipped and its recorded result is used.
- `<name>.started.json` while it runs: the fingerprint it was started with. A stage killed
  half-way and started again with the same fingerprint keeps its partial outputs, so it can
  resume (every stage's own work resumes: demo generation per episode, shard conversion per
  shard, training from `last.ckpt`, the bank per chunk). Started with another fingerprint,
  or with no record of how its outputs were made, the stage's outputs are discarded first.

The order of those steps matters for crash safety: the finished record is removed before
outputs are discarded, and the started record is written only after they are gone, so
that no interruption can leave a finished record or a started one beside outputs made
under other settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agnostos.atomic import atomic_write_json

__all__ = ["Stage", "StageRecord", "StageRunner", "settings_changes"]

STAGE_FORMAT = 1
STARTED_SUFFIX = ".started.json"


@dataclass(frozen=True)
class StageRecord:
    """What a finished stage recorded: the truth about how its outputs were made."""

    name: str
    fingerprint: str
    settings: dict[str, Any]
    inputs: dict[str, str]
    result: dict[str, Any]
    seconds: float
    ran: bool = True  # False when this run re-used the record of an earlier one

    def as_json(self) -> dict[str, Any]:
        return {
            "format": STAGE_FORMAT,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "inputs": self.inputs,
            "result": self.result,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageRecord:
        return cls(
            name=data["name"],
            fingerprint=data["fingerprint"],
            settings=dict(data["settings"]),
            inputs=dict(data["inputs"]),
            result=dict(data["result"]),
            seconds=float(data["seconds"]),
            ran=False,
        )


@dataclass(frozen=True)
class Stage:
    """One step of a job.

    Args:
        name: the stage's name (also its record's file name).
        settings: JSON-compatible values the stage's output depends on (not settings that
            only change how it runs, such as worker counts or progress bars).
        inputs: names of earlier stages whose outputs it reads.
        outputs: files or folders it writes; discarded when its fingerprint changes.
        run: does the work, given the records of all stages run so far; returns the
            JSON-compatible result to record (paths, counts, what was really used).
    """

    name: str
    settings: Mapping[str, Any]
    inputs: tuple[str, ...]
    outputs: tuple[Path, ...]
    run: Callable[[Mapping[str, StageRecord]], dict[str, Any]]


def _canonical(value: Any) -> Any:
    """Settings as plain JSON (tuples become lists), so fingerprints are stable."""
    return json.loads(json.dumps(value, sort_keys=True))


def fingerprint(name: str, settings: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    payload = {"format": STAGE_FORMAT, "stage": name, "settings": settings, "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def settings_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """`key before -> after` for every setting that differs, for the log."""
    keys = sorted(set(before) | set(after))
    return [
        f"{key} {before.get(key, '(unset)')!r} -> {after.get(key, '(unset)')!r}"
        for key in keys
        if before.get(key) != after.get(key)
    ]


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class StageRunner:
    """Runs stages in order, skipping those whose recorded fingerprint is current."""

    def __init__(self, folder: Path, log: Callable[[str], None] = print) -> None:
        self.folder = Path(folder)
        self.log = log
        self.records: dict[str, StageRecord] = {}

    def _done_path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def _started_path(self, name: str) -> Path:
        return self.folder / f"{name}{STARTED_SUFFIX}"

    def _read(self, path: Path) -> dict[str, Any] | None:
        """A record file, or None when it is absent, unreadable or from another format."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != STAGE_FORMAT:
            return None
        return data

    def run(self, stage: Stage) -> StageRecord:
        missing = [name for name in stage.inputs if name not in self.records]
        if missing:
            raise ValueError(f"stage {stage.name}: runs after {missing}, which have not run")
        settings = _canonical(dict(stage.settings))
        inputs = {name: self.records[name].fingerprint for name in stage.inputs}
        current = fingerprint(stage.name, settings, inputs)
        done = self._read(self._done_path(stage.name))
        if done is not None and done.get("fingerprint") == current:
            self.log(f"stage {stage.name}: already done ({self._done_path(stage.name)})")
            record = StageRecord.from_json(done)
        else:
            if done is not None:
                changed = settings_changes(done.get("settings", {}), settings)
                changed += [
                    f"input {name} changed"
                    for name, value in inputs.items()
                    if done.get("inputs", {}).get(name) != value
                ]
                self.log(f"stage {stage.name}: re-running ({'; '.join(changed) or 'changed'})")
            record = self._execute(stage, settings, inputs, current)
        self.records[stage.name] = record
        return record

    def _execute(
        self, stage: Stage, settings: dict[str, Any], inputs: dict[str, str], current: str
    ) -> StageRecord:
        self.folder.mkdir(parents=True, exist_ok=True)
        started = self._read(self._started_path(stage.name))
        if started is None or started.get("fingerprint") != current:
            self._done_path(stage.name).unlink(missing_ok=True)
            for path in stage.outputs:
                _discard(path)
            atomic_write_json(
                self._started_path(stage.name), {"format": STAGE_FORMAT, "fingerprint": current}
            )
        else:
            self.log(f"stage {stage.name}: resuming an interrupted run with the same settings")
        clock = time.monotonic()
        result = _canonical(stage.run(self.records))
        record = StageRecord(
            name=stage.name,
            fingerprint=current,
            settings=settings,
            inputs=inputs,
            result=result,
            seconds=round(time.monotonic() - clock, 2),
        )
        atomic_write_json(self._done_path(stage.name), record.as_json())
        self._started_path(stage.name).unlink(missing_ok=True)
        return record
