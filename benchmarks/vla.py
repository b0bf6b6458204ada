"""VLA fine-tuning on minibench: training throughput from shards, and does it learn?

    python benchmarks/vla.py throughput --shards DIR [--steps 60] [--backbone tiny]
    python benchmarks/vla.py learn --shards DIR --minutes 10 [--episodes 10]

`throughput`: LoRA training steps of `configs/vla/tiny.yaml`'s settings on the shards
(batch 8, front + wrist at 64 px, object text on), timed after a warm-up; reports samples/s
and the time per step spent waiting for data against computing.

`learn`: trains for at most `--minutes` (the issue's budget: 10 minutes on 2 CPU cores),
exports, and evaluates the export with the rollout evaluator on `--episodes` stored test
episodes of every minibench seen task (in-distribution; target >= 50% on reach_target) and
unseen task. Without `--shards`, `--demos` seen-task demos per task are generated first.

Writes JSON (`--json`) with the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_facts

# Spawned evaluator workers re-import this file: heavy imports stay inside the functions.


def make_shards(root: Path, demos: int) -> Path:
    """Seen-task demos at 64 px, converted to shards (skipped when already there)."""
    from agnostos.envs.minibench.generate import generate
    from agnostos.shards.convert import ConvertOptions, convert
    from agnostos.tasks import MINIBENCH

    shards = root / "shards"
    if not (shards / "manifest.json").is_file():
        generate(MINIBENCH.seen, demos, root / "demos", image_size=64, workers=2, progress=False)
        convert(root / "demos", shards, ConvertOptions(), show_progress=False)
    return shards


def modules(args: argparse.Namespace, shards: Path, root: Path, learning_rate: float):
    from agnostos.datamodules.keyframes import KeyframeDataModule
    from agnostos.trainers.vla import VLAModule

    data = KeyframeDataModule(
        shards=str(shards), cameras=["front", "wrist"], object_text=True,
        object_text_cameras=["front", "wrist", "overhead"], image_size=64,
        batch_size=args.batch_size, num_workers=1, seed=0,
    )  # fmt: skip
    model = VLAModule(
        backbone=args.backbone, image_size=64, learning_rate=learning_rate, warmup_steps=10,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha,
    )  # fmt: skip
    return data, model


def throughput(args: argparse.Namespace) -> dict:
    import lightning as L

    class StepTimes(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.end = time.perf_counter()

    root = Path(args.work)
    data, model = modules(args, Path(args.shards), root, args.learning_rate)
    times = StepTimes()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=args.warmup + args.steps, logger=False,
        precision=args.precision,
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(root / "run"), callbacks=[times],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    ended = time.perf_counter()
    timed = [*times.starts[args.warmup :], times.end]
    seconds = timed[-1] - timed[0]
    steps = len(timed) - 1
    return {
        "mode": "throughput", "backbone": args.backbone, "batch_size": args.batch_size,
        "steps_timed": steps, "seconds": round(seconds, 2),
        "steps_per_s": round(steps / seconds, 2),
        "samples_per_s": round(steps * args.batch_size / seconds, 1),
        "wall_s_incl_setup": round(ended - started, 1),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }  # fmt: skip


def evaluate(export: Path, split: str, episodes: int, root: Path) -> dict:
    from agnostos.evaluation.agents.vla import VLAAgent
    from agnostos.evaluation.runner import Runner, RunnerConfig
    from agnostos.evaluation.scores import score_records
    from agnostos.evaluation.suites import SuiteConfig
    from agnostos.shards.episode import CAMERAS

    suite = SuiteConfig(
        benchmark="minibench", split=split, episodes=episodes, max_steps=10,
        cameras=list(CAMERAS), image_size=64, test_data=str(root / f"test-{split}"),
    )  # fmt: skip
    suite.prepare_test_data(workers=2, progress=False)
    runner = Runner(suite, VLAAgent(export=str(export)), root / f"eval-{split}",
                    RunnerConfig(workers=2), overwrite=True)  # fmt: skip
    records = runner.run()
    table = score_records(runner.plan, records)
    return {
        "tasks": {score.task: score.mean for score in table.tasks},
        "all": table.overall.mean,
        "errors": len(table.errors),
    }


def learn(args: argparse.Namespace) -> dict:
    import lightning as L

    from agnostos.trainers.vla_export import VLAExport, latest_export

    root = Path(args.work)
    shards = Path(args.shards) if args.shards else make_shards(root, args.demos)
    data, model = modules(args, shards, root, args.learning_rate)
    export = VLAExport(dirpath=str(root / "export"))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=-1, max_time={"minutes": args.minutes}, logger=False,
        precision=args.precision,
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(root / "run"), callbacks=[export],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    trained = time.perf_counter() - started
    folder = latest_export(root / "export")
    assert folder is not None
    return {
        "mode": "learn", "backbone": args.backbone, "minutes": args.minutes,
        "settings": {"lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
                     "learning_rate": args.learning_rate, "precision": args.precision,
                     "batch_size": args.batch_size},
        "steps": trainer.global_step, "train_seconds": round(trained, 1),
        "seen": evaluate(folder, "seen", args.episodes, root),
        "unseen": evaluate(folder, "unseen", args.unseen_episodes, root),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("throughput", "learn"))
    parser.add_argument("--shards", default=None, help="seen-task shards (default: generate)")
    parser.add_argument("--demos", type=int, default=30, help="demos per seen task to generate")
    parser.add_argument("--backbone", default="tiny", help="tiny, tiny-smolvlm or a model dir")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    parser.add_argument("--steps", type=int, default=60, help="timed steps (throughput)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget (learn)")
    parser.add_argument("--episodes", type=int, default=10, help="test episodes per seen task")
    parser.add_argument("--unseen-episodes", type=int, default=5, help="per unseen task")
    parser.add_argument("--work", default=None, help="working folder (default: a temp dir)")
    parser.add_argument("--json", default="/tmp/vla_benchmark.json")
    args = parser.parse_args(argv)
    args.work = args.work or tempfile.mkdtemp(prefix="agnostos-vla-bench-")
    if args.mode == "throughput" and args.shards is None:
        args.shards = str(make_shards(Path(args.work), args.demos))
    result = throughput(args) if args.mode == "throughput" else learn(args)
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps({"machine": machine_facts(), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
