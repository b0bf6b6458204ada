"""RLBench episodes: reading folders (no rlbench import), keyframes, and WebDataset shards.

The pieces, in data-flow order:
- `folders`: find and read `<task>/all_variations/episodes/episode<N>/` into `Episode`s;
- `pickles`: the restricted unpickler for RLBench pickles;
- `codecs`: depth/mask PNG encodings and point clouds; `keyframes`: the PerAct heuristic;
- `samples` + `tar` + `convert`: Episode -> WebDataset sample -> shard, resumably;
- `manifest`, `verify`, `reading`: what the shards hold, checking them, reading them back.
"""

from agnostos.shards.episode import CAMERAS, MODALITIES, Episode
from agnostos.shards.folders import EpisodeError, discover_episodes, read_episode
from agnostos.shards.keyframes import discover_keyframes


def __getattr__(name: str):
    """`iter_episodes` is loaded on first use: the shard reader imports webdataset, and with
    it torch (1.5 s), which the folder reader, the simulator and its worker processes do
    not need."""
    if name == "iter_episodes":
        from agnostos.shards.reading import iter_episodes

        return iter_episodes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CAMERAS",
    "MODALITIES",
    "Episode",
    "EpisodeError",
    "discover_episodes",
    "discover_keyframes",
    "iter_episodes",
    "read_episode",
]
