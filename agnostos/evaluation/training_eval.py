"""Evaluation during training: rollouts of the model being trained, from a Lightning callback.

`RolloutEvaluation` runs the evaluator (`Runner`, the same code as `agnostos eval`) on a
small suite (a few tasks x a few stored test episodes) from `on_validation_epoch_end`, so
Lightning has already put the module in eval mode (and restores every module's mode after
validation), and logs the AGNOSTOS scores of the rollouts as metrics that
`ModelCheckpoint(monitor="eval/success", mode="max")` can keep the best checkpoint by.

The hook a LightningModule provides::

    def rollout_agent(self) -> agnostos.evaluation.agents.Agent:
        # e.g. VLAAgent.from_policy(self.policy, step=self.global_step)

It is called at every evaluation, on every rank, in the main thread, with the module in
eval mode and under the validation loop's inference mode. It returns an `Agent` over the
live weights, one that acts the same on every rank; the runner calls the agent on its own
thread and calls `agent.close()` when the evaluation ends, so `close` must not free or
move the live model (`VLAAgent.from_policy` does neither). Any LightningModule with this
method can be evaluated; the callback refuses, at setup, a module without it.

What happens at each evaluation (validation runs during sanity checking are skipped):

1. The Python, numpy, torch (and CUDA) random states and every module's train/eval flag
   are captured, and restored when the evaluation ends, whatever happens: rollouts never
   change the training random stream or leave a module in another mode.
2. The first rank of each machine empties the evaluation folder,
   `<default_root_dir>/rollouts/step-<N>/`, of earlier records (a re-run of the same step
   after a restart starts afresh); the ranks then meet.
3. Each rank runs its share of the episodes, `shard=(rank, world_size)` (every
   world_size-th key of the run plan), with its own environment workers, writing its own
   records file into the folder.
4. The records are gathered (`torch.distributed.all_gather_object`) and the scores
   computed from the gathered records and the plan, identically on every rank, as
   `agnostos eval scores` computes them; every rank logs the same keys and values with
   `sync_dist=False` (no collective in the logging path, so no rank can hang in it):
   `eval/success`, `eval/success_<level>` for the suite's levels (level1 and/or level2 of
   an unseen split; a seen split has one level, which is `eval/success`), one
   `eval/<task>/success` per task, `eval/errors` and `eval/episodes`. The keys come from
   the plan, never from the records, so they are the same on every rank and at every
   evaluation; a score that cannot be computed is logged as NaN (which `ModelCheckpoint`
   ranks last).
5. With a `WandbLogger` attached, rank 0 logs into the training run what the evaluator's
   W&B reporter logs: the episode table, the per-task bar chart and the rollout videos
   (`eval/episodes_table`, `eval/per_task_bar`, `eval/video/<task>`), at the training step.

A rank whose rollouts fail still joins the gather (with its error instead of records), and
then every rank raises the same error, so a failure stops training instead of hanging it.

Cadence: the callback evaluates at every validation; `every_n_steps` skips validations whose
global step is not a multiple of it. The simplest setup is `Trainer(val_check_interval=N,
check_val_every_n_epoch=None)` with `every_n_steps` unset: a skipped validation logs no
`eval/*` and a ModelCheckpoint monitoring it then sees the previous value again. DDP's
collective timeout (30 minutes by default) must exceed the longest evaluation: keep the
suite small.

FSDP: the hook's agent runs the module outside the FSDP wrapper, so a sharded module needs
its full parameters gathered by the hook; `VLAAgent.from_policy` assumes DDP (or one device),
so a VLA policy under FSDP is refused at setup.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from agnostos.evaluation.agents.base import Agent
from agnostos.evaluation.records import PLAN_NAME, RECORDS_GLOB, EpisodeRecord, RunPlan
from agnostos.evaluation.reporters import VIDEO_FOLDER, ProgressBar, VideoRecorder
from agnostos.evaluation.runner import Runner, RunnerConfig, shard_keys
from agnostos.evaluation.suites import SEEN_LEVEL, SuiteConfig, SuiteError
from agnostos.trainers.full_weights import shards_parameters

__all__ = [
    "ROLLOUT_DIR",
    "RolloutEvaluation",
    "capture_modes",
    "load_suite",
    "rng_states",
    "rollout_metrics",
]

ROLLOUT_DIR = "rollouts"
PREFIX = "eval"


# -- the suite -----------------------------------------------------------------------------------


def load_suite(suite: str | SuiteConfig | dict[str, Any]) -> SuiteConfig:
    """A suite from a `SuiteConfig`, its fields as a mapping, a YAML file or a name.

    A YAML file is an evaluation config (`configs/eval/*.yaml`, whose `suite:` section is
    used) or a bare mapping of suite fields. A name is `<benchmark>_<split>`
    (`minibench_seen`, `agnostos_unseen`) or a benchmark alone (its unseen split).
    """
    if isinstance(suite, SuiteConfig):
        return suite
    if isinstance(suite, dict):
        return _suite_from_mapping(suite, "suite")
    text = str(suite)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise SuiteError(f"suite: no such suite file {path}")
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("suite"), dict):
            data = data["suite"]
        if not isinstance(data, dict):
            raise SuiteError(f"suite: {path} holds no suite mapping")
        return _suite_from_mapping(data, str(path))
    from agnostos.tasks import SUITES

    benchmark, _, split = text.rpartition("_")
    if benchmark in SUITES and split in ("seen", "unseen"):
        return SuiteConfig(benchmark=benchmark, split=split)  # type: ignore[arg-type]
    if text in SUITES:
        return SuiteConfig(benchmark=text)
    names = ", ".join(f"{name}_seen, {name}_unseen" for name in sorted(SUITES))
    raise SuiteError(f"suite: {text!r} is neither a suite YAML file nor a suite name ({names})")


def _suite_from_mapping(data: dict[str, Any], where: str) -> SuiteConfig:
    known = {item.name for item in fields(SuiteConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SuiteError(f"{where}: unknown suite key(s) {', '.join(unknown)}")
    return SuiteConfig(**data)


# -- state that must survive an evaluation -----------------------------------------------------


def rng_states() -> dict[str, Any]:
    """The process's Python, numpy, torch and (initialised) CUDA random states."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def capture_modes(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule back in the train/eval mode it had on entry, whatever happens inside."""
    modes = [(child, child.training) for child in module.modules()]
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    states = rng_states()
    try:
        yield
    finally:
        restore_rng_states(states)


