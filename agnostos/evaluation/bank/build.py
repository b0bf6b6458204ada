"""The chunked, resumable bank builder: shards in, a bank folder out.

Every demo's query image (camera frame 0 at the model's resolution) and first instruction
go through `extract_features` in batches, with one seed per demo
(`derive_seed(task, episode, seed)`), so a demo's features do not depend on the batch it
ran in or on the order of the demos (up to float round-off: BLAS kernels block matrix
products by batch size, so rows computed in batches of different sizes agree to ~1e-6, not
bit for bit). The demo text (frame-0 observation + keyframe actions in X-ICM's format) is
computed once here as well, or the reason it cannot be is stored.

Builds run in chunks of demos, each written atomically to `<out>/.bank-partial/`; a rerun
skips finished chunks, and because chunk and batch boundaries depend only on the demo
order, the final files are byte-identical to those of an uninterrupted run with the same
batch size. A fingerprint of everything that changes the stored bytes (options with the
resolution resolved, model identity, dtype, shards) keeps a rerun with other inputs from
mixing its chunks with an older build's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from agnostos.atomic import atomic_write_bytes
from agnostos.evaluation.bank.chunks import (
    PARTIAL_DIR,
    ChunkWriter,
    build_state,
    check_complete,
    chunk_path,
    done_chunks,
    read_chunk,
)
from agnostos.evaluation.bank.model import BatchFeatures, extract_features, model_resolution
from agnostos.evaluation.bank.records import (
    BANK_FORMAT,
    BANK_VERSION,
    IMAGES_DIR,
    BankError,
    DemoRecord,
    ExtractionSettings,
    ModelIdentity,
    json_sha256,
)
from agnostos.evaluation.bank.store import DemoBank
from agnostos.models.dynamics_diffusion import DynamicsDiffusion, SamplingConfig
from agnostos.observation_text import DEFAULT_CAMERAS, DemoText, episode_demo_text
from agnostos.seeding import derive_seed
from agnostos.shards.episode import Episode

DemoTextMode = Literal["required", "optional", "off"]
DEMO_TEXT_MODES: tuple[str, ...] = ("required", "optional", "off")


@dataclass(frozen=True)
class BankBuildConfig:
    """What to build. Shards: a converted folder (with manifest.json) or shard URLs (brace
    pattern, `::`-separated list, `pipe:` commands), optionally with their `manifest`.

    demo_text: "required" fails on a demo whose text cannot be made (no mask-name maps, no
    object-name map for the task, a missing camera), "optional" stores None and the
    reason, "off" skips it. `object_names` (task -> {simulator name: prompt name})
    replaces the suite's maps. `batch_size` is not part of the build's identity: resuming
    with another one is allowed (rows then agree to float round-off, not bit for bit).
    `resolution` None means the model's own (`model_resolution`); `build_bank` resolves it
    before anything is recorded, so the default and the same number given explicitly make
    the same build.
    """

    shards: str
    manifest: str | None = None
    tasks: tuple[str, ...] | None = None
    batch_size: int = 16
    chunk_size: int = 256
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    camera: str = "front"
    frame: int = 0
    resolution: int | None = None
    demo_text: DemoTextMode = "optional"
    suite: str = "agnostos"
    object_names: Mapping[str, Mapping[str, str]] | None = None
    text_cameras: tuple[str, ...] = DEFAULT_CAMERAS
    save_images: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(
                f"batch_size ({self.batch_size}) and chunk_size ({self.chunk_size}) must be >= 1"
            )
        if self.demo_text not in DEMO_TEXT_MODES:
            raise ValueError(
                f"demo_text must be one of {', '.join(DEMO_TEXT_MODES)}, got {self.demo_text!r}"
            )
        if (self.resolution is not None and self.resolution < 1) or self.frame < 0:
            raise ValueError(f"resolution {self.resolution} / frame {self.frame} out of range")
        if self.object_names is None:
            from agnostos.tasks import SUITES

            if self.suite not in SUITES:
                raise ValueError(f"suite must be one of {', '.join(sorted(SUITES))}, got "
                                 f"{self.suite!r}")  # fmt: skip
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "text_cameras", tuple(self.text_cameras))

    def name_maps(self) -> Mapping[str, Mapping[str, str]]:
        if self.object_names is not None:
            return self.object_names
        from agnostos.tasks import get_suite

        return get_suite(self.suite).object_names

    def identity_json(self) -> dict[str, Any]:
        """Everything that changes the stored bytes (batch_size aside, see the class)."""
        return {
            "tasks": None if self.tasks is None else list(self.tasks),
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "sampling": asdict(self.sampling),
            "camera": self.camera,
            "frame": self.frame,
            "resolution": self.resolution,
            "demo_text": self.demo_text,
            "suite": self.suite if self.object_names is None else None,
            "object_names": None
            if self.object_names is None
            else {task: dict(names) for task, names in self.object_names.items()},
            "text_cameras": list(self.text_cameras),
            "save_images": self.save_images,
        }


@dataclass(frozen=True)
class BuildResult:
    """What a `build_bank` call did. `bank` is None until the build is complete."""

    out: Path
    complete: bool
    demos_done: int
    chunks_done: int
    resumed_from: int
    bank: DemoBank | None
    already_complete: bool = False


@dataclass(frozen=True)
class _ShardPlan:
    """The shard URLs to read and, with a manifest, every demo's key in order."""

    urls: tuple[str, ...]
    keys: tuple[str, ...] | None
    units: tuple[str, ...] | None  # per key: the URL holding it


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def _plan_shards(config: BankBuildConfig) -> _ShardPlan:
    from webdataset.shardlists import expand_urls

    from agnostos.datamodules.catalogue import shard_catalogue
    from agnostos.shards.manifest import MANIFEST_NAME

    folder = Path(config.shards)
    if config.manifest is not None or (folder / MANIFEST_NAME).is_file():
        entries = shard_catalogue(config.shards, config.manifest, config.tasks)
        if not entries:
            raise BankError(f"{config.shards}: no episodes to put in the bank")
        units = tuple(entry.unit for entry in entries)
        return _ShardPlan(tuple(dict.fromkeys(units)), tuple(e.key for e in entries), units)
    if folder.is_dir():
        raise BankError(
            f"{folder}: not a converted shard folder (no {MANIFEST_NAME}); convert it with "
            "`agnostos shards convert` or pass shard URLs"
        )
    urls = tuple(expand_urls(config.shards))
    missing = [url for url in urls if _is_local(url) and not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(f"shard file(s) not found: {', '.join(missing[:5])}")
    return _ShardPlan(urls, None, None)


def _key_task(key: str) -> str:
    return key.split("/", 1)[0]


def _iter_demos(
    plan: _ShardPlan, tasks: Sequence[str] | None, start: int
) -> Iterator[tuple[int, str, Episode]]:
    """(index, shard URL, Episode) of every demo from index `start` on, in bank order.

    With a manifest only the shards holding pending demos are opened; without one the
    stream is counted from the first shard (skipped samples are not decoded).
    """
    from agnostos.shards.reading import iter_samples
    from agnostos.shards.samples import sample_to_episode

    if plan.keys is not None:
        if start >= len(plan.keys):
            return
        position = {key: index for index, key in enumerate(plan.keys)}
        urls = list(dict.fromkeys(plan.units[start:]))
        expected = start
        for sample in iter_samples(urls):
            key, url = sample["__key__"], sample.get("__url__", "?")
            index = position.get(key)
            if index is None or index < start:
                continue
            if index != expected:
                raise BankError(
                    f"{url}: sample {key!r} comes where the manifest lists "
                    f"{plan.keys[expected]!r}; the manifest does not describe these shards"
                )
            expected += 1
            yield index, url, sample_to_episode(sample)
        if expected != len(plan.keys):
            raise BankError(
                f"the manifest lists {len(plan.keys)} demos but the shards gave {expected}; "
                f"first missing: {plan.keys[expected]!r}"
            )
        return
    wanted = None if tasks is None else set(tasks)
    index = 0
    for sample in iter_samples(list(plan.urls)):
        key = sample["__key__"]
        if wanted is not None and _key_task(key) not in wanted:
            continue
        if index >= start:
            yield index, sample.get("__url__", "?"), sample_to_episode(sample)
        index += 1


@dataclass
class _Item:
    record: DemoRecord
    pixels: torch.Tensor  # 3 x R x R uint8


def _error_text(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def _query_pixels(episode: Episode, url: str, config: BankBuildConfig) -> torch.Tensor:
    from agnostos.images import prepare_rgb

    try:
        png = episode.png(config.camera, "rgb", config.frame)
    except (KeyError, IndexError) as error:
        raise BankError(
            f"{url}: sample {episode.key!r}: no query image {config.camera}_rgb/"
            f"{config.frame}.png ({_error_text(error)})"
        ) from None
    return prepare_rgb(png, config.resolution)


def _demo_text(
    episode: Episode, url: str, config: BankBuildConfig, maps: Mapping[str, Mapping[str, str]]
) -> tuple[DemoText | None, str | None]:
    if config.demo_text == "off":
        return None, "demo text disabled for this build (--demo-text off)"
    try:
        names = maps.get(episode.task)
        if names is None:
            where = "the given object_names" if config.object_names else f"suite {config.suite!r}"
            raise KeyError(f"no object-name map for task {episode.task!r} in {where}")
        return (
            episode_demo_text(episode, object_names=names, cameras=config.text_cameras),
            None,
        )
    except (KeyError, ValueError, IndexError) as error:
        reason = _error_text(error)
        if config.demo_text == "required":
            raise BankError(f"{url}: sample {episode.key!r}: demo text: {reason}") from None
        return None, reason


def _image_name(index: int, episode: Episode) -> str:
    return (
        f"{IMAGES_DIR}/{index:05d}_{episode.task}_{episode.variation_folder}_"
        f"episode{episode.episode}.png"
    )


def _prepare(
    index: int,
    url: str,
    episode: Episode,
    config: BankBuildConfig,
    maps: Mapping[str, Mapping[str, str]],
) -> _Item:
    if not episode.descriptions:
        raise BankError(f"{url}: sample {episode.key!r} has no instruction (descriptions)")
    pixels = _query_pixels(episode, url, config)
    text, reason = _demo_text(episode, url, config, maps)
    record = DemoRecord(
        id=episode.key,
        task=episode.task,
        episode=episode.episode,
        variation=episode.variation,
        variation_folder=episode.variation_folder,
        instruction=episode.instruction,
        source=episode.source,
        shard=url,
        seed=derive_seed(episode.task, episode.episode, config.seed),
        demo_text=text,
        demo_text_error=reason,
        image=_image_name(index, episode) if config.save_images else None,
    )
    return _Item(record, pixels)


def _build_fingerprint(
    config: BankBuildConfig, identity: ModelIdentity, plan: _ShardPlan, dtype: str
) -> tuple[str, dict[str, Any]]:
    build = {
        "format": BANK_FORMAT,
        "version": BANK_VERSION,
        "config": config.identity_json(),
        "model": identity.to_json(),
        "dtype": dtype,
        "shards": list(plan.urls),
        "keys_sha256": None if plan.keys is None else json_sha256(list(plan.keys)),
    }
    return json_sha256(build), build


def _run_batch(
    model: DynamicsDiffusion, items: Sequence[_Item], config: BankBuildConfig
) -> BatchFeatures:
    return extract_features(
        model,
        torch.stack([item.pixels for item in items]),
        [item.record.instruction or "" for item in items],
        [int(item.record.seed) for item in items],
        config.sampling,
        decode=config.save_images,
    )


def _dtype_name(model: DynamicsDiffusion) -> str:
    return str(model.unet.dtype).removeprefix("torch.")


def _for_model(config: BankBuildConfig, model: DynamicsDiffusion) -> BankBuildConfig:
    """`config` with its resolution resolved (None: the model's own) and checked.

    The resolved number is the one the fingerprint, the chunks and bank.json record.
    """
    if config.resolution is None:
        config = dataclasses.replace(config, resolution=model_resolution(model))
    _check_resolution(model, config)
    return config


def _check_resolution(model: DynamicsDiffusion, config: BankBuildConfig) -> None:
    factor = int(model.vae_scale_factor)
    if config.resolution % factor:
        raise BankError(
            f"resolution {config.resolution} is not a multiple of the VAE's downsample "
            f"factor {factor}"
        )


def _finalize(
    out: Path,
    partial: Path,
    chunks: Sequence[Path],
    fingerprint: str,
    config: BankBuildConfig,
    identity: ModelIdentity,
    dtype: str,
) -> DemoBank:
    from agnostos.shards.codecs import encode_png

    records: list[DemoRecord] = []
    parts: dict[str, list[torch.Tensor]] = {}
    for path in chunks:
        chunk_records, tensors = read_chunk(path, fingerprint)
        records.extend(chunk_records)
        for name, tensor in tensors.items():
            parts.setdefault(name, []).append(tensor)
    tensors = {name: torch.cat(values) for name, values in parts.items()}
    if config.save_images:
        (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        for record, pixels in zip(records, tensors["images"], strict=True):
            atomic_write_bytes(out / str(record.image), encode_png(pixels.numpy()))
    bank = DemoBank(
        records=tuple(records),
        output_latents=tensors["output_latents"],
        prompt_bos=tensors["prompt_bos"],
        input_latents=tensors["input_latents"],
        prompt_pooled=tensors["prompt_pooled"],
        model=identity,
        extraction=ExtractionSettings(
            sampling=config.sampling,
            seed=config.seed,
            camera=config.camera,
            frame=config.frame,
            resolution=config.resolution,
            dtype=dtype,
        ),
        demo_text_options={
            "mode": config.demo_text,
            "suite": config.suite if config.object_names is None else None,
            "cameras": list(config.text_cameras),
        },
        origin="built",
        build_fingerprint=fingerprint,
    )
    bank.save(out)
    shutil.rmtree(partial)
    return bank


def build_bank(
    config: BankBuildConfig,
    model: DynamicsDiffusion,
    identity: ModelIdentity,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    max_chunks: int | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Extract every demo's features and text into `out`, resuming an unfinished build.

    Demos go through the model `config.batch_size` at a time; every `config.chunk_size`
    demos form a chunk written atomically to `out/.bank-partial/`. A rerun with the same
    options, model and shards skips the finished chunks. When the last chunk is written
    the chunks are stacked into `features.safetensors` + `bank.json` (+ `images/`) and the
    partial folder is removed. `max_chunks` stops after that many chunks written in this
    call (the build stays resumable); `on_chunk(chunk_number, demos_done)` runs after each.
    A `config.resolution` of None is the model's own (`model_resolution(model)`).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    config = _for_model(config, model)
    plan = _plan_shards(config)
    dtype = _dtype_name(model)
    fingerprint, build_json = _build_fingerprint(config, identity, plan, dtype)
    finished = check_complete(out, fingerprint)
    if finished is not None:
        shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
        count = len(finished)
        chunks = -(-count // config.chunk_size)
        return BuildResult(out, True, count, chunks, count, finished, already_complete=True)

    partial = build_state(out, fingerprint, build_json)
    chunks = done_chunks(partial)
    seen_ids: set[str] = set()
    tasks_found: set[str] = set()
    done = 0
    for number, path in enumerate(chunks):
        records, _ = read_chunk(path, fingerprint)
        if number < len(chunks) - 1 and len(records) != config.chunk_size:
            raise BankError(f"{path}: {len(records)} demos in a chunk of {config.chunk_size}")
        seen_ids.update(record.id for record in records)
        tasks_found.update(record.task for record in records)
        done += len(records)
    resumed_from = done
    maps = config.name_maps() if config.demo_text != "off" else {}
    total = None if plan.keys is None else len(plan.keys)
    bar = tqdm(total=total, initial=done, unit="demo", disable=not progress, dynamic_ncols=True)
    written_now = 0
    stopped = False
    writer = ChunkWriter(partial, fingerprint, len(chunks))
    batch: list[_Item] = []

    def flush_batch() -> None:
        if batch:
            writer.add([item.record for item in batch], _run_batch(model, batch, config))
            bar.update(len(batch))
            batch.clear()

    def close_chunk() -> None:
        nonlocal done, writer, written_now
        done += writer.write()
        chunks.append(chunk_path(partial, writer.number))
        written_now += 1
        bar.set_postfix_str(f"chunk {writer.number + 1}", refresh=False)
        if on_chunk is not None:
            on_chunk(writer.number, done)
        writer = ChunkWriter(partial, fingerprint, len(chunks))

    try:
        for index, url, episode in _iter_demos(plan, config.tasks, done):
            item = _prepare(index, url, episode, config, maps)
            if item.record.id in seen_ids:
                raise BankError(f"{url}: demo {item.record.id!r} appears twice in the shards")
            seen_ids.add(item.record.id)
            tasks_found.add(item.record.task)
            batch.append(item)
            if len(batch) == config.batch_size or len(writer.records) + len(batch) == (
                config.chunk_size
            ):
                flush_batch()
            if len(writer.records) == config.chunk_size:
                close_chunk()
                if max_chunks is not None and written_now >= max_chunks:
                    stopped = True
                    break
        if not stopped:
            flush_batch()
            if writer.records:
                close_chunk()
    finally:
        bar.close()
    if stopped:
        return BuildResult(out, False, done, len(chunks), resumed_from, None)
    if not chunks:
        raise BankError(f"{config.shards}: no demos to put in the bank (tasks {config.tasks})")
    absent = sorted(set(config.tasks or ()) - tasks_found)
    if absent:
        raise BankError(f"{config.shards}: no episodes for task(s) {absent}")
    bank = _finalize(out, partial, chunks, fingerprint, config, identity, dtype)
    return BuildResult(out, True, len(bank), len(chunks), resumed_from, bank)
