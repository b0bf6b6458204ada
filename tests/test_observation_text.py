"""X-ICM observation and demo text: golden strings on real and synthetic episodes, checked
against an independent port of X-ICM's own pipeline (PIL decodes, PyRep back-projection)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agnostos.envs.protocol import CameraFrame, Observation
from agnostos.observation_text import (
    XICM_CODEC,
    DemoText,
    episode_demo_text,
    episode_observation_text,
    format_actions,
    format_observation,
    frame_mask_names,
    frame_observation_text,
    keyframe_actions,
    merge_mask_names,
    object_voxels,
    observation_text,
    task_object_names,
)
from agnostos.shards import codecs
from agnostos.shards.episode import Episode, FrameStore
from agnostos.shards.folders import discover_episodes, read_episode
from agnostos.tasks import AGNOSTOS_OBJECT_NAMES, MINIBENCH_OBJECT_NAMES

# --- an independent reference: X-ICM's form_obs over raw files -----------------------------


def _xicm_depth(path: Path, near: float, far: float) -> np.ndarray:
    """RLBench `_image_to_float_array` (float64, R the high byte), then near/far."""
    pixels = np.array(Image.open(path))
    normalised = np.sum(pixels * [65536, 256, 1], axis=2) / (2**24 - 1)
    return (far - near) * normalised + near


def _pyrep_point_cloud(depth: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray):
    """PyRep's `pointcloud_from_depth_and_camera_params`: invert the 4x4 projection and
    apply it as its `_transform` does, (3x4) @ (4xN)."""
    height, width = depth.shape
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    uniform = np.stack([cols, rows, np.ones_like(cols)], axis=-1).astype(np.float32)
    pixels = uniform * depth[..., None]
    rotation_inv = extrinsics[:3, :3].T
    centre = np.expand_dims(extrinsics[:3, 3], 0).T
    view = np.concatenate([rotation_inv, -np.matmul(rotation_inv, centre)], axis=-1)
    projection = np.concatenate([np.matmul(intrinsics, view), [np.array([0, 0, 0, 1])]])
    inverse = np.linalg.inv(projection)[:3]
    homogeneous = np.concatenate([pixels, np.ones((height, width, 1))], axis=-1)
    world = np.matmul(inverse, homogeneous.reshape(-1, 4).T).T
    return world.reshape(height, width, 3)


def _roboprompt_voxel(point: np.ndarray) -> np.ndarray:
    bounds = np.array([-0.3, -0.5, 0.6, 0.7, 0.5, 1.6])
    mins, maxs = bounds[None, :3], bounds[None, 3:]
    res = (maxs - mins) / (np.array([100] * 3) + 1e-12)
    index = np.floor((point - mins) / (res + 1e-12)).astype(np.int32)
    return np.minimum(index, np.array([99] * 3)[None]).reshape(point.shape)


def xicm_reference(
    episode: Episode, folder: Path, handles: dict[int, str], names: dict[str, str]
) -> dict:
    """X-ICM's `form_obs` dict for frame 0, values left as numpy ints like the original."""
    cameras = ("front", "left_shoulder", "right_shoulder", "overhead", "wrist")
    masks, clouds = {}, {}
    for camera in cameras:
        rgb = np.array(Image.open(folder / f"{camera}_mask" / "0.png"), dtype=int)
        masks[camera] = rgb[:, :, 0] + rgb[:, :, 1] * 256 + rgb[:, :, 2] * 256 * 256
        params = episode.cameras[camera]
        depth = _xicm_depth(folder / f"{camera}_depth" / "0.png", params.near[0], params.far[0])
        clouds[camera] = _pyrep_point_cloud(depth, params.extrinsics[0], params.intrinsics[0])
    id_to_real = {i: names[n] for i, n in handles.items() if n in names}
    result = {}
    for mask_id in np.unique(np.concatenate(list(masks.values()), axis=0)):
        if mask_id not in id_to_real:
            continue
        means = [
            np.mean(clouds[c][masks[c] == mask_id].reshape(-1, 3), axis=0)
            for c in cameras
            if np.any(masks[c] == mask_id)
        ]
        result[id_to_real[mask_id]] = list(_roboprompt_voxel(sum(means) / len(means)))
    return result


