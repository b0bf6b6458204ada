"""`DemoBank`: a bank's records and stacked features, saved as one versioned folder.

A folder holds `features.safetensors` (one row per demo, in bank order) and `bank.json`
(format version, model identity, extraction settings, one record per demo), plus the
decoded predictions under `images/` when they were saved. bank.json is written last and
carries the SHA-256 of the features file, so a reader never pairs metadata with features
from another save; loading checks the format, the version, that hash and every tensor's
shape, and names the file and key at fault.

The bank also converts to the rankers' flat `RankingBank` and to and from X-ICM's published
pickle layout (the conversion itself lives in `xicm_pickle`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agnostos import __version__
from agnostos.atomic import atomic_write_bytes, atomic_write_json
from agnostos.evaluation.bank import xicm_pickle
from agnostos.evaluation.bank.records import (
    BANK_FORMAT,
    BANK_JSON,
    BANK_VERSION,
    FEATURES_FILE,
    OPTIONAL_TENSORS,
    REQUIRED_TENSORS,
    TENSOR_NAMES,
    BankError,
    DemoRecord,
    ExtractionSettings,
    ModelIdentity,
)
from agnostos.evaluation.rankers import RankingBank
from agnostos.observation_text import DemoText


def _rows(name: str, tensor: torch.Tensor, size: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.as_tensor(np.asarray(tensor))
    if tensor.ndim < 1 or tensor.shape[0] != size:
        raise BankError(f"{name} has shape {tuple(tensor.shape)}; expected {size} rows")
    return tensor.detach().to("cpu").contiguous()


@dataclass(eq=False)
class DemoBank:
    """Demo records plus their stacked features (row i belongs to `records[i]`).

    `origin` is "built" (by `build_bank`) or "xicm_pkl" (imported). `root` is the folder
    the bank was loaded from (image paths are relative to it); it is not saved.
    """

    records: tuple[DemoRecord, ...]
    output_latents: torch.Tensor
    prompt_bos: torch.Tensor
    input_latents: torch.Tensor | None = None
    prompt_pooled: torch.Tensor | None = None
    model: ModelIdentity | None = None
    extraction: ExtractionSettings | None = None
    demo_text_options: Mapping[str, Any] | None = None
    origin: str = "built"
    build_fingerprint: str | None = None
    created_by: str = f"agnostos {__version__}"
    root: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.records = tuple(self.records)
        size = len(self.records)
        counts = Counter(record.id for record in self.records)
        repeated = sorted(key for key, count in counts.items() if count > 1)
        if repeated:
            raise BankError(f"bank demo ids must be unique; repeated: {repeated[:5]}")
        self.output_latents = _rows("output_latents", self.output_latents, size)
        self.prompt_bos = _rows("prompt_bos", self.prompt_bos, size)
        for name in OPTIONAL_TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _rows(name, value, size))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(record.id for record in self.records)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(record.task for record in self.records)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (absent optional ones left out)."""
        named = {name: getattr(self, name) for name in TENSOR_NAMES}
        return {name: value for name, value in named.items() if value is not None}

    def record(self, demo_id: str) -> DemoRecord:
        for record in self.records:
            if record.id == demo_id:
                return record
        raise KeyError(f"no demo {demo_id!r} in the bank ({len(self)} demos)")

    def demo_text(self, demo_id: str) -> DemoText:
        """The precomputed demo text of one demo; the error says why it is missing."""
        record = self.record(demo_id)
        if record.demo_text is None:
            reason = record.demo_text_error or "not computed"
            raise BankError(f"demo {demo_id!r} has no demo text: {reason}")
        return record.demo_text

    # ---------------------------------------------------------------- ranking

    def to_ranking_bank(self) -> RankingBank:
        """Flattened features for the rankers: ids are the demo ids, BOS as X-ICM's
        `all_prompt_feats`, the pooled text embedding as `text_embeddings`."""
        pooled = self.prompt_pooled
        return RankingBank(
            ids=self.ids,
            tasks=self.tasks,
            output_latents=self.output_latents.reshape(len(self), -1).numpy(),
            prompt_bos=self.prompt_bos.reshape(len(self), -1).numpy(),
            text_embeddings=None if pooled is None else pooled.reshape(len(self), -1).numpy(),
        )

    # ---------------------------------------------------------------- save / load

    def to_json(self, features_sha256: str) -> dict[str, Any]:
        return {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "created_by": self.created_by,
            "origin": self.origin,
            "build_fingerprint": self.build_fingerprint,
            "model": None if self.model is None else self.model.to_json(),
            "extraction": None if self.extraction is None else self.extraction.to_json(),
            "demo_text_options": None
            if self.demo_text_options is None
            else dict(self.demo_text_options),
            "features": {
                "file": FEATURES_FILE,
                "sha256": features_sha256,
                "tensors": {
                    name: {
                        "dtype": str(value.dtype).removeprefix("torch."),
                        "shape": list(value.shape),
                    }
                    for name, value in self.tensors().items()
                },
            },
            "demos": [record.to_json() for record in self.records],
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `features.safetensors` then `bank.json` (each atomically) into `directory`.

        bank.json goes last and carries the features' SHA-256, so a reader never pairs
        it with features from another save. Saved images are copied along when the bank
        was loaded from another folder.
        """
        from safetensors.torch import save as save_tensors

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._copy_images(out)
        blob = save_tensors(self.tensors(), metadata={"format": BANK_FORMAT})
        atomic_write_bytes(out / FEATURES_FILE, blob)
        atomic_write_json(out / BANK_JSON, self.to_json(hashlib.sha256(blob).hexdigest()))
        self.root = out
        return out

    def _copy_images(self, out: Path) -> None:
        if self.root is None or self.root.resolve() == out.resolve():
            return
        for record in self.records:
            if record.image is not None:
                target = out / record.image
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.root / record.image, target)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DemoBank:
        """Read a bank folder, checking format, version, the features hash and shapes."""
        folder = Path(directory)
        meta_path = folder / BANK_JSON
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{meta_path}: no demo bank here (missing {BANK_JSON})"
            ) from None
        except json.JSONDecodeError as error:
            raise BankError(f"{meta_path}: invalid JSON ({error})") from None
        _check_format(meta, meta_path)
        try:
            tensors = _load_features(folder, meta["features"], meta_path)
            records = tuple(
                DemoRecord.from_json(item, f"{meta_path}: demos[{number}]")
                for number, item in enumerate(meta["demos"])
            )
            bank = cls(
                records=records,
                output_latents=tensors["output_latents"],
                prompt_bos=tensors["prompt_bos"],
                input_latents=tensors.get("input_latents"),
                prompt_pooled=tensors.get("prompt_pooled"),
                model=None if meta["model"] is None else ModelIdentity.from_json(meta["model"]),
                extraction=None
                if meta["extraction"] is None
                else ExtractionSettings.from_json(meta["extraction"]),
                demo_text_options=meta.get("demo_text_options"),
                origin=str(meta["origin"]),
                build_fingerprint=meta.get("build_fingerprint"),
                created_by=str(meta.get("created_by", "")),
                root=folder,
            )
        except KeyError as error:
            raise BankError(f"{meta_path}: missing key {error.args[0]!r}") from None
        except BankError as error:
            message = str(error)
            raise BankError(
                message if str(meta_path) in message else f"{meta_path}: {message}"
            ) from None
        return bank

    # ---------------------------------------------------------------- X-ICM pickle

    def xicm_paths(self, root: str | None = None) -> list[str]:
        """X-ICM bank paths: an imported demo keeps its original path unless `root` is
        given; a built one becomes `<root or XICM_ROOT>/<source>`."""
        return xicm_pickle.xicm_paths(self.records, root)

    def to_xicm_features(self, root: str | None = None) -> dict[str, Any]:
        """The published pickle's dict: paths plus flattened numpy feature matrices."""
        if self.input_latents is None:
            raise BankError(
                "this bank has no input_latents; X-ICM's pickle needs all_input_image_feats"
            )
        size = len(self)
        return {
            "all_demo_paths": self.xicm_paths(root),
            "all_input_image_feats": self.input_latents.reshape(size, -1).numpy(),
            "all_output_image_feats": self.output_latents.reshape(size, -1).numpy(),
            "all_prompt_feats": self.prompt_bos.reshape(size, -1).numpy(),
        }

    def export_xicm_pkl(self, path: str | os.PathLike[str], root: str | None = None) -> Path:
        """Write `all_diffusion_features.pkl` (protocol 4, numpy-1 global names, so X-ICM's
        numpy-1 environment and numpy 2 both read it), atomically."""
        return xicm_pickle.write_xicm_pickle(path, self.to_xicm_features(root))

    @classmethod
    def from_xicm_features(cls, features: Mapping[str, Any], where: str = "<dict>") -> DemoBank:
        """A bank from the published dict; demo text, instructions and variations are
        unknown (the pickle holds only paths and features)."""
        xicm_pickle.check_xicm_keys(features, where)
        paths = [str(path) for path in features["all_demo_paths"]]
        records = xicm_pickle.xicm_records(paths, where)
        size = len(records)
        has_input = "all_input_image_feats" in features
        return cls(
            records=tuple(records),
            output_latents=xicm_pickle.xicm_matrix(features, "all_output_image_feats", size, where),
            prompt_bos=xicm_pickle.xicm_matrix(features, "all_prompt_feats", size, where),
            input_latents=xicm_pickle.xicm_matrix(features, "all_input_image_feats", size, where)
            if has_input
            else None,
            origin="xicm_pkl",
        )

    @classmethod
    def import_xicm_pkl(cls, path: str | os.PathLike[str]) -> DemoBank:
        """Read the published `all_diffusion_features.pkl` (allowlist unpickler)."""
        return cls.from_xicm_features(xicm_pickle.load_xicm_pickle(path), str(path))


def _check_format(meta: Any, meta_path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != BANK_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BankError(f"{meta_path}: not an agnostos demo bank (format {found!r})")
    if meta.get("version") != BANK_VERSION:
        raise BankError(
            f"{meta_path}: bank format version {meta.get('version')!r}; this agnostos "
            f"({__version__}) reads version {BANK_VERSION}. Rebuild the bank or use a "
            "matching agnostos"
        )


def _load_features(
    folder: Path, spec: Mapping[str, Any], meta_path: Path
) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_tensors

    path = folder / spec.get("file", FEATURES_FILE)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise BankError(f"{path}: missing (listed in {meta_path})") from None
    if hashlib.sha256(blob).hexdigest() != spec["sha256"]:
        raise BankError(
            f"{path}: SHA-256 differs from the one recorded in {meta_path}; the two files "
            "come from different saves"
        )
    try:
        tensors = load_tensors(blob)
    except Exception as error:
        raise BankError(f"{path}: unreadable safetensors ({error})") from None
    expected = spec["tensors"]
    for name in REQUIRED_TENSORS:
        if name not in expected:
            raise BankError(f"{meta_path}: features.tensors lacks required key {name!r}")
    for name, info in expected.items():
        if name not in tensors:
            raise BankError(f"{path}: missing tensor {name!r} (listed in {meta_path})")
        shape, dtype = list(tensors[name].shape), str(tensors[name].dtype).removeprefix("torch.")
        if shape != list(info["shape"]) or dtype != info["dtype"]:
            raise BankError(
                f"{path}: tensor {name!r} is {dtype} {shape}; {meta_path} records "
                f"{info['dtype']} {info['shape']}"
            )
    return {name: tensors[name] for name in expected}
