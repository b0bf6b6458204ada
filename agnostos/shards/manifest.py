"""The shard manifest: what each shard holds, its checksum, and dataset-level facts.

`manifest.json` is written once, atomically, when a conversion finishes. Readers use it
for counts (epoch lengths, exact validation coverage) and, since version 2, for each
episode's keyframes, so a pipeline knows how many samples an episode gives and which of
its frames they use before opening any shard.

Versions: 1 (no per-episode keyframes; its shards hold version-1 samples, without member
indexes) is still read; its episodes have `keyframes=None`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agnostos.atomic import atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "agnostos-shards"
MANIFEST_VERSION = 2
READABLE_MANIFEST_VERSIONS = (1, 2)


@dataclass(frozen=True)
class ShardEpisode:
    """One episode (= one sample) inside a shard."""

    key: str
    task: str
    variation: int
    episode: int
    frames: int
    source: str
    keyframes: tuple[int, ...] | None = None  # None in version-1 manifests

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardEpisode:
        fields = dict(data)
        if fields.get("keyframes") is not None:
            fields["keyframes"] = tuple(int(frame) for frame in fields["keyframes"])
        return cls(**fields)


@dataclass(frozen=True)
class ShardEntry:
    name: str
    bytes: int
    sha256: str
    episodes: tuple[ShardEpisode, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardEntry:
        return cls(
            name=data["name"],
            bytes=data["bytes"],
            sha256=data["sha256"],
            episodes=tuple(ShardEpisode.from_json(episode) for episode in data["episodes"]),
        )


@dataclass(frozen=True)
class SkippedEpisode:
    """An episode left out with `--on-error skip`, and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    source: str
    options: dict[str, Any]
    fingerprint: str
    cameras: tuple[str, ...]
    modalities: tuple[str, ...]
    image_size: tuple[int, int] | None
    shards: tuple[ShardEntry, ...]
    skipped: tuple[SkippedEpisode, ...] = ()
    created_by: str = ""
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def episodes(self) -> list[ShardEpisode]:
        return [episode for shard in self.shards for episode in shard.episodes]

    def task_counts(self) -> dict[str, dict[str, int]]:
        """Per task: episodes and frames, in first-appearance (conversion) order."""
        counts: dict[str, dict[str, int]] = {}
        for episode in self.episodes:
            entry = counts.setdefault(episode.task, {"episodes": 0, "frames": 0})
            entry["episodes"] += 1
            entry["frames"] += episode.frames
        return counts

    @property
    def totals(self) -> dict[str, int]:
        return {
            "shards": len(self.shards),
            "episodes": len(self.episodes),
            "frames": sum(episode.frames for episode in self.episodes),
            "bytes": sum(shard.bytes for shard in self.shards),
            "skipped": len(self.skipped),
        }

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tasks"] = self.task_counts()
        data["totals"] = self.totals
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not an agnostos shard manifest (format={data.get('format')!r})")
        if data.get("version") not in READABLE_MANIFEST_VERSIONS:
            raise ValueError(
                f"unsupported manifest version {data.get('version')!r} (this agnostos reads "
                f"versions {list(READABLE_MANIFEST_VERSIONS)})"
            )
        shards = tuple(ShardEntry.from_json(shard) for shard in data["shards"])
        return cls(
            source=data["source"],
            options=data["options"],
            fingerprint=data["fingerprint"],
            cameras=tuple(data["cameras"]),
            modalities=tuple(data["modalities"]),
            image_size=tuple(data["image_size"]) if data["image_size"] else None,
            shards=shards,
            skipped=tuple(SkippedEpisode(**item) for item in data["skipped"]),
            created_by=data.get("created_by", ""),
            version=data["version"],
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no shard manifest here") from None
        except KeyError as err:
            raise ValueError(f"{path}: invalid manifest (missing key {err.args[0]})") from err
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: invalid manifest ({err})") from err


def duplicate_keys(manifest: Manifest) -> list[str]:
    counts = Counter(episode.key for episode in manifest.episodes)
    return sorted(key for key, count in counts.items() if count > 1)
