"""Datamodules over real shards and folders: samples, splits, streams, errors, a Lightning fit.

The two-process DDP checks live in test_datamodules_ddp.py.
"""

from __future__ import annotations

import inspect
import multiprocessing
import pickle
import re
import shutil
import typing
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import docstring_parser
import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser
from torch.utils.data import DataLoader

from agnostos.action_codecs import ActionStats, XICMActionCodec
from agnostos.datamodules import (
    DynamicsBatch,
    DynamicsDataModule,
    EpisodeDataModule,
    KeyframeBatch,
    KeyframeDataModule,
    SampleDataError,
    ShardReadError,
    dynamics_pairs,
    keyframe_transitions,
    split_episodes,
)
from agnostos.datamodules.catalogue import shard_catalogue
from agnostos.datamodules.streams import ExportRank, SeededShuffle
from agnostos.datamodules.tar_stream import FieldSelection, read_samples
from agnostos.images import centre_crop_resize
from agnostos.observation_text import episode_demo_text, episode_observation_text
from agnostos.shards.convert import ConvertOptions, convert, shard_urls
from agnostos.shards.folders import discover_episodes, read_episode
from agnostos.shards.manifest import Manifest
from agnostos.shards.reading import iter_samples
from agnostos.shards.views import FolderEpisode, ShardEpisode, keyframe_actions
from agnostos.tasks import MINIBENCH_OBJECT_NAMES

QUIET = {"show_progress": False}
FAST = {"num_workers": 0, "shuffle_buffer": 1}


