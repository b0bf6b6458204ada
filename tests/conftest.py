"""Shared fixtures: the real RLBench sample (skipped when absent) and synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agnostos.shards.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TASK = "open_drawer"


def shared_data_dir() -> Path:
    """`$AGNOSTOS_SHARED_DATA`, else `../shared/data` next to the repository."""
    return Path(os.environ.get("AGNOSTOS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """Root holding `open_drawer/all_variations/episodes/episode{0,1}` (real RLBench data)."""
    root = shared_data_dir() / "rlbench_sample"
    if not (root / SAMPLE_TASK / "all_variations" / "episodes" / "episode0").is_dir():
        pytest.skip(
            f"real RLBench sample not found at {root}; set AGNOSTOS_SHARED_DATA to the folder "
            "holding rlbench_sample/"
        )
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small synthetic episodes (two tasks), shared read-only by the tests."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, episodes_per_task=3)
    return root
