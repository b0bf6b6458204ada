"""Hand-built banks in X-ICM's `all_diffusion_features.pkl` layout (xicm_method.md 6.2)."""

from __future__ import annotations

import numpy as np


def xicm_features(
    rng: np.random.Generator, root: str, tasks: list[str] | tuple[str, ...], per_task: int
) -> dict:
    """Random float32 features (1024-dim like the published bank) with a constant BOS row,
    keyed by demo paths `<root>/<task>/all_variations/episodes/episode<N>`."""
    paths = [
        f"{root}/{task}/all_variations/episodes/episode{episode}"
        for task in tasks
        for episode in range(per_task)
    ]
    size = len(paths)
    bos = rng.normal(size=1024).astype(np.float32)
    return {
        "all_demo_paths": paths,
        "all_input_image_feats": rng.normal(size=(size, 1024)).astype(np.float32),
        "all_output_image_feats": rng.normal(size=(size, 1024)).astype(np.float32),
        "all_prompt_feats": np.tile(bos, (size, 1)),
    }
