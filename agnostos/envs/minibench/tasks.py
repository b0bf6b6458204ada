"""The minibench tasks and their registry (seen: demo bank / training; unseen: test).

Like AGNOSTOS, the unseen tasks come in two levels: Level-1 tasks reuse objects or motions
of seen tasks (stacking the blocks that are picked, closing the drawer that is opened,
pressing the buttons that are pushed, in sequence); Level-2 tasks bring objects and
motions no seen task has (a bottle to knock over, a hinged lid, a rolling ball).
"""

from __future__ import annotations

import mujoco
import numpy as np

from agnostos.envs.minibench.scene import PAD_BELOW_TIP, TABLE_HEIGHT, SceneModel
from agnostos.envs.minibench.task import (
    COLOUR_NAMES,
    Layout,
    MiniTask,
    Waypoint,
    body_position,
    joint_value,
    on_table,
    set_colour,
    set_fixed_body,
    set_free_body,
    set_joint_value,
    spread_positions,
)

BLOCK = 0.02  # half size of the graspable cubes
X_RANGE = (0.0, 0.3)
Y_RANGE = (-0.25, 0.25)


def _colour_pair(variation: int) -> tuple[str, str]:
    """Variation k of a two-colour task: (first, second) over the ordered colour pairs."""
    pairs = [(a, b) for a in COLOUR_NAMES[:4] for b in COLOUR_NAMES[:4] if a != b]
    return pairs[variation]


def _pair_words(variation: int) -> dict[str, str]:
    first, second = _colour_pair(variation)
    return {"first": first, "second": second}


def _others(rng: np.random.RandomState, chosen: str, count: int) -> list[str]:
    pool = [colour for colour in COLOUR_NAMES if colour != chosen]
    return [pool[index] for index in rng.choice(len(pool), size=count, replace=False)]


def _block_xml(name: str) -> str:
    return (
        f'<body name="{name}" pos="0 0 1"><freejoint/>'
        f'<geom name="{name}" class="object" type="box" size="{BLOCK} {BLOCK} {BLOCK}" '
        f'mass="0.05"/></body>'
    )


# -- seen tasks -----------------------------------------------------------------------------


class ReachTarget(MiniTask):
    name = "reach_target"
    variations = len(COLOUR_NAMES)
    objects_xml = "".join(
        f'<body name="{name}" pos="0 0 1"><geom name="{name}" class="marker" type="sphere" '
        f'size="0.025"/></body>'
        for name in ("target", "distractor0", "distractor1")
    )

    phrasings = (
        "reach the {colour} target",
        "touch the {colour} ball with the gripper",
        "move the gripper to the {colour} sphere",
    )

    def sample(self, rng: np.random.RandomState, variation: int) -> Layout:
        xy = spread_positions(rng, 3, X_RANGE, Y_RANGE, 0.12)
        heights = rng.uniform(0.08, 0.35, size=3)
        return Layout(
            variation,
            {
                "positions": [on_table(xy[i], heights[i]) for i in range(3)],
                "distractor_colours": _others(rng, COLOUR_NAMES[variation], 2),
            },
        )

    def apply(self, scene: SceneModel, data: mujoco.MjData, layout: Layout) -> None:
        colours = [COLOUR_NAMES[layout.variation], *layout.values["distractor_colours"]]
        for name, position, colour in zip(
            ("target", "distractor0", "distractor1"),
            layout.values["positions"],
            colours,
            strict=True,
        ):
            set_fixed_body(scene, name, position)
            set_colour(scene, name, colour)

    def success(self, scene: SceneModel, data: mujoco.MjData, layout: Layout) -> bool:
        tip = data.site_xpos[scene.tip_site]
        return bool(np.linalg.norm(tip - layout.values["positions"][0]) < 0.03)

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        return [Waypoint(tuple(layout.values["positions"][0]), True)]