# -- scores ----------------------------------------------------------------------------------


def metric_keys(plan: RunPlan) -> list[str]:
    """The keys logged for a plan: fixed by the plan alone (tasks and levels)."""
    levels = [level for level in dict.fromkeys(plan.tasks.values()) if level != SEEN_LEVEL]
    return [
        f"{PREFIX}/success",
        *(f"{PREFIX}/success_{level}" for level in levels),
        *(f"{PREFIX}/{task}/success" for task in plan.tasks),
        f"{PREFIX}/errors",
        f"{PREFIX}/episodes",
    ]


def rollout_metrics(plan: RunPlan, records: Sequence[EpisodeRecord]) -> dict[str, float]:
    """Percent success overall, per level and per task (`score_records`, the aggregation of
    `agnostos eval scores`), error and episode counts; NaN for a score without records."""
    from agnostos.evaluation.scores import score_records

    table = score_records(plan, records)

    def value(mean: float | None) -> float:
        return math.nan if mean is None else float(mean)

    metrics = {f"{PREFIX}/success": value(table.overall.mean)}
    for level, average in table.levels.items():
        if level != SEEN_LEVEL:
            metrics[f"{PREFIX}/success_{level}"] = value(average.mean)
    for score in table.tasks:
        metrics[f"{PREFIX}/{score.task}/success"] = value(score.mean)
    metrics[f"{PREFIX}/errors"] = float(len(table.errors))
    metrics[f"{PREFIX}/episodes"] = float(len(records))
    return {key: metrics.get(key, math.nan) for key in metric_keys(plan)}


# -- the callback ------------------------------------------------------------------------------


