"""Keyframe discovery: the PerAct heuristic that X-ICM, RoboPrompt and RVT share.

A frame i > 0 is a keyframe when the gripper open state changes there, when it is the
last frame, or when the arm has "stopped". Stopped means every joint speed is within
`velocity_tolerance`, the gripper state is constant over frames i-2..i+1, i is not the
second-to-last frame, and at least four frames have passed since the previous stop.
Finally, when the last two keyframes are adjacent, the first of them is dropped.

The published code indexes i-1 and i-2 with Python semantics, so for i = 0 and 1 those
wrap to the end of the demo. The wrap is kept: it decides keyframes on real data.
"""

from __future__ import annotations

import numpy as np

STOP_COOLDOWN = 4


def discover_keyframes(
    gripper_open: np.ndarray, joint_velocities: np.ndarray, velocity_tolerance: float = 0.1
) -> list[int]:
    """Keyframe indices of one demo from per-frame gripper state (T,) and joint speeds (T, J)."""
    gripper = [float(value) for value in np.asarray(gripper_open).reshape(-1)]
    speeds = np.abs(np.asarray(joint_velocities, dtype=np.float64))
    length = len(gripper)
    if speeds.shape[0] != length:
        raise ValueError(
            f"gripper_open has {length} frames but joint_velocities has {speeds.shape[0]}"
        )
    slow = np.all(speeds <= velocity_tolerance, axis=1) if length else np.zeros(0, bool)

    keyframes: list[int] = []
    previous_state = gripper[0] if length else 0.0
    cooldown = 0
    for i in range(length):
        gripper_steady = i < length - 2 and (
            gripper[i] == gripper[i + 1]
            and gripper[i] == gripper[i - 1]
            and gripper[i - 2] == gripper[i - 1]
        )
        stopped = cooldown <= 0 and bool(slow[i]) and i != length - 2 and gripper_steady
        cooldown = STOP_COOLDOWN if stopped else cooldown - 1
        if i != 0 and (gripper[i] != previous_state or i == length - 1 or stopped):
            keyframes.append(i)
        previous_state = gripper[i]

    if len(keyframes) > 1 and keyframes[-1] - 1 == keyframes[-2]:
        keyframes.pop(-2)
    return keyframes
