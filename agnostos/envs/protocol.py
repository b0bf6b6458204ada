"""The environment protocol every backend speaks (RLBench adapter, minibench).

Actions are RLBench's 9-dim keyframe actions `[x, y, z, qx, qy, qz, qw, gripper_open,
ignore_collisions]` in the world frame. A step moves the gripper to that pose and then sets
the gripper; an action that cannot be reached ends the episode as a failure (RLBench's
InvalidActionError), reported in `StepResult.error` as `"<ErrorType>: <message>"` rather
than raised, so an evaluation loop never crashes on a bad model output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from agnostos.shards.episode import Episode

ACTION_SIZE = 9


class InvalidActionError(ValueError):
    """An action the robot cannot execute (malformed, outside the workspace, unreachable)."""


@dataclass(frozen=True)
class CameraFrame:
    """One camera's view: rgb (H,W,3 uint8), depth (H,W float32 metres), mask (H,W int32
    handles), and RLBench-convention parameters (negative-focal intrinsics, camera-to-world
    extrinsics, near/far planes)."""

    rgb: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    near: float
    far: float

    def point_cloud(self) -> np.ndarray:
        """World-frame points (H,W,3), built exactly as for stored RLBench episodes."""
        from agnostos.shards.codecs import point_cloud

        return point_cloud(self.depth, self.intrinsics, self.extrinsics)


@dataclass(frozen=True)
class Observation:
    """What an agent sees after reset or a step (the fields the framework uses)."""

    cameras: dict[str, CameraFrame]
    gripper_pose: np.ndarray  # (7,) xyz + quaternion xyzw
    gripper_open: float
    joint_positions: np.ndarray
    joint_velocities: np.ndarray
    mask_names: dict[int, str]
    instruction: str
    low_dim: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    observation: Observation
    success: bool
    terminal: bool
    error: str | None = None


class Environment(Protocol):
    """A simulator the evaluator drives, one per worker process.

    `reset_to_episode` restores the scene of a stored test episode (AGNOSTOS evaluates on
    stored episodes: RLBench's `reset_to_demo`, minibench's `reset_to_state`) from the
    episode's task, variation and stored random state; it raises `SimulatorError` when the
    simulator itself fails, which the evaluator answers by retrying in a fresh worker.
    """

    def reset(self, task: str, variation: int, episode: int) -> Observation: ...

    def reset_to_episode(self, episode: Episode) -> Observation: ...

    def step(self, action: np.ndarray) -> StepResult: ...

    def close(self) -> None: ...


class SimulatorError(RuntimeError):
    """The simulator failed (not the agent or its action): retried in a fresh process."""


def check_action(action: np.ndarray) -> np.ndarray:
    """A float64 copy of a 9-dim action with a unit quaternion, or InvalidActionError."""
    values = np.asarray(action, dtype=np.float64).reshape(-1)
    if values.shape != (ACTION_SIZE,):
        raise InvalidActionError(f"action must have {ACTION_SIZE} values, got {values.size}")
    if not np.all(np.isfinite(values)):
        raise InvalidActionError(f"action has non-finite values: {values.tolist()}")
    norm = np.linalg.norm(values[3:7])
    if norm < 1e-6:
        raise InvalidActionError("action quaternion has zero norm")
    values[3:7] /= norm
    return values
