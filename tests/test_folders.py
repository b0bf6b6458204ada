"""Reading RLBench episode folders: layouts, ordering, metadata and bad input."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest

from agnostos.shards.episode import CAMERAS
from agnostos.shards.folders import (
    EpisodeError,
    discover_episodes,
    frame_indices,
    read_episode,
)
from agnostos.shards.pickles import PickleRefusedError, dump_pickle
from agnostos.shards.synthetic import BLOCK_HANDLE, SyntheticSpec, write_synthetic_episode


def test_real_sample_episode_contents(sample_root):
    episode = read_episode(discover_episodes(sample_root)[0])
    assert episode.key == "open_drawer/all_variations/episode0"
    assert episode.source == "open_drawer/all_variations/episodes/episode0"
    assert episode.instruction == "open the top drawer" and len(episode.descriptions) == 3
    assert episode.num_frames == 125 and episode.low_dim.gripper_pose.shape == (125, 7)
    assert episode.low_dim.ignore_collisions.shape == (125,)
    assert set(episode.cameras) == set(CAMERAS)
    front = episode.cameras["front"]
    assert front.intrinsics.shape == (125, 3, 3) and front.near[0] == pytest.approx(0.01)
    assert front.far[0] == pytest.approx(4.5)
    assert episode.random_state.keys.shape == (624,)
    assert episode.rgb("front", 0).shape == (128, 128, 3)
    assert episode.mask("wrist", 10).dtype == np.int32
    # The stored RNG state is the one RLBench restores with np.random.set_state.
    generator = np.random.RandomState()
    generator.set_state(episode.random_state.as_tuple())
    assert 0.0 <= generator.rand() < 1.0


def test_frames_are_ordered_numerically(tmp_path):
    folder = tmp_path / "front_rgb"
    folder.mkdir()
    for index in (0, 1, 2, 9, 10, 11, 100):
        (folder / f"{index}.png").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(b"")
    assert frame_indices(folder) == [0, 1, 2, 9, 10, 11, 100]


def test_synthetic_mask_names_use_float32_keys_and_match_geometry(synthetic_root):
    episode = read_episode(discover_episodes(synthetic_root)[0])
    assert episode.mask_names["front"] == {10: "diningTable_visible", BLOCK_HANDLE: "block"}
    points, mask = episode.point_cloud("overhead", 0), episode.mask("overhead", 0)
    assert abs(points[mask == 10][:, 2].mean() - 0.75) < 1e-4


def test_variation_layout_reads_descriptions_from_the_variation_folder(tmp_path):
    """Upstream RLBench: `<task>/variation<K>/` with descriptions beside `episodes/`."""
    source = write_synthetic_episode(tmp_path / "src", SyntheticSpec(episode=4))
    target = tmp_path / "root" / "pick_block" / "variation3" / "episodes" / "episode4"
    shutil.copytree(source, target)
    (target / "variation_number.pkl").unlink()
    shutil.move(target / "variation_descriptions.pkl", target.parent.parent)
    [location] = discover_episodes(tmp_path / "root")
    episode = read_episode(location)
    assert (episode.variation, episode.episode, episode.variation_folder) == (3, 4, "variation3")
    assert episode.instruction == "pick up the red block"


def test_discovery_orders_tasks_variations_and_episodes(tmp_path):
    for task, episode in [("b_task", 10), ("b_task", 2), ("a_task", 1)]:
        write_synthetic_episode(tmp_path, SyntheticSpec(task=task, episode=episode))
    (tmp_path / "b_task" / "variation1" / "episodes" / "episode0").mkdir(parents=True)
    found = [loc.relative for loc in discover_episodes(tmp_path)]
    assert found == [
        "a_task/all_variations/episodes/episode1",
        "b_task/all_variations/episodes/episode2",
        "b_task/all_variations/episodes/episode10",
        "b_task/variation1/episodes/episode0",
    ]
    with pytest.raises(FileNotFoundError, match="c_task"):
        discover_episodes(tmp_path, tasks=["c_task"])


@pytest.fixture
def episode_dir(tmp_path):
    return write_synthetic_episode(tmp_path, SyntheticSpec())


def _read(episode_dir):
    [location] = discover_episodes(episode_dir.parents[3])
    return read_episode(location)


def test_missing_frame_file_is_named(episode_dir):
    os.unlink(episode_dir / "front_rgb" / "7.png")
    with pytest.raises(EpisodeError, match=r"front_rgb: 23 frames on disk but .* has 24"):
        _read(episode_dir)


def test_renumbered_frame_is_reported_as_missing(episode_dir):
    os.rename(episode_dir / "wrist_depth" / "7.png", episode_dir / "wrist_depth" / "70.png")
    with pytest.raises(EpisodeError, match=r"wrist_depth/7\.png: frame file is missing"):
        _read(episode_dir)


def test_missing_image_folder_is_named(episode_dir):
    shutil.rmtree(episode_dir / "overhead_mask")
    with pytest.raises(EpisodeError, match="overhead_mask: image folder is missing"):
        _read(episode_dir)


def test_refused_pickle_names_file_and_global(episode_dir):
    path = episode_dir / "low_dim_obs.pkl"
    path.write_bytes(b"\x80\x04" + pickle.GLOBAL + b"os\nsystem\n" + b".")
    with pytest.raises(PickleRefusedError, match=r"low_dim_obs\.pkl: refused .*os\.system"):
        _read(episode_dir)


def test_wrong_variation_number_type_is_named(episode_dir):
    (episode_dir / "variation_number.pkl").write_bytes(dump_pickle("two"))
    with pytest.raises(EpisodeError, match=r"variation_number\.pkl: expected an int"):
        _read(episode_dir)


def test_ragged_task_state_is_kept_with_offsets(tmp_path):
    write_synthetic_episode(tmp_path, SyntheticSpec(ragged_task_state=True))
    episode = read_episode(discover_episodes(tmp_path)[0])
    assert "task_low_dim_state@offsets" in episode.low_dim.extra
    np.testing.assert_array_equal(
        episode.low_dim.frame_value("task_low_dim_state", 1), [1, 2, 3, 4]
    )
    np.testing.assert_array_equal(episode.low_dim.frame_value("task_low_dim_state", 2), [2, 3, 4])


def test_read_episode_takes_the_folder_path_the_readme_passes(sample_root):
    location = discover_episodes(sample_root)[0]
    by_path = read_episode(str(location.path))
    by_location = read_episode(location)
    assert (by_path.task, by_path.variation, by_path.episode) == (
        by_location.task,
        by_location.variation,
        by_location.episode,
    )
    assert by_path.instruction == by_location.instruction
    assert (by_path.rgb("front", 0) == by_location.rgb("front", 0)).all()


def test_read_episode_names_a_path_that_is_not_an_episode_folder(tmp_path):
    with pytest.raises(EpisodeError, match=r"not an episode folder \(expected"):
        read_episode(tmp_path / "open_drawer" / "all_variations" / "episode0")
