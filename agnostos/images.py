"""Images without torchvision: preparation for the models, and tiling for people to look at.

No CPU wheel of torchvision matches the CPU torch build this project tests on, and each of
these is a few lines of numpy and PIL. This is a leaf module: shards, datamodules, models,
trainers and evaluation all use it, and it uses only `agnostos.shards.codecs`.

Preparation: X-ICM feeds its dynamics model the front image centre-cropped to a square and
resized to 128x128. RLBench frames are usually already 128x128, in which case the crop and
resize are skipped and pixels pass through unchanged. Resizing uses PIL's bilinear filter, which
widens its support when shrinking (antialiasing), like torchvision's `antialias=True`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from agnostos.shards.codecs import decode_png


def centre_crop_box(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the largest centred square, rounded as torchvision does."""
    side = min(height, width)
    top = round((height - side) / 2.0)
    left = round((width - side) / 2.0)
    return top, left, side


def centre_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8: centred square crop, then bilinear resize."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    top, left, side = centre_crop_box(image.shape[0], image.shape[1])
    square = image[top : top + side, left : left + side]
    if side == size:
        return square
    resized = Image.fromarray(np.ascontiguousarray(square)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.asarray(resized)


def prepare_rgb(png: bytes, size: int, flip: bool = False) -> torch.Tensor:
    """PNG bytes -> 3 x size x size uint8 tensor (decoded exactly as `Episode.rgb`)."""
    pixels = centre_crop_resize(decode_png(png), size)
    if flip:
        pixels = pixels[:, ::-1]
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # one copy, into CHW order


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1], the range the diffusion model trains on."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A 3xHxW image in [-1, 1] (any float dtype, any device) -> HxWx3 uint8."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a 3xHxW image, got shape {tuple(image.shape)}")
    unit = (image.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5
    return unit.round().to(torch.uint8).permute(1, 2, 0).numpy()


def tile_images(
    rows: Sequence[Sequence[np.ndarray]], padding: int = 2, fill: int = 255
) -> np.ndarray:
    """Tile rows of equally sized HxWx3 uint8 images into one array.

    `padding` pixels of `fill` separate the tiles and surround the grid.
    """
    if not rows or not rows[0] or any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("a grid needs a non-empty rectangle of images")
    height, width, _ = rows[0][0].shape
    if any(tile.shape != (height, width, 3) for row in rows for tile in row):
        raise ValueError("every image in a grid must have the same size")
    grid = np.full(
        (len(rows) * (height + padding) + padding, len(rows[0]) * (width + padding) + padding, 3),
        fill,
        dtype=np.uint8,
    )
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            top = padding + r * (height + padding)
            left = padding + c * (width + padding)
            grid[top : top + height, left : left + width] = tile
    return grid


def image_grid(
    rows: Sequence[Sequence[torch.Tensor]], padding: int = 2, fill: int = 255
) -> np.ndarray:
    """Tile rows of equally sized 3xHxW images in [-1, 1] (model outputs) into HxWx3 uint8."""
    return tile_images([[to_uint8(image) for image in row] for row in rows], padding, fill)


def resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3, nearest neighbour (shows pixels as they are)."""
    tile = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(tile.resize((size, size), Image.Resampling.NEAREST))
