"""`agnostos eval`: run an agent on a suite of stored test episodes, and score runs.

    agnostos eval --config configs/eval/minibench_replay.yaml [--agent noop] [--out RUN]
    agnostos eval --config configs/eval/agnostos_unseen.yaml --agent MyAgent --shard 0/4
    agnostos eval scores RUN [RUN ...] [--compare published]

The config is the whole evaluation (jsonargparse): `suite` (`SuiteConfig`), `agent` (a
class path with `init_args`, or a short name: replay, noop, custom, xicm, vla), `runner`
(`RunnerConfig`), `report` (`ReportConfig`: progress bar, videos, W&B), `callbacks` (more
`EvalCallback`s by class path), `out`, `shard`, `overwrite`. Flags override it.

Bad settings stop with one line naming the key, exit 2, before any worker starts; failed
work (unreadable test data) exits 1.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agnostos.cli_types import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error_message

__all__ = ["ReportConfig", "build_parser", "resolve_shard", "run_eval"]


@dataclass(frozen=True)
class ReportConfig:
    """What watches the run, besides the records file.

    Args:
        progress: show a progress bar (episodes done of total, success so far, ETA).
        videos_per_task: rollout videos (front camera) of this many episodes per task.
        video_camera: the camera the videos show.
        wandb: log an eval run to Weights & Biases.
        wandb_mode: offline (default: `wandb sync` later), online or disabled.
        wandb_project: the W&B project.
        wandb_group: the W&B group (default: the output folder's name).
    """

    progress: bool = True
    videos_per_task: int = 1
    video_camera: str = "front"
    wandb: bool = True
    wandb_mode: str = "offline"
    wandb_project: str = "agnostos-eval"
    wandb_group: str | None = None


def resolve_shard(text: str | None) -> tuple[int, int]:
    """`--shard i/n`, else torch.distributed's RANK/WORLD_SIZE (torchrun), else SLURM's
    SLURM_PROCID/SLURM_NTASKS (srun), else (0, 1)."""
    if text:
        index, sep, count = text.partition("/")
        if not sep or not index.isdigit() or not count.isdigit():
            raise ValueError(f"shard: expected i/n (e.g. 0/4), got {text!r}")
        shard = (int(index), int(count))
    elif "WORLD_SIZE" in os.environ:
        shard = (int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]))
    elif "SLURM_NTASKS" in os.environ:
        shard = (int(os.environ.get("SLURM_PROCID", "0")), int(os.environ["SLURM_NTASKS"]))
    else:
        shard = (0, 1)
    if shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard: {shard[0]}/{shard[1]} is out of range")
    return shard


def build_parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from agnostos.evaluation.agents import Agent
    from agnostos.evaluation.callbacks import EvalCallback
    from agnostos.evaluation.runner import RunnerConfig
    from agnostos.evaluation.suites import SuiteConfig

    parser = ArgumentParser(
        prog="agnostos eval",
        description="Evaluate an agent on a suite of stored test episodes (see "
        "docs/evaluation.md). `agnostos eval scores RUN` prints a run's AGNOSTOS table.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="evaluation YAML")
    parser.add_class_arguments(SuiteConfig, "suite", help="the suite of test episodes")
    parser.add_subclass_arguments(
        Agent,
        "agent",
        required=True,
        help="the agent: replay, noop, custom, xicm, vla or a class path",
    )
    parser.add_class_arguments(RunnerConfig, "runner", help="worker processes and limits")
    parser.add_class_arguments(ReportConfig, "report", help="progress, videos and W&B")
    parser.add_argument(
        "--callbacks", type=list[EvalCallback] | None, default=None,
        help="more evaluation callbacks (class paths with init_args)",
    )  # fmt: skip
    parser.add_argument("--out", type=str, default="runs/eval", help="the run folder")
    parser.add_argument(
        "--shard", type=str | None, default=None,
        help="i/n: run every n-th episode from the i-th (default: torchrun/SLURM ranks)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", type=bool, default=False,
        help="discard a run folder made under other settings instead of refusing it",
    )  # fmt: skip
    return parser


def _expand_agent_names(argv: list[str]) -> list[str]:
    """`--agent replay` -> the class path (short names for the shipped agents)."""
    from agnostos.evaluation.agents import AGENTS

    out = list(argv)
    for index, item in enumerate(out):
        value = None
        if item == "--agent" and index + 1 < len(out):
            value, target = out[index + 1], index + 1
        elif item.startswith("--agent="):
            value, target = item.split("=", 1)[1], index
        if value in AGENTS:
            path = f"{AGENTS[value].__module__}.{AGENTS[value].__name__}"
            out[target] = path if target != index else f"--agent={path}"
    return out


def _callbacks(report: ReportConfig, extra: list | None) -> list:
    from agnostos.evaluation.reporters import ProgressBar, VideoRecorder, WandbReporter

    callbacks: list = [ProgressBar(enabled=report.progress)]
    if report.videos_per_task:
        callbacks.append(VideoRecorder(report.video_camera, report.videos_per_task))
    if report.wandb:
        callbacks.append(
            WandbReporter(
                project=report.wandb_project, group=report.wandb_group, mode=report.wandb_mode
            )
        )
    return [*callbacks, *(extra or [])]


def run_eval(argv: list[str]) -> int:
    """`agnostos eval ...`; returns the exit status."""
    if argv and argv[0] == "scores":
        from agnostos.evaluation.scores_cli import run_scores

        return run_scores(argv[1:])
    from jsonargparse import ArgumentError

    from agnostos.evaluation.runner import RunConfigError, Runner
    from agnostos.evaluation.suites import SuiteError

    parser = build_parser()
    try:
        config = parser.parse_args(_expand_agent_names(argv))
        built = parser.instantiate(config)
        shard = resolve_shard(built.shard)
        suite = built.suite
        suite.check_backend()
        runner = Runner(
            suite, built.agent, built.out, built.runner, _callbacks(built.report, built.callbacks),
            shard=shard, overwrite=built.overwrite,
        )  # fmt: skip
    except SystemExit as stop:  # --help, --print_config
        return stop.code if isinstance(stop.code, int) else EXIT_OK
    except (ArgumentError, SuiteError, RunConfigError, ValueError, TypeError) as error:
        print(f"agnostos eval: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        generated = suite.prepare_test_data(workers=built.runner.workers, progress=False)
        if generated:
            print(f"generated {len(generated)} stored test episodes in {suite.test_data}")
        records = runner.run()
    except (SuiteError, RunConfigError) as error:
        print(f"agnostos eval: error: {error_message(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as error:
        print(f"agnostos eval: error: {error_message(error)}", file=sys.stderr)
        return EXIT_FAILED
    _print_summary(runner, records, Path(built.out))
    return EXIT_OK


def _one_line(error: BaseException) -> str:
    """One line from jsonargparse's multi-line messages: the key, and the reason that says
    most (a class path that does not import says why; otherwise the first reason)."""
    lines = [line.strip() for line in error_message(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Does not validate against any of the Union subtypes"):
        # a constructor refused its arguments: its own message is the first listed error
        errors = [line[2:] for line in lines if line.startswith("- ") and "NoneType" not in line]
        return errors[0] if errors else lines[0]
    match = re.match(r'Parser key "([^"]+)":', lines[0])
    if not match:
        return lines[0]
    reasons = [line.lstrip("- ").strip() for line in lines[1:]]
    for index, reason in enumerate(reasons):
        if reason.startswith("Problem with given class_path") and index + 1 < len(reasons):
            path = reason.split("'")[1] if "'" in reason else ""
            return f"{match[1]}: cannot load {path!r} ({reasons[index + 1]})"
    return f"{match[1]}: {reasons[0]}" if reasons else lines[0]


def _print_summary(runner: Any, records: list, out: Path) -> None:
    from agnostos.evaluation.scores import format_table, score_records

    print(format_table(score_records(runner.plan, records)))
    print(f"records: {out}")
