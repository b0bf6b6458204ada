"""PNG encodings, point clouds (bit for bit as PyRep builds them) and the PNG checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from scipy.spatial.transform import Rotation

from agnostos.action_codecs import XICMActionCodec
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
    assert decoded.dtype == np.float64  # as RLBench's image_to_float_array gives it
    step = (far - near) / codecs.DEPTH_SCALE
    assert np.max(np.abs(decoded - depth)) <= step / 2 + 1e-12


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


# --- PyRep parity -------------------------------------------------------------------------


def _pyrep_port(depth: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """PyRep's `pointcloud_from_depth_and_camera_params`, step by step as it runs: tiled
    float32 pixel grid times depth, `R^T` as the inverse rotation, the 4x4 projection
    inverted numerically, `_transform` as (3x4) @ (4xN) on transposed rows."""
    height, width = depth.shape
    xs = np.reshape(np.tile(np.arange(width), [height]), (height, width, 1)).astype(np.float32)
    ys = np.reshape(np.tile(np.arange(height), [width]), (width, height, 1)).astype(np.float32)
    grid = np.concatenate((xs, np.transpose(ys, (1, 0, 2)), np.ones_like(xs)), -1)
    scaled = grid * np.expand_dims(depth, -1)
    centre = np.expand_dims(extrinsics[:3, 3], 0).T
    rotation_inverse = extrinsics[:3, :3].T
    view = np.concatenate((rotation_inverse, -np.matmul(rotation_inverse, centre)), -1)
    projection = np.concatenate([np.matmul(intrinsics, view), [np.array([0, 0, 0, 1])]])
    inverse = np.linalg.inv(projection)[0:3]
    rows = np.concatenate([scaled, np.ones((height, width, 1))], -1).reshape(height * width, -1)
    world = np.transpose(np.matmul(inverse, np.transpose(rows, (1, 0))), (1, 0))
    return world.reshape(height, width, -1)


def _xicm_depth(png: bytes, near: float, far: float) -> np.ndarray:
    """X-ICM's demo depth: `_image_to_float_array` (int sum / 2^24-1), then near/far."""
    pixels = np.array(Image.open(io.BytesIO(png)))
    return (far - near) * (np.sum(pixels * [65536, 256, 1], axis=2) / (2**24 - 1)) + near


def _rotation_formula(depth, extrinsics, intrinsics) -> np.ndarray:
    """`R K^-1 [u z, v z, z] + C`: algebraically PyRep's, numerically not (the old code)."""
    rows, cols = np.mgrid[0 : depth.shape[0], 0 : depth.shape[1]]
    pixels = np.stack([cols * depth, rows * depth, depth], axis=-1)
    rotation, centre = extrinsics[:3, :3], extrinsics[:3, 3]
    return pixels @ (rotation @ np.linalg.inv(intrinsics)).T + centre


def test_point_cloud_keeps_pyreps_dtypes():
    """float32 depth (a live frame) is multiplied in float32, float64 depth in float64."""
    rng = np.random.default_rng(3)
    intrinsics = np.array([[-110.0, 0, 7.5], [0, -110.0, 7.5], [0, 0, 1]])
    extrinsics = np.eye(4)
    extrinsics[:3, :3] = Rotation.from_euler("xyz", [170, 10, -30], degrees=True).as_matrix()
    extrinsics[:3, 3] = (0.5, -0.2, 1.8)
    for dtype in (np.float32, np.float64):
        depth = rng.uniform(0.5, 3.0, size=(16, 16)).astype(dtype)
        points = codecs.point_cloud(depth, intrinsics, extrinsics)
        assert points.dtype == np.float64
        assert np.array_equal(points, _pyrep_port(depth, extrinsics, intrinsics))
    # The float32 product is a different number from the float64 one.
    depth = np.full((16, 16), 1.1, np.float32)
    assert not np.array_equal(
        codecs.point_cloud(depth, intrinsics, extrinsics),
        codecs.point_cloud(depth.astype(np.float64) * (1 + 1e-9), intrinsics, extrinsics),
    )


