"""What a bank is made of: its file names and format version, the records stored in
`bank.json`, and the hashes that tie a bank's files to each other and to its model.

These are the bank's on-disk vocabulary. The store (reading and writing a bank folder), the
X-ICM pickle import and the builder all speak it, so it lives below them with no heavier
dependency than the demo-text format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agnostos.models.dynamics_diffusion import SamplingConfig
from agnostos.observation_text import DemoText, format_actions

BANK_FORMAT = "agnostos-demo-bank"
# 2: demo text from PyRep-exact float64 point clouds and each frame's own handle names
# (version 1 text could differ by a voxel); version 1 banks are refused with "rebuild".
BANK_VERSION = 2
BANK_JSON = "bank.json"
FEATURES_FILE = "features.safetensors"
IMAGES_DIR = "images"
# Tensor names in features.safetensors; the REQUIRED ones are in every bank.
REQUIRED_TENSORS: tuple[str, ...] = ("output_latents", "prompt_bos")
OPTIONAL_TENSORS: tuple[str, ...] = ("input_latents", "prompt_pooled")
TENSOR_NAMES: tuple[str, ...] = ("input_latents", "output_latents", "prompt_bos", "prompt_pooled")


class BankError(ValueError):
    """A bank file, build folder or input is unusable; the message names the file or key."""


def _demo_text_json(text: DemoText | None) -> dict[str, str] | None:
    """Actions are stored as X-ICM prints them (a JSON-compatible string), one line each."""
    if text is None:
        return None
    return {"observation": text.observation, "actions": format_actions(text.actions)}


def _demo_text_from_json(data: Mapping[str, Any] | None, where: str) -> DemoText | None:
    if data is None:
        return None
    try:
        actions = json.loads(data["actions"])
        return DemoText(
            observation=str(data["observation"]),
            actions=tuple(tuple(int(value) for value in action) for action in actions),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise BankError(f"{where}: invalid demo_text ({type(error).__name__}: {error})") from None


@dataclass(frozen=True)
class DemoRecord:
    """One bank entry's metadata.

    id: the shard sample key `<task>/<variation folder>/episode<N>` (unique in a bank).
    source: the episode folder relative to the dataset root (RLBench layout).
    shard: the shard URL the demo was read from (None for an imported pickle).
    seed: the diffusion seed of this demo (None when imported).
    demo_text: frame-0 observation + keyframe actions, or None with `demo_text_error`.
    image: the decoded predicted future frame, relative to the bank folder, if saved.
    xicm_path: the path an imported X-ICM pickle gave this demo (kept for re-export).
    """

    id: str
    task: str
    episode: int
    variation: int | None
    variation_folder: str
    instruction: str | None
    source: str
    shard: str | None = None
    seed: int | None = None
    demo_text: DemoText | None = None
    demo_text_error: str | None = None
    image: str | None = None
    xicm_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["demo_text"] = _demo_text_json(self.demo_text)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> DemoRecord:
        try:
            return cls(
                id=str(data["id"]),
                task=str(data["task"]),
                episode=int(data["episode"]),
                variation=None if data["variation"] is None else int(data["variation"]),
                variation_folder=str(data["variation_folder"]),
                instruction=data["instruction"],
                source=str(data["source"]),
                shard=data.get("shard"),
                seed=data.get("seed"),
                demo_text=_demo_text_from_json(data.get("demo_text"), where),
                demo_text_error=data.get("demo_text_error"),
                image=data.get("image"),
                xicm_path=data.get("xicm_path"),
            )
        except KeyError as error:
            raise BankError(f"{where}: demo record lacks key {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            if isinstance(error, BankError):
                raise
            raise BankError(f"{where}: invalid demo record ({error})") from None


@dataclass(frozen=True)
class ModelIdentity:
    """Which dynamics model made the features: paths and a hash of the UNet folder."""

    base: str | None
    unet: str | None
    unet_sha256: str | None
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelIdentity:
        return cls(
            base=data.get("base"),
            unet=data.get("unet"),
            unet_sha256=data.get("unet_sha256"),
            description=data.get("description", ""),
        )


@dataclass(frozen=True)
class ExtractionSettings:
    """How each demo's features were computed (what a query must match for parity)."""

    sampling: SamplingConfig
    seed: int
    camera: str
    frame: int
    resolution: int
    dtype: str
    instruction: str = "descriptions[0]"
    seed_rule: str = "derive_seed(task, episode, seed)"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["sampling"] = asdict(self.sampling)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExtractionSettings:
        return cls(
            sampling=SamplingConfig(**data["sampling"]),
            seed=int(data["seed"]),
            camera=str(data["camera"]),
            frame=int(data["frame"]),
            resolution=int(data["resolution"]),
            dtype=str(data["dtype"]),
            instruction=str(data.get("instruction", "descriptions[0]")),
            seed_rule=str(data.get("seed_rule", "derive_seed(task, episode, seed)")),
        )


# --------------------------------------------------------------------------- hashing


def _sha256_file(path: Path, digest: Any | None = None) -> Any:
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest


def folder_sha256(folder: Path) -> str:
    """SHA-256 over every file's relative name, size and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        _sha256_file(path, digest)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """SHA-256 of canonical JSON (sorted keys, no spaces), so equal values hash equal."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
