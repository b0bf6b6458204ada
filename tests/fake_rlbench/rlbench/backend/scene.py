"""Fake `rlbench.backend.scene.Scene`: an invented tabletop behind RLBench's observation API.

`get_observation` follows X-ICM's vendored `RLBench/rlbench/backend/scene.py` (the PerAct
fork plus `misc['<camera>_mask_id_to_name']`): per camera, rgb is HxWx3 uint8, depth is
normalised (or metres with `depth_in_meters`) and only kept when `depth=True`, the point
cloud is built from metric depth with PyRep's formula, masks are colour-coded handles
decoded by `rgb_handles_to_mask` (floats) when `masks_as_one_channel`, and `misc` holds each
existing camera's extrinsics, intrinsics, near and far. The world is invented: a table at
z = 0.752 (handle 45) and one box per task placed at reset from `np.random.uniform` draws.
"""

from __future__ import annotations

import numpy as np
from pyrep.objects.vision_sensor import VisionSensor

from rlbench.backend.const import CAMERA_NAMES
from rlbench.backend.exceptions import BoundaryError
from rlbench.backend.utils import rgb_handles_to_mask
from rlbench.observation_config import ObservationConfig

TABLE_HEIGHT = 0.752
TABLE_HANDLE = 45
TABLE_NAME = "diningTable_visible"
PERSPECTIVE_ANGLE = 60.0
# camera -> (position, look-at target); the wrist camera follows the gripper tip.
CAMERA_POSES = {
    "left_shoulder": ((-0.25, 0.55, 1.65), (0.3, 0.0, 0.75)),
    "right_shoulder": ((-0.25, -0.55, 1.65), (0.3, 0.0, 0.75)),
    "overhead": ((0.25, 0.0, 2.2), (0.25, 0.0, 0.75)),
    "front": ((1.35, 0.0, 1.58), (0.25, 0.0, 0.75)),
}
CLIPPING = {name: (0.01, 4.5) for name in CAMERA_NAMES}
CLIPPING["wrist"] = (0.01, 3.0)
# workspace bounds as Scene computes them (workspace box +-0.2 m in x/y, 1 m above the table)
WORKSPACE = {"x": (-0.3, 0.8), "y": (-0.65, 0.65), "z": (TABLE_HEIGHT, TABLE_HEIGHT + 1.0)}


def look_at(position, target) -> np.ndarray:
    """Camera-to-world pose whose z axis points from `position` to `target`."""
    position, target = np.asarray(position, float), np.asarray(target, float)
    forward = (target - position) / np.linalg.norm(target - position)
    up = np.array([0.0, 0.0, 1.0]) if abs(forward[2]) < 0.99 else np.array([1.0, 0.0, 0.0])
    x_axis = np.cross(up, forward)
    x_axis /= np.linalg.norm(x_axis)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([x_axis, np.cross(forward, x_axis), forward], axis=1)
    pose[:3, 3] = position
    return pose


