"""minibench: real MuJoCo physics and rendering, checked against RLBench's conventions."""

from __future__ import annotations

from pathlib import Path

import mujoco
import numpy as np
import pytest

from agnostos.cli import main as cli
from agnostos.envs.minibench.env import MiniBenchEnv
from agnostos.envs.minibench.generate import SUMMARY_NAME, demo_problem, generate, record_demo
from agnostos.envs.minibench.tasks import TASKS
from agnostos.shards.codecs import decode_png
from agnostos.shards.convert import convert, shard_urls
from agnostos.shards.folders import discover_episodes, read_episode
from agnostos.shards.reading import iter_episodes
from agnostos.shards.verify import verify
from agnostos.tasks import MINIBENCH, get_suite

ALL_TASKS = sorted(TASKS)
SEEDS_PER_TASK = 4


@pytest.fixture(scope="module")
def physics_env():
    env = MiniBenchEnv(render=False)
    yield env
    env.close()


@pytest.fixture(scope="module")
def camera_env():
    env = MiniBenchEnv()
    yield env
    env.close()


def test_suite_registration_matches_the_tasks():
    suite = get_suite("minibench")
    assert suite is MINIBENCH
    assert set(suite.all_tasks) == set(TASKS)
    assert len(suite.seen) >= 6 and len(suite.unseen) >= 6
    assert set(suite.levels) == {"level1", "level2"}
    for name, task in TASKS.items():
        geoms = {task_geom for task_geom in task.object_names}
        assert geoms, name
        assert task.variations >= 3
        for variation in range(task.variations):
            assert len(set(task.descriptions(variation))) >= 3


@pytest.mark.parametrize("task", ALL_TASKS)
def test_scripted_demo_succeeds_and_keyframes_are_the_waypoints(physics_env, task):
    variations = TASKS[task].variations
    for episode in range(SEEDS_PER_TASK):
        demo = record_demo(physics_env, task, episode % variations, episode, seed=0, attempt=0)
        assert demo.success, (task, episode, demo.error)
        assert demo_problem(demo) is None, (task, episode)
        # Success stops the script early, so some tasks need fewer than all their actions.
        assert 1 <= len(demo.keyframes) <= len(physics_env.scripted_actions())


@pytest.mark.parametrize("task", ALL_TASKS)
def test_doing_nothing_fails(physics_env, task):
    observation = physics_env.reset(task, 0, 0)
    hold = np.concatenate([observation.gripper_pose, [1.0, 0.0]])
    for _ in range(3):
        result = physics_env.step(hold)
        assert not result.success and not result.terminal and result.error is None
    assert not physics_env.success()


def test_reset_is_deterministic_in_task_variation_episode():
    first, second = MiniBenchEnv(), MiniBenchEnv()
    try:
        a = first.reset("stack_blocks", 3, 7)
        b = second.reset("stack_blocks", 3, 7)
        c = second.reset("stack_blocks", 3, 8)
    finally:
        first.close()
        second.close()
    for camera in a.cameras:
        assert a.cameras[camera].rgb.tobytes() == b.cameras[camera].rgb.tobytes()
        assert a.cameras[camera].depth.tobytes() == b.cameras[camera].depth.tobytes()
        assert np.array_equal(a.cameras[camera].mask, b.cameras[camera].mask)
    assert a.instruction == b.instruction == "stack the green block on the red block"
    assert a.cameras["front"].rgb.tobytes() != c.cameras["front"].rgb.tobytes()


def _signed_distance(model: mujoco.MjModel, data: mujoco.MjData, geom: int, points) -> np.ndarray:
    """Distance of world points from a primitive geom's surface (negative inside)."""
    local = (points - data.geom_xpos[geom]) @ data.geom_xmat[geom].reshape(3, 3)
    size = model.geom_size[geom]
    kind = int(model.geom_type[geom])
    if kind == int(mujoco.mjtGeom.mjGEOM_SPHERE):
        return np.linalg.norm(local, axis=1) - size[0]
    if kind == int(mujoco.mjtGeom.mjGEOM_BOX):
        excess = np.abs(local) - size
        outside = np.linalg.norm(np.maximum(excess, 0), axis=1)
        return outside + np.minimum(excess.max(axis=1), 0)
    if kind == int(mujoco.mjtGeom.mjGEOM_CYLINDER):
        excess = np.stack(
            [np.linalg.norm(local[:, :2], axis=1) - size[0], np.abs(local[:, 2]) - size[1]], 1
        )
        return np.linalg.norm(np.maximum(excess, 0), axis=1) + np.minimum(excess.max(axis=1), 0)
    if kind == int(mujoco.mjtGeom.mjGEOM_CAPSULE):
        along = np.clip(local[:, 2], -size[1], size[1])
        offset = local - np.stack([np.zeros_like(along), np.zeros_like(along), along], 1)
        return np.linalg.norm(offset, axis=1) - size[0]
    raise AssertionError(f"unexpected geom type {kind}")


