"""WebDataset pipelines shared by the datamodules: training streams and exact validation.

Both read "units": shard URLs, or episode keys for the folder reader (a folder episode is
read like a one-sample shard, so the same splitting code serves both).

Training (`training_pipeline`):
  units -> split_by_node (disjoint per rank) -> split_by_worker (when a rank has at least
  one unit per worker; otherwise all workers resample the rank's units with their own
  seeds) -> ResampledShards (seeded by seed, epoch, rank and worker) -> read episodes ->
  expand into samples -> shuffle buffer -> decode -> batch -> `with_epoch`.
  Resampling makes the stream endless, and `with_epoch` cuts every worker at the same
  number of batches, so every DDP rank yields exactly `EpochPlan.rank_batches` batches per
  epoch (the `len()` of its `EpochLoader`) and no rank waits on another at the end of an
  epoch. Ranks draw from disjoint units. The stream continues across epochs (see
  `EpochPipeline`): an epoch is its next batches.

Validation (`evaluation_pipeline`):
  units (fixed order) -> split_by_node -> split_by_worker -> read -> expand -> decode ->
  batch (last batch partial). Every unit goes to exactly one (rank, worker), so across
  ranks every sample is seen exactly once. Ranks may get different numbers of batches.

Where the rank comes from: WebDataset's splitters and seeds read it in the process that
iterates (`wds.utils.pytorch_worker_info`): the environment (RANK, WORLD_SIZE) first, else
`torch.distributed`. A DataLoader worker started with `spawn`/`forkserver` has no
initialised process group, so every worker would believe it is rank 0 and ranks would read
the same shards. `ExportRank` (the loaders' `worker_init_fn`) writes the rank the
datamodule saw in the main process into each worker's environment, so splitting is right
with any start method.

Reproducibility: every random choice is seeded from (seed, epoch, rank, worker) or, for
per-sample choices, from (seed, epoch, sample key), never from time or pids. The epoch is
counted by the pipeline object itself (persistent workers keep it across epochs) and
starts at the trainer's current epoch, so a resumed run draws a fresh, seeded stream
rather than replaying epoch 0.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds
from torch.utils.data import DataLoader
from webdataset.utils import make_seed, pytorch_worker_info


@dataclass
class StreamState:
    """The seed and epoch counter shared by the stages of one pipeline."""

    seed: int
    start_epoch: int = 0
    iterations: int = 0

    @property
    def epoch(self) -> int:
        return self.start_epoch + max(self.iterations - 1, 0)

    def sample_seed(self, *parts: object) -> str:
        """A string seed for `random.Random` (hashed with SHA-512: stable across processes)."""
        return ":".join(str(part) for part in (self.seed, self.epoch, *parts))


class EpochPipeline(wds.DataPipeline):
    """A `wds.DataPipeline` that counts its epochs.

    It has no `__len__` on purpose: PyTorch's IterableDataset is not meant to be sized, and
    Lightning warns on every fit about a DataLoader whose IterableDataset is (with several
    workers such a length is often wrong). The epoch length lives on the loader instead
    (`EpochLoader`); `batches` records it for the loader to read.

    With `continuous=True` (training) each epoch takes the next `with_epoch` batches of one
    endless stream instead of restarting the pipeline: the shuffle buffer is filled once,
    not at every epoch start (wds.shuffle reads two samples per sample it yields until the
    buffer is full), and the samples buffered at an epoch's end are used in the next one.
    This needs the dataset object to live across epochs: the main process, or persistent
    DataLoader workers (which the datamodules use).
    """

    def __init__(
        self,
        state: StreamState,
        *stages: Any,
        batches: int | None = None,
        count_epochs: bool = True,
        continuous: bool = False,
    ):
        super().__init__(*stages)
        self.state = state
        self.batches = batches  # per rank and epoch, when fixed (training)
        self.count_epochs = count_epochs
        self.continuous = continuous
        self._stream: Iterator[Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stream"] = None  # a running generator cannot be pickled; workers start anew
        return state

    def __iter__(self) -> Iterator[Any]:
        if self.count_epochs:
            self.state.iterations += 1
        if not self.continuous:
            return super().__iter__()
        if self.nsamples <= 0:
            raise ValueError("a continuous pipeline needs with_epoch(n) to cut its epochs")
        if self._stream is None:
            self._stream = self.iterator()
        return itertools.islice(self._stream, self.nsamples)


class EpochLoader(wds.WebLoader):
    """The training loader: a DataLoader (wrapped by `wds.WebLoader`) whose `len()` is the
    number of batches one rank yields per epoch.

    Lightning needs that number (epoch ends, checkpoints at epoch end, exact resume, the
    progress bar) and reads it from `len(loader)`. WebDataset's practice for it is to leave
    the dataset unsized and give the length to the `WebLoader` (`with_length`), which
    Lightning does not see as a DataLoader over a sized IterableDataset, the case it warns
    about. `with_length` swaps in a class made on the fly (and warns); this subclass does
    the same with an ordinary class. The length is exact, not an estimate: `with_epoch`
    cuts every worker's stream at `EpochPlan.worker_batches`.

    Iterating it is lazy: the DataLoader's iterator, and with it the dataset's epoch count
    and stream, starts when the first batch is drawn. Lightning calls `iter()` twice on a
    loader it rebuilds for an epoch after the first (when it sets the loader up, and at the
    epoch's start); a bare DataLoader started the stream at the first call and restarted it
    at the second, counting two epochs, so epoch e did not draw `start_epoch=e`'s batches.
    Here it does, which is what an exact resume at an epoch boundary relies on.
    """

    def __init__(self, dataset: EpochPipeline, batches: int, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.batches = batches

    @property
    def loader(self) -> DataLoader:
        """The wrapped DataLoader (workers, pinning, `worker_init_fn`)."""
        return self.pipeline[0]

    def __len__(self) -> int:
        return self.batches

    # When a fit ends Lightning shuts a DataLoader's persistent workers down through its
    # `_iterator` (CombinedLoader.reset); forwarding that attribute to the wrapped
    # DataLoader keeps this, instead of leaving idle workers until garbage collection.
    @property
    def _iterator(self) -> Any:
        return self.loader._iterator

    @_iterator.setter
    def _iterator(self, value: Any) -> None:
        self.loader._iterator = value


@dataclass(frozen=True)
class ResampledUnits:
    """Source stage: this rank's (and worker's) units, resampled with replacement."""

    units: tuple[str, ...]
    state: StreamState

    def __call__(self) -> Iterator[dict[str, str]]:
        rank, world, _worker, workers = pytorch_worker_info()
        mine = list(wds.split_by_node(list(self.units)))
        if not mine:
            raise ValueError(
                f"rank {rank} of {world} has no training data: {len(self.units)} shard(s) "
                "cannot be split disjointly across the ranks; convert with a smaller "
                "--shard-size so there are at least as many shards as ranks"
            )
        if workers > 1 and len(mine) >= workers:
            mine = list(wds.split_by_worker(mine))
        return iter(
            wds.ResampledShards(
                mine, seed=make_seed(self.state.seed, self.state.epoch), deterministic=True
            )
        )


# Distinguishes the shuffle seed from other seeds. An int, not a string: make_seed() mixes
# its arguments with hash(), and str hashes are salted per process (PYTHONHASHSEED), which
# would give every process (e.g. a resumed run) a different shuffle order.
SHUFFLE_SALT = 0x5348554646  # "SHUFF"


@dataclass(frozen=True)
class SeededShuffle:
    """`wds.shuffle` with a seed drawn from (seed, epoch, rank, worker) when iteration starts."""

    bufsize: int
    initial: int
    state: StreamState

    def __call__(self, source: Iterable[Any]) -> Iterator[Any]:
        rank, _, worker, _ = pytorch_worker_info()
        seed = make_seed(self.state.seed, self.state.epoch, rank, worker, SHUFFLE_SALT)
        return wds.shuffle(self.bufsize, self.initial, seed=seed)(iter(source))


@dataclass(frozen=True)
class ExportRank:
    """DataLoader `worker_init_fn`: the main process's rank, exported to the worker."""

    rank: int
    world_size: int

    def __call__(self, worker_id: int) -> None:
        os.environ["RANK"] = str(self.rank)
        os.environ["WORLD_SIZE"] = str(self.world_size)


