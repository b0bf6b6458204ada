"""The rollout runner: environment workers, one batched agent, records that survive anything.

Environment worker processes (`worker.py`) each hold one simulator; the agent lives in this
process and is asked to act once for *all* environments waiting on it, so a model-backed
agent makes one call per round instead of one per environment. Agent calls run on their own
thread (`agent_thread.py`), so workers keep stepping and resetting while the agent thinks.
The unit of work is an `EpisodeKey(task, episode, seed)`.

What the runner guarantees:

- **Nothing lost.** Each finished episode is appended to the records file and fsynced
  (by the `RecordWriter`, the first callback) before it is reported anywhere else; a
  killed run loses at most the episodes in flight.
- **Resume, never repeat.** Keys already in the output folder's records are skipped.
  A folder made under another configuration (its `run.json` fingerprint) is refused,
  unless `overwrite` clears it first.
- **Crash-proof.** A worker that dies or hangs past its deadline is killed and replaced,
  and its episode retried up to `retries` times, then recorded with status `error`. An
  exception in the agent for one environment is recorded for that episode; the run goes
  on.
- **Real seeds.** Every key derives one seed, `derive_seed(task, episode, seed)`: the
  worker seeds Python, numpy and torch with it before the reset, and the agent's
  `EpisodeContext` carries it (and a numpy Generator built from it).
- **Several machines.** `shard=(i, n)` runs every n-th key from the i-th; each shard
  writes its own records file in the shared folder and the scorer merges them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import shutil
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from agnostos.atomic import atomic_write_json
from agnostos.envs.protocol import Observation, StepResult
from agnostos.evaluation.agent_thread import AgentThread, Done
from agnostos.evaluation.agents.base import Agent, EpisodeContext
from agnostos.evaluation.callbacks import EpisodeInfo, EvalCallback, RunInfo
from agnostos.evaluation.records import (
    PLAN_NAME,
    RECORDS_GLOB,
    EpisodeKey,
    EpisodeRecord,
    RecordsWriter,
    RunPlan,
    read_records,
    records_name,
)
from agnostos.evaluation.suites import SuiteConfig, episode_folder
from agnostos.evaluation.worker import worker_main
from agnostos.seeding import derive_seed
from agnostos.shards.episode import Episode

__all__ = ["RecordWriter", "RunConfigError", "Runner", "RunnerConfig", "plan_run", "shard_keys"]


class RunConfigError(ValueError):
    """The output folder or the run settings do not allow this run (named, nothing done)."""


@dataclass(frozen=True)
class RunnerConfig:
    """How the runner runs (none of it changes results, so none is in the fingerprint).

    Args:
        workers: environment worker processes (one simulator each).
        reset_timeout: seconds a worker may take to start and reset an episode.
        step_timeout: seconds a worker may take for one action.
        retries: how often an episode is retried after its worker crashed, hung or its
            simulator failed, before it is recorded as an error.
        threads: CPU threads per worker (OMP/MKL/OpenBLAS).
        batch_wait: once one environment waits for an action and the agent is free,
            at most this many seconds to wait for the others still stepping or resetting,
            so they share one agent call; never longer than the last call took (an agent
            that costs nothing never waits). 0 acts on whoever is ready at once.
    """

    workers: int = 2
    reset_timeout: float = 300.0
    step_timeout: float = 120.0
    retries: int = 2
    threads: int = 1
    batch_wait: float = 1.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise RunConfigError(f"runner.workers must be >= 1, got {self.workers}")
        if self.retries < 0:
            raise RunConfigError(f"runner.retries must be >= 0, got {self.retries}")
        if min(self.reset_timeout, self.step_timeout) <= 0:
            raise RunConfigError("runner.reset_timeout and runner.step_timeout must be > 0")
        if self.batch_wait < 0:
            raise RunConfigError(f"runner.batch_wait must be >= 0, got {self.batch_wait}")


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def plan_run(suite: SuiteConfig, agent: Agent, extra: dict[str, Any] | None = None) -> RunPlan:
    """The plan of a run: every key, and the fingerprint of what decides its results."""
    settings = {"suite": suite.settings(), "agent": agent.name, "agent_settings": agent.settings()}
    return RunPlan(
        suite=f"{suite.benchmark}_{suite.split}",
        tasks=suite.task_levels(),
        episodes=suite.episode_numbers(),
        seeds=list(suite.seeds),
        max_steps=suite.max_steps,
        agent=agent.name,
        fingerprint=_fingerprint(settings),
        config={**settings, **(extra or {})},
    )


def shard_keys(keys: Sequence[EpisodeKey], shard: int, shards: int) -> list[EpisodeKey]:
    """Shard `shard` of `shards`: every `shards`-th key (so each shard gets every task)."""
    if shards < 1 or not 0 <= shard < shards:
        raise RunConfigError(f"shard {shard}/{shards} is out of range")
    return list(keys[shard::shards])


class RecordWriter(EvalCallback):
    """Appends each record to this shard's records file (durable before anyone else sees it)."""

    def __init__(self) -> None:
        self._writer: RecordsWriter | None = None

    def on_run_start(self, run: RunInfo) -> None:
        self._writer = RecordsWriter(run.out / records_name(run.shard, run.shards))

    def on_episode_end(self, record: EpisodeRecord) -> None:
        assert self._writer is not None, "on_run_start was not called"
        self._writer.append(record)

    def on_run_end(self, run: RunInfo, records: Sequence[EpisodeRecord]) -> None:
        if self._writer is not None:
            self._writer.close()


