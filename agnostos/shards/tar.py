"""A minimal, deterministic USTAR writer for shards.

Every member gets the same fixed metadata (mode 0444, uid/gid 0, owner "agnostos",
mtime 0), so identical samples give identical bytes. It builds headers from a template
instead of going through `tarfile`, whose per-member header code costs more than copying
a typical 13 KB PNG, and serialises a whole sample into one buffer so a shard is written
with one call per episode. The output is plain USTAR that `tarfile`, GNU tar and
WebDataset read.
"""

from __future__ import annotations

from collections.abc import Mapping

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_NAME_LIMIT = 100
_PREFIX_LIMIT = 155
_OWNER = b"agnostos"
_CHECKSUM = slice(148, 156)
_SIZE = slice(124, 136)


def _template() -> bytearray:
    header = bytearray(BLOCK)
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"00000000000\0"  # mtime
    header[_CHECKSUM] = b" " * 8  # counted as spaces while summing, per the spec
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


def member_header(name: str, size: int) -> bytes:
    """The 512-byte header of a regular-file member."""
    prefix, short = _split_name(name)
    size_field = b"%011o\0" % size
    header = bytearray(_TEMPLATE)
    header[0 : len(short)] = short
    header[_SIZE] = size_field
    header[345 : 345 + len(prefix)] = prefix
    checksum = _TEMPLATE_SUM + sum(short) + sum(prefix) + sum(size_field)
    header[_CHECKSUM] = b"%06o\0 " % checksum
    return bytes(header)


def sample_to_tar(sample: Mapping[str, bytes]) -> bytes:
    """A WebDataset sample as consecutive tar members `<__key__>.<field>`, in field order."""
    key = sample["__key__"]
    parts: list[bytes] = []
    for field, data in sample.items():
        if field.startswith("_"):
            continue
        parts.append(member_header(f"{key}.{field}", len(data)))
        parts.append(data)
        padding = -len(data) % BLOCK
        if padding:
            parts.append(b"\0" * padding)
    return b"".join(parts)
