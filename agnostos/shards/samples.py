"""One episode as one WebDataset sample, and back.

A sample with key `<task>/<variation folder>/episode<N>` holds, in this order:
- `json`: metadata (task, variation, episode, descriptions, frame count, keyframes,
  cameras, modalities, image size, source path, mask names, random-state scalars) and the
  sample's member index (below);
- `<camera>_<modality>.<i>.png`: the original PNG bytes, unchanged;
- `low_dim.npz`: low-dim arrays, per-frame camera parameters and the RNG key array.

The member index (format version 2) lets a reader that has read the json jump straight
to the members it needs instead of walking ~1,900 tar headers per episode. It is
`{"length": L, "members": "<field>,<offset>,<size>;..."}`: for every later member of the
sample, in tar order, its data offset and size in bytes, counted from the end of the json
member (the first byte of the next tar header), so the json's own size never matters; `L`
is the byte length of everything after the json member. Why a `;`-separated string and
not a JSON object: a 1,900-entry object costs ~0.7 ms to parse, a string ~0.05 ms, and a
reader needs two of its entries (see docs/data.md).

Version 1 samples (frames first, json after them, no index) are still read: readers fall
back to walking their tar headers.

Everything is encoded deterministically (sorted JSON, zip entries with a fixed date), so
the same episode always gives the same bytes. Nothing is pickled: shards load with any
numpy version.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agnostos.shards.episode import CameraParams, Episode, LowDim, MemoryFrames, RandomState

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # 1: frames first, no member index
JSON_EXT = "json"
INDEX_KEY = "index"
_BLOCK = 512  # tar block: a member is a 512-byte header, then its data padded to 512
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


def episode_metadata(
    episode: Episode, image_size: tuple[int, int], index: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON-able facts of an episode (everything but arrays and frames), and the member
    index of the sample's later members when given."""
    state = episode.random_state
    metadata = {
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
    if index is not None:
        metadata[INDEX_KEY] = dict(index)
    return metadata


def metadata_json(
    episode: Episode, image_size: tuple[int, int], index: Mapping[str, Any] | None = None
) -> bytes:
    """The sample's `json` field: sorted, compact JSON (byte-reproducible)."""
    metadata = episode_metadata(episode, image_size, index)
    return json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode("utf-8")


class ParsedJson(bytes):
    """The bytes of a json member, carrying the reader's parse of them in `value`.

    Why: a reader must parse a sample's json to use its member index (~60 KB for an
    all-camera episode, ~40 us), and the consumer needs the same metadata; this hands the
    parse over instead of repeating it. It is equal to, and usable as, the plain bytes;
    `value` is shared, so treat it as read-only. `load_json` takes either.
    """

    value: Any

    def __new__(cls, data: bytes, value: Any) -> ParsedJson:
        self = super().__new__(cls, data)
        self.value = value
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return ParsedJson, (bytes(self), self.value)


def load_json(data: bytes) -> Any:
    """A json member's value: the reader's parse when it made one, else parsed now."""
    return data.value if isinstance(data, ParsedJson) else json.loads(data)


# -- the member index ------------------------------------------------------------------------


def tar_spans(sizes: Sequence[int]) -> tuple[list[tuple[int, int]], int]:
    """(data start, data end) of consecutive tar members of these sizes, counted from the
    first one's header, and their total length (headers and padding included)."""
    spans, at = [], 0
    for size in sizes:
        spans.append((at + _BLOCK, at + _BLOCK + size))
        at += _BLOCK + size + (-size % _BLOCK)
    return spans, at


def member_index(
    fields: Sequence[str], spans: Sequence[tuple[int, int]], length: int
) -> dict[str, Any]:
    """The index stored in the json: each later member's field, data offset and size,
    counted from the end of the json member, and the length of all of them."""
    table = ";".join(
        [
            f"{field},{start},{end - start}"
            for field, (start, end) in zip(fields, spans, strict=True)
        ]
    )
    # Separators inside a field name would corrupt the table; one C-speed count checks all.
    if fields and (table.count(";") != len(fields) - 1 or table.count(",") != 2 * len(fields)):
        bad = next(field for field in fields if "," in field or ";" in field)
        raise ValueError(f"field {bad!r} cannot be indexed: ',' and ';' separate index entries")
    return {"length": length, "members": table}


@dataclass(frozen=True)
class MemberIndex:
    """A parsed member index: look up where a field's bytes are, relative to `base`.

    Lookups search the `;`-separated table as a string (a few microseconds for a
    1,900-member episode); nothing is split up front. Every entry returned is checked to
    lie inside the sample (a data offset at or past the first header's end, data ending
    within `length`); a reader still checks the tar header at each entry before trusting it.
    Malformed tables raise `ValueError`, which readers report with the shard and key.
    """

    table: str
    length: int

    @classmethod
    def of(cls, metadata: Any) -> MemberIndex | None:
        """The index in parsed sample metadata; None for samples written without one."""
        index = metadata.get(INDEX_KEY) if isinstance(metadata, dict) else None
        if index is None:
            return None
        table = index.get("members") if isinstance(index, dict) else None
        length = index.get("length") if isinstance(index, dict) else None
        if not isinstance(table, str) or type(length) is not int or length < 0:
            raise ValueError("malformed member index (expected members: str, length: int)")
        return cls(table, length)

    def _entry(self, record: str) -> tuple[str, int, int]:
        field, offset, size = record.rsplit(",", 2)
        try:
            start, count = int(offset), int(size)
        except ValueError:
            raise ValueError(f"malformed member index entry {record!r}") from None
        if start < _BLOCK or count < 0 or start + count > self.length:
            raise ValueError(
                f"member index entry {record!r} lies outside the sample ({self.length} bytes)"
            )
        return field, start, count

    def _next(self, head: str, start: int) -> int:
        """Where the first record at or after record start `start` that begins with `head`
        starts; -1 when there is none."""
        if self.table.startswith(head, start):
            return start
        hit = self.table.find(";" + head, start)
        return hit + 1 if hit >= 0 else -1

    def _record_at(self, position: int) -> tuple[str, int]:
        """The record starting at `position`, and where the next one starts."""
        end = self.table.find(";", position)
        if end < 0:
            return self.table[position:], len(self.table)
        return self.table[position:end], end + 1

    def find(self, field: str) -> tuple[str, int, int] | None:
        """(field, data offset, size) of one field, or None when the sample lacks it."""
        position = self._next(field + ",", 0)
        return None if position < 0 else self._entry(self._record_at(position)[0])

    def entries(self, prefixes: Sequence[str] | None = None) -> list[tuple[str, int, int]]:
        """(field, data offset, size) of every member, or of those whose field starts with
        one of `prefixes` (grouped by prefix, in index order within each)."""
        if not self.table:
            return []
        if prefixes is None:
            return [self._entry(record) for record in self.table.split(";")]
        found = []
        for prefix in prefixes:
            position = self._next(prefix, 0)
            while position >= 0:
                record, after = self._record_at(position)
                found.append(self._entry(record))
                position = self._next(prefix, after) if after < len(self.table) else -1
        return found


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


def low_dim_npz(episode: Episode) -> bytes:
    """The sample's `low_dim.npz` field."""
    return npz_bytes(episode_arrays(episode))


def episode_to_sample(episode: Episode, image_size: tuple[int, int]) -> dict[str, Any]:
    """A WebDataset sample dict (`__key__` + bytes per field) in member order: the json with
    the member index, then the frames, then the low-dim npz.

    This is the reference form (`agnostos.shards.tar.sample_to_tar` turns it into tar
    bytes); the converter builds the same bytes in place, and a test checks they agree.
    """
    later: dict[str, bytes] = {
        frame_ext(camera, modality, index): episode.png(camera, modality, index)
        for camera, modality, index in iter_frame_fields(episode)
    }
    later[LOW_DIM_EXT] = low_dim_npz(episode)
    spans, length = tar_spans([len(data) for data in later.values()])
    index = member_index(list(later), spans, length)
    return {
        "__key__": episode.key,
        JSON_EXT: metadata_json(episode, image_size, index),
        **later,
    }


def sample_to_episode(sample: Mapping[str, Any]) -> Episode:
    """Rebuild the Episode stored in a WebDataset sample (raw bytes per field)."""
    origin = f"{sample.get('__url__', '<shard>')}: sample '{sample.get('__key__', '?')}'"
    try:
        meta = load_json(sample[JSON_EXT])
        arrays = load_npz(sample[LOW_DIM_EXT])
    except KeyError as err:
        raise SampleError(f"{origin}: missing field {err}") from None
    except Exception as err:
        raise SampleError(
            f"{origin}: cannot decode metadata ({type(err).__name__}: {err})"
        ) from err
    if meta.get("format_version") not in READABLE_FORMAT_VERSIONS:
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