@dataclass
class _Episode:
    """An episode in flight in one worker."""

    key: EpisodeKey
    level: str
    started: float
    attempts: int
    stored: Episode | None = None  # read by the worker, sent with the first observation
    variation: int = 0
    instruction: str = ""
    steps: int = 0
    actions: list[list[float]] = field(default_factory=list)
    observation: Observation | None = None


class _Worker:
    """One worker process and the request it owes an answer to."""

    def __init__(self, slot: int, context: Any, suite: SuiteConfig, config: RunnerConfig):
        self.slot = slot
        parent, child = context.Pipe()
        self.process = context.Process(
            target=worker_main,
            args=(child, suite.backend, suite.image_size, suite.cameras, config.threads),
            daemon=True,
            name=f"agnostos-eval-worker-{slot}",
        )
        self.process.start()
        child.close()
        self.conn: Connection = parent
        self.episode: _Episode | None = None
        # idle | resetting | preparing (agent reset) | acting (waits for the agent) |
        # thinking (in an agent call) | stepping
        self.state = "idle"
        self.deadline = float("inf")
        self.waiting_since = 0.0
        self.last_task: str | None = None  # its simulator has this task's scene loaded

    def wait_for_action(self) -> None:
        self.state = "acting"
        self.waiting_since = time.monotonic()

    def send(self, message: tuple, timeout: float) -> None:
        self.conn.send(message)
        self.deadline = time.monotonic() + timeout

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            with contextlib.suppress(BrokenPipeError, OSError):  # it may be gone already
                self.conn.send(("close",))
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class Runner:
    """Runs a suite's keys through an agent; `run()` returns every record of the folder."""

    def __init__(
        self,
        suite: SuiteConfig,
        agent: Agent,
        out: str | Path,
        config: RunnerConfig = RunnerConfig(),
        callbacks: Sequence[EvalCallback] = (),
        shard: tuple[int, int] = (0, 1),
        overwrite: bool = False,
        extra_settings: dict[str, Any] | None = None,
    ) -> None:
        self.suite = suite
        self.agent = agent
        self.out = Path(out)
        self.config = config
        self.callbacks = [RecordWriter(), *callbacks]
        self.shard, self.shards = shard
        self.overwrite = overwrite
        self.plan = plan_run(suite, agent, extra_settings)
        shard_keys((), self.shard, self.shards)  # validates the shard before any work
        self._acting = False  # an act() call is submitted and not yet answered

    # -- the output folder ---------------------------------------------------------------------

    def _claim_folder(self) -> None:
        """Write run.json, or check that the folder's run is this one."""
        plan_path = self.out / PLAN_NAME
        if self.overwrite:
            self._clear()
        elif plan_path.exists():
            existing = RunPlan.load(self.out)
            if existing.fingerprint != self.plan.fingerprint:
                raise RunConfigError(
                    f"{self.out}: holds an evaluation with other settings (agent "
                    f"{existing.agent}, suite {existing.suite}); choose another --out, "
                    "or pass --overwrite to discard it"
                )
        elif any(self.out.glob(RECORDS_GLOB)):
            raise RunConfigError(
                f"{self.out}: holds episode records but no {PLAN_NAME}; choose another --out, "
                "or pass --overwrite to discard them"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(plan_path, self.plan.to_json())

    def _clear(self) -> None:
        for path in self.out.glob(RECORDS_GLOB):
            path.unlink()
        (self.out / PLAN_NAME).unlink(missing_ok=True)
        shutil.rmtree(self.out / "videos", ignore_errors=True)

    # -- events ----------------------------------------------------------------------------------

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(*args)

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> list[EpisodeRecord]:
        self._claim_folder()
        done = read_records(self.out) if any(self.out.glob(RECORDS_GLOB)) else []
        finished = {record.key for record in done}
        mine = shard_keys(self.plan.keys(), self.shard, self.shards)
        todo = [key for key in mine if key not in finished]
        run = RunInfo(self.plan, self.out, tuple(done), tuple(todo), self.shard, self.shards)
        self._emit("on_run_start", run)
        try:
            if todo:
                self.agent.open_run(self.out, (self.shard, self.shards))
                self._run_keys(todo)
        finally:
            self.agent.close()
        records = read_records(self.out)
        self._emit("on_run_end", run, records)
        return records

    def _run_keys(self, todo: list[EpisodeKey]) -> None:
        context = multiprocessing.get_context("spawn")
        pending = deque((key, 1) for key in todo)
        workers = [
            _Worker(slot, context, self.suite, self.config)
            for slot in range(min(self.config.workers, len(todo)))
        ]
        self._agent_thread = AgentThread()
        self._last_call: float | None = None  # seconds the last act() took
        try:
            while pending or self._agent_thread.pending or any(w.state != "idle" for w in workers):
                for worker in workers:
                    if worker.state == "idle" and pending:
                        self._start(worker, *_next_key(pending, worker.last_task))
                gather_deadline = self._maybe_act(workers)
                self._wait(workers, pending, context, gather_deadline)
        finally:
            for worker in workers:
                worker.stop()
            self._agent_thread.close()

    def _start(self, worker: _Worker, key: EpisodeKey, attempt: int) -> None:
        folder = episode_folder(self.suite.test_data, key.task, key.episode)
        worker.episode = _Episode(key, self.plan.tasks[key.task], time.monotonic(), attempt)
        worker.last_task = key.task
        seed = derive_seed(key.task, key.episode, key.seed)
        worker.send(("reset", str(folder), seed), self.config.reset_timeout)
        worker.state = "resetting"

    # -- batching ------------------------------------------------------------------------------

    def _maybe_act(self, workers: list[_Worker]) -> float | None:
        """Ask the agent for every waiting environment, unless a call is already running or
        the gather window is still open; returns the window's end while it is open.

        The window (from the moment the first environment started waiting) lets environments
        still stepping or resetting join the call. It is `batch_wait`, capped by what the
        last call cost: waiting longer than one call takes would cost more than a second
        call, so an agent that costs nothing (replay) never waits at all.
        """
        if self._acting:
            return None
        waiting = [worker for worker in workers if worker.state == "acting"]
        if not waiting:
            return None
        coming = any(w.state in ("resetting", "preparing", "stepping") for w in workers)
        window = self.config.batch_wait
        if self._last_call is not None:
            window = min(window, self._last_call)
        deadline = min(worker.waiting_since for worker in waiting) + window
        if coming and time.monotonic() < deadline:
            return deadline
        batch = [(worker.slot, worker.episode.observation) for worker in waiting]
        for worker in waiting:
            worker.state = "thinking"
        self._agent_thread.submit(
            ("act", [(worker, worker.episode) for worker in waiting]), _act_each, self.agent, batch
        )
        self._acting = True
        return None

    # -- waiting -------------------------------------------------------------------------------

    def _wait(
        self,
        workers: list[_Worker],
        pending: deque,
        context: Any,
        gather_deadline: float | None,
    ) -> None:
        """Sleep until a worker answers, the agent finishes a job, a deadline passes or the
        gather window closes; then handle whatever happened."""
        busy = [worker for worker in workers if worker.state in ("resetting", "stepping")]
        deadlines = [worker.deadline for worker in busy]
        if gather_deadline is not None:
            deadlines.append(gather_deadline)
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        ready = set(wait([w.conn for w in busy] + [self._agent_thread.ready], timeout=timeout))
        if self._agent_thread.ready in ready:
            for done in self._agent_thread.collect():
                self._agent_done(done, workers)
        now = time.monotonic()
        for worker in busy:
            if worker.conn in ready:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    worker.process.join(timeout=5)  # the pipe closes before the exit is reaped
                    exit_code = worker.process.exitcode
                    self._lost(worker, workers, pending, context, "WorkerCrash",
                               f"the worker process died (exit code {exit_code})")  # fmt: skip
                    continue
                self._answer(worker, message, workers, pending, context)
            elif now >= worker.deadline:
                what = "reset" if worker.state == "resetting" else "step"
                limit = self.config.reset_timeout if what == "reset" else self.config.step_timeout
                self._lost(worker, workers, pending, context, "WorkerTimeout",
                           f"no answer to a {what} within {limit:g} s")  # fmt: skip

    def _answer(
        self, worker: _Worker, message: tuple, workers: list, pending: deque, context: Any
    ) -> None:
        episode = worker.episode
        assert episode is not None
        kind = message[0]
        if kind == "simulator_error":
            self._lost(worker, workers, pending, context, "SimulatorError", message[1])
        elif kind == "error":
            self._finish(worker, success=False, status="error", error=(message[1], message[2]))
        elif kind == "observation":
            _, observation, episode.stored = message
            episode.variation = int(episode.stored.variation)
            episode.instruction = str(observation.instruction)
            episode.observation = observation
            info = EpisodeInfo(
                episode.key, episode.level, episode.variation, episode.instruction, worker.slot
            )
            episode_context = EpisodeContext(
                key=episode.key, task=episode.key.task, level=episode.level,
                variation=episode.variation, instruction=episode.instruction,
                seed=derive_seed(episode.key.task, episode.key.episode, episode.key.seed),
                stored=episode.stored,
            )  # fmt: skip
            self._emit("on_episode_start", episode.key, info)
            self._agent_thread.submit(
                ("reset", worker, episode), self.agent.reset, worker.slot, episode_context
            )
            worker.state = "preparing"
        elif kind == "step":
            self._stepped(worker, message[1])

    def _stepped(self, worker: _Worker, result: StepResult) -> None:
        episode = worker.episode
        assert episode is not None
        episode.steps += 1
        episode.observation = result.observation
        if result.success or result.terminal or episode.steps >= self.suite.max_steps:
            error = _split_error(result.error) if result.error else None
            self._finish(worker, success=bool(result.success), status="ok", error=error)
        else:
            worker.wait_for_action()

    # -- the agent's answers ---------------------------------------------------------------------

    def _agent_done(self, done: Done, workers: list[_Worker]) -> None:
        kind = done.tag[0]
        if kind == "act":
            self._acting = False
            self._last_call = done.seconds
            for (worker, episode), outcome in zip(done.tag[1], done.result, strict=True):
                if worker in workers and worker.episode is episode:
                    self._send_action(worker, outcome)
        elif kind == "reset":
            _, worker, episode = done.tag
            if worker not in workers or worker.episode is not episode:
                return
            if done.error is not None:
                self._finish(worker, success=False, status="error",
                             error=(type(done.error).__name__, str(done.error)))  # fmt: skip
            else:
                worker.wait_for_action()
        elif kind == "stats":
            if done.error is not None:
                stats = {"stats_error": f"{type(done.error).__name__}: {done.error}"}
            else:
                stats = dict(done.result or {})
            self._emit("on_episode_end", replace(done.tag[1], agent_stats=stats))

    def _send_action(self, worker: _Worker, outcome: Any) -> None:
        episode = worker.episode
        if isinstance(outcome, BaseException):
            self._finish(worker, success=False, status="error",
                         error=(type(outcome).__name__, str(outcome)))  # fmt: skip
            return
        action = np.asarray(outcome, dtype=np.float64)
        self._emit("on_step", episode.key, episode.steps, episode.observation, action)
        episode.actions.append([float(value) for value in action])
        worker.send(("step", action), self.config.step_timeout)
        worker.state = "stepping"

    def _lost(
        self,
        worker: _Worker,
        workers: list[_Worker],
        pending: deque,
        context: Any,
        error_type: str,
        message: str,
    ) -> None:
        """A worker crashed, hung or its simulator failed: replace it, retry the episode."""
        episode = worker.episode
        assert episode is not None
        worker.stop(kill=True)
        replacement = _Worker(worker.slot, context, self.suite, self.config)
        workers[workers.index(worker)] = replacement
        if episode.attempts <= self.config.retries:
            pending.appendleft((episode.key, episode.attempts + 1))
            return
        replacement.episode = episode
        self._finish(replacement, success=False, status="error", error=(error_type, message))

    def _finish(
        self,
        worker: _Worker,
        success: bool,
        status: str,
        error: tuple[str, str] | None = None,
    ) -> None:
        """The episode's record, reported once the agent's statistics for it are in (the
        worker is free at once)."""
        episode = worker.episode
        assert episode is not None
        if episode.observation is not None:
            self._emit("on_step", episode.key, episode.steps, episode.observation, None)
        stored = episode.stored
        record = EpisodeRecord(
            task=episode.key.task, level=episode.level, variation=episode.variation,
            episode=episode.key.episode, seed=episode.key.seed,
            instruction=episode.instruction or (stored.instruction if stored else ""),
            steps=episode.steps, success=success, status=status,
            error_type=error[0] if error else None, error_message=error[1] if error else None,
            actions=episode.actions, agent_stats={},
            seconds=round(time.monotonic() - episode.started, 3), attempts=episode.attempts,
        )  # fmt: skip
        worker.episode = None
        worker.state = "idle"
        worker.deadline = float("inf")
        if episode.instruction:  # the agent was reset for it
            self._agent_thread.submit(("stats", record), self.agent.episode_stats, worker.slot)
        else:
            self._emit("on_episode_end", record)


def _next_key(pending: deque, task: str | None) -> tuple[EpisodeKey, int]:
    """The next (key, attempt) for a worker: the first pending one of the task its simulator
    has loaded, if any, else the first one (so a worker rarely builds another task's scene)."""
    if task is not None:
        for index, (key, attempt) in enumerate(pending):
            if key.task == task:
                del pending[index]
                return key, attempt
    return pending.popleft()


def _act_each(agent: Agent, batch: list[tuple[int, Observation]]) -> list[Any]:
    """One `act` call for the batch; if it fails, each environment alone, so that the
    exception is recorded for the episodes that raise it and no other."""
    try:
        actions = agent.act(batch)
        if len(actions) != len(batch):
            raise ValueError(f"act() returned {len(actions)} actions for {len(batch)}")
        return list(actions)
    except Exception:
        outcomes: list[Any] = []
        for entry in batch:
            try:
                outcomes.extend(agent.act([entry]))
            except Exception as error:
                outcomes.append(error)
        return outcomes


def _split_error(text: str) -> tuple[str, str]:
    """`"IKError: message"` -> ("IKError", "message"); a bare message -> ("Error", text)."""
    head, sep, rest = text.partition(": ")
    if sep and head.isidentifier():
        return head, rest
    return "Error", text