# --- real RLBench episodes ------------------------------------------------------------------

# The sample predates X-ICM's fork and stores no handle names, so the test names handles
# itself: every handle gets a simulator name, a chosen few a prompt name (10 is the floor,
# below the scene bounds, hence the negative z).
NAMED_HANDLES = (10, 31, 48, 52, 96, 103, 111, 123)
REAL_GOLDEN = {
    0: "['instruction': open the top drawer, {'thing 10': [60, 51, -60], 'thing 31': "
    "[57, 44, 88], 'thing 48': [59, 53, 15], 'thing 52': [83, 52, 15], 'thing 96': "
    "[50, 46, 58], 'thing 103': [38, 46, 17]}]",
    1: "['instruction': open the middle drawer, {'thing 10': [60, 56, -60], 'thing 31': "
    "[57, 44, 88], 'thing 48': [57, 62, 15], 'thing 52': [83, 55, 15], 'thing 111': "
    "[50, 39, 57], 'thing 123': [47, 57, 55]}]",
}


@pytest.fixture(scope="module")
def real_episodes(sample_root: Path) -> list[tuple[Episode, Path]]:
    return [(read_episode(loc), loc.path) for loc in discover_episodes(sample_root)]


def test_real_episodes_golden_strings(real_episodes) -> None:
    for episode, folder in real_episodes:
        handles = {
            handle: f"object{handle}"
            for camera in episode.image_cameras
            for handle in np.unique(episode.mask(camera, 0)).tolist()
        }
        names = {f"object{handle}": f"thing {handle}" for handle in NAMED_HANDLES}
        text = episode_observation_text(episode, object_names=names, mask_names=handles)
        assert text == REAL_GOLDEN[episode.episode]
        reference = xicm_reference(episode, folder, handles, names)
        # X-ICM prints numpy scalars: under numpy 2 its own string is polluted.
        if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            assert "np.int64(" in str(reference)
        plain = {name: [int(v) for v in coords] for name, coords in reference.items()}
        assert text == "['instruction': " + episode.instruction + ", " + str(plain) + "]"
        assert "np." not in text


def test_real_episode_uses_the_agnostos_name_map_and_keyframes(real_episodes) -> None:
    episode, _ = real_episodes[0]
    assert dict(task_object_names("open_drawer")) == {"drawer_bottom": "drawer"}
    demo = episode_demo_text(episode, mask_names={31: "drawer_bottom"})
    assert demo.observation == "['instruction': open the top drawer, {'drawer': [57, 44, 88]}]"
    # Keyframes 70, 85, 124: the gripper, turned 90 degrees about x (bins 54, 36, ~36),
    # closes at the handle (open 1 -> 0) and pulls back along +y.
    assert demo.text == (
        "['instruction': open the top drawer, {'drawer': [57, 44, 88]}]>"
        "[[46, 74, 55, 54, 36, 37, 1], [46, 66, 55, 54, 36, 37, 0], "
        "[43, 87, 66, 56, 35, 37, 0]]"
    )
    poses = episode.low_dim.gripper_pose[list(episode.keyframes)]
    opens = episode.low_dim.gripper_open[list(episode.keyframes)]
    for code, pose, gripper in zip(demo.actions, poses, opens, strict=True):
        assert code == tuple(XICM_CODEC.encode(np.r_[pose, gripper, 1.0]).tolist())
    with pytest.raises(ValueError, match="episode0: the episode stores no mask handle names"):
        episode_observation_text(episode)


# --- synthetic episodes ---------------------------------------------------------------------

SYNTHETIC_NAMES = {"block": "block", "diningTable_visible": "table"}


