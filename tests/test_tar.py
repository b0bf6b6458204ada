"""The shard tar format: the in-place TarBuilder against the reference `sample_to_tar`, the
json-first member index, and the reader (indexed, header walk, version-1 shards, damage)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from episode_asserts import assert_episodes_equal
from hypothesis import given, settings
from hypothesis import strategies as st

from agnostos.datamodules import DynamicsDataModule
from agnostos.shards.convert import (
    ConvertOptions,
    EncodedEpisode,
    _frame_members,
    convert,
    encode_episode,
)
from agnostos.shards.episode import CAMERAS, MODALITIES
from agnostos.shards.folders import discover_episodes, read_episode
from agnostos.shards.manifest import Manifest
from agnostos.shards.reading import FieldSelection, ShardReadError, iter_episodes, read_samples
from agnostos.shards.samples import (
    MemberIndex,
    episode_to_sample,
    frame_ext,
    iter_frame_fields,
    member_index,
    tar_spans,
)
from agnostos.shards.tar import (
    END_OF_ARCHIVE,
    TarBuilder,
    member_header,
    member_headers,
    sample_to_tar,
)
from agnostos.shards.verify import verify, verify_shard


def _encoded_bytes(location, builder: TarBuilder) -> bytes:
    """The sample as the converter writes it: the json member, then the builder's members."""
    result = encode_episode(location, CAMERAS, MODALITIES, builder)
    assert isinstance(result, EncodedEpisode), result
    with result.tar as view:
        return result.head + bytes(view)


def test_builder_matches_the_reference_writer(synthetic_root):
    location = discover_episodes(synthetic_root)[0]
    episode = read_episode(location)
    reference = sample_to_tar(episode_to_sample(episode, episode.rgb("front", 0).shape[:2]))
    assert _encoded_bytes(location, TarBuilder()) == reference


def test_small_reads_growth_and_reuse_give_identical_bytes(synthetic_root, monkeypatch):
    large, small = discover_episodes(synthetic_root)[:2]
    fresh = {loc: _encoded_bytes(loc, TarBuilder()) for loc in (large, small)}
    monkeypatch.setattr(TarBuilder, "READ_CHUNK", 7)  # every PNG takes many reads and regrowths
    builder = TarBuilder()
    assert _encoded_bytes(large, builder) == fresh[large]
    # Reused for another sample: stale bytes from the first must not leak into padding.
    assert _encoded_bytes(small, builder) == fresh[small]


def test_members_read_back_with_tarfile(tmp_path):
    files = {}
    for index, size in enumerate([0, 1, 511, 512, 513, 5000]):
        path = tmp_path / f"{index}.bin"
        path.write_bytes(bytes((index * 7 + i) % 256 for i in range(size)))
        files[f"sample/key.{index}.bin"] = path
    long_name = "task/" + "v" * 120 + "/episode0.json"  # needs the USTAR prefix field
    builder = TarBuilder()
    builder.add(long_name, b'{"a": 1}')
    spans = builder.add_files((name, str(path)) for name, path in files.items())
    for (start, end), path in zip(spans, files.values(), strict=True):
        assert bytes(builder.buffer[start:end]) == path.read_bytes()
    with builder.view() as view:
        archive = bytes(view) + END_OF_ARCHIVE
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        read = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
    assert read == {long_name: b'{"a": 1}', **{n: p.read_bytes() for n, p in files.items()}}


NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1).filter(
    lambda name: len(name.encode()) <= 100  # what fits the name field without a prefix
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(NAMES, st.integers(0, 8**11 - 1)), max_size=20), st.booleans())
def test_batched_headers_equal_one_at_a_time(members, long_name):
    """`member_headers` (the builder's batch path) against `member_header`, byte for byte;
    with one long name the batch takes the prefix-field path."""
    if long_name:
        members = [*members, ("dir/" + "p" * 120 + "/name.png", 5)]
    names = [name for name, _ in members]
    sizes = [size for _, size in members]
    expected = b"".join(member_header(name, size) for name, size in members)
    assert member_headers(names, sizes).tobytes() == expected


def test_batched_headers_refuse_sizes_outside_ustar():
    with pytest.raises(ValueError, match="out of the USTAR range"):
        member_headers(["a"], [8**11])


