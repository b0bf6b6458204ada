"""The RLBench adapter (agnostos/envs/rlbench.py) against a fake of the RLBench/PyRep API.

The fake (tests/fake_rlbench/) is put on sys.path by the `fake_rlbench` fixture only; it
follows the PerAct fork's module paths, signatures and observation attributes, logs the
calls it receives and can inject the failures a real CoppeliaSim produces. None of this
runs CoppeliaSim.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agnostos.envs.protocol import SimulatorError, check_action
from agnostos.envs.rlbench import (
    UNAVAILABLE_MESSAGE,
    RLBenchEnv,
    RLBenchUnavailable,
    depth_from_point_cloud,
    mask_handles,
)
from agnostos.shards import codecs
from agnostos.shards.episode import CAMERAS
from agnostos.shards.folders import discover_episodes, read_episode
from agnostos.shards.synthetic import SyntheticSpec, write_synthetic_episode

FAKE = Path(__file__).resolve().parent / "fake_rlbench"
REPO = Path(__file__).resolve().parents[1]
REAL_RLBENCH = importlib.util.find_spec("rlbench") is not None
HOME_ACTION = np.array([0.3, 0.0, 1.1, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])


def _purge() -> None:
    for name in [name for name in sys.modules if name.split(".")[0] in ("rlbench", "pyrep")]:
        del sys.modules[name]


@pytest.fixture
def fake_rlbench(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake `rlbench` and `pyrep` packages, importable for this test only."""
    _purge()
    monkeypatch.syspath_prepend(str(FAKE))
    yield FAKE
    _purge()


@pytest.fixture
def env(fake_rlbench: Path):
    environment = RLBenchEnv()
    yield environment
    environment.close()


def _episodes(root: Path) -> list:
    return [
        read_episode(loc.path, cameras=(), check_frames=False) for loc in discover_episodes(root)
    ]


def _same_state(first: tuple, second: tuple) -> bool:
    return (
        first[0] == second[0]
        and np.array_equal(first[1], second[1])
        and tuple(first[2:]) == tuple(second[2:])
    )


def _expected_placement(episode, task) -> tuple[float, float, float]:
    """The fake scene's box pose drawn from the stored RNG state (x, y, then yaw)."""
    rng = np.random.RandomState()
    rng.set_state(episode.random_state.as_tuple())
    x = rng.uniform(task.spawn_low[0], task.spawn_high[0])
    y = rng.uniform(task.spawn_low[1], task.spawn_high[1])
    low, high = task.base_rotation_bounds()
    return x, y, rng.uniform(low[2], high[2])


def _calls_since_last(fake, name: str) -> list[str]:
    names = fake.names()
    start = len(names) - 1 - names[::-1].index(name)
    return names[start:]


# -- setup ------------------------------------------------------------------------------------


def test_environment_action_mode_and_observation_config_are_xicms(env: RLBenchEnv) -> None:
    from pyrep.const import RenderMode
    from rlbench.action_modes.action_mode import MoveArmThenGripper
    from rlbench.action_modes.arm_action_modes import EndEffectorPoseViaPlanning
    from rlbench.action_modes.gripper_action_modes import Discrete

    fake = env.env.fake
    (created,) = fake.details("Environment")
    assert created["headless"] is True and created["dataset_root"] == ""
    assert created["action_mode"] is env.action_mode and created["obs_config"] is env.obs_config
    assert fake.names()[:2] == ["Environment", "launch"]
    assert env.env._pyrep.launched and env.env._pyrep.headless is True

    mode = env.action_mode
    assert type(mode) is MoveArmThenGripper
    assert type(mode.arm_action_mode) is EndEffectorPoseViaPlanning
    assert type(mode.gripper_action_mode) is Discrete
    arm = mode.arm_action_mode
    assert (arm._absolute_mode, arm._frame, arm._collision_checking) == (True, "world", False)

    config = env.obs_config
    used = [getattr(config, f"{camera}_camera") for camera in CAMERAS]
    assert all(camera is used[0] for camera in used)  # one shared CameraConfig, as X-ICM
    camera = used[0]
    assert (camera.rgb, camera.point_cloud, camera.mask, camera.depth) == (True, True, True, False)
    assert tuple(camera.image_size) == (128, 128)
    assert camera.render_mode is RenderMode.OPENGL and camera.masks_as_one_channel
    assert (config.joint_positions, config.joint_velocities, config.gripper_pose) == (True,) * 3
    assert (config.gripper_open, config.gripper_matrix, config.gripper_joint_positions) == (
        True,
    ) * 3
    assert not (config.joint_forces or config.task_low_dim_state or config.gripper_touch_forces)