def _chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def synthetic_shards(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic episodes converted with one episode per shard (6 shards)."""
    out = tmp_path_factory.mktemp("synthetic_shards")
    convert(synthetic_root, out, ConvertOptions(shard_size=1), **QUIET)
    return out


@pytest.fixture(scope="module")
def sample_shards(sample_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample_shards")
    convert(sample_root, out, **QUIET)
    return out


def _all_keys(shards: Path) -> list[str]:
    return [episode.key for episode in Manifest.load(shards).episodes]


def _val_batches(module) -> list:
    module.setup("validate")
    return list(module.val_dataloader())


# -- the shard reader ------------------------------------------------------------------------


def test_tar_reader_equals_webdataset(synthetic_shards):
    urls = shard_urls(synthetic_shards)
    expected = [
        {key: value for key, value in sample.items() if key != "__local_path__"}
        for sample in iter_samples(urls)
    ]
    assert list(read_samples(urls)) == expected
    select = FieldSelection(frozenset({"json"}), ("wrist_rgb.",))
    picked = list(read_samples(urls, select))
    assert [sorted(s) for s in picked] == [
        sorted(k for k in s if k.startswith(("__", "json", "wrist_rgb."))) for s in expected
    ]
    assert all(picked[i][k] == expected[i][k] for i in range(len(picked)) for k in picked[i])
    key = expected[2]["__key__"]
    assert [s["__key__"] for s in read_samples(urls, keys=frozenset({key}))] == [key]
    piped = list(read_samples([f"pipe:cat {urls[0]}"], select))
    assert [s["json"] for s in piped] == [picked[0]["json"]]


def test_readers_fetch_only_the_members_samples_use(synthetic_shards):
    urls = shard_urls(synthetic_shards)
    xicm = DynamicsDataModule(shards=str(synthetic_shards), **FAST)
    xicm.setup("fit")
    read, _views = xicm.read_stages(xicm.split.train)
    fields = [sorted(set(s) - {"__key__", "__url__"}) for s in read({"url": u} for u in urls)]
    assert fields == [["front_rgb.0.png", "front_rgb.23.png", "json"]] * 4  # 2 of 24 frames
    every = DynamicsDataModule(shards=str(synthetic_shards), input_frame="all", **FAST)
    every.setup("fit")
    read, _views = every.read_stages(every.split.train)
    sample = next(read({"url": u} for u in urls))
    assert sorted(set(sample) - {"__key__", "__url__"}) == sorted(
        ["json", *(f"front_rgb.{i}.png" for i in range(24))]
    )
    keyframes = KeyframeDataModule(shards=str(synthetic_shards), cameras=["wrist"], **FAST)
    keyframes.setup("fit")
    read, _views = keyframes.read_stages(keyframes.split.train)
    sample = next(read({"url": u} for u in urls))
    assert {f.split(".")[0] for f in sample if not f.startswith("__")} == {
        "json", "low_dim", "wrist_rgb"
    }  # fmt: skip
    # The manifest's keyframes name the state frames: frame 0 and every keyframe but the last.
    entry = keyframes.split.train[0]
    states = sorted({0, *entry.keyframes[:-1]})
    assert sorted(f for f in sample if f.startswith("wrist_rgb.")) == sorted(
        f"wrist_rgb.{frame}.png" for frame in states
    )


def test_manifest_keyframes_give_exact_epoch_lengths(synthetic_shards, synthetic_root):
    episodes = {e.key: e for e in map(read_episode, discover_episodes(synthetic_root))}
    manifest = Manifest.load(synthetic_shards)
    assert {e.key: e.keyframes for e in manifest.episodes} == {
        key: episode.keyframes for key, episode in episodes.items()
    }
    module = KeyframeDataModule(shards=str(synthetic_shards), **FAST)
    module.setup("fit")
    transitions = sum(len(episodes[entry.key].keyframes) for entry in module.split.train)
    assert module.default_epoch_samples() == transitions
    pairs = DynamicsDataModule(
        shards=str(synthetic_shards), input_frame="keyframes", target_frame="next_keyframe", **FAST
    )
    pairs.setup("fit")
    assert pairs.default_epoch_samples() == sum(
        len(dynamics_pairs(24, episodes[e.key].keyframes, "keyframes", "next_keyframe"))
        for e in pairs.split.train
    )
    folders = KeyframeDataModule(folders=str(synthetic_root), **FAST)
    folders.setup("fit")  # folder catalogues know no keyframes: one sample per episode
    assert folders.default_epoch_samples() == len(folders.split.train)


def test_shard_views_answer_like_the_episode_api(sample_shards, sample_root):
    locations = discover_episodes(sample_root)
    for sample, location in zip(read_samples(shard_urls(sample_shards)), locations, strict=True):
        view, episode = ShardEpisode(sample), read_episode(location)
        folder = FolderEpisode(episode, str(location.path))
        for other in (view, folder):
            assert (other.key, other.task, other.variation, other.episode) == (
                episode.key, episode.task, episode.variation, episode.episode,
            )  # fmt: skip
            assert other.descriptions == episode.descriptions
            assert (other.num_frames, other.keyframes) == (episode.num_frames, episode.keyframes)
            for name in ("gripper_pose", "gripper_open", "ignore_collisions"):
                np.testing.assert_array_equal(other.low_dim(name), episode.low_dim.arrays()[name])
            assert other.png("front", "rgb", 7) == episode.png("front", "rgb", 7)
    assert [e.keyframes for e in map(read_episode, locations)] == [(70, 85, 124), (64, 77, 107)]


# -- sample definitions ------------------------------------------------------------------------


def test_dynamics_pairs_for_every_mode():
    keyframes = (3, 6, 9)
    assert dynamics_pairs(10, keyframes) == [(0, 9)]
    assert dynamics_pairs(10, keyframes, "first", "next_keyframe") == [(0, 3)]
    assert dynamics_pairs(10, keyframes, "first", "offset", 4) == [(0, 4)]
    assert dynamics_pairs(4, keyframes, "all", "last") == [(0, 3), (1, 3), (2, 3)]
    assert dynamics_pairs(10, keyframes, "keyframes", "next_keyframe") == [
        (0, 3), (3, 6), (6, 9),
    ]  # fmt: skip
    assert dynamics_pairs(10, keyframes, "keyframes", "offset", 2) == [(0, 2), (3, 5), (6, 8)]
    assert dynamics_pairs(10, keyframes, "all", "offset", 8) == [(0, 8), (1, 9)]
    with pytest.raises(ValueError, match="target_offset must be >= 1"):
        dynamics_pairs(10, keyframes, "first", "offset", 0)
    with pytest.raises(ValueError, match="input_frame must be"):
        dynamics_pairs(10, keyframes, "middle")


def test_keyframe_transitions():
    assert keyframe_transitions((5, 9, 14)) == [(0, (5,)), (5, (9,)), (9, (14,))]
    assert keyframe_transitions((5, 9, 14), "first", 2) == [(0, (5, 9)), (0, (9, 14)), (0, (14,))]


def test_centre_crop_resize_takes_the_middle_square():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:50] = 200  # the centred 40x40 square
    out = centre_crop_resize(image, 40)
    assert out.shape == (40, 40, 3) and (out == 200).all()
    small = centre_crop_resize(image, 16)
    assert small.shape == (16, 16, 3) and (small == 200).all()
    square = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    np.testing.assert_array_equal(centre_crop_resize(square, 32), square)  # no-op at size


# -- real episodes -------------------------------------------------------------------------------


def test_dynamics_samples_from_the_real_episodes(sample_shards, sample_root):
    module = DynamicsDataModule(shards=str(sample_shards), batch_size=4, **FAST)
    (batch,) = _val_batches(module)  # validation holds out the last episode: episode1
    assert isinstance(batch, DynamicsBatch) and len(batch) == 1
    assert batch.ids == ["open_drawer/all_variations/episode1@0->107"]
    episode = read_episode(discover_episodes(sample_root)[1])
    assert batch.instructions == [episode.descriptions[0]]
    assert torch.equal(batch.input_images[0], _chw(episode.rgb("front", 0)))
    assert torch.equal(batch.target_images[0], _chw(episode.rgb("front", 107)))
    inputs, targets = batch.unit_range()
    assert inputs.dtype == torch.float32 and inputs.min() >= -1 and targets.max() <= 1
    train = next(iter(module.train_dataloader()))  # resampled from the one training episode
    assert set(train.ids) == {"open_drawer/all_variations/episode0@0->124"}


def test_keyframe_samples_from_the_real_episodes(sample_shards, sample_root):
    module = KeyframeDataModule(
        shards=str(sample_shards), cameras=["front", "wrist"], batch_size=8, **FAST
    )
    (batch,) = _val_batches(module)
    episode = read_episode(discover_episodes(sample_root)[1])
    assert isinstance(batch, KeyframeBatch)
    assert batch.ids == [
        "open_drawer/all_variations/episode1@0->64",
        "open_drawer/all_variations/episode1@64->77",
        "open_drawer/all_variations/episode1@77->107",
    ]
    assert batch.images.shape == (3, 2, 3, 128, 128) and batch.cameras == ["front", "wrist"]
    assert torch.equal(batch.images[1, 1], _chw(episode.rgb("wrist", 64)))
    pose, gripper = episode.low_dim.gripper_pose, episode.low_dim.gripper_open
    np.testing.assert_allclose(batch.proprio[1].numpy(), [*pose[64], gripper[64]], rtol=1e-6)
    codec = XICMActionCodec()
    expected = codec.encode(np.concatenate([pose[77], [gripper[77], 0.0]]))
    assert batch.actions[1, 0].tolist() == expected.tolist()
    # The gripper closes at keyframe 64: the first transition's target says "closed".
    assert batch.actions[:, 0, 6].tolist() == [int(gripper[64]), int(gripper[77]),
                                               int(gripper[107])]  # fmt: skip
    decoded = codec.decode(batch.actions[:, 0].numpy())
    assert np.all(np.abs(decoded[:, :3] - batch.action_values[:, 0, :3].numpy()) <= 0.005 + 1e-6)


# -- shards and folders agree ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"input_frame": "all", "target_frame": "next_keyframe", "instruction": "random"},
        {"input_frame": "keyframes", "target_frame": "offset", "target_offset": 2,
         "camera": "wrist", "hflip": True, "image_size": 16},
    ],
)  # fmt: skip
def test_shards_and_folders_give_identical_dynamics_samples(
    synthetic_shards, synthetic_root, options
):
    keys = _all_keys(synthetic_shards)
    common = {"val_episodes": keys, "batch_size": 5, **FAST, **options}
    from_shards = _val_batches(DynamicsDataModule(shards=str(synthetic_shards), **common))
    from_folders = _val_batches(DynamicsDataModule(folders=str(synthetic_root), **common))
    assert len(from_shards) == len(from_folders) > 0
    for left, right in zip(from_shards, from_folders, strict=True):
        assert left.ids == right.ids and left.instructions == right.instructions
        assert torch.equal(left.input_images, right.input_images)
        assert torch.equal(left.target_images, right.target_images)
    ids = [i for batch in from_shards for i in batch.ids]
    assert len(ids) == len(set(ids))
    assert {i.split("@")[0] for i in ids} == set(keys)
    if options.get("hflip"):  # the seeded coin flips some pairs and not others
        episode = read_episode(discover_episodes(synthetic_root)[0], cameras=("wrist",))
        first = from_shards[0]
        frame = int(first.input_frames[0])
        plain = _chw(centre_crop_resize(episode.rgb("wrist", frame), 16))
        assert torch.equal(first.input_images[0], plain) or torch.equal(
            first.input_images[0], plain.flip(-1)
        )


def test_shards_and_folders_give_identical_keyframe_samples(synthetic_shards, synthetic_root):
    keys = _all_keys(synthetic_shards)
    common = {"val_episodes": keys, "batch_size": 4, "chunk": 2, "cameras": ["overhead"], **FAST}
    from_shards = _val_batches(KeyframeDataModule(shards=str(synthetic_shards), **common))
    from_folders = _val_batches(KeyframeDataModule(folders=str(synthetic_root), **common))
    for left, right in zip(from_shards, from_folders, strict=True):
        assert left.ids == right.ids
        for name in ("images", "proprio", "actions", "action_values", "action_mask"):
            assert torch.equal(getattr(left, name), getattr(right, name)), name
    episodes = [read_episode(location) for location in discover_episodes(synthetic_root)]
    count = sum(len(episode.keyframes) for episode in episodes)
    assert sum(len(batch) for batch in from_shards) == count
    masks = torch.cat([batch.action_mask for batch in from_shards])
    assert masks[:, 0].all() and (~masks[:, 1]).sum() == len(episodes)  # last chunk padded


def test_token_codec_statistics_from_shards_equal_folder_statistics(
    synthetic_shards, synthetic_root, tmp_path
):
    common = {"codec": "token_bins", "token_bins": 64, **FAST}
    from_shards = KeyframeDataModule(shards=str(synthetic_shards), **common)
    from_folders = KeyframeDataModule(folders=str(synthetic_root), **common)
    from_shards.setup("fit")
    from_folders.setup("fit")
    train = {entry.key for entry in from_shards.split.train}
    direct = np.concatenate([
        keyframe_actions(FolderEpisode(read_episode(location), ""))
        for location in discover_episodes(synthetic_root)
        if f"{location.task}/{location.variation_folder}/episode{location.episode}" in train
    ])  # fmt: skip
    assert from_shards.stats == from_folders.stats == ActionStats.compute(direct)
    saved = from_shards.stats.save(tmp_path / "stats.json")
    loaded = KeyframeDataModule(shards=str(synthetic_shards), action_stats=str(saved), **common)
    loaded.setup("fit")
    assert loaded.codec == from_shards.codec
    batch = next(iter(from_shards.train_dataloader()))
    assert batch.actions.shape[-1] == 9 and int(batch.actions.max()) < 64


# -- X-ICM object text -------------------------------------------------------------------------

MINIBENCH_TEXT_TASKS = ("pick_up_block", "open_drawer")
TRAIN_ALL = {**FAST, "val_episodes_per_task": 0}  # one demo per task: none held out


def _generate_minibench(out: str) -> None:
    """Record one demo per task (in a fresh process: MuJoCo's EGL and a later triton import
    must not share one, see test_observation_text)."""
    from agnostos.envs.minibench.generate import generate

    generate(MINIBENCH_TEXT_TASKS, 1, out, image_size=32, progress=False)


@pytest.fixture(scope="module")
def minibench_demos(tmp_path_factory) -> tuple[Path, Path]:
    """Real MuJoCo demos (simulator mask names) as folders and as all-camera shards."""
    root = tmp_path_factory.mktemp("minibench")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(_generate_minibench, str(root / "demos")).result(timeout=240)
    convert(root / "demos", root / "shards", **QUIET)
    return root / "demos", root / "shards"


def _stored_episodes(root: Path) -> dict:
    return {episode.key: episode for episode in map(read_episode, discover_episodes(root))}


@pytest.mark.parametrize(("source", "state_frame"), [("shards", "previous_keyframe"),
                                                     ("folders", "first")])  # fmt: skip
def test_object_text_is_the_bank_text_of_each_state_frame(minibench_demos, source, state_frame):
    """Each row's text is `episode_observation_text` of its state frame with its own
    instruction (here drawn at random), computed from the episode folder; frame-0 rows with
    the first instruction are exactly the bank's demo text of that episode."""
    folders, shards = minibench_demos
    episodes = _stored_episodes(folders)
    where = {"shards": str(shards)} if source == "shards" else {"folders": str(folders)}
    module = KeyframeDataModule(
        **where, object_text=True, val_episodes=list(episodes), instruction="random",
        state_frame=state_frame, batch_size=3, image_size=32, **FAST,
    )  # fmt: skip
    rows = 0
    for batch in _val_batches(module):
        assert batch.object_texts is not None and len(batch.object_texts) == len(batch)
        for row, text in enumerate(batch.object_texts):
            episode = episodes[batch.ids[row].split("@")[0]]
            names = MINIBENCH_OBJECT_NAMES[episode.task]
            frame, instruction = int(batch.state_frames[row]), batch.instructions[row]
            assert text == episode_observation_text(
                episode, frame, object_names=names, instruction=instruction
            )
            assert text.startswith(f"['instruction': {instruction}, {{'")
            if frame == 0 and instruction == episode.instruction:
                assert text == episode_demo_text(episode, object_names=names).observation
            rows += 1
    assert rows == sum(len(episode.keyframes) for episode in episodes.values())


def test_object_text_reads_depth_and_masks_only_at_state_frames(minibench_demos, monkeypatch):
    _folders, shards = minibench_demos
    module = KeyframeDataModule(
        shards=str(shards), object_text=True, object_text_cameras=["front", "overhead"],
        cameras=["wrist"], **TRAIN_ALL,
    )  # fmt: skip
    module.setup("fit")
    read, _views = module.read_stages(module.split.train)
    entry = module.split.train[0]
    sample = next(read({"url": entry.unit} for _ in range(1)))
    states = sorted({0, *entry.keyframes[:-1]})
    kinds = ("wrist_rgb", "front_depth", "front_mask", "overhead_depth", "overhead_mask")
    assert sorted(f for f in sample if ".png" in f) == sorted(
        f"{kind}.{frame}.png" for kind in kinds for frame in states
    )
    # A pinned batch keeps its texts (tensor pinning is faked: it needs an accelerator).
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: tensor.clone())
    batch = next(iter(module.train_dataloader()))
    pinned = batch.pin_memory()
    assert pinned.object_texts == batch.object_texts and len(batch.object_texts) == len(batch)
    assert torch.equal(pinned.images, batch.images) and pinned.ids == batch.ids


