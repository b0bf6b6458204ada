"""X-ICM's reply parser, outcome for outcome (xicm_method.md 5.3), and the strict mode."""

from __future__ import annotations

import numpy as np
import pytest

from agnostos.evaluation.agents.xicm_reply import HOME_CODE, MAX_CODES, parse_reply

A = (57, 49, 87, 0, 39, 0, 1)
B = (12, 99, 3, 71, 8, 64, 0)
HOME_26 = (HOME_CODE,) * MAX_CODES

# (reply, parity codes, parity status): what X-ICM's re_match + _postprocess produce.
PARITY_CORPUS = [
    ("[[57, 49, 87, 0, 39, 0, 1], [12, 99, 3, 71, 8, 64, 0]]", (A, B), "ok"),
    ("[[57,49,87,0,39,0,1]]", (A,), "ok"),
    ("Sure! The actions are [[57, 49, 87, 0, 39, 0, 1]]. Done.", (A,), "ok"),  # prose
    ("[[[57, 49, 87, 0, 39, 0, 1]]]", (A,), "ok"),  # nested: innermost group
    ("[[57, 49, 87, 0, 39, 0, 1], [12, 99, 3", (A,), "ok"),  # truncated last list dropped
    ("[[1, 2, 3, 4, 5, 6], [57, 49, 87, 0, 39, 0, 1]]", (A,), "ok"),  # 6 integers skipped
    ("[[1, 2, 3, 4, 5, 6, 7, 8]]", (HOME_CODE,), "no_actions"),  # 8 integers skipped
    ("[[1, 2, 3, 4, 5, 6]]", (HOME_CODE,), "no_actions"),
    ("", (HOME_CODE,), "no_actions"),
    ("I cannot do that.", (HOME_CODE,), "no_actions"),
    ("[[]]", (HOME_CODE,), "no_actions"),  # no digit: not a group
    ("[[57.5, 49, 87, 0, 39, 0, 1]]", HOME_26, "int_error"),  # a float anywhere
    ("[['57', '49', '87', '0', '39', '0', '1']]", HOME_26, "int_error"),  # quoted numbers
    ("[step 1] then [[57, 49, 87, 0, 39, 0, 1]]", HOME_26, "int_error"),  # words + a digit
    ("[[57, 49, 87, 0, 39, 0, 1], [1,, 2]]", HOME_26, "int_error"),  # an empty item
    ("[[-3, 49, 87, 0, 39, 0, 1]]", ((-3, 49, 87, 0, 39, 0, 1),), "ok"),  # no range check
    ("[[57, 49, 87, 0, 39, 0, 7]]", ((57, 49, 87, 0, 39, 0, 7),), "ok"),
    ("{'button': [47, 52, 77]}", (HOME_CODE,), "no_actions"),  # an echoed observation
]


@pytest.mark.parametrize(("reply", "codes", "status"), PARITY_CORPUS)
def test_parity_parser_gives_xicms_outcome(reply: str, codes, status: str) -> None:
    parsed = parse_reply(reply, "parity")
    assert (parsed.codes, parsed.status) == (codes, status)
    assert parsed.fallback == (status != "ok")


def test_parity_keeps_at_most_26_actions_in_order() -> None:
    codes = [(i, 0, 0, 0, 0, 0, 1) for i in range(30)]
    parsed = parse_reply(str([list(code) for code in codes]), "parity")
    assert parsed.codes == tuple(codes[:26]) and parsed.status == "ok"


STRICT_CORPUS = [
    ("[[57, 49, 87, 0, 39, 0, 1]]", (A,), "ok", None),
    ("[[-3, 49, 87, 0, 39, 0, 1], [57, 49, 87, 0, 39, 0, 1]]", (A,), "invalid", "'-3'"),
    ("[[57, 49, 87, 0, 72, 0, 1]]", (), "no_actions", "ry = 72 is outside 0..71"),
    ("[[57, 49, 100, 0, 39, 0, 1]]", (), "no_actions", "vz = 100 is outside 0..99"),
    ("[[57, 49, 87, 0, 39, 0, 2]]", (), "no_actions", "g = 2 is outside 0..1"),
    ("[[57.5, 49, 87, 0, 39, 0, 1], [57, 49, 87, 0, 39, 0, 1]]", (A,), "invalid", "57.5"),
    ("[[1, 2, 3, 4, 5, 6]]", (), "no_actions", "6 numbers instead of 7"),
    ("", (), "no_actions", "no list of 7 integers"),
]


@pytest.mark.parametrize(("reply", "codes", "status", "problem"), STRICT_CORPUS)
def test_strict_parser_keeps_valid_actions_and_names_the_problem(reply, codes, status, problem):
    parsed = parse_reply(reply, "strict")
    assert (parsed.codes, parsed.status) == (codes, status)
    if problem is None:
        assert parsed.problem is None
    else:
        assert problem in parsed.problem


def test_strict_caps_the_number_of_actions() -> None:
    parsed = parse_reply(str([list(A)] * 27), "strict")
    assert len(parsed.codes) == 26 and parsed.status == "invalid" and "27 actions" in parsed.problem


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown parsing mode 'lenient'"):
        parse_reply("[]", "lenient")


def test_home_code_decodes_to_xicms_raised_gripper_down_pose() -> None:
    """xicm_method.md 5.3: xyz about (0.275, -0.005, 1.475), quaternion about
    (0, 0.991, 0, 0.131), gripper open, ignore_collisions 1."""
    from agnostos.observation_text import XICM_CODEC

    action = XICM_CODEC.decode(np.asarray([HOME_CODE]))[0]
    np.testing.assert_allclose(action[:3], [0.275, -0.005, 1.475], atol=1e-9)
    quaternion = action[3:7] * np.sign(action[4])
    np.testing.assert_allclose(quaternion, [0.0, 0.991, 0.0, 0.131], atol=1e-3)
    assert action[7] == 1.0 and action[8] == 1.0
