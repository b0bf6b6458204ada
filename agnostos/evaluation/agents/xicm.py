"""The X-ICM agent: cross-task in-context manipulation, as published, through the evaluator.

At every query (an environment whose action queue is empty) the agent

1. writes the live observation as X-ICM's object-centric text (`observation_text`, the
   same code that wrote the bank's demo text);
2. runs the current front image and instruction through the dynamics diffusion model,
   batched over the waiting environments, each query with its own seed derived from
   (task, episode, seed, query number), so its features never depend on what ran before
   (X-ICM's single generator, seeded once at import, makes them depend on run order);
3. ranks the bank with the configured ranker (`lang_vis_out`, K = 18, by default);
4. builds X-ICM's prompt: its system prompt verbatim, then one user line of the K demos
   (most similar first, each followed by `", "`) and the query observation, then `>`;
5. asks the LLM (one batched call for all waiting environments, a seed per request);
6. reads the reply as X-ICM does (`xicm_reply.py`; `parsing: strict` re-asks once with the
   problem stated) and queues up to 26 keyframe actions, decoded with X-ICM's codec and
   `ignore_collisions = 1`.

The runner never asks for an action on a terminal observation, so the extra query X-ICM
makes at the end of every episode does not happen here. Per episode the record gets the
LLM calls, prompt and reply tokens, each call's parse status, fallbacks, re-asks and the
retrieved demo ids; every prompt and reply goes to `llm_calls.jsonl` next to the records.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agnostos.envs.protocol import Observation
from agnostos.evaluation.agents.base import EpisodeContext, QueuedAgent
from agnostos.evaluation.agents.xicm_reply import (
    HOME_CODE,
    PARSING_MODES,
    ParsedReply,
    parse_reply,
    reask_message,
)
from agnostos.seeding import derive_seed

__all__ = ["SYSTEM_PROMPT", "LLMConfig", "LLMRequestError", "XICMAgent", "build_user_prompt"]

# X-ICM's system prompt, verbatim (crosstask_icl_agent.py, CrossTaskICLAgent.__init__).
SYSTEM_PROMPT = (
    "You are a Franka Panda robot with a parallel gripper. We provide you with some demos "
    "from some seen tasks, in the format of [task_instruction, observation]>[ 7-dim "
    "action_1, 7-dim action_2, ..., 7-dim action_N ]. Then you will receive an unseen task "
    "instruction with a new observation, and you need to output a list of 7-dim actions that "
    "match the trends in the demos. Do not output anything else."
)


class LLMRequestError(RuntimeError):
    """The LLM could not answer one environment's query (e.g. the prompt is too long)."""


@dataclass(frozen=True)
class LLMConfig:
    """The LLM and how it is asked; the sampling defaults are X-ICM's.

    Args:
        backend: transformers (a local directory, a .gguf file, or `smollm2`), vllm or
            openai (any OpenAI-compatible server; give `options.base_url`).
        model: the model directory, GGUF file or served model name.
        decoding: free (X-ICM) or constrained (the reply is forced to be 1-26 valid actions).
        options: backend options (device, dtype, tensor_parallel_size, max_model_len,
            gpu_memory_utilization, base_url, timeout, max_retries, concurrency, ...).
    """

    backend: str = "transformers"
    model: str = "smollm2"
    decoding: str = "free"
    temperature: float = 0.1
    top_p: float = 0.001
    repetition_penalty: float = 1.05
    max_new_tokens: int = 256
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        from agnostos.models.llm import SamplingSettings, make_backend

        sampling = SamplingSettings(
            temperature=self.temperature, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
        )  # fmt: skip
        return make_backend(
            self.backend, model=self.model, sampling=sampling, decoding=self.decoding,
            **self.options,
        )  # fmt: skip


def build_user_prompt(demos: Sequence[Any], query: str) -> str:
    """X-ICM's user line: each demo's `observation>actions` and `", "`, then the query, `>`."""
    return "".join(f"{demo.text}, " for demo in demos) + f"{query}>"


def conversation(user: str, extra: Sequence[dict[str, str]] = ()) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}, *extra]


@dataclass
class _EpisodeStats:
    llm_calls: int = 0
    prompt_tokens: int = 0
    reply_tokens: int = 0
    parse_status: list[str] = field(default_factory=list)
    fallbacks: int = 0
    reasks: int = 0
    retrieved: list[list[str]] = field(default_factory=list)