def test_object_text_off_gives_none(synthetic_shards):
    module = KeyframeDataModule(shards=str(synthetic_shards), batch_size=2, **FAST)
    module.setup("fit")
    assert next(iter(module.train_dataloader())).object_texts is None


def test_object_text_inputs_the_data_cannot_serve_fail_at_setup(minibench_demos, tmp_path):
    folders, _shards = minibench_demos
    convert(folders, tmp_path / "two", ConvertOptions(cameras=("front", "wrist")), **QUIET)
    module = KeyframeDataModule(shards=str(tmp_path / "two"), object_text=True, **TRAIN_ALL)
    with pytest.raises(ValueError, match=r"^object_text_cameras: \S+ holds no left_shoulder_"
                       r"depth, left_shoulder_mask, .*\(cameras front, wrist; "):  # fmt: skip
        module.setup("fit")
    narrowed = KeyframeDataModule(
        shards=str(tmp_path / "two"), object_text=True, object_text_cameras=["front"], **TRAIN_ALL
    )
    narrowed.setup("fit")  # the cameras the shards hold are fine
    with pytest.raises(ValueError, match=r"^cameras: \S+ holds no overhead_rgb frames"):
        KeyframeDataModule(shards=str(tmp_path / "two"), cameras=["overhead"], **TRAIN_ALL).setup()
    # Folders: a data set recorded without the overhead masks.
    copy = tmp_path / "folders"
    shutil.copytree(folders, copy)
    for task in MINIBENCH_TEXT_TASKS:
        shutil.rmtree(copy / task / "all_variations/episodes/episode0/overhead_mask")
    module = KeyframeDataModule(folders=str(copy), object_text=True, **TRAIN_ALL)
    with pytest.raises(ValueError, match=r"^object_text_cameras: \S+ holds no overhead_mask "
                       r"frames \(looked in "):  # fmt: skip
        module.setup("fit")


