"""The vLLM backend: offline `LLM.chat` over a whole batch, one `SamplingParams` per request.

Why offline vLLM: X-ICM's published runs use it (Qwen2.5-7B/72B-Instruct, tensor parallel
over every visible GPU, `gpu_memory_utilization=0.8`), and batching the waiting
environments' prompts into one `chat()` call is where its throughput comes from.

Per-request seeds go in each request's `SamplingParams(seed=...)`, which vLLM pairs one by
one with the conversations. Constrained decoding uses vLLM's structured outputs with the
action-list regex; the parameter was renamed in 0.10.2 (`guided_decoding=
GuidedDecodingParams(regex=...)` became `structured_outputs=StructuredOutputsParams(regex=
...)`, the old name removed in 0.12), so the installed version is detected by trying the new
import first.

Prompt lengths are counted with the engine's own tokenizer and chat template before the
call, so a prompt that does not fit `max_model_len` becomes one error reply instead of an
exception that would sink the batch. vLLM is imported only here, only when chosen.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agnostos.models.llm import (
    DECODINGS,
    DEFAULT_SAMPLING,
    LLMBackend,
    LLMError,
    LLMReply,
    LLMRequest,
    SamplingSettings,
    count_prompt_tokens,
    model_identity,
    prompt_too_long,
    render_chat,
)
from agnostos.models.llm_grammar import ACTION_LIST_REGEX

__all__ = ["VLLMBackend", "import_vllm", "structured_regex"]

INSTALL_HINT = "pip install agnostos[vllm]"


def import_vllm() -> Any:
    """The `vllm` module, or one line saying how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise LLMError(
            f"the vllm backend needs vLLM, which cannot be imported ({error}): {INSTALL_HINT}"
        ) from None
    return vllm


def structured_regex(regex: str) -> tuple[str, Any]:
    """(SamplingParams keyword, value) constraining a reply to `regex`, for this vLLM version."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        pass
    else:
        return "structured_outputs", StructuredOutputsParams(regex=regex)
    try:
        from vllm.sampling_params import GuidedDecodingParams
    except ImportError:
        raise LLMError(
            "this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams; "
            "constrained decoding needs vLLM >= 0.6.6"
        ) from None
    return "guided_decoding", GuidedDecodingParams(regex=regex)


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def _visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 1
    return max(1, torch.cuda.device_count())


def _engine_context(llm: Any) -> int | None:
    """The engine's `max_model_len` (its own default when the user gave none)."""
    for owner in ("llm_engine", None):
        holder = getattr(llm, owner) if owner else llm
        config = getattr(holder, "model_config", None)
        value = getattr(config, "max_model_len", None)
        if value:
            return int(value)
    return None


class VLLMBackend(LLMBackend):
    """Batched offline generation with vLLM (needs a CUDA GPU and the `vllm` extra).

    Options: `tensor_parallel_size` (default: every visible GPU), `gpu_memory_utilization`
    (0.8), `max_model_len` (default the model's; 18 demos need 3.5k-6k tokens), `seed`
    (the engine's, 0), `dtype` ("auto"), `enforce_eager` (False), `engine_options` (a dict
    passed on to `vllm.LLM`).
    """

    name = "vllm"
    OPTIONS = (
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "max_model_len",
        "seed",
        "dtype",
        "enforce_eager",
        "engine_options",
    )

    def __init__(
        self,
        model: str,
        sampling: SamplingSettings = DEFAULT_SAMPLING,
        decoding: str = "free",
        *,
        tensor_parallel_size: int | None = None,
        gpu_memory_utilization: float = 0.8,
        max_model_len: int | None = None,
        seed: int = 0,
        dtype: str = "auto",
        enforce_eager: bool = False,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        if decoding not in DECODINGS:
            raise ValueError(f"unknown decoding {decoding!r}; choices: {list(DECODINGS)}")
        if _looks_like_path(model) and not Path(model).expanduser().exists():
            raise LLMError(f"model directory not found: {model}")
        vllm = import_vllm()
        self.sampling, self.decoding, self.model_name = sampling, decoding, model
        self.tensor_parallel_size = int(tensor_parallel_size or _visible_gpus())
        self.seed, self.dtype = int(seed), dtype
        arguments: dict[str, Any] = {
            "model": model,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "seed": self.seed,
            "dtype": dtype,
            "enforce_eager": bool(enforce_eager),
            **(engine_options or {}),
        }
        if max_model_len is not None:
            arguments["max_model_len"] = int(max_model_len)
        self._vllm = vllm
        self.llm = vllm.LLM(**arguments)
        self.tokenizer = self.llm.get_tokenizer()
        context = max_model_len or _engine_context(self.llm)
        if context is None:
            raise LLMError("vLLM did not report max_model_len; pass it as an option")
        self.context = int(context)
        self._structured = (
            structured_regex(ACTION_LIST_REGEX) if decoding == "constrained" else None
        )
        self._identity = model_identity(model) if _looks_like_path(model) else {"name": model}

    def _params(self, seed: int) -> Any:
        extra = dict([self._structured]) if self._structured else {}
        return self._vllm.SamplingParams(
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            repetition_penalty=self.sampling.repetition_penalty,
            max_tokens=self.sampling.max_new_tokens,
            seed=int(seed),
            **extra,
        )

    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMReply]:
        replies: list[LLMReply | None] = [None] * len(requests)
        ready: list[int] = []
        for index, request in enumerate(requests):
            tokens = count_prompt_tokens(
                self.tokenizer, render_chat(self.tokenizer, request.messages)
            )
            refused = prompt_too_long(len(tokens), self.sampling.max_new_tokens, self.context)
            if refused is None:
                ready.append(index)
            else:
                replies[index] = refused
        if ready:
            outputs = self.llm.chat(
                [requests[index].messages for index in ready],
                sampling_params=[self._params(requests[index].seed) for index in ready],
                use_tqdm=False,
            )
            if len(outputs) != len(ready):
                raise LLMError(f"vLLM returned {len(outputs)} outputs for {len(ready)} prompts")
            for index, output in zip(ready, outputs, strict=True):
                replies[index] = self._reply(output)
        return [reply for reply in replies if reply is not None]

    @staticmethod
    def _reply(output: Any) -> LLMReply:
        completion = output.outputs[0]
        return LLMReply(
            text=completion.text,
            prompt_tokens=len(output.prompt_token_ids or []),
            reply_tokens=len(completion.token_ids),
            finish_reason=str(completion.finish_reason or "stop"),
        )

    def settings(self) -> dict[str, Any]:
        return {
            **self.reply_settings(self._identity),
            "structured_param": self._structured[0] if self._structured else None,
            "max_model_len": self.context,
            "tensor_parallel_size": self.tensor_parallel_size,
            "dtype": self.dtype,
            "engine_seed": self.seed,
        }

    def close(self) -> None:
        """Drop the engine and free its GPU memory so another backend can load."""
        self.llm = None
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # best effort: the module layout differs between versions
            pass
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
