"""Demo rankers: X-ICM parity on hand-built banks, random, cosine, the per-task cap, and the
BOS-feature finding on the tiny text encoder."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from xicm_layout import xicm_features

from agnostos.evaluation.rankers import (
    CosineRanker,
    LangVisOutRanker,
    RandomRanker,
    RankingBank,
    RankingQuery,
    apply_task_cap,
    make_ranker,
    xicm_path_task_episode,
)

SEEN = "/data/seen_tasks/train"


def _xicm_features(rng: np.random.Generator, tasks: list[str], per_task: int) -> dict:
    """A bank in X-ICM's `all_diffusion_features.pkl` schema (float32 like the original)."""
    return xicm_features(rng, SEEN, tasks, per_task)


def test_lang_vis_out_matches_xicm_code_on_a_pickle_schema_bank() -> None:
    rng = np.random.default_rng(0)
    features = _xicm_features(rng, ["close_jar", "open_drawer", "push_buttons"], per_task=20)
    # Exact ties: two entries share a row, so tie-breaking must follow X-ICM's argsort.
    features["all_output_image_feats"][7] = features["all_output_image_feats"][41]
    bank = RankingBank.from_xicm(features)
    query_out = features["all_output_image_feats"][41] + 0.01
    query_bos = features["all_prompt_feats"][0]
    num_demos = 18

    # X-ICM, form_icl_demonstrations_crosstask_ranking.py L65-72, verbatim semantics.
    query_feat = np.concatenate([query_bos, query_out])
    memory_feat = np.concatenate(
        [features["all_prompt_feats"], features["all_output_image_feats"]], axis=1
    )
    similarity = np.dot(memory_feat, query_feat)
    selected = np.argsort(similarity)[::-1][:num_demos]

    ranking = LangVisOutRanker().rank(bank, RankingQuery(query_out, prompt_bos=query_bos), 18)
    assert ranking.indices == tuple(int(i) for i in selected)
    assert ranking.ids == tuple(features["all_demo_paths"][i] for i in selected)
    assert ranking.scores == tuple(float(similarity[i]) for i in selected)
    assert list(ranking.scores) == sorted(ranking.scores, reverse=True)
    assert {ranking.indices[0], ranking.indices[1]} == {7, 41}
    assert bank.tasks[0] == "close_jar" and bank.tasks[-1] == "push_buttons"
    # The BOS rows are one constant: ranking by the latents alone gives the same order.
    latent_only = np.argsort(features["all_output_image_feats"] @ query_out)[::-1][:18]
    assert set(latent_only) == set(selected)


def test_lang_vis_out_on_a_hand_computed_bank() -> None:
    bank = RankingBank(
        ids=("a", "b", "c", "d"),
        tasks=("t1", "t1", "t2", "t3"),
        output_latents=np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, -1.0]]),
        prompt_bos=np.array([[1.0], [1.0], [1.0], [5.0]]),
    )
    query = RankingQuery(output_latent=[1.0, 1.0], prompt_bos=[2.0])
    # scores: a 2+1=3, b 2+2=4, c 2+6=8, d 10-2=8 (tie c/d: argsort order reversed)
    ranking = LangVisOutRanker().rank(bank, query, 4)
    assert ranking.pairs() == [("d", 8.0), ("c", 8.0), ("b", 4.0), ("a", 3.0)]
    capped = LangVisOutRanker(max_per_task=1).rank(bank, query, 3)
    assert capped.ids == ("d", "c", "b")
    assert LangVisOutRanker(max_per_task=1).rank(bank, query, 4).ids == ("d", "c", "b")
    with pytest.raises(ValueError, match="needs the bank's prompt_bos"):
        LangVisOutRanker().rank(RankingBank(bank.ids, bank.tasks, bank.output_latents), query, 2)
    with pytest.raises(ValueError, match="k=5"):
        LangVisOutRanker().rank(bank, query, 5)


def test_task_cap_walks_down_the_ranking() -> None:
    tasks = ["a", "a", "b", "a", "c", "b", "b"]
    assert apply_task_cap([0, 1, 2, 3, 4, 5, 6], tasks, 5, 2) == [0, 1, 2, 4, 5]
    assert apply_task_cap([6, 5, 3], tasks, 2, None) == [6, 5]
    with pytest.raises(ValueError, match="max_per_task"):
        apply_task_cap([0], tasks, 1, 0)


def test_random_is_seeded_per_query_and_matches_xicm_first_draw() -> None:
    rng = np.random.default_rng(1)
    bank = RankingBank.from_xicm(_xicm_features(rng, ["x", "y", "z"], per_task=40))
    first = RandomRanker().rank(bank, RankingQuery(None, seed=42), 18)
    random.seed(42)  # what X-ICM does when it builds a task handler
    assert first.indices == tuple(random.sample(range(len(bank)), 18))
    assert RandomRanker().rank(bank, RankingQuery(None, seed=42), 18) == first
    other = RandomRanker().rank(bank, RankingQuery(None, seed=43), 18)
    assert other.indices != first.indices
    assert len(set(first.indices)) == 18 and set(first.scores) == {0.0}
    capped = RandomRanker(max_per_task=2).rank(bank, RankingQuery(None, seed=7), 6)
    assert sorted(bank.tasks[i] for i in capped.indices) == ["x", "x", "y", "y", "z", "z"]