def test_object_text_of_data_without_mask_names_names_the_sample(sample_shards):
    module = KeyframeDataModule(
        shards=str(sample_shards), object_text=True, object_names="agnostos", **TRAIN_ALL
    )
    module.setup("fit")
    with pytest.raises(SampleDataError, match=r"sample 'open_drawer/all_variations/episode\d': "
                       r"object_text needs the mask handle names"):  # fmt: skip
        next(iter(module.train_dataloader()))


def test_object_text_needs_one_benchmark_naming_every_task(synthetic_shards, minibench_demos):
    with pytest.raises(ValueError, match="object_names: 'robocasa' is not a benchmark"):
        KeyframeDataModule(shards=str(synthetic_shards), object_names="robocasa")
    with pytest.raises(ValueError, match="object_text_cameras: unknown camera"):
        KeyframeDataModule(shards=str(synthetic_shards), object_text_cameras=["nose"])
    unnamed = KeyframeDataModule(shards=str(synthetic_shards), object_text=True, **FAST)
    with pytest.raises(ValueError, match=r"object_names: no benchmark has object-name maps "
                       r"for every task of the data \(pick_block, push_block\)"):  # fmt: skip
        unnamed.setup("fit")
    _folders, shards = minibench_demos
    wrong = KeyframeDataModule(
        shards=str(shards), object_text=True, object_names="agnostos", **TRAIN_ALL
    )
    with pytest.raises(ValueError, match=r"benchmark 'agnostos' has no object-name map for "
                       r"task\(s\) pick_up_block$"):  # fmt: skip
        wrong.setup("fit")
    # Both benchmarks have an open_drawer: that task alone cannot pick one, the argument can.
    drawer = {"shards": str(shards), "tasks": ["open_drawer"], "object_text": True, **TRAIN_ALL}
    with pytest.raises(ValueError, match=r"benchmarks agnostos, minibench all have .*; set "
                       r"object_names to agnostos or minibench"):  # fmt: skip
        KeyframeDataModule(**drawer).setup("fit")
    chosen = KeyframeDataModule(**drawer, object_names="minibench")
    chosen.setup("fit")
    assert chosen.object_name_maps == {"open_drawer": dict(MINIBENCH_OBJECT_NAMES["open_drawer"])}


