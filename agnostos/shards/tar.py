"""A minimal, deterministic USTAR writer for shards.

Every member gets the same fixed metadata (mode 0444, uid/gid 0, owner "agnostos",
mtime 0), so identical samples give identical bytes. It builds headers from a template
instead of going through `tarfile`, whose per-member header code costs more than copying
a typical 13 KB PNG, and serialises a whole sample into one buffer so a shard is written
with one call per episode. The output is plain USTAR that `tarfile`, GNU tar and
WebDataset read.

`TarBuilder` is the fast path the converter uses: it reads each frame file straight into
a reusable buffer after its header slot, so a PNG is copied once (kernel to buffer) and
no fresh memory is touched per episode. The converter builds an episode's frames and
arrays there first and only then its json member (`tar_member`), whose member index needs
their offsets, and writes the json member followed by the buffer. `sample_to_tar` is the
plain reference form; both give the same bytes for the same members.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_NAME_LIMIT = 100
_PREFIX_LIMIT = 155
_OWNER = b"agnostos"


def _template() -> bytearray:
    header = bytearray(BLOCK)
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # the checksum field counts as spaces while summing
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[265 : 265 + len(_OWNER)] = _OWNER
    header[297 : 297 + len(_OWNER)] = _OWNER
    return header


_TEMPLATE = bytes(_template())
_TEMPLATE_SUM = sum(_TEMPLATE)


def _split_name(name: str) -> tuple[bytes, bytes]:
    """USTAR stores long paths as prefix + '/' + name (<=155 and <=100 bytes)."""
    encoded = name.encode("utf-8")
    if len(encoded) <= _NAME_LIMIT:
        return b"", encoded
    cut = encoded.rfind(b"/", 0, _PREFIX_LIMIT + 1)
    if cut <= 0 or len(encoded) - cut - 1 > _NAME_LIMIT:
        raise ValueError(f"member name too long for a USTAR header: {name!r}")
    return encoded[:cut], encoded[cut + 1 :]


def _fill_header(buffer: bytearray, at: int, name: str, size: int) -> None:
    """Write the 512-byte header of a regular-file member into `buffer[at : at + 512]`."""
    prefix, short = _split_name(name)
    size_field = b"%011o\0" % size
    buffer[at : at + BLOCK] = _TEMPLATE
    buffer[at : at + len(short)] = short
    buffer[at + 124 : at + 136] = size_field
    if prefix:
        buffer[at + 345 : at + 345 + len(prefix)] = prefix
    checksum = _TEMPLATE_SUM + sum(short) + sum(prefix) + sum(size_field)
    buffer[at + 148 : at + 156] = b"%06o\0 " % checksum


def member_header(name: str, size: int) -> bytes:
    """The 512-byte header of a regular-file member."""
    header = bytearray(BLOCK)
    _fill_header(header, 0, name, size)
    return bytes(header)


_TEMPLATE_ROW = np.frombuffer(_TEMPLATE, dtype=np.uint8)
_SIZE_SHIFTS = np.arange(30, -1, -3, dtype=np.int64)  # 11 octal digits, most significant first
_CHECKSUM_SHIFTS = np.arange(15, -1, -3, dtype=np.int64)  # 6 octal digits
_SIZE_LIMIT = 8**11


def member_headers(names: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
    """The headers of many regular-file members at once, as a (count, 512) uint8 array.

    Byte-identical to `member_header` for each (name, size); built with a few array
    operations instead of ~10 Python-level steps per member, which mattered with ~1,900
    small frame files per episode. Names that need the USTAR prefix field go through
    `member_header`.
    """
    encoded = [name.encode("utf-8") for name in names]
    count = len(encoded)
    headers = np.empty((count, BLOCK), dtype=np.uint8)
    headers[:] = _TEMPLATE_ROW
    if count == 0:
        return headers
    size_array = np.asarray(sizes, dtype=np.int64)
    if size_array.min() < 0 or size_array.max() >= _SIZE_LIMIT:
        raise ValueError(f"member size out of the USTAR range: {size_array.max()}")
    if max(map(len, encoded)) > _NAME_LIMIT:
        for row, (name, size) in enumerate(zip(names, sizes, strict=True)):
            headers[row] = np.frombuffer(member_header(name, size), dtype=np.uint8)
        return headers
    width = f"S{_NAME_LIMIT}"
    headers[:, :_NAME_LIMIT] = np.array(encoded, dtype=width).view(np.uint8).reshape(count, -1)
    headers[:, 124:135] = ((size_array[:, None] >> _SIZE_SHIFTS) & 7) | 0x30  # ASCII octal
    headers[:, 135] = 0
    checksums = headers.sum(axis=1, dtype=np.int64)  # the checksum field holds 8 spaces here
    headers[:, 148:154] = ((checksums[:, None] >> _CHECKSUM_SHIFTS) & 7) | 0x30
    headers[:, 154] = 0
    headers[:, 155] = 0x20
    return headers


def tar_member(name: str, data: bytes) -> bytes:
    """One whole member: header, data and zero padding to the next 512-byte block."""
    return member_header(name, len(data)) + data + bytes(-len(data) % BLOCK)


def sample_to_tar(sample: Mapping[str, bytes]) -> bytes:
    """A WebDataset sample as consecutive tar members `<__key__>.<field>`, in field order."""
    key = sample["__key__"]
    return b"".join(
        tar_member(f"{key}.{field}", data)
        for field, data in sample.items()
        if not field.startswith("_")
    )


_ZEROS = bytes(BLOCK)
_O_RDONLY = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = _O_RDONLY | getattr(os, "O_DIRECTORY", 0)


def _split_path(path: str) -> tuple[str, str]:
    """(folder, file name) of a path string: 'a/b.png' -> ('a', 'b.png'), '/b.png' ->
    ('/', 'b.png'), 'b.png' -> ('.', 'b.png')."""
    cut = path.rfind("/")
    if cut < 0:
        return ".", path
    return path[:cut] or "/", path[cut + 1 :]


class TarBuilder:
    """Tar members appended in place to one buffer that is reused from sample to sample.

    Why a reusable buffer: on a virtual machine, touching ~20 MB of fresh memory per
    episode (page faults) costs as much as reading the episode's 1,900 frame files, so a
    buffer that has reached its working size is kept and overwritten, never reallocated.
    The view it hands out must be released before the buffer can grow; forgetting to is a
    BufferError, never silent corruption.
    """

    READ_CHUNK = 1 << 20

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.size = 0

    def clear(self) -> None:
        self.size = 0

    def view(self) -> memoryview:
        """The members written since `clear()`; release it before adding more."""
        return memoryview(self._buffer)[: self.size]

    def add(self, name: str, data: bytes | bytearray | memoryview) -> tuple[int, int]:
        """Append one member holding `data`; returns its data span (start, end)."""
        start = self.size + BLOCK
        end = start + len(data)
        self._reserve(end + BLOCK)
        self._buffer[start:end] = data
        self._close_member(name, end)
        return start, end

    @property
    def buffer(self) -> bytearray:
        """The underlying buffer (valid up to `size`), for checking data spans in place."""
        return self._buffer

    def add_files(self, members: Iterable[tuple[str, str]]) -> list[tuple[int, int]]:
        """Append one member per (name, path) holding that file's bytes.

        Each file is read straight into the buffer after its header slot; returns each
        member's data span (start, end) in `buffer`. A read that returns less than asked is
        taken as the end of the file (what regular files do); the caller's content check
        (the PNG trailer) catches anything else. One call per episode keeps the per-file
        work in one tight loop, and the headers are filled afterwards in one batch.
        """
        names: list[str] = []
        spans: list[tuple[int, int]] = []
        chunk = self.READ_CHUNK
        open_file, read_into, close_file = os.open, os.readv, os.close
        position = self.size
        view = memoryview(self._buffer)
        folder, folder_descriptor = None, -1
        try:
            for name, path in members:
                start = end = position + BLOCK
                # Open relative to the file's folder: consecutive files share it, and the
                # kernel then resolves one name instead of the whole path each time.
                parent, file_name = _split_path(path)
                if parent != folder:
                    if folder_descriptor >= 0:
                        close_file(folder_descriptor)
                        folder_descriptor = -1
                    folder_descriptor = open_file(parent, _O_DIRECTORY)
                    folder = parent
                descriptor = open_file(file_name, _O_RDONLY, dir_fd=folder_descriptor)
                try:
                    while True:
                        if end + chunk + BLOCK > len(view):
                            view.release()  # growing needs every view of the buffer gone
                            self._reserve(end + chunk + BLOCK)
                            view = memoryview(self._buffer)
                        count = read_into(descriptor, [view[end : end + chunk]])
                        end += count
                        if count < chunk:
                            break
                finally:
                    close_file(descriptor)
                names.append(name)
                spans.append((start, end))
                position = end + (-(end - start) % BLOCK)
        finally:
            view.release()
            if folder_descriptor >= 0:
                close_file(folder_descriptor)
        self._fill_headers(names, spans)
        self.size = position
        return spans

    def _fill_headers(self, names: Sequence[str], spans: Sequence[tuple[int, int]]) -> None:
        """Write the headers in front of, and the zero padding after, each span's data."""
        headers = member_headers(names, [end - start for start, end in spans])
        buffer, zeros = self._buffer, _ZEROS
        with memoryview(headers.reshape(-1)) as flat:
            for at, (start, end) in zip(range(0, flat.nbytes, BLOCK), spans, strict=True):
                buffer[start - BLOCK : start] = flat[at : at + BLOCK]
                padding = -(end - start) % BLOCK
                buffer[end : end + padding] = zeros[:padding]

    def _close_member(self, name: str, end: int) -> None:
        """Write the header of the member whose data ends at `end`, and its zero padding."""
        at = self.size
        size = end - at - BLOCK
        _fill_header(self._buffer, at, name, size)
        padding = -size % BLOCK
        self._buffer[end : end + padding] = _ZEROS[:padding]
        self.size = end + padding

    def _reserve(self, capacity: int) -> None:
        missing = capacity - len(self._buffer)
        if missing > 0:  # grow geometrically, so a large episode costs few regrowths
            self._buffer.extend(bytes(max(missing, len(self._buffer) // 2)))
