"""VLAPolicy on the tiny Qwen2.5-VL and SmolVLM backbones: loading, prompts and labels,
action formats, LoRA, export/reload, merge and batched prediction (all offline, CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from agnostos.action_codecs import ActionStats, TokenBinCodec, XICMActionCodec
from agnostos.datamodules.keyframes import KeyframeBatch
from agnostos.models.tiny_vla import TINY_BACKBONES, build_tiny_vla
from agnostos.models.vla import (
    BACKBONES,
    VLAError,
    VLAInputs,
    VLAPolicy,
    VLAPrediction,
    merge_export,
)
from agnostos.models.vla_replies import XICM_LIST, prompt_text

SIZE = 64  # camera images; the tiny towers see 64 px -> 16 tokens per image


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine two OpenMP
    threads spin against other processes (measured 16x slower steps); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-vla")
    return {family: build_tiny_vla(root / family, family) for family in BACKBONES}


def random_actions(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    xyz = rng.uniform([-0.2, -0.4, 0.8], [0.6, 0.4, 1.4], (*shape, 3))
    quat = rng.normal(size=(*shape, 4))
    quat /= np.linalg.norm(quat, axis=-1, keepdims=True)
    gripper = rng.integers(0, 2, (*shape, 1)).astype(np.float64)
    return np.concatenate([xyz, quat, gripper, np.ones((*shape, 1))], axis=-1)


def token_codec(seed: int = 0) -> TokenBinCodec:
    stats = ActionStats.compute(random_actions(np.random.default_rng(seed), (200,)))
    return TokenBinCodec(stats, bins=64)


def make_batch(codec, size: int = 4, chunk: int = 1, seed: int = 0,
               cameras=("front", "wrist"), mask=None) -> KeyframeBatch:  # fmt: skip
    rng = np.random.default_rng(seed)
    actions = random_actions(rng, (size, chunk))
    proprio = np.concatenate([actions[:, 0, :7], actions[:, 0, 7:8]], axis=-1)
    images = rng.integers(0, 256, (size, len(cameras), 3, SIZE, SIZE), dtype=np.uint8)
    action_mask = np.ones((size, chunk), bool) if mask is None else np.asarray(mask, bool)
    tasks = ["push_button", "open_drawer", "reach_target", "stack_blocks"]
    return KeyframeBatch(
        images=torch.from_numpy(images), cameras=list(cameras),
        proprio=torch.from_numpy(proprio.astype(np.float32)),
        instructions=[f"{tasks[i % 4].replace('_', ' ')} number {i}" for i in range(size)],
        actions=torch.from_numpy(codec.encode(actions)),
        action_values=torch.from_numpy(actions.astype(np.float32)),
        action_mask=torch.from_numpy(action_mask), ids=[f"ep{i}@0->1" for i in range(size)],
        tasks=[tasks[i % 4] for i in range(size)], state_frames=torch.zeros(size, dtype=torch.long),
        target_frames=torch.ones(size, chunk, dtype=torch.long),
    )  # fmt: skip


def policy(tiny, family="qwen2_5_vl", codec=None, action_format="xicm_text", **inputs):
    codec = codec or XICMActionCodec()
    settings = {"image_size": SIZE, **inputs}
    return VLAPolicy.from_base(tiny[family], codec=codec, action_format=action_format,
                               inputs=VLAInputs(**settings))  # fmt: skip


def logits_of(model: VLAPolicy, batch: KeyframeBatch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**model.training_inputs(batch)).logits


def train_steps(model: VLAPolicy, batch: KeyframeBatch, steps: int, lr: float = 3e-3):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    model.train()
    losses = []
    inputs = model.training_inputs(batch)
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


# -- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", BACKBONES)
def test_both_backbones_load_from_tiny_directories(tiny, family):
    model = policy(tiny, family)
    assert model.backbone == family
    assert TINY_BACKBONES["tiny" if family == "qwen2_5_vl" else "tiny-smolvlm"] == family
    assert (model.side, model.image_tokens) == (64, 16)
    inputs = model.training_inputs(make_batch(model.codec))
    expected = {"qwen2_5_vl": {"image_grid_thw", "mm_token_type_ids"},
                "smolvlm": {"pixel_attention_mask"}}[family]  # fmt: skip
    assert expected | {"input_ids", "attention_mask", "labels", "pixel_values"} == set(inputs)
    image_id = model.backbone_adapter.image_token_id()
    assert int((inputs["input_ids"] == image_id).sum()) == 4 * 2 * 16
    out = model(**inputs)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == inputs["input_ids"].shape


def test_tiny_build_is_reused_and_numbers_are_single_tokens(tiny):
    again = build_tiny_vla(tiny["qwen2_5_vl"], "qwen2_5_vl")
    assert again == tiny["qwen2_5_vl"]
    model = policy(tiny)
    for value in (0, 7, 57, 99):
        assert len(model.tokenizer(f" {value}", add_special_tokens=False)["input_ids"]) == 1
    assert "chat_template" in json.dumps(sorted(os.listdir(tiny["smolvlm"])))


def test_unsupported_or_missing_model_is_one_clear_error(tmp_path):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(VLAError, match=r"llama.*'llama' is not supported.*qwen2_5_vl.*smolvlm"):
        VLAPolicy.from_base(other, codec=XICMActionCodec())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VLAError, match=r"empty: not a model directory \(no config.json\)"):
        VLAPolicy.from_base(empty, codec=XICMActionCodec())
    with pytest.raises(VLAError, match="not a model directory"):
        VLAPolicy.from_base(tmp_path / "absent", codec=XICMActionCodec())


def test_format_and_codec_must_agree(tiny):
    with pytest.raises(VLAError, match="token_bins needs a TokenBinCodec"):
        policy(tiny, action_format="token_bins")
    with pytest.raises(VLAError, match="action_format must be one of"):
        policy(tiny, action_format="fast")


# -- prompt and labels ------------------------------------------------------------------------


@pytest.mark.parametrize("family", BACKBONES)
def test_labels_cover_only_the_reply_and_its_end_token(tiny, family):
    model = policy(tiny, family, chunk=2)
    batch = make_batch(model.codec, size=3, chunk=2, mask=[[1, 1], [1, 0], [1, 1]])
    inputs = model.training_inputs(batch)
    ids, labels, attention = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
    for row in range(3):
        length = int(attention[row].sum())
        assert (attention[row, :length] == 1).all() and (attention[row, length:] == 0).all()
        supervised = (labels[row] != -100).nonzero().flatten()
        start = int(supervised[0])
        # one contiguous block at the end of the real tokens, equal to the input ids there
        assert supervised.tolist() == list(range(start, length))
        assert torch.equal(labels[row, start:length], ids[row, start:length])
        assert int(labels[row, length - 1]) == model.end_id
        reply = model.tokenizer.decode(ids[row, start : length - 1])
        codes = batch.actions[row][batch.action_mask[row]].numpy()
        assert reply == ", ".join(str(code.tolist()) for code in codes)
        prompt = model.tokenizer.decode(ids[row, :start])
        assert "What action should the robot take to" in prompt and "Gripper: [" in prompt
        lead = {"smolvlm": "<end_of_utterance>\nAssistant: ",
                "qwen2_5_vl": "<|im_end|>\n<|im_start|>assistant\n"}[family]  # fmt: skip
        assert prompt.endswith(lead)


def test_prompt_options_proprio_and_object_text(tiny):
    codes = XICMActionCodec().encode(np.r_[0.2, 0.0, 1.0, 0, 0, 0, 1, 1, 0])
    assert prompt_text("push the button.", codes, "{'button': [1, 2, 3]}") == (
        "What action should the robot take to push the button?\n"
        "Observation: {'button': [1, 2, 3]}\nGripper: " + str(codes.tolist())
    )
    model = policy(tiny, object_text=True, proprio=False)
    batch = make_batch(model.codec, size=2)
    with pytest.raises(VLAError, match="object_texts"):
        model.training_inputs(batch)
    batch.object_texts = ["{'button': [47, 52, 77]}", "{'drawer': [60, 40, 78]}"]
    texts = model.prompt_texts(batch.instructions, None, batch.object_texts)
    assert "Observation: {'drawer': [60, 40, 78]}" in texts[1] and "Gripper" not in texts[1]
    with pytest.raises(VLAError, match="the model needs \\['wrist'\\]"):
        model.training_inputs(make_batch(model.codec, cameras=("front", "overhead")))


# -- action formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("action_format", ["xicm_text", "token_bins"])
def test_codes_round_trip_through_the_reply(tiny, action_format, chunk):
    codec = XICMActionCodec() if action_format == "xicm_text" else token_codec()
    model = policy(tiny, codec=codec, action_format=action_format, chunk=chunk)
    batch = make_batch(codec, size=6, chunk=chunk, seed=chunk)
    for row in range(len(batch)):
        codes = batch.actions[row].numpy()
        ids = model.replies.reply_ids(codes)
        parsed = model.replies.parse(ids, chunk)
        assert parsed.parsed and parsed.valid.all()
        np.testing.assert_array_equal(parsed.codes, codes)
        # the decoded action equals the codec's decoding of the same codes
        actions = model._decode(parsed.codes, parsed.valid)
        np.testing.assert_allclose(actions, codec.decode(codes))
    if action_format == "xicm_text":
        text = model.replies.text(batch.actions[0].numpy())
        assert XICM_LIST.fullmatch(text.split("], ")[0] + "]" if chunk > 1 else text)


def test_text_parsing_range_checks_and_garbage():
    from agnostos.models.vla_replies import TextReplies

    replies = TextReplies(None, XICMActionCodec())
    good = replies.parse_text("[57, 49, 87, 0, 39, 0, 1], [61, 38, 80, 71, 70, 10, 0]", 2)
    assert good.parsed and good.valid.tolist() == [True, True]
    bad = replies.parse_text("[57, 49, 100, 0, 39, 0, 1], [61, 38, 80, 71, 72, 10, 0]", 2)
    assert not bad.parsed and bad.valid.tolist() == [False, False]
    short = replies.parse_text("[57, 49, 87, 0, 39, 0, 1]", 2)
    assert short.parsed and short.valid.tolist() == [True, False]
    junk = replies.parse_text("sure! [57, 49, 87, 0, 39, 0]", 1)
    assert not junk.parsed and not junk.valid.any()
    nested = replies.parse_text("[[57, 49, 87, 0, 39, 0, 2]]", 1)
    assert not nested.valid.any()  # gripper 2 is out of range


def test_token_bins_use_the_tail_of_the_vocabulary(tiny):
    codec = token_codec()
    model = policy(tiny, "smolvlm", codec=codec, action_format="token_bins")
    first = model.replies.first
    assert first + codec.bins == model.tokenizer.vocab_size
    assert not set(range(first, first + codec.bins)) & set(model.tokenizer.all_special_ids)
    parsed = model.replies.parse([first] * 8 + [5], 1)  # the 9th id is not a bin
    assert not parsed.parsed and not parsed.valid.any()
    with pytest.raises(VLAError, match="ordinary tokens"):
        policy(tiny, codec=TokenBinCodec(codec.stats, bins=5000), action_format="token_bins")


# -- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", BACKBONES)
def test_lora_trains_only_lora_weights_and_lowers_the_loss(tiny, family):
    torch.manual_seed(0)
    model = policy(tiny, family)
    model.apply_lora(r=8, alpha=16)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in name for name in names)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()
              if not p.requires_grad}  # fmt: skip
    batch = make_batch(model.codec, size=4)
    losses = train_steps(model, batch, 8)
    assert losses[-1] < losses[0] - 0.5
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    with pytest.raises(VLAError, match="already applied"):
        model.apply_lora()
    logits = logits_of(model, batch)
    accuracy = model.action_token_accuracy(logits, model.training_inputs(batch)["labels"])
    assert 0.0 <= float(accuracy) <= 1.0


def test_gradient_checkpointing_and_teacher_forced_decoding(tiny):
    torch.manual_seed(0)
    model = policy(tiny, chunk=2)
    model.apply_lora(r=4, alpha=8)
    model.enable_gradient_checkpointing()
    batch = make_batch(model.codec, size=3, chunk=2, mask=[[1, 1], [1, 0], [1, 1]])
    model.train()
    inputs = model.training_inputs(batch)
    out = model(**inputs)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # teacher forcing with the labels as "logits": decoding recovers the targets exactly
    labels = inputs["labels"]
    vocab = out.logits.shape[-1]
    perfect = torch.nn.functional.one_hot(labels.clamp_min(0).roll(-1, dims=1), vocab).float()
    actions, valid = model.decode_logits(perfect, labels)
    assert actions.shape == (3, 2, 9) and valid.tolist() == [[True, True], [True, False],
                                                             [True, True]]  # fmt: skip
    expected = model.codec.decode(batch.actions.numpy())
    np.testing.assert_allclose(actions[valid], expected[valid])
    assert np.isnan(actions[1, 1]).all()
    assert float(model.action_token_accuracy(perfect, labels)) == 1.0


# -- export ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_export(tiny, tmp_path_factory):
    torch.manual_seed(0)
    model = policy(tiny, chunk=2)
    model.apply_lora(r=8, alpha=16)
    batch = make_batch(model.codec, size=4, chunk=2, mask=[[1, 1], [1, 0], [1, 1], [1, 1]])
    train_steps(model, batch, 3)
    out = tmp_path_factory.mktemp("exports") / "adapter"
    model.save_export(out, {"data": {"tasks": ["push_button"]}, "settings": {"lr": 0.01}})
    return model, batch, out


def test_adapter_export_reloads_with_identical_logits(adapter_export):
    model, batch, out = adapter_export
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "vla.json", "README.md",
            "tokenizer.json", "preprocessor_config.json"} <= files  # fmt: skip
    assert "model.safetensors" not in files
    meta = json.loads((out / "vla.json").read_text())
    assert meta["weights"] == "adapter" and meta["backbone"] == "qwen2_5_vl"
    assert meta["inputs"]["chunk"] == 2 and meta["codec"]["name"] == "xicm"
    card = (out / "README.md").read_text()
    assert "push_button" in card and "qwen2_5_vl" in card and "LoRA: r=8" in card
    again = VLAPolicy.from_export(out)
    assert again.is_lora and again.inputs == model.inputs and again.codec == model.codec
    diff = (logits_of(again, batch) - logits_of(model, batch)).abs().max()
    assert float(diff) == 0.0


def test_export_refuses_another_base(adapter_export, tiny, tmp_path):
    _, _, out = adapter_export
    with pytest.raises(VLAError, match="another model"):
        VLAPolicy.from_export(out, base=tiny["smolvlm"])
    reseeded = build_tiny_vla(tmp_path / "seed1", "qwen2_5_vl", seed=1)
    with pytest.raises(VLAError, match=r"weights in .* differ"):
        VLAPolicy.from_export(out, base=reseeded)
    with pytest.raises(VLAError, match=r"no vla\.json"):
        VLAPolicy.from_export(tmp_path)
    with pytest.raises(VLAError, match=r"use VLAPolicy\.from_export"):
        VLAPolicy.from_base(out, codec=XICMActionCodec())
    # the same base loaded in bf16 is the same base (fingerprints round to bf16)
    assert VLAPolicy.from_export(out, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_merge_export_matches_the_adapter(adapter_export, tmp_path):
    model, batch, out = adapter_export
    merged = merge_export(out, tmp_path / "merged")
    meta = json.loads((merged / "vla.json").read_text())
    assert meta["weights"] == "full" and meta["card"]["merged_from"] == str(out.resolve())
    assert "model.safetensors" in os.listdir(merged)
    full = VLAPolicy.from_export(merged)
    assert not full.is_lora
    diff = (logits_of(full, batch) - logits_of(model, batch)).abs().max()
    assert float(diff) < 1e-5
    with pytest.raises(VLAError, match="full weights already"):
        merge_export(merged, tmp_path / "again")


def test_token_bins_export_needs_its_statistics(tiny, tmp_path):
    codec = token_codec()
    model = policy(tiny, "smolvlm", codec=codec, action_format="token_bins")
    out = model.save_export(tmp_path / "bins", {"data": "random"})
    assert "model.safetensors" in os.listdir(out)  # no LoRA: full weights
    again = VLAPolicy.from_export(out)
    assert again.codec == codec and again.backbone == "smolvlm"
    batch = make_batch(codec, size=2)
    assert float((logits_of(again, batch) - logits_of(model, batch)).abs().max()) == 0.0
    stats = out / "action_stats.json"
    stats.write_text(stats.read_text().replace('"q99"', '"q98"'))
    with pytest.raises(VLAError, match="changed since"):
        VLAPolicy.from_export(out)
    stats.unlink()
    with pytest.raises(VLAError, match=r"action_stats.json is missing"):
        VLAPolicy.from_export(out)


# -- inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "action_format"),
                         [("qwen2_5_vl", "xicm_text"), ("smolvlm", "token_bins")])  # fmt: skip
def test_predict_returns_chunks_and_valid_flags(tiny, family, action_format):
    codec = XICMActionCodec() if action_format == "xicm_text" else token_codec()
    model = policy(tiny, family, codec=codec, action_format=action_format, chunk=2)
    batch = make_batch(codec, size=3, chunk=2)
    model.train()
    result = model.predict(batch.images, batch.instructions, batch.proprio, max_new_tokens=8)
    assert isinstance(result, VLAPrediction)
    assert result.actions.shape == (3, 2, 9) and result.actions.dtype == np.float64
    assert result.valid.shape == (3, 2) and result.valid.dtype == bool
    assert len(result.texts) == len(result.parsed) == 3
    assert np.isfinite(result.actions[result.valid]).all()
    assert np.isnan(result.actions[~result.valid]).all()
    assert all(module.training for module in model.modules())  # modes restored
    with pytest.raises(VLAError, match="pass proprio"):
        model.predict(batch.images, batch.instructions)


def test_predict_parses_what_the_model_was_taught(tiny):
    """Overfit one fixed keyframe: greedy decoding then returns exactly that action."""
    torch.manual_seed(0)
    model = policy(tiny)
    model.apply_lora(r=16, alpha=32)
    batch = make_batch(model.codec, size=2)
    batch.actions[1] = batch.actions[0]
    train_steps(model, batch, 50)
    # a checkpoint's sampling defaults must not leak into greedy decoding
    model.model.get_base_model().generation_config.repetition_penalty = 50.0
    result = model.predict(batch.images, batch.instructions, batch.proprio)
    assert result.parsed == [True, True], result.texts
    expected = model.codec.decode(batch.actions[0].numpy())
    np.testing.assert_allclose(result.actions, np.stack([expected, expected]))  # left padded
    assert result.texts[0] == model.replies.text(batch.actions[0].numpy())
