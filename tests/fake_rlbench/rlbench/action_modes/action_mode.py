"""`rlbench.action_modes.action_mode` (PerAct fork): ActionMode and MoveArmThenGripper."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from rlbench.action_modes.arm_action_modes import ArmActionMode
from rlbench.action_modes.gripper_action_modes import GripperActionMode


class ActionMode:
    def __init__(self, arm_action_mode: ArmActionMode, gripper_action_mode: GripperActionMode):
        self.arm_action_mode = arm_action_mode
        self.gripper_action_mode = gripper_action_mode

    @abstractmethod
    def action(self, scene, action: np.ndarray):
        pass

    @abstractmethod
    def action_shape(self, scene):
        pass


class MoveArmThenGripper(ActionMode):
    """The arm action (7), then the gripper (1); a 9th value is the ignore_collisions flag."""

    def action(self, scene, action: np.ndarray):
        arm_act_size = np.prod(self.arm_action_mode.action_shape(scene))
        arm_action = np.array(action[:arm_act_size])
        ee_action = np.array(action[arm_act_size : arm_act_size + 1])
        ignore_collisions = bool(action[arm_act_size + 1 : arm_act_size + 2])
        self.arm_action_mode.action(scene, arm_action, ignore_collisions)
        self.gripper_action_mode.action(scene, ee_action)

    def action_shape(self, scene):
        return np.prod(self.arm_action_mode.action_shape(scene)) + np.prod(
            self.gripper_action_mode.action_shape(scene)
        )
