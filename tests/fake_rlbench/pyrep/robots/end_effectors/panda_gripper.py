"""Fake `pyrep.robots.end_effectors.panda_gripper.PandaGripper`."""

from __future__ import annotations

import numpy as np


class PandaGripper:
    def __init__(self, count: int = 0):
        self.open_amount = np.ones(2)
        self.grasped: list = []

    def get_open_amount(self) -> list[float]:
        return self.open_amount.tolist()

    def get_joint_positions(self) -> list[float]:
        return (0.04 * self.open_amount).tolist()

    def actuate(self, amount: float, velocity: float) -> bool:
        self.open_amount = np.full(2, float(amount))
        return True

    def grasp(self, obj) -> bool:
        self.grasped.append(obj)
        return True

    def release(self) -> None:
        self.grasped.clear()

    def get_grasped_objects(self) -> list:
        return list(self.grasped)
