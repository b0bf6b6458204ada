"""The X-ICM agent end to end on minibench: a real bank of simulator demos, the tiny dynamics
model, a tiny random chat model through the transformers backend (constrained decoding, so
its replies are actions), the spawned-worker runner and the records it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agnostos.evaluation.agents import LLMConfig, XICMAgent
from agnostos.evaluation.agents.xicm import SYSTEM_PROMPT, build_user_prompt, conversation
from agnostos.evaluation.records import read_records
from agnostos.evaluation.runner import Runner, RunnerConfig
from agnostos.evaluation.suites import SuiteConfig
from agnostos.observation_text import DemoText

pytestmark = pytest.mark.timeout(900)

# X-ICM's system prompt, byte for byte (crosstask_icl_agent.py, SYSTEM_PROMPT).
XICM_SYSTEM_PROMPT = (
    "You are a Franka Panda robot with a parallel gripper. We provide you with some demos from "
    "some seen tasks, in the format of [task_instruction, observation]>[ 7-dim action_1, 7-dim "
    "action_2, ..., 7-dim action_N ]. Then you will receive an unseen task instruction with a "
    "new observation, and you need to output a list of 7-dim actions that match the trends in "
    "the demos. Do not output anything else."
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_prompt_is_xicms_byte_for_byte() -> None:
    """System prompt verbatim; one user line: demos most similar first, each + ", ", then the
    query observation and ">"."""
    demos = [
        DemoText("['instruction': push the red button, {'button': [47, 52, 77]}]",
                 ((47, 52, 83, 0, 36, 0, 1), (47, 52, 77, 0, 36, 0, 0))),
        DemoText("['instruction': open the drawer, {'drawer handle': [60, 41, 80]}]",
                 ((60, 45, 80, 36, 0, 18, 1),)),
    ]  # fmt: skip
    query = "['instruction': turn off the light, {'button': [50, 50, 78]}]"
    user = build_user_prompt(demos, query)
    assert user == (
        "['instruction': push the red button, {'button': [47, 52, 77]}]>"
        "[[47, 52, 83, 0, 36, 0, 1], [47, 52, 77, 0, 36, 0, 0]], "
        "['instruction': open the drawer, {'drawer handle': [60, 41, 80]}]>"
        "[[60, 45, 80, 36, 0, 18, 1]], "
        "['instruction': turn off the light, {'button': [50, 50, 78]}]>"
    )
    assert SYSTEM_PROMPT == XICM_SYSTEM_PROMPT
    assert conversation(user) == [
        {"role": "system", "content": XICM_SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seen-task demos -> shards -> a bank with demo text (tiny dynamics model, 32 px), a
    tiny chat model, and stored test episodes of one unseen task."""
    from agnostos.cli import main
    from agnostos.envs.minibench.generate import generate
    from agnostos.models.tiny import build_tiny_base
    from agnostos.models.tiny_llm import build_tiny_llm
    from agnostos.shards.convert import convert

    root = tmp_path_factory.mktemp("xicm")
    base = build_tiny_base(root / "sd")
    generate(("pick_up_block", "push_button"), 2, root / "demos", image_size=32, progress=False)
    convert(root / "demos", root / "shards", show_progress=False)
    status = main([
        "bank", "build", "--shards", str(root / "shards"), "--model", str(base),
        "--out", str(root / "bank"), "--steps", "2", "--resolution", "32", "--suite",
        "minibench", "--demo-text", "required", "--no-progress",
    ])  # fmt: skip
    assert status == 0
    suite = _suite(root / "test")
    suite.prepare_test_data(workers=1, progress=False)
    return {
        "root": root, "base": base, "bank": root / "bank", "test": root / "test",
        "llm": build_tiny_llm(root / "llm"),
        "short_llm": build_tiny_llm(root / "short_llm", context_length=64),
    }  # fmt: skip


def _suite(test_data: Path, **overrides) -> SuiteConfig:
    settings = dict(
        benchmark="minibench", split="unseen", tasks=["close_drawer"], episodes=1, seeds=[0],
        max_steps=3, image_size=32, test_data=str(test_data), generate_missing=True,
    )  # fmt: skip
    settings.update(overrides)
    return SuiteConfig(**settings)


