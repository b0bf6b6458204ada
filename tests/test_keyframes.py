"""The PerAct keyframe heuristic on real demos and hand-built edge cases."""

from __future__ import annotations

import numpy as np

from agnostos.shards.folders import discover_episodes, read_episode
from agnostos.shards.keyframes import discover_keyframes


def test_real_sample_keyframes(sample_root):
    episodes = [read_episode(location) for location in discover_episodes(sample_root)]
    assert [(e.num_frames, list(e.keyframes), e.variation) for e in episodes] == [
        (125, [70, 85, 124], 2),
        (108, [64, 77, 107], 1),
    ]


def _moving(frames: int) -> np.ndarray:
    return np.full((frames, 7), 0.5)


def test_gripper_change_and_last_frame_are_keyframes():
    gripper = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], float)
    assert discover_keyframes(gripper, _moving(10)) == [4, 9]


def test_stop_needs_slow_joints_and_steady_gripper_then_cools_down():
    velocities = _moving(20)
    velocities[5:12] = 0.0  # stopped for 7 frames: keyframe at 5, cooldown blocks 6..9
    keyframes = discover_keyframes(np.ones(20), velocities)
    assert keyframes == [5, 10, 19]


def test_tolerance_is_inclusive_at_0_1():
    velocities = _moving(12)
    velocities[6] = 0.1
    assert 6 in discover_keyframes(np.ones(12), velocities)
    velocities[6] = 0.1001
    assert 6 not in discover_keyframes(np.ones(12), velocities)


def test_adjacent_final_keyframes_drop_the_first():
    gripper = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], float)
    # gripper flips at 8, the last frame is 9: 8 is dropped
    assert discover_keyframes(gripper, _moving(10)) == [9]


def test_second_to_last_frame_never_counts_as_stopped():
    velocities = _moving(10)
    velocities[8] = 0.0
    assert discover_keyframes(np.ones(10), velocities) == [9]


def test_negative_index_wrap_is_preserved_for_frame_1():
    # Frame 1 looks back at frames 0 and -1 (the last frame). With the last frame's gripper
    # state different, frame 1 cannot be "stopped" even though its joints are still.
    velocities = _moving(10)
    velocities[1] = 0.0
    gripper_same = np.ones(10)
    gripper_end_differs = np.ones(10)
    gripper_end_differs[-1] = 0.0
    assert 1 in discover_keyframes(gripper_same, velocities)
    assert 1 not in discover_keyframes(gripper_end_differs, velocities)
