"""Reading and writing pickles without importing rlbench, through one allowlist unpickler.

Unpickling is code execution: a pickle names globals (`module.name`) and the unpickler calls
them. The files read here come from large downloads (RLBench's `low_dim_obs.pkl` and
friends, X-ICM's `all_diffusion_features.pkl`), so every load goes through
`RestrictedUnpickler` (agnostos/shards/pickle_limits.py), which resolves only the globals of
a `PickleAllowlist`, each to a checked stand-in, and bounds what a file may build (issue 15:
`bytearray(3e9)` and `list(range(4e8))` from files of 44 and 62 bytes). Anything else,
`os.system` included, is refused with an error naming the file and the global.

Two allowlists are defined here, next to each other, so what each file kind may reach is
reviewed in one place. Every entry is derived from what real producers write (the RLBench
sample episodes, minibench's episodes, `write_xicm_pickle`, numpy 1 and 2 at protocols 2-5):

* `RLBENCH_ALLOWLIST`: RLBench episode pickles. `low_dim_obs.pkl` is a pickled
  `rlbench.demo.Demo` of `rlbench.backend.observation.Observation` objects; both classes map
  to the plain local classes below. Plus numpy arrays, dtypes and scalars (X-ICM's PyRep
  writes float32 mask handles as dict keys), and protocol 2's spelling of bytes.
* `XICM_FEATURES_ALLOWLIST`: X-ICM's features pickle, a dict of paths and numpy arrays;
  numpy arrays, dtypes and protocol 2's bytes only.

No entry can expand a small argument: arrays and scalars must carry all their bytes,
`_codecs.encode` only re-encodes a string the file holds (and is charged each time), and
`bytes` may only be called with no argument. The shards layer is the lowest one, so the
demo bank (agnostos.evaluation) imports this module and never the other way round.

`dump_pickle` writes the RLBench structure (protocol 4, globals named `rlbench.demo.Demo`
etc.), so files written by minibench or the test helpers load in real RLBench too.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agnostos.shards.pickle_limits import (
    DEFAULT_LIMITS,
    PickleAllowlist,
    PickleGlobal,
    PickleLimitError,
    PickleLimits,
    PickleReadError,
    PickleRefusedError,
    RestrictedUnpickler,
)
from agnostos.shards.pickle_limits import brief as _brief

try:  # numpy >= 2 moved the implementation; numpy.core.* names still resolve in old pickles
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

__all__ = [
    "RLBENCH_ALLOWLIST",
    "XICM_FEATURES_ALLOWLIST",
    "Demo",
    "Observation",
    "PickleAllowlist",
    "PickleLimitError",
    "PickleLimits",
    "PickleReadError",
    "PickleRefusedError",
    "RestrictedUnpickler",
    "dump_pickle",
    "load_pickle",
    "make_demo",
    "make_observation",
]


class Demo:
    """Stand-in for `rlbench.demo.Demo`: a list of observations plus the reset RNG state.

    Unpickling sets `__dict__` directly (NEWOBJ + BUILD), so there is no `__init__`.
    """

    _observations: list[Observation]
    random_seed: Any

    def __len__(self) -> int:
        return len(self._observations)

    def __getitem__(self, index: int) -> Observation:
        return self._observations[index]


class Observation:
    """Stand-in for `rlbench.backend.observation.Observation`; attributes come from the pickle."""


class _PlainClass(PickleGlobal):
    """A class rebuilt the way the pickler writes plain objects: NEWOBJ with no arguments,
    then one BUILD with a dict of attributes (charged per attribute)."""

    def __init__(self, cls: type, label: str):
        self.cls = cls
        self.instances = cls
        self.label = label

    def new(self, load: RestrictedUnpickler, args: tuple) -> Any:
        if args:
            raise load.refused(f"'{self.label}' called with arguments")
        load.charge(_OBJECT, self.label)
        instance = self.cls.__new__(self.cls)
        load.track(instance)
        load.expect_build(instance, self)
        return instance

    def build(self, load: RestrictedUnpickler, instance: Any, state: Any) -> None:
        if type(state) is not dict:
            raise load.refused(f"a '{self.label}' state that is not a dict of attributes")
        load.charge(_ATTRIBUTE * len(state), self.label)
        if any(type(key) is not str for key in state):
            raise load.refused(f"a '{self.label}' state whose keys are not all strings")
        load.fill(instance, [*state, *state.values()])
        attributes = instance.__dict__
        for key, value in state.items():
            attributes[sys.intern(key)] = value


class _ArrayClass(PickleGlobal):
    """`numpy.ndarray` as `_reconstruct`'s first argument; calling it would allocate any
    shape, so it is a marker and nothing else."""

    def __init__(self, label: str):
        self.label = label


_NDARRAY = _ArrayClass("numpy.ndarray")


class _Reconstruct(PickleGlobal):
    """`_reconstruct(ndarray, (0,), b'b')`: numpy writes exactly these arguments and puts the
    real shape, dtype and data in the BUILD state, which `_set_array_state` checks."""

    def __init__(self, label: str):
        self.label = label

    def call(self, load: RestrictedUnpickler, args: tuple) -> Any:
        if not (
            len(args) == 3
            and args[0] is _NDARRAY
            and _int_tuple(args[1]) == (0,)
            and type(args[2]) in (bytes, str)
            and args[2] in (b"b", "b")
        ):
            raise load.refused(f"{self.label}{_brief(args)}; numpy writes (ndarray, (0,), b'b')")
        load.charge(_ARRAY, "arrays")
        array = _multiarray._reconstruct(np.ndarray, (0,), b"b")
        load.expect_build(array, self)
        return array

    def build(self, load: RestrictedUnpickler, array: Any, state: Any) -> None:
        _set_array_state(load, array, state)


class _FromBuffer(PickleGlobal):
    """`_frombuffer(buffer, dtype, shape, order[, axis_order])`, protocol 5's contiguous
    array: a view of the buffer, which must hold exactly shape x itemsize bytes."""

    def __init__(self, label: str):
        self.label = label

    def call(self, load: RestrictedUnpickler, args: tuple) -> Any:
        if not 4 <= len(args) <= 5 or type(args[0]) not in (bytes, bytearray):
            raise load.refused(f"{self.label}{_brief(args)}")
        buffer, dtype, shape, order = args[:4]
        _check_dtype(load, dtype, self.label)
        dims = _check_shape(load, shape, self.label)
        axes = args[4] if len(args) == 5 else None
        if type(order) is not str or order not in ("C", "F", "K") or not _is_axis_order(axes, dims):
            raise load.refused(f"{self.label} with order {_brief(order)} and axes {_brief(axes)}")
        _check_backed(load, dims, dtype, len(buffer))
        load.charge(_ARRAY, "arrays")
        return _numeric._frombuffer(*args)


class _Scalar(PickleGlobal):
    """`scalar(dtype, data)`: a numpy scalar; `data` must be exactly one item's bytes."""

    def __init__(self, label: str):
        self.label = label

    def call(self, load: RestrictedUnpickler, args: tuple) -> Any:
        if len(args) != 2 or type(args[1]) is not bytes:
            raise load.refused(f"{self.label}{_brief(args)}; numpy writes (dtype, bytes)")
        _check_dtype(load, args[0], self.label)
        _check_backed(load, (), args[0], len(args[1]))
        load.charge(64 + len(args[1]), "numpy scalars")
        return _multiarray.scalar(args[0], args[1])


