"""Episode records: one JSON line per finished evaluation episode, durable as it is written.

The records file is the evaluation's ground truth: scores, tables and W&B reports are all
computed from it, never from in-memory state. Why JSON lines:

- appending one line is atomic enough to resume from: each line is flushed and fsynced
  before the runner reports the next episode, so a killed run loses at most the episodes
  in flight, and a line cut short by a kill (no final newline) is ignored when reading;
- several processes (ranks, `--shard i/n`) write one file each into one shared output
  folder, `episodes.jsonl` or `episodes-<i>-of-<n>.jsonl`, and readers merge them;
- a person can `grep` and `jq` it.

The unit of work is `EpisodeKey(task, episode, seed)`: the stored test episode `episode` of
`task`, evaluated under seed `seed`. A key appears at most once across all files of a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "PLAN_NAME",
    "RECORDS_GLOB",
    "EpisodeKey",
    "EpisodeRecord",
    "RecordsError",
    "RecordsWriter",
    "RunPlan",
    "read_records",
    "records_name",
]

RECORDS_GLOB = "episodes*.jsonl"
PLAN_NAME = "run.json"
Status = Literal["ok", "error"]


class RecordsError(ValueError):
    """A records file that cannot be read (a malformed line that is not the cut-off last)."""


def records_name(shard: int = 0, shards: int = 1) -> str:
    """The records file of one shard of a run (`episodes.jsonl` for an unsharded run)."""
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards} is out of range")
    return "episodes.jsonl" if shards == 1 else f"episodes-{shard}-of-{shards}.jsonl"


@dataclass(frozen=True, order=True)
class EpisodeKey:
    """One unit of evaluation work: a stored test episode of a task, under one seed."""

    task: str
    episode: int
    seed: int

    def __str__(self) -> str:
        return f"{self.task}/episode{self.episode}/seed{self.seed}"


@dataclass(frozen=True)
class EpisodeRecord:
    """What happened in one evaluation episode.

    `status` says whether the episode was evaluated: "ok" (it ran to success, to its step
    limit or to an action the robot could not execute, which counts as a failure exactly
    as in RLBench and X-ICM, with `error_type` set), or "error" (it could not be evaluated:
    the agent raised, or the worker crashed or hung on every attempt). Scores count an
    "error" episode as a failure and report it, so no problem is ever silent.
    """

    task: str
    level: str
    variation: int
    episode: int
    seed: int
    instruction: str
    steps: int
    success: bool
    status: Status = "ok"
    error_type: str | None = None
    error_message: str | None = None
    actions: list[list[float]] = field(default_factory=list)
    agent_stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    attempts: int = 1

    def __post_init__(self) -> None:
        if self.status not in ("ok", "error"):
            raise ValueError(f"status must be 'ok' or 'error', got {self.status!r}")
        if self.status == "error" and self.success:
            raise ValueError(f"{self.key}: an episode that was not evaluated cannot succeed")

    @property
    def key(self) -> EpisodeKey:
        return EpisodeKey(self.task, self.episode, self.seed)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EpisodeRecord:
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown record field(s) {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class RunPlan:
    """What a run was asked to evaluate, saved as `run.json` beside its records, so that
    scores can say which episodes are missing instead of counting them as failures.

    `tasks` maps each task to its level, in the suite's canonical order (AGNOSTOS: the 13
    Level-1 tasks, then the 10 Level-2 tasks). `fingerprint` identifies everything that
    changes the results (suite, agent and its settings, step limit, seeds); a folder
    holding another fingerprint is refused by the evaluator.
    """

    suite: str
    tasks: dict[str, str]
    episodes: list[int]
    seeds: list[int]
    max_steps: int
    agent: str
    fingerprint: str
    config: dict[str, Any] = field(default_factory=dict)

    def keys(self) -> list[EpisodeKey]:
        """Every unit of work, seeds outermost (a partial run has whole seeds first)."""
        return [
            EpisodeKey(task, episode, seed)
            for seed in self.seeds
            for task in self.tasks
            for episode in self.episodes
        ]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunPlan:
        return cls(**data)

    @classmethod
    def load(cls, folder: str | Path) -> RunPlan:
        path = Path(folder) / PLAN_NAME
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no evaluation run here") from None
        except (ValueError, TypeError) as error:
            raise RecordsError(f"{path}: not an evaluation plan ({error})") from None


class RecordsWriter:
    """Appends records to one file, each line on disk before `append` returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_cut_off_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def append(self, record: EpisodeRecord) -> None:
        self._file.write(json.dumps(record.to_json(), sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_cut_off_line(path: Path) -> None:
    """Remove a last line without its newline (a write cut off by a kill) before appending,
    so the next record starts on a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())


def _read_file(path: Path) -> Iterator[EpisodeRecord]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is empty or cut off by a kill
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            yield EpisodeRecord.from_json(json.loads(line))
        except (ValueError, TypeError) as error:
            raise RecordsError(f"{path}:{number}: not an episode record ({error})") from None


def read_records(paths: str | Path | Iterable[str | Path]) -> list[EpisodeRecord]:
    """Every record of a run: a run folder (all its `episodes*.jsonl`), a file, or several.

    Raises RecordsError when a key appears twice (two shards or runs writing the same
    work into one folder), naming the key and both files.
    """
    if isinstance(paths, (str, Path)):
        path = Path(paths)
        files = sorted(path.glob(RECORDS_GLOB)) if path.is_dir() else [path]
    else:
        files = [Path(path) for path in paths]
    seen: dict[EpisodeKey, Path] = {}
    records = []
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no episode records here")
        for record in _read_file(file):
            if record.key in seen:
                raise RecordsError(
                    f"{record.key} is recorded twice: in {seen[record.key]} and {file}"
                )
            seen[record.key] = file
            records.append(record)
    return records
