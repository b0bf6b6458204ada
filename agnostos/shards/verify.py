"""`agnostos shards verify` and `agnostos shards info`.

Verification trusts nothing: it re-hashes every shard against the manifest, reads every
sample by walking its tar headers (never through its member index), decodes every sample
into an Episode, fully decodes every PNG, recomputes keyframes from the stored low-dim
arrays, checks every member index against the member offsets Python's `tarfile` finds,
and checks every count (and the keyframes) against the manifest. Each fault names the
shard and sample.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agnostos.shards.codecs import check_png_crc, decode_png
from agnostos.shards.episode import OFFSETS_SUFFIX, Episode
from agnostos.shards.keyframes import discover_keyframes
from agnostos.shards.manifest import Manifest, ShardEntry, ShardEpisode, duplicate_keys
from agnostos.shards.reading import iter_samples, split_member_name
from agnostos.shards.samples import (
    JSON_EXT,
    LOW_DIM_EXT,
    MemberIndex,
    frame_ext,
    iter_frame_fields,
    sample_to_episode,
)

_HASH_CHUNK = 1 << 22


@dataclass
class ShardReport:
    name: str
    episodes: int = 0
    frames: int = 0
    images: int = 0
    faults: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    shards: list[ShardReport]

    @property
    def faults(self) -> list[str]:
        return [fault for shard in self.shards for fault in shard.faults]

    @property
    def ok(self) -> bool:
        return not self.faults


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _field_faults(sample: dict, episode: Episode) -> list[str]:
    """Fields present beyond the metadata, the arrays and one PNG per frame."""
    expected = {JSON_EXT, LOW_DIM_EXT} | {frame_ext(*frame) for frame in iter_frame_fields(episode)}
    extra = sorted(name for name in sample if not name.startswith("_") and name not in expected)
    return [f"unexpected fields {extra[:3]}"] if extra else []


def _low_dim_faults(episode: Episode) -> list[str]:
    """Row counts of every array, and keyframes recomputed from the stored arrays."""
    faults = []
    arrays = episode.low_dim.arrays()
    for name, array in arrays.items():
        if name + OFFSETS_SUFFIX in arrays:
            continue  # ragged values: their offsets array is checked instead
        rows = episode.num_frames + (1 if name.endswith(OFFSETS_SUFFIX) else 0)
        if len(array) != rows:
            faults.append(f"low-dim '{name}' has {len(array)} rows, expected {rows}")
    keyframes = discover_keyframes(episode.low_dim.gripper_open, episode.low_dim.joint_velocities)
    if tuple(keyframes) != episode.keyframes:
        faults.append(
            f"stored keyframes {list(episode.keyframes)} but the low-dim arrays give {keyframes}"
        )
    return faults


def _frame_faults(episode: Episode, image_size: Sequence[int] | None) -> tuple[list[str], int]:
    """Full CRC walk and decode of every PNG; returns (faults, images decoded)."""
    faults, decoded = [], 0
    for frame in iter_frame_fields(episode):
        try:
            data = episode.png(*frame)
            check_png_crc(data)
            pixels = decode_png(data)
        except Exception as err:
            faults.append(f"{frame_ext(*frame)} does not decode ({type(err).__name__}: {err})")
            continue
        if image_size is not None and list(pixels.shape[:2]) != list(image_size):
            faults.append(
                f"{frame_ext(*frame)} is {pixels.shape[:2]}, dataset image size {list(image_size)}"
            )
        decoded += 1
    return faults, decoded


@dataclass
class _SampleLayout:
    """Where one sample's members really are, from `tarfile`: field -> (data offset, size)
    in member order, and the byte just past the sample's last member."""

    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    end: int = 0


def _layouts(path: Path) -> dict[str, _SampleLayout]:
    """Every sample's member layout, found by Python's `tarfile` (an implementation
    independent of the agnostos reader and writer)."""
    layouts: dict[str, _SampleLayout] = {}
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            key, field_name = split_member_name(member.name)
            if key is None or not member.isfile():
                continue
            layout = layouts.setdefault(key, _SampleLayout())
            layout.members[field_name.lower()] = (member.offset_data, member.size)
            layout.end = member.offset_data + member.size + (-member.size % 512)
    return layouts


