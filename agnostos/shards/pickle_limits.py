"""The bounded unpickler behind `agnostos.shards.pickles`: every byte of work is paid for.

Issue 15: an allowlist alone stops code execution but not memory exhaustion, because an
allowed name can turn a small argument into a huge object (`bytearray(3221225472)` from a
44-byte file). This module reads a pickle with its own small opcode machine instead of
`pickle.Unpickler`, because the C unpickler has amplifiers no `find_class` hook can see:

* `LONG_BINPUT` with index n zero-fills a memo table of 16n bytes: a 9-byte file
  (n = 2**24) made CPython 3.11 resident at 267 MiB;
* `BUILD` calls numpy's `__setstate__` on the real array or dtype with whatever shape,
  payload and flags the file wrote, with no place to check them first;
* nesting depth is invisible, and hashing a deeply nested tuple key recurses in C.

The machine (`RestrictedUnpickler`) accepts only the opcodes that protocols 2-5 write for
RLBench and X-ICM data, resolves globals through a `PickleAllowlist` to `PickleGlobal`
entries (checked stand-ins, never the raw callable), and enforces:

* a byte budget (`PickleLimits.budget`): every object built, stack slots and memo
  entries included, is charged an upper bound of its size before it is allocated, so the
  budget plus the file bounds the memory a load reaches (`PickleLimits.peak_bound`, stated
  in docs/data.md);
* backed lengths: a declared length beyond the end of the file is refused before anything
  is allocated;
* the same budget on the value's weight with shared parts counted each time they appear,
  so a consumer that expands the value cannot be made to blow up either;
* nesting depth (`PickleLimits.max_depth`), and no container that contains itself.

Dict keys are restricted to strings and numbers whose hashes cannot be made to collide at
will, so building a dict stays linear in the keys read; every other cost is linear in the
file plus the budget, which bounds the time too.
"""

from __future__ import annotations

import pickle
import reprlib
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LIMITS",
    "PickleAllowlist",
    "PickleGlobal",
    "PickleLimitError",
    "PickleLimits",
    "PickleReadError",
    "PickleRefusedError",
    "RestrictedUnpickler",
]


class PickleRefusedError(pickle.UnpicklingError):
    """A pickle asked for a global, opcode or construction outside what its kind may hold."""


class PickleLimitError(PickleRefusedError):
    """A pickle would build more, or nest deeper, than its size allows (issue 15)."""


class PickleReadError(ValueError):
    """A pickle file could not be read (truncated, corrupt, wrong type)."""


@dataclass(frozen=True)
class PickleLimits:
    """What one load may spend: `factor` bytes per file byte plus `allowance`, and depth.

    Every object a load builds is charged an upper bound of its size; the factor covers
    what structure-heavy real files need (the RLBench sample episodes are charged 17 bytes
    per file byte, minibench's 22, while using 6 and 9), and the allowance lets small
    files hold the few thousand objects a short episode needs whatever their size.
    """

    factor: int = 32
    allowance: int = 32 << 20
    max_depth: int = 100

    def budget(self, file_size: int) -> int:
        """Bytes of objects a load of a `file_size`-byte pickle may build, and the most its
        value may weigh with shared parts counted each time they appear."""
        return self.allowance + self.factor * file_size

    def peak_bound(self, file_size: int) -> int:
        """Bound on the memory a load reaches beyond the interpreter's baseline: the budget,
        the file's own bytes, and the up to 3 extra bytes per character of one string of
        wide characters, charged just after it is decoded."""
        return self.budget(file_size) + 4 * file_size


DEFAULT_LIMITS = PickleLimits()


class PickleGlobal:
    """What an allowlisted `module.name` loads as; by default it can neither be called
    (REDUCE) nor instantiated (NEWOBJ), so an entry allows exactly what it overrides."""

    label = "global"
    instances: type | None = None  # the class NEWOBJ makes, if any: a container for depth

    def call(self, load: RestrictedUnpickler, args: tuple) -> Any:
        """REDUCE: build a value from `args`, charging `load` for what it allocates."""
        raise load.refused(f"'{self.label}' cannot be called")

    def new(self, load: RestrictedUnpickler, args: tuple) -> Any:
        """NEWOBJ: make an instance, registering its BUILD step with `load.expect_build`."""
        raise load.refused(f"'{self.label}' cannot be instantiated")

    def build(self, load: RestrictedUnpickler, obj: Any, state: Any) -> None:
        """BUILD on an object this entry made and registered: check `state`, apply it."""
        raise load.refused(f"a '{self.label}' state")

    def __repr__(self) -> str:
        return f"<allowlisted {self.label}>"