class PickUpBlock(MiniTask):
    name = "pick_up_block"
    variations = len(COLOUR_NAMES)
    objects_xml = "".join(_block_xml(name) for name in ("block", "distractor0", "distractor1"))

    phrasings = (
        "pick up the {colour} block",
        "grasp the {colour} cube and lift it",
        "lift the {colour} block off the table",
    )

    def sample(self, rng: np.random.RandomState, variation: int) -> Layout:
        return Layout(
            variation,
            {
                "xy": spread_positions(rng, 3, X_RANGE, Y_RANGE, 0.1),
                "yaw": rng.uniform(-0.4, 0.4, size=3),
                "distractor_colours": _others(rng, COLOUR_NAMES[variation], 2),
            },
        )

    def apply(self, scene, data, layout) -> None:
        colours = [COLOUR_NAMES[layout.variation], *layout.values["distractor_colours"]]
        for index, name in enumerate(("block", "distractor0", "distractor1")):
            set_free_body(
                scene,
                data,
                name,
                on_table(layout.values["xy"][index], BLOCK + 0.001),
                layout.values["yaw"][index],
            )
            set_colour(scene, name, colours[index])

    def success(self, scene, data, layout) -> bool:
        return bool(body_position(data, "block")[2] > TABLE_HEIGHT + BLOCK + 0.1)

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        return _pick(body_position(data, "block"), lift=0.2)


def _pick(block: np.ndarray, lift: float) -> list[Waypoint]:
    """Above the block; down to it and close; lift (PerAct keyframes: move, then grip)."""
    return [
        Waypoint((block[0], block[1], block[2] + 0.12), True),
        Waypoint((block[0], block[1], block[2] + 0.008), False),
        Waypoint((block[0], block[1], block[2] + lift), False),
    ]


def _yawed_top_down(yaw: float) -> tuple[float, float, float, float]:
    """TOP_DOWN turned by `yaw` about world z (quaternion xyzw)."""
    return (float(np.cos(yaw / 2)), float(np.sin(yaw / 2)), 0.0, 0.0)


def _push(start: np.ndarray, end: np.ndarray, height: float) -> list[Waypoint]:
    """Close above `start`, go down beside the object, push in a straight line to `end`.

    The fingers travel along the push direction, so the closed pads meet the object with
    their 4 cm-wide face.
    """
    direction = np.arctan2(end[1] - start[1], end[0] - start[0])
    yaw = (direction - np.pi / 2 + np.pi / 2) % np.pi - np.pi / 2  # the hand is symmetric
    quat = _yawed_top_down(yaw)
    z = TABLE_HEIGHT + height
    return [
        Waypoint((start[0], start[1], z + 0.1), False, quat),
        Waypoint((start[0], start[1], z), False, quat),
        Waypoint((end[0], end[1], z), False, quat),
    ]


def _fingers_open(scene: SceneModel, data: mujoco.MjData) -> bool:
    return bool(np.all(data.qpos[scene.finger_qpos] > 0.03))


def _zone_xml(name: str, half: float = 0.04) -> str:
    return (
        f'<body name="{name}" pos="0 0 1"><geom name="{name}" class="marker" type="box" '
        f'size="{half} {half} 0.001"/></body>'
    )


def _button_xml(index: int) -> str:
    return (
        f'<body name="button_base{index}" pos="0 0 1">'
        f'<geom name="button_base{index}" class="object" type="box" size="0.035 0.035 0.01" '
        f'pos="0 0 0.01" rgba="0.3 0.3 0.3 1"/>'
        f'<body name="button{index}" pos="0 0 0.028">'
        f'<joint name="button{index}" type="slide" axis="0 0 1" range="-0.015 0" '
        f'stiffness="300" damping="2"/>'
        f'<geom name="button{index}" class="object" type="cylinder" size="0.025 0.008" '
        f'mass="0.02"/></body></body>'
    )


BUTTON_TOP = 0.036  # cap top above the table
PRESSED = -0.008


def _button_pressed(scene: SceneModel, data: mujoco.MjData, index: int) -> bool:
    return joint_value(scene, data, f"button{index}") < PRESSED


def _press(position: np.ndarray) -> list[Waypoint]:
    """Above the button with the gripper closed, then down 1.2 cm into the cap."""
    top = TABLE_HEIGHT + BUTTON_TOP
    above = Waypoint((position[0], position[1], top + 0.1), False)
    press = Waypoint((position[0], position[1], top + PAD_BELOW_TIP - 0.012), False)
    return [above, press]