def test_frame_members_follow_the_sample_order(synthetic_root):
    location = discover_episodes(synthetic_root)[0]
    episode = read_episode(location, ("front", "wrist"), ("rgb", "mask"))
    paths, fields, names = _frame_members(episode)
    frames = list(iter_frame_fields(episode))
    assert paths == [episode.frames.path(*frame) for frame in frames]
    assert fields == [frame_ext(*frame) for frame in frames]
    assert names == [f"{episode.key}.{frame_ext(*frame)}" for frame in frames]


def test_files_given_by_relative_and_bare_paths(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"in sub")
    (tmp_path / "b.bin").write_bytes(b"at top")
    monkeypatch.chdir(tmp_path)
    builder = TarBuilder()
    members = [("x.0", "sub/a.bin"), ("x.1", "b.bin"), ("x.2", str(tmp_path / "b.bin"))]
    spans = builder.add_files(members)
    assert [bytes(builder.buffer[a:b]) for a, b in spans] == [b"in sub", b"at top", b"at top"]


def test_header_rejects_names_that_do_not_fit():
    with pytest.raises(ValueError, match="too long for a USTAR header"):
        member_header("x" * 101, 1)


def test_a_held_view_blocks_growth_loudly(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"\1" * 4096)
    builder = TarBuilder()
    builder.add("a.txt", b"abc")
    with builder.view(), pytest.raises(BufferError):
        builder.add_files([("b.bin", str(path))])


# -- the member index and the reader ------------------------------------------------------------


QUIET = {"show_progress": False}