def test_synthetic_episode_golden_demo_text(synthetic_root: Path) -> None:
    episodes = {
        (e.task, e.episode): e for e in map(read_episode, discover_episodes(synthetic_root))
    }
    first = episodes[("pick_block", 0)]
    assert first.mask_names["front"] == {10: "diningTable_visible", 57: "block"}
    demo = episode_demo_text(first, object_names=SYNTHETIC_NAMES)
    # z = 19, not 20: the block top (0.80 m) lands a hair under the voxel edge in floats,
    # exactly as in X-ICM's arithmetic. The gripper points down, quaternion (0, 1, 0, 0):
    # Euler xyz (-180, 0, -180) + 180 -> bins (0, 36, 0).
    assert demo.text == (
        "['instruction': pick up the red block, {'table': [51, 48, 15], 'block': "
        "[52, 41, 19]}]>[[52, 40, 41, 0, 36, 0, 1], [52, 40, 18, 0, 36, 0, 0], "
        "[52, 40, 18, 0, 36, 0, 0], [52, 40, 46, 0, 36, 0, 0], [52, 40, 46, 0, 36, 0, 0]]"
    )
    second = episodes[("push_block", 1)]
    assert episode_observation_text(second, object_names=SYNTHETIC_NAMES) == (
        "['instruction': push the green block forward, {'table': [51, 48, 15], "
        "'block': [56, 40, 19]}]"
    )
    # Only the named objects appear; another camera set changes nothing for a table scene.
    assert episode_observation_text(
        first, object_names={"block": "cube"}, cameras=("front", "wrist")
    ) == ("['instruction': pick up the red block, {'cube': [52, 41, 19]}]")
    reference = xicm_reference(
        first,
        synthetic_root / first.source,
        {10: "diningTable_visible", 57: "block"},
        SYNTHETIC_NAMES,
    )
    assert {k: [int(v) for v in c] for k, c in reference.items()} == {
        "table": [51, 48, 15],
        "block": [52, 41, 19],
    }
    assert [code[-1] for code in keyframe_actions(first)] == [1, 0, 0, 0, 0]
    assert len(keyframe_actions(first)) == len(first.keyframes) == 5
    with pytest.raises(KeyError, match="no object-name map for task 'pick_block'"):
        episode_observation_text(first)
    with pytest.raises(KeyError, match="camera"):
        episode_observation_text(first, object_names=SYNTHETIC_NAMES, cameras=("front", "top"))


# --- hand-built scenes ----------------------------------------------------------------------


def _scene():
    """Two 2x2 cameras; handle 5 covers 3 pixels in camera a and 1 pixel in camera b.

    Coordinates sit mid-voxel so the expected indices do not hinge on float rounding.
    """
    masks = {"a": np.array([[5, 5], [5, 7]]), "b": np.array([[1, 9], [5, 1]])}
    points = {
        "a": np.array(
            [
                [[0.005, 0.005, 0.705], [0.035, 0.005, 0.705]],
                [[0.065, 0.005, 0.705], [0.505, 0.405, 1.505]],
            ]
        ),
        "b": np.array(
            [[[9.0, 9.0, 9.0], [0.205, 0.205, 1.005]], [[0.311, 0.305, 0.905], [9.0, 9.0, 9.0]]]
        ),
    }
    return masks, points