@dataclass(frozen=True)
class PickleAllowlist:
    """The globals one kind of pickle may name, each mapped to the `PickleGlobal` it loads as.

    Mapping a name to a local stand-in (RLBench's classes) is how files load without their
    package. `refusal` ends the error for any other global: it tells the reader what the
    file kind may hold.
    """

    name: str
    globals: Mapping[tuple[str, str], PickleGlobal]
    refusal: str
    containers: frozenset[type] = field(init=False)

    def __post_init__(self) -> None:
        entries = dict(self.globals)
        wrong = [key for key, value in entries.items() if not isinstance(value, PickleGlobal)]
        if wrong:
            raise TypeError(f"allowlist entries must be PickleGlobal objects: {wrong}")
        object.__setattr__(self, "globals", MappingProxyType(entries))
        instances = {entry.instances for entry in entries.values()} - {None}
        object.__setattr__(self, "containers", frozenset({tuple, list, dict, *instances}))

    def resolve(self, module: str, name: str) -> PickleGlobal | None:
        """The entry an allowed (module, name) refers to, or None if it is refused."""
        return self.globals.get((module, name))


# Fixed charges per opcode, in bytes: upper bounds of what CPython 3.11 allocates for the
# object an opcode makes (pymalloc rounding, gc header, a container's record, a memo entry
# and its int key, dict resize peaks), measured with tracemalloc and checked by
# tests/test_pickles_hostile.py. Every push also pays a stack slot, with the headroom of
# the stack's growth, so that only the file itself goes uncharged.
_PUSH = 16
_NUMBER = 32 + _PUSH
_TUPLE = 96 + _PUSH  # up to three items; TUPLE from a mark adds _ITEM per item
_TRACKED = 176  # a container's record: [object, depth, placed, weight] and its dict slot
_LIST = 80 + _TRACKED + _PUSH
_DICT = 80 + 232 + _TRACKED + _PUSH  # with the keys table its first entry allocates
_MEMO = 112
_MARK = 96
_GLOBAL = 256 + _PUSH
_ITEM = 24  # a list or tuple slot, with over-allocation and a resize's copy
_PAIR = 112  # a dict entry, with a resize's old and new tables and the key/value split
_STR_HEADER = 56  # sys.getsizeof("") is 49, rounded up
_BYTES_HEADER = 40
_BYTEARRAY_HEADER = 64
_MAX_NAME = 512  # longest module or name a GLOBAL line may have
# Weights (`RestrictedUnpickler.place`), in bytes: a pointer per slot, a header per
# container or atom, plus the payload of strings, bytes and arrays.
_SLOT = 8
_BASE_WEIGHT = 64
_HASH_MODULUS = sys.hash_info.modulus  # ints below it hash to themselves: no collisions

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
_U16 = struct.Struct("<H")
_F64 = struct.Struct(">d")


class _Stop(Exception):
    """STOP reached; the value is on the machine."""