class Scene:
    def __init__(
        self, pyrep, robot, obs_config: ObservationConfig = None, robot_setup: str = "panda"
    ):
        self.pyrep = pyrep
        self.robot = robot
        self.robot_setup = robot_setup
        self.task = None
        self._obs_config = obs_config if obs_config is not None else ObservationConfig()
        self._has_init_task = self._has_init_episode = False
        self._variation_index = 0
        self._ignore_collisions_for_current_waypoint = False
        self.fake = None  # the FakeSim, set by Environment.launch
        self.placement: tuple[float, float, float] | None = None
        self.actions_taken = 0
        # Cameras that render neither rgb, depth nor points are removed, as in RLBench.
        self._sensors = {
            name: self._camera_config(name).rgb
            or self._camera_config(name).depth
            or self._camera_config(name).point_cloud
            for name in CAMERA_NAMES
        }

    def _camera_config(self, name: str):
        return getattr(self._obs_config, f"{name}_camera")

    # -- task lifecycle ----------------------------------------------------------------------

    def load(self, task) -> None:
        task.load()
        task._scene = self
        self.task = task
        self._has_init_task = self._has_init_episode = False
        self._variation_index = 0
        self.placement = None

    def unload(self) -> None:
        if self.task is not None:
            self.robot.gripper.release()
            self.task.unload()
        self.task = None
        self._variation_index = 0

    def init_task(self) -> None:
        self.task.init_task()
        self._has_init_task = True

    def init_episode(self, index: int, randomly_place: bool = True, max_attempts: int = 5):
        self._variation_index = index
        if not self._has_init_task:
            self.init_task()
        descriptions = self.task.init_episode(index)
        if self.fake.placement_error:
            raise BoundaryError("Could not place the task in the workspace (fake)")
        if randomly_place and not self.task.is_static_workspace():
            self._place_task()
        self.actions_taken = 0
        self._has_init_episode = True
        return descriptions

    def _place_task(self) -> None:
        """The box's x, y and yaw from the global numpy RNG (SpawnBoundary.sample does)."""
        low, high = self.task.spawn_low, self.task.spawn_high
        x = np.random.uniform(low[0], high[0])
        y = np.random.uniform(low[1], high[1])
        min_rot, max_rot = self.task.base_rotation_bounds()
        yaw = np.random.uniform(min_rot[2], max_rot[2])
        self.placement = (float(x), float(y), float(yaw))
        self.fake.record("place", x=float(x), y=float(y), yaw=float(yaw))

    def reset(self) -> None:
        if self.fake.reset_error is not None:
            raise self.fake.reset_error
        self.robot.gripper.release()
        self.robot.arm.reset_state()
        self.robot.gripper.actuate(1.0, 0.04)
        self._ignore_collisions_for_current_waypoint = False

    def step(self) -> None:
        self.pyrep.step()
        self.task.step()

    def get_observation_config(self) -> ObservationConfig:
        return self._obs_config

    def check_target_in_workspace(self, target_pos) -> bool:
        x, y, z = target_pos
        return (
            WORKSPACE["x"][1] > x > WORKSPACE["x"][0]
            and WORKSPACE["y"][1] > y > WORKSPACE["y"][0]
            and WORKSPACE["z"][1] > z > WORKSPACE["z"][0]
        )

    # -- rendering ---------------------------------------------------------------------------

    def camera_pose(self, name: str) -> np.ndarray:
        if name == "wrist":
            tip = self.robot.arm.tip_pose[:3]
            return look_at(tip, tip + np.array([0.05, 0.0, -1.0]))
        return look_at(*CAMERA_POSES[name])

    def camera_intrinsics(self, name: str) -> np.ndarray:
        return VisionSensor.intrinsic_matrix(
            self._camera_config(name).image_size, PERSPECTIVE_ANGLE
        )

    def ground_truth(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Metric depth (H,W float32) and object handles (H,W int) a camera sees."""
        width, height = self._camera_config(name).image_size
        pose, near_far = self.camera_pose(name), CLIPPING[name]
        cols, rows = np.meshgrid(np.arange(width), np.arange(height))
        pixels = np.stack([cols, rows, np.ones_like(cols)], axis=-1).astype(np.float64)
        camera_rays = pixels @ np.linalg.inv(self.camera_intrinsics(name)).T  # z = 1
        rays = camera_rays @ pose[:3, :3].T
        origin = pose[:3, 3]

        def distance_to(height_z: float) -> np.ndarray:
            with np.errstate(divide="ignore"):
                return np.where(rays[..., 2] < -1e-9, (height_z - origin[2]) / rays[..., 2], np.inf)

        depth = distance_to(TABLE_HEIGHT)
        handles = np.full((height, width), TABLE_HANDLE)
        if self.placement is not None:
            x, y, yaw = self.placement
            top = distance_to(TABLE_HEIGHT + self.task.object_height)
            finite = np.isfinite(top)
            points = origin + np.where(finite, top, 0.0)[..., None] * rays
            dx, dy = points[..., 0] - x, points[..., 1] - y
            local_x = np.cos(yaw) * dx + np.sin(yaw) * dy
            local_y = -np.sin(yaw) * dx + np.cos(yaw) * dy
            half = self.task.object_half_width
            inside = finite & (np.abs(local_x) <= half) & (np.abs(local_y) <= half)
            depth = np.where(inside, top, depth)
            handles = np.where(inside, self.task.object_handle, handles)
        return np.clip(depth, *near_far).astype(np.float32), handles

    def _capture(self, name: str):
        """rgb (float [0, 1]), depth (normalised, float32) and raw mask (colour-coded floats)."""
        depth_m, handles = self.ground_truth(name)
        near, far = CLIPPING[name]
        rows = np.arange(handles.shape[0])[:, None] / max(handles.shape[0], 1)
        rgb = np.empty((*handles.shape, 3), np.float32)
        rgb[...] = (0.45 + 0.1 * rows)[..., None]
        if self.task is not None:
            rgb[handles == self.task.object_handle] = self.task.object_colour
        coded = np.stack([handles & 255, (handles >> 8) & 255, (handles >> 16) & 255], axis=-1)
        normalised = ((depth_m - near) / (far - near)).astype(np.float32)
        return rgb, normalised, (coded / 255.0).astype(np.float32)

    def _names(self, mask_ids: np.ndarray) -> dict:
        """VisionSensor.get_mask_id_object_names of X-ICM's PyRep: unique id -> object name."""
        known = {TABLE_HANDLE: TABLE_NAME}
        if self.task is not None:
            known[self.task.object_handle] = self.task.object_name
        return {value: known.get(round(float(value)), "") for value in np.unique(mask_ids)}

    def get_observation(self):
        from rlbench.backend.observation import Observation

        arm, gripper, config = self.robot.arm, self.robot.gripper, self._obs_config
        images: dict[str, object] = {}
        misc: dict[str, object] = {}
        for name in CAMERA_NAMES:
            camera = self._camera_config(name)
            rgb = depth = pcd = mask = names = None
            if self._sensors[name] or camera.mask:
                raw_rgb, raw_depth, raw_mask = self._capture(name)
            if self._sensors[name]:
                if camera.rgb:
                    rgb = np.clip(
                        (camera.rgb_noise.apply(raw_rgb) * 255.0).astype(np.uint8), 0, 255
                    )
                if camera.depth or camera.point_cloud:
                    near, far = CLIPPING[name]
                    depth = raw_depth
                    if camera.depth_in_meters:
                        depth = near + raw_depth * (far - near)
                    depth = camera.depth_noise.apply(depth)
                if camera.point_cloud:
                    depth_m = depth if camera.depth_in_meters else near + depth * (far - near)
                    pcd = VisionSensor.pointcloud_from_depth_and_camera_params(
                        depth_m, self.camera_pose(name), self.camera_intrinsics(name)
                    )
                    if not camera.depth:
                        depth = None
                misc[f"{name}_camera_extrinsics"] = self.camera_pose(name)
                misc[f"{name}_camera_intrinsics"] = self.camera_intrinsics(name)
                misc[f"{name}_camera_near"] = CLIPPING[name][0]
                misc[f"{name}_camera_far"] = CLIPPING[name][1]
            if camera.mask:
                mask = (
                    rgb_handles_to_mask(raw_mask.copy())
                    if camera.masks_as_one_channel
                    else raw_mask
                )
                names = self._names(rgb_handles_to_mask(raw_mask.copy()))
            misc[f"{name}_mask_id_to_name"] = names
            images.update(
                {f"{name}_rgb": rgb, f"{name}_depth": depth, f"{name}_point_cloud": pcd,
                 f"{name}_mask": mask}
            )  # fmt: skip
        tip = arm.get_tip()
        obs = Observation(
            **images,
            joint_velocities=(
                config.joint_velocities_noise.apply(np.array(arm.get_joint_velocities()))
                if config.joint_velocities
                else None
            ),
            joint_positions=(
                config.joint_positions_noise.apply(np.array(arm.get_joint_positions()))
                if config.joint_positions
                else None
            ),
            joint_forces=np.array(arm.get_joint_forces()) if config.joint_forces else None,
            gripper_open=(
                (1.0 if gripper.get_open_amount()[0] > 0.95 else 0.0)
                if config.gripper_open
                else None
            ),
            gripper_pose=np.array(tip.get_pose()) if config.gripper_pose else None,
            gripper_matrix=tip.get_matrix() if config.gripper_matrix else None,
            gripper_touch_forces=np.zeros(6) if config.gripper_touch_forces else None,
            gripper_joint_positions=(
                np.array(gripper.get_joint_positions()) if config.gripper_joint_positions else None
            ),
            task_low_dim_state=(
                self.task.get_low_dim_state() if config.task_low_dim_state else None
            ),
            ignore_collisions=(
                np.array(1.0 if self._ignore_collisions_for_current_waypoint else 0.0)
                if config.record_ignore_collisions
                else None
            ),
            misc=misc,
        )
        return self.task.decorate_observation(obs)
