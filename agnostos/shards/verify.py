"""`agnostos shards verify` and `agnostos shards info`.

Verification trusts nothing: it re-hashes every shard against the manifest, decodes every
sample into an Episode, fully decodes every PNG, recomputes keyframes from the stored
low-dim arrays and checks every count against the manifest. Each fault names the shard
and sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agnostos.shards.codecs import check_png_crc, decode_png
from agnostos.shards.episode import OFFSETS_SUFFIX
from agnostos.shards.keyframes import discover_keyframes
from agnostos.shards.manifest import Manifest, ShardEntry, duplicate_keys
from agnostos.shards.reading import iter_samples
from agnostos.shards.samples import JSON_EXT, LOW_DIM_EXT, frame_ext, sample_to_episode

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
    seen: list[str] = []
    try:
        for sample in iter_samples(str(path)):
            key = sample["__key__"]
            seen.append(key)
            where = f"{shard.name}: sample '{key}'"
            entry = expected.get(key)
            if entry is None:
                report.faults.append(f"{where}: not listed in the manifest")
                continue
            try:
                episode = sample_to_episode(sample)
            except Exception as err:
                report.faults.append(str(err))
                continue
            if episode.num_frames != entry.frames:
                report.faults.append(
                    f"{where}: {episode.num_frames} frames, manifest says {entry.frames}"
                )
            expected_fields = {JSON_EXT, LOW_DIM_EXT} | {
                frame_ext(c, m, i)
                for c in episode.image_cameras
                for m in episode.modalities
                for i in range(episode.num_frames)
            }
            extra = sorted(set(k for k in sample if not k.startswith("_")) - expected_fields)
            if extra:
                report.faults.append(f"{where}: unexpected fields {extra[:3]}")
            arrays = episode.low_dim.arrays()
            for name, array in arrays.items():
                rows = (
                    episode.num_frames + 1 if name.endswith(OFFSETS_SUFFIX) else episode.num_frames
                )
                if name + OFFSETS_SUFFIX not in arrays and len(array) != rows:
                    report.faults.append(f"{where}: low-dim '{name}' has {len(array)} rows")
            keyframes = discover_keyframes(
                episode.low_dim.gripper_open, episode.low_dim.joint_velocities
            )
            if tuple(keyframes) != episode.keyframes:
                report.faults.append(
                    f"{where}: stored keyframes {list(episode.keyframes)} but the low-dim "
                    f"arrays give {keyframes}"
                )
            for camera in episode.image_cameras:
                for modality in episode.modalities:
                    for index in range(episode.num_frames):
                        try:
                            data = episode.png(camera, modality, index)
                            check_png_crc(data)
                            pixels = decode_png(data)
                        except Exception as err:
                            report.faults.append(
                                f"{where}: {frame_ext(camera, modality, index)} does not decode"
                                f" ({type(err).__name__}: {err})"
                            )
                            continue
                        if image_size is not None and list(pixels.shape[:2]) != list(image_size):
                            report.faults.append(
                                f"{where}: {frame_ext(camera, modality, index)} is "
                                f"{pixels.shape[:2]}, dataset image size {list(image_size)}"
                            )
                        report.images += 1
            report.episodes += 1
            report.frames += episode.num_frames
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