def test_centroid_weights_cameras_equally_and_keeps_handle_order() -> None:
    masks, points = _scene()
    handles = {9: "nine", 5: "five", 7: "seven", 1: "ignored"}
    names = {"five": "cup", "seven": "plate", "nine": "cup"}
    voxels = object_voxels(masks, points, handles, names, cameras=("a", "b"))
    # Handles in ascending order: 5 ("cup"), 7 ("plate"), then 9 overwrites "cup" in place.
    assert list(voxels) == ["cup", "plate"]
    assert voxels["plate"] == [80, 90, 90]  # (0.505, 0.405, 1.505)
    assert voxels["cup"] == [50, 70, 40]  # handle 9's point (0.205, 0.205, 1.005) won
    # Handle 5 alone: camera a's mean (0.035, 0.005, 0.705) and camera b's point
    # (0.311, 0.305, 0.905) average to (0.173, 0.155, 0.805) -> [47, 65, 20]; weighting
    # by pixel count would give (0.104, 0.08, 0.755) -> [40, 58, 15].
    assert object_voxels(masks, points, {5: "five"}, names, ("a", "b")) == {"cup": [47, 65, 20]}
    assert object_voxels(masks, points, {4: "five"}, names, cameras=("a", "b")) == {}
    with pytest.raises(ValueError, match="camera 'b'"):
        object_voxels(masks, {"a": points["a"], "b": points["b"][:1]}, handles, names, ("a", "b"))
    with pytest.raises(KeyError, match="camera"):
        object_voxels(masks, points, handles, names, cameras=("a", "c"))


def test_observation_voxels_have_no_lower_clamp() -> None:
    """X-ICM's voxel indices clamp at 99 but go negative below the bounds."""
    masks = {"a": np.array([[1, 2, 3]])}
    points = {"a": np.array([[[-0.4, 0.0, 0.95], [5.0, 0.4995, 1.7], [-0.295, -0.495, 0.605]]])}
    names = {1: "low", 2: "high", 3: "corner"}
    voxels = object_voxels(masks, points, names, {n: n for n in names.values()}, ("a",))
    assert voxels == {"low": [-10, 49, 34], "high": [99, 99, 99], "corner": [0, 0, 0]}
    assert all(type(v) is int for coords in voxels.values() for v in coords)


def test_formatting_never_leaks_numpy_scalars() -> None:
    objects = {"lid": np.array([57, 49, 87], dtype=np.int64), "jar": [np.int32(1), 2, 3]}
    text = format_observation("close the jar", objects)
    assert text == "['instruction': close the jar, {'lid': [57, 49, 87], 'jar': [1, 2, 3]}]"
    assert format_observation(None, objects) == "{'lid': [57, 49, 87], 'jar': [1, 2, 3]}"
    actions = np.array([[57, 49, 87, 0, 39, 0, 1], [1, 2, 3, 4, 5, 6, 0]], dtype=np.int64)
    assert format_actions(actions) == "[[57, 49, 87, 0, 39, 0, 1], [1, 2, 3, 4, 5, 6, 0]]"
    assert DemoText("obs", ((1, 2, 3, 4, 5, 6, 7),)).text == "obs>[[1, 2, 3, 4, 5, 6, 7]]"
    with pytest.raises(ValueError, match="action 0 has 6 values"):
        format_actions([[1, 2, 3, 4, 5, 6]])
    with pytest.raises(TypeError, match="non-integer"):
        format_actions([[57.5, 49, 87, 0, 39, 0, 1]])


def test_mask_names_merge_over_cameras_and_name_maps_cover_agnostos() -> None:
    per_camera = {"front": {3: "a", 4: "b"}, "wrist": {4: "b2", 5: "c"}, "other": {6: "x"}}
    assert merge_mask_names(per_camera, ("front", "wrist")) == {3: "a", 4: "b2", 5: "c"}
    assert len(AGNOSTOS_OBJECT_NAMES) == 41
    assert task_object_names("light_bulb_in")["bulb0"] == "blub"


# --- names of the frame read ----------------------------------------------------------------


