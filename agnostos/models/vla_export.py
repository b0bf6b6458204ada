"""Export folders of `VLAPolicy`: what `vla.json` records and how it is checked.

An export is a folder with the weights (a peft adapter, or a full model after merging or
when no LoRA was applied), the tokenizer and image processor, `vla.json` and a README model
card. `vla.json` records the backbone family and model type, the base directory with two
fingerprints (sha256 of its config.json without the keys a plain re-save changes, and of
its first input-embedding values, which LoRA never touches: the same config with other
weights is caught too), the prompt inputs, the action format and the codec settings. A
token-bin codec's `ActionStats` go to `action_stats.json`, whose sha256 is recorded, so a
missing, broken or edited statistics file is refused instead of silently decoding to other
actions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agnostos.action_codecs import ActionCodec, ActionStats, TokenBinCodec, XICMActionCodec
from agnostos.models.vla_backbones import VLAError

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "META_FILE",
    "STATS_FILE",
    "BaseInfo",
    "codec_from_json",
    "codec_to_json",
    "model_card",
    "quiet_peft",
    "read_meta",
    "sha256_file",
    "weights_fingerprint",
]

EXPORT_FORMAT = "agnostos-vla"
EXPORT_VERSION = 1
META_FILE = "vla.json"
STATS_FILE = "action_stats.json"
_FINGERPRINT_VALUES = 4096


@dataclass(frozen=True)
class BaseInfo:
    """Which base model the weights belong to (path and fingerprints)."""

    path: str
    model_type: str
    config_sha256: str
    weights_sha256: str


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning
    on every wrap); nothing for our users to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        yield


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the first input-embedding values rounded to bf16 (LoRA never touches them;
    the rounding makes a bf16 and an fp32 load of the same checkpoint agree)."""
    weight = model.get_input_embeddings().weight.detach()
    values = weight.reshape(-1)[:_FINGERPRINT_VALUES].to("cpu", torch.bfloat16)
    return hashlib.sha256(values.view(torch.int16).numpy().tobytes()).hexdigest()


def codec_to_json(codec: ActionCodec) -> dict[str, Any]:
    """A codec's name and settings (token-bin statistics go to their own file)."""
    if isinstance(codec, XICMActionCodec):
        return {"name": codec.name, "scene_bounds": list(codec.scene_bounds),
                "voxel_size": codec.voxel_size, "rotation_resolution": codec.rotation_resolution,
                "parity": codec.parity, "ignore_collisions": codec.ignore_collisions}  # fmt: skip
    if isinstance(codec, TokenBinCodec):
        return {"name": codec.name, "bins": codec.bins, "bounds": codec.bounds,
                "stats": STATS_FILE}  # fmt: skip
    raise VLAError(f"unsupported action codec {type(codec).__name__}")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def codec_from_json(directory: Path, data: dict[str, Any]) -> ActionCodec:
    name = data.get("name")
    if name == "xicm":
        return XICMActionCodec(
            scene_bounds=tuple(data["scene_bounds"]), voxel_size=int(data["voxel_size"]),
            rotation_resolution=int(data["rotation_resolution"]), parity=bool(data["parity"]),
            ignore_collisions=float(data["ignore_collisions"]),
        )  # fmt: skip
    if name == "token_bins":
        path = directory / data.get("stats", STATS_FILE)
        if not path.is_file():
            raise VLAError(f"{directory}: token_bins export without its codec statistics "
                           f"({path.name} is missing)")  # fmt: skip
        expected = data.get("stats_sha256")
        if expected is not None and sha256_file(path) != expected:
            raise VLAError(f"{path}: codec statistics changed since the export was written")
        try:
            stats = ActionStats.load(path)
        except ValueError as err:
            raise VLAError(f"{directory}: broken codec statistics: {err}") from err
        return TokenBinCodec(stats, int(data["bins"]), data["bounds"])
    raise VLAError(f"{directory}: unknown action codec {name!r} in {META_FILE}")


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not path.is_file():
        raise VLAError(f"{directory}: not a VLA export (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VLAError(f"{path}: unreadable ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise VLAError(f"{path}: not an {EXPORT_FORMAT} file")
    if meta.get("version") != EXPORT_VERSION:
        raise VLAError(f"{path}: export version {meta.get('version')} is not supported")
    missing = [key for key in ("backbone", "weights", "base", "inputs", "action_format",
                               "codec") if key not in meta]  # fmt: skip
    if missing:
        raise VLAError(f"{path}: missing {', '.join(missing)}")
    return meta


def model_card(meta: dict[str, Any], example: tuple[str, str] | None = None) -> str:
    """README.md of an export: base, data, settings, the prompt, and how to load it.

    `example` is (user text, reply) of one made-up keyframe, to show the format."""
    card = dict(meta.get("card") or {})
    lines = [
        f"# {card.pop('title', 'VLA fine-tuned on AGNOSTOS keyframes')}",
        "",
        f"- Backbone: {meta['backbone']} ({meta['model_type']})",
        f"- Base model: `{meta['base']['path']}` (config sha256 "
        f"{meta['base']['config_sha256'][:16]}...)",
        f"- Weights: {'peft LoRA adapter' if meta['weights'] == 'adapter' else 'full model'}",
        f"- Action format: {meta['action_format']} (codec {meta['codec']['name']})",
        f"- Inputs: cameras {', '.join(meta['inputs']['cameras'])} at "
        f"{meta['inputs']['image_size']} px (backbone side {meta.get('image_side')}), "
        f"proprio {meta['inputs']['proprio']}, object text {meta['inputs']['object_text']}, "
        f"chunk {meta['inputs']['chunk']}",
    ]
    if meta.get("lora"):
        lora = meta["lora"]
        lines.append(f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
                     f"targets {lora['target_modules']}")  # fmt: skip
    for key in ("base", "data", "settings"):
        if key in card:
            value = card.pop(key)
            lines += ["", f"## {key.capitalize()}", ""]
            if isinstance(value, str):
                lines.append(value)
            else:
                lines += ["```json", json.dumps(value, indent=2, default=str), "```"]
    if card:
        lines += ["", "## Details", "", "```json", json.dumps(card, indent=2, default=str), "```"]
    if example is not None:
        lines += ["", "## Prompt", "", "The chat template's user turn holds one image per camera, "
                  "then:", "", "```text", example[0], "```", "", "and the assistant turn, "
                  "before the end-of-reply token:", "", "```text", example[1], "```"]  # fmt: skip
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from agnostos.models.vla import VLAPolicy",
        "policy = VLAPolicy.from_export('<this folder>')  # base=... if the base moved",
        "```",
        "",
    ]
    return "\n".join(lines)
