"""The minibench MJCF scene: Panda on a table, five cameras, plus one task's objects.

The Panda comes from the installed gymnasium-robotics package (MIT; its XML says it is
derived from vikashplus/franka, Apache-2.0) and is never copied into this repository.
Its `assets.xml` hard-codes `meshdir="franka_assets/meshes"`, so the scene XML is written
into a scratch folder holding a `franka_assets` symlink. While compiling, the 134k-triangle
visual meshes are removed (the low-poly collision meshes are rendered instead: 10x faster
on a CPU rasteriser) and gravity compensation is switched on for the arm, so the position
actuators hold a pose without sagging.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mujoco
import numpy as np

TABLE_HEIGHT = 0.75
ROBOT_BASE = (-0.35, 0.0, TABLE_HEIGHT)
ARM_JOINTS = tuple(f"robot:panda0_joint{i}" for i in range(1, 8))
FINGER_JOINTS = ("robot:panda0_finger_joint1", "robot:panda0_finger_joint2")
TIP_SITE = "tip"
# The tip (RLBench's Panda_tip): between the finger pads, 1.45 cm above their lowest
# point, with the hand's axes (z along the approach, y along the finger travel).
TIP_SITE_POS = (0.0, 0.0, 0.2454)
PAD_BELOW_TIP = 0.0145
FINGER_OPEN = 0.04
# Geom groups: 1 = scene and task objects, 3 = the robot's collision meshes (rendered).
RENDERED_GROUPS = (1, 2, 3)

# RLBench's five cameras: (position, point looked at, vertical field of view in degrees,
# near, far). The front camera copies the real AGNOSTOS data (1.35, 0, 1.58), 25 degrees
# down; the others are placed to show the same tabletop from the same sides.
STATIC_CAMERAS: dict[
    str, tuple[tuple[float, float, float], tuple[float, float, float], float, float, float]
] = {
    "front": ((1.35, 0.0, 1.58), (0.0, 0.0, 0.94), 40.0, 0.01, 4.5),
    "left_shoulder": ((-0.1, 0.6, 1.55), (0.3, 0.0, 0.78), 45.0, 0.01, 3.2),
    "right_shoulder": ((-0.1, -0.6, 1.55), (0.3, 0.0, 0.78), 45.0, 0.01, 3.2),
    "overhead": ((0.25, 0.0, 2.05), (0.25, 0.0, 0.75), 40.0, 0.01, 3.3),
}
WRIST_CAMERA = ("wrist", 60.0, 0.01, 3.5)


def franka_assets_dir() -> Path:
    """gymnasium-robotics' `franka_assets` folder, found without importing the package."""
    spec = importlib.util.find_spec("gymnasium_robotics")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "minibench needs the Panda model from gymnasium-robotics: pip install "
            "'gymnasium-robotics==1.4.2'"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    assets = root / "envs" / "assets" / "kitchen_franka" / "franka_assets"
    if not (assets / "chain.xml").is_file():
        raise FileNotFoundError(f"{assets}: Panda assets missing from gymnasium-robotics")
    return assets


def _xyaxes(position: tuple[float, ...], target: tuple[float, ...]) -> str:
    """MJCF `xyaxes` for a camera at `position` looking at `target`, image up ~ world up."""
    forward = np.subtract(target, position, dtype=np.float64)
    forward /= np.linalg.norm(forward)
    up_hint = np.array([0.0, 0.0, 1.0]) if abs(forward[2]) < 0.99 else np.array([-1.0, 0, 0])
    right = np.cross(forward, up_hint)
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return " ".join(f"{value:.6f}" for value in (*right, *up))


def _camera_xml() -> str:
    lines = []
    for name, (position, target, fovy, _near, _far) in STATIC_CAMERAS.items():
        pos = " ".join(f"{value:.4f}" for value in position)
        lines.append(
            f'<camera name="{name}" pos="{pos}" xyaxes="{_xyaxes(position, target)}" '
            f'fovy="{fovy}"/>'
        )
    return "\n    ".join(lines)