@pytest.fixture(scope="module")
def sample_episodes(sample_root):
    return [read_episode(location) for location in discover_episodes(sample_root)]


def test_real_point_clouds_equal_pyreps_on_every_frame(sample_episodes):
    """Every camera frame of the real sample: points bit-identical to PyRep's arithmetic on
    X-ICM's own depth decoding, so every pixel (and every object centroid) falls in the
    same voxel as in X-ICM. The check is sharp: the old `R K^-1` formula on float32 depth
    moves points by up to ~3e-6 m and changes voxels on most sampled frames."""
    codec = XICMActionCodec()
    frames = old_frames = 0
    worst = 0.0
    for episode in sample_episodes:
        for index in range(episode.num_frames):
            for camera in episode.image_cameras:
                params = episode.cameras[camera]
                intrinsics, extrinsics = params.intrinsics[index], params.extrinsics[index]
                near, far = float(params.near[index]), float(params.far[index])
                depth = _xicm_depth(episode.png(camera, "depth", index), near, far)
                reference = _pyrep_port(depth, extrinsics, intrinsics)
                points = episode.point_cloud(camera, index)
                assert np.array_equal(points, reference), (episode.key, index, camera)
                frames += 1
                if index % 10:
                    continue
                voxels = codec.encode_position(reference)
                old = _rotation_formula(depth.astype(np.float32), extrinsics, intrinsics)
                worst = max(worst, float(np.abs(old - reference).max()))
                old_frames += bool(np.any(codec.encode_position(old) != voxels))
    assert frames == sum(episode.num_frames for episode in sample_episodes) * 5
    assert 1e-7 < worst < 1e-5 and old_frames >= 10


def test_real_point_clouds_solve_the_projection(sample_episodes):
    """An independent derivation: solve `P [x, y, z, 1] = [u z, v z, z, 1]` per pixel."""
    episode = sample_episodes[0]
    for index in (0, episode.num_frames // 2, episode.num_frames - 1):
        for camera in episode.image_cameras:
            params = episode.cameras[camera]
            rotation, centre = params.extrinsics[index][:3, :3], params.extrinsics[index][:3, 3]
            projection = np.eye(4)
            projection[:3, :3] = params.intrinsics[index] @ rotation.T
            projection[:3, 3] = -params.intrinsics[index] @ rotation.T @ centre
            depth = codecs.depth_from_rgb(
                codecs.decode_png(episode.png(camera, "depth", index)),
                float(params.near[index]),
                float(params.far[index]),
            )
            rows, cols = np.mgrid[0:128, 0:128]
            pixels = np.stack([cols * depth, rows * depth, depth, np.ones_like(depth)], -1)
            solved = np.linalg.solve(projection, pixels.reshape(-1, 4).T).T[:, :3]
            points = episode.point_cloud(camera, index).reshape(-1, 3)
            np.testing.assert_allclose(points, solved, rtol=0, atol=1e-12)


def test_live_depth_recovered_from_pyrep_points_rebuilds_them_exactly(sample_episodes):
    """The RLBench adapter keeps a live frame as depth recovered from PyRep's points; with
    float32 depth, as the simulator gives it, the rebuilt points are PyRep's to the bit."""
    from agnostos.envs.rlbench import depth_from_point_cloud

    episode = sample_episodes[1]
    for camera in episode.image_cameras:
        params = episode.cameras[camera]
        intrinsics, extrinsics = params.intrinsics[0], params.extrinsics[0]
        live_depth = episode.depth(camera, 0).astype(np.float32)
        points = _pyrep_port(live_depth, extrinsics, intrinsics)
        depth = depth_from_point_cloud(points, extrinsics)
        assert depth.dtype == np.float32 and np.array_equal(depth, live_depth)
        assert np.array_equal(codecs.point_cloud(depth, intrinsics, extrinsics), points)


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