# -- sources, splits --------------------------------------------------------------------------


def test_url_forms_select_shards_through_the_manifest(synthetic_shards):
    names = [shard.name for shard in Manifest.load(synthetic_shards).shards]
    manifest = str(synthetic_shards / "manifest.json")
    brace = str(synthetic_shards / "shard-{000000..000002}.tar")
    entries = shard_catalogue(brace, manifest)
    assert [Path(e.unit).name for e in entries] == names[:3]
    piped = "::".join(f"pipe:cat {synthetic_shards / name}" for name in names)
    entries = shard_catalogue(piped, manifest)
    assert [e.key for e in entries] == _all_keys(synthetic_shards)
    module = DynamicsDataModule(shards=piped, manifest=manifest, batch_size=64, **FAST)
    batches = _val_batches(module)
    assert sum(len(batch) for batch in batches) == 2  # one held-out episode per task
    with pytest.raises(ValueError, match="names no shard"):
        shard_catalogue(str(synthetic_shards / "other.tar"), manifest)
    with pytest.raises(ValueError, match=r"no shard manifest|not a converted shard folder"):
        shard_catalogue(brace)
    with pytest.raises(ValueError, match=r"no episodes for task\(s\) \['open_drawer'\]"):
        shard_catalogue(str(synthetic_shards), tasks=["open_drawer"])


def test_validation_split_holds_out_whole_episodes_per_task(synthetic_shards):
    entries = shard_catalogue(str(synthetic_shards))
    split = split_episodes(entries, 1)
    assert [e.key for e in split.val] == [
        "pick_block/all_variations/episode2", "push_block/all_variations/episode2",
    ]  # fmt: skip
    assert not {e.key for e in split.train} & {e.key for e in split.val}
    assert len(split.train) + len(split.val) == len(entries)
    drawn = [split_episodes(entries, 2, "random", seed) for seed in range(6)]
    assert drawn[0] == split_episodes(entries, 2, "random", 0)
    assert len({tuple(e.key for e in s.val) for s in drawn}) > 1
    assert all({e.task for e in s.train} == {"pick_block", "push_block"} for s in drawn)
    with pytest.raises(ValueError, match=r"task pick_block has 3 episode.*none to train on"):
        split_episodes(entries, 3)
    with pytest.raises(ValueError, match=r"\['nope/x/episode1'\] are not in the data set"):
        split_episodes(entries, explicit=["nope/x/episode1"])


# -- training and validation streams -------------------------------------------------------------


def _train_ids(module, epochs: int = 1) -> list[list[str]]:
    module.setup("fit")
    loader = module.train_dataloader()
    runs = []
    for _ in range(epochs):
        batches = list(loader)
        assert len(batches) == len(loader)
        runs.append([i for batch in batches for i in batch.ids])
    return runs


def test_training_stream_is_fixed_length_seeded_and_changes_per_epoch(synthetic_shards):
    common = {
        "shards": str(synthetic_shards), "input_frame": "all", "batch_size": 8,
        "num_workers": 2, "shuffle_buffer": 50, "shuffle_initial": 10, "image_size": 16,
    }  # fmt: skip
    module = DynamicsDataModule(**common)
    module.setup("fit")
    assert module.default_epoch_samples() == 4 * 23  # four training episodes, T - 1 pairs each
    assert len(module.train_dataloader()) == 2 * 6  # ceil(92 / 8) = 12 batches over 2 workers
    first, second = _train_ids(DynamicsDataModule(**common), epochs=2)
    again = _train_ids(DynamicsDataModule(**common))[0]
    other = _train_ids(DynamicsDataModule(**common, seed=1))[0]
    assert len(first) == len(second) == 12 * 8
    assert first == again  # same seed, same batches
    assert first != second and first != other  # new epoch / new seed, new draw
    held = {"pick_block/all_variations/episode2", "push_block/all_variations/episode2"}
    assert not {i.split("@")[0] for i in first} & held


def test_training_epochs_continue_one_stream(synthetic_shards):
    # Two epochs of 48 samples are the first 96 samples of one stream: the shuffle buffer
    # is not refilled (nor its content dropped) at an epoch boundary.
    common = {
        "shards": str(synthetic_shards), "input_frame": "all", "batch_size": 8,
        "num_workers": 2, "shuffle_buffer": 40, "shuffle_initial": 10, "image_size": 16,
    }  # fmt: skip
    first, second = _train_ids(DynamicsDataModule(**common, epoch_samples=48), epochs=2)
    (whole,) = _train_ids(DynamicsDataModule(**common, epoch_samples=96))
    assert first + second == whole


def test_simulated_ranks_draw_disjoint_shards_with_equal_batch_counts(
    synthetic_shards, monkeypatch
):
    manifest = Manifest.load(synthetic_shards)
    shard_of = {e.key: s.name for s in manifest.shards for e in s.episodes}
    shards, counts = [], []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        module = DynamicsDataModule(
            shards=str(synthetic_shards), input_frame="all", batch_size=4, num_workers=2,
            shuffle_buffer=20, epoch_samples=40, image_size=16,
        )  # fmt: skip
        (ids,) = _train_ids(module)
        counts.append(len(ids))
        shards.append({shard_of[i.split("@")[0]] for i in ids})
    assert counts == [6 * 4, 6 * 4]  # ceil(40 / (2 ranks x 4)) = 5 -> 3 per worker, 2 workers
    assert shards[0] and shards[1] and not shards[0] & shards[1]


