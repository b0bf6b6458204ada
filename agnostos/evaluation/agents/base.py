"""The agent protocol: what the evaluator asks of anything it evaluates.

The evaluator runs several environments at once (one per worker process) and one agent in
the main process. An agent is reset per episode and per environment, then asked to act on
a *batch* of (environment id, observation) pairs, one 9-dim RLBench action per pair, so a
model-backed agent (an LLM, a VLA) makes one model call for every environment waiting on
it instead of one per environment.

Most policies plan several keyframes at a time (X-ICM: up to 26 per LLM reply; action
chunks). `QueuedAgent` handles that once: a subclass implements `plan`, which is called
with only the environments whose queue is empty, and returns a sequence of actions for
each; `act` then pops one action per environment. A plan may be an exception instead, for an
environment whose episode cannot go on (a prompt longer than the model's context): the
evaluator records that episode as an error and the others carry on.

Seeding: the evaluator resets each episode with an `EpisodeContext` whose `seed` is
derived from (task, episode, evaluation seed), and a `numpy.random.Generator` built from
it. An agent that samples must draw from `context.rng` (or seed its own generators from
`context.seed`), so an episode's actions never depend on which episodes ran before it or
on which other environments share its batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agnostos.envs.protocol import ACTION_SIZE, Observation
from agnostos.evaluation.records import EpisodeKey
from agnostos.shards.episode import Episode

__all__ = ["Agent", "AgentError", "EpisodeContext", "QueuedAgent"]


class AgentError(RuntimeError):
    """An agent broke its contract (wrong number or shape of actions)."""


@dataclass
class EpisodeContext:
    """What an agent is told when an episode starts in one of the environments."""

    key: EpisodeKey
    task: str
    level: str
    variation: int
    instruction: str
    seed: int
    stored: Episode  # the stored test episode (its low-dim data; the replay agent's actions)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)


class Agent(ABC):
    """Base class of every evaluated agent.

    `reset(env_id, context)` starts an episode in environment `env_id`; `act(batch)` gets
    the current observation of every environment waiting for an action and returns one
    9-dim action per entry, in order; `episode_stats(env_id)` is called when that
    environment's episode ends, and what it returns goes into the episode record.
    """

    #: a short name, recorded in the run plan and its fingerprint
    name: str = "agent"

    @abstractmethod
    def reset(self, env_id: int, context: EpisodeContext) -> None: ...

    @abstractmethod
    def act(self, batch: Sequence[tuple[int, Observation]]) -> list[np.ndarray]: ...

    def episode_stats(self, env_id: int) -> dict[str, Any]:
        return {}

    def open_run(self, out: Path, shard: tuple[int, int]) -> None:  # noqa: B027 (optional)
        """Called once before the first episode with the run folder and this process's
        shard, for files the agent keeps next to the records (X-ICM's prompts and replies)."""

    def settings(self) -> dict[str, Any]:
        """JSON values that change what the agent does (part of the run's fingerprint)."""
        return {}

    def close(self) -> None:  # noqa: B027 (optional hook: most agents hold nothing to free)
        """Free models, servers and files at the end of the run."""


def checked_action(action: Any, owner: str) -> np.ndarray:
    """An agent's action as a float64 (9,) array, or AgentError naming the agent."""
    values = np.asarray(action, dtype=np.float64)
    if values.shape != (ACTION_SIZE,):
        raise AgentError(f"{owner} returned an action of shape {values.shape}, not (9,)")
    return values


class QueuedAgent(Agent):
    """An agent that plans one or more actions at a time for each environment.

    Subclasses implement `plan(batch)`: for each (env_id, observation) it is given, a
    non-empty sequence of 9-dim actions, executed one per step before `plan` is asked
    again for that environment, or an exception that ends that environment's episode as
    an error (`act` returns it in the environment's place).
    """

    def __init__(self) -> None:
        self._queues: dict[int, deque[np.ndarray]] = {}
        self._contexts: dict[int, EpisodeContext] = {}
        self._plans: dict[int, int] = {}

    def reset(self, env_id: int, context: EpisodeContext) -> None:
        self._queues[env_id] = deque()
        self._contexts[env_id] = context
        self._plans[env_id] = 0

    def context(self, env_id: int) -> EpisodeContext:
        return self._contexts[env_id]

    @abstractmethod
    def plan(
        self, batch: Sequence[tuple[int, Observation]]
    ) -> list[Sequence[np.ndarray] | BaseException]: ...

    def act(self, batch: Sequence[tuple[int, Observation]]) -> list[np.ndarray | BaseException]:
        empty = [(env_id, observation) for env_id, observation in batch if not self._queues[env_id]]
        failed: dict[int, BaseException] = {}
        if empty:
            plans = self.plan(empty)
            if len(plans) != len(empty):
                raise AgentError(
                    f"{self.name}: plan() returned {len(plans)} plans for {len(empty)} environments"
                )
            for (env_id, _), actions in zip(empty, plans, strict=True):
                if isinstance(actions, BaseException):
                    failed[env_id] = actions
                    continue
                actions = [checked_action(action, self.name) for action in actions]
                if not actions:
                    raise AgentError(f"{self.name}: plan() returned no action for env {env_id}")
                self._queues[env_id].extend(actions)
                self._plans[env_id] += 1
        return [
            failed[env_id] if env_id in failed else self._queues[env_id].popleft()
            for env_id, _ in batch
        ]

    def episode_stats(self, env_id: int) -> dict[str, Any]:
        return {"plans": self._plans.get(env_id, 0)}
