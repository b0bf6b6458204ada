"""Reading WebDataset samples back from tar shards, fast, through any URL WebDataset opens.

Why not `wds.tarfile_to_samples`: it walks members with Python's `tarfile`, which costs
~27 us per member. One RLBench episode is ~1,900 members (5 cameras x 3 modalities x T
frames), so reading one episode took ~50 ms, longer than unpickling the same episode from
its folder. This reader has two ways through a sample:

- **Member index** (samples written by this agnostos, format version 2): the sample's
  json comes first and lists every later member's offset and size (`samples.py`). The
  reader reads the json, then exactly the members the consumer asked for: `pread` on
  local files (nearby members in one call), one read-and-discard per gap on pipes and
  other streams; then it jumps to the next sample. Before trusting an entry it checks the
  tar header in front of it (name and size, read in the same call as the data), so a
  corrupt index raises an error naming the shard and sample instead of returning the
  wrong bytes.
- **Header walk** (version-1 shards, foreign tars, `use_index=False`): parse the
  512-byte headers straight from large buffered reads (~2 us per member), seeking past
  (local files) or reading past (pipes) members nobody asked for.

Output is exactly `wds.tarfile_to_samples`'s: dicts with `__key__`, `__url__` and one
bytes value per (lower-cased) field, grouped by key the same way (`base_plus_ext`), with
`__*__` metadata members skipped; tests check the two agree, indexed or not. URLs are
opened with `wds.gopen`, so local paths, `file:`, `pipe:` commands and http(s) all work.

Readable formats: USTAR (what `agnostos shards convert` writes), GNU long names ('L') and
pax headers ('x' path/size; 'g' ignored). Header checksums are not verified on the walk
(that would double its cost; `agnostos shards verify` checks shard hashes), but they are
on the header an index jump lands on. A corrupt or truncated shard raises
`ShardReadError` naming the shard, the byte offset and the sample key.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import webdataset as wds
from webdataset.shardlists import expand_urls

from agnostos.shards.episode import Episode
from agnostos.shards.samples import JSON_EXT, MemberIndex, ParsedJson, sample_to_episode

BLOCK = 512
CHUNK = 1 << 20
# Members whose gap is below this are fetched in one read (a gap costs less to copy than
# a second system call); 64 KiB is ~5 of the benchmark's 128x128 PNGs.
COALESCE_GAP = 1 << 16
# Bytes read at a sample start: at first enough for an all-camera episode's header and json
# (~70 KB), then the largest json member seen in the shard plus some slack (episodes of
# different lengths have index tables of different sizes).
_FIRST_JUMP_READ = 1 << 17
_JUMP_SLACK = 1 << 12
_REGULAR = (b"0", b"\0", b"7")
_META = re.compile(r"__[^/]*__($|/)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")
_JSON_B = JSON_EXT.encode()


class ShardReadError(ValueError):
    """A shard cannot be read; the message names the shard, byte offset and sample key."""


@dataclass(frozen=True)
class FieldSelection:
    """Which sample fields (`<camera>_rgb.12.png`, `json`, ...) a consumer needs.

    `exact` names whole fields, `prefixes` match field beginnings (`front_rgb.` selects every
    front RGB frame). None of either means every field.
    """

    exact: frozenset[str] = field(default_factory=frozenset)
    prefixes: tuple[str, ...] = ()

    @property
    def everything(self) -> bool:
        return not self.exact and not self.prefixes

    def __call__(self, name: str) -> bool:
        return self.everything or name in self.exact or name.startswith(self.prefixes)


class _Reader:
    """Exact-size sequential reads with cheap skipping and a byte offset for messages.

    `BufferedReader.read(n)` only returns fewer than n bytes at the end of the stream, so
    each header and member is one call; skips are seeks on local files and reads into one
    reusable buffer on pipes. On regular files `fd` allows positioned reads (`pread`) that
    bypass the buffer: an index jump then costs one small system call instead of a 1 MiB
    buffer refill, and the buffered stream is re-positioned only when a header walk resumes.
    """

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.offset = 0
        self.size: int | None = None  # known for local files: skips past it are truncation
        self.fd: int | None = None
        self._scratch: bytearray | None = None
        try:
            self.seekable = bool(stream.seekable())
            if self.seekable:
                status = os.fstat(stream.fileno())
                self.size = status.st_size
                if stat.S_ISREG(status.st_mode):
                    self.fd = stream.fileno()
                self.offset = stream.tell()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            self.seekable = False

    def take(self, size: int) -> bytes:
        """The next `size` bytes (fewer only at the end of the stream)."""
        data = self.stream.read(size)
        self.offset += len(data)
        return data

    def skip(self, size: int) -> int:
        """Advance `size` bytes; returns how many could be skipped."""
        if self.seekable:
            self.stream.seek(size, io.SEEK_CUR)
            self.offset += size
            if self.size is not None and self.offset > self.size:
                return size - (self.offset - self.size)
            return size
        if self._scratch is None:
            self._scratch = bytearray(CHUNK)
        skipped = 0
        with memoryview(self._scratch) as scratch:
            while skipped < size:
                count = self.stream.readinto(scratch[: min(size - skipped, CHUNK)])
                if not count:
                    break
                skipped += count
        self.offset += skipped
        return skipped

    def read_at(self, at: int, size: int) -> bytes:
        """`size` bytes from absolute offset `at` (fewer at the end of the stream).

        Positioned read on local files (the buffered stream is left where it is; `resume`
        re-positions it); on streams, a read-and-discard up to `at`, which must not lie
        behind the current offset."""
        if self.fd is not None:
            return os.pread(self.fd, size, at)
        if at < self.offset:
            raise ValueError(f"cannot go back from byte {self.offset} to {at} in a stream")
        if self.skip(at - self.offset) < at - self.offset:
            return b""
        return self.take(size)

    def resume(self, at: int) -> None:
        """Continue sequential reading at `at` (after positioned reads, or a skip)."""
        if self.fd is not None:
            self.stream.seek(at)
            self.offset = at
        elif at > self.offset:
            self.skip(at - self.offset)


def _octal(field_bytes: bytes) -> int:
    if field_bytes[:1] and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _cstring(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    position = 0
    while position < len(data):
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1 : position + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def split_member_name(name: str) -> tuple[str | None, str]:
    """(key, field) as WebDataset's `base_plus_ext`: the field starts at the basename's dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:  # no dot, or a basename starting with one: not a sample member
        return None, ""
    return name[:dot], name[dot + 1 :]


