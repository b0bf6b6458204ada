"""The shard tar writer: the in-place TarBuilder against the reference `sample_to_tar`."""

from __future__ import annotations

import io
import tarfile

import pytest

from agnostos.shards.convert import EncodedEpisode, encode_episode
from agnostos.shards.episode import CAMERAS, MODALITIES
from agnostos.shards.folders import discover_episodes, read_episode
from agnostos.shards.samples import episode_to_sample
from agnostos.shards.tar import END_OF_ARCHIVE, TarBuilder, member_header, sample_to_tar


def _encoded_bytes(location, builder: TarBuilder) -> bytes:
    result = encode_episode(location, CAMERAS, MODALITIES, builder)
    assert isinstance(result, EncodedEpisode), result
    with result.tar as view:
        return bytes(view)


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
