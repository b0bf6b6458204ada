"""RLBench image encodings: RGB, 24-bit depth, RGB-packed mask handles, and point clouds.

The byte orders differ on purpose (they do in RLBench): depth packs R as the *high* byte,
masks pack R as the *low* byte. Depth PNGs hold CoppeliaSim's normalised depth, turned into
metres with the per-frame near/far planes. Point clouds are not stored on disk; they are
rebuilt from metric depth and the camera's intrinsics (negative focal lengths, used as
they are) and camera-to-world extrinsics, as PyRep does.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

DEPTH_SCALE = 2**24 - 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PngError(ValueError):
    """A PNG file is truncated, corrupt or not the expected kind of image."""


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes into an HxWxC uint8 array (RGB images give C=3)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode an HxWx3 uint8 array as an RGB PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="RGB").save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def depth_from_rgb(pixels: np.ndarray, near: float, far: float) -> np.ndarray:
    """Metric depth (float32 metres) from a 24-bit depth image, R the high byte."""
    rgb = pixels.astype(np.uint32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    normalised = packed.astype(np.float64) / DEPTH_SCALE
    return (near + normalised * (far - near)).astype(np.float32)


def depth_to_rgb(depth_m: np.ndarray, near: float, far: float) -> np.ndarray:
    """Inverse of `depth_from_rgb`: metres -> RLBench's 24-bit encoding (rounded, clipped)."""
    normalised = (np.asarray(depth_m, dtype=np.float64) - near) / (far - near)
    packed = np.clip(np.floor(normalised * DEPTH_SCALE + 0.5), 0, DEPTH_SCALE).astype(np.uint32)
    return np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=-1).astype(
        np.uint8
    )


def mask_from_rgb(pixels: np.ndarray) -> np.ndarray:
    """Object handles (int32) from a mask image, R the low byte."""
    rgb = pixels.astype(np.int32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def mask_to_rgb(handles: np.ndarray) -> np.ndarray:
    """Inverse of `mask_from_rgb`."""
    ids = np.asarray(handles, dtype=np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 2**24:
        raise ValueError("mask handles must lie in [0, 2**24)")
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def point_cloud(depth_m: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray) -> np.ndarray:
    """World-frame points (HxWx3, float64) from metric depth, as PyRep builds them.

    Pixel (row v, column u) with depth z sits at `R K^-1 [u z, v z, z] + C`, where
    `extrinsics = [[R, C], [0, 1]]` is the camera-to-world pose. This is PyRep's
    `inv([[K R^T, -K R^T C], [0, 1]]) [u z, v z, z, 1]` written without the 4x4 inverse.
    """
    height, width = depth_m.shape
    z = depth_m.astype(np.float64)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.stack([cols * z, rows * z, z], axis=-1)
    camera_to_pixels = np.linalg.inv(np.asarray(intrinsics, dtype=np.float64))
    rotation = np.asarray(extrinsics, dtype=np.float64)[:3, :3]
    translation = np.asarray(extrinsics, dtype=np.float64)[:3, 3]
    return pixels @ (rotation @ camera_to_pixels).T + translation


def png_size(data: bytes | memoryview) -> tuple[int, int]:
    """(height, width) from the IHDR chunk, without decoding pixels."""
    head = bytes(data[:24])
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise PngError("not a PNG file (bad signature or missing IHDR)")
    width, height = struct.unpack(">II", head[16:24])
    return height, width


IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def check_png(data: bytes | memoryview) -> tuple[int, int]:
    """Cheap structural check used while converting; returns (height, width).

    Signature, IHDR and a complete IEND chunk as the very last 12 bytes: a truncated file
    (or one with bytes appended) fails, in about a microsecond, so conversion can copy
    PNGs at disk speed. Bit-level corruption inside the image data is what
    `check_png_crc` and the full decode in `agnostos shards verify` catch.
    """
    size = png_size(data)
    if bytes(data[-len(IEND_CHUNK) :]) != IEND_CHUNK:
        raise PngError("truncated PNG: the file does not end with an IEND chunk")
    return size


def check_png_crc(data: bytes) -> tuple[int, int]:
    """Full chunk walk: every chunk's length and CRC, ending at IEND; returns (height, width)."""
    size = png_size(data)
    position = len(PNG_SIGNATURE)
    end = len(data)
    view = memoryview(data)
    while position + 12 <= end:
        (length,) = struct.unpack_from(">I", data, position)
        chunk_end = position + 12 + length
        if chunk_end > end:
            raise PngError(f"truncated PNG: chunk at byte {position} runs past the end")
        chunk_type = data[position + 4 : position + 8]
        (crc,) = struct.unpack_from(">I", data, chunk_end - 4)
        if zlib.crc32(view[position + 4 : chunk_end - 4]) != crc:
            raise PngError(f"corrupt PNG: CRC mismatch in {chunk_type!r} chunk at byte {position}")
        if chunk_type == b"IEND":
            return size
        position = chunk_end
    raise PngError("truncated PNG: no IEND chunk")
