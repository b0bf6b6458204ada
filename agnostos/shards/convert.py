"""RLBench episode folders -> WebDataset shards, deterministic and resumable.

Episodes are converted in a fixed order (task, variation folder, episode number) and
written by one process, so shard contents and boundaries depend only on the input, never
on `workers`: workers only read and validate episodes in parallel. A shard is written to
`<name>.tmp`, fsynced and renamed; after each rename the progress file records the
finished shards and where to restart. A run killed at any point and started again with
the same arguments therefore finishes with byte-identical shards.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agnostos import __version__
from agnostos.atomic import TMP_SUFFIX, atomic_write_json, fsync_directory
from agnostos.shards.codecs import IEND_CHUNK, PngError, check_png, png_size
from agnostos.shards.episode import CAMERAS, MODALITIES, Episode
from agnostos.shards.folders import EpisodeError, EpisodeLocation, discover_episodes, read_episode
from agnostos.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    ShardEpisode,
    SkippedEpisode,
)
from agnostos.shards.pickles import PickleReadError, PickleRefusedError
from agnostos.shards.samples import (
    FORMAT_VERSION,
    JSON_EXT,
    LOW_DIM_EXT,
    frame_ext,
    low_dim_npz,
    member_index,
    metadata_json,
)
from agnostos.shards.shard_file import ShardFile
from agnostos.shards.tar import END_OF_ARCHIVE, TarBuilder, tar_member

PROGRESS_NAME = "convert-progress.json"
SHARD_PATTERN = "shard-{index:06d}.tar"
_PNG_HEAD = 24  # signature + IHDR length, type, width and height
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class ConvertError(RuntimeError):
    """Conversion stopped; the message names the episode and file (or the option) at fault."""


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '512MiB' -> 2**29, '1000' -> 1000 bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 1GB, 500MB, 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    scale = 1024 ** "bkmgt".index(unit[0]) if unit.endswith("ib") else _UNITS[unit.rstrip("b")]
    size = int(number * scale)
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


@dataclass(frozen=True)
class ConvertOptions:
    """What to convert and how; checked whole when built, so `convert` refuses bad options
    before it creates the output folder or reads an episode (an unknown camera used to
    fail on the first episode, leaving an empty output folder behind)."""

    tasks: tuple[str, ...] | None = None
    cameras: tuple[str, ...] = CAMERAS
    modalities: tuple[str, ...] = MODALITIES
    shard_size: int = 10**9
    on_error: str = "fail"

    def __post_init__(self) -> None:
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {self.on_error!r}")
        if self.tasks is not None:
            object.__setattr__(self, "tasks", self._names("tasks", self.tasks, None))
        object.__setattr__(self, "cameras", self._names("cameras", self.cameras, CAMERAS))
        object.__setattr__(
            self, "modalities", self._names("modalities", self.modalities, MODALITIES)
        )
        size = self.shard_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"shard_size must be a positive number of bytes, got {size!r}")

    @staticmethod
    def _names(key: str, values: Sequence[str], allowed: Sequence[str] | None) -> tuple[str, ...]:
        """`values` as a tuple of distinct names, each one of `allowed` (when given)."""
        if isinstance(values, str) or not all(isinstance(value, str) for value in values):
            raise ValueError(f"{key} must be a list of names, got {values!r}")
        values = tuple(values)
        if not values:
            raise ValueError(f"{key}: at least one is needed")
        if allowed is not None:
            unknown = [value for value in values if value not in allowed]
            if unknown:
                raise ValueError(
                    f"{key}: unknown {', '.join(map(repr, unknown))}; "
                    f"choose from {', '.join(allowed)}"
                )
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise ValueError(f"{key}: {', '.join(repeated)} listed more than once")
        return values

    def as_json(self) -> dict[str, Any]:
        """The options as plain JSON values (as stored in the manifest)."""
        return json.loads(json.dumps(asdict(self)))


# -- per-episode work (runs in worker processes) ----------------------------------------


@dataclass
class EncodedEpisode:
    """A validated episode ready to be written: its tar members and its manifest entry.

    The sample is `head` (the json member, with the member index) followed by `tar` (every
    later member). They stay two buffers so the episode's ~20 MB of frames are never
    copied just to put the small json in front of them. `tar` is a view into a reused
    `TarBuilder` when encoded in this process (hand the builder back once the view is
    written) and plain bytes when it came from a worker.
    """

    entry: ShardEpisode
    head: bytes
    tar: bytes | memoryview
    image_size: tuple[int, int]
    builder: TarBuilder | None = None

    @property
    def size(self) -> int:
        return len(self.head) + len(self.tar)


@dataclass
class FailedEpisode:
    source: str
    reason: str
    builder: TarBuilder | None = None


def encode_episode(
    location: EpisodeLocation,
    cameras: Sequence[str],
    modalities: Sequence[str],
    builder: TarBuilder,
) -> EncodedEpisode | FailedEpisode:
    """Read, validate and serialise one episode into `builder` (cleared first).

    Failures come back as values, not raises, so the caller decides between fail and skip.
    """
    builder.clear()
    try:
        episode = read_episode(location, cameras, modalities)
        fields, spans, image_size = _add_frames(episode, builder)
        # The builder starts where the json member ends, so its offsets are the index's.
        fields.append(LOW_DIM_EXT)
        spans.append(builder.add(f"{episode.key}.{LOW_DIM_EXT}", low_dim_npz(episode)))
        index = member_index(fields, spans, builder.size)
        head = tar_member(f"{episode.key}.{JSON_EXT}", metadata_json(episode, image_size, index))
    except (PickleReadError, PickleRefusedError, OSError, ValueError, KeyError, TypeError) as err:
        # EpisodeError is a ValueError; other ValueErrors/TypeErrors come from malformed
        # pickle contents. Name the episode folder when the message does not already.
        # (a KeyError's str() is its key in quotes: say what is missing instead).
        detail = f"missing key {err.args[0]}" if isinstance(err, KeyError) else str(err)
        message = detail if str(location.path) in detail else f"{location.path}: {detail}"
        return FailedEpisode(location.relative, message, builder)
    entry = ShardEpisode(
        key=episode.key,
        task=episode.task,
        variation=episode.variation,
        episode=episode.episode,
        frames=episode.num_frames,
        source=episode.source,
        keyframes=tuple(episode.keyframes),
    )
    return EncodedEpisode(entry, head, builder.view(), image_size, builder)


def _frame_members(episode: Episode) -> tuple[list[str], list[str], list[str]]:
    """Every frame's file path, sample field and tar member name, in sample order.

    The same as `frames.path`, `frame_ext` and `<key>.<field>` over `iter_frame_fields`
    (a test holds them equal), built per image folder: this runs for ~1,900 frames per
    episode and showed up in conversion profiles.
    """
    frames = range(episode.num_frames)
    paths: list[str] = []
    fields: list[str] = []
    for camera in episode.image_cameras:
        for modality in episode.modalities:
            folder = episode.frames.path(camera, modality, 0).rpartition("/")[0]
            paths.extend([f"{folder}/{index}.png" for index in frames])
            fields.extend([frame_ext(camera, modality, index) for index in frames])
    prefix = f"{episode.key}."
    return paths, fields, [prefix + field for field in fields]


def _add_frames(
    episode: Episode, builder: TarBuilder
) -> tuple[list[str], list[tuple[int, int]], tuple[int, int]]:
    """Copy every frame file into the builder, checking each PNG; returns the frames'
    fields and data spans in the builder, and the image size.

    Frames of one episode share their first 24 bytes (signature, IHDR length and type,
    width, height), so after the first frame the check is two slice comparisons; any
    mismatch is re-checked by `check_png` for an error that says what is wrong.
    """
    paths, fields, names = _frame_members(episode)
    spans = builder.add_files(zip(names, paths, strict=True))
    buffer = builder.buffer
    first_start, first_end = spans[0]
    head = bytes(buffer[first_start : first_start + _PNG_HEAD])
    trailer_size = len(IEND_CHUNK)
    for path, (start, end) in zip(paths, spans, strict=True):
        if (
            buffer[start : start + _PNG_HEAD] != head
            or buffer[end - trailer_size : end] != IEND_CHUNK
        ):
            try:
                size = check_png(buffer[start:end])
            except PngError as err:
                raise EpisodeError(f"{path}: {err}") from None
            if size != png_size(head):
                raise EpisodeError(f"{path}: image is {size}, other frames are {png_size(head)}")
            raise EpisodeError(f"{path}: IHDR chunk header differs from the first frame's")
    return fields, spans, check_png(buffer[first_start:first_end])


@functools.cache
def _process_builder() -> TarBuilder:
    return TarBuilder()


def _encode_in_worker(
    location: EpisodeLocation, cameras: Sequence[str], modalities: Sequence[str]
) -> EncodedEpisode | FailedEpisode:
    """`encode_episode` in a pool process: one builder per process, bytes sent back."""
    result = encode_episode(location, cameras, modalities, _process_builder())
    result.builder = None
    if isinstance(result, EncodedEpisode):
        result.tar = bytes(result.tar)
    return result


class _BuilderPool:
    """The reusable episode buffers of an in-process conversion.

    One is filled while the writer thread still holds up to `_OpenShard._IN_FLIGHT`
    others; the writer hands each back once its bytes are in the shard file.
    """

    def __init__(self, count: int):
        self._free: queue.SimpleQueue[TarBuilder] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(TarBuilder())

    def take(self) -> TarBuilder:
        return self._free.get()

    def give(self, builder: TarBuilder | None) -> None:
        if builder is not None:
            self._free.put(builder)


def _encode_all(
    locations: Sequence[EpisodeLocation],
    options: ConvertOptions,
    workers: int,
    pool: _BuilderPool,
) -> Iterator[EncodedEpisode | FailedEpisode]:
    """Encoded episodes in input order: in this process, or from a process pool."""
    if workers <= 1:
        for location in locations:
            yield encode_episode(location, options.cameras, options.modalities, pool.take())
        return
    yield from _ordered_map(
        _encode_in_worker, locations, workers, options.cameras, options.modalities
    )


def _ordered_map(
    function: Callable[..., Any], items: Sequence[Any], workers: int, *args: Any
) -> Iterator[Any]:
    """`map` over a process pool in input order, at most 2*workers results in flight."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()
        iterator = iter(items)
        for item in iterator:
            pending.append(pool.submit(function, item, *args))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            for item in iterator:
                pending.append(pool.submit(function, item, *args))
                break
            yield result


