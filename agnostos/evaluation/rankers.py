"""Rankers that pick in-context demos from a bank of seen-task episodes.

* `random`: K distinct entries from `random.Random(seed).sample`, seeded per query. With
  seed 42 this is exactly X-ICM's first draw for a task (X-ICM re-seeds Python's
  `random` with 42 when it builds a task handler and then calls
  `random.sample(range(M), K)`). Random carries no similarity: every score is 0.0.
* `lang_vis_out`: X-ICM's published ranking, kept exact for parity. The query and every
  bank entry are `[BOS text feature ; predicted future latent]`, the score is the raw dot
  product (no normalisation, the arrays' own dtype), and the order is
  `np.argsort(scores)[::-1]` (global top-K over all tasks, most similar first, ties broken
  as X-ICM breaks them). The BOS feature is the same for every prompt (CLIP's causal
  mask), so in practice this ranks by the dot product of predicted latents.
* `cosine`: a cleaner variant (a deviation from X-ICM, labelled as one): cosine
  similarity of the predicted latents, optionally mixed with the cosine similarity of a
  prompt-dependent text embedding (the pooled EOS feature):
  `(1 - text_weight) * cos(latent) + text_weight * cos(text)`.

Every ranker takes an optional per-task cap (`max_per_task`), a diversity constraint
X-ICM does not have: walking down the ranking, an entry is skipped once its task already
has that many picks. All rankers return a `Ranking` of demo ids with scores.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

import numpy as np

__all__ = [
    "RANKERS",
    "RANKER_NAMES",
    "CosineRanker",
    "LangVisOutRanker",
    "RandomRanker",
    "Ranker",
    "Ranking",
    "RankingBank",
    "RankingQuery",
    "apply_task_cap",
    "make_ranker",
    "xicm_path_task_episode",
]


def xicm_path_task_episode(path: str) -> tuple[str, int]:
    """(task, episode) from an X-ICM bank path `.../<task>/<variation>/episodes/episode<N>`,
    parsed as X-ICM does (`split('/')[-4]` and `int(split('/')[-1][7:])`)."""
    parts = PurePosixPath(path.rstrip("/")).parts
    if len(parts) < 4 or not parts[-1].startswith("episode"):
        raise ValueError(f"bank path {path!r} is not .../<task>/<variation>/episodes/episode<N>")
    try:
        return parts[-4], int(parts[-1][len("episode") :])
    except ValueError:
        raise ValueError(f"bank path {path!r} does not end in episode<N>") from None


def _matrix(name: str, values: Any, rows: int | None = None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim < 1:
        raise ValueError(f"{name} must be an array with one row per bank entry")
    array = array.reshape(array.shape[0], -1)
    if rows is not None and array.shape[0] != rows:
        raise ValueError(f"{name} has {array.shape[0]} rows for a bank of {rows} entries")
    return array


@dataclass(frozen=True)
class RankingBank:
    """The features rankers need, one row per demo (features are flattened).

    output_latents: predicted future latents (M, D), X-ICM's `all_output_image_feats`.
    prompt_bos: BOS text features (M, Dt), X-ICM's `all_prompt_feats`; needed by
        `lang_vis_out`.
    text_embeddings: prompt-dependent text features (M, Dt) for `cosine` with a text term.
    """

    ids: tuple[str, ...]
    tasks: tuple[str, ...]
    output_latents: np.ndarray
    prompt_bos: np.ndarray | None = None
    text_embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "tasks", tuple(str(t) for t in self.tasks))
        size = len(self.ids)
        if len(self.tasks) != size:
            raise ValueError(f"bank has {size} ids but {len(self.tasks)} tasks")
        if len(set(self.ids)) != size:
            duplicates = sorted(i for i, n in Counter(self.ids).items() if n > 1)
            raise ValueError(f"bank ids must be unique; repeated: {duplicates[:5]}")
        object.__setattr__(
            self, "output_latents", _matrix("output_latents", self.output_latents, size)
        )
        for name in ("prompt_bos", "text_embeddings"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _matrix(name, value, size))

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_xicm(cls, features: Mapping[str, Any]) -> RankingBank:
        """From X-ICM's `all_diffusion_features.pkl` dict (paths become the ids)."""
        required = ("all_demo_paths", "all_output_image_feats", "all_prompt_feats")
        missing = [key for key in required if key not in features]
        if missing:
            raise KeyError(f"X-ICM feature dict lacks key(s) {', '.join(missing)}")
        paths = [str(path) for path in features["all_demo_paths"]]
        return cls(
            ids=tuple(paths),
            tasks=tuple(xicm_path_task_episode(path)[0] for path in paths),
            output_latents=features["all_output_image_feats"],
            prompt_bos=features["all_prompt_feats"],
        )


@dataclass(frozen=True)
class RankingQuery:
    """One query's features (flattened on use) and its seed (for `random`)."""

    output_latent: Any
    prompt_bos: Any = None
    text_embedding: Any = None
    seed: int = 0


@dataclass(frozen=True)
class Ranking:
    """Chosen demos, most similar first: ids, scores and row indices into the bank."""

    ids: tuple[str, ...]
    scores: tuple[float, ...]
    indices: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def pairs(self) -> list[tuple[str, float]]:
        return list(zip(self.ids, self.scores, strict=True))


class Ranker(Protocol):
    name: str

    def rank(self, bank: RankingBank, query: RankingQuery, k: int) -> Ranking: ...


