"""`rlbench.backend.task`: TASKS_PATH and the Task base class, with the fake's scene content.

A fake task is one box on the table: `object_name`/`object_handle` name it in masks,
`spawn_low`/`spawn_high` bound where the scene places it and `base_rotation_bounds` how it
may turn. Success and failure follow `FakeSim.succeed_after` / `fail_after`.
"""

from __future__ import annotations

import re
from os.path import abspath, dirname, join

import numpy as np

TASKS_PATH = join(dirname(abspath(__file__)), "../tasks")


class Task:
    object_name = "box"
    object_handle = 300
    object_colour = (0.8, 0.1, 0.1)
    object_half_width = 0.06
    object_height = 0.1
    spawn_low = (0.05, -0.25)
    spawn_high = (0.45, 0.25)

    def __init__(self, pyrep, robot, name: str | None = None):
        self.pyrep = pyrep
        self.name = name if name else re.sub("(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()
        self.robot = robot
        self._scene = None  # set by Scene.load (fake only)

    def get_name(self) -> str:
        return self.name

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def init_task(self) -> None:
        pass

    def init_episode(self, index: int) -> list[str]:
        raise NotImplementedError("'init_episode' is almost always necessary.")

    def variation_count(self) -> int:
        raise NotImplementedError("'variation_count' must be defined.")

    def base_rotation_bounds(self) -> tuple[list[float], list[float]]:
        return [0.0, 0.0, -3.14], [0.0, 0.0, 3.14]

    def is_static_workspace(self) -> bool:
        return False

    def step(self) -> None:
        pass

    def cleanup_(self) -> None:
        pass

    def reward(self) -> float | None:
        return None

    def success(self) -> tuple[bool, bool]:
        """(successful, terminate) as in RLBench; decided by the FakeSim switches."""
        fake, steps = self._scene.fake, self._scene.actions_taken
        if fake.fail_after is not None and steps >= fake.fail_after:
            return False, True
        met = fake.succeed_after is not None and steps >= fake.succeed_after
        return met, met

    def get_low_dim_state(self) -> np.ndarray:
        x, y, yaw = self._scene.placement
        return np.array([x, y, yaw])

    def decorate_observation(self, observation):
        return observation
