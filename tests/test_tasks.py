"""Tests for agnostos.tasks: the AGNOSTOS task lists, object-name maps and suite registry."""

from __future__ import annotations

import pytest

from agnostos import tasks
from agnostos.tasks import (
    AGNOSTOS,
    AGNOSTOS_LEVEL1,
    AGNOSTOS_LEVEL2,
    AGNOSTOS_OBJECT_NAMES,
    AGNOSTOS_SEEN_TASKS,
    AGNOSTOS_SHORT_NAMES,
    AGNOSTOS_UNSEEN_TASKS,
    SUITES,
    TaskSuite,
    get_suite,
    register_suite,
)


def test_task_counts_and_uniqueness() -> None:
    assert len(AGNOSTOS_SEEN_TASKS) == 18
    assert len(AGNOSTOS_UNSEEN_TASKS) == 23
    assert len(set(AGNOSTOS_SEEN_TASKS)) == 18
    assert len(set(AGNOSTOS_UNSEEN_TASKS)) == 23
    assert not set(AGNOSTOS_SEEN_TASKS) & set(AGNOSTOS_UNSEEN_TASKS)


def test_canonical_order_endpoints() -> None:
    assert AGNOSTOS_SEEN_TASKS[:3] == ("close_jar", "open_drawer", "slide_block_to_color_target")
    assert AGNOSTOS_SEEN_TASKS[-1] == "reach_and_drag"
    assert AGNOSTOS_UNSEEN_TASKS[0] == "put_toilet_roll_on_stand"
    assert AGNOSTOS_UNSEEN_TASKS[12] == "put_rubbish_in_bin"
    assert AGNOSTOS_UNSEEN_TASKS[13] == "take_usb_out_of_computer"
    assert AGNOSTOS_UNSEEN_TASKS[-1] == "unplug_charger"


def test_levels_partition_unseen_in_order() -> None:
    assert len(AGNOSTOS_LEVEL1) == 13
    assert len(AGNOSTOS_LEVEL2) == 10
    assert AGNOSTOS_UNSEEN_TASKS[:13] == AGNOSTOS_LEVEL1
    assert AGNOSTOS_UNSEEN_TASKS[13:] == AGNOSTOS_LEVEL2
    assert list(AGNOSTOS.levels) == ["level1", "level2"]
    assert AGNOSTOS.levels["level1"] + AGNOSTOS.levels["level2"] == AGNOSTOS.unseen


def test_short_names() -> None:
    assert tuple(AGNOSTOS_SHORT_NAMES) == AGNOSTOS_UNSEEN_TASKS
    assert len(set(AGNOSTOS_SHORT_NAMES.values())) == 23
    assert AGNOSTOS_SHORT_NAMES["put_toilet_roll_on_stand"] == "Toilet"
    assert AGNOSTOS_SHORT_NAMES["lamp_off"] == "LampOff"
    assert AGNOSTOS_SHORT_NAMES["take_usb_out_of_computer"] == "USB"
    assert AGNOSTOS_SHORT_NAMES["unplug_charger"] == "Charger"


def test_every_task_has_a_nonempty_object_map_and_nothing_else() -> None:
    assert set(AGNOSTOS_OBJECT_NAMES) == set(AGNOSTOS.all_tasks)
    for task in AGNOSTOS.all_tasks:
        names = AGNOSTOS.object_names[task]
        assert names, task
        assert all(sim and prompt for sim, prompt in names.items()), task


@pytest.mark.parametrize(
    ("task", "sim_name", "prompt_name"),
    [
        ("light_bulb_in", "bulb0", "blub"),
        ("insert_onto_square_peg", "pillar0", "first spok"),
        ("insert_onto_square_peg", "pillar2", "third spok"),
        ("place_cups", "mug_visual3", "forth cup"),
        ("place_cups", "mug_visual1", "first cup"),
        ("place_cups", "mug_visual0", "second cup"),
        ("put_money_in_safe", "safe_body", "shelf"),
        ("put_toilet_roll_on_stand", "stand_base", "stand_base"),
        ("stack_blocks", "stack_blocks_target3", "fourth block"),
        ("scoop_with_spatula", "Cuboid", "cube"),
        ("toilet_seat_down", "toilet_seat_up_toilet", "toilet seat up_toilet"),
        ("lamp_on", "target_button_topPlate", "button topPlate"),
        ("close_microwave", "microwave_frame_vis", "microwave frame"),
    ],
)
def test_object_name_spot_checks(task: str, sim_name: str, prompt_name: str) -> None:
    assert AGNOSTOS_OBJECT_NAMES[task][sim_name] == prompt_name


