"""What a minibench task is: objects, variations, layout sampling, success, scripted demo.

A task owns its MJCF bodies (compiled into the shared Panda/table/camera scene), decides
its layout from a seeded `numpy.random.RandomState` (RLBench stores that generator's state
with every demo, and so do we, so a demo's scene can be rebuilt exactly), checks success
after every physics step, and scripts a solution as end-effector keyframes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import mujoco
import numpy as np

from agnostos.envs.minibench.scene import TABLE_HEIGHT, SceneModel
from agnostos.tasks import MINIBENCH_OBJECT_NAMES

# Gripper pointing straight down, fingers closing along world y (quaternion xyzw).
TOP_DOWN = (1.0, 0.0, 0.0, 0.0)

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.1, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "cyan": (0.1, 0.8, 0.85),
    "magenta": (0.85, 0.1, 0.8),
}
COLOUR_NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class Waypoint:
    """One scripted keyframe: gripper tip pose, then the gripper state, as one action."""

    position: tuple[float, float, float]
    gripper_open: bool
    quat: tuple[float, float, float, float] = TOP_DOWN
    ignore_collisions: bool = False

    def action(self) -> np.ndarray:
        return np.array(
            [*self.position, *self.quat, float(self.gripper_open), float(self.ignore_collisions)]
        )


@dataclass
class Layout:
    """One episode's sampled scene: free values a task reads back in success/waypoints."""

    variation: int
    values: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)  # per-episode success state


class MiniTask(ABC):
    """Base class: subclasses set the class attributes and implement the five hooks."""

    name: ClassVar[str]
    variations: ClassVar[int]
    objects_xml: ClassVar[str]
    extra_xml: ClassVar[str] = ""  # top-level MJCF (e.g. <contact> excludes)

    # Instruction templates; the first is the canonical one. Fields come from `words`.
    phrasings: ClassVar[tuple[str, ...]]

    def words(self, variation: int) -> dict[str, str]:
        """The template fields of one variation (by default: its colour)."""
        return {"colour": COLOUR_NAMES[variation]}

    def descriptions(self, variation: int) -> tuple[str, ...]:
        """Instruction phrasings of one variation (the first is the canonical one)."""
        self.check_variation(variation)
        words = self.words(variation)
        return tuple(phrasing.format(**words) for phrasing in self.phrasings)

    @abstractmethod
    def sample(self, rng: np.random.RandomState, variation: int) -> Layout:
        """Draw the episode's layout; all randomness comes from `rng`."""

    @abstractmethod
    def apply(self, scene: SceneModel, data: mujoco.MjData, layout: Layout) -> None:
        """Put the layout into the model/data (positions, colours, joint values)."""

    @abstractmethod
    def success(self, scene: SceneModel, data: mujoco.MjData, layout: Layout) -> bool:
        """Checked after every physics step; may keep state in `layout.memory`."""

    @abstractmethod
    def waypoints(self, scene: SceneModel, data: mujoco.MjData, layout: Layout) -> list[Waypoint]:
        """The scripted solution for the scene as it is after reset."""

    @property
    def object_names(self) -> Mapping[str, str]:
        """Mask (geom) name -> prompt name, from the suite registry in agnostos.tasks."""
        return MINIBENCH_OBJECT_NAMES[self.name]

    def check_variation(self, variation: int) -> None:
        if not 0 <= variation < self.variations:
            raise ValueError(
                f"task {self.name!r} has variations 0..{self.variations - 1}, not {variation}"
            )


# -- small helpers the tasks share ---------------------------------------------------------


def set_free_body(
    scene: SceneModel, data: mujoco.MjData, body: str, position: np.ndarray, yaw: float = 0.0
) -> None:
    """Place a body with a free joint at `position` with rotation `yaw` about z, at rest."""
    joint = scene.model.body(body).jntadr[0]
    qpos = scene.model.jnt_qposadr[joint]
    dof = scene.model.jnt_dofadr[joint]
    data.qpos[qpos : qpos + 3] = position
    data.qpos[qpos + 3 : qpos + 7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
    data.qvel[dof : dof + 6] = 0.0


def set_fixed_body(scene: SceneModel, body: str, position: np.ndarray, yaw: float = 0.0) -> None:
    """Move a body without a free joint (a cabinet, a button base) by editing the model."""
    index = scene.model.body(body).id
    scene.model.body_pos[index] = position
    scene.model.body_quat[index] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]


def set_colour(scene: SceneModel, geom: str, colour: str) -> None:
    scene.model.geom_rgba[scene.model.geom(geom).id, :3] = COLOURS[colour]


def body_position(data: mujoco.MjData, body: str) -> np.ndarray:
    return data.body(body).xpos.copy()


def joint_value(scene: SceneModel, data: mujoco.MjData, joint: str) -> float:
    return float(data.qpos[scene.model.joint(joint).qposadr[0]])


def set_joint_value(scene: SceneModel, data: mujoco.MjData, joint: str, value: float) -> None:
    data.qpos[scene.model.joint(joint).qposadr[0]] = value
    data.qvel[scene.model.joint(joint).dofadr[0]] = 0.0


def spread_positions(
    rng: np.random.RandomState,
    count: int,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    min_distance: float,
) -> np.ndarray:
    """`count` table positions (x, y) at least `min_distance` apart, by rejection sampling."""
    for _ in range(1000):
        points = np.column_stack(
            [rng.uniform(*x_range, size=count), rng.uniform(*y_range, size=count)]
        )
        gaps = np.linalg.norm(points[:, None] - points[None], axis=-1)
        if count < 2 or gaps[np.triu_indices(count, 1)].min() >= min_distance:
            return points
    raise RuntimeError(f"cannot place {count} objects {min_distance} m apart")


def on_table(xy: np.ndarray, height: float) -> np.ndarray:
    """World position of an object whose centre is `height` above the table top."""
    return np.array([xy[0], xy[1], TABLE_HEIGHT + height])
