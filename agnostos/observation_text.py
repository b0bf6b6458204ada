"""X-ICM's object-centric observation text and demo text.

X-ICM shows the LLM each scene as the instruction plus one voxel coordinate per named
object, and each demonstration as that frame-0 observation followed by its keyframe
actions (`xicm_method.md` sections 4.1-4.2). The algorithm, from the public X-ICM code:

1. the unique mask handles over all cameras, in ascending order;
2. handles whose simulator name is not in the task's name map are skipped;
3. for each camera where the handle occurs, the mean world-frame point of its pixels;
4. the plain average of those per-camera means (equal weight per camera);
5. voxelised on X-ICM's 100^3 grid of 1 cm cells over [-0.3,-0.5,0.6]..[0.7,0.5,1.6]
   (floor, clamped above at 99, *not* clamped below), inserted under the prompt name
   in handle order (a later handle with the same prompt name overwrites the value but
   keeps the first position, as a Python dict does);
6. printed as `"['instruction': " + instruction + ", " + str(dict) + "]"`.

Every number is printed from a plain Python int. X-ICM prints numpy scalars, which
numpy >= 2 renders as `np.int64(57)`; that never happens here.

Handles are named from the frame that is read, as X-ICM does: its `<camera>_mask_id_to_name`
maps hold the names of the handles in that camera's mask at that frame, merged over the
cameras (`frame_mask_names`). The demo text (`episode_observation_text`, frame 0) and the
query text of a live observation (`observation_text`) go through one function,
`frame_observation_text`, so the two can only differ where their inputs do. Live points
are rounded to float32 first, as YARR's `_extract_obs` rounds every point cloud X-ICM's
agent sees; stored frames keep PyRep's float64 points, as X-ICM's demo reader does.

Demo text is `f"{observation}>{actions}"`, `actions` being `str()` of the list of 7-int
keyframe actions; the prompt builder appends `", "` after each demo, as X-ICM does.
Voxelisation and the 7-int code (voxel xyz, 5-degree Euler bins, gripper) come from
`XICMActionCodec`, the one place that defines them; in parity mode it has no lower clamp.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from agnostos.action_codecs import XICMActionCodec
from agnostos.shards.episode import CAMERAS, Episode
from agnostos.tasks import AGNOSTOS_OBJECT_NAMES, get_suite

if TYPE_CHECKING:
    from agnostos.envs.protocol import Observation

__all__ = [
    "DEFAULT_CAMERAS",
    "XICM_CODEC",
    "DemoText",
    "episode_demo_text",
    "episode_observation_text",
    "format_actions",
    "format_observation",
    "frame_mask_names",
    "frame_observation_text",
    "keyframe_actions",
    "merge_mask_names",
    "object_centroids",
    "object_voxels",
    "observation_text",
    "task_object_names",
]

# X-ICM's camera set (its utils.CAMERAS; see xicm_method.md 2.3), in its order.
DEFAULT_CAMERAS: tuple[str, ...] = CAMERAS
ACTION_LENGTH = 7
# Parity codec: X-ICM's bounds, 1 cm voxels, 5-degree bins, no lower clamp.
XICM_CODEC = XICMActionCodec()


@dataclass(frozen=True)
class DemoText:
    """One demonstration as X-ICM shows it: frame-0 observation and keyframe actions."""

    observation: str
    actions: tuple[tuple[int, ...], ...]

    @property
    def text(self) -> str:
        """`observation>actions`, without the `", "` the prompt puts after each demo."""
        return f"{self.observation}>{format_actions(self.actions)}"


def task_object_names(
    task: str, maps: Mapping[str, Mapping[str, str]] = AGNOSTOS_OBJECT_NAMES
) -> Mapping[str, str]:
    """The `{simulator name: prompt name}` map of `task`, with an error naming the task."""
    try:
        return maps[task]
    except KeyError:
        raise KeyError(
            f"no object-name map for task {task!r} ({len(maps)} tasks have one); "
            "pass object_names= explicitly"
        ) from None


def merge_mask_names(
    per_camera: Mapping[str, Mapping[int, str]], cameras: Sequence[str] = DEFAULT_CAMERAS
) -> dict[int, str]:
    """One handle -> simulator-name map over the cameras (later cameras win, as X-ICM)."""
    merged: dict[int, str] = {}
    for camera in cameras:
        merged.update({int(handle): name for handle, name in per_camera.get(camera, {}).items()})
    return merged


def frame_mask_names(
    per_camera: Mapping[str, Mapping[int, str]],
    masks: Mapping[str, np.ndarray],
    cameras: Sequence[str] = DEFAULT_CAMERAS,
) -> dict[int, str]:
    """The handle names of one frame, as that frame's own maps give them to X-ICM.

    RLBench fills `misc['<camera>_mask_id_to_name']` with the names of the handles in that
    camera's mask at that frame (`VisionSensor.get_mask_id_object_names`), and X-ICM merges
    those maps over the cameras. `per_camera` may name more handles (the union over an
    episode's frames, or a simulator's whole name table); only the handles each camera
    sees in `masks` are kept, so a name known only from another frame never appears.
    """
    visible = {
        camera: {
            int(handle): per_camera[camera][int(handle)]
            for handle in np.unique(np.asarray(masks[camera])).tolist()
            if int(handle) in per_camera.get(camera, {})
        }
        for camera in cameras
        if camera in masks
    }
    return merge_mask_names(visible, cameras)


def _check_camera(camera: str, mask: np.ndarray, points: np.ndarray) -> None:
    if mask.ndim != 2 or points.shape != (*mask.shape, 3):
        raise ValueError(
            f"camera {camera!r}: mask {mask.shape} and point cloud {points.shape} must be "
            "HxW and HxWx3 of the same size"
        )


def object_centroids(
    masks: Mapping[str, np.ndarray],
    points: Mapping[str, np.ndarray],
    handle_names: Mapping[int, str],
    cameras: Sequence[str] = DEFAULT_CAMERAS,
) -> list[tuple[int, str, np.ndarray]]:
    """(handle, name, centroid) of every named handle seen by any camera, handle order.

    The centroid is the plain average over cameras of each camera's mean point of the
    handle's pixels (cameras weigh equally, whatever their pixel counts).
    """
    missing = [camera for camera in cameras if camera not in masks or camera not in points]
    if missing:
        raise KeyError(f"no mask or point cloud for camera(s) {', '.join(missing)}")
    views = []
    for camera in cameras:
        mask, cloud = np.asarray(masks[camera]), np.asarray(points[camera])
        _check_camera(camera, mask, cloud)
        views.append((mask, cloud))
    handles = np.unique(np.concatenate([mask.ravel() for mask, _ in views]))
    found = []
    for handle in handles.tolist():
        if handle not in handle_names:
            continue
        means = [
            np.mean(cloud[mask == handle].reshape(-1, 3), axis=0)
            for mask, cloud in views
            if np.any(mask == handle)
        ]
        total: np.ndarray | int = 0
        for mean in means:  # Python's left-to-right sum, as X-ICM, for identical rounding
            total = total + mean
        found.append((int(handle), handle_names[handle], total / len(means)))
    return found


def object_voxels(
    masks: Mapping[str, np.ndarray],
    points: Mapping[str, np.ndarray],
    mask_names: Mapping[int, str],
    object_names: Mapping[str, str],
    cameras: Sequence[str] = DEFAULT_CAMERAS,
    codec: XICMActionCodec = XICM_CODEC,
) -> dict[str, list[int]]:
    """`{prompt name: [vx, vy, vz]}` (plain ints) of the task's objects in one frame.

    `mask_names` maps handles to simulator names; `object_names` maps simulator names to
    the names the prompt uses (only those objects appear).
    """
    handle_names = {
        int(handle): object_names[name]
        for handle, name in mask_names.items()
        if name in object_names
    }
    voxels: dict[str, list[int]] = {}
    for _, name, centroid in object_centroids(masks, points, handle_names, cameras):
        voxels[name] = [int(value) for value in codec.encode_position(centroid)]
    return voxels


def frame_observation_text(
    masks: Mapping[str, np.ndarray],
    points: Mapping[str, np.ndarray],
    mask_names: Mapping[int, str],
    object_names: Mapping[str, str],
    instruction: str | None,
    cameras: Sequence[str] = DEFAULT_CAMERAS,
    codec: XICMActionCodec = XICM_CODEC,
) -> str:
    """X-ICM's observation string of one frame: the single path demo and query text share.

    `masks`/`points` per camera, `mask_names` the frame's handle -> simulator name map,
    `object_names` the task's simulator -> prompt name map.
    """
    objects = object_voxels(masks, points, mask_names, object_names, cameras, codec)
    return format_observation(instruction, objects)


def format_observation(instruction: str | None, objects: Mapping[str, Sequence[int]]) -> str:
    """X-ICM's observation string; `instruction=None` gives the bare dict (RoboPrompt).

    Values are re-built from plain ints so numpy scalars can never leak into the text.
    """
    plain = {
        str(name): [operator.index(value) for value in coords] for name, coords in objects.items()
    }
    if instruction is None:
        return str(plain)
    return "['instruction': " + instruction + ", " + str(plain) + "]"


def format_actions(actions: Sequence[Sequence[int]]) -> str:
    """`str()` of the list of 7-int actions, e.g. `[[57, 49, 87, 0, 39, 0, 1]]`."""
    rows = []
    for number, action in enumerate(actions):
        if len(action) != ACTION_LENGTH:
            raise ValueError(
                f"action {number} has {len(action)} values, X-ICM actions have {ACTION_LENGTH}"
            )
        try:
            rows.append([operator.index(value) for value in action])
        except TypeError:
            raise TypeError(
                f"action {number} holds a non-integer value: {list(action)!r}"
            ) from None
    return str(rows)


def _episode_views(
    episode: Episode, frame: int, cameras: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    absent = [camera for camera in cameras if camera not in episode.image_cameras]
    if absent:
        raise KeyError(
            f"{episode.key}: camera(s) {', '.join(absent)} not stored "
            f"(has {', '.join(episode.image_cameras)})"
        )
    masks = {camera: episode.mask(camera, frame) for camera in cameras}
    points = {camera: episode.point_cloud(camera, frame) for camera in cameras}
    return masks, points


def _check_mask_names(
    episode: Episode, cameras: Sequence[str], mask_names: Mapping[int, str] | None
) -> None:
    """Data without handle names (PerAct-fork files) cannot name objects: say so first."""
    if mask_names is None and not any(episode.mask_names.get(camera) for camera in cameras):
        raise ValueError(
            f"{episode.key}: the episode stores no mask handle names "
            "(misc['<camera>_mask_id_to_name'] is X-ICM-fork data); pass mask_names="
        )


def episode_observation_text(
    episode: Episode,
    frame: int = 0,
    *,
    object_names: Mapping[str, str] | None = None,
    cameras: Sequence[str] = DEFAULT_CAMERAS,
    mask_names: Mapping[int, str] | None = None,
    instruction: str | None = None,
    codec: XICMActionCodec = XICM_CODEC,
) -> str:
    """The observation text of one stored frame (frame 0 for demos).

    `object_names` defaults to the task's AGNOSTOS map; `mask_names` (handle -> simulator
    name) to the names of the handles visible in that frame (`frame_mask_names` over the
    stored maps); `instruction` to the first description.
    """
    names = object_names if object_names is not None else task_object_names(episode.task)
    _check_mask_names(episode, cameras, mask_names)
    masks, points = _episode_views(episode, frame, cameras)
    # Episodes keep each camera's names as the union over frames; cut to the handles each
    # camera's mask shows in this frame, that is the frame's own map whenever the data was
    # written as RLBench writes it (names taken from the same mask).
    handles = (
        mask_names
        if mask_names is not None
        else frame_mask_names(episode.mask_names, masks, cameras)
    )
    text = instruction if instruction is not None else episode.instruction
    return frame_observation_text(masks, points, handles, names, text, cameras, codec)


def _live_views(
    observation: Observation, cameras: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Masks and float32 world points of a live observation's cameras.

    float32 because X-ICM's agent only ever sees float32 clouds (YARR's `_extract_obs`
    casts them); its per-object means are then float32 sums, reproduced by keeping them.
    """
    absent = [camera for camera in cameras if camera not in observation.cameras]
    if absent:
        raise KeyError(
            f"observation has no camera(s) {', '.join(absent)} "
            f"(has {', '.join(observation.cameras)})"
        )
    frames = {camera: observation.cameras[camera] for camera in cameras}
    masks = {camera: np.asarray(frame.mask) for camera, frame in frames.items()}
    points = {camera: frame.point_cloud().astype(np.float32) for camera, frame in frames.items()}
    return masks, points


