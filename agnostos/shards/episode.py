"""The Episode record: one RLBench demonstration, wherever it is stored.

An Episode carries everything small eagerly (low-dim arrays, camera parameters, mask
names, the reset RNG state, keyframes) and reaches its PNG frames lazily through a
`FrameStore`, so a folder on disk and a sample from a shard look the same to the rest
of the framework. PNG bytes are kept exactly as RLBench wrote them; decoding happens
only when a caller asks for pixels, depth, masks or points.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from agnostos.shards import codecs

CAMERAS: tuple[str, ...] = ("front", "left_shoulder", "right_shoulder", "overhead", "wrist")
MODALITIES: tuple[str, ...] = ("rgb", "depth", "mask")

# Low-dim fields every consumer relies on; the rest land in LowDim.extra.
CORE_LOW_DIM_FIELDS: tuple[str, ...] = (
    "gripper_pose",
    "gripper_open",
    "joint_positions",
    "joint_velocities",
)
OFFSETS_SUFFIX = "@offsets"


class FrameStore(Protocol):
    """Where an episode's PNG bytes live (a folder, a shard sample, memory)."""

    def read(self, camera: str, modality: str, index: int) -> bytes: ...


@dataclass(frozen=True)
class FolderFrames:
    """PNG frames in an RLBench episode folder: `<camera>_<modality>/<index>.png`."""

    root: Path

    def path(self, camera: str, modality: str, index: int) -> str:
        # A plain string: building ~90k pathlib paths per GB showed up in conversion profiles.
        return f"{self.root}/{camera}_{modality}/{index}.png"

    def read(self, camera: str, modality: str, index: int) -> bytes:
        with open(self.path(camera, modality, index), "rb") as handle:
            return handle.read()


@dataclass(frozen=True)
class MemoryFrames:
    """PNG frames held in memory, keyed by (camera, modality, index)."""

    frames: Mapping[tuple[str, str, int], bytes]
    origin: str = "memory"

    def read(self, camera: str, modality: str, index: int) -> bytes:
        try:
            return self.frames[(camera, modality, index)]
        except KeyError:
            raise KeyError(f"{self.origin}: no frame {camera}_{modality}/{index}.png") from None


@dataclass(frozen=True)
class CameraParams:
    """Per-frame camera parameters as RLBench stores them in `obs.misc`.

    intrinsics (T,3,3) with negative focal lengths; extrinsics (T,4,4) camera-to-world;
    near and far (T,) clipping planes in metres (they scale the depth encoding).
    """

    intrinsics: np.ndarray
    extrinsics: np.ndarray
    near: np.ndarray
    far: np.ndarray


@dataclass(frozen=True)
class RandomState:
    """numpy's legacy MT19937 state, captured by RLBench right before the demo's reset.

    Restoring it with `np.random.set_state(state.as_tuple())` and resetting the task
    replays the same object placement in the real simulator.
    """

    keys: np.ndarray
    position: int
    has_gauss: int
    cached_gaussian: float
    bit_generator: str = "MT19937"

    @classmethod
    def from_tuple(cls, state: tuple) -> RandomState:
        name, keys, position, has_gauss, cached_gaussian = state
        return cls(
            keys=np.asarray(keys, dtype=np.uint32),
            position=int(position),
            has_gauss=int(has_gauss),
            cached_gaussian=float(cached_gaussian),
            bit_generator=str(name),
        )

    def as_tuple(self) -> tuple:
        return (self.bit_generator, self.keys, self.position, self.has_gauss, self.cached_gaussian)


