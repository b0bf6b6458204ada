"""Which episodes exist, where they live, and the train/validation split by episode.

The catalogue comes from the shard manifest (never from opening shards, so it costs nothing
for remote URLs) or from the RLBench folder tree. Validation holds out whole episodes per
task, so no frame of a validation episode is ever trained on; every rank computes the same
split from the same inputs.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from webdataset.shardlists import expand_urls

from agnostos.shards.folders import discover_episodes
from agnostos.shards.manifest import MANIFEST_NAME, Manifest
from agnostos.shards.views import location_of


@dataclass(frozen=True)
class CatalogueEntry:
    """One episode: its sample key, task, frame count and keyframes (when known) and the
    unit holding it.

    `unit` is the shard URL for shards and the episode key itself for folders. Keyframes
    come from version-2 manifests; folders (whose keyframes would need every pickle) and
    older manifests leave them None.
    """

    key: str
    task: str
    frames: int | None
    unit: str
    keyframes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Split:
    train: tuple[CatalogueEntry, ...]
    val: tuple[CatalogueEntry, ...]

    @staticmethod
    def units(entries: Sequence[CatalogueEntry]) -> list[str]:
        """The units holding `entries`, once each, in catalogue order."""
        return list(dict.fromkeys(entry.unit for entry in entries))

    @staticmethod
    def keys(entries: Sequence[CatalogueEntry]) -> frozenset[str]:
        return frozenset(entry.key for entry in entries)


def _name_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(^|[/\s:=]){re.escape(name)}($|[\s?#'\"|;])")


def match_urls(urls: Sequence[str], manifest: Manifest, where: str) -> dict[str, str]:
    """Manifest shard name -> the URL that reads it (local path, brace item or `pipe:`).

    A URL matches a shard when the shard's file name appears in it as a whole path part.
    """
    names = [shard.name for shard in manifest.shards]
    patterns = {name: _name_pattern(name) for name in names}
    found: dict[str, str] = {}
    for url in urls:
        hits = [name for name in names if patterns[name].search(url)]
        if len(hits) != 1:
            what = "names no shard" if not hits else f"matches several shards {hits}"
            raise ValueError(f"shard URL {url!r} {what} of the manifest {where}")
        if hits[0] in found:
            raise ValueError(f"shard {hits[0]} is listed twice: {found[hits[0]]!r}, {url!r}")
        found[hits[0]] = url
    return found


def _check_tasks(available: Sequence[str], tasks: Sequence[str] | None, where: str) -> None:
    if tasks is None:
        return
    unknown = [task for task in tasks if task not in available]
    if unknown:
        raise ValueError(f"{where}: no episodes for task(s) {unknown}; found {list(available)}")


def manifest_path(shards: str, manifest: str | None = None) -> str:
    """The manifest describing `shards`: the given one, else the shard folder's own."""
    if manifest is not None:
        return manifest
    if not (Path(shards) / MANIFEST_NAME).is_file():
        raise ValueError(
            f"{shards}: not a converted shard folder (no {MANIFEST_NAME}); pass the "
            "manifest path as well when the shards are given as URLs"
        )
    return shards


def missing_shard_frames(
    shards: str, manifest: str | None, cameras: Sequence[str], modalities: Sequence[str]
) -> tuple[list[str], str]:
    """The `<camera>_<modality>` image kinds of `cameras` x `modalities` the shards lack,
    and what they hold, from the manifest (what conversion kept for every episode)."""
    loaded = Manifest.load(manifest_path(shards, manifest))
    missing = [
        f"{camera}_{modality}"
        for camera in cameras
        for modality in modalities
        if camera not in loaded.cameras or modality not in loaded.modalities
    ]
    held = f"cameras {', '.join(loaded.cameras)}; modalities {', '.join(loaded.modalities)}"
    return missing, held


def missing_folder_frames(
    root: str,
    entries: Sequence[CatalogueEntry],
    cameras: Sequence[str],
    modalities: Sequence[str],
) -> tuple[list[str], str]:
    """The `<camera>_<modality>` image folders of `cameras` x `modalities` missing from the
    first episode of any task, and where they were looked for.

    One episode per task: a data set is generated with one camera set, and the reader
    still checks every episode's folders (with their frame counts) when it opens them.
    """
    firsts: dict[str, CatalogueEntry] = {}
    for entry in entries:
        firsts.setdefault(entry.task, entry)
    missing: dict[str, None] = {}
    looked = []
    for entry in firsts.values():
        folder = location_of(root, entry.key).path
        looked.append(str(folder))
        for camera in cameras:
            for modality in modalities:
                if not (folder / f"{camera}_{modality}").is_dir():
                    missing[f"{camera}_{modality}"] = None
    return list(missing), f"looked in {', '.join(looked[:2])}{' ...' if len(looked) > 2 else ''}"


