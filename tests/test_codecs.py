"""PNG encodings, point clouds and the cheap PNG structure check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from agnostos.shards import codecs
from agnostos.shards.folders import discover_episodes, read_episode


@settings(max_examples=50, deadline=None)
@given(arrays(np.int64, (4, 5), elements=st.integers(0, 2**24 - 1)))
def test_mask_handles_round_trip_through_png(handles):
    pixels = codecs.decode_png(codecs.encode_png(codecs.mask_to_rgb(handles)))
    np.testing.assert_array_equal(codecs.mask_from_rgb(pixels), handles)


def test_mask_uses_red_as_low_byte_and_depth_red_as_high_byte():
    assert codecs.mask_from_rgb(np.array([[[1, 2, 3]]], np.uint8))[0, 0] == 1 + 2 * 256 + 3 * 65536
    near, far = 0.0, float(codecs.DEPTH_SCALE)
    assert codecs.depth_from_rgb(np.array([[[1, 2, 3]]], np.uint8), near, far)[0, 0] == 65536 + 515


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float64, (3, 3), elements=st.floats(0.01, 4.5)),
    st.floats(0.005, 0.02),
    st.floats(3.0, 5.0),
)
def test_depth_round_trips_within_one_quantisation_step(depth, near, far):
    depth = np.clip(depth, near, far)
    pixels = codecs.decode_png(codecs.encode_png(codecs.depth_to_rgb(depth, near, far)))
    decoded = codecs.depth_from_rgb(pixels, near, far)
    step = (far - near) / codecs.DEPTH_SCALE
    assert np.max(np.abs(decoded - depth)) <= step + 1e-6 * far  # float32 output


def test_point_cloud_matches_pinhole_geometry():
    # Camera at (1, 2, 3) looking down; negative focal lengths as RLBench stores them.
    intrinsics = np.array([[-100.0, 0, 8], [0, -100.0, 8], [0, 0, 1]])
    extrinsics = np.eye(4)
    extrinsics[:3, :3] = np.diag([1.0, -1.0, -1.0])
    extrinsics[:3, 3] = (1.0, 2.0, 3.0)
    depth = np.full((16, 16), 2.0)
    points = codecs.point_cloud(depth, intrinsics, extrinsics)
    np.testing.assert_allclose(points[..., 2], 1.0)  # 2 m below the camera
    np.testing.assert_allclose(points[8, 8], (1.0, 2.0, 1.0))  # principal point
    # PyRep's formulation: inverse of [[K R^T, -K R^T C], [0, 1]] applied to [u z, v z, z, 1].
    rotation, centre = extrinsics[:3, :3], extrinsics[:3, 3]
    projection = np.eye(4)
    projection[:3, :3] = intrinsics @ rotation.T
    projection[:3, 3] = -intrinsics @ rotation.T @ centre
    u, v, z = 3, 11, 2.0
    expected = np.linalg.inv(projection) @ np.array([u * z, v * z, z, 1.0])
    np.testing.assert_allclose(points[v, u], expected[:3])


def test_real_depth_back_projects_the_table_at_075m(sample_root):
    episode = read_episode(discover_episodes(sample_root)[0])
    for camera in ("front", "overhead", "left_shoulder"):
        points = episode.point_cloud(camera, 0)
        heights = points[..., 2].ravel()
        table = heights[(heights > 0.7) & (heights < 0.8)]
        assert table.size > 500, camera
        assert abs(np.median(table) - 0.75) < 0.01, camera


def test_check_png_accepts_real_frames_and_reports_size(sample_root):
    path = sample_root / "open_drawer/all_variations/episodes/episode0/front_rgb/0.png"
    assert codecs.check_png(path.read_bytes()) == (128, 128)


@pytest.mark.parametrize("check", [codecs.check_png, codecs.check_png_crc])
def test_png_checks_reject_truncated_and_foreign_files(check):
    data = codecs.encode_png(np.full((8, 8, 3), 7, np.uint8))
    assert check(data) == (8, 8)
    for cut in (5, 12, len(data) // 2):
        with pytest.raises(codecs.PngError, match="truncated"):
            check(data[:-cut])
    with pytest.raises(codecs.PngError, match="not a PNG"):
        check(b"GIF89a" + data)


def test_crc_check_finds_a_flipped_bit_that_the_fast_check_lets_through():
    data = bytearray(codecs.encode_png(np.arange(192, dtype=np.uint8).reshape(8, 8, 3)))
    data[40] ^= 0x01
    assert codecs.check_png(bytes(data)) == (8, 8)
    with pytest.raises(codecs.PngError, match="CRC"):
        codecs.check_png_crc(bytes(data))
