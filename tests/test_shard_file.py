"""ShardFile: the same bytes and SHA-256 on the direct and buffered paths, and a clean fall
back where the file system refuses direct I/O (faked at the `os` boundary, as the kernel
answers: EINVAL, or a short write)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agnostos.shards import shard_file
from agnostos.shards.shard_file import CHUNK, ShardFile

O_DIRECT = getattr(os, "O_DIRECT", 0)
REAL_WRITE = os.write


def _pieces(sizes: list[int], seed: int = 0) -> list[bytes]:
    """Distinct, non-repeating content per piece (so an offset mistake changes the bytes)."""
    out = []
    for index, size in enumerate(sizes):
        block = hashlib.sha256(f"{seed}/{index}".encode()).digest()
        out.append((block * (size // len(block) + 1))[:size])
    return out


def _write_all(path, pieces: list[bytes], direct: bool) -> tuple[ShardFile, str]:
    writer = ShardFile(path, direct=direct)
    for piece in pieces:
        writer.write(piece)
    return writer, writer.finish()


SIZES = [0, 1, 511, 512, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 4096, 7, 2 * CHUNK]


@pytest.mark.parametrize("direct", [True, False])
def test_bytes_and_digest_match_the_input(tmp_path, direct):
    pieces = _pieces(SIZES)
    expected = b"".join(pieces)
    writer, digest = _write_all(tmp_path / "a.bin", pieces, direct)
    assert (tmp_path / "a.bin").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest() == writer.digest
    assert writer.size == len(expected)


def test_buffered_when_asked(tmp_path):
    writer, _ = _write_all(tmp_path / "a.bin", _pieces([3 * CHUNK]), direct=False)
    assert writer.direct is False


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 3 * CHUNK), max_size=6), st.booleans())
def test_any_sequence_of_writes(tmp_path_factory, sizes, direct):
    path = tmp_path_factory.mktemp("seq") / "a.bin"
    pieces = _pieces(sizes, seed=len(sizes))
    _, digest = _write_all(path, pieces, direct)
    data = path.read_bytes()
    assert data == b"".join(pieces) and digest == hashlib.sha256(data).hexdigest()


def _is_direct(descriptor: int) -> bool:
    return bool(fcntl.fcntl(descriptor, fcntl.F_GETFL) & O_DIRECT)


@pytest.mark.skipif(not O_DIRECT, reason="this platform has no O_DIRECT")
def test_falls_back_when_the_file_system_refuses_direct_writes(tmp_path, monkeypatch):
    def refusing_write(descriptor, data):
        if _is_direct(descriptor):
            raise OSError(errno.EINVAL, "Invalid argument")
        return REAL_WRITE(descriptor, data)

    monkeypatch.setattr(shard_file.os, "write", refusing_write)
    pieces = _pieces([2 * CHUNK + 100, CHUNK])
    writer, digest = _write_all(tmp_path / "a.bin", pieces, direct=True)
    assert writer.direct is False
    assert (tmp_path / "a.bin").read_bytes() == b"".join(pieces)
    assert digest == hashlib.sha256(b"".join(pieces)).hexdigest()


@pytest.mark.skipif(not O_DIRECT, reason="this platform has no O_DIRECT")
def test_falls_back_when_open_refuses_direct_io(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(shard_file.os, "open", refusing_open)
    pieces = _pieces([CHUNK + 5])
    writer, _ = _write_all(tmp_path / "a.bin", pieces, direct=True)
    assert writer.direct is False and (tmp_path / "a.bin").read_bytes() == pieces[0]


@pytest.mark.skipif(not O_DIRECT, reason="this platform has no O_DIRECT")
def test_a_short_direct_write_is_finished_buffered(tmp_path, monkeypatch):
    calls = []

    def short_write(descriptor, data):
        calls.append(_is_direct(descriptor))
        if _is_direct(descriptor) and len(calls) == 1:
            return REAL_WRITE(descriptor, bytes(data[:4096]))
        return REAL_WRITE(descriptor, data)

    monkeypatch.setattr(shard_file.os, "write", short_write)
    pieces = _pieces([3 * CHUNK])
    writer, _ = _write_all(tmp_path / "a.bin", pieces, direct=True)
    if calls[0]:  # this file system took O_DIRECT at open
        assert calls[1] is False and writer.direct is False
    assert (tmp_path / "a.bin").read_bytes() == pieces[0]


def test_a_write_error_surfaces_and_close_still_works(tmp_path, monkeypatch):
    written = []

    def full_disk(descriptor, data):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        return REAL_WRITE(descriptor, data)

    monkeypatch.setattr(shard_file.os, "write", full_disk)
    writer = ShardFile(tmp_path / "a.bin")
    with pytest.raises(OSError, match="No space left"):
        for piece in _pieces([CHUNK] * 8):
            writer.write(piece)
        writer.finish()
    writer.close()
    writer.close()  # idempotent after a failure