def observation_text(
    observation: Observation,
    task: str,
    instruction: str | None = None,
    *,
    object_names: Mapping[str, str] | None = None,
    cameras: Sequence[str] | None = None,
    suite: str = "agnostos",
    codec: XICMActionCodec = XICM_CODEC,
) -> str:
    """X-ICM's query observation string of a live observation of `task`.

    The same path as the bank's demo text (`frame_observation_text`): the observation's
    per-camera masks and point clouds, its handle names cut to the handles visible now,
    named through `task`'s map in `suite` (task names recur across suites: minibench's
    open_drawer is not AGNOSTOS's) or through `object_names`. `instruction` defaults to
    the observation's own; `cameras` (None: X-ICM's five) must all be in the observation.
    """
    cameras = tuple(cameras) if cameras is not None else DEFAULT_CAMERAS
    names = (
        object_names
        if object_names is not None
        else task_object_names(task, get_suite(suite).object_names)
    )
    masks, points = _live_views(observation, cameras)
    handles = frame_mask_names(
        {camera: observation.mask_names for camera in cameras}, masks, cameras
    )
    text = instruction if instruction is not None else observation.instruction
    return frame_observation_text(masks, points, handles, names, text, cameras, codec)


def keyframe_actions(
    episode: Episode, codec: XICMActionCodec = XICM_CODEC
) -> tuple[tuple[int, ...], ...]:
    """The 7-int code of every keyframe: the gripper pose and open state reached there.

    As X-ICM's `_get_action`: position voxels, Euler bins of the (normalised, w >= 0)
    quaternion and `int(gripper_open)`; `ignore_collisions` is not part of the code.
    """
    keyframes = list(episode.keyframes)
    if not keyframes:
        return ()
    low_dim = episode.low_dim
    poses = np.asarray(low_dim.gripper_pose, dtype=np.float64)[keyframes]
    gripper = np.asarray(low_dim.gripper_open, dtype=np.float64)[keyframes, None]
    ignore = np.ones_like(gripper)
    codes = codec.encode(np.concatenate([poses, gripper, ignore], axis=1))
    return tuple(tuple(int(value) for value in row) for row in codes.tolist())


def episode_demo_text(
    episode: Episode,
    *,
    object_names: Mapping[str, str] | None = None,
    cameras: Sequence[str] = DEFAULT_CAMERAS,
    mask_names: Mapping[int, str] | None = None,
    codec: XICMActionCodec = XICM_CODEC,
) -> DemoText:
    """A stored episode as an X-ICM demo: frame-0 observation (first description) and
    its keyframe actions. Precompute this once per bank entry."""
    observation = episode_observation_text(
        episode,
        0,
        object_names=object_names,
        cameras=cameras,
        mask_names=mask_names,
        codec=codec,
    )
    return DemoText(observation=observation, actions=keyframe_actions(episode, codec))
