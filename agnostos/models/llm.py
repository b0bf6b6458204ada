"""LLM backends for in-context agents: one batched `generate(requests) -> replies` interface.

Three backends share it (`make_backend(kind, model=..., ...)`):
- `transformers` (here): a local model directory, a `.gguf` file, or `smollm2` (the embedded
  default, see `smollm2.py`); batched left-padded generation on CPU or GPU;
- `vllm` (`llm_vllm.py`, imported only when chosen): offline `LLM.chat` over the batch;
- `openai` (`llm_openai.py`): any OpenAI-compatible server, requests sent concurrently.

Sampling defaults are X-ICM's (temperature 0.1, top_p 0.001, repetition_penalty 1.05, 256
new tokens). Every request carries its own seed, and a reply depends only on its request
and seed, never on what else is in the batch: the transformers backend samples each row
from its own `torch.Generator` (HF `generate` has one RNG for the whole batch), vLLM and the
servers take a per-request `seed`.

Failures come in two sizes. A request that cannot be served (its prompt does not fit the
context, a server error that outlived the retries) gets an `LLMReply` with `error` set and
empty text, and the rest of the batch goes on. A call that cannot work at all (no such model
directory, vLLM not installed, a server that does not answer) raises `LLMError` with one line.

A prompt is "too long" when its tokens plus `max_new_tokens` exceed the model's context:
the whole reply budget must fit, so the rule is the same whatever the batch holds.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BACKENDS",
    "DECODINGS",
    "DEFAULT_SAMPLING",
    "LLMBackend",
    "LLMError",
    "LLMReply",
    "LLMRequest",
    "SamplingSettings",
    "TransformersBackend",
    "make_backend",
    "model_identity",
    "prompt_too_long",
]

BACKENDS = ("transformers", "vllm", "openai")
DECODINGS = ("free", "constrained")
SMOLLM2 = "smollm2"


@dataclass(frozen=True)
class SamplingSettings:
    """X-ICM's decoding settings; temperature 0 means greedy decoding."""

    temperature: float = 0.1
    top_p: float = 0.001
    repetition_penalty: float = 1.05
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


DEFAULT_SAMPLING = SamplingSettings()


@dataclass(frozen=True)
class LLMRequest:
    """One conversation (`[{"role": "system", ...}, {"role": "user", ...}]`) and its seed."""

    messages: list[dict[str, str]]
    seed: int


@dataclass(frozen=True)
class LLMReply:
    """The reply text and its token counts; `error` is set (and `text` empty) on failure."""

    text: str
    prompt_tokens: int
    reply_tokens: int
    finish_reason: str
    error: str | None = None


class LLMError(RuntimeError):
    """A whole call cannot work: missing model, backend not installed, server unreachable."""


class LLMBackend(ABC):
    """A batched chat generator. Subclasses set `name` and implement the three methods."""

    name: str = "abstract"
    sampling: SamplingSettings  # set by every backend's constructor
    decoding: str

    @abstractmethod
    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMReply]:
        """One reply per request, in order; requests are served together where possible."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON values that change replies (model identity, sampling, decoding)."""

    @abstractmethod
    def close(self) -> None:
        """Release the model or connections; the backend is unusable afterwards."""

    def reply_settings(self, model: Any) -> dict[str, Any]:
        """The settings every backend's replies depend on: backend, model identity,
        sampling, decoding and its grammar (backends add their own)."""
        from agnostos.models.llm_grammar import ACTION_LIST_REGEX

        return {
            "backend": self.name,
            "model": model,
            "sampling": asdict(self.sampling),
            "decoding": self.decoding,
            "grammar": ACTION_LIST_REGEX if self.decoding == "constrained" else None,
        }

    def __enter__(self) -> LLMBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prompt_too_long(prompt_tokens: int, max_new_tokens: int, context: int) -> LLMReply | None:
    """The error reply of a request whose prompt and reply budget overflow `context`, else None."""
    if prompt_tokens + max_new_tokens <= context:
        return None
    return LLMReply(
        text="",
        prompt_tokens=prompt_tokens,
        reply_tokens=0,
        finish_reason="error",
        error=(
            f"PromptTooLong: {prompt_tokens} tokens + {max_new_tokens} new tokens "
            f"> context {context}"
        ),
    )


