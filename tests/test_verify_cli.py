"""`agnostos shards verify` / `info` and the `agnostos demo` main job."""

from __future__ import annotations

import pytest

from agnostos.cli import main as cli
from agnostos.shards.convert import ConvertOptions, convert
from agnostos.shards.manifest import Manifest


@pytest.fixture
def converted(synthetic_root, tmp_path):
    out = tmp_path / "shards"
    convert(synthetic_root, out, ConvertOptions(shard_size=150_000), show_progress=False)
    return out


def test_verify_passes_on_intact_shards(converted, capsys):
    assert cli(["shards", "verify", str(converted), "--workers", "2"]) == 0
    assert "OK; " in capsys.readouterr().out


def test_verify_names_a_flipped_byte(converted, capsys):
    manifest = Manifest.load(converted)
    shard = converted / manifest.shards[1].name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x55  # inside some PNG payload
    shard.write_bytes(bytes(data))
    assert cli(["shards", "verify", str(converted)]) == 1
    err = capsys.readouterr().err
    assert f"FAULT {manifest.shards[1].name}: sha256 differs from the manifest" in err


def test_verify_names_a_truncated_and_a_missing_shard(converted, capsys):
    manifest = Manifest.load(converted)
    first, last = (converted / manifest.shards[0].name), (converted / manifest.shards[-1].name)
    first.write_bytes(first.read_bytes()[:5000])
    last.unlink()
    assert cli(["shards", "verify", str(converted)]) == 1
    err = capsys.readouterr().err
    assert f"{manifest.shards[-1].name}: file is missing" in err
    assert f"{manifest.shards[0].name}: 5000 bytes, manifest says" in err
    assert "not in the shard" in err or "unreadable tar" in err


def test_verify_counts_against_the_manifest(converted, capsys):
    path = converted / "manifest.json"
    path.write_text(path.read_text().replace('"frames": 24', '"frames": 25', 1))
    assert cli(["shards", "verify", str(converted)]) == 1
    assert "24 frames, manifest says 25" in capsys.readouterr().err


def test_info_summarises_tasks_and_sizes(converted, capsys):
    assert cli(["shards", "info", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "episodes    6  frames 144" in out
    assert "pick_block" in out and "push_block" in out and "image size  32x32" in out


def test_info_on_a_folder_without_manifest_is_a_clear_error(tmp_path, capsys):
    assert cli(["shards", "info", str(tmp_path)]) == 1
    assert "no shard manifest here" in capsys.readouterr().err


def test_verify_finds_a_corrupt_png_inside_a_sample(synthetic_root, tmp_path, capsys):
    """A bit flip in a source PNG passes conversion's fast check; verify's CRC catches it."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(synthetic_root, src)
    png = src / "push_block/all_variations/episodes/episode2/front_rgb/3.png"
    data = bytearray(png.read_bytes())
    data[45] ^= 0x01
    png.write_bytes(bytes(data))
    out = tmp_path / "out"
    convert(src, out, show_progress=False)
    assert cli(["shards", "verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "sample 'push_block/all_variations/episode2': front_rgb.3.png does not decode" in err
    assert "CRC mismatch" in err
