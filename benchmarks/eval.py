"""Episodes per hour on minibench: X-ICM's way against the runner.

X-ICM's way is one process that resets an environment, asks the agent for one action per
step and executes it, episode after episode. The runner runs `--workers` environment
processes and asks the agent once for every environment waiting on it. Two agents:

- `replay` (each stored episode's keyframes): its calls cost nothing, so this measures
  the simulator and the runner's overhead;
- `latency`: replay behind a fixed cost per call whatever its batch size (`--latency`
  seconds), the stand-in for a GPU-served LLM or VLA, whose batched call costs about as
  much as a single one.

    python benchmarks/eval.py --episodes 4 --workers 2 --latency-workers 8

Prints a table and writes JSON (`--json`). Targets (issue 12): >= 1.7x with 2 workers on
2 cores for replay; >= 4x with 8 environments for the latency-bound agent.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_facts

# Spawned environment workers re-import this file: what it imports at the top, every
# worker imports too, so the evaluator's own modules (torch among their imports) are
# imported where they are used, as in the `agnostos` command.


def latency_replay(seconds: float):
    """Replay whose every `act` call costs `seconds`, however many environments it serves."""
    from agnostos.evaluation.agents import ReplayAgent

    class LatencyReplay(ReplayAgent):
        name = "latency_replay"

        def act(self, batch):
            time.sleep(seconds)
            return super().act(batch)

    return LatencyReplay()


def replay():
    from agnostos.evaluation.agents import ReplayAgent

    return ReplayAgent()


def sequential(suite, agent) -> tuple[int, int]:
    """X-ICM's loop: one environment, one agent call per step. Returns (episodes, successes)."""
    from agnostos.envs.minibench.env import MiniBenchEnv
    from agnostos.evaluation.suites import episode_folder
    from agnostos.seeding import derive_seed, seed_all
    from agnostos.shards.folders import read_episode

    env = MiniBenchEnv(image_size=suite.image_size, cameras=tuple(suite.cameras))
    levels = suite.task_levels()
    episodes = successes = 0
    for seed in suite.seeds:
        for task in levels:
            for number in suite.episode_numbers():
                key_seed = derive_seed(task, number, seed)
                seed_all(key_seed)
                stored = read_episode(
                    episode_folder(suite.test_data, task, number), cameras=(), check_frames=False
                )
                observation = env.reset_to_episode(stored)
                agent.reset(0, _context(task, number, seed, levels[task], stored, key_seed))
                for _ in range(suite.max_steps):
                    result = env.step(agent.act([(0, observation)])[0])
                    observation = result.observation
                    if result.success or result.terminal:
                        break
                episodes += 1
                successes += bool(result.success)
    env.close()
    return episodes, successes


def _context(task, number, seed, level, stored, key_seed):
    from agnostos.evaluation.agents import EpisodeContext
    from agnostos.evaluation.records import EpisodeKey

    return EpisodeContext(
        key=EpisodeKey(task, number, seed), task=task, level=level,
        variation=stored.variation, instruction=stored.instruction, seed=key_seed,
        stored=stored,
    )  # fmt: skip


def measure(label: str, run) -> dict:
    started = time.perf_counter()
    episodes, successes = run()
    seconds = time.perf_counter() - started
    return {
        "method": label,
        "episodes": episodes,
        "successes": successes,
        "seconds": round(seconds, 2),
        "episodes_per_hour": round(episodes / seconds * 3600, 1),
    }


def runner(suite, agent, workers: int, batch_wait: float) -> tuple[int, int]:
    from agnostos.evaluation.runner import Runner, RunnerConfig

    config = RunnerConfig(workers=workers, batch_wait=batch_wait)
    with tempfile.TemporaryDirectory() as out:
        records = Runner(suite, agent, out, config).run()
    return len(records), sum(record.success for record in records)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=4, help="stored episodes per task")
    parser.add_argument("--workers", type=int, default=2, help="runner workers for replay")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per agent call")
    parser.add_argument("--latency-workers", type=int, default=8, help="environments")
    parser.add_argument("--batch-wait", type=float, default=1.0,
                        help="runner.batch_wait for both agents")  # fmt: skip
    parser.add_argument("--test-data", default=None, help="stored test episodes (default: tmp)")
    parser.add_argument("--json", default="/tmp/eval_benchmark.json")
    args = parser.parse_args(argv)
    from agnostos.evaluation.suites import SuiteConfig

    test_data = args.test_data or tempfile.mkdtemp(prefix="agnostos-eval-bench-")
    suite = SuiteConfig(
        benchmark="minibench", episodes=args.episodes, cameras=["front", "wrist"],
        test_data=test_data,
    )  # fmt: skip
    suite.prepare_test_data(workers=2, progress=False)
    rows = [
        measure("replay, X-ICM's way (1 process)", lambda: sequential(suite, replay())),
        measure(f"replay, runner ({args.workers} workers)",
                lambda: runner(suite, replay(), args.workers, args.batch_wait)),
        measure(f"latency {args.latency:g} s/call, X-ICM's way",
                lambda: sequential(suite, latency_replay(args.latency))),
        measure(f"latency {args.latency:g} s/call, runner ({args.latency_workers} envs)",
                lambda: runner(suite, latency_replay(args.latency), args.latency_workers,
                               args.batch_wait)),
    ]  # fmt: skip
    rows[1]["speedup"] = round(rows[1]["episodes_per_hour"] / rows[0]["episodes_per_hour"], 2)
    rows[3]["speedup"] = round(rows[3]["episodes_per_hour"] / rows[2]["episodes_per_hour"], 2)
    print(f"{'method':<44} {'episodes':>8} {'success':>7} {'seconds':>8} {'ep/h':>8} {'x':>5}")
    for row in rows:
        speedup = row.get("speedup", "")
        print(f"{row['method']:<44} {row['episodes']:>8} {row['successes']:>7} "
              f"{row['seconds']:>8} {row['episodes_per_hour']:>8} {speedup:>5}")  # fmt: skip
    Path(args.json).write_text(json.dumps({"machine": machine_facts(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