@pytest.fixture(scope="module")
def indexed_shards(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic episodes in three shards of two episodes each (version-2 samples)."""
    out = tmp_path_factory.mktemp("indexed_shards")
    convert(synthetic_root, out, ConvertOptions(shard_size=900_000), **QUIET)
    assert len(Manifest.load(out).shards) == 3
    return out


def _v1_sample_tar(sample: dict) -> bytes:
    """A sample as format version 1 wrote it: frames, json without index, low_dim.npz."""
    metadata = json.loads(sample["json"])
    del metadata["index"]
    metadata["format_version"] = 1
    frames = {f: v for f, v in sample.items() if f.endswith(".png")}
    v1 = {
        "__key__": sample["__key__"],
        **frames,
        "json": json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode(),
        "low_dim.npz": sample["low_dim.npz"],
    }
    return sample_to_tar(v1)


def write_v1_dataset(v2: Path, v1: Path) -> None:
    """Rewrite a converted dataset as the version-1 converter wrote it (shards, manifest)."""
    v1.mkdir()
    manifest = json.loads((v2 / "manifest.json").read_text())
    for shard in manifest["shards"]:
        samples = read_samples([str(v2 / shard["name"])], use_index=False)
        data = b"".join(_v1_sample_tar(sample) for sample in samples) + END_OF_ARCHIVE
        (v1 / shard["name"]).write_bytes(data)
        shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        for episode in shard["episodes"]:
            del episode["keyframes"]
    manifest["version"] = 1
    (v1 / "manifest.json").write_text(json.dumps(manifest))


def _wds_samples(url: str) -> list[dict]:
    dataset = wds.WebDataset(url, shardshuffle=False, empty_check=False)
    return [{k: v for k, v in s.items() if k != "__local_path__"} for s in dataset]


def _member_layout(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as archive:
        return archive.getmembers()


def test_json_comes_first_and_its_index_matches_tarfile_offsets(indexed_shards):
    for shard in Manifest.load(indexed_shards).shards:
        members = _member_layout(indexed_shards / shard.name)
        by_key: dict[str, list[tarfile.TarInfo]] = {}
        for member in members:
            by_key.setdefault(member.name.split(".", 1)[0], []).append(member)
        assert list(by_key) == [episode.key for episode in shard.episodes]
        for key, parts in by_key.items():
            head, later = parts[0], parts[1:]
            assert head.name == f"{key}.json"
            with tarfile.open(indexed_shards / shard.name) as archive:
                metadata = json.loads(archive.extractfile(head).read())
            base = head.offset_data + head.size + (-head.size % 512)
            table = [record.split(",") for record in metadata["index"]["members"].split(";")]
            assert [(f, int(o), int(s)) for f, o, s in table] == [
                (m.name.split(".", 1)[1], m.offset_data - base, m.size) for m in later
            ]
            last = later[-1]
            assert (
                metadata["index"]["length"]
                == last.offset_data + last.size + (-last.size % 512) - base
            )
            assert later[-1].name == f"{key}.low_dim.npz" and metadata["format_version"] == 2


SELECTIONS = [
    None,
    FieldSelection(frozenset({"json"})),
    FieldSelection(frozenset({"json", "low_dim.npz", "front_rgb.3.png"})),
    FieldSelection(frozenset({"json"}), ("wrist_rgb.", "front_depth.1")),
    FieldSelection(frozenset({"low_dim.npz", "nonexistent.png"})),
]


@pytest.mark.parametrize("selection", SELECTIONS)
def test_indexed_reads_equal_header_walks_and_webdataset(indexed_shards, selection):
    for shard in Manifest.load(indexed_shards).shards:
        url = str(indexed_shards / shard.name)
        walked = list(read_samples([url], selection, use_index=False))
        for source in (url, f"pipe:cat {url}"):
            indexed = list(read_samples([source], selection))
            assert [{**s, "__url__": url} for s in indexed] == walked, source
        everything = _wds_samples(url)
        assert [{k: v for k, v in s.items() if selection is None or k.startswith("__")
                 or selection(k)} for s in everything] == walked  # fmt: skip


def test_keys_and_per_key_fields_through_the_index(indexed_shards):
    url = str(indexed_shards / Manifest.load(indexed_shards).shards[1].name)
    keys = [s["__key__"] for s in read_samples([url], FieldSelection(frozenset({"json"})))]
    only = {keys[0]: frozenset({"front_rgb.0.png", "front_rgb.23.png"})}
    for source in (url, f"pipe:cat {url}"):
        for use_index in (True, False):
            picked = list(read_samples([source], keys=frozenset({keys[1]}), use_index=use_index))
            assert [s["__key__"] for s in picked] == [keys[1]]
            pair = list(read_samples([source], fields_by_key=only, use_index=use_index))
            assert sorted(pair[0]) == ["__key__", "__url__", "front_rgb.0.png", "front_rgb.23.png"]
            assert len(pair) == 2 and len(pair[1]) > 3  # the other key: every field


def test_members_of_tiny_and_block_sized_files_read_back(tmp_path):
    """Sizes 0, 1, 511, 512 and 513 bytes: padding and offsets at block edges."""
    sizes = {f"x.{i}.bin": size for i, size in enumerate([0, 1, 511, 512, 513, 5000])}
    later = {name: bytes((i * 7) % 256 for i in range(size)) for name, size in sizes.items()}
    spans, length = tar_spans([len(data) for data in later.values()])
    metadata = {"format_version": 2, "index": member_index(list(later), spans, length)}
    sample = {"__key__": "k/e0", "json": json.dumps(metadata).encode(), **later}
    path = tmp_path / "s.tar"
    path.write_bytes(sample_to_tar(sample) * 1 + END_OF_ARCHIVE)
    for source in (str(path), f"pipe:cat {path}"):
        (read,) = read_samples([source])
        assert {k: v for k, v in read.items() if not k.startswith("__")} == {
            "json": sample["json"], **later
        }  # fmt: skip


def test_index_lookups_and_a_field_name_it_cannot_hold():
    later = ["a.0.png", "a.1.png", "b.0.png", "a.10.png", "low_dim.npz"]
    spans, length = tar_spans([10, 600, 0, 512, 3])
    index = MemberIndex.of({"index": member_index(later, spans, length)})
    assert index.find("a.1.png") == ("a.1.png", 1536, 600)
    assert index.find("a.1") is None and index.find("low_dim.npz") == ("low_dim.npz", 4608, 3)
    assert [entry[0] for entry in index.entries(["a."])] == ["a.0.png", "a.1.png", "a.10.png"]
    assert MemberIndex.of({"format_version": 1}) is None
    with pytest.raises(ValueError, match="malformed member index"):
        MemberIndex.of({"index": {"members": 5, "length": 1}})
    with pytest.raises(ValueError, match="lies outside the sample"):
        MemberIndex("x.png,512,10", 100).find("x.png")
    with pytest.raises(ValueError, match=r"field 'a,b.png' cannot be indexed"):
        member_index(["a,b.png"], [(512, 520)], 1024)


def test_old_format_shards_still_read(indexed_shards, tmp_path, synthetic_root):
    old = tmp_path / "v1"
    write_v1_dataset(indexed_shards, old)
    manifest = Manifest.load(old)
    assert manifest.version == 1 and all(e.keyframes is None for e in manifest.episodes)
    first = _member_layout(old / manifest.shards[0].name)
    assert first[0].name.endswith(".front_rgb.0.png")  # frames first, no index
    for shard in manifest.shards:
        url = str(old / shard.name)
        for selection in SELECTIONS:
            expected = list(read_samples([url], selection, use_index=False))
            assert list(read_samples([url], selection)) == expected
            piped = list(read_samples([f"pipe:cat {url}"], selection))
            assert [{**s, "__url__": url} for s in piped] == expected
        assert list(read_samples([url])) == _wds_samples(url)
    originals = [read_episode(location) for location in discover_episodes(synthetic_root)]
    loaded = list(iter_episodes([str(old / shard.name) for shard in manifest.shards]))
    for actual, expected in zip(loaded, originals, strict=True):
        assert_episodes_equal(actual, expected)
    assert verify(old).ok
    common = {
        "val_episodes": [e.key for e in manifest.episodes],
        "batch_size": 64,
        "num_workers": 0,
        "input_frame": "keyframes",
        "target_frame": "next_keyframe",
    }
    batches = {}
    for name, shards in (("v1", old), ("v2", indexed_shards)):
        module = DynamicsDataModule(shards=str(shards), **common)
        module.setup("validate")
        batches[name] = list(module.val_dataloader())
    assert [b.ids for b in batches["v1"]] == [b.ids for b in batches["v2"]]
    assert all(torch.equal(a.target_images, b.target_images)
               for a, b in zip(batches["v1"], batches["v2"], strict=True))  # fmt: skip


def _corrupt_index(shard: Path, key: str, edit) -> None:
    """Apply `edit` to the member table of sample `key`'s json, keeping its byte length."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as archive:
        member = archive.getmember(f"{key}.json")
    start, end = member.offset_data, member.offset_data + member.size
    metadata = json.loads(bytes(data[start:end]))
    metadata["index"] = edit(metadata["index"])
    new = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
    assert len(new) == end - start, "the edit must keep the json's length"
    data[start:end] = new
    shard.write_bytes(bytes(data))


def _swap_offsets(index: dict, first: str, second: str) -> dict:
    """Point `first`'s entry at `second`'s data (same digit count, so same json length)."""
    records = dict((r.split(",", 1)[0], r.split(",", 1)[1]) for r in index["members"].split(";"))
    offset_a, size_a = records[first].split(",")
    offset_b, _ = records[second].split(",")
    assert len(offset_a) == len(offset_b)
    records[first] = f"{offset_b},{size_a}"
    return {**index, "members": ";".join(f"{f},{rest}" for f, rest in records.items())}


def test_a_corrupt_index_is_an_error_naming_shard_and_key(indexed_shards, tmp_path):
    entry = Manifest.load(indexed_shards).shards[0]
    shard = tmp_path / entry.name
    shard.write_bytes((indexed_shards / entry.name).read_bytes())
    key = entry.episodes[1].key
    _corrupt_index(shard, key, lambda i: _swap_offsets(i, "front_rgb.5.png", "front_rgb.7.png"))
    want = FieldSelection(frozenset({"json", "front_rgb.5.png"}))
    pattern = (rf"{re.escape(str(shard))}: sample '{re.escape(key)}': its member index puts "
               r"'front_rgb\.5\.png' .* but that header names '.*front_rgb\.7\.png'")  # fmt: skip
    with pytest.raises(ShardReadError, match=pattern):
        list(read_samples([str(shard)], want))
    with pytest.raises(ShardReadError, match=rf"sample '{re.escape(key)}': its member index"):
        list(read_samples([f"pipe:cat {shard}"], want))
    assert len(list(read_samples([str(shard)], want, use_index=False))) == 2  # the walk is fine
    report = verify_shard(tmp_path, entry, None)
    assert any(f"sample '{key}': member index disagrees" in fault for fault in report.faults)


def test_a_corrupt_index_length_is_caught_at_the_next_sample(indexed_shards, tmp_path):
    shard = tmp_path / "shard.tar"
    entry = Manifest.load(indexed_shards).shards[0]
    shard.write_bytes((indexed_shards / entry.name).read_bytes())
    key = entry.episodes[0].key

    def shorter(index: dict) -> dict:  # 512 bytes short: lands inside the last member
        length = str(index["length"] - 512)
        assert len(length) == len(str(index["length"]))
        return {**index, "length": int(length)}

    _corrupt_index(shard, key, shorter)
    want = FieldSelection(frozenset({"json"}))
    for source in (str(shard), f"pipe:cat {shard}"):
        with pytest.raises(ShardReadError, match=rf"no valid tar header at byte \d+, where the "
                           rf"member index of sample '{re.escape(key)}' says"):  # fmt: skip
            list(read_samples([source], want))