def _is_meta(name: str) -> bool:
    """WebDataset skips `__*__` members (its metadata convention)."""
    return bool(_META.match(name)) or ("/" not in name and name.endswith("__"))


def _ustar_name(header: bytes) -> bytes:
    """The full member name of a USTAR header (prefix + '/' + name when a prefix is set)."""
    end = header.find(0, 0, 100)
    name = header[: end if end >= 0 else 100]
    if header[345] and header[257:262] == b"ustar":
        end = header.find(0, 345, 500)
        name = header[345 : end if end >= 0 else 500] + b"/" + name
    return name


def _checksum_ok(header: bytes) -> bool:
    """The header checksum: the sum of its bytes with the checksum field read as spaces."""
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"x", 8)
    except ValueError:
        return False
    return sum(header) - sum(header[148:156]) + 8 * 32 == stored


def _member_size(header: bytes) -> int | None:
    try:
        return int(header[124:135], 8)
    except ValueError:
        try:
            return _octal(header[124:136])
        except ValueError:
            return None


def _selected(field_name: str, only: frozenset[str] | None, select: FieldSelection | None) -> bool:
    if only is not None:
        return field_name in only
    return select is None or select(field_name)


@dataclass(frozen=True)
class _Want:
    """What one walk yields: fields (`select`, or per key `fields_by_key`) of `keys`."""

    select: FieldSelection | None
    keys: frozenset[str] | None
    fields_by_key: Mapping[str, frozenset[str]] | None

    def key_wanted(self, key: str) -> bool:
        return self.keys is None or key in self.keys

    def only(self, key: str) -> frozenset[str] | None:
        return self.fields_by_key.get(key) if self.fields_by_key else None

    def indexed(self, key: str, index: MemberIndex) -> list[tuple[str, int, int]]:
        """(field, data offset, size) of the wanted later members, in tar order, once each."""
        only = self.only(key)
        if only is not None:
            found = [index.find(name) for name in only if name != JSON_EXT]
            entries = [entry for entry in found if entry is not None]
        elif self.select is None or self.select.everything:
            entries = index.entries()
        else:
            found = [index.find(name) for name in self.select.exact if name != JSON_EXT]
            entries = [entry for entry in found if entry is not None]
            entries += index.entries(self.select.prefixes)
        unique = {entry[0].lower(): entry for entry in entries}  # prefixes may overlap
        return sorted(unique.values(), key=lambda entry: entry[1])


