"""Light views of one episode, from a shard sample or from an RLBench folder (no torch: the
evaluator's replay agent reads keyframe actions through them too).

Expanding an episode into training samples needs only its identity, descriptions, frame
count, keyframes, a few low-dim arrays and the PNG bytes of the frames a sample uses.
`ShardEpisode` gets them straight from a raw WebDataset sample: it parses the small JSON
eagerly, the low-dim npz only on first use (dynamics pairs never need it) and hands out PNG
bytes without copying or decoding them. Building a full `agnostos.shards.Episode` instead
(`sample_to_episode`) would parse every array and index every frame of every camera.
`FolderEpisode` wraps the `Episode` that `read_episode` builds from a folder. Both answer
the same questions with the same values, which the tests check against the Episode API.
Code written against the Episode API itself (X-ICM's observation text) gets one from
`as_episode`, a shallow one over the same bytes for shard samples.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agnostos.shards.episode import (
    CORE_LOW_DIM_FIELDS,
    MODALITIES,
    CameraParams,
    Episode,
    LowDim,
)
from agnostos.shards.folders import EpisodeError, EpisodeLocation, read_episode
from agnostos.shards.pickles import PickleReadError, PickleRefusedError
from agnostos.shards.samples import (
    JSON_EXT,
    LOW_DIM_EXT,
    READABLE_FORMAT_VERSIONS,
    frame_ext,
    load_json,
)

_CAMERA_PARTS = ("intrinsics", "extrinsics", "near", "far")

_EPISODE_PREFIX = "episode"


class SampleDataError(ValueError):
    """A sample's data is missing or corrupt; the message names the shard/folder and key."""


class EpisodeView(Protocol):
    """What sample expansion needs from an episode, wherever it is stored."""

    key: str
    origin: str
    task: str
    variation: int
    episode: int
    descriptions: tuple[str, ...]
    num_frames: int
    keyframes: tuple[int, ...]

    def png(self, camera: str, modality: str, index: int) -> bytes: ...

    def low_dim(self, name: str) -> np.ndarray | None: ...

    def as_episode(self, cameras: Sequence[str]) -> Episode: ...


class ShardEpisode:
    """An episode view over a raw WebDataset sample (bytes per field)."""

    def __init__(self, sample: Mapping[str, Any]):
        self.sample = sample
        self._loaded: dict[str, np.ndarray | None] = {}
        self.key = str(sample.get("__key__", "?"))
        self.origin = str(sample.get("__url__", "<shard>"))
        try:
            meta = load_json(sample[JSON_EXT])
            if meta.get("format_version") not in READABLE_FORMAT_VERSIONS:
                raise ValueError(f"unsupported format_version {meta.get('format_version')!r}")
            self.task: str = meta["task"]
            self.variation: int = int(meta["variation"])
            self.episode: int = int(meta["episode"])
            self.descriptions: tuple[str, ...] = tuple(meta["descriptions"])
            self.num_frames: int = int(meta["num_frames"])
            self.keyframes: tuple[int, ...] = tuple(int(k) for k in meta["keyframes"])
            self._mask_names = meta.get("mask_names", {})
            self._variation_folder = str(meta.get("variation_folder", "all_variations"))
        except KeyError as err:
            raise SampleDataError(f"{self._where}: missing field {err}") from None
        except (ValueError, TypeError, AttributeError) as err:
            raise SampleDataError(f"{self._where}: cannot read metadata ({err})") from err
        if not self.descriptions:
            raise SampleDataError(f"{self._where}: the episode has no descriptions")

    @property
    def _where(self) -> str:
        return f"{self.origin}: sample '{self.key}'"

    def png(self, camera: str, modality: str, index: int) -> bytes:
        field = frame_ext(camera, modality, index)
        try:
            return self.sample[field]
        except KeyError:
            raise SampleDataError(f"{self._where}: no field '{field}'") from None

    @cached_property
    def _arrays(self) -> Any:
        try:
            return np.load(io.BytesIO(self.sample[LOW_DIM_EXT]), allow_pickle=False)
        except KeyError:
            raise SampleDataError(f"{self._where}: no field '{LOW_DIM_EXT}'") from None
        except Exception as err:
            raise SampleDataError(f"{self._where}: cannot read {LOW_DIM_EXT} ({err})") from err

    def low_dim(self, name: str) -> np.ndarray | None:
        """One low-dim array by its Episode name (None when the episode lacks it)."""
        if name in self._loaded:
            return self._loaded[name]
        arrays = self._arrays
        value = None
        if name in arrays.files:
            try:
                value = arrays[name]  # an NpzFile parses the member again on every access
            except Exception as err:
                raise SampleDataError(
                    f"{self._where}: cannot read {LOW_DIM_EXT}/{name} ({err})"
                ) from err
        self._loaded[name] = value
        return value

    def as_episode(self, cameras: Sequence[str]) -> Episode:
        """An `Episode` over this sample's frames of `cameras`, for code written against
        the Episode API (X-ICM's observation text); nothing is decoded until asked for.

        It holds the four core low-dim arrays, the cameras' parameters and mask names, and
        serves each camera's rgb, depth and mask PNGs from the sample (a member the reader
        did not fetch is a `SampleDataError` naming it).
        """
        arrays = {}
        for name in CORE_LOW_DIM_FIELDS:
            value = self.low_dim(name)
            if value is None:
                raise SampleDataError(f"{self._where}: no low-dim array '{name}'")
            arrays[name] = value
        params = {}
        for camera in cameras:
            parts = {part: self.low_dim(f"{camera}_camera_{part}") for part in _CAMERA_PARTS}
            if any(value is None for value in parts.values()):
                raise SampleDataError(f"{self._where}: no camera parameters for '{camera}'")
            params[camera] = CameraParams(**parts)
        return Episode(
            task=self.task,
            variation=self.variation,
            episode=self.episode,
            descriptions=self.descriptions,
            num_frames=self.num_frames,
            low_dim=LowDim.from_arrays(arrays),
            cameras=params,
            mask_names={
                camera: {int(handle): name for handle, name in names.items()}
                for camera, names in self._mask_names.items()
            },
            random_state=None,
            keyframes=self.keyframes,
            image_cameras=tuple(cameras),
            modalities=MODALITIES,
            frames=_ViewFrames(self),
            source=self.origin,
            variation_folder=self._variation_folder,
        )