# A dtype as numpy's reduce names it: booleans, ints, floats, complex, bytes and text.
# Object, void/structured and datetime dtypes are not in RLBench or X-ICM data.
_DTYPE_SPEC = re.compile(r"b1|[iu][1248]|f(2|4|8|16)|c(8|16|32)|[SU][1-9][0-9]{0,8}")


class _Dtype(PickleGlobal):
    """`numpy.dtype(spec, align, copy)`; always a fresh copy (BUILD must never touch numpy's
    shared descriptors), whose BUILD state must be the one numpy itself writes for it."""

    def __init__(self, label: str):
        self.label = label

    def call(self, load: RestrictedUnpickler, args: tuple) -> Any:
        if not (
            len(args) == 3
            and type(args[0]) is str
            and _DTYPE_SPEC.fullmatch(args[0])
            and all(type(flag) is bool for flag in args[1:])
        ):
            raise load.refused(f"{self.label}{_brief(args)}")
        load.charge(_DTYPE, "dtypes")
        dtype = np.dtype(args[0], align=args[1], copy=True)
        load.expect_build(dtype, self)
        return dtype

    def build(self, load: RestrictedUnpickler, dtype: Any, state: Any) -> None:
        _set_dtype_state(load, dtype, state, self.label)


class _Latin1(PickleGlobal):
    """`_codecs.encode(text, 'latin1')`, how protocol 2 writes bytes: no longer than the
    text, but a memoized text can be re-encoded many times, so each call is charged."""

    def __init__(self, label: str):
        self.label = label

    def call(self, load: RestrictedUnpickler, args: tuple) -> Any:
        if len(args) != 2 or type(args[0]) is not str or args[1] != "latin1":
            raise load.refused(f"{self.label}{_brief(args)}; protocol 2 writes (str, 'latin1')")
        load.charge(48 + len(args[0]), "bytes")
        return args[0].encode("latin-1")