def _index_faults(sample: dict, layout: _SampleLayout | None) -> list[str]:
    """A version-2 sample's json comes first and its member index matches the layout."""
    try:
        metadata = json.loads(sample[JSON_EXT])
        index = MemberIndex.of(metadata)
        entries = index.entries() if index is not None else None
    except ValueError as err:
        return [f"member index: {err}"]
    if metadata.get("format_version", 1) < 2 and index is None:
        return []  # a version-1 sample: frames first, no index
    if index is None:
        return [f"format_version {metadata.get('format_version')} sample without member index"]
    if layout is None:
        return ["tarfile finds no members for this sample"]
    fields = list(layout.members)
    if fields[0] != JSON_EXT:
        return [f"the json is not the sample's first member (first: '{fields[0]}')"]
    base = layout.members[JSON_EXT][0] + layout.members[JSON_EXT][1]
    base += -base % 512
    actual = [(name, start - base, size) for name, (start, size) in layout.members.items()]
    faults = []
    if entries != actual[1:]:
        pairs = zip(entries, actual[1:], strict=False)  # unequal lengths reported below
        wrong = next(
            (f"{a} (index) vs {b} (tar)" for a, b in pairs if a != b),
            f"{len(entries)} entries for {len(actual) - 1} members",
        )
        faults.append(f"member index disagrees with the tar layout: {wrong}")
    if index.length != layout.end - base:
        faults.append(f"member index length {index.length}, the members take {layout.end - base}")
    return faults


def _check_sample(
    sample: dict,
    entry: ShardEpisode,
    image_size: Sequence[int] | None,
    layout: _SampleLayout | None,
    report: ShardReport,
) -> None:
    where = f"{report.name}: sample '{sample['__key__']}'"
    try:
        episode = sample_to_episode(sample)
    except Exception as err:
        report.faults.append(str(err))
        return
    faults = _field_faults(sample, episode) + _low_dim_faults(episode)
    faults += _index_faults(sample, layout)
    if episode.num_frames != entry.frames:
        faults.append(f"{episode.num_frames} frames, manifest says {entry.frames}")
    if entry.keyframes is not None and tuple(entry.keyframes) != episode.keyframes:
        faults.append(f"keyframes {list(episode.keyframes)}, manifest says {list(entry.keyframes)}")
    frame_faults, decoded = _frame_faults(episode, image_size)
    report.faults.extend(f"{where}: {fault}" for fault in faults + frame_faults)
    report.images += decoded
    report.episodes += 1
    report.frames += episode.num_frames


def verify_shard(
    directory: Path, shard: ShardEntry, image_size: Sequence[int] | None
) -> ShardReport:
    """Check one shard completely; faults are collected, not raised."""
    report = ShardReport(shard.name)
    path = directory / shard.name
    if not path.exists():
        report.faults.append(f"{shard.name}: file is missing")
        return report
    if path.stat().st_size != shard.bytes:
        report.faults.append(
            f"{shard.name}: {path.stat().st_size} bytes, manifest says {shard.bytes}"
        )
    if sha256_file(path) != shard.sha256:
        report.faults.append(f"{shard.name}: sha256 differs from the manifest")

    expected = {episode.key: episode for episode in shard.episodes}
    seen: set[str] = set()
    try:
        layouts = _layouts(path)
        for sample in iter_samples(str(path), use_index=False):
            key = sample["__key__"]
            seen.add(key)
            if key not in expected:
                report.faults.append(f"{shard.name}: sample '{key}': not listed in the manifest")
                continue
            _check_sample(sample, expected[key], image_size, layouts.get(key), report)
    except Exception as err:  # a truncated or corrupt tar stops iteration
        report.faults.append(f"{shard.name}: unreadable tar ({type(err).__name__}: {err})")
    missing = [key for key in expected if key not in seen]
    if missing:
        report.faults.append(
            f"{shard.name}: manifest lists {len(missing)} sample(s) not in the "
            f"shard, e.g. '{missing[0]}'"
        )
    return report


def verify(directory: str | Path, workers: int = 1) -> VerifyReport:
    """Verify every shard of a converted dataset."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    args = [(directory, shard, manifest.image_size) for shard in manifest.shards]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            reports = list(pool.map(verify_shard, *zip(*args, strict=True)))
    else:
        reports = [verify_shard(*arg) for arg in args]
    duplicates = duplicate_keys(manifest)
    if duplicates:
        reports.append(ShardReport("manifest", faults=[f"duplicate sample keys {duplicates[:3]}"]))
    return VerifyReport(reports)


def format_info(manifest: Manifest) -> str:
    """A human summary: tasks, episodes, frames, bytes, cameras."""
    totals = manifest.totals
    lines = [
        f"source      {manifest.source}",
        f"shards      {totals['shards']}  ({totals['bytes'] / 1e9:.3f} GB)",
        f"episodes    {totals['episodes']}  frames {totals['frames']}",
        f"cameras     {', '.join(manifest.cameras)}",
        f"modalities  {', '.join(manifest.modalities)}",
        "image size  "
        + ("x".join(str(side) for side in manifest.image_size) if manifest.image_size else "-"),
        f"skipped     {totals['skipped']}",
        "",
        f"{'task':<40} {'episodes':>8} {'frames':>8}",
    ]
    for task, counts in manifest.task_counts().items():
        lines.append(f"{task:<40} {counts['episodes']:>8} {counts['frames']:>8}")
    for skipped in manifest.skipped:
        lines.append(f"skipped {skipped.source}: {skipped.reason}")
    return "\n".join(lines)
