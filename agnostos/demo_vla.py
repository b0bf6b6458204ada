"""The demo's VLA stage: LoRA fine-tuning of the tiny VLA, evaluated during and after training.

`agnostos fit` with `configs/vla/tiny.yaml` on the demo's seen-task shards (the same shards
the dynamics model trained on): the tiny random Qwen2.5-VL-shaped backbone sees the front
and wrist images, the instruction, the gripper pose and X-ICM's object text, and answers
X-ICM's 7 integers of the next keyframe. A `RolloutEvaluation` callback runs the evaluator
on a seen task at every validation, so `eval/success` lands in the training run. The
exported adapter is then evaluated on the unseen tasks' stored test episodes, the same ones
X-ICM is evaluated on, and the summary puts both in one table.

The tiny backbone is random and sized for a 2-core CPU: the demo shows the job running end
to end (training, rollouts during training, export, evaluation), not a model that solves
the tasks; docs/benchmarks.md records what longer training reaches.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agnostos.resources import packaged_config

__all__ = ["ROLLOUT_TASK", "VLA_CONFIG", "evaluate_vla", "train_vla"]

VLA_CONFIG = packaged_config("vla/tiny.yaml")
ROLLOUT_TASK = "reach_target"  # the seen task rolled out during training (when trained on)


def _log(message: str) -> None:
    print(f"[agnostos demo] {message}", flush=True)


def _overrides(config: Any, root: Path) -> dict[str, Any]:
    """The settings the demo changes in configs/vla/tiny.yaml (written as a second config,
    so the callback list needs no command-line JSON)."""
    validations = max(1, config.vla_steps // 2)  # rollouts halfway and at the end
    seen = tuple(config.seen_tasks or ())
    task = ROLLOUT_TASK if not seen or ROLLOUT_TASK in seen else seen[0]
    return {
        "trainer": {
            "max_steps": config.vla_steps,
            "default_root_dir": str(root / "vla"),
            "enable_progress_bar": bool(config.progress),
            "callbacks": [
                {
                    "class_path": "agnostos.evaluation.training_eval.RolloutEvaluation",
                    "init_args": {
                        "suite": "minibench_seen", "tasks": [task],
                        "episodes": config.vla_rollout_episodes,
                        "max_steps": config.eval_max_steps, "seeds": [config.seed],
                        "image_size": config.image_size,
                        "test_data": str(root / "test-seen"),
                        "workers": 1, "videos_per_task": 1, "wandb": bool(config.wandb),
                    },
                }
            ],
        },
        "model": {"seed": config.seed, "learning_rate": config.vla_learning_rate},
        # an epoch per rollout: validation at epoch ends is where a resume is exact
        "data": {"batch_size": config.vla_batch_size, "seed": config.seed,
                 "epoch_samples": validations * config.vla_batch_size},
        "seed_everything": config.seed,
    }  # fmt: skip


def train_vla(config: Any, root: Path, seen_shards: Path) -> dict[str, Any]:
    """Stage vla_train: LoRA fine-tuning with rollouts during training; resumes a killed
    run from its last.ckpt (the stage runner discards the folder when settings change)."""
    import yaml

    from agnostos.trainers.cli import run_fit
    from agnostos.trainers.vla_export import latest_export

    run = root / "vla"
    run.mkdir(parents=True, exist_ok=True)
    overrides = run / "demo-overrides.yaml"
    overrides.write_text(yaml.safe_dump(_overrides(config, root), sort_keys=False))
    argv = ["fit", "--config", str(VLA_CONFIG), "--config", str(overrides),
            "--data.shards", str(seen_shards)]  # fmt: skip
    if not config.wandb:
        argv += ["--trainer.logger", "false"]
    last = sorted((run / "checkpoints").glob("last.ckpt"))
    if last:
        argv += ["--ckpt_path", str(last[-1])]
    _log(f"fine-tuning the tiny VLA: agnostos {' '.join(argv)}")
    status = run_fit(argv)
    if status != 0:
        raise RuntimeError(f"agnostos fit (VLA) exited with status {status}")
    export = latest_export(run / "export")
    if export is None:
        raise RuntimeError(f"{run / 'export'}: VLA training finished without an export")
    return {"export": str(export), "steps": int(export.name.split("-")[-1]),
            "rollout_task": _overrides(config, root)["trainer"]["callbacks"][0]["init_args"]
            ["tasks"][0], "rollouts": _rollout_scores(run / "rollouts")}  # fmt: skip


def _rollout_scores(folder: Path) -> dict[str, float | None]:
    """Seen-task success of each rollout during training, by step (from their records)."""
    from agnostos.evaluation.records import RunPlan, read_records
    from agnostos.evaluation.scores import score_records

    scores: dict[str, float | None] = {}
    for step_dir in sorted(folder.glob("step-*"), key=lambda path: int(path.name[5:])):
        records = read_records(step_dir)
        if records:
            scores[step_dir.name] = score_records(RunPlan.load(step_dir), records).overall.mean
    return scores


def evaluate_vla(config: Any, root: Path, trained: Mapping[str, Any]) -> dict[str, Any]:
    """Stage vla_eval: the exported VLA on the unseen tasks' stored test episodes."""
    from agnostos.demo_eval import run_summary
    from agnostos.evaluation.agents.vla import VLAAgent
    from agnostos.evaluation.reporters import ProgressBar, VideoRecorder, WandbReporter
    from agnostos.evaluation.runner import Runner, RunnerConfig
    from agnostos.evaluation.scores import score_records
    from agnostos.evaluation.suites import SuiteConfig
    from agnostos.shards.episode import CAMERAS

    suite = SuiteConfig(
        benchmark="minibench", split="unseen", tasks=list(config.unseen_tasks or []) or None,
        episodes=config.eval_episodes, max_steps=config.eval_max_steps, seeds=[config.seed],
        image_size=config.image_size, cameras=list(CAMERAS), test_data=str(root / "test"),
        test_seed=1,
    )  # fmt: skip
    suite.prepare_test_data(workers=config.workers, progress=False)
    agent = VLAAgent(export=trained["export"])
    out = root / "eval" / "vla"
    callbacks: list = [ProgressBar(enabled=config.progress), VideoRecorder("front", 1)]
    if config.wandb:
        callbacks.append(WandbReporter(project="agnostos-demo", group="demo-eval"))
    runner = Runner(suite, agent, out, RunnerConfig(workers=config.eval_workers), callbacks)
    records = runner.run()
    summary = run_summary(out, score_records(runner.plan, records), records)
    summary["model_calls"] = sum(int(r.agent_stats.get("model_calls", 0)) for r in records)
    summary["parse_failures"] = sum(int(r.agent_stats.get("parse_failures", 0)) for r in records)
    return {"run": summary, "steps": trained["steps"], "export": trained["export"]}


def format_vla_row(result: Mapping[str, Any]) -> str:
    """The VLA's row in the demo's evaluation table (same columns as X-ICM's rows)."""
    from agnostos.demo_eval import _percent

    run = result["run"]
    cells = [_percent(run[name]) for name in ("level1", "level2", "all")]
    name = f"VLA {result['steps']} st"
    return (f"  {name:<14} {cells[0]:>9} {cells[1]:>9} {cells[2]:>9} {run['model_calls']:>10} "
            f"{run['parse_failures']:>10} {run['errors']:>7}")  # fmt: skip
