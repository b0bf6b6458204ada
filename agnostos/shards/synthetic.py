"""Small synthetic RLBench episodes: the built-in data set and the test fixtures.

They are real RLBench files (the same pickle classes, PNG codecs and folder layout), just
tiny: a table seen by five downward-looking cameras and one block, with a scripted
gripper trajectory that pauses at waypoints and closes once, so the keyframe heuristic
has work to do. The geometry is consistent: back-projecting a depth frame puts the table
at `TABLE_HEIGHT` and the block's mask centroid where the block is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agnostos.shards.codecs import depth_to_rgb, encode_png, mask_to_rgb
from agnostos.shards.episode import CAMERAS, MODALITIES
from agnostos.shards.folders import write_episode_folder

TABLE_HEIGHT = 0.75
TABLE_HANDLE = 10
BLOCK_HANDLE = 57
BLOCK_HEIGHT = 0.05
NEAR, FAR = 0.01, 3.5
_CAMERA_HEIGHT = {"front": 1.8, "left_shoulder": 1.7, "right_shoulder": 1.7, "overhead": 2.0,
                  "wrist": 1.2}  # fmt: skip

DESCRIPTIONS = {
    "pick_block": ["pick up the {colour} block", "grasp the {colour} block and lift it"],
    "push_block": ["push the {colour} block forward", "slide the {colour} block away"],
}
COLOURS = ("red", "green", "blue")
_RGB = {"red": (200, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 210)}


@dataclass(frozen=True)
class SyntheticSpec:
    """What one synthetic episode looks like."""

    task: str = "pick_block"
    episode: int = 0
    variation: int = 0
    segment_frames: int = 5
    pause_frames: int = 3
    image_size: int = 32
    cameras: tuple[str, ...] = CAMERAS
    ragged_task_state: bool = False
    seed: int = 0


def _intrinsics(size: int) -> np.ndarray:
    focal = -1.1 * size  # RLBench stores negative focal lengths
    return np.array([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])


def _extrinsics(x: float, y: float, height: float) -> np.ndarray:
    """Camera-to-world pose looking straight down (camera z = world -z)."""
    pose = np.eye(4)
    pose[:3, :3] = np.diag([1.0, -1.0, -1.0])
    pose[:3, 3] = (x, y, height)
    return pose


def _waypoints(rng: np.random.Generator) -> np.ndarray:
    block = np.array([rng.uniform(0.1, 0.3), rng.uniform(-0.2, 0.2), TABLE_HEIGHT + 0.02])
    lifts = np.array([[0.0, 0.0, 0.25], [0.0, 0.0, 0.02], [0.0, 0.0, 0.3]])
    return block + lifts


def _trajectory(spec: SyntheticSpec, rng: np.random.Generator):
    """Per-frame gripper xyz, gripper open and joint velocities: move, pause, repeat."""
    start = np.array([0.25, 0.0, 1.3])
    positions, velocities, gripper = [], [], []
    open_state = 1.0
    for index, target in enumerate(_waypoints(rng)):
        origin = positions[-1] if positions else start
        for step in range(1, spec.segment_frames + 1):
            positions.append(origin + (target - origin) * step / spec.segment_frames)
            velocities.append(rng.uniform(0.3, 0.8, size=7))
            gripper.append(open_state)
        if index == 1:
            open_state = 0.0  # close on the block
        for _ in range(spec.pause_frames):
            positions.append(target)
            velocities.append(rng.uniform(-0.02, 0.02, size=7))
            gripper.append(open_state)
    return np.array(positions), np.array(gripper), np.array(velocities)


def _render(spec: SyntheticSpec, camera: str, block_xy: np.ndarray, frame: int, colour: str):
    """rgb, depth (metres) and mask of one downward view with the block in it."""
    size = spec.image_size
    height = _CAMERA_HEIGHT[camera]
    intrinsics = _intrinsics(size)
    rows, cols = np.mgrid[0:size, 0:size]
    # Table points seen at each pixel (camera straight above (0.2, 0)).
    depth = np.full((size, size), height - TABLE_HEIGHT)
    world_x = 0.2 + (cols - size / 2) * depth / intrinsics[0, 0]
    world_y = 0.0 - (rows - size / 2) * depth / intrinsics[1, 1]
    on_block = (np.abs(world_x - block_xy[0]) < 0.04) & (np.abs(world_y - block_xy[1]) < 0.04)
    depth = np.where(on_block, height - TABLE_HEIGHT - BLOCK_HEIGHT, depth)
    mask = np.where(on_block, BLOCK_HANDLE, TABLE_HANDLE)
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[...] = (110 + (rows * 3 + frame) % 40)[..., None]
    rgb[on_block] = _RGB[colour]
    return rgb, depth, mask


def write_synthetic_episode(root: str | Path, spec: SyntheticSpec) -> Path:
    """Write one episode under `<root>/<task>/all_variations/episodes/episode<N>/`."""
    rng = np.random.default_rng([spec.seed, spec.episode, spec.variation])
    legacy_rng = np.random.RandomState(spec.seed * 1000 + spec.episode)
    colour = COLOURS[spec.variation % len(COLOURS)]
    positions, gripper, velocities = _trajectory(spec, rng)
    block_xy = positions[4][:2] if len(positions) > 4 else positions[0][:2]
    num_frames = len(positions)
    quaternion = np.array([0.0, 1.0, 0.0, 0.0])  # gripper pointing down

    observations, images = [], {(c, m): [] for c in spec.cameras for m in MODALITIES}
    for index in range(num_frames):
        misc = {}
        for camera in spec.cameras:
            misc[f"{camera}_camera_extrinsics"] = _extrinsics(0.2, 0.0, _CAMERA_HEIGHT[camera])
            misc[f"{camera}_camera_intrinsics"] = _intrinsics(spec.image_size)
            misc[f"{camera}_camera_near"] = NEAR
            misc[f"{camera}_camera_far"] = FAR
            misc[f"{camera}_mask_id_to_name"] = {
                np.float32(TABLE_HANDLE): "diningTable_visible",
                np.float32(BLOCK_HANDLE): "block",
            }
            rgb, depth, mask = _render(spec, camera, block_xy, index, colour)
            images[(camera, "rgb")].append(encode_png(rgb))
            images[(camera, "depth")].append(encode_png(depth_to_rgb(depth, NEAR, FAR)))
            images[(camera, "mask")].append(encode_png(mask_to_rgb(mask)))
        pose = np.concatenate([positions[index], quaternion])
        matrix = np.eye(4)
        matrix[:3, 3] = positions[index]
        state_length = 3 + (index % 2 if spec.ragged_task_state else 0)
        observations.append(
            {
                "joint_velocities": velocities[index],
                "joint_positions": np.linspace(-1, 1, 7) + 0.01 * index,
                "joint_forces": np.zeros(7),
                "gripper_open": float(gripper[index]),
                "gripper_pose": pose,
                "gripper_matrix": matrix,
                "gripper_joint_positions": np.full(2, 0.04 * gripper[index]),
                "gripper_touch_forces": np.zeros(6),
                "task_low_dim_state": np.arange(state_length, dtype=np.float64) + index,
                "ignore_collisions": np.array(1.0 if index < 3 else 0.0),
                "misc": misc,
            }
        )
    templates = DESCRIPTIONS.get(spec.task, [f"{spec.task.replace('_', ' ')} ({{colour}})"])
    descriptions = [text.format(colour=colour) for text in templates]
    folder = Path(root) / spec.task / "all_variations" / "episodes" / f"episode{spec.episode}"
    return write_episode_folder(
        folder, observations, images, descriptions, spec.variation, legacy_rng.get_state()
    )


def write_synthetic_dataset(
    root: str | Path,
    tasks: Sequence[str] = ("pick_block", "push_block"),
    episodes_per_task: int = 3,
    **spec_fields,
) -> list[Path]:
    """A few episodes per task, variations cycling through the colours."""
    return [
        write_synthetic_episode(
            root,
            SyntheticSpec(
                task=task, episode=episode, variation=episode % len(COLOURS), **spec_fields
            ),
        )
        for task in tasks
        for episode in range(episodes_per_task)
    ]
