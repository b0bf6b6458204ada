"""Test doubles for the evaluator that run for real: a minibench environment that crashes or
hangs where a test tells it to, and agents that record their batches or act slowly.

Faults are driven by files in `$AGNOSTOS_FAULTS` (a folder): `crash-<task>-<episode>` makes
the worker process exit during that episode's reset, `hang-<task>-<episode>` makes its
first step sleep forever. The file holds a count: each fault decrements it, so a fault can
strike once (and a retry then succeeds) or every time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agnostos.envs.minibench.env import MiniBenchEnv
from agnostos.evaluation.agents import ReplayAgent


def _strike(kind: str, task: str, episode: int) -> bool:
    folder = os.environ.get("AGNOSTOS_FAULTS")
    if not folder:
        return False
    marker = Path(folder) / f"{kind}-{task}-{episode}"
    if not marker.exists():
        return False
    left = int(marker.read_text() or "0")
    if left <= 0:
        return False
    marker.write_text(str(left - 1))
    return True


class FaultyMiniBench(MiniBenchEnv):
    def reset_to_episode(self, episode):
        self._episode = (episode.task, episode.episode)
        if _strike("crash", *self._episode):
            os._exit(3)
        return super().reset_to_episode(episode)

    def step(self, action):
        if _strike("hang", *self._episode):
            time.sleep(3600)
        return super().step(action)


def faulty_minibench(image_size: int, cameras: Sequence[str]) -> FaultyMiniBench:
    return FaultyMiniBench(image_size=image_size, cameras=cameras)


class RecordingReplay(ReplayAgent):
    """Replay that keeps the size of every `act` batch and every episode's seed; each call
    costs `seconds`, like a model call (environments finish their steps meanwhile)."""

    name = "recording_replay"

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__()
        self.seconds = seconds
        self.batch_sizes: list[int] = []
        self.seeds: dict[str, int] = {}

    def reset(self, env_id, context) -> None:
        super().reset(env_id, context)
        self.seeds[str(context.key)] = context.seed

    def act(self, batch):
        self.batch_sizes.append(len(batch))
        time.sleep(self.seconds)
        return super().act(batch)


class SlowReplay(ReplayAgent):
    """Replay with a fixed cost per call (so a test can kill a run part-way)."""

    name = "slow_replay"

    def __init__(self, seconds: float = 0.3) -> None:
        super().__init__()
        self.seconds = seconds

    def act(self, batch):
        time.sleep(self.seconds)
        return super().act(batch)


class FailingOn(ReplayAgent):
    """Replay that raises for one task (an agent bug on one episode)."""

    name = "failing_on"

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task

    def settings(self):
        return {"task": self.task}

    def act(self, batch):
        if any(self.context(env_id).task == self.task for env_id, _ in batch):
            if len(batch) > 1:
                raise RuntimeError("batch contains the failing task")
            raise RuntimeError(f"cannot act on {self.task}")
        return super().act(batch)


class RandomAgent(ReplayAgent):
    """Stored keyframes plus noise drawn from the episode's own generator."""

    name = "random"

    def plan(self, batch):
        plans = super().plan(batch)
        out = []
        for (env_id, _), actions in zip(batch, plans, strict=True):
            rng = self.context(env_id).rng
            out.append([a + np.r_[rng.normal(0, 0.002, 3), np.zeros(6)] for a in actions])
        return out
