"""RLBench episode folders: finding them, reading them into Episodes, and writing them.

Layouts read (rlbench_format.md section 1):
- PerAct fork / AGNOSTOS: `<root>/<task>/all_variations/episodes/episode<N>/`
- per-variation: `<root>/<task>/variation<K>/episodes/episode<N>/`; upstream RLBench keeps
  `variation_descriptions.pkl` in the variation folder rather than the episode folder.

Frame files are `<camera>_<modality>/<i>.png` with no zero padding, so they are ordered
numerically. Every problem raises `EpisodeError` naming the episode folder and the file.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agnostos.shards.episode import (
    CAMERAS,
    CORE_LOW_DIM_FIELDS,
    MODALITIES,
    OFFSETS_SUFFIX,
    CameraParams,
    Episode,
    FolderFrames,
    LowDim,
    RandomState,
)
from agnostos.shards.keyframes import discover_keyframes
from agnostos.shards.pickles import Demo, dump_pickle, load_pickle, make_demo, make_observation

LOW_DIM_PICKLE = "low_dim_obs.pkl"
VARIATION_NUMBER = "variation_number.pkl"
VARIATION_DESCRIPTIONS = "variation_descriptions.pkl"
ALL_VARIATIONS = "all_variations"

_EPISODE_DIR = re.compile(r"^episode(\d+)$")
_VARIATION_DIR = re.compile(r"^variation(\d+)$")
_FRAME_FILE = re.compile(r"^(\d+)\.png$")
_CAMERA_MISC = re.compile(r"^(.+)_camera_(intrinsics|extrinsics|near|far)$")
_MASK_NAMES_MISC = re.compile(r"^(.+)_mask_id_to_name$")


class EpisodeError(ValueError):
    """An episode folder cannot be read; the message names the folder and file."""


@dataclass(frozen=True)
class EpisodeLocation:
    """Where one episode lives under a dataset root."""

    root: Path
    task: str
    variation_folder: str
    episode: int

    @property
    def relative(self) -> str:
        return f"{self.task}/{self.variation_folder}/episodes/episode{self.episode}"

    @property
    def path(self) -> Path:
        return self.root / self.relative

    @classmethod
    def from_path(cls, path: str | Path) -> EpisodeLocation:
        """The location of `<root>/<task>/<variation folder>/episodes/episode<N>`."""
        path = Path(path)
        match = _EPISODE_DIR.match(path.name)
        variation = path.parent.parent
        if (
            match is None
            or path.parent.name != "episodes"
            or not (variation.name == ALL_VARIATIONS or _VARIATION_DIR.match(variation.name))
        ):
            raise EpisodeError(
                f"{path}: not an episode folder (expected "
                f"<task>/{ALL_VARIATIONS}|variation<K>/episodes/episode<N>)"
            )
        return cls(variation.parent.parent, variation.parent.name, variation.name, int(match[1]))


def _variation_order(name: str) -> tuple[int, int]:
    if name == ALL_VARIATIONS:
        return (0, 0)
    return (1, int(_VARIATION_DIR.match(name).group(1)))


def list_tasks(root: str | Path) -> list[str]:
    """Task folders under `root` that hold episodes, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root is not a directory")
    return sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and any(_variation_folders(entry))
    )


def _variation_folders(task_dir: Path) -> Iterable[Path]:
    for entry in task_dir.iterdir():
        if (
            entry.is_dir()
            and (entry.name == ALL_VARIATIONS or _VARIATION_DIR.match(entry.name))
            and (entry / "episodes").is_dir()
        ):
            yield entry


