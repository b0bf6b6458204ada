"""Image preparation without torchvision: decode, centre-crop, resize, flip.

X-ICM feeds its dynamics model the front image centre-cropped to a square and resized to
128x128. RLBench frames are usually already 128x128, in which case the crop and resize are
skipped and pixels pass through unchanged. Resizing uses PIL's bilinear filter, which
widens its support when shrinking (antialiasing), like torchvision's `antialias=True`.
"""

from __future__ import annotations

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