def current_rank(trainer: Any | None = None) -> tuple[int, int]:
    """(rank, world size): from the trainer when attached, else as WebDataset sees it."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    rank, world, _, _ = pytorch_worker_info()
    return rank, world


@dataclass(frozen=True)
class EpochPlan:
    """How many batches each worker and each rank yields in one training epoch."""

    samples: int
    world_size: int
    batch_size: int
    workers: int
    rank_batches: int = field(init=False)
    worker_batches: int = field(init=False)

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1 or self.world_size < 1:
            raise ValueError(
                f"epoch needs positive samples, batch size and world size, got {self.samples}, "
                f"{self.batch_size}, {self.world_size}"
            )
        wanted = math.ceil(self.samples / (self.world_size * self.batch_size))
        per_worker = math.ceil(wanted / max(1, self.workers))
        object.__setattr__(self, "worker_batches", per_worker)
        object.__setattr__(self, "rank_batches", per_worker * max(1, self.workers))


def training_pipeline(
    units: Sequence[str],
    read: Sequence[Callable[[Iterable[Any]], Iterable[Any]]],
    expand: Callable[[Iterable[Any]], Iterable[Any]],
    decode: Callable[[Any], Any],
    collate: Callable[[list[Any]], Any],
    *,
    state: StreamState,
    plan: EpochPlan,
    shuffle_buffer: int,
    shuffle_initial: int,
) -> EpochPipeline:
    """The resampled, shuffled, fixed-length training stream (see the module docstring)."""
    if not units:
        raise ValueError("no training data: the split left no training episodes")
    stages: list[Any] = [ResampledUnits(tuple(units), state), *read, expand]
    if shuffle_buffer > 1:
        stages.append(SeededShuffle(shuffle_buffer, min(shuffle_initial, shuffle_buffer), state))
    stages += [wds.map(decode), wds.batched(plan.batch_size, collation_fn=collate, partial=False)]
    pipeline = EpochPipeline(state, *stages, batches=plan.rank_batches, continuous=True)
    return pipeline.with_epoch(plan.worker_batches)


def evaluation_pipeline(
    units: Sequence[str],
    read: Sequence[Callable[[Iterable[Any]], Iterable[Any]]],
    expand: Callable[[Iterable[Any]], Iterable[Any]],
    decode: Callable[[Any], Any],
    collate: Callable[[list[Any]], Any],
    *,
    state: StreamState,
    batch_size: int,
) -> EpochPipeline:
    """Every sample of `units` exactly once across ranks and workers, in a fixed order.

    The epoch is not counted: validation draws the same samples (and per-sample random
    choices) every time.
    """
    if not units:
        raise ValueError("no validation data: the split holds no validation episodes")
    return EpochPipeline(
        state,
        wds.SimpleShardList(list(units)),
        wds.split_by_node,
        wds.split_by_worker,
        *read,
        expand,
        wds.map(decode),
        wds.batched(batch_size, collation_fn=collate, partial=True),
        count_epochs=False,
    )