def _agent(world: dict[str, Path], **overrides) -> XICMAgent:
    llm = LLMConfig(
        backend="transformers", model=str(overrides.pop("llm", world["llm"])),
        decoding="constrained", max_new_tokens=40, options={"threads": 1},
    )  # fmt: skip
    settings = dict(bank=str(world["bank"]), dynamics=str(world["base"]), llm=llm, top_k=3)
    settings.update(overrides)
    return XICMAgent(**settings)


def _run(world, agent, out: Path, **suite_overrides):
    runner = Runner(_suite(world["test"], **suite_overrides), agent, out, RunnerConfig(workers=1))
    return runner.run()


def test_one_episode_end_to_end_records_llm_calls_and_retrieval(world, tmp_path) -> None:
    from agnostos.evaluation.bank import DemoBank

    bank = DemoBank.load(world["bank"])
    (record,) = _run(world, _agent(world), tmp_path / "run")
    stats = record.agent_stats
    assert record.status == "ok", (record.error_type, record.error_message)
    assert 1 <= record.steps <= 3
    assert stats["llm_calls"] >= 1 and stats["prompt_tokens"] > stats["reply_tokens"] > 0
    assert len(stats["parse_status"]) == stats["llm_calls"]
    assert set(stats["parse_status"]) <= {"ok", "no_actions"}  # constrained: never int_error
    assert len(stats["retrieved"]) == stats["llm_calls"]
    assert all(len(ids) == 3 and set(ids) <= set(bank.ids) for ids in stats["retrieved"])
    calls = [json.loads(line) for line in (tmp_path / "run" / "llm_calls.jsonl").open()]
    assert len(calls) == stats["llm_calls"]
    first = calls[0]
    assert first["key"] == str(record.key) and first["system"] == XICM_SYSTEM_PROMPT
    top = bank.demo_text(first["retrieved"][0]).text
    assert first["user"].startswith(top + ", ")
    assert first["user"].endswith("]>")
    assert f"['instruction': {record.instruction}, {{" in first["user"]
    # the queue: one reply's actions run before the next query
    assert stats["plans"] == stats["llm_calls"]


def test_same_seed_gives_identical_records_and_another_seed_other_queries(world, tmp_path):
    agent = _agent(world)
    first = _run(world, agent, tmp_path / "a")
    again = _run(world, _agent(world), tmp_path / "b")
    strip = [(r.key, r.actions, r.steps, r.success, r.agent_stats) for r in first]
    assert strip == [(r.key, r.actions, r.steps, r.success, r.agent_stats) for r in again]
    calls_a = (tmp_path / "a" / "llm_calls.jsonl").read_text()
    calls_b = (tmp_path / "b" / "llm_calls.jsonl").read_text()
    assert calls_a == calls_b
    other = _run(world, _agent(world), tmp_path / "c", seeds=[7])
    seed_a = json.loads(calls_a.splitlines()[0])["seed"]
    assert json.loads((tmp_path / "c" / "llm_calls.jsonl").open().readline())["seed"] != seed_a
    assert other[0].key.seed == 7


def test_random_ranker_needs_no_dynamics_model(world, tmp_path) -> None:
    agent = _agent(world, ranker="random", dynamics=None)
    assert agent.model is None
    (record,) = _run(world, agent, tmp_path / "run")
    assert record.status == "ok" and record.agent_stats["llm_calls"] >= 1


def test_a_prompt_longer_than_the_context_is_that_episodes_error(world, tmp_path) -> None:
    records = _run(world, _agent(world, llm=world["short_llm"]), tmp_path / "run", episodes=1)
    (record,) = records
    assert record.status == "error" and "PromptTooLong" in record.error_message
    assert read_records(tmp_path / "run") == records


def test_bad_settings_are_refused_before_any_work(world, tmp_path) -> None:
    from agnostos.models.tiny import TinySpec, build_tiny_base

    other = build_tiny_base(tmp_path / "other", TinySpec(seed=5))
    with pytest.raises(ValueError, match=r"the bank was built with the dynamics model .* not "):
        _agent(world, dynamics=str(other))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _agent(world, dynamics=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="parsing: 'loose'"):
        _agent(world, parsing="loose")
    with pytest.raises(ValueError, match="top_k 99 exceeds the bank's 4 demos"):
        _agent(world, top_k=99)
    with pytest.raises(ValueError, match="unknown ranker"):
        _agent(world, ranker="nearest")
