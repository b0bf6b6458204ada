"""Reading and writing pickles without importing rlbench, through one allowlist unpickler.

Unpickling is code execution: a pickle names globals (`module.name`) and the unpickler calls
them. The files read here come from large downloads (RLBench's `low_dim_obs.pkl` and
friends, X-ICM's `all_diffusion_features.pkl`), so every load goes through
`RestrictedUnpickler`, which resolves only the globals of a `PickleAllowlist`. Anything else,
`os.system` included, is refused with an error naming the file and the global.

Two allowlists are defined here, next to each other, so what each file kind may reach is
reviewed in one place:

* `RLBENCH_ALLOWLIST`: RLBench episode pickles. `low_dim_obs.pkl` is a pickled
  `rlbench.demo.Demo` of `rlbench.backend.observation.Observation` objects; both classes map
  to the plain local classes below, plus the numpy/builtin names that rebuild arrays, scalars
  and plain objects.
* `XICM_FEATURES_ALLOWLIST`: X-ICM's features pickle, a dict of paths and numpy arrays; only
  numpy array reconstruction and builtin containers.

The shards layer is the lowest one, so the demo bank (agnostos.evaluation) imports this
module and never the other way round. Limits on what an allowed global may build (issue 15:
`bytearray(3e9)`, `list(range(4e8))`) belong in `RestrictedUnpickler.find_class` or in the
allowlist entries, which every reader shares.

`dump_pickle` writes the RLBench structure (protocol 4, globals named `rlbench.demo.Demo`
etc.), so files written by minibench or the test helpers load in real RLBench too.
"""

from __future__ import annotations

import builtins
import codecs
import copyreg
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

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


class PickleRefusedError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowlist."""


class PickleReadError(ValueError):
    """A pickle file could not be read (truncated, corrupt, wrong type)."""


# -- allowlists ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PickleAllowlist:
    """The globals one kind of pickle may name, each mapped to the object it loads as.

    `globals` maps (module, name) as written in the pickle to the object returned; mapping a
    name to a local stand-in (RLBench's classes) is how files load without their package.
    `refusal` ends the error for any other global: it tells the reader what the file kind
    may hold.
    """

    name: str
    globals: Mapping[tuple[str, str], Any]
    refusal: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "globals", MappingProxyType(dict(self.globals)))

    def resolve(self, module: str, name: str) -> Any | None:
        """The object an allowed (module, name) refers to, or None if it is refused."""
        return self.globals.get((module, name))


def _under(modules: tuple[str, ...], names: Mapping[str, Any]) -> dict[tuple[str, str], Any]:
    return {(module, name): value for module in modules for name, value in names.items()}


# Array and scalar reconstruction, under numpy-1 (`numpy.core`) and numpy-2 (`numpy._core`)
# module names: files written by either numpy load in both. `_frombuffer` is how protocol 5
# writes a contiguous array.
_NUMPY_ARRAYS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **_under(
        ("numpy.core.multiarray", "numpy._core.multiarray"),
        {"_reconstruct": _multiarray._reconstruct, "scalar": _multiarray.scalar},
    ),
    **_under(("numpy.core.numeric", "numpy._core.numeric"), {"_frombuffer": _numeric._frombuffer}),
}
# Plain values and containers; `__builtin__` is how Python-2-era protocols name builtins,
# `_codecs.encode` is how protocol 2 writes bytes objects.
_BUILTIN_NAMES = (
    "list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str",
    "bytes", "bytearray", "slice",
)  # fmt: skip
_BUILTIN_VALUES: dict[tuple[str, str], Any] = {
    **_under(
        ("builtins", "__builtin__"), {name: getattr(builtins, name) for name in _BUILTIN_NAMES}
    ),
    ("_codecs", "encode"): codecs.encode,
}
_RLBENCH_CLASSES: dict[tuple[str, str], type] = {
    ("rlbench.demo", "Demo"): Demo,
    ("rlbench.backend.observation", "Observation"): Observation,
}

RLBENCH_ALLOWLIST = PickleAllowlist(
    name="RLBench episode pickle",
    globals={
        **_NUMPY_ARRAYS,
        **_BUILTIN_VALUES,
        # `copyreg._reconstructor` rebuilds plain objects in protocol 0-1 files.
        **_under(("builtins", "__builtin__"), {"object": object, "range": range}),
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        **_RLBENCH_CLASSES,
    },
    refusal="only the RLBench Demo/Observation classes and numpy/builtin reconstruction names "
    "are allowed",
)
XICM_FEATURES_ALLOWLIST = PickleAllowlist(
    name="X-ICM features pickle",
    globals={**_NUMPY_ARRAYS, **_BUILTIN_VALUES},
    refusal="a features pickle may only hold numpy arrays and builtin containers",
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of `allowlist`.

    Every global any reader's pickle can reach passes through `find_class`, so a limit that
    must hold for all file kinds is added here once.
    """

    def __init__(self, file: io.BufferedIOBase, source: str, allowlist: PickleAllowlist):
        super().__init__(file)
        self._source = source
        self._allowlist = allowlist

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowlist.resolve(module, name)
        if found is None:
            raise PickleRefusedError(
                f"{self._source}: refused to load global '{module}.{name}'; "
                f"{self._allowlist.refusal}"
            )
        return found


def load_pickle(
    path: str | Path, data: bytes | None = None, allowlist: PickleAllowlist = RLBENCH_ALLOWLIST
) -> Any:
    """Unpickle a file (or `data` read from it) through `allowlist` (default: RLBench's).

    Raises PickleRefusedError for a forbidden global and PickleReadError for anything else
    that stops the load; both name the file.
    """
    source = str(path)
    try:
        if data is None:
            data = Path(path).read_bytes()
        return RestrictedUnpickler(io.BytesIO(data), source, allowlist).load()
    except PickleRefusedError:
        raise
    except OSError as err:
        raise PickleReadError(f"{source}: cannot read pickle ({err})") from err
    except Exception as err:  # truncated streams raise EOFError, UnpicklingError, ...
        raise PickleReadError(f"{source}: unreadable pickle ({type(err).__name__}: {err})") from err


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