class _Buttons(MiniTask):
    """Three buttons of different colours on the table."""

    objects_xml = "".join(_button_xml(index) for index in range(3))
    extra_xml = (
        "<contact>"
        + "".join(f'<exclude body1="button_base{i}" body2="button{i}"/>' for i in range(3))
        + "</contact>"
    )

    def _layout(self, rng: np.random.RandomState, variation: int, colours: list[str]) -> Layout:
        pool = [colour for colour in COLOUR_NAMES if colour not in colours]
        extra = [pool[index] for index in rng.choice(len(pool), 3 - len(colours), replace=False)]
        return Layout(
            variation,
            {"xy": spread_positions(rng, 3, X_RANGE, Y_RANGE, 0.13), "colours": colours + extra},
        )

    def apply(self, scene, data, layout) -> None:
        for index in range(3):
            set_fixed_body(scene, f"button_base{index}", on_table(layout.values["xy"][index], 0))
            set_colour(scene, f"button{index}", layout.values["colours"][index])

    def _position(self, data: mujoco.MjData, index: int) -> np.ndarray:
        return body_position(data, f"button{index}")


class PushButton(_Buttons):
    name = "push_button"
    variations = len(COLOUR_NAMES)

    phrasings = (
        "push the {colour} button",
        "press down the {colour} button",
        "press the button that is {colour}",
    )

    def sample(self, rng, variation) -> Layout:
        return self._layout(rng, variation, [COLOUR_NAMES[variation]])

    def success(self, scene, data, layout) -> bool:
        return _button_pressed(scene, data, 0)

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        return _press(self._position(data, 0))


DRAWERS = ("left", "middle", "right")  # seen from the robot: left is +y
DRAWER_WIDTH = 0.12
DRAWER_OPEN = 0.15


def _chest_xml() -> str:
    """A chest of three drawers side by side, fronts facing the robot (-x)."""
    walls = (
        '<geom name="chest_bottom" class="object" type="box" size="0.0825 0.2 0.005" '
        'pos="0.0075 0 0.005" rgba="0.45 0.32 0.2 1"/>'
        '<geom name="chest_top" class="object" type="box" size="0.0825 0.2 0.005" '
        'pos="0.0075 0 0.125" rgba="0.45 0.32 0.2 1"/>'
        '<geom name="chest_back" class="object" type="box" size="0.005 0.2 0.065" '
        'pos="0.085 0 0.065" rgba="0.45 0.32 0.2 1"/>'
    )
    drawers = []
    for index, label in enumerate(DRAWERS):
        y = (1 - index) * (DRAWER_WIDTH + 0.01)
        drawers.append(
            f'<body name="drawer_{label}" pos="0 {y:.3f} 0.065">'
            f'<joint name="drawer_{label}" type="slide" axis="-1 0 0" range="0 {DRAWER_OPEN}" '
            f'damping="8"/>'
            f'<geom name="drawer_{label}" class="object" type="box" '
            f'size="0.075 {DRAWER_WIDTH / 2:.3f} 0.05" pos="0 0 0" mass="0.3" '
            f'rgba="0.7 0.55 0.35 1"/>'
            f'<geom name="handle_{label}" class="object" type="capsule" size="0.008" '
            f'fromto="-0.16 -0.04 0 -0.16 0.04 0" rgba="0.2 0.2 0.2 1"/>'
            f'<geom name="handle_post_{label}_a" class="object" type="box" '
            f'size="0.0425 0.005 0.005" pos="-0.1175 -0.04 0" rgba="0.2 0.2 0.2 1"/>'
            f'<geom name="handle_post_{label}_b" class="object" type="box" '
            f'size="0.0425 0.005 0.005" pos="-0.1175 0.04 0" rgba="0.2 0.2 0.2 1"/>'
            f"</body>"
        )
    return f'<body name="chest" pos="0 0 1">{walls}{"".join(drawers)}</body>'


CHEST_EXCLUDES = (
    "<contact>"
    + "".join(f'<exclude body1="chest" body2="drawer_{label}"/>' for label in DRAWERS)
    + "</contact>"
)
HANDLE_X = -0.16  # handle bar, relative to the drawer centre
HOOK_DEPTH = 0.02  # finger pads this far below the bar's axis


