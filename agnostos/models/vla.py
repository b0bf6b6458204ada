"""A vision-language-action policy: a HF vision-language backbone, a prompt and an action codec.

`VLAPolicy` wraps one of two HF-native backbone families (transformers 5), auto-detected from
the directory's `config.json` `model_type`:

* `qwen2_5_vl`: `Qwen2_5_VLForConditionalGeneration` (Qwen2.5-VL-3B/7B-Instruct), the
  backbone of the published AGNOSTOS/X-ICM Qwen2.5-VL baseline, of VLA-0 and NORA.
* `smolvlm`: `SmolVLMForConditionalGeneration` (SmolVLM2 256M/500M/2.2B; `idefics3`, the
  SmolVLM v1 checkpoints, loads the same way). Why this second family: it is the backbone of
  LeRobot's SmolVLA, so its users already have it; code and weights are Apache-2.0 (no
  gated licence, unlike PaliGemma 2's Gemma terms); it is a decoder-only chat model with
  multi-image input like Qwen (Florence-2 is an encoder-decoder without a chat template);
  and it is small. SmolVLM's pixel shuffle turns a 512 px image into 64 tokens (PaliGemma:
  256 at 224 px), so two cameras, the prompt and the reply stay near 200 tokens. LoRA on
  the 2.2B model holds 4.4 GB of bf16 weights, a few MB of adapter plus AdamW state, and
  activations of ~200-token sequences, which at batch 8 with gradient checkpointing fit a
  24 GB card (the 256M/500M sizes leave room for batch 32); Qwen2.5-VL-3B needs 7.5 GB of
  bf16 weights before activations, and 7B (16.6 GB) does not fit 24 GB with any batch.

The prompt (`vla_replies.py`) is the model's own chat template with one user turn (an
image per camera, then the instruction, optionally the X-ICM object-coordinate text and
the current gripper pose as X-ICM's 7 integers) and one assistant turn (the reply):
X-ICM's 7-integer lists as text (`xicm_text`) or one OpenVLA-style bin token per action
dimension (`token_bins`), then the template's end-of-reply token. The loss covers the reply
tokens and that end token only. Image inputs are built with the families' PIL image
processors, without torchvision (`vla_backbones.py`).

Exports (`save_export`) hold the peft adapter (or full weights), the tokenizer and image
processor, `vla.json` (backbone, base path with fingerprints of its config and weights,
inputs, action format, codec settings; token-bin statistics in `action_stats.json`) and a
README model card. `from_export` refuses an adapter whose base differs from the one it was
trained on; `merge_export` merges an adapter into its base on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agnostos.action_codecs import ActionCodec, TokenBinCodec, XICMActionCodec
from agnostos.atomic import atomic_write_bytes, atomic_write_json, replace_directory
from agnostos.models.vla_backbones import (
    BACKBONES,
    Backbone,
    ChatFrame,
    SmolVLMBackbone,
    VLAError,
    chat_frame,
    chat_template_of,
    config_digest,
    make_backbone,
    read_family,
    render_chat,
    resolve_model_dir,
)
from agnostos.models.vla_export import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    META_FILE,
    STATS_FILE,
    BaseInfo,
    codec_from_json,
    codec_to_json,
    model_card,
    quiet_peft,
    read_meta,
    sha256_file,
    weights_fingerprint,
)
from agnostos.models.vla_replies import BinReplies, Replies, TextReplies, prompt_text

__all__ = [
    "ACTION_FORMATS",
    "BACKBONES",
    "VLAError",
    "VLAInputs",
    "VLAPolicy",
    "VLAPrediction",
    "merge_export",
]

ACTION_FORMATS = ("xicm_text", "token_bins")
IGNORE = -100


@dataclass(frozen=True)
class VLAInputs:
    """What the prompt holds; saved with the export."""

    cameras: tuple[str, ...] = ("front", "wrist")
    image_size: int = 224  # camera images resized to this square first
    proprio: bool = True  # current gripper pose as X-ICM's 7 integers in the prompt
    object_text: bool = False  # X-ICM object-coordinate text in the prompt
    chunk: int = 1  # keyframes predicted per call
    # How the training data made these inputs, so an agent can make them the same way:
    # the cameras that placed the objects of the object text, and the square size the
    # datamodule resized camera images to before the policy resized them to image_size.
    object_text_cameras: tuple[str, ...] | None = None
    data_image_size: int | None = None
    object_names: str | None = None  # the benchmark whose object-name maps the text used

    def check(self) -> VLAInputs:
        if not self.cameras or not all(isinstance(c, str) and c for c in self.cameras):
            raise VLAError(f"VLA inputs need at least one camera name, got {self.cameras!r}")
        if len(set(self.cameras)) != len(self.cameras):
            raise VLAError(f"VLA inputs name a camera twice: {list(self.cameras)}")
        if self.image_size < 8:
            raise VLAError(f"VLA image_size must be >= 8, got {self.image_size}")
        if self.chunk < 1:
            raise VLAError(f"VLA chunk must be >= 1, got {self.chunk}")
        return self

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cameras"] = list(self.cameras)
        if self.object_text_cameras is not None:
            data["object_text_cameras"] = list(self.object_text_cameras)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VLAInputs:
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        for key in ("cameras", "object_text_cameras"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known).check()


@dataclass
class VLAPrediction:
    actions: np.ndarray  # B x chunk x 9 float64 RLBench actions (NaN where not valid)
    valid: np.ndarray  # B x chunk bool (False: keyframe missing / unparsable)
    texts: list[str]  # decoded reply per row
    parsed: list[bool]  # whole reply parsed


@dataclass
class _Batch:
    """Token ids of a batch before padding, and its pixel inputs."""

    ids: list[list[int]]
    labels: list[list[int]] | None
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            target = out[index, width - len(row) :] if left else out[index, : len(row)]
            target.copy_(torch.tensor(row, dtype=torch.long))
    return out


class VLAPolicy(torch.nn.Module):
    """A HF VLM backbone with a prompt format and an action codec (module docstring).

    Build with `from_base` (a model directory or a cached hub id) or `from_export`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        image_processor: Any,
        backbone: Backbone,
        codec: ActionCodec,
        action_format: str,
        inputs: VLAInputs,
        base: BaseInfo,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.backbone_adapter = backbone
        self.backbone = backbone.family
        self.codec = codec
        self.action_format = action_format
        self.inputs = inputs.check()
        self.base = base
        self.lora: dict[str, Any] | None = None
        self.chat_template = chat_template_of(tokenizer, backbone.directory)
        if isinstance(backbone, SmolVLMBackbone):
            backbone.configure_tokens(tokenizer)
        self.side = backbone.image_side(inputs.image_size)
        self.image_tokens = backbone.tokens_per_image(self.side)
        frame = chat_frame(tokenizer, self.chat_template, backbone.directory)
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        stops = tuple(dict.fromkeys([*frame.stop_ids, *(int(value) for value in extra)]))
        self.frame = ChatFrame(frame.lead, frame.end_id, stops)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            self.frame.end_id)  # fmt: skip
        self.replies = self._replies()
        self.pose_codec = codec if isinstance(codec, XICMActionCodec) else XICMActionCodec()

    # -- construction --------------------------------------------------------------------------

    @staticmethod
    def _check_format(codec: ActionCodec, action_format: str) -> None:
        if action_format not in ACTION_FORMATS:
            raise VLAError(f"action_format must be one of {ACTION_FORMATS}, not {action_format!r}")
        wanted = XICMActionCodec if action_format == "xicm_text" else TokenBinCodec
        if not isinstance(codec, wanted):
            raise VLAError(
                f"action_format {action_format} needs a {wanted.__name__}, got "
                f"{type(codec).__name__}"
            )

    @staticmethod
    def _load_model(backbone: Backbone, directory: Path, dtype: Any, attn: str | None) -> Any:
        # Read the weights into memory rather than mmap them: file-backed pages are dropped
        # under memory reclaim and faulted back in from disk, which made CPU steps of the
        # 135M SmolLM2 backbone vary from 3 s to 30 s (smolvlm_lm.py).
        kwargs: dict[str, Any] = {"disable_mmap": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn is not None:
            kwargs["attn_implementation"] = attn
        try:
            return backbone.model_class().from_pretrained(directory, **kwargs)
        except OSError as err:
            raise VLAError(f"{directory}: cannot load the model weights ({err})") from err

    @staticmethod
    def _load_text_and_images(backbone: Backbone, directory: Path) -> tuple[Any, Any]:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as err:
            raise VLAError(f"{directory}: cannot load the tokenizer ({err})") from err
        template = chat_template_of(tokenizer, directory)
        if template is not None:
            tokenizer.chat_template = template
        return tokenizer, backbone.load_image_processor(directory)

    @classmethod
    def from_base(
        cls,
        path: str | Path,
        *,
        codec: ActionCodec,
        action_format: str = "xicm_text",
        inputs: VLAInputs = VLAInputs(),
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
    ) -> VLAPolicy:
        """Load a base backbone (local directory or cached hub id) for fine-tuning."""
        cls._check_format(codec, action_format)
        inputs.check()
        directory = resolve_model_dir(path)
        if (directory / META_FILE).is_file():
            raise VLAError(f"{directory}: a VLA export, not a base; use VLAPolicy.from_export")
        backbone = make_backbone(directory)
        tokenizer, processor = cls._load_text_and_images(backbone, directory)
        model = cls._load_model(backbone, directory, dtype, attn_implementation)
        base = BaseInfo(str(directory), backbone.model_type, config_digest(directory),
                        weights_fingerprint(model))  # fmt: skip
        return cls(model, tokenizer, processor, backbone, codec, action_format, inputs, base)

    def _render(self, messages: list[dict[str, Any]], generation: bool) -> str:
        return render_chat(self.tokenizer, self.chat_template, messages, generation)

    def _replies(self) -> Replies:
        if self.action_format == "xicm_text":
            assert isinstance(self.codec, XICMActionCodec)
            return TextReplies(self.tokenizer, self.codec)
        assert isinstance(self.codec, TokenBinCodec)
        rows = self.model.get_input_embeddings().weight.shape[0]
        return BinReplies(self.tokenizer, self.codec, rows)

    # -- properties ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        for parameter in self.model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32

    @property
    def is_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def end_id(self) -> int:
        return self.frame.end_id

    # -- LoRA and memory -----------------------------------------------------------------------

    def apply_lora(
        self,
        r: int = 32,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
    ) -> None:
        """Wrap the backbone in a peft LoRA (OpenVLA's Gaussian init); only LoRA trains."""
        from peft import LoraConfig, get_peft_model

        if self.is_lora:
            raise VLAError("LoRA is already applied to this policy")
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=targets, init_lora_weights="gaussian")  # fmt: skip
        with quiet_peft():
            self.model = get_peft_model(self.model, config)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_("lora_" in name)
        self.lora = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets}

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (non-reentrant, so frozen inputs are fine; the
        input embeddings still require grad under peft, as its docs ask)."""
        model = self.model.get_base_model() if self.is_lora else self.model
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if self.is_lora:
            model.enable_input_require_grads()

    def merge_lora(self) -> None:
        """Merge the LoRA weights into the base in place (peft `merge_and_unload`)."""
        if not self.is_lora:
            raise VLAError("no LoRA adapter to merge")
        with quiet_peft():
            self.model = self.model.merge_and_unload()

    # -- inputs --------------------------------------------------------------------------------

    def _pixels(self, images: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        array = torch.as_tensor(images).detach().cpu()
        if array.ndim != 5 or array.shape[2] != 3:
            raise VLAError(f"images must be B x V x 3 x H x W, got {tuple(array.shape)}")
        if array.shape[1] != len(self.inputs.cameras):
            raise VLAError(f"images hold {array.shape[1]} cameras, the model reads "
                           f"{len(self.inputs.cameras)} ({list(self.inputs.cameras)})")  # fmt: skip
        count, views, _, height, width = array.shape
        if array.dtype != torch.uint8:
            array = array.float().clamp(0, 255).round().to(torch.uint8)
        if (height, width) != (self.side, self.side):
            flat = array.reshape(count * views, 3, height, width).float()
            flat = F.interpolate(flat, size=(self.side, self.side), mode="bilinear",
                                 antialias=True, align_corners=False)  # fmt: skip
            array = flat.round().clamp(0, 255).to(torch.uint8).reshape(
                count, views, 3, self.side, self.side)  # fmt: skip
        pixels = self.backbone_adapter.pixel_inputs(self.image_processor, array.numpy())
        pixels["pixel_values"] = pixels["pixel_values"].to(self.dtype)
        return pixels

    def _poses(self, proprio: torch.Tensor | np.ndarray | None, count: int) -> np.ndarray | None:
        if not self.inputs.proprio:
            return None
        if proprio is None:
            raise VLAError("this VLA puts the gripper pose in its prompt: pass proprio (B x 8)")
        values = np.asarray(torch.as_tensor(proprio).detach().cpu(), dtype=np.float64)
        if values.shape != (count, 8):
            raise VLAError(f"proprio must be B x 8 (xyz, quaternion xyzw, open), got "
                           f"{values.shape}")  # fmt: skip
        actions = np.concatenate([values, np.zeros((count, 1))], axis=1)
        return self.pose_codec.encode(actions)

    def prompt_texts(
        self,
        instructions: list[str],
        proprio: torch.Tensor | np.ndarray | None = None,
        object_texts: list[str] | None = None,
    ) -> list[str]:
        """The full prompt of each row (chat template, expanded image tokens)."""
        count = len(instructions)
        poses = self._poses(proprio, count)
        if self.inputs.object_text and (object_texts is None or len(object_texts) != count):
            raise VLAError(
                "this VLA puts the object-coordinate text in its prompt: pass object_texts "
                "(one per row; the datamodule's object_text=True)"
            )
        placeholder = self.backbone_adapter.placeholder
        expansion = self.backbone_adapter.expansion(self.image_tokens)
        views = len(self.inputs.cameras)
        texts = []
        for row, instruction in enumerate(instructions):
            line = prompt_text(
                instruction, None if poses is None else poses[row],
                object_texts[row] if self.inputs.object_text and object_texts else None,
            )  # fmt: skip
            if self.chat_template is None:
                rendered = placeholder * views + line
            else:
                content = [{"type": "image"} for _ in range(views)]
                content.append({"type": "text", "text": line})
                rendered = self._render([{"role": "user", "content": content}], True)
            parts = (rendered + self.frame.lead).split(placeholder)
            if len(parts) != views + 1:
                raise VLAError(f"the chat template rendered {len(parts) - 1} images for "
                               f"{views} cameras")  # fmt: skip
            texts.append(expansion.join(parts))
        return texts

    def _prompt_ids(self, instructions, proprio, object_texts) -> list[list[int]]:
        texts = self.prompt_texts(list(instructions), proprio, object_texts)
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _camera_images(self, batch: Any) -> torch.Tensor:
        names = list(batch.cameras)
        missing = [camera for camera in self.inputs.cameras if camera not in names]
        if missing:
            raise VLAError(f"the batch holds cameras {names}, the model needs {missing}")
        order = [names.index(camera) for camera in self.inputs.cameras]
        images = batch.images
        return images if order == list(range(len(names))) else images[:, order]

    def _assemble(self, batch: _Batch, left: bool) -> dict[str, torch.Tensor]:
        ids = _pad(batch.ids, self.pad_id, left)
        mask = _pad([[1] * len(row) for row in batch.ids], 0, left)
        out = {"input_ids": ids, "attention_mask": mask}
        if batch.labels is not None:
            out["labels"] = _pad(batch.labels, IGNORE, left)
        out.update(batch.pixels)
        out.update(self.backbone_adapter.text_inputs(ids))
        return out

    def training_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        """A `KeyframeBatch` -> model inputs with labels on the reply tokens only.

        Targets are the valid keyframes of each chunk (`action_mask`), so a chunk reply at the
        end of an episode is shorter; padding keyframes are not supervised.
        """
        chunk = self.inputs.chunk
        images = self._camera_images(batch)
        codes = torch.as_tensor(batch.actions).detach().cpu().numpy()
        valid = torch.as_tensor(batch.action_mask).detach().cpu().numpy().astype(bool)
        if codes.ndim != 3 or codes.shape[1] < chunk or codes.shape[2] != self.replies.code_size:
            raise VLAError(f"batch actions must be B x >={chunk} x {self.replies.code_size} "
                           f"codes, got {codes.shape}")  # fmt: skip
        prompts = self._prompt_ids(batch.instructions, batch.proprio,
                                   getattr(batch, "object_texts", None))  # fmt: skip
        ids, labels = [], []
        for row, prompt in enumerate(prompts):
            keep = codes[row, :chunk][valid[row, :chunk]]
            reply = [*self.replies.reply_ids(keep), self.end_id]
            ids.append(prompt + reply)
            labels.append([IGNORE] * len(prompt) + reply)
        pixels = self._pixels(images)
        return self._assemble(_Batch(ids, labels, pixels), left=False)

    # -- forward and metrics -------------------------------------------------------------------

    def forward(self, **inputs: Any) -> Any:
        inputs.setdefault("use_cache", False)
        return self.model(**inputs)

    def _reply_mask(self, labels: torch.Tensor) -> torch.Tensor:
        stops = torch.tensor(self.frame.stop_ids, device=labels.device)
        return (labels != IGNORE) & ~torch.isin(labels, stops)

    def action_token_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced argmax accuracy over the action tokens (the reply, not its end)."""
        predicted = logits[:, :-1].argmax(-1)
        target = labels[:, 1:].to(predicted.device)
        mask = self._reply_mask(target)
        correct = ((predicted == target) & mask).sum().float()
        return correct / mask.sum().clamp_min(1) if mask.any() else correct * float("nan")

    def _decode(self, codes: np.ndarray, valid: np.ndarray) -> np.ndarray:
        actions = self.codec.decode(codes)
        actions[~valid] = np.nan
        return actions

    def _replies_to_actions(self, replies: list[list[int]]):
        chunk = self.inputs.chunk
        parsed = [self.replies.parse(ids, chunk) for ids in replies]
        codes = np.stack([item.codes for item in parsed]) if parsed else np.zeros(
            (0, chunk, self.replies.code_size), dtype=np.int64)  # fmt: skip
        valid = np.stack([item.valid for item in parsed]) if parsed else np.zeros((0, chunk), bool)
        return self._decode(codes, valid), valid, parsed

    def _cut(self, ids: list[int]) -> list[int]:
        for position, value in enumerate(ids):
            if value in self.frame.stop_ids:
                return ids[:position]
        return ids

    def decode_logits(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced argmax at the reply positions -> (actions B x chunk x 9, valid)."""
        predicted = logits[:, :-1].argmax(-1).cpu().numpy()
        target = labels[:, 1:].cpu().numpy()
        rows = [self._cut(predicted[row][target[row] != IGNORE].tolist())
                for row in range(len(target))]  # fmt: skip
        actions, valid, _ = self._replies_to_actions(rows)
        return actions, valid

    # -- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor | np.ndarray,
        instructions: list[str],
        proprio: torch.Tensor | np.ndarray | None = None,
        object_texts: list[str] | None = None,
        max_new_tokens: int | None = None,
    ) -> VLAPrediction:
        """Greedy replies for a batch (left padded) -> keyframe actions and valid flags.

        images: B x V x 3 x H x W uint8 in `inputs.cameras` order; proprio: B x 8.
        """
        from transformers import GenerationConfig

        prompts = self._prompt_ids(list(instructions), proprio, object_texts)
        inputs = self._assemble(_Batch(prompts, None, self._pixels(images)), left=True)
        device = self.device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        # Greedy and nothing else: generate() fills every unset field from the checkpoint's
        # generation_config, and Qwen2.5-VL-Instruct's sets repetition_penalty=1.05, which
        # would penalise the repeated digits and commas of an action list.
        settings = GenerationConfig(
            max_new_tokens=max_new_tokens or self.replies.max_new_tokens(self.inputs.chunk),
            do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
            temperature=1.0, top_p=1.0, top_k=50, min_new_tokens=0, use_cache=True,
            eos_token_id=list(self.frame.stop_ids), pad_token_id=self.pad_id, bos_token_id=None,
        )  # fmt: skip
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            out = self.model.generate(**inputs, generation_config=settings)
        finally:
            for module, mode in modes:
                module.training = mode
        new = out[:, inputs["input_ids"].shape[1] :].cpu().tolist()
        replies = [self._cut(row) for row in new]
        actions, valid, parsed = self._replies_to_actions(replies)
        return VLAPrediction(actions, valid, [item.text for item in parsed],
                             [item.parsed for item in parsed])  # fmt: skip

    # -- export --------------------------------------------------------------------------------

    def export_meta(self, card: dict[str, Any]) -> dict[str, Any]:
        codec = codec_to_json(self.codec)
        return {
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "backbone": self.backbone,
            "model_type": self.base.model_type, "weights": "adapter" if self.is_lora else "full",
            "base": asdict(self.base), "inputs": self.inputs.to_json(),
            "action_format": self.action_format, "codec": codec, "lora": self.lora,
            "image_side": self.side, "image_tokens": self.image_tokens,
            "card": json.loads(json.dumps(card, default=str)),
        }  # fmt: skip

    def example(self) -> tuple[str, str]:
        """(user text, reply) of a made-up keyframe: what the model card shows."""
        home = np.array([[57, 49, 87, 0, 39, 0, 1]] * self.inputs.chunk)
        pose = home[0] if self.inputs.proprio else None
        objects = "{'button': [47, 52, 77]}" if self.inputs.object_text else None
        user = prompt_text("push the maroon button", pose, objects)
        if isinstance(self.replies, TextReplies):
            return user, self.replies.text(home)
        bins = np.arange(self.replies.code_size * self.inputs.chunk) % self.codec.bins
        ids = self.replies.reply_ids(bins)
        return user, self.replies.parse(ids, self.inputs.chunk).text

    def save_export(
        self,
        directory: str | Path,
        card: dict[str, Any],
        weights: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the export atomically (a complete folder or the previous one, never a mix).

        `weights` (keys as in `self.model.state_dict()`) are saved instead of the model's
        own: the trained weights gathered from FSDP shards, which this rank lacks."""
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            extra = {} if weights is None else {"state_dict": weights}
            self.model.save_pretrained(partial, **extra)
            self.tokenizer.save_pretrained(partial)
            self.image_processor.save_pretrained(partial)
            meta = self.export_meta(card)
            if isinstance(self.codec, TokenBinCodec):
                self.codec.stats.save(partial / STATS_FILE)
                meta["codec"]["stats_sha256"] = sha256_file(partial / STATS_FILE)
            atomic_write_json(partial / META_FILE, meta)
            card_text = model_card(meta, self.example())
            atomic_write_bytes(partial / "README.md", card_text.encode("utf-8"))
            replace_directory(partial, out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return out

    @classmethod
    def from_export(
        cls,
        directory: str | Path,
        *,
        base: str | Path | None = None,
        dtype: torch.dtype | None = None,
        merge: bool = False,
    ) -> VLAPolicy:
        """Reload an export: base + adapter (base defaults to the recorded path), or full
        weights (`base` is then ignored). `merge` merges the adapter after loading."""
        root = Path(directory)
        meta = read_meta(root)
        codec = codec_from_json(root, meta["codec"])
        inputs = VLAInputs.from_json(meta["inputs"])
        action_format = meta["action_format"]
        cls._check_format(codec, action_format)
        recorded = BaseInfo(**meta["base"])
        if meta["weights"] == "adapter":
            base_dir = resolve_model_dir(base if base is not None else recorded.path)
            if (base_dir / META_FILE).is_file():
                raise VLAError(f"{base_dir}: a VLA export, not the base of {root}")
            family, _ = read_family(base_dir)
            if family != meta["backbone"] or config_digest(base_dir) != recorded.config_sha256:
                raise VLAError(
                    f"{root}: the adapter was trained on {recorded.path} ({meta['backbone']}, "
                    f"config {recorded.config_sha256[:12]}); {base_dir} is another model"
                )
            backbone = make_backbone(base_dir)
            model = cls._load_model(backbone, base_dir, dtype, None)
            if weights_fingerprint(model) != recorded.weights_sha256:
                raise VLAError(
                    f"{root}: the adapter was trained on {recorded.path}; the weights in "
                    f"{base_dir} differ (same config, other checkpoint)"
                )
            from peft import PeftModel

            with quiet_peft():
                model = PeftModel.from_pretrained(model, root)
        else:
            backbone = make_backbone(root)
            model = cls._load_model(backbone, root, dtype, None)
        tokenizer, processor = cls._load_text_and_images(backbone, root)
        policy = cls(model, tokenizer, processor, backbone, codec, action_format, inputs, recorded)
        policy.lora = meta.get("lora") if meta["weights"] == "adapter" else None
        if merge and policy.is_lora:
            policy.merge_lora()
        return policy


def merge_export(directory: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Merge an adapter export into its base on the CPU and write a full-weights export."""
    source = Path(directory)
    meta = read_meta(source)
    if meta["weights"] != "adapter":
        raise VLAError(f"{source}: holds full weights already; nothing to merge")
    policy = VLAPolicy.from_export(source, base=base, merge=True)
    card = dict(meta.get("card") or {})
    card["merged_from"] = str(source.resolve())
    return policy.save_export(out, card)
