"""The rollout evaluator for real: spawned minibench workers, stored test episodes, records
on disk, a SIGKILL mid-run, injected crashes and hangs, shards, and the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agnostos.cli import main
from agnostos.evaluation.agents import NoopAgent, ReplayAgent
from agnostos.evaluation.records import read_records
from agnostos.evaluation.runner import RunConfigError, Runner, RunnerConfig, shard_keys
from agnostos.evaluation.suites import SuiteConfig, SuiteError
from agnostos.seeding import derive_seed

pytestmark = pytest.mark.timeout(600)

TESTS = Path(__file__).resolve().parent
TASKS = ["stack_blocks", "close_drawer", "knock_over_bottle"]


@pytest.fixture(scope="module")
def test_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stored test episodes: 3 unseen tasks x 3 episodes, scene seed 1."""
    root = tmp_path_factory.mktemp("minibench_test")
    suite = _suite(root, episodes=3, generate_missing=True)
    assert len(suite.prepare_test_data(workers=2, progress=False)) == 9
    return root


def _suite(root: Path, **overrides) -> SuiteConfig:
    settings = dict(
        benchmark="minibench", tasks=TASKS, episodes=2, seeds=[0], cameras=["front"],
        test_data=str(root), generate_missing=False,
    )  # fmt: skip
    settings.update(overrides)
    return SuiteConfig(**settings)


def _run(suite, agent, out, **kwargs):
    config = kwargs.pop("config", RunnerConfig(workers=2))
    return Runner(suite, agent, out, config, **kwargs).run()


def test_replay_succeeds_and_noop_fails_on_stored_test_episodes(test_data, tmp_path):
    suite = _suite(test_data, episodes=3)
    replay = _run(suite, ReplayAgent(), tmp_path / "replay")
    assert len(replay) == 9 and all(record.status == "ok" for record in replay)
    assert sum(record.success for record in replay) / len(replay) >= 0.95
    noop = _run(suite, NoopAgent(), tmp_path / "noop")
    assert sum(record.success for record in noop) == 0
    assert all(record.steps == suite.max_steps for record in noop)
    record = replay[0]
    assert record.level in ("level1", "level2") and record.instruction
    assert len(record.actions) == record.steps and len(record.actions[0]) == 9
    plan = json.loads((tmp_path / "replay" / "run.json").read_text())
    assert plan["agent"] == "replay" and plan["tasks"]["knock_over_bottle"] == "level2"


def test_a_batched_agent_gets_every_waiting_environment_and_real_seeds(test_data, tmp_path):
    from eval_faults import RecordingReplay

    agent = RecordingReplay(seconds=0.3)  # a model call: the other worker steps meanwhile
    _run(_suite(test_data, seeds=[0, 7]), agent, tmp_path / "run")
    assert max(agent.batch_sizes) == 2  # both workers waited on one call
    assert agent.seeds["close_drawer/episode1/seed7"] == derive_seed("close_drawer", 1, 7)
    assert len(set(agent.seeds.values())) == 12


def test_actions_depend_on_the_key_only_not_on_workers_or_order(test_data, tmp_path):
    from eval_faults import RandomAgent

    one = _run(_suite(test_data), RandomAgent(), tmp_path / "one", config=RunnerConfig(workers=1))
    two = _run(_suite(test_data), RandomAgent(), tmp_path / "two", config=RunnerConfig(workers=2))
    by_key = {record.key: record.actions for record in one}
    assert {record.key: record.actions for record in two} == by_key


def test_crashes_and_hangs_are_retried_then_recorded(test_data, tmp_path, monkeypatch):
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "crash-stack_blocks-0").write_text("1")  # once: the retry succeeds
    (faults / "hang-close_drawer-1").write_text("1")
    (faults / "crash-knock_over_bottle-0").write_text("99")  # always
    monkeypatch.setenv("AGNOSTOS_FAULTS", str(faults))
    suite = _suite(test_data, backend="eval_faults:faulty_minibench")
    config = RunnerConfig(workers=2, step_timeout=10, retries=1)
    records = {r.key: r for r in _run(suite, ReplayAgent(), tmp_path / "run", config=config)}
    assert len(records) == 6
    crashed = records[next(k for k in records if (k.task, k.episode) == ("stack_blocks", 0))]
    assert crashed.status == "ok" and crashed.success and crashed.attempts == 2
    hung = records[next(k for k in records if (k.task, k.episode) == ("close_drawer", 1))]
    assert hung.status == "ok" and hung.success and hung.attempts == 2
    lost = records[next(k for k in records if (k.task, k.episode) == ("knock_over_bottle", 0))]
    assert (lost.status, lost.success, lost.error_type, lost.attempts) == (
        "error", False, "WorkerCrash", 2,
    )  # fmt: skip
    assert "exit code 3" in lost.error_message
    others = [r for k, r in records.items() if r is not lost]
    assert all(r.success for r in others)