class _Drawers(MiniTask):
    variations = len(DRAWERS)
    objects_xml = _chest_xml()
    extra_xml = CHEST_EXCLUDES
    start_open = 0.0
    chest_x = (0.2, 0.3)  # an open drawer reaches 0.3 m towards the robot: keep it reachable

    def sample(self, rng, variation) -> Layout:
        return Layout(
            variation,
            {"xy": np.array([rng.uniform(*self.chest_x), rng.uniform(-0.1, 0.1)])},
        )

    def apply(self, scene, data, layout) -> None:
        set_fixed_body(scene, "chest", on_table(layout.values["xy"], 0.0))
        for label in DRAWERS:
            opened = self.start_open if label == DRAWERS[layout.variation] else 0.0
            set_joint_value(scene, data, f"drawer_{label}", opened)

    def words(self, variation: int) -> dict[str, str]:
        return {"drawer": DRAWERS[variation]}

    def _opening(self, scene, data, layout) -> float:
        return joint_value(scene, data, f"drawer_{DRAWERS[layout.variation]}")

    def _handle(self, data: mujoco.MjData, layout: Layout) -> np.ndarray:
        centre = body_position(data, f"drawer_{DRAWERS[layout.variation]}")
        return centre + np.array([HANDLE_X, 0.0, 0.0])


class OpenDrawer(_Drawers):
    name = "open_drawer"

    phrasings = (
        "open the {drawer} drawer",
        "grip the {drawer} handle and pull the {drawer} drawer open",
        "slide the {drawer} drawer open",
    )

    def success(self, scene, data, layout) -> bool:
        return self._opening(scene, data, layout) > 0.1

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        # Closed fingers (4 cm thick along x) go down in the 7.7 cm gap behind the bar.
        handle = self._handle(data, layout)
        x, y, z = handle[0] + 0.0465, handle[1], handle[2] + PAD_BELOW_TIP - HOOK_DEPTH
        return [
            Waypoint((x, y, z + 0.12), False),
            Waypoint((x, y, z), False),
            Waypoint((x - DRAWER_OPEN, y, z), False),
        ]


class SlideBlockToTarget(MiniTask):
    name = "slide_block_to_target"
    variations = 4
    objects_xml = (
        '<body name="block" pos="0 0 1"><freejoint/><geom name="block" class="object" '
        'type="box" size="0.025 0.025 0.025" mass="0.1" rgba="0.9 0.9 0.9 1"/></body>'
        + _zone_xml("target")
        + _zone_xml("distractor")
    )

    phrasings = (
        "slide the block to the {colour} target",
        "push the block onto the {colour} square",
        "move the block until it is on the {colour} target",
    )

    def sample(self, rng, variation) -> Layout:
        block = np.array([rng.uniform(0.05, 0.2), rng.uniform(-0.15, 0.15)])
        angle = rng.uniform(-np.pi / 2, np.pi / 2)  # pushed away from the robot's side
        distance = rng.uniform(0.12, 0.18)
        target = block + distance * np.array([np.cos(angle), np.sin(angle)])
        other = block + distance * np.array([np.cos(angle + np.pi / 2), np.sin(angle + np.pi / 2)])
        if other[0] < -0.05:
            other = block + distance * np.array(
                [np.cos(angle - np.pi / 2), np.sin(angle - np.pi / 2)]
            )
        return Layout(
            variation,
            {
                "block": block,
                "target": target,
                "distractor": other,
                "distractor_colour": _others(rng, COLOUR_NAMES[variation], 1)[0],
            },
        )

    def apply(self, scene, data, layout) -> None:
        values = layout.values
        set_free_body(scene, data, "block", on_table(values["block"], 0.0255))
        set_fixed_body(scene, "target", on_table(values["target"], 0.001))
        set_fixed_body(scene, "distractor", on_table(values["distractor"], 0.001))
        set_colour(scene, "target", COLOUR_NAMES[layout.variation])
        set_colour(scene, "distractor", values["distractor_colour"])

    def success(self, scene, data, layout) -> bool:
        offset = body_position(data, "block")[:2] - layout.values["target"]
        return bool(np.all(np.abs(offset) < 0.03))

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        block = body_position(data, "block")[:2]
        target = layout.values["target"]
        direction = (target - block) / np.linalg.norm(target - block)
        start = block - direction * 0.06
        end = target - direction * 0.035
        return _push(start, end, height=0.02)


