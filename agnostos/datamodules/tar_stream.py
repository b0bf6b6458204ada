"""The shard reader as a WebDataset pipeline stage.

The reader itself lives in `agnostos.shards.reading` (so `iter_episodes`, `verify` and the
datamodules share one implementation): it jumps through each sample's member index to
the members a consumer needs, or walks tar headers for shards written without indexes.
This module adds the stage form used by the pipelines and keeps the names the
datamodules import.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from agnostos.shards.reading import (
    BLOCK,
    CHUNK,
    FieldSelection,
    ShardReadError,
    iter_members,
    iter_tar_samples,
    open_shard,
    read_samples,
    shard_samples,
)

__all__ = [
    "BLOCK",
    "CHUNK",
    "FieldSelection",
    "ShardReadError",
    "TarSamples",
    "iter_members",
    "iter_tar_samples",
    "open_shard",
    "read_samples",
]


@dataclass(frozen=True)
class TarSamples:
    """Pipeline stage: `{"url": ...}` dicts -> WebDataset samples.

    A drop-in for `wds.tarfile_to_samples()` that raises on errors (no handler) and reads
    only the wanted fields, and only samples whose key is in `keys` (see
    `agnostos.shards.reading`). `use_index=False` walks every tar header instead of
    using member indexes (for comparisons and debugging; the samples are the same).
    """

    select: FieldSelection | None = None
    keys: frozenset[str] | None = None
    fields_by_key: Mapping[str, frozenset[str]] | None = None
    use_index: bool = True

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in source:
            yield from shard_samples(
                item["url"], self.select, self.keys, self.fields_by_key, self.use_index
            )
