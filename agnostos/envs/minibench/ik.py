"""Damped-least-squares inverse kinematics for the Panda's gripper tip.

6-DoF DLS on `mj_jacSite` over the seven arm joints, with a null-space pull towards a rest
posture and a per-iteration step clamp, solved on a scratch MjData so the simulation state
is never touched. A pose it cannot reach within tolerance is reported, not approximated:
the environment turns that into RLBench's invalid-action failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

POSITION_TOLERANCE = 0.005  # metres
ROTATION_TOLERANCE = np.deg2rad(3.0)
_DAMPING = 1e-3
_NULL_GAIN = 0.05
_MAX_STEP = 0.2
_ITERATIONS = 300


@dataclass(frozen=True)
class IKResult:
    joints: np.ndarray
    position_error: float
    rotation_error: float

    @property
    def converged(self) -> bool:
        return (
            self.position_error <= POSITION_TOLERANCE and self.rotation_error <= ROTATION_TOLERANCE
        )


def quat_xyzw_to_wxyz(quat: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(quat, dtype=np.float64)
    return np.array([w, x, y, z])


def quat_wxyz_to_xyzw(quat: np.ndarray) -> np.ndarray:
    w, x, y, z = np.asarray(quat, dtype=np.float64)
    return np.array([x, y, z, w])


def site_pose(model: mujoco.MjModel, data: mujoco.MjData, site: int) -> np.ndarray:
    """(7,) position + quaternion xyzw (w >= 0) of a site."""
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, data.site_xmat[site])
    if quat[0] < 0:
        quat = -quat
    return np.concatenate([data.site_xpos[site], quat_wxyz_to_xyzw(quat)])


class PandaIK:
    """Solves for arm joints that put `site` at a world pose (quaternion xyzw)."""

    def __init__(
        self,
        model: mujoco.MjModel,
        site: int,
        arm_qpos: np.ndarray,
        arm_dof: np.ndarray,
        rest: np.ndarray,
    ):
        self.model = model
        self.site = site
        self.arm_qpos = arm_qpos
        self.arm_dof = arm_dof
        self.rest = np.asarray(rest, dtype=np.float64)
        joint_ids = [int(model.dof_jntid[dof]) for dof in arm_dof]
        self.lower = model.jnt_range[joint_ids, 0].copy()
        self.upper = model.jnt_range[joint_ids, 1].copy()
        self._scratch = mujoco.MjData(model)
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def solve(self, qpos: np.ndarray, position: np.ndarray, quat_xyzw: np.ndarray) -> IKResult:
        """Arm joints for the target, starting from the full-model configuration `qpos`."""
        data = self._scratch
        data.qpos[:] = qpos
        target_quat = quat_xyzw_to_wxyz(quat_xyzw)
        target_quat /= np.linalg.norm(target_quat)
        current_quat = np.zeros(4)
        conjugate = np.zeros(4)
        difference = np.zeros(4)
        rotation_error = np.zeros(3)
        q = data.qpos[self.arm_qpos].copy()
        position_norm = rotation_norm = np.inf
        for _ in range(_ITERATIONS):
            data.qpos[self.arm_qpos] = q
            mujoco.mj_kinematics(self.model, data)
            mujoco.mj_comPos(self.model, data)
            position_error = np.asarray(position, dtype=np.float64) - data.site_xpos[self.site]
            mujoco.mju_mat2Quat(current_quat, data.site_xmat[self.site])
            mujoco.mju_negQuat(conjugate, current_quat)
            mujoco.mju_mulQuat(difference, target_quat, conjugate)
            mujoco.mju_quat2Vel(rotation_error, difference, 1.0)
            position_norm = float(np.linalg.norm(position_error))
            rotation_norm = float(np.linalg.norm(rotation_error))
            if position_norm < 1e-4 and rotation_norm < 1e-3:
                break
            mujoco.mj_jacSite(self.model, data, self._jacp, self._jacr, self.site)
            jacobian = np.vstack([self._jacp[:, self.arm_dof], 0.5 * self._jacr[:, self.arm_dof]])
            error = np.concatenate([position_error, 0.5 * rotation_error])
            gram = jacobian @ jacobian.T + _DAMPING * np.eye(6)
            step = jacobian.T @ np.linalg.solve(gram, error)
            null = np.eye(7) - np.linalg.pinv(jacobian) @ jacobian
            step += _NULL_GAIN * null @ (self.rest - q)
            scale = np.max(np.abs(step)) / _MAX_STEP
            if scale > 1.0:
                step /= scale
            q = np.clip(q + step, self.lower, self.upper)
        return IKResult(q, position_norm, rotation_norm)