def apply_task_cap(
    order: Sequence[int], tasks: Sequence[str], k: int, max_per_task: int | None
) -> list[int]:
    """The first `k` of `order`, skipping entries whose task already has `max_per_task`."""
    if max_per_task is None:
        return list(order[:k])
    if max_per_task < 1:
        raise ValueError(f"max_per_task must be >= 1 or None, got {max_per_task}")
    counts: Counter[str] = Counter()
    chosen: list[int] = []
    for index in order:
        task = tasks[index]
        if counts[task] < max_per_task:
            counts[task] += 1
            chosen.append(int(index))
            if len(chosen) == k:
                break
    return chosen


def _check_k(bank: RankingBank, k: int) -> None:
    if not 1 <= k <= len(bank):
        raise ValueError(f"k={k} must lie in 1..{len(bank)} (the bank size)")


def _vector(name: str, value: Any) -> np.ndarray:
    if value is None:
        raise ValueError(f"the query has no {name}")
    return np.asarray(value).reshape(-1)


def _ranking(bank: RankingBank, chosen: Sequence[int], scores: np.ndarray | None) -> Ranking:
    return Ranking(
        ids=tuple(bank.ids[i] for i in chosen),
        scores=tuple(float(scores[i]) if scores is not None else 0.0 for i in chosen),
        indices=tuple(int(i) for i in chosen),
    )


@dataclass(frozen=True)
class RandomRanker:
    """K distinct random demos, seeded per query (`query.seed`)."""

    max_per_task: int | None = None
    name: str = field(default="random", init=False)

    def rank(self, bank: RankingBank, query: RankingQuery, k: int) -> Ranking:
        _check_k(bank, k)
        rng = random.Random(query.seed)
        if self.max_per_task is None:
            return _ranking(bank, rng.sample(range(len(bank)), k), None)
        order = rng.sample(range(len(bank)), len(bank))
        return _ranking(bank, apply_task_cap(order, bank.tasks, k, self.max_per_task), None)


@dataclass(frozen=True)
class LangVisOutRanker:
    """X-ICM's `lang_vis.out`: raw dot product of [BOS ; predicted latent], exact parity."""

    max_per_task: int | None = None
    name: str = field(default="lang_vis_out", init=False)

    def scores(self, bank: RankingBank, query: RankingQuery) -> np.ndarray:
        if bank.prompt_bos is None:
            raise ValueError("lang_vis_out needs the bank's prompt_bos features")
        query_feature = np.concatenate(
            [_vector("prompt_bos", query.prompt_bos), _vector("output_latent", query.output_latent)]
        )
        memory = np.concatenate([bank.prompt_bos, bank.output_latents], axis=1)
        if memory.shape[1] != query_feature.shape[0]:
            raise ValueError(
                f"query feature has {query_feature.shape[0]} dims, bank entries {memory.shape[1]}"
            )
        return np.dot(memory, query_feature)

    def rank(self, bank: RankingBank, query: RankingQuery, k: int) -> Ranking:
        _check_k(bank, k)
        scores = self.scores(bank, query)
        order = np.argsort(scores)[::-1]
        return _ranking(bank, apply_task_cap(order, bank.tasks, k, self.max_per_task), scores)


def _cosine(memory: np.ndarray, query: np.ndarray) -> np.ndarray:
    memory = memory.astype(np.float64)
    query = query.astype(np.float64)
    if memory.shape[1] != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} dims, bank entries {memory.shape[1]}")
    norms = np.linalg.norm(memory, axis=1) * np.linalg.norm(query)
    return (memory @ query) / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class CosineRanker:
    """Cosine similarity of predicted latents, optionally mixed with a text term.

    Deviation from X-ICM: normalised, and the text term uses a prompt-dependent
    embedding instead of the constant BOS feature. Ties keep bank order.
    """

    text_weight: float = 0.0
    max_per_task: int | None = None
    name: str = field(default="cosine", init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.text_weight <= 1.0:
            raise ValueError(f"text_weight must lie in [0, 1], got {self.text_weight}")

    def scores(self, bank: RankingBank, query: RankingQuery) -> np.ndarray:
        scores = _cosine(bank.output_latents, _vector("output_latent", query.output_latent))
        if self.text_weight == 0.0:
            return scores
        if bank.text_embeddings is None:
            raise ValueError("cosine with text_weight > 0 needs the bank's text_embeddings")
        text = _cosine(bank.text_embeddings, _vector("text_embedding", query.text_embedding))
        return (1.0 - self.text_weight) * scores + self.text_weight * text

    def rank(self, bank: RankingBank, query: RankingQuery, k: int) -> Ranking:
        _check_k(bank, k)
        scores = self.scores(bank, query)
        order = np.argsort(-scores, kind="stable")
        return _ranking(bank, apply_task_cap(order, bank.tasks, k, self.max_per_task), scores)


RANKERS: dict[str, type] = {
    "random": RandomRanker,
    "lang_vis_out": LangVisOutRanker,
    "cosine": CosineRanker,
}
_ALIASES = {"lang_vis.out": "lang_vis_out"}
# Every name `make_ranker` accepts (X-ICM's spelling included): parsers offer exactly these.
RANKER_NAMES: tuple[str, ...] = (*RANKERS, *_ALIASES)


def make_ranker(name: str, **options: Any) -> Ranker:
    """A ranker by name (`random`, `lang_vis_out` or X-ICM's `lang_vis.out`, `cosine`)."""
    key = _ALIASES.get(name, name)
    try:
        ranker_class = RANKERS[key]
    except KeyError:
        raise ValueError(f"unknown ranker {name!r}; choose one of {', '.join(RANKERS)}") from None
    try:
        return ranker_class(**options)
    except TypeError as error:
        raise TypeError(f"ranker {name!r}: {error}") from None