def shard_catalogue(
    shards: str, manifest: str | None = None, tasks: Sequence[str] | None = None
) -> list[CatalogueEntry]:
    """Episodes of a shard set, in manifest order.

    `shards` is either a converted dataset folder (its manifest lists the shards) or shard
    URLs (a brace pattern, `::`-separated list, `pipe:` commands), in which case `manifest`
    (the manifest.json or its folder) says what they hold. URLs naming only some of the
    manifest's shards select those shards.
    """
    folder = Path(shards)
    manifest = manifest_path(shards, manifest)
    loaded = Manifest.load(manifest)
    if (folder / MANIFEST_NAME).is_file():
        urls = {shard.name: str(folder / shard.name) for shard in loaded.shards}
    else:
        urls = match_urls(expand_urls(shards), loaded, manifest)
    entries = [
        CatalogueEntry(
            episode.key, episode.task, episode.frames, urls[shard.name], episode.keyframes
        )
        for shard in loaded.shards
        if shard.name in urls
        for episode in shard.episodes
    ]
    _check_tasks(list(dict.fromkeys(entry.task for entry in entries)), tasks, shards)
    return [entry for entry in entries if tasks is None or entry.task in tasks]


def folder_catalogue(
    root: str, tasks: Sequence[str] | None = None, frames_camera: str | None = None
) -> list[CatalogueEntry]:
    """Episodes under an RLBench dataset root, in conversion order.

    Frame counts come from the number of PNGs in `<frames_camera>_rgb/` when a camera is
    given (a directory listing per episode; the pickles are not opened).
    """
    entries = []
    for location in discover_episodes(root, tasks):
        key = f"{location.task}/{location.variation_folder}/episode{location.episode}"
        frames = None
        if frames_camera is not None:
            folder = location.path / f"{frames_camera}_rgb"
            try:
                frames = sum(1 for name in os.listdir(folder) if name.endswith(".png"))
            except FileNotFoundError:
                raise ValueError(f"{folder}: image folder is missing") from None
        entries.append(CatalogueEntry(key, location.task, frames, key))
    return entries


def split_episodes(
    entries: Sequence[CatalogueEntry],
    per_task: int = 1,
    selection: Literal["last", "random"] = "last",
    seed: int = 0,
    explicit: Sequence[str] | None = None,
) -> Split:
    """Hold out whole episodes for validation.

    `explicit` names the validation episodes by key. Otherwise each task gives `per_task`
    episodes: its last ones in catalogue order (highest episode numbers), or a sample drawn
    with a seed derived from `seed` and the task name. Every task keeps at least one
    training episode.
    """
    if explicit is not None:
        known = {entry.key for entry in entries}
        unknown = [key for key in explicit if key not in known]
        if unknown:
            raise ValueError(f"validation episode(s) {unknown} are not in the data set")
        held = set(explicit)
    else:
        if per_task < 0:
            raise ValueError(f"val_episodes_per_task must be >= 0, got {per_task}")
        if selection not in ("last", "random"):
            raise ValueError(f"val_selection must be 'last' or 'random', not {selection!r}")
        by_task: dict[str, list[CatalogueEntry]] = {}
        for entry in entries:
            by_task.setdefault(entry.task, []).append(entry)
        held = set()
        for task, task_entries in by_task.items():
            if per_task == 0:
                continue
            if per_task >= len(task_entries):
                raise ValueError(
                    f"task {task} has {len(task_entries)} episode(s): holding out {per_task} "
                    "for validation would leave none to train on"
                )
            if selection == "last":
                chosen = task_entries[-per_task:]
            else:
                chosen = random.Random(f"{seed}:{task}").sample(task_entries, per_task)
            held.update(entry.key for entry in chosen)
    return Split(
        train=tuple(entry for entry in entries if entry.key not in held),
        val=tuple(entry for entry in entries if entry.key in held),
    )
