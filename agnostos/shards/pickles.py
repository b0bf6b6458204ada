"""Reading and writing RLBench pickles without importing rlbench.

`low_dim_obs.pkl` is a pickled `rlbench.demo.Demo` holding `rlbench.backend.observation.
Observation` objects. Unpickling is code execution, and the data comes from a 140 GB
download, so `load_pickle` only resolves an allowlist of globals: the two RLBench classes
(mapped to the plain local classes below) and the numpy/builtin names needed to rebuild
arrays and scalars. Anything else, `os.system` included, is refused with an error naming
the file and the global.

`dump_pickle` writes the same structure (protocol 4, globals named `rlbench.demo.Demo`
etc.), so files written by minibench or the test helpers load in real RLBench too.
"""

from __future__ import annotations

import builtins
import copyreg
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

try:  # numpy >= 2 moved the implementation; numpy.core.* names still resolve in old pickles
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1
    from numpy.core import multiarray as _multiarray


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


_RLBENCH_CLASSES: dict[tuple[str, str], type] = {
    ("rlbench.demo", "Demo"): Demo,
    ("rlbench.backend.observation", "Observation"): Observation,
}

_NUMPY_NAMES = {"_reconstruct", "scalar"}
_NUMPY_MODULES = {"numpy.core.multiarray", "numpy._core.multiarray"}
_BUILTIN_NAMES = {
    "list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str",
    "bytes", "bytearray", "object", "slice", "range",
}  # fmt: skip


def _allowed_global(module: str, name: str) -> Any | None:
    """The object an allowed (module, name) refers to, or None if it is refused."""
    if (module, name) in _RLBENCH_CLASSES:
        return _RLBENCH_CLASSES[(module, name)]
    if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
        return getattr(_multiarray, name)
    if module == "numpy" and name in {"ndarray", "dtype"}:
        return getattr(np, name)
    if module in {"builtins", "__builtin__"} and name in _BUILTIN_NAMES:
        return getattr(builtins, name)
    if module == "_codecs" and name == "encode":
        import codecs

        return codecs.encode
    if module == "copyreg" and name == "_reconstructor":
        return copyreg._reconstructor
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        if found is None:
            raise PickleRefusedError(
                f"{self._source}: refused to load global '{module}.{name}'; only the RLBench "
                "Demo/Observation classes and numpy/builtin reconstruction names are allowed"
            )
        return found


def load_pickle(path: str | Path, data: bytes | None = None) -> Any:
    """Unpickle an RLBench file (or `data` read from it) through the allowlist.

    Raises PickleRefusedError for a forbidden global and PickleReadError for anything else
    that stops the load; both name the file.
    """
    source = str(path)
    try:
        if data is None:
            data = Path(path).read_bytes()
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
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
