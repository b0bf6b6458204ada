"""X-ICM's published bank layout, `all_diffusion_features.pkl`, read and written.

The published code loads a pickled dict with `all_demo_paths` (M strings
`<root>/<task>/all_variations/episodes/episode<N>`), `all_input_image_feats`,
`all_output_image_feats` and `all_prompt_feats` (M×1024 arrays each). `DemoBank` imports
and exports that layout through the functions here, so the parity bank can be ranked by
agnostos and an agnostos bank can be dropped into X-ICM.

Unpickling runs code named by the file, and a downloaded bank must not be able to reach
`os.system` or any other global: the file is read through the shards layer's single
allowlist unpickler with the features-pickle allowlist (numpy arrays and builtins only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from agnostos.atomic import atomic_write_bytes
from agnostos.evaluation.bank.records import BankError, DemoRecord
from agnostos.evaluation.rankers import xicm_path_task_episode
from agnostos.shards.pickles import (
    XICM_FEATURES_ALLOWLIST,
    PickleReadError,
    PickleRefusedError,
    dump_pickle,
    load_pickle,
)

# X-ICM's bank paths are `<root>/<task>/all_variations/episodes/episode<N>` with this root.
XICM_ROOT = "data/seen_tasks/train"
# X-ICM pickle keys, in the order the published file lists them.
XICM_KEYS: tuple[str, ...] = (
    "all_demo_paths",
    "all_input_image_feats",
    "all_output_image_feats",
    "all_prompt_feats",
)


def load_xicm_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an `all_diffusion_features.pkl`-style dict through the allowlist unpickler."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}: no such features pickle") from None
    try:
        loaded = load_pickle(source, data, allowlist=XICM_FEATURES_ALLOWLIST)
    except (PickleRefusedError, PickleReadError) as error:  # both name the file
        raise BankError(str(error)) from None
    if not isinstance(loaded, dict):
        raise BankError(f"{source}: expected a dict, found {type(loaded).__name__}")
    return loaded


def write_xicm_pickle(path: str | os.PathLike[str], features: Mapping[str, Any]) -> Path:
    """Write the dict atomically with protocol 4 and numpy-1 global names, so X-ICM's
    numpy-1 environment and numpy 2 both read it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, dump_pickle(features))
    return target


def check_xicm_keys(features: Mapping[str, Any], where: str) -> None:
    """Every key but `all_input_image_feats` (which X-ICM never uses) must be there."""
    missing = [key for key in XICM_KEYS if key != "all_input_image_feats" and key not in features]
    if missing:
        raise BankError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")


def xicm_matrix(features: Mapping[str, Any], key: str, rows: int, where: str) -> torch.Tensor:
    """One feature array as a (rows, -1) tensor, dtype kept as stored (ranking parity)."""
    try:
        array = np.asarray(features[key])
    except Exception as error:
        raise BankError(f"{where}: key {key!r} is not an array ({error})") from None
    if array.dtype == object or array.ndim < 1 or array.shape[0] != rows:
        raise BankError(
            f"{where}: key {key!r} has shape {array.shape} (dtype {array.dtype}); expected "
            f"{rows} numeric rows, one per path in 'all_demo_paths'"
        )
    return torch.from_numpy(np.ascontiguousarray(array.reshape(rows, -1)))


def xicm_records(paths: Sequence[str], where: str) -> list[DemoRecord]:
    """Records for the published paths; demo text, instructions and variations are unknown
    (the pickle holds only paths and features), and each keeps its path for re-export."""
    records = []
    for number, path in enumerate(paths):
        try:
            task, episode = xicm_path_task_episode(path)
        except ValueError as error:
            raise BankError(f"{where}: all_demo_paths[{number}]: {error}") from None
        parts = PurePosixPath(path.rstrip("/")).parts
        folder = parts[-3]
        records.append(
            DemoRecord(
                id=f"{task}/{folder}/episode{episode}",
                task=task,
                episode=episode,
                variation=None,
                variation_folder=folder,
                instruction=None,
                source="/".join(parts[-4:]),
                demo_text_error="imported from an X-ICM features pickle, which holds no "
                "episode data",
                xicm_path=path,
            )
        )
    return records


def xicm_paths(records: Sequence[DemoRecord], root: str | None = None) -> list[str]:
    """X-ICM bank paths: an imported demo keeps its original path unless `root` is given;
    a built one becomes `<root or XICM_ROOT>/<source>`."""
    paths = []
    for record in records:
        if root is None and record.xicm_path is not None:
            paths.append(record.xicm_path)
        else:
            paths.append(f"{(root or XICM_ROOT).rstrip('/')}/{record.source}")
    return paths