class PlaceBlockOnTarget(MiniTask):
    name = "place_block_on_target"
    variations = 4
    objects_xml = _block_xml("block") + _zone_xml("target") + _zone_xml("distractor")

    phrasings = (
        "put the block on the {colour} target",
        "pick up the block and place it on the {colour} square",
        "place the cube onto the {colour} target",
    )

    def sample(self, rng, variation) -> Layout:
        return Layout(
            variation,
            {
                "xy": spread_positions(rng, 3, X_RANGE, Y_RANGE, 0.12),
                "distractor_colour": _others(rng, COLOUR_NAMES[variation], 1)[0],
            },
        )

    def apply(self, scene, data, layout) -> None:
        xy = layout.values["xy"]
        set_free_body(scene, data, "block", on_table(xy[0], BLOCK + 0.001))
        set_colour(scene, "block", "yellow" if layout.variation != 3 else "cyan")
        set_fixed_body(scene, "target", on_table(xy[1], 0.001))
        set_fixed_body(scene, "distractor", on_table(xy[2], 0.001))
        set_colour(scene, "target", COLOUR_NAMES[layout.variation])
        set_colour(scene, "distractor", layout.values["distractor_colour"])

    def success(self, scene, data, layout) -> bool:
        block = body_position(data, "block")
        inside = np.all(np.abs(block[:2] - layout.values["xy"][1]) < 0.03)
        resting = block[2] < TABLE_HEIGHT + BLOCK + 0.004
        return bool(inside and resting and _fingers_open(scene, data))

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        block = body_position(data, "block")
        return _pick(block, lift=0.12) + _place(
            np.array([*layout.values["xy"][1], TABLE_HEIGHT + BLOCK])
        )


def _place(resting_centre: np.ndarray) -> list[Waypoint]:
    """Carry above the spot, lower until the held block's centre is just above it, open."""
    x, y, z = resting_centre
    return [
        Waypoint((x, y, z + 0.12), False),
        Waypoint((x, y, z + 0.008 + 0.004), True),
    ]


# -- unseen tasks ---------------------------------------------------------------------------


class StackBlocks(MiniTask):
    """Level-1: the blocks of pick_up_block, the place motion of place_block_on_target."""

    name = "stack_blocks"
    variations = 12
    objects_xml = "".join(_block_xml(name) for name in ("top", "bottom", "distractor"))

    phrasings = (
        "stack the {first} block on the {second} block",
        "put the {first} cube on top of the {second} cube",
        "place the {first} block onto the {second} one",
    )

    def words(self, variation: int) -> dict[str, str]:
        return _pair_words(variation)

    def sample(self, rng, variation) -> Layout:
        colours = list(_colour_pair(variation))
        pool = [colour for colour in COLOUR_NAMES if colour not in colours]
        return Layout(
            variation,
            {
                "xy": spread_positions(rng, 3, X_RANGE, Y_RANGE, 0.12),
                "colours": [*colours, pool[rng.randint(len(pool))]],
            },
        )

    def apply(self, scene, data, layout) -> None:
        for index, name in enumerate(("top", "bottom", "distractor")):
            set_free_body(scene, data, name, on_table(layout.values["xy"][index], BLOCK + 0.001))
            set_colour(scene, name, layout.values["colours"][index])

    def success(self, scene, data, layout) -> bool:
        top, bottom = body_position(data, "top"), body_position(data, "bottom")
        aligned = np.linalg.norm(top[:2] - bottom[:2]) < 0.015
        stacked = abs(top[2] - bottom[2] - 2 * BLOCK) < 0.006
        return bool(aligned and stacked and _fingers_open(scene, data))

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        top, bottom = body_position(data, "top"), body_position(data, "bottom")
        return _pick(top, lift=0.12) + _place(bottom + np.array([0, 0, 2 * BLOCK]))


