"""One episode as one WebDataset sample, and back.

A sample with key `<task>/<variation folder>/episode<N>` holds, in this order:
- `<camera>_<modality>.<i>.png`: the original PNG bytes, unchanged;
- `json`: metadata (task, variation, episode, descriptions, frame count, keyframes,
  cameras, modalities, image size, source path, mask names, random-state scalars);
- `low_dim.npz`: low-dim arrays, per-frame camera parameters and the RNG key array.

Everything is encoded deterministically (sorted JSON, zip entries with a fixed date), so
the same episode always gives the same bytes. Nothing is pickled: shards load with any
numpy version.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from agnostos.shards.episode import CameraParams, Episode, LowDim, MemoryFrames, RandomState

FORMAT_VERSION = 1
JSON_EXT = "json"
LOW_DIM_EXT = "low_dim.npz"
_CAMERA_ARRAY_PARTS = ("intrinsics", "extrinsics", "near", "far")
_RANDOM_KEYS = "random_state_keys"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class SampleError(ValueError):
    """A shard sample cannot be turned back into an Episode; names the shard and key."""


def frame_ext(camera: str, modality: str, index: int) -> str:
    """The sample field (file extension) of one PNG frame."""
    return f"{camera}_{modality}.{index}.png"


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed .npz with sorted entries and fixed timestamps (byte-reproducible)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
    return buffer.getvalue()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def episode_metadata(episode: Episode, image_size: tuple[int, int]) -> dict[str, Any]:
    """The JSON-able facts of an episode (everything but arrays and frames)."""
    state = episode.random_state
    return {
        "format_version": FORMAT_VERSION,
        "task": episode.task,
        "variation": episode.variation,
        "variation_folder": episode.variation_folder,
        "episode": episode.episode,
        "descriptions": list(episode.descriptions),
        "num_frames": episode.num_frames,
        "keyframes": list(episode.keyframes),
        "cameras": list(episode.image_cameras),
        "modalities": list(episode.modalities),
        "camera_params": sorted(episode.cameras),
        "image_size": list(image_size),
        "source": episode.source,
        "mask_names": {
            camera: {str(handle): name for handle, name in names.items()}
            for camera, names in episode.mask_names.items()
        },
        "random_state": None
        if state is None
        else {
            "bit_generator": state.bit_generator,
            "position": state.position,
            "has_gauss": state.has_gauss,
            "cached_gaussian": state.cached_gaussian,
        },
    }


def episode_arrays(episode: Episode) -> dict[str, np.ndarray]:
    """Low-dim fields, `<camera>_camera_<part>` parameters and the RNG keys, by npz name."""
    arrays = dict(episode.low_dim.arrays())
    for camera, params in episode.cameras.items():
        for part in _CAMERA_ARRAY_PARTS:
            arrays[f"{camera}_camera_{part}"] = getattr(params, part)
    if episode.random_state is not None:
        arrays[_RANDOM_KEYS] = episode.random_state.keys
    return arrays


def iter_frame_fields(episode: Episode) -> Iterator[tuple[str, str, int]]:
    """(camera, modality, index) of every stored frame, in sample order."""
    for camera in episode.image_cameras:
        for modality in episode.modalities:
            for index in range(episode.num_frames):
                yield camera, modality, index


def metadata_fields(episode: Episode, image_size: tuple[int, int]) -> dict[str, bytes]:
    """The two non-frame fields of a sample: JSON metadata and the low-dim npz."""
    metadata = episode_metadata(episode, image_size)
    return {
        JSON_EXT: json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode("utf-8"),
        LOW_DIM_EXT: npz_bytes(episode_arrays(episode)),
    }


def episode_to_sample(episode: Episode, image_size: tuple[int, int]) -> dict[str, Any]:
    """A WebDataset sample dict (`__key__` + bytes per field): frames first, then metadata.

    Frames come first because the image size recorded in the metadata is only known once
    the frames have been read; the converter writes members in this same order.
    """
    sample: dict[str, Any] = {"__key__": episode.key}
    for camera, modality, index in iter_frame_fields(episode):
        sample[frame_ext(camera, modality, index)] = episode.png(camera, modality, index)
    sample.update(metadata_fields(episode, image_size))
    return sample


def sample_to_episode(sample: Mapping[str, Any]) -> Episode:
    """Rebuild the Episode stored in a WebDataset sample (raw bytes per field)."""
    origin = f"{sample.get('__url__', '<shard>')}: sample '{sample.get('__key__', '?')}'"
    try:
        meta = json.loads(sample[JSON_EXT])
        arrays = load_npz(sample[LOW_DIM_EXT])
    except KeyError as err:
        raise SampleError(f"{origin}: missing field {err}") from None
    except Exception as err:
        raise SampleError(
            f"{origin}: cannot decode metadata ({type(err).__name__}: {err})"
        ) from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise SampleError(f"{origin}: unsupported format_version {meta.get('format_version')}")

    frames: dict[tuple[str, str, int], bytes] = {}
    for camera in meta["cameras"]:
        for modality in meta["modalities"]:
            for index in range(meta["num_frames"]):
                field = frame_ext(camera, modality, index)
                if field not in sample:
                    raise SampleError(f"{origin}: missing frame field '{field}'")
                frames[(camera, modality, index)] = bytes(sample[field])

    cameras = {
        camera: CameraParams(
            **{part: arrays.pop(f"{camera}_camera_{part}") for part in _CAMERA_ARRAY_PARTS}
        )
        for camera in meta["camera_params"]
    }
    state_meta = meta["random_state"]
    random_state = None
    if state_meta is not None:
        random_state = RandomState(keys=arrays.pop(_RANDOM_KEYS), **state_meta)
    return Episode(
        task=meta["task"],
        variation=meta["variation"],
        episode=meta["episode"],
        descriptions=tuple(meta["descriptions"]),
        num_frames=meta["num_frames"],
        low_dim=LowDim.from_arrays(arrays),
        cameras=cameras,
        mask_names={
            camera: {int(handle): name for handle, name in names.items()}
            for camera, names in meta["mask_names"].items()
        },
        random_state=random_state,
        keyframes=tuple(meta["keyframes"]),
        image_cameras=tuple(meta["cameras"]),
        modalities=tuple(meta["modalities"]),
        frames=MemoryFrames(frames, origin=origin),
        source=meta["source"],
        variation_folder=meta["variation_folder"],
    )
