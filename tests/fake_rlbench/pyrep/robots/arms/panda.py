"""Fake `pyrep.robots.arms.panda.Panda`: a tip pose and joints that jump to planned targets."""

from __future__ import annotations

import numpy as np

from pyrep.errors import ConfigurationPathError

START_JOINTS = np.array([0.0, 0.175, 0.0, -0.873, 0.0, 1.222, 0.785])
START_TIP = np.array([0.2785, -0.0082, 1.4719, 0.0, 0.9927, 0.0, 0.1209])
START_TIP[3:] /= np.linalg.norm(START_TIP[3:])


def pose_matrix(pose: np.ndarray) -> np.ndarray:
    """4x4 world pose of [x, y, z, qx, qy, qz, qw]."""
    x, y, z, w = pose[3:7] / np.linalg.norm(pose[3:7])
    matrix = np.eye(4)
    matrix[:3, :3] = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    matrix[:3, 3] = pose[:3]
    return matrix


class Tip:
    def __init__(self, arm: Panda):
        self._arm = arm

    def get_pose(self, relative_to=None) -> np.ndarray:
        return self._arm.tip_pose.copy()

    def get_position(self, relative_to=None) -> np.ndarray:
        return self._arm.tip_pose[:3].copy()

    def get_matrix(self, relative_to=None) -> np.ndarray:
        return pose_matrix(self._arm.tip_pose)


class ArmConfigurationPath:
    """One-step path: the first `step()` puts the arm at the target and reports done."""

    def __init__(self, arm: Panda, pose: np.ndarray):
        self._arm = arm
        self._pose = pose

    def step(self) -> bool:
        previous = self._arm.joint_positions.copy()
        self._arm.tip_pose = self._pose.copy()
        # A made-up but deterministic "IK": joints follow the target pose.
        self._arm.joint_positions = START_JOINTS + 0.1 * np.concatenate(
            [self._pose[:3] - START_TIP[:3], self._pose[3:7] - START_TIP[3:7]]
        )
        self._arm.joint_velocities = (self._arm.joint_positions - previous) / 0.05
        return True


class Panda:
    def __init__(self, count: int = 0):
        self.fake = None  # the fake rlbench's FakeSim (its `unreachable` switch)
        self.reset_state()

    def reset_state(self) -> None:
        self.tip_pose = START_TIP.copy()
        self.joint_positions = START_JOINTS.copy()
        self.joint_velocities = np.zeros(7)

    def get_tip(self) -> Tip:
        return Tip(self)

    def get_joint_positions(self) -> list[float]:
        return self.joint_positions.tolist()

    def get_joint_velocities(self) -> list[float]:
        return self.joint_velocities.tolist()

    def get_joint_forces(self) -> list[float]:
        return [0.0] * 7

    def get_joint_target_velocities(self) -> list[float]:
        return [0.0] * 7

    def set_control_loop_enabled(self, value: bool) -> None:
        self.control_loop = value

    def get_path(
        self,
        position,
        euler=None,
        quaternion=None,
        ignore_collisions=False,
        trials=300,
        max_configs=1,
        distance_threshold=0.65,
        max_time_ms=10,
        trials_per_goal=1,
        algorithm=None,
        relative_to=None,
    ) -> ArmConfigurationPath:
        if self.fake is not None and self.fake.unreachable:
            raise ConfigurationPathError("Could not create path.")
        pose = np.concatenate([np.asarray(position, float), np.asarray(quaternion, float)])
        return ArmConfigurationPath(self, pose)
