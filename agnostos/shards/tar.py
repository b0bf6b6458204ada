"""A minimal, deterministic USTAR writer for shards.

Every member gets the same fixed metadata (mode 0444, uid/gid 0, owner "agnostos",
mtime 0), so identical samples give identical bytes. It writes headers directly instead
of going through `tarfile`, whose per-member header code costs more than copying a
typical 13 KB PNG; the output is plain USTAR that `tarfile`, GNU tar and WebDataset read.
"""

from __future__ import annotations

from typing import BinaryIO

BLOCK = 512
_NAME_LIMIT = 100
_PREFIX_LIMIT = 155
_OWNER = b"agnostos"


def _split_name(name: str) -> tuple[bytes, bytes]:
    """USTAR stores long paths as prefix + '/' + name (<=155 and <=100 bytes)."""
    encoded = name.encode("utf-8")
    if len(encoded) <= _NAME_LIMIT:
        return b"", encoded
    cut = encoded.rfind(b"/", 0, _PREFIX_LIMIT + 1)
    while cut > 0 and len(encoded) - cut - 1 > _NAME_LIMIT:
        cut = -1
    if cut <= 0:
        raise ValueError(f"member name too long for a USTAR header: {name!r}")
    return encoded[:cut], encoded[cut + 1 :]


def member_header(name: str, size: int) -> bytes:
    """The 512-byte header of a regular-file member."""
    prefix, short = _split_name(name)
    header = bytearray(BLOCK)
    header[0 : len(short)] = short
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # checksum placeholder (spaces, per the spec)
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[265 : 265 + len(_OWNER)] = _OWNER
    header[297 : 297 + len(_OWNER)] = _OWNER
    header[345 : 345 + len(prefix)] = prefix
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def member_size(payload: int) -> int:
    """Bytes one member occupies: header plus payload padded to whole blocks."""
    return BLOCK + -(-payload // BLOCK) * BLOCK


class TarStreamWriter:
    """Appends members to a binary stream; `close` writes the end-of-archive blocks."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream

    def add(self, name: str, data: bytes) -> None:
        self.stream.write(member_header(name, len(data)))
        self.stream.write(data)
        padding = -len(data) % BLOCK
        if padding:
            self.stream.write(b"\0" * padding)

    def add_sample(self, sample: dict) -> None:
        """Write a WebDataset sample: one `<__key__>.<field>` member per field, in order."""
        key = sample["__key__"]
        for field, data in sample.items():
            if not field.startswith("_"):
                self.add(f"{key}.{field}", data)

    def close(self) -> None:
        self.stream.write(b"\0" * (2 * BLOCK))