class _EmptyBytes(PickleGlobal):
    """`bytes()`, protocol 2's empty bytes; with an argument it would allocate or copy."""

    def __init__(self, label: str):
        self.label = label

    def call(self, load: RestrictedUnpickler, args: tuple) -> Any:
        if args:
            raise load.refused(f"{self.label}{_brief(args)}; only bytes() is allowed")
        return b""


# Charges (bytes) of the objects made here, upper bounds as in pickle_limits.
_OBJECT = 672  # instance, its __dict__ and keys table, record, pending BUILD
_ATTRIBUTE = 112  # a __dict__ entry, as a dict pair, and the key/value list
_ARRAY = 384  # ndarray header, dims, pending BUILD
_DTYPE = 1024
_MAX_DIMS = 32  # numpy 1's limit; RLBench and X-ICM arrays have at most 3


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    """`value` if it is a tuple of non-negative ints (a shape), else None."""
    if type(value) is not tuple:
        return None
    for item in value:
        if type(item) is not int or item < 0:
            return None
    return value


def _check_shape(load: RestrictedUnpickler, shape: Any, label: str) -> tuple[int, ...]:
    dims = _int_tuple(shape)
    if dims is None or len(dims) > _MAX_DIMS:
        raise load.refused(f"{label} with shape {_brief(shape)}")
    return dims


def _is_axis_order(axes: Any, dims: tuple[int, ...]) -> bool:
    if axes is None:
        return True
    return _int_tuple(axes) is not None and sorted(axes) == list(range(len(dims)))


def _check_dtype(load: RestrictedUnpickler, dtype: Any, label: str) -> None:
    """A dtype object can only come from `_Dtype`, whose specs exclude object, structured
    and subarray dtypes, and whose BUILD keeps them so: being one is enough."""
    if not isinstance(dtype, np.dtype):
        raise load.refused(f"{label} with dtype {_brief(dtype)}")


def _check_backed(
    load: RestrictedUnpickler, dims: tuple[int, ...], dtype: np.dtype, have: int
) -> None:
    """The data must be exactly what the declared shape needs: every byte of an array
    comes from the file, so a tiny file cannot declare a huge array."""
    need = math.prod(dims) * dtype.itemsize
    if need != have:
        raise PickleLimitError(
            f"{load.source}: refused: an array of shape {_brief(dims)} and dtype {dtype} needs "
            f"{need:,} bytes of data but the pickle holds {have:,}"
        )


def _set_array_state(load: RestrictedUnpickler, array: np.ndarray, state: Any) -> None:
    """ndarray's BUILD: `(1, shape, dtype, is_fortran, data)` with `data` backing the shape."""
    if not (type(state) is tuple and len(state) == 5 and state[0] == 1 and type(state[0]) is int):
        raise load.refused(f"an ndarray state {_brief(state)}")
    _, shape, dtype, fortran, data = state
    dims = _check_shape(load, shape, "ndarray")
    _check_dtype(load, dtype, "ndarray")
    if type(fortran) is not bool or type(data) is not bytes:
        raise load.refused("an ndarray state whose data is not bytes (object arrays included)")
    _check_backed(load, dims, dtype, len(data))
    load.charge(96 + len(data), "arrays")  # numpy may copy the data
    array.__setstate__(state)


def _set_dtype_state(load: RestrictedUnpickler, dtype: np.dtype, state: Any, label: str) -> None:
    """dtype's BUILD: only the state numpy writes for this dtype, in either byte order
    (a crafted state can change the item size or flags numpy trusts)."""
    expected = dtype.__reduce__()[2]
    atoms = type(state) is tuple and all(type(item) in (int, str, type(None)) for item in state)
    if atoms and len(state) == len(expected) and state[0] == expected[0]:
        swapped = expected[1] != "|" and state[1] in ("<", ">")
        if state[2:] == expected[2:] and (state[1] == expected[1] or swapped):
            dtype.__setstate__(state)
            return
    raise load.refused(f"the {label} state {_brief(state)} for {dtype}")


def _under(
    modules: tuple[str, ...], names: Mapping[str, Callable[[str], PickleGlobal]]
) -> dict[tuple[str, str], PickleGlobal]:
    """One entry per spelling, each labelled with the global the file named."""
    return {
        (module, name): make(f"{module}.{name}")
        for module in modules
        for name, make in names.items()
    }