def discover_episodes(
    root: str | Path, tasks: Sequence[str] | None = None
) -> list[EpisodeLocation]:
    """Every episode under `root`, ordered by task, variation folder, then episode number.

    `tasks` restricts (and orders) the tasks; a requested task without episodes is an error.
    """
    root = Path(root)
    available = list_tasks(root)
    if tasks is None:
        tasks = available
    else:
        unknown = [task for task in tasks if task not in available]
        if unknown:
            raise FileNotFoundError(
                f"{root}: no episodes for task(s) {', '.join(unknown)}; found {available}"
            )
    locations: list[EpisodeLocation] = []
    for task in tasks:
        folders = sorted(
            _variation_folders(root / task), key=lambda path: _variation_order(path.name)
        )
        for folder in folders:
            numbers = sorted(
                int(match.group(1))
                for entry in (folder / "episodes").iterdir()
                if entry.is_dir() and (match := _EPISODE_DIR.match(entry.name))
            )
            locations.extend(EpisodeLocation(root, task, folder.name, n) for n in numbers)
    return locations


def frame_indices(folder: Path) -> list[int]:
    """The frame numbers present in one image folder, sorted numerically."""
    return sorted(
        int(match.group(1)) for name in _listdir(folder) if (match := _FRAME_FILE.match(name))
    )


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        raise EpisodeError(f"{folder}: image folder is missing") from None


@functools.lru_cache(maxsize=8)
def _frame_names(num_frames: int) -> frozenset[str]:
    return frozenset(f"{index}.png" for index in range(num_frames))


def check_frame_folders(
    episode_dir: Path, cameras: Sequence[str], modalities: Sequence[str], num_frames: int
) -> None:
    """Each requested image folder must hold exactly frames 0..num_frames-1."""
    expected = _frame_names(num_frames)
    for camera in cameras:
        for modality in modalities:
            folder = episode_dir / f"{camera}_{modality}"
            names = _listdir(folder)
            if len(names) == num_frames and expected.issuperset(names):
                continue  # the common case, without parsing ~2,000 names per episode
            present = frame_indices(folder)
            if len(present) != num_frames:
                raise EpisodeError(
                    f"{folder}: {len(present)} frames on disk but {LOW_DIM_PICKLE} has "
                    f"{num_frames} observations"
                )
            if present != list(range(num_frames)):
                missing = sorted(set(range(num_frames)) - set(present))
                raise EpisodeError(f"{folder / f'{missing[0]}.png'}: frame file is missing")


def read_episode(
    location: EpisodeLocation | str | Path,
    cameras: Sequence[str] = CAMERAS,
    modalities: Sequence[str] = MODALITIES,
    check_frames: bool = True,
) -> Episode:
    """Read one episode folder: pickles eagerly, PNG frames lazily.

    `location` is an `EpisodeLocation` (from `discover_episodes`) or the episode folder's
    path, `<root>/<task>/all_variations/episodes/episode<N>`.
    """
    if not isinstance(location, EpisodeLocation):
        location = EpisodeLocation.from_path(location)
    episode_dir = location.path
    if not episode_dir.is_dir():
        raise EpisodeError(f"{episode_dir}: episode folder does not exist")
    demo = load_pickle(episode_dir / LOW_DIM_PICKLE)
    if not isinstance(demo, Demo) or not isinstance(getattr(demo, "_observations", None), list):
        raise EpisodeError(f"{episode_dir / LOW_DIM_PICKLE}: not an RLBench Demo")
    observations = demo._observations
    if not observations:
        raise EpisodeError(f"{episode_dir / LOW_DIM_PICKLE}: the demo has no observations")
    if check_frames:
        check_frame_folders(episode_dir, cameras, modalities, len(observations))

    low_dim = _stack_low_dim(observations, episode_dir / LOW_DIM_PICKLE)
    seed = getattr(demo, "random_seed", None)
    return Episode(
        task=location.task,
        variation=_read_variation(episode_dir, location.variation_folder),
        episode=location.episode,
        descriptions=_read_descriptions(episode_dir),
        num_frames=len(observations),
        low_dim=low_dim,
        cameras=_camera_params(observations, episode_dir / LOW_DIM_PICKLE),
        mask_names=_mask_names(observations, episode_dir / LOW_DIM_PICKLE),
        random_state=RandomState.from_tuple(seed) if seed is not None else None,
        keyframes=tuple(discover_keyframes(low_dim.gripper_open, low_dim.joint_velocities)),
        image_cameras=tuple(cameras),
        modalities=tuple(modalities),
        frames=FolderFrames(episode_dir),
        source=location.relative,
        variation_folder=location.variation_folder,
    )