@dataclass(frozen=True)
class _ViewFrames:
    """`FrameStore` over a view's PNG bytes."""

    view: ShardEpisode

    def read(self, camera: str, modality: str, index: int) -> bytes:
        return self.view.png(camera, modality, index)


@dataclass(frozen=True)
class FolderEpisode:
    """An episode view over an `Episode` read from its RLBench folder."""

    data: Episode
    origin: str

    @property
    def key(self) -> str:
        return self.data.key

    @property
    def task(self) -> str:
        return self.data.task

    @property
    def variation(self) -> int:
        return self.data.variation

    @property
    def episode(self) -> int:
        return self.data.episode

    @property
    def descriptions(self) -> tuple[str, ...]:
        return self.data.descriptions

    @property
    def num_frames(self) -> int:
        return self.data.num_frames

    @property
    def keyframes(self) -> tuple[int, ...]:
        return self.data.keyframes

    def png(self, camera: str, modality: str, index: int) -> bytes:
        try:
            return self.data.png(camera, modality, index)
        except OSError as err:
            raise SampleDataError(
                f"{self.origin}: cannot read {camera}_{modality}/{index}.png ({err})"
            ) from err

    def low_dim(self, name: str) -> np.ndarray | None:
        return self.data.low_dim.arrays().get(name)

    def as_episode(self, cameras: Sequence[str]) -> Episode:
        """The `Episode` itself (it serves the cameras and modalities the reader checked)."""
        return self.data


def location_of(root: str | Path, key: str) -> EpisodeLocation:
    """The folder of the episode with sample key `<task>/<variation folder>/episode<N>`."""
    parts = key.split("/")
    if len(parts) != 3 or not parts[2].startswith(_EPISODE_PREFIX):
        raise ValueError(f"'{key}' is not an episode key (<task>/<variation folder>/episode<N>)")
    try:
        number = int(parts[2][len(_EPISODE_PREFIX) :])
    except ValueError:
        raise ValueError(f"'{key}' is not an episode key (bad episode number)") from None
    return EpisodeLocation(Path(root), parts[0], parts[1], number)


@dataclass(frozen=True)
class ToShardEpisodes:
    """Pipeline stage: raw WebDataset samples -> `ShardEpisode` views."""

    def __call__(self, samples: Iterable[Mapping[str, Any]]) -> Iterator[ShardEpisode]:
        for sample in samples:
            yield ShardEpisode(sample)


@dataclass(frozen=True)
class ReadFolderEpisodes:
    """Pipeline stage: `{"url": <episode key>}` dicts -> `FolderEpisode` views.

    Only the cameras the samples use are checked and served, and only their RGB frames.
    """

    root: str
    cameras: tuple[str, ...]
    modalities: tuple[str, ...] = ("rgb",)

    def read(self, key: str) -> FolderEpisode:
        location = location_of(self.root, key)
        try:
            episode = read_episode(location, self.cameras, self.modalities)
        except (EpisodeError, PickleReadError, PickleRefusedError, OSError) as err:
            raise SampleDataError(f"{location.path}: episode '{key}': {err}") from err
        return FolderEpisode(episode, str(location.path))

    def __call__(self, items: Iterable[Mapping[str, Any]]) -> Iterator[FolderEpisode]:
        for item in items:
            yield self.read(item["url"])


def keyframe_action(view: EpisodeView, frame: int) -> np.ndarray:
    """The 9-dim RLBench action that reaches keyframe `frame`.

    Pose and gripper state come from the keyframe itself; `ignore_collisions` from the frame
    before it, as PerAct's `_get_action` reads it. Episodes recorded without that field
    (upstream RLBench) get 1.0, the value X-ICM always sends.
    """
    pose = view.low_dim("gripper_pose")
    gripper = view.low_dim("gripper_open")
    if pose is None or gripper is None:
        raise SampleDataError(f"{view.origin}: sample '{view.key}': no gripper_pose/gripper_open")
    ignore = view.low_dim("ignore_collisions")
    collide = 1.0 if ignore is None else float(np.reshape(ignore, -1)[max(0, frame - 1)])
    return np.concatenate(
        [np.asarray(pose[frame], dtype=np.float64), [float(gripper[frame]), collide]]
    )


def keyframe_actions(view: EpisodeView) -> np.ndarray:
    """(K, 9) actions of every keyframe of an episode."""
    return (
        np.stack([keyframe_action(view, k) for k in view.keyframes])
        if view.keyframes
        else (np.zeros((0, 9)))
    )