def test_object_map_source_order_is_kept() -> None:
    assert list(AGNOSTOS_OBJECT_NAMES["place_cups"])[:4] == [
        "mug_visual1",
        "mug_visual0",
        "mug_visual2",
        "mug_visual3",
    ]
    assert AGNOSTOS_OBJECT_NAMES["lamp_off"] == AGNOSTOS_OBJECT_NAMES["lamp_on"]


def test_level_of() -> None:
    assert AGNOSTOS.level_of("put_toilet_roll_on_stand") == "level1"
    assert AGNOSTOS.level_of("put_rubbish_in_bin") == "level1"
    assert AGNOSTOS.level_of("take_usb_out_of_computer") == "level2"
    assert AGNOSTOS.level_of("unplug_charger") == "level2"
    with pytest.raises(KeyError, match="close_jar"):
        AGNOSTOS.level_of("close_jar")
    with pytest.raises(KeyError, match="no_such_task"):
        AGNOSTOS.level_of("no_such_task")


def test_split_of() -> None:
    assert AGNOSTOS.split_of("close_jar") == "seen"
    assert AGNOSTOS.split_of("lamp_on") == "unseen"
    with pytest.raises(KeyError, match="no_such_task"):
        AGNOSTOS.split_of("no_such_task")


def test_all_tasks() -> None:
    assert AGNOSTOS.all_tasks == AGNOSTOS_SEEN_TASKS + AGNOSTOS_UNSEEN_TASKS
    assert len(AGNOSTOS.all_tasks) == 41


def test_registry_lookup_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_suite("agnostos") is AGNOSTOS
    assert SUITES["agnostos"] is AGNOSTOS
    with pytest.raises(KeyError, match="agnostos"):
        get_suite("nope")
    with pytest.raises(ValueError, match="agnostos"):
        register_suite(AGNOSTOS)

    monkeypatch.setattr(tasks, "SUITES", dict(SUITES))
    tiny = TaskSuite(
        name="tiny",
        seen=("a",),
        unseen=("b",),
        levels={"level1": ("b",)},
        object_names={"a": {"x": "x"}, "b": {"y": "y"}},
    )
    assert register_suite(tiny) is tiny
    assert get_suite("tiny") is tiny
    assert "tiny" not in SUITES  # only the patched registry saw it


def test_immutability() -> None:
    with pytest.raises(TypeError):
        AGNOSTOS_OBJECT_NAMES["close_jar"]["jar0"] = "bottle"  # type: ignore[index]
    with pytest.raises(TypeError):
        AGNOSTOS.object_names["close_jar"]["jar0"] = "bottle"  # type: ignore[index]
    with pytest.raises(TypeError):
        AGNOSTOS_OBJECT_NAMES["new_task"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        AGNOSTOS.levels["level3"] = ()  # type: ignore[index]
    with pytest.raises(TypeError):
        AGNOSTOS_SHORT_NAMES["lamp_on"] = "Lamp"  # type: ignore[index]
    with pytest.raises(AttributeError):
        AGNOSTOS.name = "other"  # type: ignore[misc]


def test_suite_freezes_plain_inputs() -> None:
    names = {"b": {"y": "y"}}
    suite = TaskSuite(name="t", seen=(), unseen=("b",), levels={"l": ["b"]}, object_names=names)
    names["b"]["y"] = "changed"
    assert suite.object_names["b"]["y"] == "y"
    assert suite.levels["l"] == ("b",)