@dataclass(frozen=True)
class LowDim:
    """Per-frame proprioception, stacked over the T frames of an episode.

    gripper_pose (T,7) xyz + quaternion xyzw in the world frame; gripper_open (T,) 1.0/0.0;
    joint_positions and joint_velocities (T,7); ignore_collisions (T,) when the pickle has
    it (PerAct fork), else None. `extra` keeps every other numeric per-frame field of the
    pickle (gripper_matrix, joint_forces, task_low_dim_state, ...). A field whose length
    changes between frames is stored flat with a `<name>@offsets` array of T+1 offsets.
    """

    gripper_pose: np.ndarray
    gripper_open: np.ndarray
    joint_positions: np.ndarray
    joint_velocities: np.ndarray
    ignore_collisions: np.ndarray | None = None
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        """All fields by name (extras included, missing optional ones left out)."""
        named = {name: getattr(self, name) for name in CORE_LOW_DIM_FIELDS}
        if self.ignore_collisions is not None:
            named["ignore_collisions"] = self.ignore_collisions
        named.update(self.extra)
        return named

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> LowDim:
        missing = [name for name in CORE_LOW_DIM_FIELDS if name not in arrays]
        if missing:
            raise KeyError(f"low-dim arrays lack {', '.join(missing)}")
        known = {*CORE_LOW_DIM_FIELDS, "ignore_collisions"}
        return cls(
            **{name: arrays[name] for name in CORE_LOW_DIM_FIELDS},
            ignore_collisions=arrays.get("ignore_collisions"),
            extra={name: value for name, value in arrays.items() if name not in known},
        )

    def frame_value(self, name: str, index: int) -> np.ndarray:
        """One frame's value of any field, ragged fields included."""
        arrays = self.arrays()
        offsets = arrays.get(name + OFFSETS_SUFFIX)
        if offsets is None:
            return arrays[name][index]
        return arrays[name][offsets[index] : offsets[index + 1]]


@dataclass(frozen=True)
class Episode:
    """One RLBench demonstration (see the module docstring).

    `source` is the episode folder relative to the dataset root, e.g.
    `open_drawer/all_variations/episodes/episode0`. `image_cameras`/`modalities` say which
    PNG folders `frames` can serve; `cameras` holds the parameters of every camera the
    pickle describes. `mask_names` maps each camera's mask handles to simulator names.
    """

    task: str
    variation: int
    episode: int
    descriptions: tuple[str, ...]
    num_frames: int
    low_dim: LowDim
    cameras: Mapping[str, CameraParams]
    mask_names: Mapping[str, Mapping[int, str]]
    random_state: RandomState | None
    keyframes: tuple[int, ...]
    image_cameras: tuple[str, ...]
    modalities: tuple[str, ...]
    frames: FrameStore
    source: str
    variation_folder: str = "all_variations"

    @property
    def key(self) -> str:
        """Identifier used as the WebDataset sample key: `<task>/<variation folder>/episode<N>`."""
        return f"{self.task}/{self.variation_folder}/episode{self.episode}"

    @property
    def instruction(self) -> str:
        """The language goal X-ICM, RVT and YARR use: the first variation description."""
        return self.descriptions[0]

    def png(self, camera: str, modality: str, index: int) -> bytes:
        """The stored PNG bytes of one frame, unchanged."""
        if camera not in self.image_cameras or modality not in self.modalities:
            raise KeyError(
                f"{self.key}: no {camera}_{modality} frames (cameras {list(self.image_cameras)},"
                f" modalities {list(self.modalities)})"
            )
        if not 0 <= index < self.num_frames:
            raise IndexError(f"{self.key}: frame {index} outside 0..{self.num_frames - 1}")
        return self.frames.read(camera, modality, index)

    def rgb(self, camera: str, index: int) -> np.ndarray:
        """HxWx3 uint8 colour image."""
        return codecs.decode_png(self.png(camera, "rgb", index))

    def depth(self, camera: str, index: int) -> np.ndarray:
        """HxW float32 depth in metres, using that frame's near/far planes."""
        params = self.cameras[camera]
        return codecs.depth_from_rgb(
            codecs.decode_png(self.png(camera, "depth", index)),
            float(params.near[index]),
            float(params.far[index]),
        )

    def mask(self, camera: str, index: int) -> np.ndarray:
        """HxW int32 simulator object handles; names via `mask_names[camera]`."""
        return codecs.mask_from_rgb(codecs.decode_png(self.png(camera, "mask", index)))

    def point_cloud(self, camera: str, index: int) -> np.ndarray:
        """HxWx3 float64 world-frame points rebuilt from depth and camera parameters."""
        params = self.cameras[camera]
        return codecs.point_cloud(
            self.depth(camera, index), params.intrinsics[index], params.extrinsics[index]
        )