def test_frame_mask_names_keep_only_what_each_camera_sees_in_that_frame() -> None:
    """X-ICM's maps name the handles in each camera's mask of the frame read: a name known
    only from other frames (or other cameras' maps of handles they do not see) is absent."""
    masks = {"a": np.array([[5, 5], [0, 8]]), "b": np.array([[7, 7], [7, 0]])}
    per_camera = {"a": {5: "five", 6: "six", 8: "eight"}, "b": {7: "seven", 8: "eight b"}}
    assert frame_mask_names(per_camera, masks, ("a", "b")) == {5: "five", 8: "eight", 7: "seven"}
    # The union over frames would also name 6 (not in any mask) and let b rename 8.
    union = {5: "five", 6: "six", 8: "eight b", 7: "seven"}
    assert merge_mask_names(per_camera, ("a", "b")) == union
    points = {c: np.broadcast_to([0.105, 0.105, 0.705], (2, 2, 3)) for c in ("a", "b")}
    names = {"five": "A", "six": "B", "eight": "C", "eight b": "D", "seven": "E"}
    handles = frame_mask_names(per_camera, masks, ("a", "b"))
    text = frame_observation_text(masks, points, handles, names, "go", ("a", "b"))
    assert text == "['instruction': go, {'A': [40, 60, 10], 'E': [40, 60, 10], 'C': [40, 60, 10]}]"


@dataclass(frozen=True)
class _PatchedFrames:
    """A frame store with some PNGs replaced (to stage what a camera saw in one frame)."""

    base: FrameStore
    patches: dict[tuple[str, str, int], bytes]

    def read(self, camera: str, modality: str, index: int) -> bytes:
        patched = self.patches.get((camera, modality, index))
        return patched if patched is not None else self.base.read(camera, modality, index)


def test_stored_demo_text_names_handles_from_the_frame_it_reads(synthetic_root: Path) -> None:
    """The block is in the front mask of frame 0 but only the wrist's map (the union over
    frames: the wrist saw it later) names it, and the wrist does not see it in frame 0.
    X-ICM's frame-0 maps leave it unnamed, so the demo text omits it."""
    episode = read_episode(discover_episodes(synthetic_root)[0])
    wrist = episode.mask("wrist", 0)
    assert 57 in episode.mask("front", 0) and 57 in wrist
    hidden = codecs.encode_png(codecs.mask_to_rgb(np.where(wrist == 57, 10, wrist)))
    table = {10: "diningTable_visible"}
    staged = replace(
        episode,
        frames=_PatchedFrames(episode.frames, {("wrist", "mask", 0): hidden}),
        mask_names={"front": table, "wrist": {**table, 57: "block"}},
    )
    cameras = ("front", "wrist")
    text = episode_observation_text(staged, object_names=SYNTHETIC_NAMES, cameras=cameras)
    assert "'table'" in text and "'block'" not in text
    # Merging the stored maps regardless of what each camera shows (the old rule) names it.
    merged = merge_mask_names(staged.mask_names, cameras)
    assert "'block': [52, 41, 19]" in episode_observation_text(
        staged, object_names=SYNTHETIC_NAMES, cameras=cameras, mask_names=merged
    )


# --- live observations ----------------------------------------------------------------------


def _live_observation(episode: Episode, frame: int, names: dict[int, str]) -> Observation:
    """A live-style observation of a stored frame: float32 depth, as a simulator gives it."""
    cameras = {}
    for camera in episode.image_cameras:
        params = episode.cameras[camera]
        cameras[camera] = CameraFrame(
            rgb=episode.rgb(camera, frame),
            depth=episode.depth(camera, frame).astype(np.float32),
            mask=episode.mask(camera, frame),
            intrinsics=params.intrinsics[frame],
            extrinsics=params.extrinsics[frame],
            near=float(params.near[frame]),
            far=float(params.far[frame]),
        )
    return Observation(
        cameras=cameras,
        gripper_pose=episode.low_dim.gripper_pose[frame],
        gripper_open=float(episode.low_dim.gripper_open[frame]),
        joint_positions=episode.low_dim.joint_positions[frame],
        joint_velocities=episode.low_dim.joint_velocities[frame],
        mask_names=names,
        instruction="live instruction",
    )