def _read_variation(episode_dir: Path, variation_folder: str) -> int:
    path = episode_dir / VARIATION_NUMBER
    if path.exists():
        value = load_pickle(path)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        raise EpisodeError(f"{path}: expected an int, found {type(value).__name__}")
    match = _VARIATION_DIR.match(variation_folder)
    if match:  # upstream layout: the folder name is the variation
        return int(match.group(1))
    raise EpisodeError(f"{path}: missing, and '{variation_folder}' does not name a variation")


def _read_descriptions(episode_dir: Path) -> tuple[str, ...]:
    candidates = [
        episode_dir / VARIATION_DESCRIPTIONS,
        episode_dir.parent.parent / VARIATION_DESCRIPTIONS,
    ]
    for path in candidates:
        if path.exists():
            value = load_pickle(path)
            if (
                isinstance(value, (list, tuple))
                and value
                and all(isinstance(text, str) for text in value)
            ):
                return tuple(value)
            raise EpisodeError(f"{path}: expected a non-empty list of strings")
    raise EpisodeError(f"{candidates[0]}: missing (also looked for {candidates[1]})")


def _per_frame(values: list[Any], name: str, source: Path) -> dict[str, np.ndarray] | None:
    """Stack one numeric per-frame field; ragged fields get flat values plus offsets.

    Returns None for a field that is None in every frame (RLBench's image attributes).
    """
    if all(value is None for value in values):
        return None
    if any(value is None for value in values):
        raise EpisodeError(f"{source}: field '{name}' is missing in some frames")
    try:  # the common case, equal shapes: one call for all frames
        stacked = np.array(values)
    except ValueError:  # ragged
        stacked = None
    if stacked is not None and stacked.dtype.kind in "biuf":
        return {name: stacked}
    arrays = [np.asarray(value) for value in values]
    if any(array.dtype.kind not in "biuf" for array in arrays):
        raise EpisodeError(f"{source}: field '{name}' is not numeric")
    if all(array.shape == arrays[0].shape for array in arrays):
        return {name: np.stack(arrays)}
    flat = [array.reshape(-1) for array in arrays]
    offsets = np.concatenate([[0], np.cumsum([len(array) for array in flat])]).astype(np.int64)
    return {name: np.concatenate(flat), name + OFFSETS_SUFFIX: offsets}


def _stack_low_dim(observations: list[Any], source: Path) -> LowDim:
    names = sorted({name for obs in observations for name in vars(obs) if name != "misc"})
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        stacked = _per_frame([getattr(obs, name, None) for obs in observations], name, source)
        if stacked is not None:
            arrays.update(stacked)
    all_misc = {name for obs in observations for name in getattr(obs, "misc", {})}
    misc_names = sorted(
        name
        for name in all_misc  # each distinct key once, not once per frame
        if not _CAMERA_MISC.match(name) and not _MASK_NAMES_MISC.match(name)
    )
    for name in misc_names:
        values = [getattr(obs, "misc", {}).get(name) for obs in observations]
        stacked = _per_frame(values, f"misc.{name}", source)
        if stacked is not None:
            arrays.update(stacked)
    missing = [name for name in CORE_LOW_DIM_FIELDS if name not in arrays]
    if missing:
        raise EpisodeError(f"{source}: observations lack {', '.join(missing)}")
    arrays["gripper_open"] = arrays["gripper_open"].astype(np.float64).reshape(-1)
    if "ignore_collisions" in arrays:
        arrays["ignore_collisions"] = arrays["ignore_collisions"].astype(np.float64).reshape(-1)
    return LowDim.from_arrays(arrays)