def test_an_agent_exception_is_recorded_for_its_episode_and_the_run_goes_on(test_data, tmp_path):
    from eval_faults import FailingOn

    records = _run(_suite(test_data), FailingOn("close_drawer"), tmp_path / "run")
    failed = [r for r in records if r.task == "close_drawer"]
    assert [r.status for r in failed] == ["error", "error"]
    assert failed[0].error_type == "RuntimeError" and "close_drawer" in failed[0].error_message
    assert all(r.success for r in records if r.task != "close_drawer")


def test_shards_cover_every_key_once_in_one_folder(test_data, tmp_path):
    suite = _suite(test_data, seeds=[0, 1])
    keys = Runner(suite, ReplayAgent(), tmp_path / "x").plan.keys()
    split = [shard_keys(keys, index, 3) for index in range(3)]
    assert sorted(k for part in split for k in part) == sorted(keys)
    out = tmp_path / "run"
    for index in range(2):
        _run(suite, ReplayAgent(), out, shard=(index, 2))
    assert sorted(p.name for p in out.glob("episodes*.jsonl")) == [
        "episodes-0-of-2.jsonl", "episodes-1-of-2.jsonl",
    ]  # fmt: skip
    assert sorted(r.key for r in read_records(out)) == sorted(keys)


def test_a_folder_of_another_configuration_is_refused_unless_overwritten(test_data, tmp_path):
    suite = _suite(test_data, tasks=["close_drawer"], episodes=1)
    _run(suite, ReplayAgent(), tmp_path / "run")
    with pytest.raises(RunConfigError, match="holds an evaluation with other settings"):
        _run(suite, NoopAgent(), tmp_path / "run")
    records = _run(suite, NoopAgent(), tmp_path / "run", overwrite=True)
    assert [r.success for r in records] == [False]


def test_sigkill_mid_run_then_rerun_gives_every_key_once(test_data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    argv = [
        sys.executable, "-m", "agnostos", "eval", "--suite.benchmark", "minibench",
        "--suite.tasks", json.dumps(TASKS), "--suite.episodes", "3", "--suite.seeds", "[0, 1]",
        "--suite.cameras", '["front"]', "--suite.test_data", str(test_data),
        "--suite.generate_missing", "false", "--agent", "eval_faults.SlowReplay",
        "--report.progress", "false", "--report.wandb", "false", "--report.videos_per_task",
        "0", "--out", str(out),
    ]  # fmt: skip
    process = subprocess.Popen(argv, env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    records = out / "episodes.jsonl"
    while time.monotonic() < deadline:
        if records.exists() and records.read_text().count("\n") >= 4:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = records.read_text().splitlines()
    assert 4 <= len(before) < 18
    assert subprocess.run(argv, env=env, timeout=300).returncode == 0
    after = records.read_text().splitlines()
    assert after[: len(before)] == before  # finished episodes untouched
    keys = [(r.task, r.episode, r.seed) for r in read_records(out)]
    assert len(keys) == len(set(keys)) == 18


def test_eval_command_line_refuses_bad_input_in_one_line(test_data, tmp_path, capsys):
    base = ["eval", "--suite.tasks", '["close_drawer"]', "--suite.episodes", "1",
            "--suite.test_data", str(test_data), "--out", str(tmp_path / "run"),
            "--report.wandb", "false", "--report.progress", "false"]  # fmt: skip
    cases = [
        (["--agent", "replay", "--suite.tasks", '["fly_away"]'], "fly_away"),
        (["--agent", "no.such.Agent"], "agent: cannot load 'no.such.Agent'"),
        (["--agent", "agnostos.evaluation.agents.CustomAgent", "--agent.policy", "nope:X"],
         "policy 'nope:X': cannot import 'nope'"),
        (["--agent", "replay", "--suite.episodez", "3"], "episodez"),
        (["--agent", "replay", "--suite.backend", "rlbench"], "rlbench"),
        (["--agent", "replay", "--suite.generate_missing", "false", "--suite.episodes", "9"],
         "missing stored test episodes"),
    ]  # fmt: skip
    for extra, needle in cases:
        status = main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2, (extra, err)
        assert len(err) == 1 and needle in err[0], (extra, err)
    assert not list((tmp_path / "run").glob("episodes*.jsonl"))


def test_suite_settings_are_checked() -> None:
    with pytest.raises(SuiteError, match="unknown unseen task"):
        SuiteConfig(tasks=["open_drawer"])
    with pytest.raises(SuiteError, match=r"suite\.cameras"):
        SuiteConfig(cameras=["nose"])
    with pytest.raises(SuiteError, match=r"suite\.seeds"):
        SuiteConfig(seeds=[0, 0])