@pytest.mark.parametrize("task", ALL_TASKS)
def test_point_clouds_put_every_object_where_mujoco_has_it(camera_env, task):
    """Each object's masked points (five cameras, RLBench conventions, our point-cloud code)
    lie on its MuJoCo surface within 1 cm, and their centroid within 1 cm of its extent."""
    observation = camera_env.reset(task, 0, 0)
    loaded = camera_env._current
    model, data = loaded.scene.model, loaded.data
    checked = 0
    for name in TASKS[task].object_names:
        geom = model.geom(name).id
        clouds = []
        for frame in observation.cameras.values():
            selected = frame.mask == geom + 1
            if selected.any():
                clouds.append(frame.point_cloud()[selected])
        if not clouds:
            continue
        points = np.concatenate(clouds)
        distance = np.abs(_signed_distance(model, data, geom, points))
        assert np.quantile(distance, 0.98) < 0.01, (task, name, np.quantile(distance, 0.98))
        extent = float(np.linalg.norm(model.geom_size[geom]))
        centroid_gap = np.linalg.norm(points.mean(0) - data.geom_xpos[geom])
        assert centroid_gap < extent + 0.01, (task, name, centroid_gap)
        checked += 1
    assert checked >= 1
    table = model.geom("table").id + 1
    front = observation.cameras["front"]
    assert np.allclose(front.point_cloud()[front.mask == table][:, 2], 0.75, atol=0.002)


def test_invalid_actions_end_the_episode_with_an_error(physics_env):
    physics_env.reset("push_button", 0, 0)
    result = physics_env.step(np.array([0.69, 0.49, 1.55, 1, 0, 0, 0, 1, 0]))
    assert result.terminal and not result.success
    assert "unreachable" in result.error
    with pytest.raises(RuntimeError, match="after the episode ended"):
        physics_env.step(np.array([0.1, 0, 1.0, 1, 0, 0, 0, 1, 0]))
    physics_env.reset("push_button", 0, 0)
    outside = physics_env.step(np.array([2.0, 0, 1.0, 1, 0, 0, 0, 1, 0]))
    assert outside.terminal and "outside the workspace" in outside.error
    physics_env.reset("push_button", 0, 0)
    malformed = physics_env.step(np.zeros(8))
    assert malformed.terminal and "9 values" in malformed.error


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("minibench")
    tasks = ("pick_up_block", "close_box_lid")
    status = cli(
        [
            "sim",
            "generate",
            "--tasks",
            ",".join(tasks),
            "--episodes",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0
    return out, tasks


def test_generated_demos_read_convert_and_keep_their_keyframes(generated, physics_env, tmp_path):
    out, tasks = generated
    assert (out / SUMMARY_NAME).is_file()
    locations = discover_episodes(out)
    assert [(loc.task, loc.episode) for loc in locations] == [
        (task, n) for task in sorted(tasks) for n in range(2)
    ]
    for location in locations:
        episode = read_episode(location)
        assert episode.variation == location.episode % TASKS[location.task].variations
        assert episode.descriptions == TASKS[location.task].descriptions(episode.variation)
        assert episode.rgb("front", 0).shape == (128, 128, 3)
        assert set(episode.cameras) == {
            "front",
            "left_shoulder",
            "right_shoulder",
            "overhead",
            "wrist",
        }
        # The scripted waypoints are what the PerAct heuristic finds on the stored demo.
        demo = record_demo(physics_env, location.task, episode.variation, location.episode, 0, 0)
        assert list(episode.keyframes) == demo.keyframes
        assert episode.num_frames == len(demo.frames)
        names = set(episode.mask_names["front"].values())
        assert names & set(TASKS[location.task].object_names)
    result = convert(out, tmp_path / "shards", show_progress=False)
    assert result.manifest.to_json()["totals"]["episodes"] == 4
    assert verify(tmp_path / "shards").ok
    loaded = {episode.key: episode for episode in iter_episodes(shard_urls(tmp_path / "shards"))}
    assert loaded["pick_up_block/all_variations/episode1"].instruction.startswith("pick up the")


def test_reset_to_a_stored_demo_rebuilds_its_scene(generated, camera_env):
    out, _ = generated
    location = next(loc for loc in discover_episodes(out) if loc.task == "pick_up_block")
    episode = read_episode(location)
    observation = camera_env.reset_to_state(
        episode.task, episode.variation, episode.random_state.as_tuple()
    )
    for camera in ("front", "wrist"):
        assert np.array_equal(
            observation.cameras[camera].rgb, decode_png(episode.png(camera, "rgb", 0))
        )
    stored_depth = episode.depth("front", 0)
    assert np.allclose(observation.cameras["front"].depth, stored_depth, atol=1e-4)


def test_generate_resumes_and_refuses_unknown_tasks(generated, capsys):
    out, tasks = generated
    before = {p: p.stat().st_mtime_ns for p in out.rglob("low_dim_obs.pkl")}
    summary = generate(tasks, 2, out, progress=False)
    assert all(record.written == 0 and record.already_present == 2 for record in summary.values())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("low_dim_obs.pkl")} == before
    assert (
        cli(["sim", "generate", "--tasks", "fly_away", "--episodes", "1", "--out", str(out)]) == 2
    )
    assert "unknown minibench task 'fly_away'" in capsys.readouterr().err


def test_sim_tasks_and_render(tmp_path, capsys):
    assert cli(["sim", "tasks"]) == 0
    listing = capsys.readouterr().out
    assert "close_box_lid" in listing and "level2" in listing and "seen" in listing
    out = tmp_path / "views.png"
    assert cli(["sim", "render", "open_drawer", "--variation", "2", "--out", str(out)]) == 0
    grid = decode_png(out.read_bytes())
    assert grid.shape == (128 + 14, 5 * 128, 3)


def test_the_per_process_scene_folder_is_removed_at_exit() -> None:
    import subprocess
    import sys

    code = "from agnostos.envs.minibench.scene import _scratch_dir; print(_scratch_dir())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    folder = Path(out.stdout.strip())
    assert folder.name.startswith("agnostos-minibench-")
    assert not folder.exists()