# numpy 1 writes `numpy.core.*`, numpy 2 `numpy._core.*`; both load under either numpy.
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_ARRAYS: dict[tuple[str, str], PickleGlobal] = {
    ("numpy", "ndarray"): _NDARRAY,  # every array pickle, as `_reconstruct`'s first argument
    ("numpy", "dtype"): _Dtype("numpy.dtype"),  # every array's dtype
    **_under(_NUMPY_CORE, {"_reconstruct": _Reconstruct}),  # arrays, protocols 2-4
    # protocol 5's contiguous arrays (numpy 2 at protocol 5; X-ICM banks re-saved so)
    **_under(("numpy.core.numeric", "numpy._core.numeric"), {"_frombuffer": _FromBuffer}),
}
# Protocol 2 writes non-empty bytes (an array's data included) as `_codecs.encode(text,
# 'latin1')` and empty bytes as `bytes()`, under `__builtin__` (or `builtins` when a writer
# passes fix_imports=False).
_PROTOCOL2_BYTES: dict[tuple[str, str], PickleGlobal] = {
    ("_codecs", "encode"): _Latin1("_codecs.encode"),
    **_under(("__builtin__", "builtins"), {"bytes": _EmptyBytes}),
}
_RLBENCH_CLASSES: dict[tuple[str, str], type] = {
    ("rlbench.demo", "Demo"): Demo,
    ("rlbench.backend.observation", "Observation"): Observation,
}

RLBENCH_ALLOWLIST = PickleAllowlist(
    name="RLBench episode pickle",
    globals={
        **_NUMPY_ARRAYS,
        **_PROTOCOL2_BYTES,
        # numpy scalars: the float32 mask handles X-ICM's PyRep writes as dict keys
        **_under(_NUMPY_CORE, {"scalar": _Scalar}),
        **{
            key: _PlainClass(cls, ".".join(key)) for key, cls in _RLBENCH_CLASSES.items()
        },  # the Demo and its Observations
    },
    refusal="only the RLBench Demo/Observation classes and numpy array reconstruction are allowed",
)
XICM_FEATURES_ALLOWLIST = PickleAllowlist(
    name="X-ICM features pickle",
    globals={**_NUMPY_ARRAYS, **_PROTOCOL2_BYTES},
    refusal="a features pickle may only hold numpy arrays and builtin containers",
)


def load_pickle(
    path: str | Path,
    data: bytes | None = None,
    allowlist: PickleAllowlist = RLBENCH_ALLOWLIST,
    limits: PickleLimits = DEFAULT_LIMITS,
) -> Any:
    """Unpickle a file (or `data` read from it) through `allowlist` (default: RLBench's).

    Raises PickleRefusedError for a forbidden global or construction, PickleLimitError (a
    PickleRefusedError) for a file that would build more than `limits` allow, and
    PickleReadError for anything else that stops the load; all name the file.
    """
    source = str(path)
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise PickleReadError(f"{source}: cannot read pickle ({err})") from err
    return RestrictedUnpickler(bytes(data), source, allowlist, limits).load()


# -- writing ------------------------------------------------------------------------------

_EXPORT_NAMES: dict[type, tuple[str, str]] = {cls: key for key, cls in _RLBENCH_CLASSES.items()}


class _RLBenchPickler(pickle._Pickler):  # the Python pickler: its save_global can be extended
    """Writes the local Demo/Observation classes under their RLBench import names."""

    def __init__(self, file: io.BytesIO, numpy_module: str | None):
        super().__init__(file, protocol=4)
        self._numpy_module = numpy_module

    def save_global(self, obj: Any, name: str | None = None) -> None:
        target = _EXPORT_NAMES.get(obj)
        if (
            target is None
            and self._numpy_module
            and obj
            in (
                _multiarray._reconstruct,
                _multiarray.scalar,
            )
        ):
            target = (self._numpy_module, obj.__name__)
        if target is None:
            super().save_global(obj, name)
            return
        self.save(target[0])
        self.save(target[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def dump_pickle(obj: Any, numpy_module: str | None = "numpy.core.multiarray") -> bytes:
    """Pickle `obj` (protocol 4) the way RLBench's generator writes it.

    `numpy_module` names the module written for array reconstruction: the numpy-1 name
    (default, readable by numpy 1 and 2, as in the AGNOSTOS files) or None to keep whatever
    the installed numpy writes.
    """
    buffer = io.BytesIO()
    _RLBenchPickler(buffer, numpy_module).dump(obj)
    return buffer.getvalue()


def make_demo(observations: list[Observation], random_seed: Any) -> Demo:
    """A Demo with the attributes the PerAct-fork generator stores (variation_number is 0)."""
    demo = Demo()
    demo._observations = observations
    demo.random_seed = random_seed
    demo.variation_number = 0
    return demo


def make_observation(**attributes: Any) -> Observation:
    """An Observation carrying exactly the given attributes."""
    observation = Observation()
    observation.__dict__.update(attributes)
    return observation
