"""The camera maths of PyRep's `VisionSensor` (no sensor: static helpers only)."""

from __future__ import annotations

import math

import numpy as np


class VisionSensor:
    @staticmethod
    def intrinsic_matrix(resolution: tuple[int, int], perspective_angle_deg: float) -> np.ndarray:
        """`get_intrinsic_matrix` for a sensor of this [x, y] resolution and angle: negative
        focal lengths, principal point at resolution / 2."""
        res = np.array(resolution, dtype=np.float64)
        angle_x = angle_y = math.radians(perspective_angle_deg)
        ratio = res[0] / res[1]
        if ratio > 1:
            angle_y = 2 * np.arctan(np.tan(angle_y / 2) / ratio)
        elif ratio < 1:
            angle_x = 2 * np.arctan(np.tan(angle_x / 2) * ratio)
        focal = -res / (2 * np.tan(np.array([angle_x, angle_y]) / 2))
        return np.array([[focal[0], 0.0, res[0] / 2], [0.0, focal[1], res[1] / 2], [0, 0, 1.0]])

    @staticmethod
    def pointcloud_from_depth_and_camera_params(
        depth: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray
    ) -> np.ndarray:
        """World points (H,W,3) of metric depth: the inverse of the 4x4 projection
        [[K R^T, -K R^T C], [0, 0, 0, 1]] applied to [u z, v z, z, 1] (u column, v row)."""
        height, width = depth.shape
        rotation = extrinsics[:3, :3]
        centre = extrinsics[:3, 3:4]
        projection = np.eye(4)
        projection[:3, :3] = intrinsics @ rotation.T
        projection[:3, 3:4] = -intrinsics @ rotation.T @ centre
        inverse = np.linalg.inv(projection)[:3]
        cols, rows = np.meshgrid(np.arange(width), np.arange(height))
        z = depth.astype(np.float32)
        pixels = np.stack([cols * z, rows * z, z, np.ones_like(z, dtype=np.float64)], axis=-1)
        return (pixels.reshape(-1, 4) @ inverse.T).reshape(height, width, 3)
