"""Rendering the five cameras with RLBench's conventions.

One colour pass and one segmentation pass per camera: the segmentation pass also yields
the depth buffer, so rgb, depth and mask cost two renders, not three. Conventions follow
RLBench/PyRep so that `agnostos.shards.codecs.point_cloud` rebuilds world points exactly:
- extrinsics: camera-to-world 4x4 whose axes are x = image left, y = image up, z = viewing
  direction (MuJoCo cameras have x right, y up, and look down -z);
- intrinsics: negative focal lengths in pixels; the principal point is the image centre in
  pixel-index coordinates, (W-1)/2 and (H-1)/2, matching where MuJoCo samples pixels;
- depth: metric z along the viewing direction, clipped to the camera's [near, far];
- masks: one handle per geom (geom id + 1; 0 is the background) and a handle -> name map.
"""

from __future__ import annotations

import os

import mujoco
import numpy as np

from agnostos.envs.protocol import CameraFrame

_MUJOCO_TO_RLBENCH_AXES = np.diag([-1.0, 1.0, -1.0])


def intrinsics(size: tuple[int, int], fovy_degrees: float) -> np.ndarray:
    height, width = size
    focal = (height / 2.0) / np.tan(np.deg2rad(fovy_degrees) / 2.0)
    return np.array(
        [[-focal, 0.0, (width - 1) / 2.0], [0.0, -focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]]
    )


def extrinsics(data: mujoco.MjData, camera: int) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = data.cam_xmat[camera].reshape(3, 3) @ _MUJOCO_TO_RLBENCH_AXES
    pose[:3, 3] = data.cam_xpos[camera]
    return pose


def geom_names(model: mujoco.MjModel) -> dict[int, str]:
    """Mask handle -> name for every geom: its own name, else its body's name."""
    names = {}
    for geom in range(model.ngeom):
        name = model.geom(geom).name or model.body(model.geom_bodyid[geom]).name
        names[geom + 1] = name
    return names


def _gl_context(width: int, height: int):
    """An offscreen GL context for the backend MUJOCO_GL names (egl by default).

    Chosen here rather than through `mujoco.GLContext`, which is fixed when mujoco is first
    imported: a program that imported mujoco before this package still renders offscreen.
    """
    backend = os.environ.get("MUJOCO_GL", "egl").lower()
    if backend == "osmesa":
        from mujoco.osmesa import GLContext
    elif backend == "egl":
        from mujoco.egl import GLContext
    else:
        GLContext = mujoco.GLContext
    return GLContext(width, height)


class CameraRig:
    """Offscreen renderer for a model's named cameras (EGL or OSMesa, per MUJOCO_GL)."""

    def __init__(self, model: mujoco.MjModel, size: tuple[int, int], groups: tuple[int, ...]):
        self.model = model
        self.height, self.width = size
        self._context = _gl_context(self.width, self.height)
        self._context.make_current()
        self._mjr = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._mjr)
        self._mjr.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self._scene = mujoco.MjvScene(model, maxgeom=2000)
        self._option = mujoco.MjvOption()
        self._option.geomgroup[:] = [int(group in groups) for group in range(6)]
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._rect = mujoco.MjrRect(0, 0, self.width, self.height)
        self._rgb = np.empty((self.height, self.width, 3), np.uint8)
        self._ids = np.empty((self.height, self.width, 3), np.uint8)
        self._zbuffer = np.empty((self.height, self.width), np.float32)
        extent = model.stat.extent
        self._znear = float(model.vis.map.znear * extent)
        self._zfar = float(model.vis.map.zfar * extent)

    def render(
        self, data: mujoco.MjData, camera: int, fovy: float, near: float, far: float
    ) -> CameraFrame:
        self._context.make_current()
        self._camera.fixedcamid = camera
        mujoco.mjv_updateScene(
            self.model,
            data,
            self._option,
            None,
            self._camera,
            mujoco.mjtCatBit.mjCAT_ALL,
            self._scene,
        )
        mujoco.mjr_render(self._rect, self._scene, self._mjr)
        mujoco.mjr_readPixels(self._rgb, None, self._rect, self._mjr)
        rgb = np.flipud(self._rgb).copy()
        flags = self._scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = 1
        flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = 1
        try:
            mujoco.mjr_render(self._rect, self._scene, self._mjr)
            mujoco.mjr_readPixels(self._ids, self._zbuffer, self._rect, self._mjr)
        finally:
            flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = 0
            flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = 0
        return CameraFrame(
            rgb=rgb,
            depth=np.clip(np.flipud(self._metric_depth()), near, far),  # as RLBench stores it
            mask=np.flipud(self._geom_handles()).copy(),
            intrinsics=intrinsics((self.height, self.width), fovy),
            extrinsics=extrinsics(data, camera),
            near=near,
            far=far,
        )

    def _metric_depth(self) -> np.ndarray:
        """Reversed-Z depth buffer (MuJoCo's default) -> metres along the viewing axis."""
        near, far = self._znear, self._zfar
        c = 0.5 * (far + near) / (far - near) - 0.5
        d = far * near / (far - near)
        return (d / (self._zbuffer.astype(np.float64) + c)).astype(np.float32)

    def _geom_handles(self) -> np.ndarray:
        """Segmentation colours -> geom id + 1 (0 where nothing was drawn)."""
        ids = self._ids.astype(np.int64)
        segid = ids[..., 0] | (ids[..., 1] << 8) | (ids[..., 2] << 16)
        lookup = np.zeros(self._scene.ngeom + 1, np.int32)
        for index in range(self._scene.ngeom):
            geom = self._scene.geoms[index]
            if geom.segid >= 0 and int(geom.objtype) == int(mujoco.mjtObj.mjOBJ_GEOM):
                lookup[geom.segid + 1] = geom.objid + 1
        return lookup[np.clip(segid, 0, self._scene.ngeom)]

    def close(self) -> None:
        if self._mjr is not None:
            self._context.make_current()
            self._mjr.free()
            self._mjr = None
            self._context.free()
