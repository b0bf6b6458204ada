"""Reading episodes back from shards, through WebDataset (any URL it accepts)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import webdataset as wds

from agnostos.shards.episode import Episode
from agnostos.shards.samples import sample_to_episode


def _all_urls(urls: list[str]) -> list[str]:
    """No node/worker splitting: a plain read sees every shard."""
    return urls


def iter_samples(urls: str | Sequence[str]) -> Iterator[dict]:
    """Raw samples (`__key__`, `__url__`, bytes per field) in shard order."""
    source = urls if isinstance(urls, str) else list(urls)
    dataset = wds.WebDataset(
        source,
        shardshuffle=False,
        nodesplitter=_all_urls,
        workersplitter=_all_urls,
        empty_check=False,
    )
    yield from dataset


def iter_episodes(urls: str | Sequence[str]) -> Iterator[Episode]:
    """Episodes stored in the given shards (local paths, brace patterns, `pipe:` commands)."""
    for sample in iter_samples(urls):
        yield sample_to_episode(sample)
