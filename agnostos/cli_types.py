"""Argument types and error helpers shared by every `agnostos` subcommand.

A setting is checked where it is parsed, so a bad value stops the command with one line
that names the flag and the allowed values (argparse's exit status 2) before any work
starts, instead of failing minutes later deep inside a stage. Exit statuses are the same
for every subcommand: 0 done, 1 the work failed (bad data, a failed run), 2 bad usage or
configuration.

The types here only parse text; they import nothing heavy, so building the parser (and
`agnostos --help`) costs no more than the subcommands' own imports.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CsvChoices",
    "csv",
    "error_message",
    "non_negative_int",
    "positive_int",
]

EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed: bad data, a failed run
EXIT_USAGE = 2  # bad usage or configuration (argparse's own status for usage errors)


def csv(text: str) -> tuple[str, ...]:
    """`a,b, c` -> ("a", "b", "c"); blank items are dropped, an empty list is refused."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, steps, worker processes)."""
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (indices such as a variation or episode number)."""
    value = _integer(text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


class CsvChoices:
    """A comma-separated list whose items must each be one of `choices`.

    argparse's own `choices=` compares the whole parsed value, so it cannot check list
    items; this type does, and its error names every allowed value. Items may not repeat
    (a camera listed twice would be written twice). `groups` maps shorthand words (such
    as "seen") to a whole list; a group word must stand alone.
    """

    def __init__(
        self,
        choices: Iterable[str],
        what: str = "value",
        groups: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.choices = tuple(choices)
        self.what = what
        self.groups = dict(groups or {})
        # argparse names the type in its fallback message: "invalid <name> value".
        self.__name__ = f"comma-separated {what} list"

    def allowed(self) -> str:
        """The allowed values as one line, for help texts and errors."""
        words = [*self.groups, *self.choices]
        return ", ".join(words)

    def __call__(self, text: str) -> tuple[str, ...]:
        if text.strip() in self.groups:
            return self.groups[text.strip()]
        items = csv(text)
        unknown = [item for item in items if item not in self.choices]
        if unknown:
            listed = ", ".join(repr(item) for item in unknown)
            raise argparse.ArgumentTypeError(
                f"unknown {self.what} {listed}; choose from {self.allowed()}"
            )
        repeated = sorted({item for item in items if items.count(item) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(
                f"{self.what} {', '.join(repr(item) for item in repeated)} listed twice"
            )
        return items

    def __repr__(self) -> str:
        return f"CsvChoices({self.choices!r}, what={self.what!r})"


def error_message(error: BaseException) -> str:
    """The text of an exception for a one-line error.

    `str(KeyError("unknown task"))` is `"'unknown task'"` (KeyError quotes its argument
    as a repr), so a KeyError's message is taken from `args[0]` to print without stray
    quotes; every other exception prints as itself.
    """
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])
    return str(error)
