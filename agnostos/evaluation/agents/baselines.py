"""The two reference agents every evaluation can run: replay and noop.

- `ReplayAgent` executes the stored test episode's own keyframe actions (the 9-dim action
  that reaches each keyframe, as the keyframe datamodule builds training targets). It is
  the check that the environment, the test set and the runner agree: if replaying a
  stored demo does not succeed, no agent's score from that setup means anything.
- `NoopAgent` holds the gripper where the episode started: the negative control, which
  must score about 0 (a task that "succeeds" under noop is broken).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agnostos.envs.protocol import Observation
from agnostos.evaluation.agents.base import AgentError, QueuedAgent

__all__ = ["NoopAgent", "ReplayAgent"]


class ReplayAgent(QueuedAgent):
    """Replays the stored episode's keyframe actions, all planned at once."""

    name = "replay"

    def plan(self, batch: Sequence[tuple[int, Observation]]) -> list[Sequence[np.ndarray]]:
        from agnostos.shards.views import FolderEpisode, keyframe_actions

        plans = []
        for env_id, _ in batch:
            context = self.context(env_id)
            actions = keyframe_actions(FolderEpisode(context.stored, str(context.key)))
            if self._plans[env_id] > 0 or not len(actions):
                # replanning means the stored keyframes ran out before the episode ended
                raise AgentError(f"replay: {context.key} has no (more) stored keyframes")
            plans.append(list(actions))
        return plans


class NoopAgent(QueuedAgent):
    """Sends the gripper's pose at the episode's start, with the gripper as it was."""

    name = "noop"

    def __init__(self) -> None:
        super().__init__()
        self._home: dict[int, np.ndarray] = {}

    def plan(self, batch: Sequence[tuple[int, Observation]]) -> list[Sequence[np.ndarray]]:
        plans = []
        for env_id, observation in batch:
            if self._plans[env_id] == 0:
                self._home[env_id] = np.concatenate(
                    [observation.gripper_pose, [observation.gripper_open, 1.0]]
                ).astype(np.float64)
            plans.append([self._home[env_id]])
        return plans