def _runs(entries: list[tuple[str, int, int]]) -> Iterator[list[tuple[str, int, int]]]:
    """Consecutive wanted members grouped so that each group is one read."""
    run: list[tuple[str, int, int]] = []
    for entry in entries:
        if run and entry[1] - BLOCK - (run[-1][1] + run[-1][2]) > COALESCE_GAP:
            yield run
            run = []
        run.append(entry)
    if run:
        yield run


class _Walk:
    """One pass over one tar stream, yielding (key, field, data) of the wanted members.

    Two modes alternate: the buffered header walk (`_walk`), which hands over after a sample
    read through its index, and, on local files, positioned reads (`_positioned`), which go
    on from one indexed sample to the next without touching the buffered stream and hand
    back to the walk at the first sample without an index.
    """

    def __init__(self, stream: BinaryIO, url: str, want: _Want, use_index: bool):
        self.reader = _Reader(stream)
        self.url = url
        self.want = want
        self.use_index = use_index
        self.last_key: str | bytes = "<none yet>"
        self.jump_read = _FIRST_JUMP_READ
        self.json_seen = 0  # the largest json member (header included) read so far
        # Local files: where positioned reading goes on. It starts there too, so a shard of
        # indexed samples never fills the 1 MiB stream buffer it would not use.
        local = use_index and self.reader.fd is not None
        self.resume_at: int | None = self.reader.offset if local else None
        self.check_next = False  # streams: verify the header an index jump lands on
        self.jumped = False  # whether an index jump has happened (for messages)

    def members(self) -> Iterator[tuple[str, str, bytes]]:
        finished = False
        while not finished:
            if self.resume_at is None:
                finished = yield from self._walk()
            else:
                finished = yield from self._positioned(self.resume_at)

    # -- samples read through their member index ------------------------------------------

    def _parse(self, key: str, json_data: bytes, at: int) -> tuple[Any, MemberIndex | None]:
        """(parsed json, its member index) of a sample's first member; (None, None) when it
        is not JSON (such a sample is read by walking its headers). `at`: its data offset."""
        try:
            metadata = json.loads(json_data)
        except ValueError:
            return None, None
        try:
            return metadata, MemberIndex.of(metadata)
        except ValueError as err:
            raise ShardReadError(
                f"{self.url}: sample '{key}': corrupt member index in its json (member data at "
                f"byte {at}): {err}"
            ) from None

    def _json_member(
        self, key: str, data: bytes, metadata: Any
    ) -> Iterator[tuple[str, str, bytes]]:
        """The json member when wanted, carrying the parse already made (see `ParsedJson`)."""
        if self.want.key_wanted(key) and _selected(JSON_EXT, self.want.only(key), self.want.select):
            yield key, JSON_EXT, data if metadata is None else ParsedJson(data, metadata)

    def _indexed_members(
        self, key: str, index: MemberIndex, base: int
    ) -> Iterator[tuple[str, str, bytes]]:
        """The wanted later members of a sample through its index; `base`: where its json
        member ends. Afterwards `resume_at` (local files) or the stream is at the next sample."""
        reader, end = self.reader, base + index.length
        entries = self.want.indexed(key, index) if self.want.key_wanted(key) else []
        for run in _runs(entries):
            start = base + run[0][1] - BLOCK
            try:
                block = reader.read_at(start, base + run[-1][1] + run[-1][2] - start)
            except ValueError as err:  # a stream cannot go back: entries overlap
                raise ShardReadError(
                    f"{self.url}: sample '{key}': corrupt member index ({err})"
                ) from None
            for name, offset, size in run:
                at = base + offset - BLOCK - start
                if len(block) < at + BLOCK + size:
                    raise ShardReadError(
                        f"{self.url}: sample '{key}': member '{key}.{name}' is truncated "
                        f"(at byte {start + at + BLOCK})"
                    )
                self._check_header(block[at : at + BLOCK], start + at, key, name, size)
                yield key, name, block[at + BLOCK : at + BLOCK + size]
        self.last_key = key
        self.jumped = True
        if reader.fd is not None:
            if end > reader.size:
                raise ShardReadError(
                    f"{self.url}: sample '{key}' is truncated: its member index says it ends "
                    f"at byte {end}, the shard has {reader.size} bytes"
                )
            self.resume_at = end
            return
        missing = end - reader.offset
        if missing < 0 or reader.skip(missing) < missing:
            raise ShardReadError(
                f"{self.url}: sample '{key}': truncated or inconsistent with its member index "
                f"(the sample should end at byte {end})"
            )
        self.check_next = True

    def _check_header(self, header: bytes, at: int, key: str, name: str, size: int) -> None:
        """The tar header an index entry points behind must name that member and size."""
        expected = f"{key}.{name}".encode()
        found = _ustar_name(header)
        if found != expected or header[156:157] not in _REGULAR or _member_size(header) != size:
            what = f"names '{_text(found)}'" if found != expected else "has another size or type"
            raise ShardReadError(
                f"{self.url}: sample '{key}': its member index puts '{name}' ({size} bytes) "
                f"behind the tar header at byte {at}, but that header {what}; the index or the "
                "shard is corrupt"
            )

    def _bad_jump(self, at: int) -> ShardReadError:
        return ShardReadError(
            f"{self.url}: no valid tar header at byte {at}, where the member index of sample "
            f"'{_text(self.last_key)}' says the next sample starts; the index or the shard is "
            "corrupt"
        )

    def _positioned(self, at: int) -> Iterator[tuple[str, str, bytes]]:
        """Local files: the sample at `at` with positioned reads when it has an index, else
        hand back to the buffered walk there. Returns True at the end of the archive."""
        reader = self.reader
        head = reader.read_at(at, self.jump_read)
        header = head[:BLOCK]
        if len(header) == BLOCK and not header[0] and header.count(0) == BLOCK:
            return True  # end-of-archive marker
        if len(header) == BLOCK and not _checksum_ok(header):
            if self.jumped:
                raise self._bad_jump(at)
            reader.resume(at)  # the shard's first header: the walk reports the damage
            self.resume_at = None
            return False
        self.resume_at = None
        sample = self._json_first(header)
        if sample is None:
            reader.resume(at)  # not json-first: walk it (the walk reports any damage)
            return False
        key, size = sample
        data = head[BLOCK : BLOCK + size]
        if len(data) < size:
            data += reader.read_at(at + BLOCK + len(data), size - len(data))
        base = at + BLOCK + size + (-size % BLOCK)
        self.json_seen = max(self.json_seen, base - at)
        self.jump_read = self.json_seen + BLOCK + _JUMP_SLACK
        metadata, index = self._parse(key, data, at + BLOCK) if len(data) == size else (None, None)
        if index is None:
            reader.resume(at)  # no index (or a truncated json): the walk reads the sample
            return False
        yield from self._json_member(key, data, metadata)
        yield from self._indexed_members(key, index, base)
        return False

    @staticmethod
    def _json_first(header: bytes) -> tuple[str, int] | None:
        """(key, json size) when a header is a plain USTAR `<key>.json` member."""
        if header[156:157] != b"0":
            return None
        key, name = split_member_name(_text(_ustar_name(header)))
        size = _member_size(header)
        if key is None or name.lower() != JSON_EXT or size is None or _is_meta(key):
            return None
        return key, size

    # -- the buffered header walk ----------------------------------------------------------

    def _walk(self) -> Iterator[tuple[str, str, bytes]]:
        """Walk headers from the stream's position. Returns True at the end of the archive,
        False after handing a sample to its member index (reading goes on after it)."""
        reader, url, want = self.reader, self.url, self.want
        select, keys, fields_by_key = want.select, want.keys, want.fields_by_key
        everything = select is None or select.everything
        exact = select.exact if select is not None else frozenset()
        prefixes = select.prefixes if select is not None else ()
        # Byte forms for the fast path, which decides on raw header bytes without decoding.
        exact_b = frozenset(name.encode() for name in exact)
        prefixes_b = tuple(prefix.encode() for prefix in prefixes)
        keys_b = None if keys is None else frozenset(key.encode() for key in keys)
        exact_by_key = {
            key.encode(): frozenset(name.encode() for name in names)
            for key, names in (fields_by_key or {}).items()
        }
        use_index = self.use_index
        long_name: str | None = None
        pax: dict[str, str] = {}
        last_key = self.last_key
        # Bound methods in locals: the per-member cost is mostly Python call overhead.
        read, seek, seekable, limit = (
            reader.stream.read,
            reader.stream.seek,
            reader.seekable,
            reader.size,
        )
        while True:
            header_at = reader.offset
            header = read(BLOCK)
            reader.offset = header_at + len(header)
            if len(header) < BLOCK:
                what = "ends without an end-of-archive marker" if not header else "truncated header"
                raise ShardReadError(
                    f"{url}: {what} at byte {header_at} (truncated after sample "
                    f"'{_text(last_key)}')"
                )
            if not header[0] and header.count(0) == BLOCK:
                return True  # end-of-archive marker
            if self.check_next:
                self.check_next = False
                if not _checksum_ok(header):
                    raise self._bad_jump(header_at)
            try:
                size = int(header[124:135], 8)
            except ValueError:
                try:
                    size = _octal(header[124:136])
                except ValueError:
                    raise ShardReadError(
                        f"{url}: corrupt tar header at byte {header_at} "
                        f"(after sample '{_text(last_key)}')"
                    ) from None
            kind = header[156:157]
            if kind == b"0" and long_name is None and not pax and not header[345]:
                # Fast path: a plain USTAR file member (every member agnostos writes).
                end = header.find(0, 0, 100)
                raw = header[: end if end >= 0 else 100]
                slash = raw.rfind(b"/")
                dot = raw.find(b".", slash + 1)
                if dot > slash + 1 and not raw.startswith(b"__"):
                    raw_key = raw[:dot]
                    field_b = raw[dot + 1 :].lower()
                    if use_index and field_b == _JSON_B and raw_key != last_key:
                        # A sample that starts with its json may carry a member index.
                        key = _text(raw_key)
                        data = reader.take(size)
                        padding = -size % BLOCK
                        if len(data) < size or reader.skip(padding) < padding:
                            raise ShardReadError(
                                f"{url}: sample '{key}': member '{_text(raw)}' is truncated "
                                f"({len(data)} of {size} bytes at byte {header_at + BLOCK})"
                            )
                        self.last_key = last_key = raw_key
                        metadata, index = self._parse(key, data, header_at + BLOCK)
                        yield from self._json_member(key, data, metadata)
                        if index is not None:
                            yield from self._indexed_members(key, index, reader.offset)
                            return False
                        continue
                    last_key = raw_key
                    only = exact_by_key.get(raw_key) if exact_by_key else None
                    if (keys_b is None or raw_key in keys_b) and (
                        field_b in only
                        if only is not None
                        else everything or field_b in exact_b or field_b.startswith(prefixes_b)
                    ):
                        padding = -size % BLOCK
                        data = reader.take(size)
                        if len(data) < size or reader.skip(padding) < padding:
                            raise ShardReadError(
                                f"{url}: sample '{_text(raw_key)}': member '{_text(raw)}' is "
                                f"truncated ({len(data)} of {size} bytes at byte "
                                f"{header_at + BLOCK})"
                            )
                        yield _text(raw_key), _text(raw[dot + 1 :]), data
                        continue
                    padded = size + (-size % BLOCK)
                    if seekable:
                        seek(padded, io.SEEK_CUR)
                        reader.offset += padded
                        if limit is None or reader.offset <= limit:
                            continue
                    elif reader.skip(padded) == padded:
                        continue
                    raise ShardReadError(
                        f"{url}: sample '{_text(raw_key)}': member '{_text(raw)}' is truncated "
                        f"at byte {header_at + BLOCK}"
                    )
            if pax and "size" in pax:
                size = int(pax["size"])
            padding = -size % BLOCK
            if kind in (b"L", b"x", b"g"):
                data = reader.take(size)
                if len(data) < size or reader.skip(padding) < padding:
                    raise ShardReadError(f"{url}: truncated extended header at byte {header_at}")
                if kind == b"L":
                    long_name = _cstring(data)
                elif kind == b"x":
                    pax = _pax_records(data)
                continue
            if long_name is not None or pax:
                name = long_name or pax.get("path") or _cstring(header[0:100])
                long_name, pax = None, {}
            else:
                name = _cstring(header[0:100])
                if header[345] and header[257:262] == b"ustar":
                    name = _cstring(header[345:500]) + "/" + name
            key, field_name = split_member_name(name)
            if key is not None:
                last_key = key
            if (
                kind in _REGULAR
                and key is not None
                and not (name.startswith("__") and _is_meta(name))
                and (keys is None or key in keys)
                and _selected(field_name.lower(), (fields_by_key or {}).get(key), select)
            ):
                data = reader.take(size)
                if len(data) < size or reader.skip(padding) < padding:
                    raise ShardReadError(
                        f"{url}: sample '{key}': member '{name}' is truncated "
                        f"({len(data)} of {size} bytes at byte {header_at + BLOCK})"
                    )
                yield key, field_name, data
            elif reader.skip(size + padding) < size + padding:
                raise ShardReadError(
                    f"{url}: sample '{key}': member '{name}' is truncated at byte "
                    f"{header_at + BLOCK}"
                )