SCENE_TEMPLATE = """<mujoco model="minibench_{task}">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="0.002" integrator="implicitfast"/>
  <visual>
    <global offwidth="{size}" offheight="{size}"/>
    <quality shadowsize="0" offsamples="0"/>
    <map znear="0.005" zfar="5"/>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.5 0.5 0.5"/>
  </visual>
  <statistic extent="1" center="0.2 0 1"/>
  <include file="franka_assets/assets.xml"/>
  <include file="franka_assets/actuator.xml"/>
  <default>
    <default class="object">
      <geom group="1" friction="1.2 0.01 0.001" solref="0.005 1"/>
    </default>
    <default class="marker">
      <geom group="1" contype="0" conaffinity="0"/>
    </default>
  </default>
  <worldbody>
    <light pos="0.4 0 2.5" dir="0 0 -1" directional="true" diffuse="0.5 0.5 0.5"/>
    <geom name="floor" type="plane" size="3 3 0.1" rgba="0.35 0.35 0.38 1" group="1"/>
    <geom name="table" type="box" pos="0.2 0 {table_centre}" size="0.6 0.7 {table_centre}"
          rgba="0.62 0.5 0.38 1" group="1"/>
    {cameras}
    <body name="robot" pos="{robot}">
      <include file="franka_assets/chain.xml"/>
    </body>
    {objects}
  </worldbody>
  {extra}
</mujoco>
"""

WRIST_CAMERA_BODY = "panda0_link7"


@dataclass(frozen=True)
class SceneModel:
    """A compiled scene plus the indices the environment needs, looked up once by name."""

    model: mujoco.MjModel
    arm_qpos: np.ndarray
    arm_dof: np.ndarray
    finger_qpos: np.ndarray
    tip_site: int
    camera_ids: dict[str, int]
    camera_planes: dict[str, tuple[float, float]]


@functools.cache
def _scratch_dir() -> Path:
    """A per-process folder with the `franka_assets` symlink the XML includes need
    (removed when the process exits)."""
    folder = Path(tempfile.mkdtemp(prefix="agnostos-minibench-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.symlink(franka_assets_dir(), folder / "franka_assets")
    return folder


def build_scene(
    task: str, objects_xml: str, extra_xml: str = "", image_size: int = 128
) -> SceneModel:
    """Compile the scene for one task (its bodies in `objects_xml`)."""
    xml = SCENE_TEMPLATE.format(
        task=task,
        size=max(image_size, 64),
        table_centre=TABLE_HEIGHT / 2,
        robot=" ".join(str(value) for value in ROBOT_BASE),
        cameras=_camera_xml(),
        objects=objects_xml,
        extra=extra_xml,
    )
    path = _scratch_dir() / f"{task}.xml"
    path.write_text(xml)
    spec = mujoco.MjSpec.from_file(str(path))
    for geom in list(spec.geoms):
        if geom.classname.name == "panda_viz":
            spec.delete(geom)
    for mesh in list(spec.meshes):
        if mesh.name.endswith("_viz"):
            spec.delete(mesh)
    for body in spec.bodies:
        if body.name.startswith("panda0_"):
            body.gravcomp = 1.0
    # The wrist camera, in link7's frame: 6 cm off-axis beside the hand, looking along the
    # gripper's approach direction (MuJoCo cameras look down their -z).
    wrist_body = spec.body(WRIST_CAMERA_BODY)
    tip = wrist_body.add_site()
    tip.name = TIP_SITE
    tip.pos = list(TIP_SITE_POS)
    tip.quat = [np.cos(-np.pi / 8), 0.0, 0.0, np.sin(-np.pi / 8)]  # -45 deg about z
    tip.size = [0.005, 0.005, 0.005]
    tip.group = 5
    name, fovy, _near, _far = WRIST_CAMERA
    camera = wrist_body.add_camera()
    camera.name = name
    camera.pos = [0.042, -0.042, 0.11]
    camera.quat = [0.0, 1.0, 0.0, 0.0]
    camera.fovy = fovy
    try:
        model = spec.compile()
    except Exception as err:  # MuJoCo reports XML problems as plain exceptions
        raise ValueError(f"minibench task {task!r}: scene does not compile: {err}") from err
    return SceneModel(
        model=model,
        arm_qpos=np.array([model.joint(j).qposadr[0] for j in ARM_JOINTS]),
        arm_dof=np.array([model.joint(j).dofadr[0] for j in ARM_JOINTS]),
        finger_qpos=np.array([model.joint(j).qposadr[0] for j in FINGER_JOINTS]),
        tip_site=model.site(TIP_SITE).id,
        camera_ids={
            camera: model.camera(camera).id for camera in (*STATIC_CAMERAS, WRIST_CAMERA[0])
        },
        camera_planes={
            **{camera: (near, far) for camera, (*_, near, far) in STATIC_CAMERAS.items()},
            WRIST_CAMERA[0]: (WRIST_CAMERA[2], WRIST_CAMERA[3]),
        },
    )