def test_validation_covers_every_sample_once_across_simulated_ranks(synthetic_shards, monkeypatch):
    keys = _all_keys(synthetic_shards)
    expected = {f"{key}@{i}->23" for key in keys for i in range(23)}
    seen: list[str] = []
    for rank in (0, 1, 2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        module = DynamicsDataModule(
            shards=str(synthetic_shards), input_frame="all", val_episodes=keys,
            batch_size=7, num_workers=2, image_size=16,
        )  # fmt: skip
        seen += [i for batch in _val_batches(module) for i in batch.ids]
    assert len(seen) == len(expected) and set(seen) == expected


def test_too_few_shards_for_the_ranks_is_a_clear_error(synthetic_shards, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    module = DynamicsDataModule(shards=str(synthetic_shards), **FAST)
    module.setup("fit")
    with pytest.raises(ValueError, match=r"4 training shard.*across 8 ranks.*--shard-size"):
        module.train_dataloader()


def test_pipelines_pickle_for_spawned_workers(synthetic_shards):
    module = KeyframeDataModule(shards=str(synthetic_shards), codec="token_bins", **FAST)
    module.setup("fit")
    for dataset in (module.train_dataset(), module.val_dataset()):
        restored = pickle.loads(pickle.dumps(dataset))
        assert next(iter(restored)).ids == next(iter(dataset)).ids


def test_spawned_workers_learn_the_rank_from_the_main_process(synthetic_shards):
    # A spawned worker has no process group and no RANK variable of its own: without
    # ExportRank it would read every shard as rank 0 of 1.
    keys = _all_keys(synthetic_shards)
    module = DynamicsDataModule(
        shards=str(synthetic_shards), val_episodes=keys, batch_size=2, num_workers=1,
        image_size=16,
    )  # fmt: skip
    module.trainer = SimpleNamespace(global_rank=1, world_size=2, current_epoch=0)
    module.setup("validate")
    loader = module.val_dataloader()
    assert loader.worker_init_fn == ExportRank(1, 2)
    spawned = DataLoader(
        loader.dataset, batch_size=None, num_workers=1, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context="spawn",
    )  # fmt: skip
    ids = [i for batch in spawned for i in batch.ids]
    assert ids == [f"{key}@0->23" for key in keys[1::2]]


# -- errors ------------------------------------------------------------------------------------


def _member_offset(tar: bytes, name: str) -> int:
    """Byte offset of a member's data in a USTAR archive."""
    at = tar.index(name.encode()) + 512
    assert tar[at : at + 8] == b"\x89PNG\r\n\x1a\n"
    return at


@pytest.fixture
def damaged(synthetic_shards, tmp_path):
    """A private copy of the shards to damage."""
    out = tmp_path / "shards"
    out.mkdir()
    for path in synthetic_shards.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def test_corrupt_png_names_the_shard_sample_and_frame(damaged):
    shard = damaged / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    at = _member_offset(bytes(data), "pick_block/all_variations/episode0.front_rgb.0.png")
    for offset in range(at + 45, at + 120):  # inside IDAT: the zlib stream breaks
        data[offset] ^= 0xA5
    shard.write_bytes(bytes(data))
    module = DynamicsDataModule(shards=str(damaged), val_episodes_per_task=0, **FAST)
    module.setup("fit")
    with pytest.raises(SampleDataError) as caught:
        next(iter(module.train_dataset()))
    message = str(caught.value)
    assert str(shard) in message and "sample 'pick_block/all_variations/episode0'" in message
    assert "front_rgb.0.png" in message


def test_truncated_shard_names_the_shard_and_sample(damaged):
    shard = damaged / "shard-000001.tar"
    data = shard.read_bytes()
    at = _member_offset(data, "pick_block/all_variations/episode1.front_rgb.20.png")
    shard.write_bytes(data[: at + 100])
    urls = [str(shard)]
    with pytest.raises(ShardReadError, match=rf"{shard}: sample 'pick_block/all_variations/"
                       r"episode1': member .*front_rgb\.20\.png' is truncated"):  # fmt: skip
        list(read_samples(urls))
    with pytest.raises(ShardReadError, match=rf"{shard}: .*episode1"):  # skipped, still caught
        list(read_samples(urls, FieldSelection(frozenset({"json"}))))
    shard.write_bytes(data[:-1024])  # only the end-of-archive marker is missing
    with pytest.raises(ShardReadError, match=r"end-of-archive marker.*after sample 'pick_block"):
        list(read_samples(urls))


def test_corrupt_metadata_names_the_shard_and_sample(damaged):
    shard = damaged / "shard-000003.tar"
    data = shard.read_bytes()
    at = data.index(b"push_block/all_variations/episode0.json") + 512
    assert data[at : at + 1] == b"{"
    shard.write_bytes(data[:at] + b"#" + data[at + 1 :])
    module = DynamicsDataModule(
        shards=str(damaged), val_episodes=["push_block/all_variations/episode0"], **FAST
    )
    with pytest.raises(SampleDataError, match=rf"{shard}: sample 'push_block/all_variations/"
                       r"episode0': cannot read metadata"):  # fmt: skip
        _val_batches(module)


def test_missing_folder_frame_names_the_episode_folder(synthetic_root, tmp_path):
    root = tmp_path / "data"
    source = synthetic_root / "pick_block/all_variations/episodes/episode0"
    target = root / "pick_block/all_variations/episodes/episode0"
    target.parent.mkdir(parents=True)
    shutil.copytree(source, target)
    (target / "front_rgb" / "23.png").unlink()
    module = DynamicsDataModule(folders=str(root), val_episodes_per_task=0, **FAST)
    module.setup("fit")
    with pytest.raises(SampleDataError, match=rf"{target}.*front_rgb"):
        next(iter(module.train_dataset()))


# -- Lightning ---------------------------------------------------------------------------------


class _Recorder(L.LightningModule):
    """Trains one parameter on the batches and records what it saw."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_ids: list[list[str]] = []
        self.val_ids: list[str] = []

    def on_train_epoch_start(self):
        self.train_ids.append([])

    def training_step(self, batch, index):
        assert isinstance(batch, DynamicsBatch) and batch.input_images.dtype == torch.uint8
        self.train_ids[-1] += batch.ids
        inputs, targets = batch.unit_range()
        return ((inputs.mean() - targets.mean()) * self.weight - 1).pow(2)

    def validation_step(self, batch, index):
        self.val_ids += batch.ids

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_streams_fixed_epochs_and_validates(synthetic_shards):
    module = DynamicsDataModule(
        shards=str(synthetic_shards), batch_size=2, num_workers=2, epoch_samples=8,
        input_frame="all", shuffle_buffer=4, image_size=16,
    )  # fmt: skip
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=module)
    assert [len(ids) for ids in model.train_ids] == [8, 8]  # 4 batches of 2 per epoch
    # Persistent workers count epochs themselves: the second epoch draws anew.
    assert model.train_ids[0] != model.train_ids[1]
    held = ("pick_block/all_variations/episode2", "push_block/all_variations/episode2")
    expected = sorted(f"{key}@{i}->23" for key in held for i in range(23))
    assert sorted(model.val_ids) == sorted(expected * 2)  # validated after each epoch
    assert trainer.global_step == 8 and model.weight.item() != 0.0


def test_constructor_rejects_bad_arguments(synthetic_shards, synthetic_root):
    with pytest.raises(ValueError, match="exactly one data source"):
        DynamicsDataModule()
    with pytest.raises(ValueError, match="exactly one data source"):
        DynamicsDataModule(shards=str(synthetic_shards), folders=str(synthetic_root))
    with pytest.raises(ValueError, match="unknown camera 'nose'"):
        DynamicsDataModule(shards=str(synthetic_shards), camera="nose")
    with pytest.raises(ValueError, match="codec must be"):
        KeyframeDataModule(shards=str(synthetic_shards), codec="fast")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        KeyframeDataModule(shards=str(synthetic_shards), chunk=0)


def test_webdataset_shuffle_is_the_stage_used():
    # The training stream shuffles with wds.shuffle itself (seeded when iteration starts).
    from agnostos.datamodules.streams import SHUFFLE_SALT, SeededShuffle, StreamState

    stage = SeededShuffle(10, 5, StreamState(3))
    out = list(stage(range(30)))
    assert sorted(out) == list(range(30)) and out != list(range(30))
    assert out == list(SeededShuffle(10, 5, StreamState(3))(range(30)))
    assert out == list(wds.shuffle(10, 5, seed=wds.utils.make_seed(3, 0, 0, 0, SHUFFLE_SALT))(
        iter(range(30))))  # fmt: skip


def test_lightning_fit_warns_nothing_about_len_and_keeps_the_epoch_length(
    synthetic_shards, tmp_path
):
    # Lightning warns on every fit whose DataLoader wraps an IterableDataset with __len__;
    # the length now sits on the loader (EpochLoader), so the warning must be gone while
    # Lightning still knows the epoch length, workers are shut down after the fit, and the
    # checkpoint records every datamodule argument.
    module = DynamicsDataModule(
        shards=str(synthetic_shards), batch_size=2, num_workers=2, epoch_samples=8,
        input_frame="all", shuffle_buffer=4, image_size=16,
    )  # fmt: skip
    model = _Recorder()
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path, save_last=True, every_n_epochs=1, save_on_train_epoch_end=True
    )
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, callbacks=[checkpoints],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    before = set(multiprocessing.active_children())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=module)
    assert not [str(w.message) for w in caught if "__len__" in str(w.message)]
    assert set(multiprocessing.active_children()) <= before  # no idle workers left behind
    # ceil(ceil(8 / 2) / 2 workers) = 2 batches per worker: 4 per epoch, as before.
    assert trainer.num_training_batches == len(module.train_dataloader()) == 4
    assert [len(ids) for ids in model.train_ids] == [8, 8] and trainer.global_step == 8
    assert not hasattr(module.train_dataset(), "__len__")  # the dataset stays unsized
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["datamodule_hyper_parameters"] == dict(module.hparams)
    assert saved["datamodule_hyper_parameters"]["shuffle_buffer"] == 4  # a shared argument


def test_reloaded_loaders_draw_exactly_their_epochs_stream(synthetic_shards):
    # What an exact resume at an epoch boundary relies on (docs/training.md): with the
    # loader rebuilt every epoch, epoch e's batches are those of train_dataset(start_epoch=e),
    # however often Lightning calls iter() on the new loader before drawing from it.
    settings = {
        "shards": str(synthetic_shards), "batch_size": 2, "num_workers": 2,
        "epoch_samples": 8, "input_frame": "all", "shuffle_buffer": 6, "image_size": 16,
        "val_episodes_per_task": 0, "instruction": "random",
    }  # fmt: skip
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, reload_dataloaders_every_n_epochs=1,
    )  # fmt: skip
    trainer.fit(model, datamodule=DynamicsDataModule(**settings))
    expected = []
    for epoch in range(3):
        module = DynamicsDataModule(**settings)
        module.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=epoch)
        module.setup("fit")
        expected.append([i for batch in module.train_dataloader() for i in batch.ids])
    assert model.train_ids == expected
    assert expected[0] != expected[1] != expected[2]


# -- LightningCLI: shared arguments, hyperparameters, the documented YAML -------------------------


def _arguments(cls) -> dict[str, inspect.Parameter]:
    """A class's own named constructor arguments (not `**kwargs`)."""
    return {
        name: parameter
        for name, parameter in inspect.signature(cls).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    }


@pytest.fixture
def run_fit(monkeypatch, tmp_path):
    """`agnostos fit` in-process (imported here: it loads the whole trainer stack).

    It sets these variables itself when unset; setting them here restores them afterwards.
    """
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from agnostos.trainers.cli import run_fit

    return run_fit


def _help_entries(text: str) -> dict[str, str]:
    """`--data.<name>` -> its help text (whitespace collapsed), from argparse-style help."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        option = re.match(r"^  (--\S+(?: \S+)*)(?: {2,}(.*))?$", line)
        if option:
            name = re.match(r"--data\.(\w+)", option.group(1))
            current = entries.setdefault(name.group(1), []) if name else None
            if current is not None and option.group(2):
                current.append(option.group(2))
        elif current is not None and line.startswith(" " * 4):
            current.append(line.strip())
        else:
            current = None
    return {name: " ".join(" ".join(parts).split()) for name, parts in entries.items()}


def test_fit_help_shows_every_shared_argument_with_type_default_and_help(run_fit, capsys):
    # The subclasses pass the shared arguments on as **kwargs; LightningCLI must still
    # offer each as --data.<name>, with the base class's type, default and docstring help.
    assert run_fit(["fit", "--help"]) == 0
    entries = _help_entries(capsys.readouterr().out)
    docs = {
        cls: {p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__).params}
        for cls in (EpisodeDataModule, DynamicsDataModule)
    }
    shared, own = _arguments(EpisodeDataModule), _arguments(DynamicsDataModule)
    assert len(shared) == 17 and set(entries) == set(shared) | set(own)
    for cls, arguments in ((EpisodeDataModule, shared), (DynamicsDataModule, own)):
        hints = typing.get_type_hints(cls.__init__)
        for name, parameter in arguments.items():
            entry = entries[name]
            description = " ".join(docs[cls][name].split())
            assert entry.startswith(description), (name, entry)
            shown = re.search(r"\(type: (.*), default: (.*)\)$", entry)
            assert shown, (name, entry)
            default = "null" if parameter.default is None else str(parameter.default)
            assert shown.group(2) == default, (name, entry)
            hint = hints[name]
            text = hint.__name__ if isinstance(hint, type) else str(hint)
            words = set(re.findall(r"\w+", text)) - {"typing", "Literal", "None"}
            assert words and all(word in shown.group(1) for word in words), (name, entry)


@pytest.mark.parametrize(
    ("cls", "own"),
    [(DynamicsDataModule, {"hflip": True, "target_offset": 3}), (KeyframeDataModule, {"chunk": 2})],
)
def test_hyperparameters_record_the_shared_and_own_arguments(cls, own, synthetic_shards):
    # Checkpoints (datamodule_hyper_parameters) and the logged config rely on hparams
    # holding every argument with its value, the shared ones included, defaults too.
    given = {"shards": str(synthetic_shards), "shuffle_buffer": 7, "seed": 3, **own}
    module = cls(**given)
    defaults = {
        name: parameter.default
        for name, parameter in {**_arguments(EpisodeDataModule), **_arguments(cls)}.items()
    }
    assert len(defaults) == len(_arguments(EpisodeDataModule)) + len(_arguments(cls))
    assert dict(module.hparams) == {**defaults, **given}
    assert dict(cls(**module.hparams).hparams) == dict(module.hparams)  # load_from_checkpoint


def test_a_yaml_shared_argument_reaches_the_datamodule(synthetic_shards, tmp_path, run_fit, capsys):
    config = tmp_path / "data.yaml"
    config.write_text(
        f"data:\n  shards: {synthetic_shards}\n  shuffle_buffer: 7\n  shuffle_initial: 3\n"
        "  val_selection: random\n  hflip: true\n"
    )
    # `agnostos fit` accepts the keys (a shared key on top of configs/dynamics/tiny.yaml) ...
    tiny = Path(__file__).resolve().parents[1] / "configs" / "dynamics" / "tiny.yaml"
    assert run_fit(["fit", "--config", str(tiny), "--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["data"]
    assert (printed["shuffle_buffer"], printed["shuffle_initial"]) == (7, 3)
    assert (printed["val_selection"], printed["hflip"]) == ("random", True)
    assert printed["batch_size"] == 8  # still tiny.yaml's
    # ... and LightningCLI's parser builds the datamodule with them.
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(DynamicsDataModule, "data")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # < 4.49
    module = instantiate(parser.parse_path(str(config))).data
    assert isinstance(module, DynamicsDataModule) and module.hflip
    assert (module.shuffle_buffer, module.val_selection) == (7, "random")
    assert module.hparams.shuffle_buffer == 7
    module.setup("fit")
    shuffle = next(s for s in module.train_dataset().pipeline if isinstance(s, SeededShuffle))
    assert (shuffle.bufsize, shuffle.initial) == (7, 3)


def test_the_documented_datamodule_yaml_is_accepted_by_agnostos_fit(tmp_path, run_fit, capsys):
    docs = Path(__file__).resolve().parents[1] / "docs" / "datamodules.md"
    blocks = re.findall(r"^```yaml\n(.*?)^```", docs.read_text(), re.M | re.S)
    (snippet,) = [block for block in blocks if "data" in (yaml.safe_load(block) or {})]
    config = tmp_path / "snippet.yaml"
    config.write_text(snippet)
    assert run_fit(["fit", "--config", str(config), "--print_config"]) == 0, capsys.readouterr()
    printed = yaml.safe_load(capsys.readouterr().out)["data"]
    given = yaml.safe_load(snippet)["data"]
    assert given and {key: printed[key] for key in given} == given