# -- shard writing ------------------------------------------------------------------------


class _OpenShard:
    """A shard being written under its temporary name.

    Copying, hashing and writing run on background threads (`ShardFile` adds a small I/O
    thread and bypasses the page cache where it can), so they overlap with reading the
    next episode; order is preserved because one thread hands all bytes to the file.
    """

    _IN_FLIGHT = 2

    def __init__(self, directory: Path, index: int, direct_io: bool = True):
        self.name = SHARD_PATTERN.format(index=index)
        self.final = directory / self.name
        self.tmp = directory / (self.name + TMP_SUFFIX)
        self._file = ShardFile(self.tmp, direct=direct_io)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: deque[Future] = deque()
        self.episodes: list[ShardEpisode] = []
        self.bytes = 0

    def _append(
        self, parts: tuple[bytes | memoryview, ...], written: Callable[[], None] | None = None
    ) -> None:
        """Write `parts` in order (for an episode: json member, then the rest)."""
        for data in parts:
            self._file.write(data)
            if isinstance(data, memoryview):
                data.release()  # the builder behind it may now grow or be reused
        if written is not None:
            written()

    def write(self, encoded: EncodedEpisode, written: Callable[[], None] | None = None) -> None:
        """Queue the episode's bytes; `written` runs on the writer thread once they are out."""
        size = encoded.size
        parts = (encoded.head, encoded.tar)
        self._pending.append(self._thread.submit(self._append, parts, written))
        while len(self._pending) > self._IN_FLIGHT:
            self._pending.popleft().result()
        self.episodes.append(encoded.entry)
        self.bytes += size

    def finish(self) -> ShardEntry:
        self._write_trailer()
        self._thread.shutdown(wait=True)
        digest = self._file.finish()
        os.replace(self.tmp, self.final)
        fsync_directory(self.final.parent)
        return ShardEntry(self.name, self.bytes, digest, tuple(self.episodes))

    def abandon(self) -> None:
        """Stop writing after a failure; the `.tmp` file is removed by the next run."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._file.close()

    def _write_trailer(self) -> None:
        while self._pending:
            self._pending.popleft().result()
        self._append((END_OF_ARCHIVE,))
        self.bytes += len(END_OF_ARCHIVE)


# -- progress and resume ------------------------------------------------------------------


@dataclass
class _Progress:
    """What is durably done: finished shards, skips before the restart point, where to go on."""

    fingerprint: str
    next_episode: int = 0
    image_size: tuple[int, int] | None = None
    shards: list[ShardEntry] = field(default_factory=list)
    skipped: list[SkippedEpisode] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        atomic_write_json(directory / PROGRESS_NAME, asdict(self))

    @classmethod
    def load(cls, path: Path) -> _Progress:
        data = json.loads(path.read_text())
        return cls(
            fingerprint=data["fingerprint"],
            next_episode=data["next_episode"],
            image_size=tuple(data["image_size"]) if data["image_size"] else None,
            shards=[ShardEntry.from_json(shard) for shard in data["shards"]],
            skipped=[SkippedEpisode(**item) for item in data["skipped"]],
        )


def _fingerprint(options: ConvertOptions, locations: Sequence[EpisodeLocation]) -> str:
    """Identifies a conversion: the sample format, the output-defining options and the
    exact episode list (so a run never resumes shards written in another format)."""
    payload = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "options": options.as_json(),
            "episodes": [loc.relative for loc in locations],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _resume_state(out: Path, fingerprint: str) -> _Progress:
    progress_path = out / PROGRESS_NAME
    if not progress_path.exists():
        return _Progress(fingerprint)
    progress = _Progress.load(progress_path)
    if progress.fingerprint != fingerprint:
        raise ConvertError(
            f"{progress_path}: an unfinished conversion with different options or input (or "
            "one by an agnostos writing another shard format) is in this folder; finish it "
            "with its original arguments and agnostos version, or use a new output folder"
        )
    for shard in progress.shards:
        path = out / shard.name
        if not path.exists() or path.stat().st_size != shard.bytes:
            raise ConvertError(
                f"{path}: finished shard is missing or changed size since it was written"
            )
    return progress


def _remove_partial_shards(out: Path) -> None:
    for stale in out.glob("shard-*.tar" + TMP_SUFFIX):
        stale.unlink()


# -- the conversion -----------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertResult:
    manifest: Manifest
    converted_now: int
    resumed_from: int
    already_complete: bool = False


def convert(
    src: str | Path,
    out: str | Path,
    options: ConvertOptions = ConvertOptions(),
    workers: int = 1,
    show_progress: bool = True,
    direct_io: bool = True,
) -> ConvertResult:
    """Convert every episode under `src` into shards in `out` (see the module docstring).

    `direct_io=False` writes shards through the page cache; the bytes are the same (see
    `shard_file`, which also falls back by itself where the file system refuses it).
    """
    src, out = Path(src).resolve(), Path(out)
    locations = discover_episodes(src, options.tasks)
    if not locations:
        raise ConvertError(f"{src}: no episodes found")
    fingerprint = _fingerprint(options, locations)
    out.mkdir(parents=True, exist_ok=True)

    if (out / MANIFEST_NAME).exists():
        manifest = Manifest.load(out)
        if manifest.fingerprint != fingerprint:
            raise ConvertError(
                f"{out / MANIFEST_NAME}: this folder already holds shards converted with other "
                "options or input (or in another shard format); choose a new output folder"
            )
        return ConvertResult(manifest, 0, len(locations), already_complete=True)

    progress = _resume_state(out, fingerprint)
    _remove_partial_shards(out)
    start = progress.next_episode
    pending_skips: list[SkippedEpisode] = []
    shard: _OpenShard | None = None
    converted = 0
    bar = tqdm(
        total=len(locations), initial=start, unit="ep", disable=not show_progress, smoothing=0.1
    )
    started, written = time.monotonic(), 0

    def close_shard(next_episode: int) -> None:
        nonlocal shard
        progress.shards.append(shard.finish())
        progress.skipped.extend(pending_skips)
        pending_skips.clear()
        progress.next_episode = next_episode
        progress.save(out)
        shard = None

    try:
        pool = _BuilderPool(_OpenShard._IN_FLIGHT + 2)
        results = _encode_all(locations[start:], options, workers, pool)
        for position, result in enumerate(results, start=start):
            if isinstance(result, EncodedEpisode) and progress.image_size not in (
                None,
                result.image_size,
            ):
                result = FailedEpisode(
                    result.entry.source,
                    f"{result.entry.source}: images are {result.image_size[0]}x"
                    f"{result.image_size[1]}, the dataset's are {progress.image_size[0]}x"
                    f"{progress.image_size[1]}",
                    result.builder,
                )
            if isinstance(result, FailedEpisode):
                pool.give(result.builder)
                if options.on_error == "fail":
                    raise ConvertError(f"episode {result.source}: {result.reason}")
                pending_skips.append(SkippedEpisode(result.source, result.reason))
                bar.write(f"skipped {result.source}: {result.reason}")
            else:
                progress.image_size = result.image_size
                size = result.size  # read before the writer thread releases the view
                if shard is not None and shard.bytes + size > options.shard_size:
                    close_shard(position)
                if shard is None:
                    shard = _OpenShard(out, len(progress.shards), direct_io)
                shard.write(result, functools.partial(pool.give, result.builder))
                converted += 1
                written += size
            bar.update(1)
            elapsed = max(time.monotonic() - started, 1e-9)
            bar.set_postfix_str(f"{written / elapsed / 1e6:.1f} MB/s", refresh=False)
        if shard is not None:
            close_shard(len(locations))
    finally:
        bar.close()
        if shard is not None:  # only after an error: a finished run closed its last shard
            shard.abandon()

    progress.skipped.extend(pending_skips)
    manifest = Manifest(
        source=str(src),
        options=options.as_json(),
        fingerprint=fingerprint,
        cameras=options.cameras,
        modalities=options.modalities,
        image_size=progress.image_size,
        shards=tuple(progress.shards),
        skipped=tuple(progress.skipped),
        created_by=f"agnostos {__version__}",
    )
    manifest.save(out)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    return ConvertResult(manifest, converted, start)


def shard_urls(out: str | Path) -> list[str]:
    """Local paths of a converted dataset's shards, in order."""
    manifest = Manifest.load(out)
    return [str(Path(out) / shard.name) for shard in manifest.shards]