class RolloutEvaluation(L.Callback):
    """Rollouts of the training model on a suite subset at validation (module docstring).

    Args:
        suite: a suite name (`minibench_seen`, `minibench_unseen`, `agnostos_unseen`), a
            suite or evaluation YAML (`configs/eval/*.yaml`), or a `SuiteConfig`.
        tasks: a subset of the suite's tasks (default: the suite's).
        episodes: stored test episodes per task (default: the suite's).
        max_steps: keyframe steps per episode (default: the suite's).
        seeds: evaluation seeds (default: the suite's).
        cameras: cameras the simulator renders (default: the suite's).
        image_size: render size (default: the suite's).
        test_data: the stored test episodes folder (default: the suite's); missing minibench
            episodes are generated once, at setup, by rank 0.
        every_n_steps: evaluate only at validations whose global step is a multiple of it
            (default: every validation; prefer setting `val_check_interval`).
        workers: environment worker processes per rank.
        runner: all the runner's settings (overrides `workers`).
        out: the evaluation folder; `{step}` in it is the global step (default
            `<default_root_dir>/rollouts/step-{step}`).
        videos_per_task: rollout videos per task (`<out>/videos/`, logged to W&B).
        video_camera: the camera the videos show.
        wandb: log the episode table, chart and videos into an attached `WandbLogger`.
        progress: show the evaluator's progress bar.
    """

    def __init__(
        self,
        suite: str | SuiteConfig = "minibench_seen",
        tasks: list[str] | None = None,
        episodes: int | None = None,
        max_steps: int | None = None,
        seeds: list[int] | None = None,
        cameras: list[str] | None = None,
        image_size: int | None = None,
        test_data: str | None = None,
        every_n_steps: int | None = None,
        workers: int = 2,
        runner: RunnerConfig | None = None,
        out: str | None = None,
        videos_per_task: int = 1,
        video_camera: str = "front",
        wandb: bool = True,
        progress: bool = False,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or null, got {every_n_steps}")
        if videos_per_task < 0:
            raise ValueError(f"videos_per_task must be >= 0, got {videos_per_task}")
        overrides = {
            "tasks": tasks, "episodes": episodes, "max_steps": max_steps, "seeds": seeds,
            "cameras": cameras, "image_size": image_size, "test_data": test_data,
        }  # fmt: skip
        base = load_suite(suite)
        self.suite = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        self.runner = runner if runner is not None else RunnerConfig(workers=workers)
        self.every_n_steps = every_n_steps
        self.out = out
        self.videos_per_task = videos_per_task
        self.video_camera = video_camera
        self.wandb = wandb
        self.progress = progress
        #: this rank's view of every evaluation: step -> metrics (identical on every rank)
        self.history: dict[int, dict[str, float]] = {}
        self.last_records: list[EpisodeRecord] = []
        self.last_plan: RunPlan | None = None

    # -- set-up --------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "rollout_agent", None)) and not _has_policy(pl_module):
            raise TypeError(
                f"RolloutEvaluation needs the LightningModule to provide rollout_agent() -> "
                f"Agent (or a VLAPolicy as .policy); {type(pl_module).__name__} has neither"
            )
        if shards_parameters(trainer.strategy) and _has_policy(pl_module):
            raise ValueError(
                "RolloutEvaluation cannot run a VLA policy sharded by FSDP; train with "
                "strategy: ddp (a LoRA run fits on every GPU) or drop the rollout callback"
            )
        self.suite.check_backend()
        if trainer.world_size > 1:
            # The values are the same on every rank by construction (computed from the
            # gathered records), so Lightning's advice to sync them is noise here.
            warnings.filterwarnings(
                "ignore", message=rf"It is recommended to use `self.log\('{PREFIX}/",
                category=PossibleUserWarning,
            )  # fmt: skip
        _all_ranks_ok(trainer, self._prepare_test_data if trainer.is_global_zero else None)

    def _prepare_test_data(self) -> None:
        self.suite.prepare_test_data(workers=self.runner.workers, progress=False)

    def output_dir(self, trainer: L.Trainer, step: int) -> Path:
        if self.out is None:
            return Path(trainer.default_root_dir) / ROLLOUT_DIR / f"step-{step}"
        if "{step}" in self.out:
            return Path(self.out.format(step=step))
        return Path(self.out) / f"step-{step}"

    # -- the hook ------------------------------------------------------------------------------

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        if self.every_n_steps is not None and step % self.every_n_steps != 0:
            return
        with preserved_rng(), capture_modes(pl_module):
            metrics = self.evaluate(trainer, pl_module, step)
        for key, value in metrics.items():
            pl_module.log(key, value, sync_dist=False, rank_zero_only=False)

    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
    ) -> dict[str, float]:
        """Run this rank's share, gather every rank's records, return the scores."""
        rank, world = trainer.global_rank, trainer.world_size
        out = self.output_dir(trainer, step)
        # one rank per machine clears (the folder may be shared, or local to each node)
        _all_ranks_ok(trainer, (lambda: _clear(out)) if trainer.local_rank == 0 else None)
        outcome: tuple[str, Any]
        plan: RunPlan | None = None
        try:
            agent = rollout_agent(pl_module)
            if not isinstance(agent, Agent):
                raise TypeError(
                    f"{type(pl_module).__name__}.rollout_agent() returned "
                    f"{type(agent).__name__}, not an agnostos Agent"
                )
            if getattr(agent, "object_names", "") is None:  # a VLA agent: the suite's names
                agent.object_names = self.suite.benchmark
            runner = Runner(
                self.suite, agent, out, self.runner, self._callbacks(),
                shard=(rank, world), extra_settings={"training_step": step},
            )  # fmt: skip
            plan = runner.plan
            mine = set(shard_keys(plan.keys(), rank, world))
            records = [record for record in runner.run() if record.key in mine]
            outcome = ("ok", records)
        except Exception as error:
            outcome = ("error", f"rank {rank}: {type(error).__name__}: {error}")
        gathered = _gather(outcome, world)
        failures = [detail for kind, detail in gathered if kind == "error"]
        if failures:
            raise RuntimeError(f"RolloutEvaluation at step {step} failed: {failures[0]}")
        assert plan is not None
        merged = _in_plan_order(plan, [record for _, part in gathered for record in part])
        metrics = rollout_metrics(plan, merged)
        self.history[step] = metrics
        self.last_records, self.last_plan = merged, plan
        if rank == 0 and self.wandb:
            try:
                self._log_media(trainer, plan, merged, out, step)
            except Exception as error:  # rank 0 alone: raising would leave the others waiting
                warnings.warn(
                    f"RolloutEvaluation: W&B media of step {step} not logged ({error})",
                    stacklevel=2,
                )
        return metrics

    def _callbacks(self) -> list:
        callbacks: list = []
        if self.progress:
            callbacks.append(ProgressBar(desc="rollouts"))
        if self.videos_per_task:
            callbacks.append(VideoRecorder(self.video_camera, self.videos_per_task))
        return callbacks

    def _log_media(
        self,
        trainer: L.Trainer,
        plan: RunPlan,
        records: list[EpisodeRecord],
        out: Path,
        step: int,
    ) -> None:
        """The evaluator's W&B table, bar chart and videos, into the training run."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        import wandb

        from agnostos.evaluation.reporters import _episodes_table, _videos

        metrics = self.history[step]
        bars = [
            [task, metrics[f"{PREFIX}/{task}/success"]]
            for task in plan.tasks
            if not math.isnan(metrics[f"{PREFIX}/{task}/success"])
        ]
        payload: dict[str, Any] = {
            f"{PREFIX}/episodes_table": _episodes_table(wandb, records),
            f"{PREFIX}/per_task_bar": wandb.plot.bar(
                wandb.Table(columns=["task", "success"], data=bars), "task", "success",
                title=f"Success rate by task (%), step {step}",
            ),
        }  # fmt: skip
        payload.update(_videos(wandb, out / VIDEO_FOLDER, records))
        for logger in loggers:
            logger.log_metrics(payload, step=step)


def _clear(out: Path) -> None:
    """Remove an earlier evaluation's records, plan and videos from `out`."""
    for path in out.glob(RECORDS_GLOB):
        path.unlink(missing_ok=True)  # another node's rank may have removed it already
    (out / PLAN_NAME).unlink(missing_ok=True)
    shutil.rmtree(out / VIDEO_FOLDER, ignore_errors=True)


