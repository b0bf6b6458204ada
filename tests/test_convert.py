"""Shard conversion: exact round trips, determinism, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from episode_asserts import assert_episodes_equal

from agnostos.cli import main as cli
from agnostos.shards.convert import (
    PROGRESS_NAME,
    ConvertError,
    ConvertOptions,
    convert,
    parse_size,
    shard_urls,
)
from agnostos.shards.folders import discover_episodes, read_episode
from agnostos.shards.manifest import Manifest
from agnostos.shards.reading import iter_episodes
from agnostos.shards.synthetic import write_synthetic_dataset
from agnostos.shards.verify import verify

QUIET = {"show_progress": False}


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("shard-*.tar"))}


def test_parse_size():
    assert parse_size("1GB") == 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2.5k") == 2500
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size("lots")


def test_real_sample_round_trip_is_exact(sample_root, tmp_path):
    result = convert(sample_root, tmp_path / "out", **QUIET)
    assert len(result.manifest.shards) == 1
    loaded = list(iter_episodes(shard_urls(tmp_path / "out")))
    originals = [read_episode(location) for location in discover_episodes(sample_root)]
    assert len(loaded) == len(originals) == 2
    for actual, expected in zip(loaded, originals, strict=True):
        assert_episodes_equal(actual, expected)
    assert [e.keyframes for e in loaded] == [(70, 85, 124), (64, 77, 107)]
    assert [e.keyframes for e in result.manifest.episodes] == [(70, 85, 124), (64, 77, 107)]
    assert Manifest.load(tmp_path / "out") == result.manifest
    assert verify(tmp_path / "out").ok


def test_synthetic_round_trip_and_manifest(synthetic_root, tmp_path):
    out = tmp_path / "out"
    result = convert(synthetic_root, out, ConvertOptions(shard_size=150_000), **QUIET)
    manifest = Manifest.load(out)
    assert manifest == result.manifest
    assert len(manifest.shards) > 1
    for shard in manifest.shards:  # size is a maximum unless one episode alone exceeds it
        assert shard.bytes <= 150_000 + 1024 or len(shard.episodes) == 1
    data = json.loads((out / "manifest.json").read_text())
    assert data["tasks"] == {
        "pick_block": {"episodes": 3, "frames": 72},
        "push_block": {"episodes": 3, "frames": 72},
    }
    assert data["image_size"] == [32, 32] and data["cameras"][0] == "front"
    loaded = list(iter_episodes(shard_urls(out)))
    for actual, location in zip(loaded, discover_episodes(synthetic_root), strict=True):
        assert_episodes_equal(actual, read_episode(location))
    assert not (out / PROGRESS_NAME).exists()


def test_same_bytes_whatever_the_worker_count_or_write_path(synthetic_root, tmp_path):
    options = ConvertOptions(shard_size=150_000)
    runs = {
        "w1": {"workers": 1},
        "w2": {"workers": 2},
        "buffered": {"workers": 1, "direct_io": False},
    }
    for name, kwargs in runs.items():
        convert(synthetic_root, tmp_path / name, options, **kwargs, **QUIET)
    runs["cli"] = {}
    argv = ["shards", "convert", str(synthetic_root), str(tmp_path / "cli"), "--no-progress"]
    assert cli([*argv, "--shard-size", "150000", "--buffered-writes"]) == 0
    expected = _shard_bytes(tmp_path / "w1")
    manifest = (tmp_path / "w1/manifest.json").read_bytes()
    assert len(expected) > 1
    for name in runs:
        assert _shard_bytes(tmp_path / name) == expected, name
        assert (tmp_path / name / "manifest.json").read_bytes() == manifest, name


def test_camera_and_modality_subsets(synthetic_root, tmp_path):
    options = ConvertOptions(cameras=("front", "wrist"), modalities=("rgb",), tasks=("push_block",))
    convert(synthetic_root, tmp_path / "out", options, **QUIET)
    episodes = list(iter_episodes(shard_urls(tmp_path / "out")))
    assert [e.task for e in episodes] == ["push_block"] * 3
    assert episodes[0].image_cameras == ("front", "wrist") and episodes[0].modalities == ("rgb",)
    with pytest.raises(KeyError, match="no front_depth frames"):
        episodes[0].png("front", "depth", 0)
    assert verify(tmp_path / "out").ok


def test_finished_conversion_is_not_redone_and_other_options_are_refused(synthetic_root, tmp_path):
    out = tmp_path / "out"
    convert(synthetic_root, out, **QUIET)
    before = _shard_bytes(out)
    again = convert(synthetic_root, out, **QUIET)
    assert again.already_complete and _shard_bytes(out) == before
    with pytest.raises(ConvertError, match="other options or input"):
        convert(synthetic_root, out, ConvertOptions(modalities=("rgb",)), **QUIET)


# -- bad input ------------------------------------------------------------------------------


def _damaged_copy(synthetic_root: Path, tmp_path: Path, damage) -> tuple[Path, Path]:
    root = tmp_path / "src"
    shutil.copytree(synthetic_root, root)
    episode = root / "pick_block/all_variations/episodes/episode1"
    damage(episode)
    return root, episode


def _truncate_png(episode: Path) -> None:
    path = episode / "left_shoulder_depth" / "5.png"
    path.write_bytes(path.read_bytes()[:-20])


def _drop_frame(episode: Path) -> None:
    os.unlink(episode / "overhead_rgb" / "9.png")


def _extra_frames(episode: Path) -> None:
    shutil.copy(episode / "wrist_mask" / "0.png", episode / "wrist_mask" / "24.png")


def _other_size_frame(episode: Path) -> None:
    """Frame 3 of one folder from another resolution (a valid PNG, wrong dataset)."""
    from agnostos.shards.codecs import encode_png

    (episode / "front_rgb" / "3.png").write_bytes(encode_png(np.zeros((16, 16, 3), np.uint8)))


def _evil_pickle(episode: Path) -> None:
    (episode / "low_dim_obs.pkl").write_bytes(b"\x80\x04\x8c\x02os\x8c\x06system\x93.")


def _truncated_pickle(episode: Path) -> None:
    path = episode / "low_dim_obs.pkl"
    path.write_bytes(path.read_bytes()[:1000])


DAMAGES = {
    "truncated png": (_truncate_png, r"left_shoulder_depth/5\.png: truncated PNG"),
    "missing frame": (_drop_frame, r"overhead_rgb: 23 frames on disk but"),
    "extra frame": (_extra_frames, r"wrist_mask: 25 frames on disk but .* 24 observations"),
    "other image size": (_other_size_frame, r"front_rgb/3\.png: image is \(16, 16\), other"),
    "refused pickle": (_evil_pickle, r"low_dim_obs\.pkl: refused to load global 'os\.system'"),
    "truncated pickle": (_truncated_pickle, r"low_dim_obs\.pkl: unreadable pickle"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_bad_episode_fails_with_a_clear_error(synthetic_root, tmp_path, damage):
    function, message = DAMAGES[damage]
    root, _ = _damaged_copy(synthetic_root, tmp_path, function)
    with pytest.raises(ConvertError, match=r"episode pick_block/all_variations/episodes/episode1"):
        convert(root, tmp_path / "out", **QUIET)
    with pytest.raises(ConvertError, match=message):
        convert(root, tmp_path / "out2", **QUIET)
    assert not list((tmp_path / "out").glob("*.tar"))  # nothing half-written under a final name


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_bad_episode_is_skipped_and_listed(synthetic_root, tmp_path, damage, capsys):
    function, message = DAMAGES[damage]
    root, _ = _damaged_copy(synthetic_root, tmp_path, function)
    out = tmp_path / "out"
    assert (
        cli(["shards", "convert", str(root), str(out), "--on-error", "skip", "--no-progress"]) == 0
    )
    manifest = Manifest.load(out)
    assert [s.source for s in manifest.skipped] == ["pick_block/all_variations/episodes/episode1"]
    assert re.search(message, manifest.skipped[0].reason)
    assert len(manifest.episodes) == 5
    assert "skipped pick_block/all_variations/episodes/episode1" in capsys.readouterr().err
    assert verify(out).ok


def test_skip_exits_non_zero_when_nothing_converts(tmp_path):
    write_synthetic_dataset(tmp_path / "src", tasks=("pick_block",), episodes_per_task=1)
    _truncated_pickle(tmp_path / "src/pick_block/all_variations/episodes/episode0")
    argv = ["shards", "convert", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]
    assert cli([*argv, "--on-error", "skip"]) == 1
    assert cli([*argv[:3], str(tmp_path / "out_fail"), "--no-progress"]) == 1


# -- resume after SIGKILL -------------------------------------------------------------------


def _convert_command(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "agnostos", "shards", "convert", str(src), str(out),
            "--shard-size", "900KB", "--no-progress"]  # fmt: skip


def _run_and_kill(command: list[str], out: Path, after_shards: int) -> bool:
    """Start a conversion and SIGKILL it once `after_shards` shards are final (0: at once).

    Returns whether the process was killed (rather than finishing first)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if len(list(out.glob("shard-*.tar"))) >= after_shards:
            break
        time.sleep(0.002)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return killed


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_gives_identical_shards(tmp_path):
    src = tmp_path / "src"
    write_synthetic_dataset(src, episodes_per_task=12)
    reference = tmp_path / "reference"
    subprocess.run(_convert_command(src, reference), check=True, capture_output=True)
    expected = _shard_bytes(reference)
    assert len(expected) >= 8

    out = tmp_path / "out"
    for after_shards in (0, 2, 3, 6):
        assert _run_and_kill(_convert_command(src, out), out, after_shards), after_shards
        for name, data in _shard_bytes(out).items():  # final names only ever hold whole shards
            assert data == expected[name], name
    subprocess.run(_convert_command(src, out), check=True, capture_output=True)
    assert _shard_bytes(out) == expected
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert not list(out.glob("*.tmp")) and not (out / PROGRESS_NAME).exists()


def test_resume_refuses_a_different_conversion(synthetic_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / PROGRESS_NAME).write_text(
        json.dumps(
            {
                "fingerprint": "other",
                "next_episode": 1,
                "image_size": None,
                "shards": [],
                "skipped": [],
            }
        )
    )
    with pytest.raises(ConvertError, match="unfinished conversion with different options"):
        convert(synthetic_root, out, **QUIET)


def test_pipe_urls_read_shards(synthetic_root, tmp_path):
    convert(synthetic_root, tmp_path / "out", ConvertOptions(shard_size=150_000), **QUIET)
    urls = [f"pipe:cat {url}" for url in shard_urls(tmp_path / "out")]
    assert len(list(iter_episodes(urls))) == 6
