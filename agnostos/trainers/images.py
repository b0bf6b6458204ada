"""Sample grids for validation logging, with torch/numpy/PIL only.

Why not torchvision's `make_grid`: there is no CPU wheel of torchvision that matches the
CPU torch build this project tests on, and a grid is a few lines of numpy.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["image_grid", "png_bytes", "to_uint8"]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A 3xHxW image in [-1, 1] (any float dtype, any device) -> HxWx3 uint8."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a 3xHxW image, got shape {tuple(image.shape)}")
    unit = (image.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5
    return unit.round().to(torch.uint8).permute(1, 2, 0).numpy()


def image_grid(
    rows: Sequence[Sequence[torch.Tensor]], padding: int = 2, fill: int = 255
) -> np.ndarray:
    """Tile rows of equally sized 3xHxW images in [-1, 1] into one HxWx3 uint8 array.

    `padding` pixels of `fill` separate the tiles and surround the grid.
    """
    if not rows or any(len(row) != len(rows[0]) for row in rows) or not rows[0]:
        raise ValueError("image_grid needs a non-empty rectangle of images")
    tiles = [[to_uint8(image) for image in row] for row in rows]
    height, width, _ = tiles[0][0].shape
    if any(tile.shape != (height, width, 3) for row in tiles for tile in row):
        raise ValueError("every image in a grid must have the same size")
    count_rows, count_cols = len(tiles), len(tiles[0])
    grid = np.full(
        (
            count_rows * (height + padding) + padding,
            count_cols * (width + padding) + padding,
            3,
        ),
        fill,
        dtype=np.uint8,
    )
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            top = padding + r * (height + padding)
            left = padding + c * (width + padding)
            grid[top : top + height, left : left + width] = tile
    return grid


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of an HxWx3 uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()