class CloseDrawer(_Drawers):
    """Level-1: the chest of open_drawer, pushed instead of pulled."""

    name = "close_drawer"
    start_open = 0.13
    chest_x = (0.3, 0.38)

    phrasings = (
        "close the {drawer} drawer",
        "push the {drawer} drawer shut",
        "slide the {drawer} drawer closed",
    )

    def success(self, scene, data, layout) -> bool:
        return self._opening(scene, data, layout) < 0.02

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        handle = self._handle(data, layout)
        x, y, z = handle[0] - 0.035, handle[1], handle[2] + PAD_BELOW_TIP - HOOK_DEPTH
        return [
            Waypoint((x, y, z + 0.12), False),
            Waypoint((x, y, z), False),
            Waypoint((x + self.start_open + 0.01, y, z), False),
        ]


class PushButtonsInOrder(_Buttons):
    """Level-1: the buttons of push_button, two presses in a given order."""

    name = "push_buttons_in_order"
    variations = 12

    phrasings = (
        "push the {first} button, then the {second} button",
        "press the {first} button and after it the {second} one",
        "first press {first}, then press {second}",
    )

    def words(self, variation: int) -> dict[str, str]:
        return _pair_words(variation)

    def sample(self, rng, variation) -> Layout:
        return self._layout(rng, variation, list(_colour_pair(variation)))

    def success(self, scene, data, layout) -> bool:
        memory = layout.memory
        if _button_pressed(scene, data, 1) and not memory.get("first"):
            memory["wrong_order"] = True
        if _button_pressed(scene, data, 0):
            memory["first"] = True
        return bool(
            memory.get("first")
            and not memory.get("wrong_order")
            and _button_pressed(scene, data, 1)
        )

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        return _press(self._position(data, 0)) + _press(self._position(data, 1))


class KnockOverBottle(MiniTask):
    """Level-2: a new object (a tall bottle) and a new motion (a high sideways strike)."""

    name = "knock_over_bottle"
    variations = 4
    objects_xml = (
        '<body name="bottle" pos="0 0 1"><freejoint/><geom name="bottle" class="object" '
        'type="cylinder" size="0.025 0.08" mass="0.15"/></body>'
    )

    phrasings = (
        "knock over the {colour} bottle",
        "push the {colour} bottle so that it falls over",
        "topple the {colour} bottle",
    )

    def sample(self, rng, variation) -> Layout:
        return Layout(
            variation, {"xy": np.array([rng.uniform(0.05, 0.25), rng.uniform(-0.2, 0.2)])}
        )

    def apply(self, scene, data, layout) -> None:
        set_free_body(scene, data, "bottle", on_table(layout.values["xy"], 0.0805))
        set_colour(scene, "bottle", COLOUR_NAMES[layout.variation])

    def success(self, scene, data, layout) -> bool:
        upright = data.body("bottle").xmat.reshape(3, 3)[2, 2]
        return bool(upright < 0.5)

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        bottle = body_position(data, "bottle")[:2]
        start = bottle - np.array([0.08, 0.0])
        end = bottle + np.array([0.06, 0.0])
        return _push(start, end, height=0.14)


LID_LENGTH = 0.11
LID_OPEN = 1.65  # radians: just past vertical, resting on its stop


