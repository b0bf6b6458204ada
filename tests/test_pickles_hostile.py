"""Issue 15: a downloaded pickle must not be able to exhaust memory or time.

A corpus of hostile files, each read in a fresh process (so its peak RSS is its own) by
the RLBench and the features reader, must be refused with an error naming the file,
within `PickleLimits.peak_bound` of a benign read's RSS and within a few seconds. A
property test runs random pickles made of the accepted opcodes and allowlisted globals
and checks, with tracemalloc, that the charges are upper bounds of what is allocated.
Real files (the RLBench sample, minibench's episodes, the project's features pickle)
still load exactly as the plain unpickler loads them.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xicm_layout import xicm_features

from agnostos.evaluation.bank import BankError, load_xicm_pickle
from agnostos.evaluation.bank.xicm_pickle import write_xicm_pickle
from agnostos.shards.pickle_limits import DEFAULT_LIMITS, PickleLimits, RestrictedUnpickler
from agnostos.shards.pickles import (
    RLBENCH_ALLOWLIST,
    XICM_FEATURES_ALLOWLIST,
    Demo,
    Observation,
    PickleLimitError,
    PickleReadError,
    PickleRefusedError,
    dump_pickle,
    load_pickle,
    make_demo,
    make_observation,
)

try:
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

REPO = Path(__file__).resolve().parents[1]
ALLOWLISTS = {"rlbench": RLBENCH_ALLOWLIST, "xicm": XICM_FEATURES_ALLOWLIST}


# -- a small pickle assembler ---------------------------------------------------------


class _Reduce:
    """Pickles as whatever reduce tuple it is given (a hostile file's content)."""

    def __init__(self, *reduced: Any):
        self.reduced = reduced

    def __reduce__(self) -> tuple:
        return self.reduced


def _text(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    if len(data) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _binary(value: bytes) -> bytes:
    if len(value) < 256:
        return pickle.SHORT_BINBYTES + bytes([len(value)]) + value
    return pickle.BINBYTES + struct.pack("<I", len(value)) + value


def _global(module: str, name: str) -> bytes:
    return _text(module) + _text(name) + pickle.STACK_GLOBAL


def _long1(value: int) -> bytes:
    data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def _program(body: bytes) -> bytes:
    return pickle.PROTO + b"\x04" + body + pickle.STOP


def _get(index: int) -> bytes:
    return pickle.BINGET + bytes([index])


# -- the hostile corpus ---------------------------------------------------------------


def _issue_bytearray() -> bytes:
    """The issue's 44-byte file: 3.4 GB resident before the episode was rejected."""
    return pickle.dumps(_Reduce(bytearray, (3221225472,)), protocol=4)


def _issue_list_range() -> bytes:
    """The issue's 62-byte file: 41 s and 16 GB resident."""
    return pickle.dumps(_Reduce(list, (range(400_000_000),)), protocol=4)


def _bytes_of_int() -> bytes:
    """`bytes(n)` as protocol 2 spells it (`__builtin__.bytes`), allowed only with no argument."""
    return pickle.dumps(_Reduce(bytes, (3221225472,)), protocol=2)


def _huge_array_state() -> bytes:
    """An 8 TB array declared by an 8-byte payload."""
    state = (1, (1 << 20, 1 << 20), np.dtype("f8"), False, b"\0" * 8)
    return pickle.dumps(_Reduce(_multiarray._reconstruct, (np.ndarray, (0,), b"b"), state), 4)


def _huge_reconstruct_shape() -> bytes:
    """`_reconstruct` asked for an 8 GiB array up front, which numpy never writes."""
    return pickle.dumps(_Reduce(_multiarray._reconstruct, (np.ndarray, (1 << 33,), b"b")), 4)


def _huge_frombuffer() -> bytes:
    """Protocol 5's array view over a buffer far smaller than the shape."""
    args = (bytearray(8), np.dtype("f8"), (1 << 40,), "C")
    return pickle.dumps(_Reduce(_numeric._frombuffer, args), protocol=5)


def _object_array() -> bytes:
    """An object array, whose list payload numpy allocates shape x 8 bytes for first."""
    state = (1, (1 << 30,), np.dtype("O"), False, [1])
    return pickle.dumps(_Reduce(_multiarray._reconstruct, (np.ndarray, (0,), b"b"), state), 4)


def _crafted_dtype_state() -> bytes:
    """A float64 whose BUILD state claims it holds Python objects (flags 63)."""
    state = (3, "<", None, None, None, -1, -1, 63)
    return pickle.dumps(_Reduce(np.dtype, ("f8", False, True), state), protocol=4)


def _huge_scalar() -> bytes:
    """A numpy scalar of a 400 MB text dtype from one byte of data."""
    return pickle.dumps(_Reduce(_multiarray.scalar, (np.dtype("U100000000"), b"x")), 4)


def _codecs_amplified() -> bytes:
    """A 1 MiB string re-encoded 2000 times by `_codecs.encode` (protocol 2's bytes): 2 GB
    of bytes from a 1 MB file without the budget."""
    head = _global("_codecs", "encode") + pickle.MEMOIZE  # memo 1
    head += _text("a" * (1 << 20)) + pickle.MEMOIZE + _text("latin1") + pickle.MEMOIZE
    call = _get(1) + _get(2) + _get(3) + pickle.TUPLE2 + pickle.REDUCE
    body = pickle.EMPTY_LIST + pickle.MEMOIZE + pickle.MARK + head
    return _program(body + pickle.TUPLE2 + pickle.REDUCE + call * 2000 + pickle.APPENDS)


def _codecs_other_encoding() -> bytes:
    return pickle.dumps(_Reduce(__import__("codecs").encode, ("x" * 100, "utf-32")), 2)


def _deep_tuples() -> bytes:
    """A million nested 1-tuples: hashing or printing one recursed in C."""
    return _program(pickle.NONE + pickle.TUPLE1 * 1_000_000)


def _deep_lists() -> bytes:
    return _program(pickle.EMPTY_LIST * 20_000 + pickle.APPEND * 19_999)


def _deep_dicts() -> bytes:
    pairs = (pickle.EMPTY_DICT + _text("k")) * 20_000
    return _program(pairs + pickle.EMPTY_DICT + pickle.SETITEM * 20_000)


def _shared_lists() -> bytes:
    """60 levels of a list holding its predecessor twice: 485 bytes describing 2**60 leaves,
    which `np.array` of the value would try to materialise."""
    body = pickle.EMPTY_LIST + pickle.MEMOIZE + pickle.NONE + pickle.APPEND
    for level in range(60):
        body += pickle.EMPTY_LIST + (_get(level) + pickle.APPEND) * 2 + pickle.MEMOIZE
    return _program(body)


def _placed_before_build() -> bytes:
    """An empty array placed 1000 times, then given 1 MB of data: the list would weigh
    1 GB once built, but was weighed while the array was empty."""
    array = _global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
    array += pickle.BININT1 + b"\x00" + pickle.TUPLE1 + _binary(b"b") + pickle.TUPLE3
    array += pickle.REDUCE + pickle.MEMOIZE  # memo 1
    dtype = _global("numpy", "dtype") + _text("u1") + pickle.NEWFALSE + pickle.NEWTRUE
    state = (
        pickle.MARK
        + pickle.BININT1
        + b"\x01"
        + _long1(1 << 20)
        + pickle.TUPLE1
        + dtype
        + pickle.TUPLE3
        + pickle.REDUCE
        + pickle.NEWFALSE
    )
    state += _binary(b"x" * (1 << 20)) + pickle.TUPLE
    body = pickle.EMPTY_LIST + pickle.MEMOIZE + pickle.MARK + array + _get(1) * 999
    return _program(body + pickle.APPENDS + _get(1) + state + pickle.BUILD)


def _repr_bomb() -> bytes:
    """A refused call whose argument is 16 levels of shared lists (65536 leaves, within
    the budget): the error message must not print it in full."""
    body = pickle.EMPTY_LIST + pickle.MEMOIZE + pickle.NONE + pickle.APPEND
    for level in range(16):
        body += pickle.EMPTY_LIST + (_get(level) + pickle.APPEND) * 2 + pickle.MEMOIZE
    call = _global("numpy", "dtype") + pickle.MARK + _get(16) + pickle.NEWFALSE + pickle.NEWTRUE
    return _program(body + call + pickle.TUPLE + pickle.REDUCE)


def _empty_dict_flood() -> bytes:
    """Two million empty dicts, one byte each."""
    return _program(pickle.EMPTY_DICT * 2_000_000)


def _colliding_int_keys() -> bytes:
    """Multiples of the hash modulus all hash to 0: building the dict is quadratic."""
    keys = b"".join(_long1(n * (2**61 - 1)) + pickle.NONE for n in range(1, 5000))
    return _program(pickle.EMPTY_DICT + pickle.MARK + keys + pickle.SETITEMS)


def _memo_index() -> bytes:
    """A 9-byte file that made the C unpickler zero-fill a 64 GB memo table."""
    return _program(pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 0xFFFFFFF0))


def _declared_bytes8() -> bytes:
    return _program(pickle.BINBYTES8 + struct.pack("<Q", 1 << 60) + b"x")


def _declared_frame() -> bytes:
    return pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", 1 << 62) + b"N."


def _persistent_id() -> bytes:
    return _program(pickle.NONE + pickle.BINPERSID)


# name -> (builder, readers, expected error (None: loads), words the message must have).
# Both readers share the machine and the numpy entries (the features allowlist is a subset
# of RLBench's), so the features reader runs the issue's cases and one per kind of limit.
HOSTILE: dict[str, tuple[Callable[[], bytes], tuple[str, ...], type | None, str]] = {
    "issue-bytearray": (_issue_bytearray, ("rlbench", "xicm"), PickleRefusedError, "bytearray"),
    "issue-list-range": (_issue_list_range, ("rlbench", "xicm"), PickleRefusedError, "list"),
    "bytes-of-int": (_bytes_of_int, ("rlbench", "xicm"), PickleRefusedError, "bytes()"),
    "huge-array-state": (_huge_array_state, ("rlbench", "xicm"), PickleLimitError, "needs"),
    "huge-reconstruct": (_huge_reconstruct_shape, ("rlbench",), PickleRefusedError, "(0,)"),
    "huge-frombuffer": (_huge_frombuffer, ("rlbench",), PickleLimitError, "needs"),
    "object-array": (_object_array, ("rlbench",), PickleRefusedError, "O8"),
    "crafted-dtype": (_crafted_dtype_state, ("rlbench",), PickleRefusedError, "state"),
    "huge-scalar": (_huge_scalar, ("rlbench",), PickleLimitError, "needs"),
    "codecs-amplified": (_codecs_amplified, ("rlbench", "xicm"), PickleLimitError, "bytes"),
    "codecs-encoding": (_codecs_other_encoding, ("rlbench",), PickleRefusedError, "latin1"),
    "deep-tuples": (_deep_tuples, ("rlbench", "xicm"), PickleLimitError, "deep"),
    "deep-lists": (_deep_lists, ("rlbench",), PickleLimitError, "deep"),
    "deep-dicts": (_deep_dicts, ("rlbench",), PickleLimitError, "deep"),
    "shared-lists": (_shared_lists, ("rlbench", "xicm"), PickleLimitError, "shared"),
    "placed-before-build": (_placed_before_build, ("rlbench",), PickleRefusedError, "BUILD"),
    "repr-bomb": (_repr_bomb, ("rlbench",), PickleRefusedError, "numpy.dtype(["),
    "empty-dict-flood": (_empty_dict_flood, ("rlbench",), PickleLimitError, "EMPTY_DICT"),
    "colliding-keys": (_colliding_int_keys, ("rlbench",), PickleRefusedError, "key"),
    "declared-bytes8": (_declared_bytes8, ("rlbench",), PickleReadError, "truncated"),
    "declared-frame": (_declared_frame, ("rlbench",), PickleReadError, "truncated"),
    "persistent-id": (_persistent_id, ("rlbench",), PickleRefusedError, "BINPERSID"),
    "memo-index": (_memo_index, ("rlbench",), None, ""),
}
CASES = [(name, reader) for name, (_, readers, _, _) in HOSTILE.items() for reader in readers]

# One child process imports the readers once and forks a fresh process per file. Each
# fork resets its peak RSS (VmHWM, via /proc/self/clear_refs) to its current RSS, reads the
# file and reports how far the peak rose: what that file cost, with the imports as the
# baseline. (ru_maxrss cannot be reset, and Linux carries the parent's into a child.)
RUNNER = """
import json, os, sys, time
from agnostos.shards.pickles import (
    RLBENCH_ALLOWLIST, XICM_FEATURES_ALLOWLIST, PickleReadError, PickleRefusedError, load_pickle,
)
ALLOWLISTS = {"rlbench": RLBENCH_ALLOWLIST, "xicm": XICM_FEATURES_ALLOWLIST}

def kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

def read(path, reader):
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = kib("VmRSS")
    start = time.perf_counter()
    try:
        load_pickle(path, allowlist=ALLOWLISTS[reader])
        error = None
    except (PickleReadError, PickleRefusedError) as err:
        error = [type(err).__name__, str(err)]
    seconds = time.perf_counter() - start
    return {"error": error, "seconds": seconds, "grown_kib": kib("VmHWM") - before}

for line in sys.stdin:
    path, reader = json.loads(line)
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(readable)
        os.write(writable, json.dumps(read(path, reader)).encode())
        os._exit(0)
    os.close(writable)
    with os.fdopen(readable) as pipe:
        reply = pipe.read()
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status, **(json.loads(reply) if reply else {})}), flush=True)
"""


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def child_reads(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    """Every hostile case, read by a process of its own (see RUNNER)."""
    if not _can_reset_peak_rss():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure each read's peak RSS")
    folder = tmp_path_factory.mktemp("hostile")
    for name in HOSTILE:
        (folder / f"{name}.pkl").write_bytes(HOSTILE[name][0]())
    jobs = [(str(folder / f"{name}.pkl"), reader) for name, reader in CASES]
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input="".join(json.dumps(job) + "\n" for job in jobs),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(replies) == len(jobs), result.stderr[-3000:]
    reads = {}
    for (name, reader), (path, _), reply in zip(CASES, jobs, replies, strict=True):
        reads[(name, reader)] = {**reply, "path": path, "size": Path(path).stat().st_size}
    return reads


@pytest.mark.parametrize(("name", "reader"), CASES, ids=[f"{n}-{r}" for n, r in CASES])
def test_hostile_pickle_is_refused_within_the_memory_bound(child_reads, name, reader):
    read = child_reads[(name, reader)]
    assert read["status"] == 0, read  # not killed, no crash
    _, _, expected, words = HOSTILE[name]
    if expected is None:
        assert read["error"] is None
    else:
        kind, message = read["error"]
        assert kind == expected.__name__, message
        assert message.startswith(f"{read['path']}: ") and "\n" not in message
        assert words in message
    assert read["grown_kib"] * 1024 <= DEFAULT_LIMITS.peak_bound(read["size"]), read
    assert read["seconds"] < 5.0


@pytest.mark.parametrize("builder", [_issue_bytearray, _issue_list_range, _bytes_of_int])
def test_the_bank_import_refuses_them_as_bank_errors(tmp_path, builder):
    path = tmp_path / "all_diffusion_features.pkl"
    path.write_bytes(builder())
    with pytest.raises(BankError) as excinfo:
        load_xicm_pickle(path)
    assert str(excinfo.value).startswith(f"{path}: refused ")


# -- random pickles -------------------------------------------------------------------

# tracemalloc sees the machine's own few objects (the error and its message, frames)
# beyond what it charges.
SLACK = 48 << 10
SMALL = PickleLimits(factor=32, allowance=256 << 10, max_depth=20)


def _body(value: Any, protocol: int = 4) -> bytes:
    """A real pickle of one value, without PROTO, FRAME and STOP and without memo opcodes
    (the pickler's fast mode), so it can be spliced anywhere as exactly one push."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=protocol)
    pickler.fast = True
    pickler.dump(value)
    data = buffer.getvalue()
    start = 2 + (9 if data[2:3] == pickle.FRAME else 0)
    return data[start:-1]


_STATE = (1, (1 << 40,), np.dtype("u1"), False, b"xyz")
SNIPPETS: list[bytes] = [
    _body(np.arange(12.0).reshape(3, 4)),
    _body(np.zeros((2, 0, 5), dtype=np.uint8)),
    _body(np.array(["ab", "c"])),
    _body(np.arange(6, dtype=">i4"), protocol=2),
    _body(np.arange(5, dtype=np.float32), protocol=5),
    _body(np.ones(300, dtype=np.float32), protocol=5),
    _body(np.random.RandomState(1).get_state()),
    _body({np.float32(3): "jar", 7: "drawer", "k": [1, 2.5, None]}),
    _body(np.int64(5)),
    _body(b"\x00\xff" * 40, protocol=2),
    _body(make_demo([make_observation(x=np.ones(3), misc={"n": 1})], None)),
    _body(_Reduce(_multiarray._reconstruct, (np.ndarray, (0,), b"b"), _STATE)),
    _body(_Reduce(_multiarray._reconstruct, (np.ndarray, (1 << 30,), b"b"))),
    _body(_Reduce(_numeric._frombuffer, (bytearray(4), np.dtype("u1"), (64,), "C")), 5),
    _body(_Reduce(np.dtype, ("f8", False, True), (3, "<", None, None, None, 8, 8, 63))),
    _body(_Reduce(bytearray, (1 << 30,))),
    _global("_codecs", "encode"),
    _global("numpy", "ndarray"),
    _global("rlbench.backend.observation", "Observation") + pickle.EMPTY_TUPLE + pickle.NEWOBJ,
    _text("latin1"),
    _text("\U0001f600" * 300),
    _text("a" * 20_000),
]
_ATOM = st.one_of(
    st.integers(0, 255).map(lambda n: pickle.BININT1 + bytes([n])),
    st.integers(-(2**31), 2**31 - 1).map(lambda n: pickle.BININT + struct.pack("<i", n)),
    st.integers(-(2**300), 2**300).map(_long1),
    st.floats(allow_nan=True).map(lambda x: pickle.BINFLOAT + struct.pack(">d", x)),
    st.text(max_size=400).map(_text),
    st.binary(max_size=400).map(_binary),
    st.binary(max_size=64).map(lambda b: pickle.BYTEARRAY8 + struct.pack("<Q", len(b)) + b),
    st.sampled_from([pickle.NONE, pickle.NEWTRUE, pickle.EMPTY_TUPLE]),
)
_GLOBALS = st.sampled_from(
    [*RLBENCH_ALLOWLIST.globals, ("builtins", "range"), ("posix", "system")]
).map(lambda key: pickle.GLOBAL + f"{key[0]}\n{key[1]}\n".encode())
_MARKED = pickle.MARK


def _list_of(items: list[bytes]) -> bytes:
    return pickle.EMPTY_LIST + pickle.MEMOIZE + _MARKED + b"".join(items) + pickle.APPENDS


def _dict_of(pairs: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(key + value for key, value in pairs)
    return pickle.EMPTY_DICT + pickle.MEMOIZE + _MARKED + body + pickle.SETITEMS


def _call(target: tuple[bytes, list[bytes]]) -> bytes:
    function, args = target
    return function + _MARKED + b"".join(args) + pickle.TUPLE + pickle.REDUCE + pickle.MEMOIZE


def _fan_out(target: tuple[int, int]) -> bytes:
    """A list holding one memoized value many times: cheap in the file, heavy to expand."""
    index, count = target
    return pickle.EMPTY_LIST + _MARKED + _get(index) * count + pickle.APPENDS


# Well-formed values: each pushes exactly one object (memoized where the pickler would).
VALUES = st.recursive(
    st.one_of(
        _ATOM.map(lambda atom: atom + pickle.MEMOIZE),
        st.sampled_from(SNIPPETS).map(lambda body: body + pickle.MEMOIZE),
        st.integers(0, 15).map(_get),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=6).map(_list_of),
        st.lists(st.tuples(_ATOM, inner), max_size=6).map(_dict_of),
        st.lists(inner, max_size=4).map(lambda items: _MARKED + b"".join(items) + pickle.TUPLE),
        st.tuples(_GLOBALS, st.lists(inner, max_size=3)).map(_call),
        st.tuples(st.integers(0, 15), st.integers(1, 2000)).map(_fan_out),
        st.tuples(inner, st.integers(1, 20)).map(lambda pair: _list_of([pair[0]] * pair[1])),
    ),
    max_leaves=12,
)
_OPCODES = [
    pickle.MARK, pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.TUPLE, pickle.TUPLE1,
    pickle.TUPLE2, pickle.TUPLE3, pickle.APPEND, pickle.APPENDS, pickle.SETITEM,
    pickle.SETITEMS, pickle.MEMOIZE, pickle.REDUCE, pickle.NEWOBJ, pickle.BUILD,
    pickle.STACK_GLOBAL, pickle.POP, pickle.EMPTY_SET, pickle.LONG_BINPUT + b"\xff" * 4,
]  # fmt: skip
_NOISE = st.one_of(st.sampled_from(_OPCODES), st.binary(max_size=6), _GLOBALS)


def _assemble(parts: tuple[list[bytes], list[bytes], int]) -> bytes:
    """Values into a top-level list, with a little noise spliced in somewhere."""
    values, noise, where = parts
    body = _list_of(values)
    cut = where % (len(body) + 1)
    return _program(body[:cut] + b"".join(noise) + body[cut:])


PROGRAMS = st.tuples(
    st.lists(VALUES, max_size=8), st.lists(_NOISE, max_size=2), st.integers(0, 1 << 20)
).map(_assemble)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=PROGRAMS, reader=st.sampled_from(sorted(ALLOWLISTS)))
def test_random_pickles_stay_within_their_charges(data, reader):
    """Whatever the opcodes, only the project's pickle errors come out, and tracemalloc's
    peak stays below the charges plus the file (so below `peak_bound`)."""
    machine = RestrictedUnpickler(data, "random.pkl", ALLOWLISTS[reader], SMALL)
    tracemalloc.start()
    try:
        machine.load()
    except (PickleReadError, PickleRefusedError) as err:
        assert str(err).startswith("random.pkl: ")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= machine.spent + 4 * len(data) + SLACK
    assert peak <= SMALL.peak_bound(len(data)) + SLACK


# -- real files load unchanged --------------------------------------------------------


class _PlainUnpickler(pickle.Unpickler):
    """The stock unpickler, with RLBench's classes mapped to the local stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "rlbench.demo":
            return Demo
        if module == "rlbench.backend.observation":
            return Observation
        return super().find_class(module, name)


def _plain_load(data: bytes) -> Any:
    return _PlainUnpickler(io.BytesIO(data)).load()


def _assert_same(ours: Any, plain: Any, where: str = "value") -> None:
    """Equal types, values, dtypes and shapes all the way down."""
    assert type(ours) is type(plain), where
    if isinstance(plain, np.ndarray):
        assert ours.dtype == plain.dtype and ours.shape == plain.shape, where
        assert ours.tobytes() == plain.tobytes(), where
    elif isinstance(plain, dict):
        assert list(ours) == list(plain), where
        for (key, value), (key2, value2) in zip(ours.items(), plain.items(), strict=True):
            _assert_same(key, key2, f"{where} key")
            _assert_same(value, value2, f"{where}[{key!r}]")
    elif isinstance(plain, (list, tuple)):
        assert len(ours) == len(plain), where
        for index, (item, item2) in enumerate(zip(ours, plain, strict=True)):
            _assert_same(item, item2, f"{where}[{index}]")
    elif isinstance(plain, (Demo, Observation)):
        _assert_same(vars(ours), vars(plain), f"{where}.__dict__")
    elif isinstance(plain, float) and plain != plain:
        assert ours != ours, where
    else:
        assert ours == plain, where


def _real_sample_pickles(sample_root: Path) -> list[Path]:
    return sorted((sample_root / "open_drawer/all_variations/episodes").glob("episode*/*.pkl"))


def test_the_real_sample_loads_as_the_plain_unpickler_loads_it(sample_root):
    paths = _real_sample_pickles(sample_root)
    assert len(paths) == 6
    for path in paths:
        data = path.read_bytes()
        _assert_same(load_pickle(path), _plain_load(data), path.name)


def test_real_episodes_are_charged_less_than_the_factor_alone_allows(sample_root):
    """The allowance is not what lets real files through: they need well under `factor`
    bytes per file byte, and the charges are upper bounds of what they allocate."""
    path = sample_root / "open_drawer/all_variations/episodes/episode0/low_dim_obs.pkl"
    data = path.read_bytes()
    machine = RestrictedUnpickler(data, str(path), RLBENCH_ALLOWLIST)
    tracemalloc.start()
    try:
        machine.load()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert machine.spent < 0.75 * DEFAULT_LIMITS.factor * len(data)
    assert peak <= machine.spent


@pytest.fixture(scope="module")
def minibench_episode(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scripted episode from `agnostos sim generate`, at a small image size (its
    pickles are the point). In a child process: MuJoCo's GL context left in the test
    process made a later import of diffusers crash."""
    out = tmp_path_factory.mktemp("minibench")
    command = "import sys; from agnostos.cli import main; sys.exit(main(sys.argv[1:]))"
    generate = ["sim", "generate", "--tasks", "push_button", "--episodes", "1"]
    generate += ["--image-size", "32", "--out", str(out), "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-c", command, *generate], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "push_button/all_variations/episodes/episode0"


def test_minibench_episodes_load_as_the_plain_unpickler_loads_them(minibench_episode):
    for path in sorted(minibench_episode.glob("*.pkl")):
        _assert_same(load_pickle(path), _plain_load(path.read_bytes()), path.name)


def test_a_project_written_features_pickle_loads_unchanged(tmp_path):
    features = xicm_features(np.random.default_rng(0), "data/seen_tasks/train", ("a", "b"), 4)
    path = write_xicm_pickle(tmp_path / "all_diffusion_features.pkl", features)
    _assert_same(load_xicm_pickle(path), _plain_load(path.read_bytes()))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_values_at_every_protocol_load_unchanged(tmp_path, protocol):
    """What numpy 2 writes itself (`numpy._core`, `_frombuffer` at protocol 5, `_codecs`
    bytes at protocol 2), big-endian, empty, text and scalar values included."""
    value = {
        "f": np.arange(12.0).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "big": np.arange(4, dtype=">u4"),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "text": np.array(["drawer", "jar"]),
        "bool": np.array([True, False]),
        "zero_d": np.array(2.5),
        "scalars": [np.float32(87.0), np.int64(-3), np.bool_(True)],
        "state": np.random.RandomState(4).get_state(),
        "raw": b"\x00\x80\xff",
        "nothing": b"",
    }
    data = pickle.dumps(value, protocol=protocol)
    _assert_same(load_pickle(tmp_path / "v.pkl", data=data), _plain_load(data))


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_numpy1_and_numpy2_spellings_load_unchanged(tmp_path, numpy_module):
    demo = make_demo(
        [make_observation(pose=np.arange(7.0), misc={np.float32(2): "x"}) for _ in range(3)],
        np.random.RandomState(0).get_state(),
    )
    data = dump_pickle(demo, numpy_module=numpy_module)
    assert numpy_module.encode() in data
    _assert_same(load_pickle(tmp_path / "d.pkl", data=data), _plain_load(data))
