"""Evaluation callbacks: everything that watches a rollout run, the way a Lightning Trainer
calls its Callbacks.

The runner only runs episodes; recording, progress, videos and W&B reporting are callbacks
on its events, and a user adds their own from the config (`callbacks:` with class paths).
All events are called in the main process, in this order:

    on_run_start(run)                       once, after resuming: what is done, what is left
    on_episode_start(key, info)             an episode's scene has been reset
    on_step(key, step, observation, action) before each action is executed, and once more
                                            with the final observation (action None)
    on_episode_end(record)                  the episode is over (its record is final)
    on_run_end(run, records)                once, with every record of the run

`on_episode_end` is called on the callbacks in list order, and the runner puts its record
writer first, so a record is on disk before any other callback (or the next episode) sees
it. A callback that raises stops the run: callbacks are part of the evaluation, not
decoration, and a reporter that silently failed would make a run look complete when it
is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agnostos.evaluation.records import EpisodeKey, EpisodeRecord, RunPlan

if TYPE_CHECKING:
    from agnostos.envs.protocol import Observation

__all__ = ["EpisodeInfo", "EvalCallback", "RunInfo"]


@dataclass(frozen=True)
class RunInfo:
    """The run a callback watches: its plan, output folder, and where it resumed from.

    `done` are the records already on disk when this invocation started (a resumed run);
    `todo` the keys this process will run (its shard of the plan, minus what is done).
    """

    plan: RunPlan
    out: Path
    done: tuple[EpisodeRecord, ...]
    todo: tuple[EpisodeKey, ...]
    shard: int = 0
    shards: int = 1


@dataclass(frozen=True)
class EpisodeInfo:
    """What is known about an episode once its scene is reset."""

    key: EpisodeKey
    level: str
    variation: int
    instruction: str
    worker: int


class EvalCallback:
    """Base class: override the events you need; every default does nothing."""

    def on_run_start(self, run: RunInfo) -> None:
        """The run starts (or resumes)."""

    def on_episode_start(self, key: EpisodeKey, info: EpisodeInfo) -> None:
        """An episode's scene has been reset; its first observation comes with `on_step`."""

    def on_step(
        self, key: EpisodeKey, step: int, observation: Observation, action: np.ndarray | None
    ) -> None:
        """`action` (9-dim) is about to be executed on `observation`, at step 0, 1, ...;
        once the episode is over, a last call brings the final observation with
        `action=None` (so a video shows how the episode ended)."""

    def on_episode_end(self, record: EpisodeRecord) -> None:
        """An episode is over; `record` is what the records file holds for it."""

    def on_run_end(self, run: RunInfo, records: Sequence[EpisodeRecord]) -> None:
        """The run is over; `records` are all of its records, those of earlier invocations
        and other shards included where they are in the output folder."""
