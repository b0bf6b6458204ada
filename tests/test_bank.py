"""The X-ICM demo bank: building from real shards with the tiny diffusers model, batch and
order independence, resumable chunks, save/load, the published pickle layout, the CLI, and
errors that name the file or key at fault."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from xicm_layout import xicm_features

from agnostos.evaluation.bank import (
    BANK_JSON,
    FEATURES_FILE,
    PARTIAL_DIR,
    BankBuildConfig,
    BankError,
    DemoBank,
    build_bank,
    extract_features,
    load_model,
    load_xicm_pickle,
    model_resolution,
)
from agnostos.evaluation.bank_cli import add_bank_commands
from agnostos.evaluation.rankers import LangVisOutRanker, RankingBank, RankingQuery
from agnostos.models.dynamics_diffusion import SamplingConfig
from agnostos.models.tiny import build_tiny_base
from agnostos.observation_text import episode_demo_text
from agnostos.seeding import derive_seed
from agnostos.shards.codecs import decode_png
from agnostos.shards.convert import ConvertOptions, convert, shard_urls
from agnostos.shards.reading import iter_episodes

FAST = SamplingConfig(num_inference_steps=2)
SYNTHETIC_NAMES = {"pick_block": {"block": "block", "diningTable_visible": "table"}}
GOLDEN_PICK0 = (
    "['instruction': pick up the red block, {'table': [51, 48, 15], 'block': "
    "[52, 41, 19]}]>[[52, 40, 41, 0, 36, 0, 1], [52, 40, 18, 0, 36, 0, 0], "
    "[52, 40, 18, 0, 36, 0, 0], [52, 40, 46, 0, 36, 0, 0], [52, 40, 46, 0, 36, 0, 0]]"
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a small shared CPU, two OpenMP threads contending with other
    jobs made these tiny-model runs up to 10x slower. Results are compared within this
    module only, so the thread count does not change what is tested."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("bank-base") / "sd")


@pytest.fixture(scope="module")
def loaded(tiny_base: Path):
    return load_model(tiny_base)


@pytest.fixture(scope="module")
def shards(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic episodes (pick_block, push_block) converted into several shards."""
    out = tmp_path_factory.mktemp("bank-shards") / "shards"
    convert(synthetic_root, out, ConvertOptions(shard_size=200_000), show_progress=False)
    return out


def _config(shards: Path | str, **changes) -> BankBuildConfig:
    fields = {
        "shards": str(shards),
        "batch_size": 2,
        "chunk_size": 4,
        "sampling": FAST,
        "resolution": 32,
        "save_images": True,
        "object_names": SYNTHETIC_NAMES,
    }
    fields.update(changes)
    return BankBuildConfig(**fields)


