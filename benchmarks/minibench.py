"""minibench speed: scripted demo generation and environment step latency.

Why: minibench is the embedded default every other part trains and evaluates on, so demo
generation must be fast enough that "generate, convert, train" fits in minutes on a CPU.
Target: at least 10 episodes per minute per core at 128x128 with five cameras and rgb,
depth and mask (what `agnostos sim generate` writes).

Measured in one run:
1. generation: `generate()` over every task (seen and unseen), --episodes per task, with one
   worker process, into a fresh folder; episodes/min = episodes / wall minutes (one core);
   a breakdown comes from a second, profiled-free pass over the same jobs that times
   physics+IK, rendering and PNG/pickle writing separately;
2. step latency: an agent-style loop (reset, then each scripted action through `step()`,
   rendering the five cameras only for the returned observation), per step.

    python benchmarks/minibench.py [--episodes 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mujoco
import numpy as np
from machine import machine_facts

from agnostos.envs.minibench.env import MiniBenchEnv
from agnostos.envs.minibench.generate import generate, record_demo, write_demo
from agnostos.envs.minibench.tasks import TASKS
from agnostos.shards.episode import CAMERAS


def generation(episodes: int, workdir: Path) -> dict:
    started = time.perf_counter()
    summary = generate(sorted(TASKS), episodes, workdir / "generated", progress=False)
    seconds = time.perf_counter() - started
    written = sum(record.written for record in summary.values())
    frames = sum(record.frames for record in summary.values())
    retries = sum(record.failed_attempts for record in summary.values())
    return {
        "episodes": written,
        "frames": frames,
        "retried_attempts": retries,
        "seconds": round(seconds, 2),
        "episodes_per_minute_per_core": round(written / seconds * 60, 1),
        "frames_per_second": round(frames / seconds, 1),
    }


def breakdown(episodes: int, workdir: Path) -> dict:
    """Where generation time goes: physics+IK only, then with rendering, then writing."""
    physics, rendering = MiniBenchEnv(render=False), MiniBenchEnv()
    times = {"physics_and_ik": 0.0, "physics_ik_and_render": 0.0, "png_and_pickle_write": 0.0}
    count = 0
    for task in sorted(TASKS):
        for episode in range(episodes):
            variation = episode % TASKS[task].variations
            start = time.perf_counter()
            record_demo(physics, task, variation, episode, 0, 0)
            times["physics_and_ik"] += time.perf_counter() - start
            start = time.perf_counter()
            demo = record_demo(rendering, task, variation, episode, 0, 0)
            times["physics_ik_and_render"] += time.perf_counter() - start
            start = time.perf_counter()
            write_demo(workdir / f"breakdown_{task}_{episode}", demo, CAMERAS)
            times["png_and_pickle_write"] += time.perf_counter() - start
            count += 1
    physics.close()
    rendering.close()
    return {name: round(value / count, 3) for name, value in times.items()} | {
        "episodes": count,
        "unit": "seconds per episode",
    }


def step_latency(episodes: int) -> dict:
    env = MiniBenchEnv()
    latencies, resets = [], []
    for task in sorted(TASKS):
        for episode in range(episodes):
            start = time.perf_counter()
            env.reset(task, episode % TASKS[task].variations, 100 + episode)
            resets.append(time.perf_counter() - start)
            for action in env.scripted_actions():
                start = time.perf_counter()
                result = env.step(action)
                latencies.append(time.perf_counter() - start)
                if result.terminal:
                    break
    env.close()
    return {
        "steps": len(latencies),
        "step_ms_median": round(1000 * statistics.median(latencies), 1),
        "step_ms_p90": round(1000 * float(np.quantile(latencies, 0.9)), 1),
        "reset_ms_median": round(1000 * statistics.median(resets), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=2, help="episodes per task")
    parser.add_argument("--json", type=Path, default=Path("/tmp/minibench_benchmark.json"))
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="minibench-bench-"))
    try:
        results = {
            "machine": machine_facts(
                mujoco=mujoco.__version__, mujoco_gl=os.environ.get("MUJOCO_GL", "")
            ),
            "generation": generation(args.episodes, workdir),
            "breakdown": breakdown(1, workdir),
            "step_latency": step_latency(1),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=2))
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
