"""The LightningDataModule machinery shared by the dynamics and keyframe datamodules.

A subclass says which fields a sample needs, how an episode expands into sample specs,
how a spec is decoded and how items are collated; this class handles the data source
(shards or folders), the episode split, the WebDataset pipelines and the DataLoaders.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from agnostos.datamodules.catalogue import (
    CatalogueEntry,
    Split,
    folder_catalogue,
    missing_folder_frames,
    missing_shard_frames,
    shard_catalogue,
    split_episodes,
)
from agnostos.datamodules.streams import (
    EpochLoader,
    EpochPipeline,
    EpochPlan,
    ExportRank,
    StreamState,
    current_rank,
    evaluation_pipeline,
    training_pipeline,
)
from agnostos.datamodules.tar_stream import FieldSelection, TarSamples
from agnostos.shards.views import ReadFolderEpisodes, ToShardEpisodes

log = logging.getLogger(__name__)


class EpisodeDataModule(L.LightningDataModule, ABC):
    """Streams samples expanded from RLBench episodes (see `streams.py` for the pipelines).

    Args:
        shards: a converted shard folder (with manifest.json), or shard URLs (brace
            pattern, `::`-separated list, `pipe:` commands) together with `manifest`.
        manifest: manifest.json (or its folder) describing URL-given shards.
        folders: an RLBench dataset root, read with the folder reader instead of shards.
        tasks: restrict to these tasks (default: all in the data).
        val_episodes_per_task: episodes per task held out for validation (0: none).
        val_selection: hold out each task's last episodes, or a seeded random choice.
        val_episodes: explicit validation episode keys (overrides the two above).
        batch_size: training batch size per rank.
        val_batch_size: validation batch size (default: batch_size).
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: samples held in the shuffle buffer (after episode expansion).
        shuffle_initial: samples gathered before the first one is yielded.
        epoch_samples: samples per training epoch over all ranks (default: one pass over
            the training samples when the catalogue's frame counts and keyframes determine
            it, else one sample per training episode).
        image_size: square side of every image after centre-crop and resize.
        instruction: "first" (the first variation description, X-ICM's choice) or
            "random" (drawn per sample, seeded).
        seed: seeds every random choice; the same seed gives the same batches.
        pin_memory: pin batches for faster host-to-GPU copies.

    Subclasses take their own arguments and pass these on with `**kwargs` rather than
    restating them: LightningCLI's parser (jsonargparse) follows `super().__init__(**kwargs)`
    and offers each of these as a `--data.*` option with the type, default and help given
    here, and `save_hyperparameters()` (called below) records them with the subclass's own.
    """

    def __init__(
        self,
        shards: str | None = None,
        manifest: str | None = None,
        folders: str | None = None,
        tasks: list[str] | None = None,
        val_episodes_per_task: int = 1,
        val_selection: Literal["last", "random"] = "last",
        val_episodes: list[str] | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        shuffle_initial: int = 100,
        epoch_samples: int | None = None,
        image_size: int = 128,
        instruction: Literal["first", "random"] = "first",
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        if (shards is None) == (folders is None):
            raise ValueError("give exactly one data source: shards=... or folders=...")
        if instruction not in ("first", "random"):
            raise ValueError(f"instruction must be 'first' or 'random', not {instruction!r}")
        for name, value in (("batch_size", batch_size), ("image_size", image_size)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.shards = shards
        self.manifest = manifest
        self.folders = folders
        self.tasks = list(tasks) if tasks is not None else None
        self.val_episodes_per_task = val_episodes_per_task
        self.val_selection = val_selection
        self.val_episodes = list(val_episodes) if val_episodes is not None else None
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_initial = shuffle_initial
        self.epoch_samples = epoch_samples
        self.image_size = image_size
        self.instruction = instruction
        self.seed = seed
        self.pin_memory = pin_memory
        self._split: Split | None = None
        # Here rather than in the subclasses: Lightning collects the arguments of every
        # `__init__` frame of this object from the calling frame upwards, so only a call in
        # the base records both these arguments (with their defaults) and the subclass's
        # own; a subclass passing them on as `**kwargs` would record only those it was given.
        self.save_hyperparameters()

    # -- what a subclass provides ------------------------------------------------------

    @property
    @abstractmethod
    def cameras(self) -> tuple[str, ...]:
        """The cameras whose RGB frames samples use."""

    @abstractmethod
    def fields(self) -> FieldSelection:
        """The shard fields a sample needs (frames of other cameras are never read)."""

    @abstractmethod
    def expander(self, state: StreamState) -> Callable[[Iterable[Any]], Iterable[Any]]:
        """Pipeline stage: episode views -> sample specs."""

    @abstractmethod
    def decoder(self) -> Callable[[Any], Any]:
        """spec -> item (decodes images)."""

    @abstractmethod
    def collator(self) -> Callable[[list[Any]], Any]:
        """items -> typed batch (a module-level function: pipelines must pickle)."""

    def frames_needed(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """(argument, cameras, modalities) of every kind of image frame samples read.

        Setup checks each against what the data holds, naming the argument that asked for a
        missing one; the folder reader opens the union. Default: the cameras' RGB.
        """
        return [("cameras", self.cameras, ("rgb",))]

    def samples_per_episode(
        self, frames: int | None, keyframes: Sequence[int] | None = None
    ) -> int | None:
        """Samples one episode expands into, when its frame count and keyframes (None:
        unknown) decide it."""
        return None

    def exact_fields(
        self, frames: int | None, keyframes: Sequence[int] | None = None
    ) -> frozenset[str] | None:
        """The only fields an episode needs, when its frame count and keyframes (None:
        unknown) tell before reading it; the reader then fetches just those members.
        None: use `fields()`."""
        return None

    # -- data source and split -----------------------------------------------------------

    def catalogue(self) -> list[CatalogueEntry]:
        if self.shards is not None:
            return shard_catalogue(self.shards, self.manifest, self.tasks)
        # Count frames (one directory listing per episode) only when they alone decide the
        # sample count: folder catalogues know no keyframes.
        frames_camera = self.cameras[0] if self.samples_per_episode(1) is not None else None
        return folder_catalogue(self.folders, self.tasks, frames_camera)

    @property
    def split(self) -> Split:
        if self._split is None:
            self._split = split_episodes(
                self.catalogue(),
                self.val_episodes_per_task,
                self.val_selection,
                self.seed,
                self.val_episodes,
            )
            log.info(
                "%s: %d training and %d validation episodes",
                type(self).__name__,
                len(self._split.train),
                len(self._split.val),
            )
        return self._split

    def setup(self, stage: str | None = None) -> None:
        self.split  # noqa: B018  (builds the catalogue and split once, with errors up front)
        self.check_frames()

    def check_frames(self) -> None:
        """Every camera and modality samples read must be in the data: one line at setup
        rather than a worker's traceback once the first such sample is read."""
        entries = (*self.split.train, *self.split.val)
        for argument, cameras, modalities in self.frames_needed():
            if self.shards is not None:
                source = self.shards
                missing, held = missing_shard_frames(
                    self.shards, self.manifest, cameras, modalities
                )
            else:
                source = str(self.folders)
                missing, held = missing_folder_frames(source, entries, cameras, modalities)
            if missing:
                raise ValueError(
                    f"{argument}: {source} holds no {', '.join(missing)} frames ({held})"
                )

    def read_stages(self, entries: tuple[CatalogueEntry, ...]) -> list[Any]:
        """Stages turning `{"url": unit}` dicts into episode views of `entries` only."""
        if self.shards is not None:
            exact = {
                entry.key: self.exact_fields(entry.frames, entry.keyframes) for entry in entries
            }
            only = {key: fields for key, fields in exact.items() if fields is not None}
            return [
                TarSamples(self.fields(), Split.keys(entries), only or None),
                ToShardEpisodes(),
            ]
        needed = self.frames_needed()
        cameras = dict.fromkeys(camera for _, group, _ in needed for camera in group)
        modalities = dict.fromkeys(modality for _, _, group in needed for modality in group)
        return [ReadFolderEpisodes(str(self.folders), tuple(cameras), tuple(modalities))]

    def default_epoch_samples(self) -> int:
        counts = [
            self.samples_per_episode(entry.frames, entry.keyframes) for entry in self.split.train
        ]
        if all(count is not None for count in counts):
            return max(1, sum(counts))
        return len(self.split.train)

    # -- datasets and loaders -------------------------------------------------------------

    def _rank(self) -> tuple[int, int]:
        return current_rank(self.trainer)

    def train_dataset(self, start_epoch: int = 0) -> EpochPipeline:
        _rank, world = self._rank()
        units = Split.units(self.split.train)
        if world > len(units):
            raise ValueError(
                f"{len(units)} training shard(s) cannot be split disjointly across {world} "
                "ranks; convert with a smaller --shard-size so there are at least as many "
                "shards as ranks"
            )
        plan = EpochPlan(
            self.epoch_samples or self.default_epoch_samples(),
            world,
            self.batch_size,
            self.num_workers,
        )
        state = StreamState(self.seed, start_epoch)
        return training_pipeline(
            units,
            self.read_stages(self.split.train),
            self.expander(state),
            self.decoder(),
            self.collator(),
            state=state,
            plan=plan,
            shuffle_buffer=self.shuffle_buffer,
            shuffle_initial=self.shuffle_initial,
        )

    def val_dataset(self) -> EpochPipeline:
        state = StreamState(self.seed)
        return evaluation_pipeline(
            Split.units(self.split.val),
            self.read_stages(self.split.val),
            self.expander(state),
            self.decoder(),
            self.collator(),
            state=state,
            batch_size=self.val_batch_size,
        )

    def _loader_options(self, workers: int) -> dict[str, Any]:
        rank, world = self._rank()
        return {
            "batch_size": None,
            "num_workers": workers,
            "persistent_workers": workers > 0,
            "worker_init_fn": ExportRank(rank, world),
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
        }

    def train_dataloader(self) -> EpochLoader:
        """The training stream; `len()` is this rank's batches per epoch (see `EpochLoader`)."""
        start_epoch = int(self.trainer.current_epoch) if self.trainer is not None else 0
        dataset = self.train_dataset(start_epoch)
        return EpochLoader(dataset, dataset.batches, **self._loader_options(self.num_workers))

    def val_dataloader(self) -> DataLoader | list:
        if not self.split.val:
            return []
        _, world = self._rank()
        units = Split.units(self.split.val)
        workers = min(self.num_workers, -(-len(units) // world))
        return DataLoader(self.val_dataset(), **self._loader_options(workers))