@pytest.fixture(scope="module")
def built(shards: Path, loaded, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted build: 6 demos in chunks of 4, batches of 2, images saved."""
    model, identity = loaded
    out = tmp_path_factory.mktemp("bank-built") / "bank"
    result = build_bank(_config(shards), model, identity, out, progress=False)
    assert result.complete and result.demos_done == 6 and result.chunks_done == 2
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _tensor_by_id(bank: DemoBank, name: str) -> dict[str, torch.Tensor]:
    return dict(zip(bank.ids, getattr(bank, name), strict=True))


def _rank_all(bank: RankingBank, queries: DemoBank, k: int):
    """Each demo of `queries` used as an X-ICM lang_vis_out query against `bank`."""
    ranker = LangVisOutRanker()
    return [
        ranker.rank(bank, RankingQuery(out.reshape(-1).numpy(), prompt_bos=bos.numpy()), k)
        for out, bos in zip(queries.output_latents, queries.prompt_bos, strict=True)
    ]


# --------------------------------------------------------------------------- building


def test_build_stores_features_metadata_text_and_images(built: Path, shards: Path, loaded):
    model, identity = loaded
    bank = DemoBank.load(built)
    episodes = {e.key: e for e in iter_episodes(shard_urls(shards))}
    assert len(bank) == 6 and list(bank.ids) == list(episodes)
    assert bank.input_latents.shape == bank.output_latents.shape == (6, 4, 16, 16)
    assert bank.prompt_bos.shape == bank.prompt_pooled.shape == (6, 32)
    assert bank.output_latents.dtype == torch.float32
    # Metadata: X-ICM's first description, a per-demo seed, where each demo came from.
    for record in bank.records:
        episode = episodes[record.id]
        assert record.instruction == episode.descriptions[0]
        assert (record.task, record.episode, record.variation) == (
            episode.task,
            episode.episode,
            episode.variation,
        )
        assert record.seed == derive_seed(episode.task, episode.episode, 0)
        assert record.source == episode.source and record.shard.endswith(".tar")
        assert Path(record.shard).parent == shards
    assert len({record.shard for record in bank.records}) > 1  # several shards were read
    assert bank.model == identity and identity.unet_sha256 and len(identity.unet_sha256) == 64
    assert bank.extraction.sampling == FAST and bank.extraction.resolution == 32
    assert bank.extraction.camera == "front" and bank.extraction.dtype == "float32"

    # Demo text: exact X-ICM text where the task has a name map, the reason where not.
    first = bank.record("pick_block/all_variations/episode0")
    assert first.demo_text.text == GOLDEN_PICK0
    for record in bank.records:
        if record.task == "pick_block":
            expected = episode_demo_text(
                episodes[record.id], object_names=SYNTHETIC_NAMES["pick_block"]
            )
            assert bank.demo_text(record.id) == expected
        else:
            assert record.demo_text is None
            assert "no object-name map for task 'push_block'" in record.demo_text_error
    with pytest.raises(BankError, match=r"push_block/all_variations/episode1.*no object-name"):
        bank.demo_text("push_block/all_variations/episode1")

    # The stored features are what the model predicts for the front frame 0 at 32 px.
    chosen = [bank.ids[1], bank.ids[4]]
    from agnostos.images import prepare_rgb

    pixels = torch.stack([prepare_rgb(episodes[i].png("front", "rgb", 0), 32) for i in chosen])
    direct = extract_features(
        model,
        pixels,
        [episodes[i].instruction for i in chosen],
        [bank.record(i).seed for i in chosen],
        FAST,
    )
    rows = [1, 4]
    torch.testing.assert_close(direct.output_latents, bank.output_latents[rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(direct.input_latents, bank.input_latents[rows], rtol=0, atol=1e-5)
    assert torch.equal(direct.prompt_bos, bank.prompt_bos[rows])
    assert torch.equal(direct.prompt_pooled, bank.prompt_pooled[rows])
    # BOS is one constant (X-ICM parity); the pooled embedding follows the prompt.
    assert bool((bank.prompt_bos == bank.prompt_bos[0]).all())
    assert (bank.prompt_pooled[0] - bank.prompt_pooled[1]).abs().max() > 1e-4

    # Images: the decoded predicted future frame, as PNG, named after the demo.
    decoded = model.decode_latents(bank.output_latents[:1])
    expected_pixels = ((decoded[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    png = decode_png((built / first.image).read_bytes())
    assert first.image == "images/00000_pick_block_all_variations_episode0.png"
    assert png.shape == (32, 32, 3)
    assert np.abs(png.astype(int) - expected_pixels.permute(1, 2, 0).numpy()).max() <= 1
    assert not (built / PARTIAL_DIR).exists()


def test_features_do_not_depend_on_batch_size_or_order(built, shards, loaded, tmp_path):
    model, identity = loaded
    reference = DemoBank.load(built)
    singles = build_bank(
        _config(shards, batch_size=1, save_images=False), model, identity, tmp_path / "b1",
        progress=False,
    ).bank  # fmt: skip
    triples = build_bank(
        _config(shards, batch_size=3, chunk_size=6, save_images=False), model, identity,
        tmp_path / "b3", progress=False,
    ).bank  # fmt: skip
    for other in (singles, triples):
        assert [r.to_json() | {"image": None} for r in other.records] == [
            r.to_json() | {"image": None} for r in reference.records
        ]
        for name in ("output_latents", "input_latents"):
            torch.testing.assert_close(
                getattr(other, name), getattr(reference, name), rtol=0, atol=1e-5
            )
        assert torch.equal(other.prompt_bos, reference.prompt_bos)
        # Same X-ICM ranking for every demo used as a query.
        assert [r.indices for r in _rank_all(other.to_ranking_bank(), other, 6)] == [
            r.indices for r in _rank_all(reference.to_ranking_bank(), reference, 6)
        ]

    # Shuffled order (reversed, in one batch) gives each demo the same features.
    episodes = {e.key: e for e in iter_episodes(shard_urls(shards))}
    order = list(reversed(reference.ids))
    from agnostos.images import prepare_rgb

    shuffled = extract_features(
        model,
        torch.stack([prepare_rgb(episodes[i].png("front", "rgb", 0), 32) for i in order]),
        [episodes[i].instruction for i in order],
        [reference.record(i).seed for i in order],
        FAST,
    )
    by_id = _tensor_by_id(reference, "output_latents")
    for row, demo_id in enumerate(order):
        torch.testing.assert_close(shuffled.output_latents[row], by_id[demo_id], rtol=0, atol=1e-5)
    # A different base seed changes the features: the seed really drives the sampler.
    reseeded = build_bank(
        _config(shards, seed=1, save_images=False, tasks=("push_block",)), model, identity,
        tmp_path / "seed1", progress=False,
    ).bank  # fmt: skip
    assert reseeded.ids == reference.ids[3:]
    assert (reseeded.output_latents - reference.output_latents[3:]).abs().max() > 1e-3


def test_resumed_build_is_byte_identical(built, shards, loaded, tmp_path):
    model, identity = loaded
    out = tmp_path / "bank"
    seen: list[tuple[int, int]] = []
    first = build_bank(
        _config(shards), model, identity, out, progress=False, max_chunks=1,
        on_chunk=lambda number, done: seen.append((number, done)),
    )  # fmt: skip
    assert not first.complete and first.bank is None and seen == [(0, 4)]
    assert first.demos_done == 4 and first.chunks_done == 1
    assert not (out / BANK_JSON).exists()
    assert (out / PARTIAL_DIR / "chunk-00000.safetensors").is_file()
    # A write killed before its rename leaves a .tmp file; the rerun discards it.
    (out / PARTIAL_DIR / "chunk-00001.safetensors.tmp").write_bytes(b"half a chunk")
    second = build_bank(_config(shards), model, identity, out, progress=False)
    assert second.complete and second.resumed_from == 4 and second.chunks_done == 2
    assert _files(out) == _files(built)  # features, bank.json and images, byte for byte
    again = build_bank(_config(shards), model, identity, out, progress=False)
    assert again.already_complete and len(again.bank) == 6
    with pytest.raises(BankError, match="already holds a bank built with other options"):
        build_bank(_config(shards, seed=5), model, identity, out, progress=False)
    # An unfinished build with other options is refused, never mixed.
    other = tmp_path / "other"
    build_bank(_config(shards), model, identity, other, progress=False, max_chunks=1)
    with pytest.raises(BankError, match=r"build\.json.*unfinished bank build with other"):
        build_bank(_config(shards, chunk_size=3), model, identity, other, progress=False)


def test_shard_urls_with_and_without_manifest_build_the_same_features(
    built, shards, loaded, tmp_path
):
    model, identity = loaded
    names = sorted(path.name for path in shards.glob("shard-*.tar"))
    pattern = f"{shards}/shard-{{{names[0][6:12]}..{names[-1][6:12]}}}.tar"
    streamed = build_bank(_config(pattern), model, identity, tmp_path / "s", progress=False)
    with_manifest = build_bank(
        _config(pattern, manifest=str(shards / "manifest.json")), model, identity,
        tmp_path / "m", progress=False,
    )  # fmt: skip
    reference = (built / FEATURES_FILE).read_bytes()
    assert (tmp_path / "s" / FEATURES_FILE).read_bytes() == reference
    assert (tmp_path / "m" / FEATURES_FILE).read_bytes() == reference
    assert streamed.bank.ids == with_manifest.bank.ids == DemoBank.load(built).ids
    # Task selection in streaming mode, and a task that is not there.
    only = build_bank(
        _config(pattern, tasks=("pick_block",)), model, identity, tmp_path / "t", progress=False
    ).bank
    assert set(only.tasks) == {"pick_block"} and len(only) == 3
    with pytest.raises(BankError, match=r"no episodes for task\(s\) \['lift_cup'\]"):
        build_bank(
            _config(pattern, tasks=("pick_block", "lift_cup")), model, identity,
            tmp_path / "u", progress=False,
        )  # fmt: skip


# --------------------------------------------------------------------------- files


def test_save_load_round_trip(built: Path, tmp_path: Path) -> None:
    bank = DemoBank.load(built)
    copy = bank.save(tmp_path / "copy")
    again = DemoBank.load(copy)
    assert again.records == bank.records
    for name, tensor in bank.tensors().items():
        assert torch.equal(again.tensors()[name], tensor), name
    assert again.model == bank.model and again.extraction == bank.extraction
    assert again.build_fingerprint == bank.build_fingerprint
    assert (copy / BANK_JSON).read_bytes() == (built / BANK_JSON).read_bytes()
    assert (copy / FEATURES_FILE).read_bytes() == (built / FEATURES_FILE).read_bytes()
    for record in bank.records:  # images travel with the bank
        assert (copy / record.image).read_bytes() == (built / record.image).read_bytes()


def _damaged(built: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "damaged"
    DemoBank.load(built).save(folder)
    meta = json.loads((folder / BANK_JSON).read_text())
    edit(folder, meta)
    (folder / BANK_JSON).write_text(json.dumps(meta))
    return folder


def test_loading_errors_name_the_file_and_key(built: Path, tmp_path: Path) -> None:
    def version(folder, meta):
        meta["version"] = 99

    with pytest.raises(BankError, match=r"damaged/bank\.json: bank format version 99"):
        DemoBank.load(_damaged(built, tmp_path / "v", version))

    def drop_tensor(folder, meta):
        tensors = load_tensors((folder / FEATURES_FILE).read_bytes())
        del tensors["prompt_pooled"]
        blob = save_tensors(tensors)
        (folder / FEATURES_FILE).write_bytes(blob)
        meta["features"]["sha256"] = hashlib.sha256(blob).hexdigest()

    with pytest.raises(BankError, match=r"features\.safetensors: missing tensor 'prompt_pooled'"):
        DemoBank.load(_damaged(built, tmp_path / "t", drop_tensor))

    def reshape(folder, meta):
        meta["features"]["tensors"]["output_latents"]["shape"] = [6, 1024]

    with pytest.raises(BankError, match=r"tensor 'output_latents' is float32 \[6, 4, 16, 16\]"):
        DemoBank.load(_damaged(built, tmp_path / "s", reshape))

    def other_features(folder, meta):
        (folder / FEATURES_FILE).write_bytes(save_tensors({"x": torch.zeros(1)}))

    with pytest.raises(BankError, match=r"features\.safetensors: SHA-256 differs"):
        DemoBank.load(_damaged(built, tmp_path / "h", other_features))

    def drop_demo_key(folder, meta):
        del meta["demos"][2]["task"]

    with pytest.raises(BankError, match=r"demos\[2\]: demo record lacks key 'task'"):
        DemoBank.load(_damaged(built, tmp_path / "d", drop_demo_key))

    def fewer_demos(folder, meta):
        meta["demos"] = meta["demos"][:5]

    with pytest.raises(BankError, match=r"output_latents has shape .* expected 5 rows"):
        DemoBank.load(_damaged(built, tmp_path / "r", fewer_demos))
    with pytest.raises(FileNotFoundError, match=r"nowhere/bank\.json: no demo bank here"):
        DemoBank.load(tmp_path / "nowhere")
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / BANK_JSON).write_text('{"format": "something-else"}')
    with pytest.raises(BankError, match="not an agnostos demo bank"):
        DemoBank.load(tmp_path / "j")


# --------------------------------------------------------------------------- X-ICM pickle


def _published_layout(rng: np.random.Generator, per_task: int = 8) -> dict:
    """A hand-built bank in the `all_diffusion_features.pkl` layout (xicm_method.md 6.2)."""
    root = "/remote-home/jiamingz/X-ICM/data/seen_tasks/train"
    return xicm_features(rng, root, ("close_jar", "open_drawer", "push_buttons"), per_task)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_imported_published_pickle_ranks_exactly_as_from_xicm(tmp_path, protocol) -> None:
    rng = np.random.default_rng(protocol)
    features = _published_layout(rng)
    features["all_output_image_feats"][3] = features["all_output_image_feats"][17]  # a tie
    path = tmp_path / "all_diffusion_features.pkl"
    path.write_bytes(pickle.dumps(features, protocol=protocol))
    bank = DemoBank.import_xicm_pkl(path)
    assert bank.origin == "xicm_pkl" and len(bank) == 24
    assert (
        bank.record("open_drawer/all_variations/episode3").xicm_path
        == features["all_demo_paths"][11]
    )
    reference = RankingBank.from_xicm(features)
    ours = bank.to_ranking_bank()
    ranker = LangVisOutRanker()
    for row in (0, 17, 23):
        query = RankingQuery(
            features["all_output_image_feats"][row] + 0.01,
            prompt_bos=features["all_prompt_feats"][0],
        )
        expected, got = ranker.rank(reference, query, 18), ranker.rank(ours, query, 18)
        assert got.indices == expected.indices and got.scores == expected.scores
        assert [features["all_demo_paths"][i] for i in got.indices] == list(expected.ids)
    # Saved as a bank folder and exported again, the pickle keeps paths and arrays.
    again = DemoBank.load(bank.save(tmp_path / "bank"))
    exported = load_xicm_pickle(again.export_xicm_pkl(tmp_path / "out.pkl"))
    assert exported["all_demo_paths"] == features["all_demo_paths"]
    for key in ("all_input_image_feats", "all_output_image_feats", "all_prompt_feats"):
        assert np.array_equal(exported[key], features[key]) and exported[key].dtype == np.float32
    rerooted = again.xicm_paths(root="data/seen_tasks/train")
    assert rerooted[0] == "data/seen_tasks/train/close_jar/all_variations/episodes/episode0"


def test_built_bank_export_import_gives_the_same_ranking(built: Path, tmp_path: Path) -> None:
    bank = DemoBank.load(built)
    target = bank.export_xicm_pkl(tmp_path / "all_diffusion_features.pkl")
    # numpy-1 global names, so X-ICM's numpy-1 environment reads it as well.
    assert b"numpy.core.multiarray" in target.read_bytes()
    raw = load_xicm_pickle(target)
    assert raw["all_demo_paths"][0] == (
        "data/seen_tasks/train/pick_block/all_variations/episodes/episode0"
    )
    assert raw["all_output_image_feats"].shape == (6, 1024)
    assert raw["all_prompt_feats"].shape == (6, 32)
    imported = DemoBank.import_xicm_pkl(target)
    assert imported.ids == bank.ids and imported.tasks == bank.tasks
    assert [r.indices for r in _rank_all(imported.to_ranking_bank(), bank, 5)] == [
        r.indices for r in _rank_all(bank.to_ranking_bank(), bank, 5)
    ]
    assert [r.indices for r in _rank_all(RankingBank.from_xicm(raw), bank, 5)] == [
        r.indices for r in _rank_all(bank.to_ranking_bank(), bank, 5)
    ]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_pickle_import_refuses_foreign_globals_and_bad_layouts(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"all_demo_paths": [_Exploit()]}))
    with pytest.raises(BankError, match=r"evil\.pkl: refused to load global 'posix\.system'"):
        DemoBank.import_xicm_pkl(bad)
    rng = np.random.default_rng(0)
    features = _published_layout(rng, per_task=2)
    del features["all_prompt_feats"]
    missing = tmp_path / "missing.pkl"
    missing.write_bytes(pickle.dumps(features))
    with pytest.raises(BankError, match=r"missing\.pkl: missing key\(s\) 'all_prompt_feats'"):
        DemoBank.import_xicm_pkl(missing)
    features = _published_layout(rng, per_task=2)
    features["all_output_image_feats"] = features["all_output_image_feats"][:5]
    short = tmp_path / "short.pkl"
    short.write_bytes(pickle.dumps(features))
    with pytest.raises(BankError, match=r"short\.pkl: key 'all_output_image_feats' has shape"):
        DemoBank.import_xicm_pkl(short)
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps(_published_layout(rng))[:100])
    with pytest.raises(BankError, match=r"trunc\.pkl: unreadable pickle"):
        DemoBank.import_xicm_pkl(tmp_path / "trunc.pkl")
    with pytest.raises(FileNotFoundError, match=r"absent\.pkl"):
        DemoBank.import_xicm_pkl(tmp_path / "absent.pkl")
    buffer = io.BytesIO()
    pickle.dump([1, 2], buffer)
    (tmp_path / "list.pkl").write_bytes(buffer.getvalue())
    with pytest.raises(BankError, match="expected a dict"):
        DemoBank.import_xicm_pkl(tmp_path / "list.pkl")


# --------------------------------------------------------------------------- CLI and inputs


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="agnostos")
    add_bank_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.handler(args)


def test_cli_build_info_export_import(shards, tiny_base, loaded, tmp_path, capsys) -> None:
    model, _ = loaded
    checkpoint = model.export_unet(tmp_path / "run", step=3)  # what training exports
    common = ["--shards", str(shards), "--steps", "2", "--resolution", "32", "--batch-size", "4"]
    common += ["--chunk-size", "2", "--tasks", "pick_block", "--no-progress", "--seed", "3"]
    out = tmp_path / "bank"
    assert _cli("bank", "build", *common, "--model", str(checkpoint), "--base", str(tiny_base),
                "--out", str(out), "--max-chunks", "1") == 0  # fmt: skip
    assert "stopped after 1 chunk(s), 2 demos; rerun" in capsys.readouterr().out
    assert _cli("bank", "build", *common, "--model", str(checkpoint), "--base", str(tiny_base),
                "--out", str(out)) == 0  # fmt: skip
    assert "3 demos in 2 chunk(s), resumed after 2 demos; demo text for 0" in (
        capsys.readouterr().out
    )
    bank = DemoBank.load(out)
    assert bank.tasks == ("pick_block",) * 3 and bank.extraction.seed == 3
    assert bank.model.unet == str((checkpoint / "unet").resolve())
    assert bank.model.base == str(tiny_base.resolve())
    assert bank.demo_text_options["suite"] == "agnostos"
    assert "no object-name map for task 'pick_block' in suite 'agnostos'" in (
        bank.records[0].demo_text_error
    )
    assert _cli("bank", "info", str(out)) == 0
    info = capsys.readouterr().out
    assert "demo bank: 3 demos, origin built" in info and "tasks (1): pick_block 3" in info
    assert "2 steps, guidance 2.5 / image 2.5, seed 3" in info
    assert "prompt_bos: one constant vector" in info and "demo text: 0/3 demos" in info

    pkl = tmp_path / "features.pkl"
    assert _cli("bank", "export-pkl", str(out), str(pkl), "--root", "/data/seen") == 0
    assert load_xicm_pickle(pkl)["all_demo_paths"][0] == (
        "/data/seen/pick_block/all_variations/episodes/episode0"
    )
    assert _cli("bank", "import-pkl", str(pkl), "--out", str(tmp_path / "imported")) == 0
    imported = DemoBank.load(tmp_path / "imported")
    assert imported.ids == bank.ids
    assert torch.equal(imported.output_latents, bank.output_latents.reshape(3, -1))
    capsys.readouterr()

    # Errors name what is wrong and exit non-zero.
    assert (
        _cli("bank", "build", *common, "--model", str(checkpoint), "--out", str(tmp_path / "x"))
        == 1
    )
    assert "checkpoint-3: a UNet checkpoint without model_index.json; pass the Stable" in (
        capsys.readouterr().err
    )
    assert _cli("bank", "build", *common, "--model", str(tmp_path / "no-model"),
                "--out", str(tmp_path / "x")) == 1  # fmt: skip
    assert "no-model: model directory does not exist" in capsys.readouterr().err
    assert _cli("bank", "info", str(tmp_path / "nothing")) == 1
    assert "nothing/bank.json: no demo bank here" in capsys.readouterr().err


def test_build_without_resolution_uses_the_model_resolution(
    shards, tiny_base, loaded, tmp_path, capsys
) -> None:
    """`agnostos bank build` without --resolution queries at the model's own size (the tiny
    model: sample_size 16 x VAE factor 2 = 32 px), and records that number: a build with
    the default and one with `--resolution 32` are the same build, resumable either way."""
    from agnostos.cli import main

    model, _ = loaded
    assert model_resolution(model) == 32 == model.unet.config.sample_size * 2
    assert BankBuildConfig(shards=str(shards)).resolution is None
    common = ["bank", "build", "--shards", str(shards), "--model", str(tiny_base)]
    common += ["--steps", "2", "--batch-size", "2", "--chunk-size", "2", "--tasks", "pick_block"]
    common += ["--no-progress"]
    default = tmp_path / "default"
    assert main([*common, "--out", str(default)]) == 0, capsys.readouterr().err
    assert "3 demos in 2 chunk(s); demo text for 0; queries at 32 px" in capsys.readouterr().out
    bank = DemoBank.load(default)
    assert bank.extraction.resolution == 32
    assert bank.input_latents.shape == bank.output_latents.shape == (3, 4, 16, 16)
    state = json.loads((default / BANK_JSON).read_text())
    assert state["extraction"]["resolution"] == 32

    # Started with the default, finished with the explicit number: one build, same bytes.
    mixed = tmp_path / "mixed"
    assert main([*common, "--out", str(mixed), "--max-chunks", "1"]) == 0
    build_json = json.loads((mixed / PARTIAL_DIR / "build.json").read_text())
    assert build_json["build"]["config"]["resolution"] == 32
    assert main([*common, "--out", str(mixed), "--resolution", "32"]) == 0
    assert "resumed after 2 demos" in capsys.readouterr().out
    assert _files(mixed) == _files(default)
    # Another explicit size is another build, refused in the finished folder.
    assert main([*common, "--out", str(default), "--resolution", "64"]) == 1
    assert "already holds a bank built with other options" in capsys.readouterr().err


def test_bad_inputs_name_the_shard_key_or_file(synthetic_root, shards, loaded, tmp_path):
    model, identity = loaded
    wrist_only = tmp_path / "wrist"
    convert(synthetic_root, wrist_only, ConvertOptions(cameras=("wrist",)), show_progress=False)
    with pytest.raises(
        BankError,
        match=r"wrist/shard-000000\.tar: sample 'pick_block/all_variations/episode0': no query "
        r"image front_rgb/0\.png",
    ):
        build_bank(_config(wrist_only), model, identity, tmp_path / "a", progress=False)
    # The same shards work with a camera they hold; demo text then lacks the other cameras.
    wrist = build_bank(
        _config(wrist_only, camera="wrist", tasks=("pick_block",)), model, identity,
        tmp_path / "b", progress=False,
    ).bank  # fmt: skip
    assert len(wrist) == 3 and "camera(s) front, left_shoulder" in wrist.records[0].demo_text_error
    with pytest.raises(BankError, match=r"sample 'push_block/all_variations/episode0'.*demo text"):
        build_bank(
            _config(shards, demo_text="required"), model, identity, tmp_path / "c",
            progress=False,
        )  # fmt: skip
    off = build_bank(
        _config(shards, demo_text="off", tasks=("push_block",), save_images=False), model,
        identity, tmp_path / "d", progress=False,
    ).bank  # fmt: skip
    assert all("disabled" in r.demo_text_error for r in off.records)
    assert all(r.image is None for r in off.records) and not (tmp_path / "d" / "images").exists()
    with pytest.raises(FileNotFoundError, match=r"missing-000\.tar"):
        build_bank(_config(tmp_path / "missing-000.tar"), model, identity, tmp_path / "e")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BankError, match="plain: not a converted shard folder"):
        build_bank(_config(tmp_path / "plain"), model, identity, tmp_path / "f")
    with pytest.raises(BankError, match="not a multiple of the VAE's downsample factor 2"):
        build_bank(_config(shards, resolution=33), model, identity, tmp_path / "g")
    with pytest.raises(ValueError, match="demo_text must be one of"):
        _config(shards, demo_text="maybe")


def test_minibench_demos_get_their_text_with_the_minibench_suite(tiny_base, tmp_path, capsys):
    """Real MuJoCo demos (mask names recorded by the simulator) through the CLI, with the
    demo text required: every demo gets X-ICM text from the minibench object-name maps."""
    from agnostos.envs.minibench.generate import generate
    from agnostos.tasks import MINIBENCH_OBJECT_NAMES

    generate(("pick_up_block", "push_button"), 1, tmp_path / "demos", image_size=32, progress=False)
    convert(tmp_path / "demos", tmp_path / "shards", show_progress=False)
    out = tmp_path / "bank"
    status = _cli(
        "bank", "build", "--shards", str(tmp_path / "shards"), "--model", str(tiny_base),
        "--out", str(out), "--steps", "2", "--resolution", "32", "--suite", "minibench",
        "--demo-text", "required", "--no-progress",
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    bank = DemoBank.load(out)
    episodes = {e.key: e for e in iter_episodes(shard_urls(tmp_path / "shards"))}
    assert set(bank.tasks) == {"pick_up_block", "push_button"}
    for record in bank.records:
        names = MINIBENCH_OBJECT_NAMES[record.task]
        assert bank.demo_text(record.id) == episode_demo_text(
            episodes[record.id], object_names=names
        )
        assert record.demo_text.observation.startswith(f"['instruction': {record.instruction}, {{'")
        assert len(record.demo_text.actions) == len(episodes[record.id].keyframes) > 0
    assert "'block': [" in bank.record("pick_up_block/all_variations/episode0").demo_text.text


def test_real_rlbench_sample_builds_without_mask_names(sample_root, loaded, tmp_path) -> None:
    """The real open_drawer sample: 128 px front frames pass through unchanged; the files
    have no mask-name maps, so the text is missing with that reason (optional mode)."""
    from agnostos.images import prepare_rgb

    model, identity = loaded
    options = ConvertOptions(cameras=("front",), modalities=("rgb",))
    convert(sample_root, tmp_path / "shards", options, show_progress=False)
    config = _config(tmp_path / "shards", resolution=128, save_images=False, object_names=None)
    bank = build_bank(config, model, identity, tmp_path / "bank", progress=False).bank
    episodes = list(iter_episodes(shard_urls(tmp_path / "shards")))
    assert bank.ids == tuple(e.key for e in episodes)
    assert bank.output_latents.shape == (2, 4, 64, 64)  # the tiny VAE downsamples by 2
    for record, episode in zip(bank.records, episodes, strict=True):
        assert record.instruction == episode.descriptions[0] and record.task == "open_drawer"
        assert record.demo_text is None and "stores no mask handle names" in record.demo_text_error
    front = episodes[0].rgb("front", 0)
    assert front.shape == (128, 128, 3)
    assert np.array_equal(
        prepare_rgb(episodes[0].png("front", "rgb", 0), 128).permute(1, 2, 0), front
    )
    direct = extract_features(
        model,
        torch.from_numpy(front.copy()).permute(2, 0, 1)[None].contiguous(),
        [episodes[0].instruction],
        [bank.records[0].seed],
        FAST,
    )
    torch.testing.assert_close(direct.output_latents[0], bank.output_latents[0], rtol=0, atol=1e-5)