def test_cosine_ignores_scale_and_mixes_in_the_text_term() -> None:
    bank = RankingBank(
        ids=("near-but-small", "far-but-large", "orthogonal"),
        tasks=("t1", "t2", "t3"),
        output_latents=np.array([[0.1, 0.1], [10.0, 0.0], [0.0, -3.0]]),
        text_embeddings=np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]),
    )
    query = RankingQuery(output_latent=[1.0, 1.0], text_embedding=[0.0, 2.0])
    plain = CosineRanker().rank(bank, query, 3)
    assert plain.ids == ("near-but-small", "far-but-large", "orthogonal")
    assert plain.scores[0] == pytest.approx(1.0)
    assert plain.scores[1] == pytest.approx(1 / np.sqrt(2))
    assert plain.scores[2] == pytest.approx(-1 / np.sqrt(2))
    # The raw dot product would prefer the large vector.
    assert LangVisOutRanker().rank(
        RankingBank(bank.ids, bank.tasks, bank.output_latents, prompt_bos=np.zeros((3, 1))),
        RankingQuery([1.0, 1.0], prompt_bos=[0.0]),
        1,
    ).ids == ("far-but-large",)
    mixed = CosineRanker(text_weight=0.5).rank(bank, query, 3)
    assert mixed.ids == ("far-but-large", "near-but-small", "orthogonal")
    assert mixed.scores[0] == pytest.approx(0.5 / np.sqrt(2) + 0.5)
    with pytest.raises(ValueError, match="text_embeddings"):
        CosineRanker(text_weight=0.5).rank(
            RankingBank(bank.ids, bank.tasks, bank.output_latents), query, 1
        )
    with pytest.raises(ValueError, match="text_weight"):
        CosineRanker(text_weight=1.5)


def test_make_ranker_and_bank_validation() -> None:
    assert isinstance(make_ranker("lang_vis.out"), LangVisOutRanker)
    assert make_ranker("cosine", text_weight=0.2, max_per_task=3) == CosineRanker(0.2, 3)
    assert make_ranker("random").name == "random"
    with pytest.raises(ValueError, match=r"unknown ranker 'vis\.in'"):
        make_ranker("vis.in")
    with pytest.raises(TypeError, match="ranker 'random'"):
        make_ranker("random", text_weight=0.1)
    with pytest.raises(ValueError, match="repeated"):
        RankingBank(("a", "a"), ("t", "t"), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="output_latents has 3 rows"):
        RankingBank(("a", "b"), ("t", "t"), np.zeros((3, 3)))
    with pytest.raises(KeyError, match="all_prompt_feats"):
        RankingBank.from_xicm({"all_demo_paths": [], "all_output_image_feats": []})
    assert xicm_path_task_episode(f"{SEEN}/close_jar/all_variations/episodes/episode17") == (
        "close_jar",
        17,
    )
    with pytest.raises(ValueError, match="episode<N>"):
        xicm_path_task_episode("close_jar/episodes/ep1")
    latents = np.arange(2 * 4 * 2 * 2, dtype=np.float32).reshape(2, 4, 2, 2)
    assert RankingBank(("a", "b"), ("t", "t"), latents).output_latents.shape == (2, 16)


def test_bos_feature_is_the_same_for_every_prompt(tmp_path: Path) -> None:
    """Documents X-ICM's quirk: CLIP's causal mask makes token 0 blind to the prompt, so
    the "lang" half of lang_vis_out is one constant vector; the pooled (EOS) feature is not."""
    from agnostos.models.dynamics_diffusion import DynamicsDiffusion
    from agnostos.models.tiny import build_tiny_base

    model = DynamicsDiffusion.from_pretrained(build_tiny_base(tmp_path / "sd"))
    prompts = ["open the top drawer", "push the maroon button", "", "stack 3 cups!"]
    hidden, pooled = model.encode_prompts(prompts)
    for row in range(1, len(prompts)):
        assert torch.equal(hidden[row, 0], hidden[0, 0])
    assert (hidden[0, 1] - hidden[1, 1]).abs().max() > 1e-4  # token 1 sees the prompt
    assert (pooled[0] - pooled[1]).abs().max() > 1e-4

    # So with BOS features taken from the model, lang_vis_out ranks like the latents alone.
    rng = np.random.default_rng(2)
    latents = rng.normal(size=(12, 64)).astype(np.float32)
    bos = hidden[:, 0].numpy()
    bank = RankingBank(
        ids=tuple(f"demo{i}" for i in range(12)),
        tasks=tuple(f"task{i % 3}" for i in range(12)),
        output_latents=latents,
        prompt_bos=np.tile(bos[0], (12, 1)),
        text_embeddings=np.tile(pooled.numpy(), (3, 1)),
    )
    query = RankingQuery(latents[5] + 0.1, prompt_bos=bos[1], text_embedding=pooled[1].numpy())
    ranking = LangVisOutRanker().rank(bank, query, 12)
    assert ranking.indices == tuple(int(i) for i in np.argsort(latents @ query.output_latent)[::-1])
    assert ranking.indices[0] == 5
    constant = float(bos[0] @ bos[1])
    assert ranking.scores[0] == pytest.approx(
        constant + float(latents[5] @ query.output_latent), rel=1e-5
    )