def test_unused_cameras_are_switched_off_and_sizes_follow_image_size(fake_rlbench, sample_root):
    env = RLBenchEnv(image_size=64, cameras=("front", "wrist"))
    try:
        for camera in ("left_shoulder", "right_shoulder", "overhead"):
            config = getattr(env.obs_config, f"{camera}_camera")
            assert not (config.rgb or config.depth or config.point_cloud or config.mask)
        assert tuple(env.obs_config.front_camera.image_size) == (64, 64)
        episode = _episodes(sample_root)[0]
        observation = env.reset_to_episode(episode)
        assert sorted(observation.cameras) == ["front", "wrist"]
        assert observation.cameras["front"].rgb.shape == (64, 64, 3)
        assert observation.cameras["wrist"].mask.shape == (64, 64)
        raw = env.task_env.get_observation()
        assert "overhead_camera_extrinsics" not in raw.misc  # removed sensors have no misc
        assert raw.overhead_rgb is None and raw.overhead_mask is None
    finally:
        env.close()


def test_constructor_rejects_bad_arguments(fake_rlbench, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown camera"):
        RLBenchEnv(cameras=("front", "side"))
    with pytest.raises(ValueError, match="image_size"):
        RLBenchEnv(image_size=0)
    with pytest.raises(FileNotFoundError, match="test data folder"):
        RLBenchEnv(test_data=tmp_path / "missing")


def test_the_evaluator_worker_builds_it_with_the_suite_settings(fake_rlbench) -> None:
    from agnostos.evaluation.worker import make_environment

    env = make_environment("rlbench", 32, ["front", "overhead"])
    try:
        assert isinstance(env, RLBenchEnv)
        assert env.cameras == ("front", "overhead") and env.image_size == 32
        assert tuple(env.obs_config.overhead_camera.image_size) == (32, 32)
    finally:
        env.close()


def test_close_shuts_coppeliasim_down_once(fake_rlbench) -> None:
    env = RLBenchEnv()
    fake, pyrep = env.env.fake, env.env._pyrep
    env.close()
    env.close()
    assert fake.names().count("shutdown") == 1 and not pyrep.launched


# -- reset: the stored scene -------------------------------------------------------------------


def _check_restored(env: RLBenchEnv, episode) -> None:
    fake = env.env.fake
    assert _calls_since_last(fake, "set_variation") == [
        "set_variation",
        "reset_to_demo",
        "reset",
        "place",
        "get_task_descriptions",
        "get_observation",
    ]
    assert fake.details("set_variation")[-1]["v"] == episode.variation
    restored = fake.details("reset_to_demo")[-1]
    assert restored["variation_number"] == episode.variation
    assert _same_state(restored["random_seed"], episode.random_state.as_tuple())
    # reset() ran with the global RNG set to the stored state (Demo.restore_state) ...
    assert _same_state(fake.details("reset")[-1]["rng_state"], episode.random_state.as_tuple())
    assert fake.details("reset")[-1]["variation"] == episode.variation
    # ... so the scene is the stored one.
    scene = env.env._scene
    np.testing.assert_allclose(scene.placement, _expected_placement(episode, scene.task))
    assert env.variation == episode.variation
    assert env.task_name == episode.task


def test_reset_to_each_real_sample_episode_restores_its_variation_and_rng_state(
    env: RLBenchEnv, sample_root: Path
) -> None:
    episodes = _episodes(sample_root)
    assert len(episodes) == 2 and {e.variation for e in episodes} == {1, 2}
    placements = []
    for episode in episodes:
        observation = env.reset_to_episode(episode)
        _check_restored(env, episode)
        # the fake open_drawer has the real task's descriptions: X-ICM's instruction, which
        # get_task_descriptions()[0] gives, is the stored episode's first description
        assert observation.instruction == episode.descriptions[0] == env.instruction
        assert env.descriptions == episode.descriptions
        placements.append(env.env._scene.placement)
    assert placements[0] != placements[1]
    assert env.env.fake.names().count("get_task") == 1  # one TaskEnvironment per task


def test_resetting_the_same_episode_twice_gives_the_same_scene(env, sample_root) -> None:
    episode = _episodes(sample_root)[0]
    first = env.reset_to_episode(episode)
    env.step(np.array([0.25, 0.1, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]))
    second = env.reset_to_episode(episode)
    for camera in CAMERAS:
        np.testing.assert_array_equal(first.cameras[camera].rgb, second.cameras[camera].rgb)
        np.testing.assert_array_equal(first.cameras[camera].mask, second.cameras[camera].mask)
        np.testing.assert_array_equal(first.cameras[camera].depth, second.cameras[camera].depth)
    np.testing.assert_array_equal(first.gripper_pose, second.gripper_pose)


def test_reset_to_synthetic_episodes_switches_tasks(env, synthetic_root: Path) -> None:
    episodes = _episodes(synthetic_root)
    assert {e.task for e in episodes} == {"pick_block", "push_block"}
    for episode in episodes:
        observation = env.reset_to_episode(episode)
        _check_restored(env, episode)
        assert observation.instruction == episode.descriptions[0]
        assert observation.mask_names[57] == "block"
    tasks = [details["task_class"].__name__ for details in env.env.fake.details("get_task")]
    assert tasks == ["PickBlock", "PushBlock"]


def test_with_test_data_the_demo_is_loaded_as_xicm_loads_it(fake_rlbench, synthetic_root):
    episode = _episodes(synthetic_root)[1]
    plain = RLBenchEnv()
    try:
        plain.reset_to_episode(episode)
        placement = plain.env._scene.placement
    finally:
        plain.close()
    env = RLBenchEnv(test_data=synthetic_root)
    try:
        assert env.env.fake.details("Environment")[0]["dataset_root"] == str(synthetic_root)
        env.reset_to_episode(episode)
        fake = env.env.fake
        assert [d["v"] for d in fake.details("set_variation")] == [-1, episode.variation]
        (loaded,) = fake.details("get_demos")
        assert loaded == {
            "amount": 1,
            "live_demos": False,
            "image_paths": True,
            "random_selection": False,
            "from_episode_number": episode.episode,
            "variation_number": -1,
        }
        restored = fake.details("reset_to_demo")[-1]
        assert restored["observations"] == episode.num_frames  # the stored pickle itself
        assert restored["variation_number"] == episode.variation
        assert env.env._scene.placement == placement  # the same scene either way
        observation = env.reset(episode.task, episode.variation, episode.episode)
        assert observation.instruction == episode.descriptions[0]
        with pytest.raises(ValueError, match="stored variation"):
            env.reset(episode.task, episode.variation + 1, episode.episode)
    finally:
        env.close()


def test_test_data_that_does_not_hold_the_episode_is_refused(fake_rlbench, tmp_path: Path):
    root = tmp_path / "test"
    for number in (0, 2):
        write_synthetic_episode(root, SyntheticSpec(episode=number, variation=number % 3))
    other = read_episode(
        write_synthetic_episode(tmp_path / "other", SyntheticSpec(episode=0, seed=7)),
        cameras=(),
        check_frames=False,
    )
    env = RLBenchEnv(test_data=root)
    try:
        with pytest.raises(ValueError, match="is not this episode"):
            env.reset_to_episode(other)  # episode0 of another data set
        shifted = read_episode(
            root / "pick_block/all_variations/episodes/episode2", cameras=(), check_frames=False
        )
        with pytest.raises(ValueError, match="no stored demo at position 2"):
            env.reset_to_episode(shifted)  # natsorted position 2 does not exist
        folder = root / "pick_block/all_variations/episodes/episode0"
        first = read_episode(folder, cameras=(), check_frames=False)
        (folder / "front_depth/0.png").unlink()
        with pytest.raises(ValueError, match="Broken dataset assumption"):
            env.reset_to_episode(first)
        shutil.rmtree(folder / "wrist_rgb")
        with pytest.raises(ValueError, match=r"cannot load stored demo 0 .*wrist_rgb"):
            env.reset_to_episode(first)
    finally:
        env.close()


def test_reset_refuses_episodes_it_cannot_restore(env, sample_root) -> None:
    episode = _episodes(sample_root)[0]
    with pytest.raises(ValueError, match="no random state"):
        env.reset_to_episode(dataclasses.replace(episode, random_state=None))
    with pytest.raises(ValueError, match=r"variation 3 outside 0\.\.2"):
        env.reset_to_episode(dataclasses.replace(episode, variation=3))
    with pytest.raises(ValueError, match="unknown RLBench task 'no_such_task'"):
        env.reset_to_episode(dataclasses.replace(episode, task="no_such_task"))
    with pytest.raises(ValueError, match="needs test_data"):
        env.reset("open_drawer", 2, 0)


# -- errors ------------------------------------------------------------------------------------


def test_a_coppeliasim_failure_during_reset_is_a_simulator_error(env, sample_root) -> None:
    episode = _episodes(sample_root)[0]
    fake = env.env.fake
    fake.reset_error = RuntimeError("The call failed on the V-REP side. Return value: -1")
    with pytest.raises(SimulatorError, match="RuntimeError: The call failed on the V-REP side"):
        env.reset_to_episode(episode)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(HOME_ACTION)
    fake.reset_error = None
    fake.placement_error = True
    with pytest.raises(SimulatorError, match="TaskEnvironmentError: Could not place the task"):
        env.reset_to_episode(episode)
    fake.placement_error = False
    assert env.reset_to_episode(episode).instruction == episode.descriptions[0]


@pytest.mark.parametrize(
    ("error_name", "message"),
    [("IKError", "IK failed to converge"), ("ConfigurationPathError", "Could not create path.")],
)
def test_planner_errors_end_the_episode_as_a_failure(env, sample_root, error_name, message):
    import pyrep.errors

    start = env.reset_to_episode(_episodes(sample_root)[0])
    env.env.fake.step_errors = {2: getattr(pyrep.errors, error_name)(message)}
    first = env.step(HOME_ACTION)
    assert (first.success, first.terminal, first.error) == (False, False, None)
    failed = env.step(HOME_ACTION)
    assert (failed.success, failed.terminal) == (False, True)
    assert failed.error == f"{error_name}: {message}"
    assert failed.observation is first.observation  # the last good one, as X-ICM keeps
    assert first.observation is not start
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(HOME_ACTION)


def test_invalid_actions_end_the_episode_with_rlbenchs_message(env, sample_root) -> None:
    episode = _episodes(sample_root)[0]
    env.reset_to_episode(episode)
    outside = HOME_ACTION.copy()
    outside[2] = 3.0
    result = env.step(outside)
    assert (result.success, result.terminal) == (False, True)
    assert result.error == (
        "InvalidActionError: A path could not be found because the target is outside of workspace."
    )
    env.reset_to_episode(episode)
    env.env.fake.unreachable = True  # OMPL finds no path: RLBench raises InvalidActionError
    result = env.step(HOME_ACTION)
    assert result.terminal and result.error.startswith(
        "InvalidActionError: A path could not be found. Most likely due to the target"
    )
    env.env.fake.unreachable = False
    env.reset_to_episode(episode)
    steps = env.env.fake.names().count("step")
    result = env.step(HOME_ACTION[:8])  # malformed: refused before RLBench sees it
    assert (
        result.terminal and result.error == "InvalidActionError: action must have 9 values, got 8"
    )
    assert env.env.fake.names().count("step") == steps


def test_a_runtime_error_while_stepping_is_a_simulator_error(env, sample_root) -> None:
    env.reset_to_episode(_episodes(sample_root)[0])
    env.env.fake.step_errors = {1: RuntimeError("The call failed on the V-REP side.")}
    with pytest.raises(SimulatorError, match="V-REP side"):
        env.step(HOME_ACTION)


def test_success_and_task_failure_end_the_episode(env, sample_root) -> None:
    episode = _episodes(sample_root)[0]
    env.reset_to_episode(episode)
    env.env.fake.succeed_after = 2
    first, second = env.step(HOME_ACTION), env.step(HOME_ACTION)
    assert (first.success, first.terminal) == (False, False)
    assert (second.success, second.terminal, second.error) == (True, True, None)
    env.env.fake.succeed_after = None
    env.env.fake.fail_after = 1
    env.reset_to_episode(episode)
    failed = env.step(HOME_ACTION)
    assert (failed.success, failed.terminal, failed.error) == (False, True, None)


# -- observations ------------------------------------------------------------------------------


def test_observation_conversion_matches_rlbenchs_observation(env, sample_root) -> None:
    observation = env.reset_to_episode(_episodes(sample_root)[0])
    raw = env.task_env.get_observation()
    scene = env.env._scene
    assert sorted(observation.cameras) == sorted(CAMERAS)
    for camera in CAMERAS:
        frame = observation.cameras[camera]
        raw_mask = getattr(raw, f"{camera}_mask")
        assert raw_mask.dtype == np.float32 and raw_mask.ndim == 2  # rgb_handles_to_mask
        assert getattr(raw, f"{camera}_depth") is None  # depth=False, as X-ICM
        assert frame.rgb.shape == (128, 128, 3) and frame.rgb.dtype == np.uint8
        np.testing.assert_array_equal(frame.rgb, getattr(raw, f"{camera}_rgb"))
        assert frame.depth.shape == (128, 128) and frame.depth.dtype == np.float32
        assert frame.mask.shape == (128, 128) and frame.mask.dtype == np.int32
        depth, handles = scene.ground_truth(camera)
        np.testing.assert_allclose(frame.depth, depth, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(frame.mask, handles)
        assert set(np.unique(frame.mask)) == {45, 302}  # 302 > 255 uses the green byte
        for part in ("intrinsics", "extrinsics"):
            np.testing.assert_array_equal(getattr(frame, part), raw.misc[f"{camera}_camera_{part}"])
        assert (frame.near, frame.far) == (
            raw.misc[f"{camera}_camera_near"],
            raw.misc[f"{camera}_camera_far"],
        )
        assert frame.intrinsics[0, 0] < 0  # RLBench's negative focal lengths, unchanged
        np.testing.assert_allclose(
            frame.point_cloud(), getattr(raw, f"{camera}_point_cloud"), atol=1e-6
        )
    assert observation.mask_names == {45: "diningTable_visible", 302: "drawer_frame"}
    assert all(type(handle) is int for handle in observation.mask_names)
    np.testing.assert_array_equal(observation.gripper_pose, raw.gripper_pose)
    assert observation.gripper_open == 1.0
    np.testing.assert_array_equal(observation.joint_positions, raw.joint_positions)
    np.testing.assert_array_equal(observation.joint_velocities, raw.joint_velocities)
    assert sorted(observation.low_dim) == [
        "gripper_joint_positions",
        "gripper_matrix",
        "ignore_collisions",
    ]
    assert observation.low_dim["gripper_matrix"].shape == (4, 4)


def test_step_sends_the_checked_action_and_observes_the_result(env, sample_root) -> None:
    env.reset_to_episode(_episodes(sample_root)[0])
    action = np.array([0.35, -0.1, 1.05, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0])  # quaternion norm 2
    result = env.step(action)
    (sent,) = [d["action"] for d in env.env.fake.details("step")]
    np.testing.assert_array_equal(sent, check_action(action))
    assert sent.shape == (9,) and np.isclose(np.linalg.norm(sent[3:7]), 1.0)
    np.testing.assert_allclose(result.observation.gripper_pose[:3], action[:3])
    assert result.observation.gripper_open == 0.0  # Discrete closed the gripper
    assert result.observation.low_dim["ignore_collisions"] == 1.0
    # the wrist camera moved with the gripper
    np.testing.assert_allclose(
        result.observation.cameras["wrist"].extrinsics[:3, 3], action[:3], atol=1e-12
    )


def test_mask_handles_and_depth_from_point_cloud() -> None:
    handles = np.array([[0, 45], [302, 2**24 - 1]])
    coded = codecs.mask_to_rgb(handles)
    np.testing.assert_array_equal(mask_handles(coded), handles)
    np.testing.assert_array_equal(mask_handles(coded.astype(np.float32) / 255.0), handles)
    np.testing.assert_array_equal(mask_handles(handles.astype(np.float32) + 1e-3), handles)
    with pytest.raises(ValueError, match="mask shape"):
        mask_handles(np.zeros((2, 2, 4)))
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    extrinsics = np.eye(4)
    extrinsics[:3, :3], extrinsics[:3, 3] = rotation, rng.normal(size=3)
    intrinsics = np.array([[-50.0, 0, 16], [0, -50.0, 16], [0, 0, 1]])
    depth = rng.uniform(0.5, 3.0, size=(32, 32)).astype(np.float32)
    points = codecs.point_cloud(depth, intrinsics, extrinsics)
    np.testing.assert_allclose(depth_from_point_cloud(points, extrinsics), depth, rtol=1e-6)


# -- imports -----------------------------------------------------------------------------------


def _python(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    paths = [str(extra_path)] if extra_path is not None else []
    environment["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO)])
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.skipif(REAL_RLBENCH, reason="a real rlbench is installed in this environment")
def test_without_rlbench_the_constructor_raises_rlbench_unavailable() -> None:
    result = _python(
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('rlbench') is None, 'the fake leaked onto sys.path'\n"
        "from agnostos.envs.rlbench import RLBenchEnv, RLBenchUnavailable\n"
        "try:\n"
        "    RLBenchEnv()\n"
        "except RLBenchUnavailable as error:\n"
        "    assert isinstance(error, ImportError)\n"
        "    print('UNAVAILABLE:', error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert f"UNAVAILABLE: {UNAVAILABLE_MESSAGE}" in result.stdout
    assert "ModuleNotFoundError" in result.stdout


def test_a_broken_pyrep_under_rlbench_is_also_rlbench_unavailable() -> None:
    # rlbench is importable but pyrep is not (as when libcoppeliaSim.so cannot be loaded)
    result = _python(
        "import sys\n"
        "sys.modules['pyrep'] = None\n"
        "from agnostos.envs.rlbench import RLBenchEnv, RLBenchUnavailable\n"
        "try:\n"
        "    RLBenchEnv()\n"
        "except RLBenchUnavailable as error:\n"
        "    print('UNAVAILABLE:', error)\n",
        extra_path=FAKE,
    )
    assert result.returncode == 0, result.stderr
    assert "UNAVAILABLE: the rlbench backend needs CoppeliaSim 4.1.0" in result.stdout
    assert "docs/rlbench.md" in result.stdout and "pyrep" in result.stdout
    assert issubclass(RLBenchUnavailable, ImportError)


def test_importing_the_adapter_imports_neither_rlbench_nor_pyrep() -> None:
    result = _python(
        "import sys\n"
        "import agnostos.envs.rlbench as adapter\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('rlbench', 'pyrep')))\n"
        "env = adapter.RLBenchEnv(image_size=16, cameras=('front',))\n"
        "print('rlbench' in sys.modules, 'pyrep' in sys.modules)\n"
        "env.close()\n",
        extra_path=FAKE,  # importable, so only the adapter's laziness keeps them out
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "True True"]