def _camera_params(observations: list[Any], source: Path) -> dict[str, CameraParams]:
    misc0 = getattr(observations[0], "misc", {})
    cameras = sorted({m.group(1) for name in misc0 if (m := _CAMERA_MISC.match(name))})
    params: dict[str, CameraParams] = {}
    for camera in cameras:
        fields = {}
        for part in ("intrinsics", "extrinsics", "near", "far"):
            key = f"{camera}_camera_{part}"
            try:
                values = [obs.misc[key] for obs in observations]
            except (KeyError, AttributeError):
                raise EpisodeError(f"{source}: misc['{key}'] is missing in some frames") from None
            try:
                fields[part] = np.array(values, dtype=np.float64)  # one call for all frames
            except ValueError:
                raise EpisodeError(f"{source}: misc['{key}'] changes shape across frames") from None
        params[camera] = CameraParams(**fields)
    return params


@functools.lru_cache(maxsize=256)
def _mask_names_camera(misc_key: str) -> str | None:
    """The camera of a `<camera>_mask_id_to_name` misc key (None for other keys); cached,
    as the same few keys recur in every frame of every episode."""
    match = _MASK_NAMES_MISC.match(misc_key)
    return match.group(1) if match else None


def _mask_names(observations: list[Any], source: Path) -> dict[str, dict[int, str]]:
    """Union over frames of each camera's `<cam>_mask_id_to_name` (X-ICM fork data).

    Handles are CoppeliaSim object ids, so one id names one object for the whole episode;
    a contradiction is reported rather than resolved.
    """
    names: dict[str, dict[int, str]] = {}
    for index, obs in enumerate(observations):
        for key, mapping in getattr(obs, "misc", {}).items():
            camera = _mask_names_camera(key)
            if camera is None:
                continue
            camera_names = names.setdefault(camera, {})
            for handle, name in dict(mapping).items():
                handle_int = int(float(handle))
                if camera_names.setdefault(handle_int, str(name)) != str(name):
                    raise EpisodeError(
                        f"{source}: frame {index} {key} names handle {handle_int} "
                        f"'{name}', earlier frames '{camera_names[handle_int]}'"
                    )
    return {camera: dict(sorted(mapping.items())) for camera, mapping in sorted(names.items())}


# -- writing ------------------------------------------------------------------------------


def write_episode_folder(
    episode_dir: str | Path,
    observations: Sequence[dict[str, Any]],
    images: dict[tuple[str, str], Sequence[bytes]],
    descriptions: Sequence[str],
    variation: int,
    random_seed: tuple | None,
) -> Path:
    """Write one episode in the PerAct-fork on-disk layout.

    `observations` holds each frame's Observation attributes (low-dim fields and `misc`);
    the 20 image attributes are set to None, as RLBench's generator does. `images` maps
    (camera, modality) to the T encoded PNGs. Used by minibench and the test helpers.
    """
    episode_dir = Path(episode_dir)
    episode_dir.mkdir(parents=True, exist_ok=True)
    for (camera, modality), frames in images.items():
        if len(frames) != len(observations):
            raise ValueError(
                f"{camera}_{modality}: {len(frames)} frames for {len(observations)} observations"
            )
        folder = episode_dir / f"{camera}_{modality}"
        folder.mkdir(exist_ok=True)
        for index, data in enumerate(frames):
            (folder / f"{index}.png").write_bytes(data)
    empty_images = {f"{c}_{m}": None for c in CAMERAS for m in (*MODALITIES, "point_cloud")}
    demo = make_demo(
        [make_observation(**empty_images, **attributes) for attributes in observations],
        random_seed,
    )
    (episode_dir / LOW_DIM_PICKLE).write_bytes(dump_pickle(demo))
    (episode_dir / VARIATION_DESCRIPTIONS).write_bytes(dump_pickle(list(descriptions)))
    (episode_dir / VARIATION_NUMBER).write_bytes(dump_pickle(int(variation)))
    return episode_dir
