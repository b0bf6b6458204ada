"""Reading an LLM's reply as X-ICM keyframe codes: X-ICM's own parser, and a strict one.

Parity mode is X-ICM's `re_match` + `_postprocess` (`xicm_method.md` section 5.3), outcome
for outcome:

- the innermost bracket groups that contain a digit are found in order;
- every item of every such group goes through `int()`; if any item of any group fails
  (a float, a quoted word, an echoed observation dict), the whole reply becomes 26 copies
  of the home code `[57, 49, 87, 0, 39, 0, 1]`;
- groups of exactly 7 integers are kept, in order; other lengths are skipped silently;
- nothing kept gives one home code (the agent then asks again at the next step);
- at most 26 codes; values are never range-checked (the simulator refuses bad poses).

Strict mode (`parsing: strict`, opt-in) reads the same groups but reports every problem
(non-integers, wrong lengths, values outside 0-99 / 0-71 / 0-1, nothing found, more than
26) so the agent can ask once more with the problem stated; only valid codes are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "HOME_CODE",
    "MAX_CODES",
    "PARSING_MODES",
    "ParsedReply",
    "parse_reply",
    "reask_message",
]

HOME_CODE: tuple[int, ...] = (57, 49, 87, 0, 39, 0, 1)
MAX_CODES = 26
PARSING_MODES = ("parity", "strict")

# X-ICM's pattern: an innermost [...] group holding at least one digit.
_GROUP = re.compile(r"\[([^\[\]]+\d[^\[\]]*)\]")
_LIMITS = ((0, 99),) * 3 + ((0, 71),) * 3 + ((0, 1),)
_FIELDS = ("vx", "vy", "vz", "rx", "ry", "rz", "g")


@dataclass(frozen=True)
class ParsedReply:
    """The codes to execute and how the reply was read.

    status: `ok`; parity: `no_actions` (one home code), `int_error` (26 home codes);
    strict: `invalid` (some groups refused, the valid ones kept) or `no_actions`.
    problem: what was wrong, in words the LLM can be shown (None when `ok`).
    """

    codes: tuple[tuple[int, ...], ...]
    status: str
    problem: str | None = None

    @property
    def fallback(self) -> bool:
        """True when nothing of the reply can be executed (home codes take its place)."""
        return self.status in ("no_actions", "int_error")


def parse_reply(text: str, mode: str = "parity") -> ParsedReply:
    """The reply's codes, read as `mode` (`parity` or `strict`) says."""
    if mode == "parity":
        return _parse_parity(text)
    if mode == "strict":
        return _parse_strict(text)
    raise ValueError(f"unknown parsing mode {mode!r}; choose one of {', '.join(PARSING_MODES)}")


def _parse_parity(text: str) -> ParsedReply:
    try:
        groups = [
            [int(item.strip()) for item in group.split(",")] for group in _GROUP.findall(text)
        ]
    except ValueError as error:
        return ParsedReply((HOME_CODE,) * MAX_CODES, "int_error", str(error))
    codes = tuple(tuple(group) for group in groups if len(group) == len(HOME_CODE))
    if not codes:
        return ParsedReply((HOME_CODE,), "no_actions", "no list of 7 integers found")
    return ParsedReply(codes[:MAX_CODES], "ok")


def _group_problem(items: list[str]) -> tuple[tuple[int, ...] | None, str | None]:
    """(code, None) for a valid group, else (None, the problem)."""
    values = []
    for item in items:
        stripped = item.strip()
        if not re.fullmatch(r"\d+", stripped):
            return None, f"{stripped!r} is not a non-negative integer"
        values.append(int(stripped))
    if len(values) != len(HOME_CODE):
        return None, f"an action has {len(values)} numbers instead of 7"
    for value, name, (low, high) in zip(values, _FIELDS, _LIMITS, strict=True):
        if not low <= value <= high:
            return None, f"{name} = {value} is outside {low}..{high}"
    return tuple(values), None


def _parse_strict(text: str) -> ParsedReply:
    codes: list[tuple[int, ...]] = []
    problems: list[str] = []
    for group in _GROUP.findall(text):
        code, problem = _group_problem(group.split(","))
        if code is None:
            problems.append(problem or "invalid action")
        else:
            codes.append(code)
    if len(codes) > MAX_CODES:
        problems.append(f"{len(codes)} actions; at most {MAX_CODES} are allowed")
        codes = codes[:MAX_CODES]
    if not codes:
        return ParsedReply((), "no_actions", "; ".join(problems) or "no list of 7 integers found")
    if problems:
        return ParsedReply(tuple(codes), "invalid", "; ".join(dict.fromkeys(problems)))
    return ParsedReply(tuple(codes), "ok")


def reask_message(problem: str) -> str:
    """The user turn that asks again once, stating what was wrong (strict mode)."""
    return (
        f"Your answer could not be used: {problem}. Answer again with only a list of "
        "7-dim actions [vx, vy, vz, rx, ry, rz, g], where vx, vy and vz are integers in "
        "0..99, rx, ry and rz are integers in 0..71 and g is 0 or 1, for example "
        f"{list(HOME_CODE)!s}. Do not output anything else."
    )
