"""RLBench image encodings: RGB, 24-bit depth, RGB-packed mask handles, and point clouds.

The byte orders differ on purpose (they do in RLBench): depth packs R as the *high* byte,
masks pack R as the *low* byte. Depth PNGs hold CoppeliaSim's normalised depth, turned into
metres (float64, as RLBench's `image_to_float_array` gives them) with the per-frame near/far
planes. Point clouds are not stored on disk; they are rebuilt from metric depth and the
camera's intrinsics (negative focal lengths, used as they are) and camera-to-world
extrinsics with PyRep's own arithmetic (`point_cloud`), so they match X-ICM's to the bit.
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
    """Metric depth (float64 metres) from a 24-bit depth image, R the high byte.

    float64 on purpose: RLBench's `image_to_float_array` and X-ICM's demo reader keep it,
    and one float32 rounding (up to 2.4e-7 m at 4 m) moves back-projected points enough to
    change a voxel at a cell edge. `near + d (far - near)` equals X-ICM's
    `(far - near) d + near` bit for bit (IEEE sums and products commute).
    """
    rgb = pixels.astype(np.uint32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    normalised = packed.astype(np.float64) / DEPTH_SCALE
    return near + normalised * (far - near)


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


def pixel_coordinates(height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 `[column, row, 1]` per pixel: PyRep's uniform pixel grid.

    float32 matters: PyRep multiplies this grid by the depth, so float32 depth (a live
    simulator frame) gives float32 products and float64 depth (a stored frame) float64 ones.
    """
    rows, columns = np.mgrid[0:height, 0:width]
    return np.stack([columns, rows, np.ones_like(columns)], axis=-1).astype(np.float32)


def projection_matrix(intrinsics: np.ndarray, extrinsics: np.ndarray) -> np.ndarray:
    """World -> pixel 4x4 projection `[[K R^T, -K R^T C], [0, 0, 0, 1]]`, built as PyRep does.

    `extrinsics = [[R, C], [0, 1]]` is the camera-to-world pose. PyRep takes `R^T` as the
    inverse rotation though stored rotations are orthonormal only to ~1e-6 (8e-7 on the
    real sample), so the result is not `R K^-1`'s inverse; the products below keep
    PyRep's operand layouts (slices of the 4x4 pose) so the same BLAS paths round alike.
    """
    pose = np.asarray(extrinsics, dtype=np.float64)
    camera = np.asarray(intrinsics, dtype=np.float64)
    rotation_inverse = pose[:3, :3].T
    centre = pose[:3, 3][None].T
    world_to_camera = np.concatenate((rotation_inverse, -np.matmul(rotation_inverse, centre)), -1)
    return np.concatenate([np.matmul(camera, world_to_camera), [np.array([0, 0, 0, 1])]])


def point_cloud(depth_m: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray) -> np.ndarray:
    """World-frame points (HxWx3, float64) from metric depth, with PyRep's arithmetic.

    PyRep (`VisionSensor.pointcloud_from_depth_and_camera_params`, which RLBench and X-ICM
    use for live and stored frames alike) scales the pixel grid by depth, appends a 1,
    and applies the first three rows of the numerically inverted 4x4 projection. The
    operations, their order and dtypes are the same here, so points agree with X-ICM's bit
    for bit (given the same BLAS); `R K^-1 [u z, v z, z] + C`, algebraically equal, differs
    by up to ~3e-6 m because the stored rotations are not exactly orthonormal. Pass depth
    in the dtype the source has: float64 for stored PNGs, float32 for live frames.
    """
    depth = np.asarray(depth_m)
    height, width = depth.shape
    scaled = pixel_coordinates(height, width) * depth[..., None]
    homogeneous = np.concatenate([scaled, np.ones((height, width, 1))], -1)
    back_projection = np.linalg.inv(projection_matrix(intrinsics, extrinsics))[0:3]
    flat = homogeneous.reshape(height * width, -1).transpose(1, 0)
    world = np.matmul(back_projection, flat).transpose(1, 0)
    return world.reshape(height, width, -1)


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
