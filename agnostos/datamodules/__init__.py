"""LightningDataModules over WebDataset shards (or RLBench folders) for training.

- `DynamicsDataModule` -> `DynamicsBatch`: (input frame, target frame, instruction) pairs for
  the X-ICM dynamics diffusion model.
- `KeyframeDataModule` -> `KeyframeBatch`: (camera images, proprio, instruction, next
  keyframe action(s) through an action codec) for VLA fine-tuning.

Pipelines, splitting and seeding: `streams.py`; the shard reader: `agnostos.shards.reading`
(jumps through each sample's member index), as a pipeline stage in `tar_stream.py`.
"""

from agnostos.datamodules.base import EpisodeDataModule
from agnostos.datamodules.catalogue import CatalogueEntry, Split, split_episodes
from agnostos.datamodules.dynamics import DynamicsBatch, DynamicsDataModule, dynamics_pairs
from agnostos.datamodules.keyframes import (
    KeyframeBatch,
    KeyframeDataModule,
    action_stats,
    keyframe_transitions,
)
from agnostos.datamodules.tar_stream import ShardReadError
from agnostos.shards.views import SampleDataError

__all__ = [
    "CatalogueEntry",
    "DynamicsBatch",
    "DynamicsDataModule",
    "EpisodeDataModule",
    "KeyframeBatch",
    "KeyframeDataModule",
    "SampleDataError",
    "ShardReadError",
    "Split",
    "action_stats",
    "dynamics_pairs",
    "keyframe_transitions",
    "split_episodes",
]
