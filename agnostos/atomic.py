"""Atomic file writes: a temp file in the same folder, fsync, then rename.

A reader (or a restarted run) therefore sees either the old file or the complete new one,
never a partial write, even if the process is killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
from collections.abc import Callable
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a just-written range to disk, without waiting.

    Why: a large file written in one go otherwise sits dirty in the page cache until the
    final fsync, which then waits for all of it. Starting writeback as the file grows lets
    the disk work while the writer goes on, so the fsync that makes the file durable finds
    little left to do. A hint only (Linux `sync_file_range`); a no-op where unavailable.
    """
    function = _sync_file_range()
    if function is not None and length > 0:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def fsync_directory(directory: str | Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dead_writers_temps(path: Path) -> None:
    """Delete `<name>.<pid>.tmp` files next to `path` left by processes no longer alive
    (a writer killed between writing and renaming), so none accumulates across runs."""
    prefix = f"{path.name}."
    for candidate in path.parent.glob(f"{glob_escape(prefix)}*{TMP_SUFFIX}"):
        pid = candidate.name[len(prefix) : -len(TMP_SUFFIX)]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            candidate.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically. The temp file's name holds the process id, so
    processes writing the same file at once (evaluation shards claiming one run folder)
    never rename each other's temp file away; the last rename wins, each one complete.
    Temp files of killed writers are removed on the next write."""
    path = Path(path)
    _remove_dead_writers_temps(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def fsync_tree(root: str | Path) -> None:
    """Flush every file under `root`, then the folders, so a rename that follows is durable."""
    for folder, _dirs, files in os.walk(Path(root), topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(folder)


def replace_directory(partial: str | Path, final: str | Path) -> None:
    """Move a fully written `partial` folder to `final`, replacing an older `final`.

    The old folder is renamed aside before the new one takes its name, so a kill at any
    point leaves a complete folder under `final` or under `final.old`, never a mixture.
    """
    partial, final = Path(partial), Path(final)
    fsync_tree(partial)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    fsync_directory(final.parent)
    shutil.rmtree(old, ignore_errors=True)