def _all_ranks_ok(trainer: L.Trainer, work: Any) -> None:
    """Run `work` here (None: nothing), then meet the other ranks: if it failed anywhere,
    every rank raises the first error, so no rank is left waiting for one that failed."""
    outcome = ("ok", None)
    if work is not None:
        try:
            work()
        except Exception as caught:
            outcome = ("error", f"rank {trainer.global_rank}: {type(caught).__name__}: {caught}")
    failures = [detail for kind, detail in _gather(outcome, trainer.world_size) if kind != "ok"]
    if failures:
        raise RuntimeError(f"RolloutEvaluation: {failures[0]}")


def _gather(outcome: tuple[str, Any], world: int) -> list[tuple[str, Any]]:
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [outcome]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, outcome)
    return gathered


def _in_plan_order(plan: RunPlan, records: list[EpisodeRecord]) -> list[EpisodeRecord]:
    """One record per key (a key recorded twice keeps its first), in the plan's order."""
    position = {key: index for index, key in enumerate(plan.keys())}
    unique: dict[Any, EpisodeRecord] = {}
    for record in records:
        unique.setdefault(record.key, record)
    return sorted(unique.values(), key=lambda record: position.get(record.key, len(position)))


def _has_policy(pl_module: L.LightningModule) -> bool:
    """Whether the module holds a `policy` (VLAModule builds it later, in configure_model)."""
    return hasattr(pl_module, "policy")


def rollout_agent(pl_module: L.LightningModule) -> Agent:
    """The module's `rollout_agent()`, or a VLA agent over its live `policy` (VLAModule).

    The VLA case lives here rather than in the training module, so training code never
    imports the evaluator (the packages depend one way: trainers -> evaluation).
    """
    hook = getattr(pl_module, "rollout_agent", None)
    if callable(hook):
        return hook()
    from agnostos.evaluation.agents.vla import VLAAgent
    from agnostos.models.vla import VLAPolicy

    if not isinstance(getattr(pl_module, "policy", None), VLAPolicy):
        raise TypeError(f"{type(pl_module).__name__}.policy is not a VLAPolicy")
    hparams = getattr(pl_module, "hparams", {})
    return VLAAgent.from_policy(
        pl_module.policy, step=pl_module.global_step,
        max_new_tokens=hparams.get("max_new_tokens"),
    )  # fmt: skip
