"""`rlbench.action_modes.arm_action_modes` (PerAct fork): EndEffectorPoseViaPlanning."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
from pyrep.errors import ConfigurationPathError

from rlbench.backend.exceptions import InvalidActionError


def assert_action_shape(action: np.ndarray, expected_shape: tuple):
    if np.shape(action) != expected_shape:
        raise InvalidActionError(
            f"Expected the action shape to be: {expected_shape}, but was shape: {np.shape(action)}"
        )


def assert_unit_quaternion(quat):
    if not np.isclose(np.linalg.norm(quat), 1.0):
        raise InvalidActionError("Action contained non unit quaternion!")


class ArmActionMode:
    @abstractmethod
    def action(self, scene, action: np.ndarray):
        pass

    @abstractmethod
    def action_shape(self, scene):
        pass

    def set_control_mode(self, robot):
        robot.arm.set_control_loop_enabled(True)


class EndEffectorPoseViaPlanning(ArmActionMode):
    """Target pose reached via planning; a planning failure is an InvalidActionError."""

    def __init__(
        self, absolute_mode: bool = True, frame: str = "world", collision_checking: bool = False
    ):
        self._absolute_mode = absolute_mode
        self._frame = frame
        self._collision_checking = collision_checking
        self._callable_each_step = None
        if frame not in ["world", "end effector"]:
            raise ValueError("Expected frame to one of: 'world, 'end effector'")

    def _quick_boundary_check(self, scene, action: np.ndarray):
        if not scene.check_target_in_workspace(action[:3]):
            raise InvalidActionError(
                "A path could not be found because the target is outside of workspace."
            )

    def action(self, scene, action: np.ndarray, ignore_collisions: bool = True):
        assert_action_shape(action, (7,))
        assert_unit_quaternion(action[3:])
        if not self._absolute_mode or self._frame != "world":
            raise NotImplementedError("the fake plans absolute world-frame poses only")
        self._quick_boundary_check(scene, action)
        scene._ignore_collisions_for_current_waypoint = ignore_collisions
        injected = scene.fake.step_errors.get(scene.actions_taken)
        if injected is not None:
            raise injected
        try:
            path = scene.robot.arm.get_path(
                action[:3],
                quaternion=action[3:],
                ignore_collisions=ignore_collisions,
                trials=100,
                max_configs=10,
                max_time_ms=10,
                trials_per_goal=5,
            )
        except ConfigurationPathError as e:
            raise InvalidActionError(
                "A path could not be found. Most likely due to the target "
                "being inaccessible or a collison was detected."
            ) from e
        done = False
        while not done:
            done = path.step()
            scene.step()
            success, _ = scene.task.success()
            if success and self._callable_each_step is None:
                break

    def action_shape(self, scene) -> tuple:
        return (7,)
