"""`rlbench.action_modes.gripper_action_modes` (PerAct fork): Discrete."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from rlbench.backend.exceptions import InvalidActionError


def assert_action_shape(action: np.ndarray, expected_shape: tuple):
    if np.shape(action) != expected_shape:
        raise InvalidActionError(
            f"Expected the action shape to be: {expected_shape}, but was shape: {np.shape(action)}"
        )


class GripperActionMode:
    @abstractmethod
    def action(self, scene, action: np.ndarray):
        pass

    @abstractmethod
    def action_shape(self, scene):
        pass


class Discrete(GripperActionMode):
    """Open (> 0.5) or close the gripper, grasping on close and releasing on open."""

    def __init__(self, attach_grasped_objects: bool = True, detach_before_open: bool = True):
        self._attach_grasped_objects = attach_grasped_objects
        self._detach_before_open = detach_before_open

    def _actuate(self, scene, action):
        done = False
        while not done:
            done = scene.robot.gripper.actuate(action, velocity=0.2)
            scene.pyrep.step()
            scene.task.step()

    def action(self, scene, action: np.ndarray):
        assert_action_shape(action, self.action_shape(scene.robot))
        open_condition = all(x > 0.9 for x in scene.robot.gripper.get_open_amount())
        current_ee = 1.0 if open_condition else 0.0
        action = float(action[0] > 0.5)
        if current_ee != action:
            if action == 1.0 and self._detach_before_open:
                scene.robot.gripper.release()
            self._actuate(scene, action)
            if action == 0.0 and self._attach_grasped_objects:
                scene.robot.gripper.grasp(scene.task)

    def action_shape(self, scene) -> tuple:
        return (1,)