def _sha256_file(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read() if limit is None else handle.read(limit))
    return digest.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_identity(path: str | Path) -> dict[str, Any]:
    """What identifies local weights without reading them all: config hash, file sizes.

    Why not a full hash: a 7B checkpoint is 15 GB and this runs at every evaluation start.
    The config hash plus the names and sizes of the weight files catch a swapped model; a
    GGUF file is named by its size and the hash of its first MiB (its header and metadata).
    """
    path = Path(path).expanduser().resolve()
    if path.is_file():
        return {
            "path": str(path),
            "bytes": path.stat().st_size,
            "head_sha256": _sha256_file(path, 2**20),
        }
    weights = sorted(
        (item.name, item.stat().st_size)
        for item in path.iterdir()
        if item.is_file() and item.name.endswith(_WEIGHT_SUFFIXES)
    )
    config = path / "config.json"
    return {
        "path": str(path),
        "config_sha256": _sha256_file(config) if config.is_file() else None,
        "weights_sha256": hashlib.sha256(json.dumps(weights).encode()).hexdigest(),
    }


def _split_options(kind: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for the {kind} backend; choices: {sorted(allowed)}"
        )


def make_backend(
    kind: str,
    *,
    model: str,
    sampling: SamplingSettings = DEFAULT_SAMPLING,
    decoding: str = "free",
    **options: Any,
) -> LLMBackend:
    """Build a backend by name; unknown kinds, decodings or options raise `ValueError`."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown LLM backend {kind!r}; choices: {list(BACKENDS)}")
    if decoding not in DECODINGS:
        raise ValueError(f"unknown decoding {decoding!r}; choices: {list(DECODINGS)}")
    if kind == "transformers":
        _split_options(kind, options, TransformersBackend.OPTIONS)
        return TransformersBackend(model, sampling, decoding, **options)
    if kind == "vllm":
        from agnostos.models.llm_vllm import VLLMBackend

        _split_options(kind, options, VLLMBackend.OPTIONS)
        return VLLMBackend(model, sampling, decoding, **options)
    from agnostos.models.llm_openai import OpenAIBackend

    _split_options(kind, options, OpenAIBackend.OPTIONS)
    return OpenAIBackend(model, sampling, decoding, **options)


# ----------------------------------------------------------------------------------------
# transformers


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text of one conversation through the tokenizer's own chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def count_prompt_tokens(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered chat prompt; the template already holds any special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class SeededSampler:
    """The last logits processor: repetition penalty, temperature, top-p, then one draw per
    row from that row's own generator, returned as logits that make greedy pick the draw.

    Why: `generate()` samples the whole batch from one RNG, so a row's tokens would depend
    on its neighbours. Running `generate()` greedily with this processor last keeps its KV
    cache and stopping logic while each row draws exactly one number per step from a
    generator seeded with its request's seed. The repetition penalty is applied here too,
    skipping each row's left padding (HF's would penalise the pad token only in padded rows).
    """

    def __init__(self, sampling: SamplingSettings, seeds: Sequence[int], pads: Sequence[int]):
        import torch

        self.sampling = sampling
        self.pads = list(pads)
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def _penalise(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.sampling.repetition_penalty == 1.0:
            return scores
        seen = input_ids.clone()
        for row, pad in enumerate(self.pads):
            if pad:
                seen[row, :pad] = input_ids[row, pad]  # a token of the row, penalised anyway
        picked = torch.gather(scores, 1, seen)
        penalty = self.sampling.repetition_penalty
        picked = torch.where(picked < 0, picked * penalty, picked / penalty)
        return scores.scatter(1, seen, picked)

    def _nucleus_order(self, probs: Any) -> tuple[Any, Any]:
        """The most likely tokens, descending, at least covering `top_p` of the mass.

        Why not always a full sort: X-ICM's top_p of 0.001 keeps one or two tokens, and
        sorting a 150k vocabulary per row per step costs more than the rest of the step's
        sampling; the 64 largest nearly always cover the nucleus, else sort everything.
        """
        import torch

        top, order = torch.topk(probs, min(64, probs.numel()))
        if top.sum() < self.sampling.top_p:
            top, order = torch.sort(probs, descending=True, stable=True)
        return top, order

    def _draw(self, logits: Any, generator: Any) -> int:
        import torch

        probs = torch.softmax(logits.double().cpu() / self.sampling.temperature, dim=-1)
        order = None
        if self.sampling.top_p < 1.0:
            probs, order = self._nucleus_order(probs)
            before = torch.cumsum(probs, dim=-1) - probs
            probs = torch.where(before < self.sampling.top_p, probs, torch.zeros_like(probs))
        cumulative = torch.cumsum(probs, dim=-1)
        draw = torch.rand((), generator=generator, dtype=torch.float64).item()
        target = torch.tensor([draw * cumulative[-1].item()], dtype=cumulative.dtype)
        index = int(torch.searchsorted(cumulative, target, right=True).clamp_(max=len(probs) - 1))
        while probs[index] == 0 and index > 0:  # landed on a masked tail: step back
            index -= 1
        return int(order[index]) if order is not None else index

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = self._penalise(input_ids, scores)
        if self.sampling.temperature == 0:
            return scores
        forced = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            forced[row, self._draw(scores[row], generator)] = 0.0
        return forced


def _resolve_local_model(model: str, cache: str | None) -> tuple[Path, str | None, dict]:
    """(directory, gguf file name or None, identity) of a model argument, or `LLMError`."""
    if model == SMOLLM2:
        from agnostos.models import smollm2

        try:
            folder = smollm2.ensure_smollm2(cache)
        except smollm2.SmolLM2NotInstalled as error:
            raise LLMError(str(error)) from None
        identity = {"name": SMOLLM2, "source": folder.name} | model_identity(folder)
        identity.pop("path")  # the cache path differs between machines, not the weights
        return folder, None, identity
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name, model_identity(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path, None, model_identity(path)
    if path.is_dir():
        raise LLMError(f"{path} is not a transformers model directory (no config.json)")
    raise LLMError(
        f"model not found: {model} (give a local model directory, a .gguf file or '{SMOLLM2}')"
    )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformersBackend(LLMBackend):
    """Local generation with transformers: batched, left-padded, chat template, seeded rows.

    Options: `device` ("cpu", "cuda", ...; default cuda when available), `dtype` ("float32"
    default on CPU, "bfloat16" on GPU), `threads` (torch CPU threads, process-wide),
    `max_batch_size` (rows per `generate()`, default 8), `max_batch_tokens` (padded prompt
    tokens per `generate()`, default 32768: bounds prefill memory when 18-demo prompts of
    5k tokens wait together), `max_model_len` (context; default
    the model's `max_position_embeddings`), `cache` (folder for the converted SmolLM2).
    """

    name = "transformers"
    OPTIONS = (
        "device",
        "dtype",
        "threads",
        "max_batch_size",
        "max_batch_tokens",
        "max_model_len",
        "cache",
    )

    def __init__(
        self,
        model: str,
        sampling: SamplingSettings = DEFAULT_SAMPLING,
        decoding: str = "free",
        *,
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        max_batch_size: int = 8,
        max_batch_tokens: int = 32768,
        max_model_len: int | None = None,
        cache: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if decoding not in DECODINGS:
            raise ValueError(f"unknown decoding {decoding!r}; choices: {list(DECODINGS)}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.sampling, self.decoding = sampling, decoding
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.device = device or _default_device()
        self.dtype = dtype or ("float32" if self.device == "cpu" else "bfloat16")
        folder, gguf_file, self._identity = _resolve_local_model(model, cache)
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        if not getattr(self.tokenizer, "chat_template", None):
            raise LLMError(f"{model}: the tokenizer has no chat template")
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, self.dtype), **extra
        )
        self.model.to(self.device).eval()
        self.eos_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        config = self.model.config
        self.context = int(max_model_len or getattr(config, "max_position_embeddings", 0) or 2048)
        self.vocab_size = int(config.vocab_size)
        self._grammar = None

    def _eos_ids(self) -> list[int]:
        """Stop tokens: the generation config's eos ids plus the tokenizer's eos token."""
        found: list[int] = []
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            found.append(configured)
        elif configured:
            found.extend(int(item) for item in configured)
        if self.tokenizer.eos_token_id is not None:
            found.append(int(self.tokenizer.eos_token_id))
        if not found:
            raise LLMError("the model defines no end-of-sequence token")
        return sorted(set(found))

    def _processors(self, seeds: list[int], pads: list[int]) -> list[Any]:
        processors: list[Any] = []
        if self.decoding == "constrained":
            if self._grammar is None:
                from agnostos.models.llm_grammar import action_grammar

                self._grammar = action_grammar(self.tokenizer, self.vocab_size, self.eos_ids)
            processors.append(self._grammar.processor())
        processors.append(SeededSampler(self.sampling, seeds, pads))
        return processors

    def _generate_rows(self, prompts: list[list[int]], seeds: list[int]) -> list[LLMReply]:
        """One `generate()` over prompts that fit; left padding, own masks and positions."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(ids) for ids in prompts)
        pads = [width - len(ids) for ids in prompts]
        input_ids = torch.tensor(
            [[self.pad_id] * pad + ids for pad, ids in zip(pads, prompts, strict=True)],
            dtype=torch.long,
        )
        mask = torch.tensor(
            [[0] * pad + [1] * len(ids) for pad, ids in zip(pads, prompts, strict=True)]
        )
        config = GenerationConfig(
            max_new_tokens=self.sampling.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList(self._processors(seeds, pads)),
            )
        return [
            self._reply(ids, row)
            for ids, row in zip(prompts, output[:, width:].tolist(), strict=True)
        ]

    def _reply(self, prompt: list[int], generated: list[int]) -> LLMReply:
        stop = next((at for at, token in enumerate(generated) if token in self.eos_ids), None)
        tokens = generated if stop is None else generated[:stop]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return LLMReply(
            text=text,
            prompt_tokens=len(prompt),
            reply_tokens=len(generated) if stop is None else stop + 1,
            finish_reason="length" if stop is None else "stop",
        )

    def _chunks(self, ready: list[tuple[int, list[int], int]]) -> list[list[Any]]:
        """Consecutive groups within `max_batch_size` rows and `max_batch_tokens` padded
        tokens (a reply does not depend on its group, so grouping only changes speed)."""
        chunks: list[list[Any]] = []
        for item in ready:
            current = chunks[-1] if chunks else None
            if current is not None and len(current) < self.max_batch_size:
                width = max(len(item[1]), *(len(ids) for _, ids, _ in current))
                if width * (len(current) + 1) <= self.max_batch_tokens:
                    current.append(item)
                    continue
            chunks.append([item])
        return chunks

    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMReply]:
        replies: list[LLMReply | None] = [None] * len(requests)
        ready: list[tuple[int, list[int], int]] = []
        for index, request in enumerate(requests):
            ids = count_prompt_tokens(self.tokenizer, render_chat(self.tokenizer, request.messages))
            refused = prompt_too_long(len(ids), self.sampling.max_new_tokens, self.context)
            if refused is not None:
                replies[index] = refused
            else:
                ready.append((index, ids, request.seed))
        for chunk in self._chunks(ready):
            rows = self._generate_rows([ids for _, ids, _ in chunk], [seed for *_, seed in chunk])
            for (index, _, _), reply in zip(chunk, rows, strict=True):
                replies[index] = reply
        return [reply for reply in replies if reply is not None]

    def settings(self) -> dict[str, Any]:
        return {
            **self.reply_settings(self._identity),
            "device": self.device.split(":")[0],
            "dtype": self.dtype,
            "context": self.context,
            "sampler": "seeded-rows-v1",
        }

    def close(self) -> None:
        self.model = None
        self._grammar = None
