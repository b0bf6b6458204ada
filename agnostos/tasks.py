"""Task suites: which tasks exist, how they are split, and what their objects are called.

This module is *data*, not logic. Every string below is a fact copied from the public X-ICM
code so that the prompts, task splits and results tables of this package line up with the
original work. Nothing here is meant to be tuned; changing a string changes the observation
text the LLM sees and breaks parity with the published numbers.

Source of facts: ``jiaming-zhou/X-ICM`` at commit ``0a8cd6cd``
(``0a8cd6cd7f3d06a82f5710e45337b475880f0fa5``); file and line references are to that
commit:

* ``form_icl_demonstrations_crosstask_ranking.py`` L142-504: per-task object name maps
  (CoppeliaSim object name -> name used in the prompt), verbatim, typos included
  ("blub", "spok", "forth cup", "shelf" for a safe, "stand_base").
* ``form_icl_demonstrations_crosstask_ranking.py`` L507-552: the seen / unseen handler dicts.
* ``gather_score.py`` L28-53 and L142-148: the canonical unseen-task order, which is also the
  column order of every results table; Level-1 is the first 13 tasks, Level-2 the last 10.

Note on the seen-task order: the source lists the same 18 seen tasks in three different
orders (the handler dict at L507-526, ``gather_score.py`` L7-26 and ``eval_scripts/eval_XICM.sh``
L2-21). We use the handler-dict order, which is the order of the ``xicm_method.md`` §1.1 table.
The seen order affects no score: ``gather_score.py`` only aggregates the unseen tasks.

Note on the object maps: every map in Appendix A was checked against the source file above and
matched verbatim (keys, values and order); no disagreement was found.

A second benchmark (an embedded MuJoCo "minibench") can be added with :func:`register_suite`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

__all__ = [
    "AGNOSTOS",
    "AGNOSTOS_LEVEL1",
    "AGNOSTOS_LEVEL2",
    "AGNOSTOS_OBJECT_NAMES",
    "AGNOSTOS_SEEN_TASKS",
    "AGNOSTOS_SHORT_NAMES",
    "AGNOSTOS_UNSEEN_TASKS",
    "SUITES",
    "Split",
    "TaskSuite",
    "get_suite",
    "register_suite",
]

Split = Literal["seen", "unseen"]


def _freeze(maps: Mapping[str, Mapping[str, str]]) -> Mapping[str, Mapping[str, str]]:
    """Return a read-only copy of a ``task -> {sim_name: prompt_name}`` mapping."""
    return MappingProxyType({task: MappingProxyType(dict(names)) for task, names in maps.items()})


@dataclass(frozen=True)
class TaskSuite:
    """A benchmark: its seen (demo-bank) tasks, unseen (test) tasks, levels and object names.

    ``levels`` maps a level name to the unseen tasks in that level, in canonical order.
    ``object_names`` maps a task to ``{simulator object name: name used in the prompt}``.
    """

    name: str
    seen: tuple[str, ...]
    unseen: tuple[str, ...]
    levels: Mapping[str, tuple[str, ...]]
    object_names: Mapping[str, Mapping[str, str]]

    def __post_init__(self) -> None:
        # Store read-only copies so a suite cannot be changed after registration.
        object.__setattr__(self, "seen", tuple(self.seen))
        object.__setattr__(self, "unseen", tuple(self.unseen))
        levels = {level: tuple(tasks) for level, tasks in self.levels.items()}
        object.__setattr__(self, "levels", MappingProxyType(levels))
        object.__setattr__(self, "object_names", _freeze(self.object_names))

    @property
    def all_tasks(self) -> tuple[str, ...]:
        """Seen tasks followed by unseen tasks."""
        return self.seen + self.unseen

    def level_of(self, task: str) -> str:
        """Name of the level that contains the unseen ``task``."""
        for level, tasks in self.levels.items():
            if task in tasks:
                return level
        raise KeyError(f"{task!r} is not an unseen task of suite {self.name!r}")

    def split_of(self, task: str) -> Split:
        """``"seen"`` or ``"unseen"``."""
        if task in self.seen:
            return "seen"
        if task in self.unseen:
            return "unseen"
        raise KeyError(f"{task!r} is not a task of suite {self.name!r}")


# --- AGNOSTOS (RLBench, PerAct fork) -------------------------------------------------------

# The 18 PerAct training tasks, in handler-dict order (form_icl_…py L507-526, xicm_method.md §1.1).
AGNOSTOS_SEEN_TASKS: tuple[str, ...] = (
    "close_jar",
    "open_drawer",
    "slide_block_to_color_target",
    "sweep_to_dustpan_of_size",
    "meat_off_grill",
    "turn_tap",
    "put_item_in_drawer",
    "stack_blocks",
    "light_bulb_in",
    "put_money_in_safe",
    "place_wine_at_rack_location",
    "put_groceries_in_cupboard",
    "place_shape_in_shape_sorter",
    "push_buttons",
    "stack_cups",
    "place_cups",
    "insert_onto_square_peg",
    "reach_and_drag",
)

# Level-1: 13 tasks sharing partial semantics (objects or motions) with the seen tasks.
AGNOSTOS_LEVEL1: tuple[str, ...] = (
    "put_toilet_roll_on_stand",
    "put_knife_on_chopping_board",
    "close_fridge",
    "close_microwave",
    "close_laptop_lid",
    "phone_on_base",
    "toilet_seat_down",
    "lamp_off",
    "lamp_on",
    "put_books_on_bookshelf",
    "put_umbrella_in_umbrella_stand",
    "open_grill",
    "put_rubbish_in_bin",
)

# Level-2: 10 tasks with entirely novel scenarios.
AGNOSTOS_LEVEL2: tuple[str, ...] = (
    "take_usb_out_of_computer",
    "take_lid_off_saucepan",
    "take_plate_off_colored_dish_rack",
    "basketball_in_hoop",
    "scoop_with_spatula",
    "straighten_rope",
    "turn_oven_on",
    "beat_the_buzz",
    "water_plants",
    "unplug_charger",
)

# The 23 test tasks in canonical gather_score.py order (L28-53), the results-table column order.
AGNOSTOS_UNSEEN_TASKS: tuple[str, ...] = AGNOSTOS_LEVEL1 + AGNOSTOS_LEVEL2

# Column headers of the authors' results table (xicm_method.md §1.2).
AGNOSTOS_SHORT_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "put_toilet_roll_on_stand": "Toilet",
        "put_knife_on_chopping_board": "Knife",
        "close_fridge": "Fridge",
        "close_microwave": "Microwave",
        "close_laptop_lid": "Laptop",
        "phone_on_base": "Phone",
        "toilet_seat_down": "Seat",
        "lamp_off": "LampOff",
        "lamp_on": "LampOn",
        "put_books_on_bookshelf": "Book",
        "put_umbrella_in_umbrella_stand": "Umbrella",
        "open_grill": "Grill",
        "put_rubbish_in_bin": "Bin",
        "take_usb_out_of_computer": "USB",
        "take_lid_off_saucepan": "Lid",
        "take_plate_off_colored_dish_rack": "Plate",
        "basketball_in_hoop": "Ball",
        "scoop_with_spatula": "Scoop",
        "straighten_rope": "Rope",
        "turn_oven_on": "Oven",
        "beat_the_buzz": "Buzz",
        "water_plants": "Plants",
        "unplug_charger": "Charger",
    }
)

# lamp_off and lamp_on use the same scene objects and the same map.
_LAMP_NAMES = {
    "push_button_target": "button",
    "target_button_topPlate": "button topPlate",
    "target_button_wrap": "button wrap",
}

# CoppeliaSim object name -> prompt name, verbatim from form_icl_…py L142-504 (typos included:
# "blub", "spok", "forth cup", "shelf" for the safe, "stand_base"). Inner order is source order.
AGNOSTOS_OBJECT_NAMES: Mapping[str, Mapping[str, str]] = _freeze(
    {
        # Seen tasks (used for the demo text).
        "close_jar": {"jar_lid0": "lid", "jar0": "jar"},
        "open_drawer": {"drawer_bottom": "drawer"},
        "slide_block_to_color_target": {"target1": "target", "block": "block"},
        "sweep_to_dustpan_of_size": {"dustpan_tall": "dustpan", "broom_holder": "broom holder"},
        "meat_off_grill": {"chicken_visual": "chicken", "grill_visual": "grill"},
        "turn_tap": {"tap_left_visual": "left tap", "tap_right_visual": "right tap"},
        "put_item_in_drawer": {"item": "item", "drawer_frame": "drawer"},
        "stack_blocks": {
            "stack_blocks_target0": "first block",
            "stack_blocks_target1": "second block",
            "stack_blocks_target2": "third block",
            "stack_blocks_target3": "fourth block",
            "stack_blocks_target_plane": "plane",
        },
        "light_bulb_in": {"bulb0": "blub", "lamp_screw": "lamp screw"},
        "put_money_in_safe": {"dollar_stack": "money", "safe_body": "shelf"},
        "place_wine_at_rack_location": {"wine_bottle_visual": "wine", "rack_top_visual": "rack"},
        "put_groceries_in_cupboard": {"cupboard": "cupboard", "crackers_visual": "cracker"},
        "place_shape_in_shape_sorter": {"cube": "cube", "shape_sorter_visual": "shape sorter"},
        "push_buttons": {"target_button_wrap0": "button"},
        "insert_onto_square_peg": {
            "square_ring": "ring",
            "pillar0": "first spok",
            "pillar1": "second spok",
            "pillar2": "third spok",
        },
        "stack_cups": {
            "cup1_visual": "first cup",
            "cup2_visual": "second cup",
            "cup3_visual": "third cup",
        },
        "place_cups": {
            "mug_visual1": "first cup",
            "mug_visual0": "second cup",
            "mug_visual2": "third cup",
            "mug_visual3": "forth cup",
            "place_cups_holder_spoke0": "first holder",
            "place_cups_holder_spoke1": "second holder",
            "place_cups_holder_spoke2": "third holder",
        },
        "reach_and_drag": {"stick": "stick", "cube": "cube"},
        # Unseen tasks (used for the query).
        "basketball_in_hoop": {"basket_ball_hoop_visual": "hoop", "ball": "ball"},
        "scoop_with_spatula": {"Cuboid": "cube", "spatula_visual": "spatula"},
        "straighten_rope": {
            "head": "rope head",
            "head_target": "rope head target",
            "head_tail": "rope head tail",
            "tail": "rope tail",
        },
        "turn_oven_on": {
            "oven_door": "oven door",
            "oven_knob_8": "first oven knob",
            "oven_knob_9": "second oven knob",
        },
        "beat_the_buzz": {
            "Cuboid": "cube",
            "wand_visual": "pole",
            "wand_visual_sub": "pole head",
        },
        "water_plants": {
            "waterer_visual": "waterer",
            "plant_visual": "plant",
            "base_visual": "waterer base",
        },
        "unplug_charger": {"charger_visual": "charger", "task_wall": "wall"},
        "phone_on_base": {"phone_visual": "phone", "phone_case_visual": "phone case"},
        "toilet_seat_down": {
            "toilet_seat_up_toilet": "toilet seat up_toilet",
            "toilet_seat_up_seat": "toilet seat up_seat",
            "toilet": "toilet",
        },
        "lamp_off": _LAMP_NAMES,
        "lamp_on": _LAMP_NAMES,
        "put_books_on_bookshelf": {
            "book0_visual": "first book",
            "book1_visual": "second book",
            "book2_visual": "third book",
            "bookshelf_visual": "bookshelf",
        },
        "put_umbrella_in_umbrella_stand": {
            "umbrella_visual": "umbrella",
            "stand_visual": "umbrella stand",
        },
        "open_grill": {"grill_visual": "grill", "lid_visual": "lid", "handle_visual": "handle"},
        "put_rubbish_in_bin": {"rubbish_visual": "rubbish", "bin_visual": "bin"},
        "take_usb_out_of_computer": {"computer_visual": "computer", "usb_visual": "usb"},
        "take_lid_off_saucepan": {
            "saucepan_visual": "saucepan",
            "saucepan_lid_visual": "saucepan lid",
        },
        "take_plate_off_colored_dish_rack": {
            "plate_visual": "plate",
            "dish_rack_pillar0": "first dish rack",
            "dish_rack_pillar1": "second dish rack",
        },
        "close_fridge": {
            "fridge_base_visual": "fridge base",
            "door_top_visual": "fridge top door",
            "door_bottom_visual": "fridge bottom door",
        },
        "close_microwave": {
            "microwave_door": "microwave door",
            "microwave_frame_vis": "microwave frame",
        },
        "close_laptop_lid": {
            "lid_visual": "lid",
            "laptop_holder": "laptop holder",
            "base_visual": "laptop base",
        },
        "put_toilet_roll_on_stand": {
            "toilet_roll_visual": "toilet roll",
            "holder_visual": "holder",
            "stand_base": "stand_base",
        },
        "put_knife_on_chopping_board": {
            "knife_visual": "knife",
            "chopping_board_visual": "chopping board",
        },
    }
)

AGNOSTOS = TaskSuite(
    name="agnostos",
    seen=AGNOSTOS_SEEN_TASKS,
    unseen=AGNOSTOS_UNSEEN_TASKS,
    levels={"level1": AGNOSTOS_LEVEL1, "level2": AGNOSTOS_LEVEL2},
    object_names=AGNOSTOS_OBJECT_NAMES,
)


# --- minibench (the embedded MuJoCo default, agnostos/envs/minibench) ------------------------

MINIBENCH_SEEN_TASKS: tuple[str, ...] = (
    "reach_target",
    "pick_up_block",
    "push_button",
    "open_drawer",
    "slide_block_to_target",
    "place_block_on_target",
)
# Level-1: the objects or motions of seen tasks in new combinations.
MINIBENCH_LEVEL1: tuple[str, ...] = ("stack_blocks", "close_drawer", "push_buttons_in_order")
# Level-2: objects and motions no seen task has.
MINIBENCH_LEVEL2: tuple[str, ...] = ("knock_over_bottle", "close_box_lid", "roll_ball_into_goal")
MINIBENCH_UNSEEN_TASKS: tuple[str, ...] = MINIBENCH_LEVEL1 + MINIBENCH_LEVEL2

_BUTTONS = {
    **{f"button{index}": "button" for index in range(3)},
    **{f"button_base{index}": "button base" for index in range(3)},
}
_DRAWERS = {
    "chest_bottom": "drawer frame",
    "chest_top": "drawer frame",
    "chest_back": "drawer frame",
    **{f"drawer_{side}": f"{side} drawer" for side in ("left", "middle", "right")},
    **{f"handle_{side}": f"{side} handle" for side in ("left", "middle", "right")},
}
# Mask names (MuJoCo geom names) -> prompt names, as AGNOSTOS_OBJECT_NAMES does for RLBench.
MINIBENCH_OBJECT_NAMES: Mapping[str, Mapping[str, str]] = _freeze(
    {
        "reach_target": {
            "target": "target",
            "distractor0": "distractor",
            "distractor1": "distractor",
        },
        "pick_up_block": {"block": "block", "distractor0": "block", "distractor1": "block"},
        "push_button": _BUTTONS,
        "open_drawer": _DRAWERS,
        "slide_block_to_target": {"block": "block", "target": "target", "distractor": "target"},
        "place_block_on_target": {"block": "block", "target": "target", "distractor": "target"},
        "stack_blocks": {"top": "block", "bottom": "block", "distractor": "block"},
        "close_drawer": _DRAWERS,
        "push_buttons_in_order": _BUTTONS,
        "knock_over_bottle": {"bottle": "bottle"},
        "close_box_lid": {"box": "box", "lid": "lid"},
        "roll_ball_into_goal": {
            "ball": "ball",
            "goal_back": "goal",
            "goal_left": "goal",
            "goal_right": "goal",
        },
    }
)

MINIBENCH = TaskSuite(
    name="minibench",
    seen=MINIBENCH_SEEN_TASKS,
    unseen=MINIBENCH_UNSEEN_TASKS,
    levels={"level1": MINIBENCH_LEVEL1, "level2": MINIBENCH_LEVEL2},
    object_names=MINIBENCH_OBJECT_NAMES,
)


# --- Registry -------------------------------------------------------------------------------

SUITES: dict[str, TaskSuite] = {}


def register_suite(suite: TaskSuite) -> TaskSuite:
    """Add ``suite`` to :data:`SUITES`; a name may be registered only once."""
    if suite.name in SUITES:
        raise ValueError(f"task suite {suite.name!r} is already registered")
    SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> TaskSuite:
    """Look up a registered suite by name."""
    try:
        return SUITES[name]
    except KeyError:
        known = ", ".join(sorted(SUITES)) or "none"
        raise KeyError(f"unknown task suite {name!r}; known suites: {known}") from None


register_suite(AGNOSTOS)
register_suite(MINIBENCH)