def test_live_observation_text_follows_x_icms_query_path(synthetic_root: Path) -> None:
    """float32 points (YARR casts every cloud the agent sees), float32 means, the frame's
    visible handles named through the task map, the live instruction by default."""
    episode = read_episode(discover_episodes(synthetic_root)[0])
    live = _live_observation(episode, 2, {10: "diningTable_visible", 57: "block", 3: "block"})
    cameras = ("front", "wrist")
    text = observation_text(live, "pick_block", object_names=SYNTHETIC_NAMES, cameras=cameras)
    frames = [live.cameras[c] for c in cameras]
    masks = [frame.mask for frame in frames]
    clouds = [  # YARR's cast
        codecs.point_cloud(f.depth, f.intrinsics, f.extrinsics).astype(np.float32) for f in frames
    ]
    id_to_real = {10: "table", 57: "block"}
    expected = {}
    for mask_id in np.unique(np.concatenate(masks)):
        if mask_id in id_to_real:
            seen = [
                (mask, cloud)
                for mask, cloud in zip(masks, clouds, strict=True)
                if np.any(mask == mask_id)
            ]
            means = [cloud[mask == mask_id].mean(axis=0) for mask, cloud in seen]
            assert means[0].dtype == np.float32
            voxel = XICM_CODEC.encode_position(sum(means) / len(means))
            expected[id_to_real[mask_id]] = [int(v) for v in voxel]
    assert text == "['instruction': live instruction, " + str(expected) + "]"
    assert observation_text(
        live, "pick_block", "given", object_names=SYNTHETIC_NAMES, cameras=cameras
    ).startswith("['instruction': given, {")
    with pytest.raises(KeyError, match="no object-name map for task 'pick_block'"):
        observation_text(live, "pick_block")
    with pytest.raises(KeyError, match="observation has no camera"):
        observation_text(live, "pick_block", object_names=SYNTHETIC_NAMES, cameras=("top",))


MINIBENCH_TASKS = ("pick_up_block", "open_drawer")
MINIBENCH_SIZE = 64  # a smaller render keeps the two recorded demos to a few seconds


def _minibench_texts(out: str) -> list[tuple[str, str, str, str, str]]:
    """Record one demo per task into `out`, then per episode: (key, live instruction,
    stored instruction, live query text right after `reset_to_episode`, frame-0 demo text).

    Runs in a fresh process: once MuJoCo's EGL (Mesa llvmpipe) is loaded, a later
    `import triton` (torch, diffusers) in the same process crashes in LLVM.
    """
    from agnostos.envs.minibench.env import MiniBenchEnv
    from agnostos.envs.minibench.generate import generate

    generate(MINIBENCH_TASKS, 1, out, image_size=MINIBENCH_SIZE, progress=False)
    env = MiniBenchEnv(image_size=MINIBENCH_SIZE)
    rows = []
    try:
        for episode in map(read_episode, discover_episodes(out)):
            names = MINIBENCH_OBJECT_NAMES[episode.task]
            live = env.reset_to_episode(episode)
            query = observation_text(live, episode.task, suite="minibench")
            assert query == observation_text(live, episode.task, object_names=names)
            demo = episode_demo_text(episode, object_names=names).observation
            rows.append((episode.key, live.instruction, episode.instruction, query, demo))
    finally:
        env.close()
    return rows


def test_live_text_after_reset_equals_the_stored_demo_text(tmp_path: Path) -> None:
    """The agent's query text right after `reset_to_episode` and the bank's demo text of
    that episode's frame 0 are the same string (one code path; the stored depth's 24-bit
    quantisation and the live float32 rounding move points by well under a millimetre)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        rows = pool.submit(_minibench_texts, str(tmp_path)).result(timeout=240)
    assert sorted(key.split("/")[0] for key, *_ in rows) == sorted(MINIBENCH_TASKS)
    for key, live_instruction, stored_instruction, query, demo in rows:
        assert live_instruction == stored_instruction, key
        assert query == demo, key
        assert "{}" not in query, query
