"""The `openai` backend: any OpenAI-compatible chat server (vLLM serve, SGLang, llama.cpp
server, Ollama, `transformers serve`), spoken to with plain `httpx`.

Why not the `openai` package: it pulls pydantic models, its own HTTP stack and retry
policy, and hides which fields reach the server. The chat-completions protocol is one JSON
POST; what matters here is what the client does around it:
- a batch's requests run concurrently (a thread pool of `concurrency`), so a server that
  batches continuously (vLLM, SGLang) sees them all at once;
- connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff
  (`backoff * 2**attempt`, capped at 8 s; a 429's `Retry-After` wins), at most
  `max_retries` times; other 4xx answers are final;
- the server is asked for `GET /models` once, before any work: an unreachable URL is one
  `LLMError` line ("cannot reach the LLM server at URL: ..."), and a model name the server
  does not serve is refused naming the served ones.

Dialects. Only vLLM-style and SGLang servers take `repetition_penalty` and a regex
constraint; a strict server (`transformers serve`) answers 422 to unknown fields. The
dialect is read from the `owned_by` of the model in `/models` ("vllm", "sglang"), or forced
with `dialect=`. For vLLM the regex field was renamed in 0.10.2 (`guided_regex` ->
`structured_outputs: {"regex": ...}`, the old one removed in 0.12), so `GET /version` is
probed once: a known version gets its one field; an unknown one gets both, which every
vLLM accepts (it ignores, with a warning, a field it does not know). Constrained decoding
against a plain OpenAI server is refused up front rather than silently unconstrained.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from agnostos.models.llm import (
    DECODINGS,
    DEFAULT_SAMPLING,
    LLMBackend,
    LLMError,
    LLMReply,
    LLMRequest,
    SamplingSettings,
)
from agnostos.models.llm_grammar import ACTION_LIST_REGEX

__all__ = ["DIALECTS", "OpenAIBackend", "constraint_fields"]

DIALECTS = ("auto", "vllm", "sglang", "openai")
RETRYABLE_STATUS = {408, 429}
NEW_VLLM_FIELDS = (0, 10, 2)  # first vLLM release with `structured_outputs`
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 30.0
_CONTEXT_WORDS = re.compile(
    r"context length|context window|maximum context|max_model_len|too long|too many tokens",
    re.IGNORECASE,
)


def _one_line(value: object, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_version(text: str) -> tuple[int, int, int] | None:
    found = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not found:
        return None
    return int(found[1]), int(found[2]), int(found[3] or 0)


def constraint_fields(dialect: str, version: tuple[int, int, int] | None) -> dict[str, Any]:
    """Request-body fields that force the action-list regex on a server of `dialect`."""
    if dialect == "sglang":
        return {"regex": ACTION_LIST_REGEX}
    if dialect != "vllm":
        raise ValueError(f"no regex constraint for dialect {dialect!r}")
    new = {"structured_outputs": {"regex": ACTION_LIST_REGEX}}
    old = {"guided_regex": ACTION_LIST_REGEX}
    if version is None:
        return new | old
    return new if version >= NEW_VLLM_FIELDS else old


def _detail(response: httpx.Response) -> str:
    """The server's error message, from the usual JSON shapes or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return _one_line(response.text)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _one_line(error["message"])
        for key in ("detail", "message", "error"):
            if body.get(key):
                return _one_line(body[key])
    return _one_line(body)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers["retry-after"]), MAX_RETRY_AFTER_S)
    except (KeyError, ValueError):
        return None


def _failed(error: str) -> LLMReply:
    return LLMReply(text="", prompt_tokens=0, reply_tokens=0, finish_reason="error", error=error)