@dataclass
class _Query:
    """One environment's query in flight through `plan`."""

    env_id: int
    context: EpisodeContext
    number: int
    seed: int
    observation_text: str
    user: str = ""
    retrieved: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()


class XICMAgent(QueuedAgent):
    """X-ICM over a demo bank, a dynamics model and an LLM (see the module docstring).

    Args:
        bank: the demo bank folder (`agnostos bank build` or `import-pkl`), with demo text.
        dynamics: the dynamics model export the bank was built with (not needed by the
            `random` ranker).
        dynamics_base: the Stable Diffusion base, when `dynamics` is a UNet checkpoint.
        llm: the LLM and its sampling settings.
        ranker: lang_vis_out (X-ICM), random or cosine.
        top_k: demos per prompt (X-ICM: 18).
        max_per_task: at most this many demos of one seen task (None: X-ICM's global top-K).
        parsing: parity (X-ICM's parser) or strict (range checks, one re-ask).
        cameras: cameras of the observation text (default: the bank's demo-text cameras).
        names: the benchmark (agnostos, minibench) whose object-name maps name the query's
            objects (default: the one the bank's demo text was written with).
        device, dtype: where the dynamics model runs.
        save_prompts: write every prompt and reply to llm_calls.jsonl in the run folder.
    """

    name = "xicm"

    def __init__(
        self,
        bank: str,
        dynamics: str | None = None,
        dynamics_base: str | None = None,
        llm: LLMConfig = LLMConfig(),
        ranker: str = "lang_vis_out",
        top_k: int = 18,
        max_per_task: int | None = None,
        parsing: str = "parity",
        cameras: list[str] | None = None,
        names: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        save_prompts: bool = True,
    ) -> None:
        super().__init__()
        from agnostos.evaluation.rankers import make_ranker

        if parsing not in PARSING_MODES:
            raise ValueError(f"parsing: {parsing!r} is not one of {', '.join(PARSING_MODES)}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        options = {} if max_per_task is None else {"max_per_task": max_per_task}
        self.ranker = make_ranker(ranker, **options)
        self.top_k, self.parsing, self.save_prompts = top_k, parsing, save_prompts
        self.llm_config = llm
        self._load_bank(bank, cameras, names)
        self._load_dynamics(dynamics, dynamics_base, device, dtype)
        self.llm = llm.build()
        self._stats: dict[int, _EpisodeStats] = {}
        self._queries: dict[int, int] = {}
        self._last_reply: dict[int, str] = {}  # for the strict re-ask's assistant turn
        self._log: Any = None

    # -- set-up --------------------------------------------------------------------------------

    def _load_bank(self, folder: str, cameras: list[str] | None, names: str | None) -> None:
        from agnostos.evaluation.bank import DemoBank
        from agnostos.tasks import SUITES, get_suite

        self.bank = DemoBank.load(folder)
        missing = [record for record in self.bank.records if record.demo_text is None]
        if missing:
            reason = missing[0].demo_text_error or "not computed"
            raise ValueError(
                f"bank {folder}: {len(missing)} of {len(self.bank)} demos have no demo text "
                f"(first: {missing[0].id}: {reason}); X-ICM needs every demo's text"
            )
        if self.top_k > len(self.bank):
            raise ValueError(f"top_k {self.top_k} exceeds the bank's {len(self.bank)} demos")
        self.ranking_bank = self.bank.to_ranking_bank()
        self.demo_texts = {record.id: record.demo_text for record in self.bank.records}
        options = dict(self.bank.demo_text_options or {})
        self.cameras = tuple(cameras or options.get("cameras") or ())
        self.names = names or options.get("suite")
        if self.names is None:
            raise ValueError(
                f"bank {folder} records no benchmark for its object names; set names: "
                f"{' or '.join(sorted(SUITES))}"
            )
        if self.names not in SUITES:
            raise ValueError(
                f"names: {self.names!r} is not a benchmark with object-name maps; choose one "
                f"of {', '.join(sorted(SUITES))}"
            )
        self.object_names = get_suite(self.names).object_names
        self.bank_sha256 = hashlib.sha256((Path(folder) / "bank.json").read_bytes()).hexdigest()

    def _load_dynamics(
        self, dynamics: str | None, base: str | None, device: str, dtype: str
    ) -> None:
        self.model = None
        self.model_sha256: str | None = None
        if self.ranker.name == "random":
            return
        if dynamics is None:
            raise ValueError(f"ranker {self.ranker.name} needs the dynamics model (dynamics:)")
        from agnostos.evaluation.bank import load_model, model_identity, model_resolution
        from agnostos.models.dynamics_diffusion import SamplingConfig

        for name, folder in (("dynamics", dynamics), ("dynamics_base", base)):
            if folder is not None and not Path(folder).is_dir():
                raise FileNotFoundError(f"{name}: model directory {folder} does not exist")
        identity = model_identity(dynamics, base)
        built = self.bank.model
        if built is not None and built.unet_sha256 != identity.unet_sha256:
            raise ValueError(
                f"the bank was built with the dynamics model {built.unet} "
                f"(UNet sha256 {str(built.unet_sha256)[:12]}), not {identity.unet} "
                f"(sha256 {str(identity.unet_sha256)[:12]})"
            )
        self.model, _ = load_model(dynamics, base=base, device=device, dtype=dtype)
        self.model_sha256 = identity.unet_sha256
        extraction = self.bank.extraction
        self.sampling = extraction.sampling if extraction is not None else SamplingConfig()
        self.camera = extraction.camera if extraction is not None else "front"
        self.resolution = (
            extraction.resolution if extraction is not None else model_resolution(self.model)
        )

    def settings(self) -> dict[str, Any]:
        return {
            "bank_sha256": self.bank_sha256,
            "dynamics_unet_sha256": self.model_sha256,
            "query_sampling": asdict(self.sampling) if self.model is not None else None,
            "llm": self.llm.settings(),
            "ranker": self.ranker.name,
            "max_per_task": getattr(self.ranker, "max_per_task", None),
            "top_k": self.top_k,
            "parsing": self.parsing,
            "cameras": list(self.cameras),
            "names": self.names,
            "system_prompt_sha256": hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest(),
        }

    def open_run(self, out: Path, shard: tuple[int, int]) -> None:
        if not self.save_prompts:
            return
        suffix = "" if shard[1] == 1 else f".shard-{shard[0]}-of-{shard[1]}"
        self._log = open(Path(out) / f"llm_calls{suffix}.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self.llm.close()

    # -- episodes ------------------------------------------------------------------------------

    def reset(self, env_id: int, context: EpisodeContext) -> None:
        super().reset(env_id, context)
        self._stats[env_id] = _EpisodeStats()
        self._queries[env_id] = 0

    def episode_stats(self, env_id: int) -> dict[str, Any]:
        stats = self._stats.get(env_id, _EpisodeStats())
        return {**super().episode_stats(env_id), **asdict(stats)}

    # -- planning ------------------------------------------------------------------------------

    def plan(self, batch: Sequence[tuple[int, Observation]]) -> list[Any]:
        queries = [self._start_query(env_id, observation) for env_id, observation in batch]
        self._rank(queries, [observation for _, observation in batch])
        parsed = self._ask(queries)
        return [
            self._actions(query, outcome) for query, outcome in zip(queries, parsed, strict=True)
        ]

    def _start_query(self, env_id: int, observation: Observation) -> _Query:
        from agnostos.observation_text import observation_text

        context = self.context(env_id)
        number = self._queries[env_id]
        self._queries[env_id] = number + 1
        seed = derive_seed(context.task, context.key.episode, context.key.seed, "query", number)
        if context.task not in self.object_names:
            raise ValueError(f"{context.key}: no {self.names} object-name map for {context.task}")
        text = observation_text(
            observation, context.task, context.instruction,
            object_names=self.object_names[context.task], cameras=self.cameras or None,
        )  # fmt: skip
        return _Query(env_id, context, number, seed, text)

    def _rank(self, queries: list[_Query], observations: list[Observation]) -> None:
        from agnostos.evaluation.rankers import RankingQuery

        features = self._features(queries, observations)
        for index, query in enumerate(queries):
            ranking_query = RankingQuery(
                output_latent=None if features is None else features.output_latents[index].numpy(),
                prompt_bos=None if features is None else features.prompt_bos[index].numpy(),
                text_embedding=None if features is None else features.prompt_pooled[index].numpy(),
                seed=query.seed,
            )  # fmt: skip
            ranking = self.ranker.rank(self.ranking_bank, ranking_query, self.top_k)
            query.retrieved, query.scores = ranking.ids, ranking.scores
            query.user = build_user_prompt(
                [self.demo_texts[demo_id] for demo_id in ranking.ids], query.observation_text
            )

    def _features(self, queries: list[_Query], observations: list[Observation]) -> Any:
        """Dynamics features of every query's current image (None for the random ranker)."""
        if self.model is None:
            return None
        import torch

        from agnostos.evaluation.bank import extract_features
        from agnostos.images import centre_crop_resize

        images = []
        for query, observation in zip(queries, observations, strict=True):
            if self.camera not in observation.cameras:
                raise ValueError(
                    f"{query.context.key}: the observation has no {self.camera} camera"
                )
            pixels = centre_crop_resize(observation.cameras[self.camera].rgb, self.resolution)
            images.append(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
        return extract_features(
            self.model, torch.stack(images), [q.context.instruction for q in queries],
            [q.seed for q in queries], self.sampling,
        )  # fmt: skip

    def _ask(self, queries: list[_Query]) -> list[ParsedReply | LLMRequestError]:
        """One batched LLM call; in strict mode one more for the replies that failed."""
        from agnostos.models.llm import LLMRequest

        requests = [LLMRequest(conversation(q.user), seed=q.seed) for q in queries]
        replies = self.llm.generate(requests)
        outcomes: list[ParsedReply | LLMRequestError] = []
        for query, reply in zip(queries, replies, strict=True):
            outcomes.append(self._read(query, reply, reask=False))
        if self.parsing != "strict":
            return outcomes
        again = [i for i, o in enumerate(outcomes) if isinstance(o, ParsedReply) and o.problem]
        if not again:
            return outcomes
        follow_ups = [
            LLMRequest(
                conversation(queries[i].user, [
                    {"role": "assistant", "content": self._last_reply[queries[i].env_id]},
                    {"role": "user", "content": reask_message(str(outcomes[i].problem))},
                ]),
                seed=derive_seed(queries[i].seed, "reask"),
            )
            for i in again
        ]  # fmt: skip
        for index, reply in zip(again, self.llm.generate(follow_ups), strict=True):
            self._stats[queries[index].env_id].reasks += 1
            second = self._read(queries[index], reply, reask=True)
            first = outcomes[index]
            if isinstance(second, ParsedReply) and (second.codes or not first.codes):
                outcomes[index] = second
        return outcomes

    def _read(self, query: _Query, reply: Any, reask: bool) -> ParsedReply | LLMRequestError:
        stats = self._stats[query.env_id]
        stats.llm_calls += 1
        stats.prompt_tokens += int(reply.prompt_tokens)
        stats.reply_tokens += int(reply.reply_tokens)
        if not reask:
            stats.retrieved.append(list(query.retrieved))
        if reply.error:
            stats.parse_status.append("llm_error")
            self._write_log(query, reply, None, reask)
            return LLMRequestError(f"{query.context.key} query {query.number}: {reply.error}")
        parsed = parse_reply(reply.text, self.parsing)
        stats.parse_status.append(parsed.status)
        self._last_reply[query.env_id] = reply.text
        self._write_log(query, reply, parsed, reask)
        return parsed

    def _actions(self, query: _Query, outcome: ParsedReply | LLMRequestError) -> Any:
        from agnostos.observation_text import XICM_CODEC

        if isinstance(outcome, LLMRequestError):
            return outcome
        codes = outcome.codes or (HOME_CODE,)
        if outcome.fallback or not outcome.codes:
            self._stats[query.env_id].fallbacks += 1
        return list(XICM_CODEC.decode(np.asarray(codes, dtype=np.int64)))

    def _write_log(
        self, query: _Query, reply: Any, parsed: ParsedReply | None, reask: bool
    ) -> None:
        if self._log is None:
            return
        entry = {
            "key": str(query.context.key), "query": query.number, "reask": reask,
            "seed": query.seed, "retrieved": list(query.retrieved),
            "scores": [round(score, 6) for score in query.scores],
            "system": SYSTEM_PROMPT, "user": query.user, "reply": reply.text,
            "prompt_tokens": reply.prompt_tokens, "reply_tokens": reply.reply_tokens,
            "finish_reason": reply.finish_reason, "error": reply.error,
            "status": None if parsed is None else parsed.status,
            "problem": None if parsed is None else parsed.problem,
        }  # fmt: skip
        self._log.write(json.dumps(entry) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())
