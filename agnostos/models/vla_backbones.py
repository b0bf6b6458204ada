"""The backbone families `VLAPolicy` fine-tunes: loading, image inputs and the chat frame.

One `Backbone` per family hides what differs between them: the model class, the PIL image
processor (there is no torchvision here, so the stock processors, which need its video
processor, are never built), how many tokens one image takes and how its placeholder in
the chat text is expanded, and the extra inputs the forward pass wants:

* `qwen2_5_vl` (Qwen2.5-VL 3B/7B): `Qwen2VLImageProcessorPil` gives `pixel_values`
  (patches x features) and `image_grid_thw`; each `<|image_pad|>` of the chat text becomes
  grid_t * grid_h * grid_w / merge_size**2 copies (offline_recipes.md section 5), and
  `mm_token_type_ids` (1 on image tokens) lets the model compute its 3D (M-RoPE)
  positions; without it transformers 5 falls back to 1D positions silently.
* `smolvlm` (SmolVLM2 256M/500M/2.2B; also `idefics3`, SmolVLM v1): the SmolVLM/Idefics3
  PIL processor with image splitting off gives `pixel_values` (B x images x 3 x S x S)
  and `pixel_attention_mask`; each `<image>` becomes
  `<fake_token_around_image><global-img>` + (S / patch)**2 / scale_factor**2 `<image>`
  tokens + `<fake_token_around_image>`, as the stock processor writes a single image.

The square side S each camera image is resized to is the requested `image_size` rounded to
the family's grid (patch x merge for Qwen, patch x scale_factor for SmolVLM), so every image
fills whole merged tokens.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BACKBONES",
    "MODEL_TYPES",
    "Backbone",
    "ChatFrame",
    "VLAError",
    "chat_frame",
    "chat_template_of",
    "config_digest",
    "make_backbone",
    "read_family",
    "render_chat",
    "resolve_model_dir",
]

BACKBONES = ("qwen2_5_vl", "smolvlm")
# config.json model_type -> family
MODEL_TYPES: dict[str, str] = {"qwen2_5_vl": "qwen2_5_vl", "smolvlm": "smolvlm",
                               "idefics3": "smolvlm"}  # fmt: skip
# config keys that change when a model is merely re-saved, not when it is another model
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures",
     "use_cache", "_attn_implementation_autoset", "output_attentions", "output_hidden_states"}
)  # fmt: skip


class VLAError(ValueError):
    """A VLA setup problem, explained in one line (bad backbone dir, base mismatch, ...)."""


def _supported() -> str:
    return ", ".join(sorted(MODEL_TYPES))


def resolve_model_dir(path: str | Path) -> Path:
    """A local model directory, or the HF-cache snapshot of a hub id (never downloads)."""
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    text = str(path)
    if text.count("/") == 1 and not candidate.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # any failure means "not in the cache"
            pass
    raise VLAError(
        f"{path}: not a model directory (nor a hub id in the local HF cache); "
        f"supported model types: {_supported()}"
    )


def _read_config(directory: Path) -> dict[str, Any]:
    config = directory / "config.json"
    if not config.is_file():
        raise VLAError(
            f"{directory}: not a model directory (no config.json); supported model types: "
            f"{_supported()}"
        )
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise VLAError(f"{config}: unreadable model config ({err})") from err
    if not isinstance(data, dict):
        raise VLAError(f"{config}: unreadable model config (not a JSON object)")
    return data


def read_family(directory: str | Path) -> tuple[str, str]:
    """(family, model_type) of a model directory, from its config.json."""
    data = _read_config(Path(directory))
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        raise VLAError(
            f"{directory}: model type {model_type!r} is not supported; supported model "
            f"types: {_supported()}"
        )
    return MODEL_TYPES[model_type], model_type


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _stable(item) for key, item in value.items()
                if key not in _VOLATILE_CONFIG_KEYS}  # fmt: skip
    if isinstance(value, list):
        return [_stable(item) for item in value]
    return value


def config_digest(directory: str | Path) -> str:
    """sha256 of a model's config.json without the keys a plain re-save changes."""
    canonical = json.dumps(_stable(_read_config(Path(directory))), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChatFrame:
    """What the chat template puts around the assistant's reply.

    `lead` is the text between the generation prompt and the reply (SmolVLM's " " after
    "Assistant:"; empty for ChatML), appended to every prompt; `end_id` is the token that
    closes the reply (`<|im_end|>`, `<end_of_utterance>`), the last supervised token.
    """

    lead: str
    end_id: int
    stop_ids: tuple[int, ...]


class Backbone(ABC):
    """One family's loading and image handling (see the module docstring)."""

    family: str
    placeholder: str  # the image item the chat template renders

    def __init__(self, directory: Path, model_type: str, config: dict[str, Any]):
        self.directory = directory
        self.model_type = model_type
        self.config = config

    @abstractmethod
    def model_class(self) -> type: ...

    @abstractmethod
    def load_image_processor(self, directory: Path) -> Any: ...

    @abstractmethod
    def image_side(self, image_size: int) -> int: ...

    @abstractmethod
    def tokens_per_image(self, side: int) -> int: ...

    @abstractmethod
    def expansion(self, tokens: int) -> str: ...

    @abstractmethod
    def pixel_inputs(self, processor: Any, images: np.ndarray) -> dict[str, torch.Tensor]:
        """B x V x 3 x S x S uint8 -> the model's pixel inputs."""

    def text_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token inputs (Qwen's modality types); none by default."""
        return {}

    def image_token_id(self) -> int:
        value = self.config.get("image_token_id", self.config.get("image_token_index"))
        if not isinstance(value, int):
            raise VLAError(f"{self.directory}: config.json has no image_token_id")
        return value


def _load_processor(cls: type, directory: Path) -> Any:
    if not (directory / "preprocessor_config.json").is_file():
        raise VLAError(f"{directory}: no preprocessor_config.json (image processor settings)")
    return cls.from_pretrained(directory)


def _channels_first(images: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(image) for image in images]


class QwenBackbone(Backbone):
    family = "qwen2_5_vl"
    placeholder = "<|image_pad|>"

    def model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def load_image_processor(self, directory: Path) -> Any:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        processor = _load_processor(Qwen2VLImageProcessorPil, directory)
        vision = self.config.get("vision_config", {})
        for key, name in (("patch_size", "patch_size"), ("spatial_merge_size", "merge_size"),
                          ("temporal_patch_size", "temporal_patch_size")):  # fmt: skip
            expected = vision.get(key)
            if expected is not None and getattr(processor, name) != expected:
                raise VLAError(
                    f"{directory}: preprocessor {name} {getattr(processor, name)} differs from "
                    f"the vision tower's {key} {expected}"
                )
        self.patch, self.merge = int(processor.patch_size), int(processor.merge_size)
        return processor

    def image_side(self, image_size: int) -> int:
        factor = self.patch * self.merge
        return max(1, round(image_size / factor)) * factor

    def tokens_per_image(self, side: int) -> int:
        return (side // self.patch) ** 2 // self.merge**2

    def expansion(self, tokens: int) -> str:
        return self.placeholder * tokens

    def pixel_inputs(self, processor: Any, images: np.ndarray) -> dict[str, torch.Tensor]:
        flat = images.reshape(-1, *images.shape[2:])
        out = processor(
            images=_channels_first(flat), do_resize=False, return_tensors="pt",
            input_data_format="channels_first",
        )  # fmt: skip
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def text_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (input_ids == self.image_token_id()).long()}


class SmolVLMBackbone(Backbone):
    family = "smolvlm"
    placeholder = "<image>"

    def model_class(self) -> type:
        if self.model_type == "idefics3":
            from transformers import Idefics3ForConditionalGeneration

            return Idefics3ForConditionalGeneration
        from transformers import SmolVLMForConditionalGeneration

        return SmolVLMForConditionalGeneration

    def load_image_processor(self, directory: Path) -> Any:
        if self.model_type == "idefics3":
            from transformers.models.idefics3.image_processing_pil_idefics3 import (
                Idefics3ImageProcessorPil as cls,
            )
        else:
            from transformers.models.smolvlm.image_processing_pil_smolvlm import (
                SmolVLMImageProcessorPil as cls,
            )
        processor = _load_processor(cls, directory)
        vision = self.config.get("vision_config", {})
        self.patch = int(vision.get("patch_size", 14))
        self.scale = int(self.config.get("scale_factor", 2))
        return processor

    def image_side(self, image_size: int) -> int:
        grid = max(1, round(image_size / (self.patch * self.scale))) * self.scale
        return grid * self.patch

    def tokens_per_image(self, side: int) -> int:
        return (side // self.patch) ** 2 // self.scale**2

    def configure_tokens(self, tokenizer: Any) -> None:
        """The wrapper tokens of an image, as the stock processor names them."""
        vocab = tokenizer.get_vocab()
        self.fake = getattr(tokenizer, "fake_image_token", None) or "<fake_token_around_image>"
        self.global_image = getattr(tokenizer, "global_image_token", None) or "<global-img>"
        if self.fake not in vocab:
            raise VLAError(f"{self.directory}: the tokenizer has no {self.fake} token")
        if self.global_image not in vocab:
            self.global_image = ""  # Idefics3 checkpoints without a global-image token

    def expansion(self, tokens: int) -> str:
        return self.fake + self.global_image + self.placeholder * tokens + self.fake

    def pixel_inputs(self, processor: Any, images: np.ndarray) -> dict[str, torch.Tensor]:
        side = int(images.shape[-1])
        nested = [_channels_first(row) for row in images]
        out = processor(
            images=nested, do_resize=False, do_image_splitting=False,
            max_image_size={"longest_edge": side}, return_tensors="pt",
            input_data_format="channels_first",
        )  # fmt: skip
        return {
            "pixel_values": out["pixel_values"],
            "pixel_attention_mask": out["pixel_attention_mask"].bool(),
        }


def make_backbone(directory: Path) -> Backbone:
    """The `Backbone` of a model directory (auto-detected from config.json's model_type)."""
    family, model_type = read_family(directory)
    config = _read_config(directory)
    cls = QwenBackbone if family == "qwen2_5_vl" else SmolVLMBackbone
    return cls(directory, model_type, config)


def chat_template_of(tokenizer: Any, directory: Path) -> str | None:
    """The tokenizer's chat template, or the processor's (chat_template.jinja/.json)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    stored = directory / "chat_template.json"
    if stored.is_file():
        try:
            return json.loads(stored.read_text()).get("chat_template")
        except (OSError, ValueError):
            return None
    return None


def render_chat(
    tokenizer: Any, template: str | None, messages: list[dict[str, Any]], generation: bool
) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation, chat_template=template
    )


def chat_frame(tokenizer: Any, template: str | None, directory: Path) -> ChatFrame:
    """Where the template puts the reply: render a user turn once as a generation prompt
    and once followed by an assistant turn with a sentinel reply, and compare."""
    eos = tokenizer.eos_token_id
    if template is None:  # plain prompt, the reply ends with EOS
        if eos is None:
            raise VLAError(f"{directory}: no chat template and no EOS token")
        return ChatFrame(lead="\n", end_id=int(eos), stop_ids=(int(eos),))
    user = [{"role": "user", "content": [{"type": "text", "text": "\x00U"}]}]
    reply = [{"role": "assistant", "content": [{"type": "text", "text": "\x00R"}]}]
    prompt = render_chat(tokenizer, template, user, True)
    full = render_chat(tokenizer, template, user + reply, False)
    if not full.startswith(prompt) or "\x00R" not in full[len(prompt) :]:
        raise VLAError(
            f"{directory}: the chat template's assistant turn does not continue its "
            "generation prompt"
        )
    start = full.index("\x00R", len(prompt))
    tail = full[start + 2 :]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    if tail_ids and tail_ids[0] in special:
        end = int(tail_ids[0])
    elif eos is not None:
        end = int(eos)
    else:
        raise VLAError(f"{directory}: cannot tell the chat template's end-of-reply token")
    stops = [end] + [int(eos)] * (eos is not None)
    return ChatFrame(full[len(prompt) : start], end, tuple(dict.fromkeys(stops)))