class OpenAIBackend(LLMBackend):
    """Chat completions from an OpenAI-compatible server, one HTTP request per conversation.

    Options: `base_url` (default http://127.0.0.1:8000/v1), `api_key` (default
    `$OPENAI_API_KEY`, else "EMPTY"), `timeout` (seconds per attempt, 120), `connect_timeout`
    (5), `max_retries` (3), `backoff` (first retry delay, 0.5 s), `concurrency` (requests in
    flight, 8), `dialect` ("auto", "vllm", "sglang", "openai").
    """

    name = "openai"
    OPTIONS = (
        "base_url",
        "api_key",
        "timeout",
        "connect_timeout",
        "max_retries",
        "backoff",
        "concurrency",
        "dialect",
    )

    def __init__(
        self,
        model: str,
        sampling: SamplingSettings = DEFAULT_SAMPLING,
        decoding: str = "free",
        *,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key: str | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 8,
        dialect: str = "auto",
    ) -> None:
        if decoding not in DECODINGS:
            raise ValueError(f"unknown decoding {decoding!r}; choices: {list(DECODINGS)}")
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; choices: {list(DIALECTS)}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0 and timeout > 0")
        self.model, self.sampling, self.decoding = model, sampling, decoding
        self.base_url = base_url.rstrip("/")
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), backoff
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = httpx.Client(
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(self.timeout, connect=min(connect_timeout, self.timeout)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        try:
            card = self._served_model()
            self.dialect = self._dialect(dialect, card)
            self.server_version = self._vllm_version() if self.dialect == "vllm" else None
            self.extra = self._extra_fields()
        except BaseException:
            self.client.close()
            raise
        self.served_root = card.get("root")
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="llm-http")

    # -- start-up probes ----------------------------------------------------------------

    def _unreachable(self, problem: object) -> LLMError:
        return LLMError(f"cannot reach the LLM server at {self.base_url}: {_one_line(problem)}")

    def _served_model(self) -> dict[str, Any]:
        """The `/models` entry of our model; refuses a dead URL or a model not served."""
        try:
            response = self.client.get(f"{self.base_url}/models")
        except httpx.HTTPError as error:
            raise self._unreachable(f"{type(error).__name__}: {error}") from None
        if response.status_code != 200:
            hint = " (does base_url end with /v1?)" if response.status_code == 404 else ""
            raise LLMError(
                f"the LLM server at {self.base_url} answered GET /models with HTTP "
                f"{response.status_code}: {_detail(response)}{hint}"
            )
        try:
            cards = [card for card in response.json()["data"] if isinstance(card, dict)]
        except (ValueError, KeyError, TypeError):
            raise LLMError(
                f"{self.base_url}/models is not an OpenAI model list: {_one_line(response.text)}"
            ) from None
        for card in cards:
            if card.get("id") == self.model:
                return card
        served = [card.get("id") for card in cards]
        raise LLMError(f"model {self.model!r} is not served at {self.base_url}; served: {served}")

    def _dialect(self, requested: str, card: dict[str, Any]) -> str:
        if requested != "auto":
            return requested
        owner = str(card.get("owned_by", "")).lower()
        return owner if owner in ("vllm", "sglang") else "openai"

    def _vllm_version(self) -> tuple[int, int, int] | None:
        """vLLM's `/version` (at the server root, beside `/v1`), or None when absent."""
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        try:
            response = self.client.get(f"{root}/version")
            return _parse_version(str(response.json().get("version", "")))
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

    def _extra_fields(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.dialect in ("vllm", "sglang"):
            extra["repetition_penalty"] = self.sampling.repetition_penalty
        if self.decoding == "constrained":
            if self.dialect == "openai":
                raise LLMError(
                    f"constrained decoding needs a server that takes a regex (vLLM, SGLang); "
                    f"the server at {self.base_url} does not say it is one: pass dialect='vllm' "
                    "or 'sglang' to force it"
                )
            extra |= constraint_fields(self.dialect, self.server_version)
        return extra

    # -- requests -------------------------------------------------------------------------

    def _body(self, request: LLMRequest) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": request.messages,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_tokens": self.sampling.max_new_tokens,
            "seed": int(request.seed),
            **self.extra,
        }

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        after = _retry_after(response) if response is not None else None
        return after if after is not None else min(self.backoff * 2**attempt, MAX_BACKOFF_S)

    def _final_answer(self, response: httpx.Response) -> LLMReply:
        """A non-retryable answer: the reply, a per-request error, or `LLMError` for all."""
        if response.status_code == 200:
            return self._parse(response)
        detail, status = _detail(response), response.status_code
        if status in (401, 403, 404):
            raise LLMError(
                f"the LLM server at {self.base_url} refused chat/completions with HTTP "
                f"{status}: {detail}"
            )
        if status in (400, 413, 422) and _CONTEXT_WORDS.search(detail):
            return _failed(f"PromptTooLong: {detail}")
        return _failed(f"HTTP {status}: {detail}")

    @staticmethod
    def _parse(response: httpx.Response) -> LLMReply:
        try:
            body = response.json()
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            return LLMReply(
                text=(choice.get("message") or {}).get("content") or "",
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                reply_tokens=int(usage.get("completion_tokens") or 0),
                finish_reason=str(choice.get("finish_reason") or "stop"),
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return _failed(f"BadResponse: not a chat completion: {_one_line(response.text)}")

    def _one(self, request: LLMRequest) -> LLMReply:
        """One request with bounded retries on connection errors, timeouts, 408/429/5xx."""
        body, url = self._body(request), f"{self.base_url}/chat/completions"
        problem, unreachable = "", False
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                response = self.client.post(url, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                problem, unreachable = f"{type(error).__name__}: {error}", True
            except httpx.TimeoutException:
                problem, unreachable = f"Timeout: no answer within {self.timeout:g} s", False
            except httpx.TransportError as error:
                problem, unreachable = f"{type(error).__name__}: {error}", False
            else:
                status = response.status_code
                if status not in RETRYABLE_STATUS and status < 500:
                    return self._final_answer(response)
                problem, unreachable = f"HTTP {status}: {_detail(response)}", False
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, response))
        if unreachable:
            raise self._unreachable(problem)
        return _failed(f"{_one_line(problem)} (gave up after {self.max_retries + 1} attempts)")

    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMReply]:
        futures = [self._pool.submit(self._one, request) for request in requests]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    def settings(self) -> dict[str, Any]:
        return {
            **self.reply_settings({"name": self.model, "root": self.served_root}),
            "dialect": self.dialect,
            "extra_fields": sorted(self.extra),
        }

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