class CloseBoxLid(MiniTask):
    """Level-2: a hinged lid, tipped over its hinge and left to fall shut."""

    name = "close_box_lid"
    variations = 3
    objects_xml = (
        '<body name="box" pos="0 0 1">'
        '<geom name="box" class="object" type="box" size="0.06 0.06 0.03" pos="0 0 0.03"/>'
        '<body name="lid" pos="0.06 0 0.062">'
        f'<joint name="lid" type="hinge" axis="0 1 0" range="0 {LID_OPEN + 0.05}" '
        'damping="0.0005"/>'
        f'<geom name="lid" class="object" type="box" size="{LID_LENGTH / 2} 0.06 0.003" '
        f'pos="{-LID_LENGTH / 2} 0 0" mass="0.05"/></body></body>'
    )
    extra_xml = '<contact><exclude body1="box" body2="lid"/></contact>'  # the hinge stops it

    phrasings = (
        "close the lid of the {colour} box",
        "shut the {colour} box",
        "push the lid of the {colour} box closed",
    )

    def sample(self, rng, variation) -> Layout:
        return Layout(
            variation, {"xy": np.array([rng.uniform(0.05, 0.2), rng.uniform(-0.15, 0.15)])}
        )

    def apply(self, scene, data, layout) -> None:
        set_fixed_body(scene, "box", on_table(layout.values["xy"], 0.0))
        set_colour(scene, "box", COLOUR_NAMES[layout.variation])
        set_colour(scene, "lid", COLOUR_NAMES[layout.variation])
        set_joint_value(scene, data, "lid", LID_OPEN + 0.05)

    def success(self, scene, data, layout) -> bool:
        return joint_value(scene, data, "lid") < 0.1

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        hinge = body_position(data, "lid")
        quat = _yawed_top_down(np.pi / 2)
        z = hinge[2] + LID_LENGTH + 0.01
        return [
            Waypoint((hinge[0] + 0.06, hinge[1], z + 0.08), False, quat),
            Waypoint((hinge[0] + 0.06, hinge[1], z), False, quat),
            Waypoint((hinge[0] - 0.01, hinge[1], z), False, quat),
            Waypoint((hinge[0] - 0.01, hinge[1], z + 0.1), False, quat),
        ]


class RollBallIntoGoal(MiniTask):
    """Level-2: a ball that rolls, and a goal with walls."""

    name = "roll_ball_into_goal"
    variations = 3
    objects_xml = (
        '<body name="ball" pos="0 0 1"><freejoint/><geom name="ball" class="object" '
        'type="sphere" size="0.025" mass="0.05" condim="6" friction="1 0.005 0.0005"/></body>'
        '<body name="goal" pos="0 0 1">'
        '<geom name="goal_back" class="object" type="box" size="0.005 0.08 0.02" '
        'pos="0.06 0 0.02"/>'
        '<geom name="goal_left" class="object" type="box" size="0.06 0.005 0.02" '
        'pos="0 0.08 0.02"/>'
        '<geom name="goal_right" class="object" type="box" size="0.06 0.005 0.02" '
        'pos="0 -0.08 0.02"/></body>'
    )

    phrasings = (
        "roll the {colour} ball into the goal",
        "push the {colour} ball between the goal walls",
        "score a goal with the {colour} ball",
    )

    def sample(self, rng, variation) -> Layout:
        ball = np.array([rng.uniform(0.0, 0.08), rng.uniform(-0.15, 0.15)])
        goal = np.array([ball[0] + rng.uniform(0.18, 0.24), ball[1] + rng.uniform(-0.03, 0.03)])
        return Layout(variation, {"ball": ball, "goal": goal})

    def apply(self, scene, data, layout) -> None:
        set_free_body(scene, data, "ball", on_table(layout.values["ball"], 0.0255))
        set_fixed_body(scene, "goal", on_table(layout.values["goal"], 0.0))
        set_colour(scene, "ball", COLOUR_NAMES[layout.variation])

    def success(self, scene, data, layout) -> bool:
        offset = body_position(data, "ball")[:2] - layout.values["goal"]
        return bool(abs(offset[0]) < 0.055 and abs(offset[1]) < 0.075)

    def waypoints(self, scene, data, layout) -> list[Waypoint]:
        ball = body_position(data, "ball")[:2]
        goal = layout.values["goal"]
        direction = (goal - ball) / np.linalg.norm(goal - ball)
        return _push(ball - direction * 0.06, goal - direction * 0.07, height=0.02)


SEEN_TASKS: tuple[MiniTask, ...] = (
    ReachTarget(),
    PickUpBlock(),
    PushButton(),
    OpenDrawer(),
    SlideBlockToTarget(),
    PlaceBlockOnTarget(),
)
LEVEL1_TASKS: tuple[MiniTask, ...] = (StackBlocks(), CloseDrawer(), PushButtonsInOrder())
LEVEL2_TASKS: tuple[MiniTask, ...] = (KnockOverBottle(), CloseBoxLid(), RollBallIntoGoal())
TASKS: dict[str, MiniTask] = {
    task.name: task for task in (*SEEN_TASKS, *LEVEL1_TASKS, *LEVEL2_TASKS)
}
