"""A build's partial state in `<out>/.bank-partial/`, which is what makes it resumable.

`build.json` holds the build's fingerprint; each finished chunk of demos is one safetensors
file, written atomically, carrying the build's fingerprint and the chunk's records in its
metadata. A rerun keeps the gap-free prefix of finished chunks (dropping any `.tmp` left by
a write killed before its rename) and refuses chunks or a finished bank from a build with
another fingerprint, so two builds are never mixed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from agnostos.atomic import TMP_SUFFIX, atomic_write_bytes, atomic_write_json
from agnostos.evaluation.bank.model import BatchFeatures
from agnostos.evaluation.bank.records import BANK_JSON, BankError, DemoRecord
from agnostos.evaluation.bank.store import DemoBank

PARTIAL_DIR = ".bank-partial"
BUILD_STATE = "build.json"


def chunk_path(partial: Path, number: int) -> Path:
    return partial / f"chunk-{number:05d}.safetensors"


def _write_chunk(
    partial: Path,
    number: int,
    fingerprint: str,
    records: Sequence[DemoRecord],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    from safetensors.torch import save as save_tensors

    metadata = {
        "fingerprint": fingerprint,
        "chunk": str(number),
        "records": json.dumps([r.to_json() for r in records], sort_keys=True),
    }
    atomic_write_bytes(chunk_path(partial, number), save_tensors(dict(tensors), metadata))


def read_chunk(path: Path, fingerprint: str) -> tuple[list[DemoRecord], dict[str, torch.Tensor]]:
    from safetensors.torch import load as load_tensors
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_tensors(path.read_bytes())
    except Exception as error:
        raise BankError(f"{path}: unreadable chunk ({error})") from None
    if metadata.get("fingerprint") != fingerprint:
        raise BankError(f"{path}: chunk from another build (fingerprint differs)")
    items = json.loads(metadata["records"])
    records = [DemoRecord.from_json(item, f"{path}: records[{n}]") for n, item in enumerate(items)]
    return records, tensors


def done_chunks(partial: Path) -> list[Path]:
    """The finished chunks of a build: a gap-free prefix, all full but maybe the last."""
    for leftover in partial.glob("*" + TMP_SUFFIX):
        leftover.unlink()  # a write killed before its rename
    done: list[Path] = []
    while chunk_path(partial, len(done)).is_file():
        done.append(chunk_path(partial, len(done)))
    return done


def build_state(out: Path, fingerprint: str, identity_json: Mapping[str, Any]) -> Path:
    """Create or check `<out>/.bank-partial/build.json`; returns the partial folder."""
    partial = out / PARTIAL_DIR
    state_path = partial / BUILD_STATE
    if state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            raise BankError(
                f"{state_path}: {out} holds an unfinished bank build with other options, "
                f"model or shards; delete {partial} or choose another output folder"
            )
        return partial
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path, {"fingerprint": fingerprint, "build": identity_json})
    return partial


def check_complete(out: Path, fingerprint: str) -> DemoBank | None:
    """The finished bank in `out` if it is this build's; an error if it is another's."""
    if not (out / BANK_JSON).is_file():
        return None
    bank = DemoBank.load(out)
    if bank.build_fingerprint != fingerprint:
        raise BankError(
            f"{out / BANK_JSON}: {out} already holds a bank built with other options, model "
            "or shards; choose another output folder"
        )
    return bank


class ChunkWriter:
    """Collects one chunk's records and batch outputs, then writes them atomically."""

    def __init__(self, partial: Path, fingerprint: str, number: int) -> None:
        self.partial, self.fingerprint, self.number = partial, fingerprint, number
        self.records: list[DemoRecord] = []
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, records: Sequence[DemoRecord], features: BatchFeatures) -> None:
        self.records.extend(records)
        for name, tensor in features.tensors().items():
            self.parts.setdefault(name, []).append(tensor)

    def write(self) -> int:
        tensors = {name: torch.cat(parts) for name, parts in self.parts.items()}
        _write_chunk(self.partial, self.number, self.fingerprint, self.records, tensors)
        return len(self.records)