class RestrictedUnpickler:
    """Loads one pickle held in memory through `allowlist`, within `limits`.

    Only the opcodes in `OPCODES` are accepted. Globals resolve to `PickleGlobal` entries;
    REDUCE and NEWOBJ call the entry's checked `call`/`new`, and BUILD is accepted only on
    an object an entry registered with `expect_build`, once. Containers record their depth
    and whether they already sit inside another (then they may no longer change).
    """

    def __init__(
        self,
        data: bytes,
        source: str,
        allowlist: PickleAllowlist,
        limits: PickleLimits = DEFAULT_LIMITS,
    ):
        self._data = data
        self._view = memoryview(data)
        self._end = len(data)
        self.source = source
        self.allowlist = allowlist
        self.limits = limits
        self.budget = limits.budget(len(data))
        self.spent = 0
        self._stack: list[Any] = []
        self._metastack: list[list[Any]] = []
        self._memo: dict[int, Any] = {}
        self._info: dict[int, list[Any]] = {}  # id -> [object, depth, placed in another]
        self._builds: dict[int, tuple[Any, PickleGlobal]] = {}
        self._containers = allowlist.containers
        self._value: Any = None

    # -- services for PickleGlobal entries --------------------------------------------

    def refused(self, reason: str) -> PickleRefusedError:
        """The error for a construction this pickle kind may not make."""
        return PickleRefusedError(f"{self.source}: refused {reason}; {self.allowlist.refusal}")

    def charge(self, nbytes: int, what: str = "objects") -> None:
        """Count `nbytes` against the budget, before allocating them; past it the load
        stops with PickleLimitError."""
        self.spent += nbytes
        if self.spent > self.budget:
            raise self._over_budget(what)

    def expect_build(self, obj: Any, entry: PickleGlobal) -> None:
        """Allow one BUILD on `obj`, applied by `entry.build` (which checks the state)."""
        self._builds[id(obj)] = (obj, entry)

    def track(self, obj: Any) -> None:
        """Record a new mutable container: depth 1, not yet inside another, empty."""
        self._info[id(obj)] = [obj, 1, False, _BASE_WEIGHT]

    def fill(self, container: Any, items: Iterable[Any]) -> None:
        """Account for `items` (keys included) going into the tracked `container`, before
        they do.

        A container already placed inside another may not change (its parents' depths and
        weights would be stale), which also refuses every self-referencing structure.
        """
        info = self._info[id(container)]
        if info[2]:
            raise self.refused(
                f"changing a {type(container).__name__} after it was placed in another "
                "container (self-referencing structures are not supported)"
            )
        depth, weight = self.place(items)
        if info[2]:
            raise self.refused(f"a {type(container).__name__} that contains itself")
        info[1] = max(info[1], depth)
        info[3] += weight
        self._check_shape(info[1], info[3])

    def place(self, items: Iterable[Any]) -> tuple[int, int]:
        """(depth, weight) that `items` add to a container holding them; marks the tracked
        ones as placed.

        The weight is the bytes the items would take if every shared part were copied
        wherever it appears: what a consumer that walks or converts the value (JSON, a
        numpy array of a list) may end up allocating. Memo references make it exponential
        in the file size unless it is counted.
        """
        depth = 1
        weight = 0
        infos = self._info
        containers = self._containers
        builds = self._builds
        for item in items:
            kind = type(item)
            if kind not in containers:
                if builds and id(item) in builds:
                    raise self._unbuilt(item)
                weight += _atom_weight(item, kind)
                continue
            info = infos.get(id(item))
            if info is None:  # a small tuple (see `_is_small`)
                inner_depth, inner_weight = _small_tuple(item)
            else:
                info[2] = True
                inner_depth, inner_weight = info[1], info[3]
            weight += inner_weight + _SLOT
            if inner_depth >= depth:
                depth = inner_depth + 1
        return depth, weight

    def _unbuilt(self, item: Any) -> PickleRefusedError:
        """Placing an array or dtype before its BUILD would record its weight while still
        empty; the pickler always builds first."""
        kind = type(item).__name__
        return self.refused(f"placing an object ({kind}) in a container before its BUILD")

    def _check_shape(self, depth: int, weight: int) -> None:
        if depth > self.limits.max_depth:
            raise PickleLimitError(
                f"{self.source}: refused: containers nested more than {self.limits.max_depth} deep"
            )
        if weight > self.budget:
            raise PickleLimitError(
                f"{self.source}: refused: the data, counting shared parts each time they "
                f"appear, would take more than {self.budget:,} bytes, the most a "
                f"{self._end:,}-byte pickle may describe"
            )

    def _is_small(self, value: tuple) -> bool:
        """At most 8 items, each an atom or an untracked tuple of atoms: such a tuple needs
        no record, since its depth and weight take at most 72 steps to recompute."""
        if len(value) > 8:
            return False
        containers = self._containers
        builds = self._builds
        for item in value:
            if type(item) in containers:
                if type(item) is not tuple or id(item) in self._info:
                    return False
                for inner in item:
                    if type(inner) in containers:
                        return False
            elif builds and id(item) in builds:  # `place` refuses it
                return False
        return True

    # -- the machine ------------------------------------------------------------------

    def load(self) -> Any:
        """Run the pickle to STOP; PickleRefusedError/PickleReadError name the file."""
        handlers = _HANDLERS
        costs = _COSTS
        data = self._data
        budget = self.budget
        pos = 0
        try:
            while True:
                code = data[pos]
                self.spent += costs[code]
                if self.spent > budget:
                    raise self._over_budget(_OPCODE_NAMES.get(code, "objects"))
                pos = handlers[code](self, pos + 1)
        except _Stop:
            return self._value
        except PickleRefusedError:
            raise
        except Exception as err:  # a malformed stream: underflow, bad memo key, numpy, ...
            if pos >= self._end:
                reason = "pickle data was truncated (no STOP opcode)"
            else:
                reason = f"at byte {pos}: {type(err).__name__}: {brief(str(err), 200)}"
            raise PickleReadError(f"{self.source}: unreadable pickle ({reason})") from None
        finally:
            self._release()

    def _over_budget(self, what: str) -> PickleLimitError:
        return PickleLimitError(
            f"{self.source}: refused: building {what} would take more than "
            f"{self.budget:,} bytes, the most a {self._end:,}-byte pickle may use "
            f"({self.limits.allowance >> 20} MiB + {self.limits.factor} x its size)"
        )

    def _release(self) -> None:
        """Drop every reference the load held, so a refused file's objects are freed now."""
        self._stack = []
        self._metastack = []
        self._memo = {}
        self._info = {}
        self._builds = {}

    def _counted(self, start: int, size: int) -> int:
        """End of a `size`-byte argument at `start`, refused before any allocation if the
        file does not hold it."""
        stop = start + size
        if stop > self._end:
            raise EOFError(
                f"pickle data was truncated: {size:,} bytes declared at byte {start}, "
                f"{self._end - start:,} left in the file"
            )
        return stop

    def _pop_mark(self) -> list[Any]:
        items = self._stack
        self._stack = self._metastack.pop()
        return items

    def _tuple(self, items: list[Any]) -> None:
        value = tuple(items)
        if not self._is_small(value):
            self.charge(_TRACKED, "tuples")
            depth, weight = self.place(value)
            self._check_shape(depth, weight + _BASE_WEIGHT)
            self._info[id(value)] = [value, depth, True, weight + _BASE_WEIGHT]
        self._stack.append(value)

    def _extend(self, target: Any, items: list[Any]) -> None:
        if type(target) is not list:
            raise self.refused(f"APPEND to a {type(target).__name__}")
        self.charge(_ITEM * len(items), "lists")
        self.fill(target, items)
        target.extend(items)

    def _set_items(self, target: Any, items: list[Any]) -> None:
        if type(target) is not dict:
            raise self.refused(f"SETITEM on a {type(target).__name__}")
        if len(items) % 2:
            raise ValueError("SETITEMS needs key/value pairs")
        self.charge(_PAIR * (len(items) // 2), "dicts")
        keys = items[::2]
        for key in keys:
            self._check_key(key)
        self.fill(target, items)
        target.update(zip(keys, items[1::2], strict=True))

    def _check_key(self, key: Any) -> None:
        """Strings, bytes, floats and bools hash without attacker-made collisions; ints
        only below the hash modulus (above it, multiples of it collide by construction)."""
        kind = type(key)
        if kind is str or kind is float or kind is bool or kind is bytes or key is None:
            return
        if kind is int or isinstance(key, np.integer):
            if -_HASH_MODULUS < int(key) < _HASH_MODULUS:
                return
            raise self.refused(f"the dict key {int(key)} (integer keys must be below 2**61)")
        if isinstance(key, (np.floating, np.bool_, str, bytes)):
            return
        raise self.refused(f"a dict key of type {kind.__name__} (keys are strings and numbers)")

    def _push_global(self, module: str, name: str) -> None:
        entry = self.allowlist.resolve(module, name)
        if entry is None:
            raise PickleRefusedError(
                f"{self.source}: refused to load global '{module}.{name}'; {self.allowlist.refusal}"
            )
        self._stack.append(entry)


_Handler = Callable[[RestrictedUnpickler, int], int]

# reprlib stops at a few items per container and a few levels: a refused argument can be
# a huge or exponentially shared structure, which a plain repr would walk in full.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxother = 60


def brief(value: Any, limit: int = 100) -> str:
    """A short one-line repr of `value` (or `value` itself if a str) for an error."""
    text = value if isinstance(value, str) else _REPR.repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _atom_weight(item: Any, kind: type) -> int:
    """Weight of a leaf placed in a container (see `RestrictedUnpickler.place`)."""
    if kind is str or kind is bytes or kind is bytearray:
        return _SLOT + _BASE_WEIGHT + len(item)
    if kind is np.ndarray or isinstance(item, np.generic):
        return _SLOT + _BASE_WEIGHT + item.nbytes
    return _SLOT + _BASE_WEIGHT // 2


def _small_tuple(value: tuple) -> tuple[int, int]:
    """(depth, weight) of an untracked tuple: atoms and tuples of atoms only."""
    depth = 1
    weight = _BASE_WEIGHT
    for item in value:
        kind = type(item)
        if kind is tuple:
            depth = 2
            weight += _SLOT + _BASE_WEIGHT + sum(_atom_weight(inner, type(inner)) for inner in item)
        else:
            weight += _atom_weight(item, kind)
    return depth, weight


# -- opcode handlers: each takes the position after the opcode byte and returns the next
# one. A fixed-size argument read past the end raises IndexError or struct.error, which
# `load` reports as a truncated or unreadable pickle.


def _refuse(m: RestrictedUnpickler, pos: int) -> int:
    code = m._data[pos - 1]
    name = _OPCODE_NAMES.get(code, f"0x{code:02x}")
    raise PickleRefusedError(
        f"{m.source}: refused pickle opcode {name} at byte {pos - 1}; "
        f"{m.allowlist.name}s (pickle protocols 2-5) do not use it"
    )


def _proto(m: RestrictedUnpickler, pos: int) -> int:
    if not 2 <= m._data[pos] <= pickle.HIGHEST_PROTOCOL:
        raise ValueError(f"unsupported pickle protocol {m._data[pos]}")
    return pos + 1


def _frame(m: RestrictedUnpickler, pos: int) -> int:
    (size,) = _U64.unpack_from(m._data, pos)
    m._counted(pos + 8, size)  # a frame only announces bytes: they must be there
    return pos + 8


def _stop(m: RestrictedUnpickler, pos: int) -> int:
    m._value = m._stack.pop()
    raise _Stop


def _mark(m: RestrictedUnpickler, pos: int) -> int:
    m._metastack.append(m._stack)
    m._stack = []
    return pos


def _constant(value: Any) -> _Handler:
    def push(m: RestrictedUnpickler, pos: int) -> int:
        m._stack.append(value)
        return pos

    return push


def _number(layout: struct.Struct) -> _Handler:
    """A fixed-width int (up to 32 bits) or float."""

    def push(m: RestrictedUnpickler, pos: int) -> int:
        m._stack.append(layout.unpack_from(m._data, pos)[0])
        return pos + layout.size

    return push


def _binint1(m: RestrictedUnpickler, pos: int) -> int:
    m._stack.append(m._data[pos])
    return pos + 1


def _long1(m: RestrictedUnpickler, pos: int) -> int:
    stop = m._counted(pos + 1, m._data[pos])  # at most 255 bytes: a 2040-bit int
    m._stack.append(int.from_bytes(m._data[pos + 1 : stop], "little", signed=True))
    return stop


def _sized(m: RestrictedUnpickler, pos: int, length: struct.Struct | None) -> tuple[int, int]:
    """(start, stop) of a string or bytes argument; its declared length must be backed by
    the file, which is checked before anything is allocated."""
    if length is None:
        start = pos + 1
        size = m._data[pos]
    else:
        start = pos + length.size
        (size,) = length.unpack_from(m._data, pos)
    return start, m._counted(start, size)


def _unicode(length: struct.Struct | None) -> _Handler:
    def push(m: RestrictedUnpickler, pos: int) -> int:
        start, stop = _sized(m, pos, length)
        m.charge(_STR_HEADER + stop - start, "strings")  # one byte per character at least
        value = str(m._view[start:stop], "utf-8", "surrogatepass")
        if not value.isascii():  # wider characters: up to 4 bytes each
            m.charge(max(0, sys.getsizeof(value) - _STR_HEADER - stop + start), "strings")
        m._stack.append(value)
        return stop

    return push


def _binary(length: struct.Struct | None, make: type, header: int) -> _Handler:
    def push(m: RestrictedUnpickler, pos: int) -> int:
        start, stop = _sized(m, pos, length)
        m.charge(header + stop - start, "bytes")
        m._stack.append(make(m._view[start:stop]))
        return stop

    return push


def _tuple_n(count: int) -> _Handler:
    def build(m: RestrictedUnpickler, pos: int) -> int:
        stack = m._stack
        if len(stack) < count:
            raise IndexError(f"a {count}-tuple needs {count} values on the stack")
        items = stack[-count:]
        del stack[-count:]
        m._tuple(items)
        return pos

    return build


def _tuple_mark(m: RestrictedUnpickler, pos: int) -> int:
    items = m._pop_mark()
    m.charge(_ITEM * len(items), "tuples")
    m._tuple(items)
    return pos


def _empty(make: type) -> _Handler:
    def push(m: RestrictedUnpickler, pos: int) -> int:
        value = make()
        m.track(value)
        m._stack.append(value)
        return pos

    return push


def _append(m: RestrictedUnpickler, pos: int) -> int:
    value = m._stack.pop()
    m._extend(m._stack[-1], [value])
    return pos


def _appends(m: RestrictedUnpickler, pos: int) -> int:
    items = m._pop_mark()
    m._extend(m._stack[-1], items)
    return pos


def _setitem(m: RestrictedUnpickler, pos: int) -> int:
    stack = m._stack
    value = stack.pop()
    key = stack.pop()
    m._set_items(stack[-1], [key, value])
    return pos


def _setitems(m: RestrictedUnpickler, pos: int) -> int:
    items = m._pop_mark()
    m._set_items(m._stack[-1], items)
    return pos


def _line(m: RestrictedUnpickler, pos: int) -> tuple[str, int]:
    stop = m._data.find(b"\n", pos, pos + _MAX_NAME)
    if stop < 0:
        raise ValueError(f"a GLOBAL name unterminated or longer than {_MAX_NAME} bytes")
    return m._data[pos:stop].decode("utf-8"), stop + 1


def _global(m: RestrictedUnpickler, pos: int) -> int:
    module, pos = _line(m, pos)
    name, pos = _line(m, pos)
    m._push_global(module, name)
    return pos


def _stack_global(m: RestrictedUnpickler, pos: int) -> int:
    name = m._stack.pop()
    module = m._stack.pop()
    if type(module) is not str or type(name) is not str:
        raise ValueError("STACK_GLOBAL needs two strings")
    if len(module) > _MAX_NAME or len(name) > _MAX_NAME or "\n" in module + name:
        raise ValueError(f"a STACK_GLOBAL name with a newline or over {_MAX_NAME} characters")
    m._push_global(module, name)
    return pos


def _entry(m: RestrictedUnpickler, value: Any, opcode: str) -> PickleGlobal:
    if not isinstance(value, PickleGlobal):
        raise m.refused(f"{opcode} on a {type(value).__name__} (only allowlisted globals)")
    return value


def _apply_entry(m: RestrictedUnpickler, opcode: str, construct: bool) -> None:
    """REDUCE (`entry.call`) or NEWOBJ (`entry.new`): the allowlisted global below the
    argument tuple on the stack is replaced by what it builds from those arguments."""
    stack = m._stack
    args = stack.pop()
    entry = _entry(m, stack[-1], opcode)
    if type(args) is not tuple:
        raise ValueError(f"{opcode} arguments must be a tuple")
    stack[-1] = entry.new(m, args) if construct else entry.call(m, args)


def _reduce(m: RestrictedUnpickler, pos: int) -> int:
    _apply_entry(m, "REDUCE", construct=False)
    return pos


def _newobj(m: RestrictedUnpickler, pos: int) -> int:
    _apply_entry(m, "NEWOBJ", construct=True)
    return pos


def _build(m: RestrictedUnpickler, pos: int) -> int:
    state = m._stack.pop()
    target = m._stack[-1]
    expected = m._builds.pop(id(target), None)
    if expected is None or expected[0] is not target:
        raise m.refused(f"BUILD on a {type(target).__name__} (once, on allowlisted objects)")
    expected[1].build(m, target, state)
    return pos


def _binput(m: RestrictedUnpickler, pos: int) -> int:
    m._memo[m._data[pos]] = m._stack[-1]
    return pos + 1


def _long_binput(m: RestrictedUnpickler, pos: int) -> int:
    m._memo[_U32.unpack_from(m._data, pos)[0]] = m._stack[-1]
    return pos + 4


def _memoize(m: RestrictedUnpickler, pos: int) -> int:
    memo = m._memo
    memo[len(memo)] = m._stack[-1]
    return pos


def _binget(m: RestrictedUnpickler, pos: int) -> int:
    m._stack.append(m._memo[m._data[pos]])
    return pos + 1


def _long_binget(m: RestrictedUnpickler, pos: int) -> int:
    m._stack.append(m._memo[_U32.unpack_from(m._data, pos)[0]])
    return pos + 4


# The opcodes protocols 2-5 write for RLBench episodes, X-ICM features and plain values
# (from disassembling the real sample, minibench's episodes and the project's features
# pickle, written by numpy 1 and 2), each with its fixed charge. Sets, persistent ids,
# extension codes, out-of-band buffers, LONG4 and the protocol 0/1 text opcodes are not
# among them and are refused.
OPCODES: dict[bytes, tuple[_Handler, int]] = {
    pickle.PROTO: (_proto, 0),
    pickle.FRAME: (_frame, 0),
    pickle.STOP: (_stop, 0),
    pickle.MARK: (_mark, _MARK),
    pickle.NONE: (_constant(None), _PUSH),
    pickle.NEWTRUE: (_constant(True), _PUSH),
    pickle.NEWFALSE: (_constant(False), _PUSH),
    pickle.BININT: (_number(_I32), _NUMBER),
    pickle.BININT1: (_binint1, _PUSH),  # 0..255: CPython's cached small ints
    pickle.BININT2: (_number(_U16), _NUMBER),
    pickle.LONG1: (_long1, _NUMBER + 256),
    pickle.BINFLOAT: (_number(_F64), _NUMBER),
    pickle.SHORT_BINUNICODE: (_unicode(None), _PUSH),
    pickle.BINUNICODE: (_unicode(_U32), _PUSH),
    pickle.BINUNICODE8: (_unicode(_U64), _PUSH),
    pickle.SHORT_BINBYTES: (_binary(None, bytes, _BYTES_HEADER), _PUSH),
    pickle.BINBYTES: (_binary(_U32, bytes, _BYTES_HEADER), _PUSH),
    pickle.BINBYTES8: (_binary(_U64, bytes, _BYTES_HEADER), _PUSH),
    pickle.BYTEARRAY8: (_binary(_U64, bytearray, _BYTEARRAY_HEADER), _PUSH),
    pickle.EMPTY_TUPLE: (_constant(()), _PUSH),
    pickle.TUPLE: (_tuple_mark, _TUPLE),
    pickle.TUPLE1: (_tuple_n(1), _TUPLE),
    pickle.TUPLE2: (_tuple_n(2), _TUPLE),
    pickle.TUPLE3: (_tuple_n(3), _TUPLE),
    pickle.EMPTY_LIST: (_empty(list), _LIST),
    pickle.APPEND: (_append, 0),
    pickle.APPENDS: (_appends, 0),
    pickle.EMPTY_DICT: (_empty(dict), _DICT),
    pickle.SETITEM: (_setitem, 0),
    pickle.SETITEMS: (_setitems, 0),
    pickle.GLOBAL: (_global, _GLOBAL),
    pickle.STACK_GLOBAL: (_stack_global, 0),
    pickle.REDUCE: (_reduce, 0),
    pickle.NEWOBJ: (_newobj, 0),
    pickle.BUILD: (_build, 0),
    pickle.BINPUT: (_binput, _MEMO),
    pickle.LONG_BINPUT: (_long_binput, _MEMO),
    pickle.MEMOIZE: (_memoize, _MEMO),
    pickle.BINGET: (_binget, _PUSH),
    pickle.LONG_BINGET: (_long_binget, _PUSH),
}
_HANDLERS: list[_Handler] = [OPCODES.get(bytes([code]), (_refuse, 0))[0] for code in range(256)]
_COSTS: list[int] = [OPCODES.get(bytes([code]), (_refuse, 0))[1] for code in range(256)]
_OPCODE_NAMES: dict[int, str] = {
    code[0]: name
    for name, code in vars(pickle).items()
    if name.isupper() and isinstance(code, bytes) and len(code) == 1
}