def iter_members(
    stream: BinaryIO,
    url: str,
    select: FieldSelection | None = None,
    keys: frozenset[str] | None = None,
    fields_by_key: Mapping[str, frozenset[str]] | None = None,
    use_index: bool = True,
) -> Iterator[tuple[str, str, bytes]]:
    """(key, field, data) of the selected regular-file members of one tar stream.

    `keys` restricts the samples read (others are skipped like unselected fields);
    `fields_by_key` gives, for some keys, the exact fields to read instead of `select`
    (e.g. only the two frames of an X-ICM pair when the frame count is known upfront).
    `use_index=False` ignores member indexes and walks every header (what `verify` does,
    to check the indexes against the walk).
    """
    return _Walk(stream, url, _Want(select, keys, fields_by_key), use_index).members()


def iter_tar_samples(
    stream: BinaryIO,
    url: str,
    select: FieldSelection | None = None,
    keys: frozenset[str] | None = None,
    fields_by_key: Mapping[str, frozenset[str]] | None = None,
    use_index: bool = True,
) -> Iterator[dict[str, Any]]:
    """WebDataset samples of one tar stream, grouped by consecutive key."""
    sample: dict[str, Any] | None = None
    for key, field_name, data in iter_members(stream, url, select, keys, fields_by_key, use_index):
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        suffix = field_name.lower()
        if suffix in sample:
            raise ShardReadError(f"{url}: sample '{key}': duplicate field '{suffix}'")
        sample[suffix] = data
    if sample is not None:
        yield sample


