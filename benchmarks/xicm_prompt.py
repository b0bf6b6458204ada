"""One X-ICM query's retrieval + demo text + prompt: from the precomputed bank, against
X-ICM's way of rebuilding the K demos from the raw episode files at every query.

X-ICM re-reads every retrieved demo at every query: about seven loads of its
`low_dim_obs.pkl` (once per camera for the point clouds, for the mask names, for the
keyframes), the frame-0 depth and mask PNGs of five cameras, the keyframes, then the text.
Here "X-ICM's way" does that work once per demo through the project's readers
(`read_episode` with one pickle load, then `episode_demo_text`), so it understates X-ICM's
cost; the bank's way is the agent's: rank, look up the stored demo text, join the prompt.

    python benchmarks/xicm_prompt.py [--per-task 4] [--top-k 18]

Builds a bank of minibench seen-task demos (tiny dynamics model) in a temporary folder,
prints a table and writes JSON. Target (issue 13): >= 100x faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_facts


def build(root: Path, per_task: int) -> Path:
    """Seen-task demos -> shards -> a bank with demo text (features from a tiny model)."""
    from agnostos.cli import main
    from agnostos.envs.minibench.generate import generate
    from agnostos.models.tiny import build_tiny_base
    from agnostos.shards.convert import convert
    from agnostos.tasks import MINIBENCH

    generate(MINIBENCH.seen, per_task, root / "demos", image_size=128, workers=2, progress=False)
    convert(root / "demos", root / "shards", show_progress=False)
    base = build_tiny_base(root / "sd")
    status = main([
        "bank", "build", "--shards", str(root / "shards"), "--model", str(base),
        "--out", str(root / "bank"), "--steps", "2", "--resolution", "32", "--suite",
        "minibench", "--demo-text", "required", "--no-progress",
    ])  # fmt: skip
    if status:
        raise SystemExit(f"bank build failed ({status})")
    return root / "bank"


def timed(call, repeats: int) -> float:
    """Mean seconds per call over `repeats` calls (after one warm-up call)."""
    call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-task", type=int, default=4, help="demos per seen task")
    parser.add_argument("--top-k", type=int, default=18)
    parser.add_argument("--json", default="/tmp/xicm_prompt_benchmark.json")
    args = parser.parse_args(argv)
    import numpy as np

    from agnostos.evaluation.agents.xicm import build_user_prompt
    from agnostos.evaluation.bank import DemoBank
    from agnostos.evaluation.rankers import RankingQuery, make_ranker
    from agnostos.observation_text import episode_demo_text
    from agnostos.shards.folders import read_episode
    from agnostos.tasks import MINIBENCH_OBJECT_NAMES

    with tempfile.TemporaryDirectory(prefix="agnostos-xicm-prompt-") as scratch:
        root = Path(scratch)
        bank = DemoBank.load(build(root, args.per_task))
        ranking_bank = bank.to_ranking_bank()
        ranker = make_ranker("lang_vis_out")
        texts = {record.id: record.demo_text for record in bank.records}
        rng = np.random.default_rng(0)
        query = RankingQuery(
            output_latent=rng.standard_normal(ranking_bank.output_latents.shape[1]),
            prompt_bos=ranking_bank.prompt_bos[0],
        )
        query_text = bank.records[0].demo_text.observation
        k = min(args.top_k, len(bank))

        def from_bank() -> str:
            ranking = ranker.rank(ranking_bank, query, k)
            return build_user_prompt([texts[demo_id] for demo_id in ranking.ids], query_text)

        def xicm_way() -> str:
            ranking = ranker.rank(ranking_bank, query, k)
            demos = []
            for demo_id in ranking.ids:
                record = bank.record(demo_id)
                episode = read_episode(root / "demos" / record.source, check_frames=False)
                demos.append(
                    episode_demo_text(episode, object_names=MINIBENCH_OBJECT_NAMES[record.task])
                )
            return build_user_prompt(demos, query_text)

        if from_bank() != xicm_way():
            raise SystemExit("the two ways built different prompts")
        bank_seconds = timed(from_bank, 200)
        xicm_seconds = timed(xicm_way, 3)
    rows = [
        {"method": "X-ICM's way (rebuild K demos from the episode files)",
         "ms_per_query": round(xicm_seconds * 1000, 2)},
        {"method": "precomputed bank (rank + stored demo text + prompt)",
         "ms_per_query": round(bank_seconds * 1000, 3),
         "speedup": round(xicm_seconds / bank_seconds, 1)},
    ]  # fmt: skip
    print(f"bank of {len(bank)} demos, K = {k}")
    for row in rows:
        extra = f"  {row['speedup']}x" if "speedup" in row else ""
        print(f"{row['method']:<56} {row['ms_per_query']:>10} ms{extra}")
    payload = {"machine": machine_facts(), "bank": len(bank), "top_k": k, "rows": rows}
    Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