def open_shard(url: str) -> BinaryIO:
    """A plain path with a 1 MiB buffer (few syscalls per header on a header walk; indexed
    samples of local files are read with `pread`, past the buffer); any URL via `wds.gopen`.

    A `pipe:` URL comes back as WebDataset's `Pipe`; its `.stream` is read directly (the
    wrapper polls the child process on every read) and closing the `Pipe` checks the exit
    status.
    """
    if _SCHEME.match(url):
        return wds.gopen(url, "rb")
    return open(url, "rb", buffering=CHUNK)


def shard_samples(
    url: str,
    select: FieldSelection | None = None,
    keys: frozenset[str] | None = None,
    fields_by_key: Mapping[str, frozenset[str]] | None = None,
    use_index: bool = True,
) -> Iterator[dict[str, Any]]:
    """The samples of one shard URL; every failure is a `ShardReadError` naming the URL."""
    try:
        stream = open_shard(url)
    except Exception as err:
        raise ShardReadError(f"{url}: cannot open shard ({err})") from err
    try:
        yield from iter_tar_samples(
            getattr(stream, "stream", stream), url, select, keys, fields_by_key, use_index
        )
    except OSError as err:
        raise ShardReadError(f"{url}: read error ({err})") from err
    finally:
        try:
            stream.close()
        except OSError as err:  # a pipe: command that failed reports here
            raise ShardReadError(f"{url}: {err}") from err


def read_samples(
    urls: Iterable[str],
    select: FieldSelection | None = None,
    keys: frozenset[str] | None = None,
    fields_by_key: Mapping[str, frozenset[str]] | None = None,
    use_index: bool = True,
) -> Iterator[dict[str, Any]]:
    """The samples of the given shard URLs, in order (no splitting, no shuffling)."""
    for url in urls:
        yield from shard_samples(url, select, keys, fields_by_key, use_index)


def _expand(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns and `::`-separated lists as WebDataset expands them."""
    if isinstance(urls, str):
        return expand_urls(urls)
    return [url for item in urls for url in expand_urls(item)]


def iter_samples(urls: str | Sequence[str], use_index: bool = True) -> Iterator[dict]:
    """Raw samples (`__key__`, `__url__`, bytes per field) in shard order.

    Shards are read with this module's reader: through each sample's member index when it
    has one, else by walking headers; the samples are the ones `wds.WebDataset` gives.
    """
    return read_samples(_expand(urls), use_index=use_index)


def iter_episodes(urls: str | Sequence[str]) -> Iterator[Episode]:
    """Episodes stored in the given shards (local paths, brace patterns, `pipe:` commands)."""
    for sample in iter_samples(urls):
        yield sample_to_episode(sample)
