"""The dynamics diffusion trainer: real Lightning fits of the tiny model on synthetic shards.

Covers learning, exact resume (in-process and after a SIGKILL), checkpoint contents, EMA,
export + reload, the `agnostos fit` LightningCLI entry point and its config errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from agnostos.datamodules import DynamicsDataModule
from agnostos.images import image_grid
from agnostos.models.dynamics_diffusion import DynamicsDiffusion, SamplingConfig
from agnostos.models.tiny import build_tiny_base
from agnostos.shards.convert import ConvertOptions, convert
from agnostos.trainers import DiffusersExport, DynamicsDiffusionModule, ExponentialMovingAverage
from agnostos.trainers.cli import run_fit
from agnostos.trainers.dynamics import ConstantWithWarmup, ensure_tiny_base

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "dynamics" / "tiny.yaml"
SD2_CONFIG = REPO / "configs" / "dynamics" / "sd2_768.yaml"
BATCH = 4
FAST = SamplingConfig(num_inference_steps=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run torch single-threaded here, restoring the setting afterwards.

    The tiny model gains nothing from intra-op threads, and on a busy 2-core machine two
    OpenMP threads that wait for each other made these fits 10-15x slower (measured).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def shards(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic episodes, one per shard: 4 training and 2 validation episodes."""
    out = tmp_path_factory.mktemp("trainer_shards")
    convert(synthetic_root, out, ConvertOptions(shard_size=1), show_progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("trainer_base") / "sd")


def make_data(shards: Path, steps_per_epoch: int = 2) -> DynamicsDataModule:
    """X-ICM pairs (frame 0 -> last frame), 32 px, `steps_per_epoch` batches per epoch."""
    return DynamicsDataModule(
        shards=str(shards), image_size=32, batch_size=BATCH, num_workers=0,
        epoch_samples=BATCH * steps_per_epoch, shuffle_buffer=8, shuffle_initial=4,
    )  # fmt: skip


def make_module(base: Path, **overrides) -> DynamicsDiffusionModule:
    settings = {"learning_rate": 1e-3, "sample_count": 2, "sample_steps": 2, **overrides}
    return DynamicsDiffusionModule(base=str(base), **settings)


def make_trainer(
    root: Path, max_steps: int, export_every: int = 0, save_pipeline: bool = False
) -> L.Trainer:
    """The Trainer settings `agnostos fit` uses (checkpoint at every epoch end, reload)."""
    return L.Trainer(
        default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=1,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1,
        gradient_clip_val=1.0, log_every_n_steps=1,
        callbacks=[
            ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=1,
                            every_n_epochs=1, save_on_train_epoch_end=True),
            DiffusersExport(every_n_train_steps=export_every, save_pipeline=save_pipeline),
        ],
    )  # fmt: skip


def unet_state(module: DynamicsDiffusionModule) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.model.unet.state_dict().items()}


def assert_same_tensors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# -- learning ----------------------------------------------------------------------------------


def test_fit_lowers_the_validation_loss_and_draws_sample_grids(shards, tiny_base, tmp_path):
    module = make_module(tiny_base, learning_rate=2e-3)
    data = make_data(shards, steps_per_epoch=6)
    trainer = make_trainer(tmp_path, max_steps=18)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert trainer.global_step == 18
    assert after < 0.7 * before, (before, after)
    # Validation noise is seeded by the samples, so the loss is a deterministic function
    # of the weights: validating again gives the same number.
    again = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert again == after
    # One grid per validation, 2 samples x (input | predicted | true), 32 px + 2 px gaps.
    samples = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert samples == [f"val-step-{s:07d}.png" for s in (0, 6, 12, 18)]
    from PIL import Image

    grid = Image.open(tmp_path / "samples" / samples[-1])
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)
    # Without EMA the export holds the trained weights, and no "ema" enters checkpoints.
    export = tmp_path / "export" / "checkpoint-18"
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(export, subfolder="unet")
    assert_same_tensors(exported.state_dict(), unet_state(module))
    assert "ema" not in load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")


def test_bf16_mixed_with_checkpointing_and_ema_trains_in_fp32_master_weights(
    shards, tiny_base, tmp_path
):
    """bf16 autocast on CPU (the same Lightning plugin as on GPUs): the loss is computed in
    bf16, while the UNet's weights, the optimiser and the export stay fp32."""
    module = make_module(tiny_base, gradient_checkpointing=True, ema_decay=0.9)
    initial = unet_state(module)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=4, accelerator="cpu", devices=1,
        precision="bf16-mixed", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=1.0,
        callbacks=[DiffusersExport(every_n_train_steps=0)], enable_checkpointing=False,
    )  # fmt: skip
    dtypes = set()
    module.model.unet.conv_out.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    trainer.fit(module, datamodule=make_data(shards))
    assert trainer.global_step == 4 and dtypes == {torch.bfloat16}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    trained = unet_state(module)
    assert all(value.dtype == torch.float32 for value in trained.values())
    assert not torch.equal(trained["conv_out.weight"], initial["conv_out.weight"])
    assert next(module.model.vae.parameters()).dtype == torch.float32
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(
        tmp_path / "export" / "checkpoint-4", subfolder="unet"
    )
    assert exported.dtype == torch.float32
    with module.ema_weights():  # the export holds the EMA weights
        assert_same_tensors(exported.state_dict(), unet_state(module))


def test_image_grid_layout() -> None:
    red = torch.zeros(3, 4, 5)
    red[0] = 1.0
    grid = image_grid([[red, -torch.ones(3, 4, 5)]], padding=1)
    assert grid.shape == (6, 13, 3) and grid.dtype.name == "uint8"
    assert grid[1, 1].tolist() == [255, 128, 128] and grid[1, 7].tolist() == [0, 0, 0]
    assert grid[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="same size"):
        image_grid([[red, torch.zeros(3, 2, 2)]])


# -- resume ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed(shards, tiny_base, tmp_path_factory):
    """Uninterrupted 2N steps vs N steps + a fresh Trainer resuming from last.ckpt to 2N.

    EMA is on, so its state must survive the resume too. N = 2 = one epoch.
    """
    root = tmp_path_factory.mktemp("resume")
    steps = 2
    straight = make_module(tiny_base, ema_decay=0.9)
    straight_trainer = make_trainer(root / "straight", 2 * steps, export_every=steps)
    straight_trainer.fit(straight, datamodule=make_data(shards, steps))

    first = make_module(tiny_base, ema_decay=0.9)
    make_trainer(root / "first", steps).fit(first, datamodule=make_data(shards, steps))
    checkpoint = root / "first" / "checkpoints" / "last.ckpt"
    saved = root / "first.ckpt"
    saved.write_bytes(checkpoint.read_bytes())

    resumed = make_module(tiny_base, ema_decay=0.9)
    resumed_trainer = make_trainer(root / "resumed", 2 * steps, export_every=steps)
    resumed_trainer.fit(resumed, datamodule=make_data(shards, steps), ckpt_path=str(saved))
    return {
        "root": root,
        "steps": steps,
        "straight": straight,
        "straight_trainer": straight_trainer,
        "resumed": resumed,
        "resumed_trainer": resumed_trainer,
        "checkpoint": saved,
    }


def test_resume_continues_bit_exactly(resumed):
    steps = resumed["steps"]
    assert resumed["straight_trainer"].global_step == 2 * steps
    assert resumed["resumed_trainer"].global_step == 2 * steps
    assert resumed["resumed_trainer"].current_epoch == resumed["straight_trainer"].current_epoch
    assert load_checkpoint(resumed["checkpoint"])["global_step"] == steps
    straight, again = resumed["straight"], resumed["resumed"]
    assert_same_tensors(unet_state(straight), unet_state(again))
    assert_same_tensors(straight.ema.shadow, again.ema.shadow)
    assert straight.ema.updates == again.ema.updates == 2 * steps
    final = {
        name: load_checkpoint(resumed["root"] / name / "checkpoints" / "last.ckpt")
        for name in ("straight", "resumed")
    }
    assert final["straight"]["global_step"] == final["resumed"]["global_step"] == 2 * steps
    for left, right in zip(
        final["straight"]["optimizer_states"][0]["state"].values(),
        final["resumed"]["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert_same_tensors(left, right)


def test_checkpoints_hold_the_unet_optimiser_and_ema_only(resumed, tiny_base):
    checkpoint = load_checkpoint(resumed["checkpoint"])
    keys = list(checkpoint["state_dict"])
    assert keys and all(key.startswith("model.unet.") for key in keys)
    assert not any(key.startswith(("model.vae.", "model.text_encoder.")) for key in keys)

    def tensor_bytes(tree) -> int:
        if isinstance(tree, torch.Tensor):
            return tree.numel() * tree.element_size()
        if isinstance(tree, dict):
            return sum(tensor_bytes(value) for value in tree.values())
        if isinstance(tree, list | tuple):
            return sum(tensor_bytes(value) for value in tree)
        return 0

    unet = resumed["straight"].model.unet
    unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    frozen_bytes = sum(
        p.numel() * p.element_size()
        for part in (resumed["straight"].model.vae, resumed["straight"].model.text_encoder)
        for p in part.parameters()
    )
    # weights + AdamW's two moments + the EMA copy, and nothing of the frozen parts.
    total = tensor_bytes(checkpoint)
    assert 4 * unet_bytes <= total < 4 * unet_bytes + 4096, (total, unet_bytes, frozen_bytes)
    assert resumed["checkpoint"].stat().st_size < 4 * unet_bytes + frozen_bytes // 2
    # The model still loads strictly from it (frozen weights come from the base).
    module = make_module(tiny_base, ema_decay=0.9)
    module.load_state_dict(checkpoint["state_dict"], strict=True)


def test_ema_is_validated_exported_and_restored(resumed, tiny_base):
    module = resumed["straight"]
    ema_state = module.ema.shadow
    raw = unet_state(module)
    assert any(not torch.equal(raw[key], ema_state[key]) for key in raw)
    # Exports hold the EMA weights, and the raw weights are back after exporting.
    from diffusers import UNet2DConditionModel

    for step in (2, 4):
        folder = resumed["root"] / "straight" / "export" / f"checkpoint-{step}"
        assert (folder / "unet" / "config.json").is_file()
    exported = UNet2DConditionModel.from_pretrained(
        resumed["root"] / "straight" / "export" / "checkpoint-4", subfolder="unet"
    )
    assert_same_tensors(exported.state_dict(), ema_state)
    assert_same_tensors(unet_state(module), raw)
    # The resumed run exported the same bytes at the same step.
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        paths = [
            resumed["root"] / run / "export" / "checkpoint-4" / "unet" / name
            for run in ("straight", "resumed")
        ]
        assert paths[0].read_bytes() == paths[1].read_bytes()


def test_ema_arithmetic_and_swap() -> None:
    layer = torch.nn.Linear(2, 1)
    frozen = torch.nn.Linear(1, 1).requires_grad_(False)
    holder = torch.nn.ModuleDict({"layer": layer, "frozen": frozen})
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema = ExponentialMovingAverage(holder.named_parameters(), decay=0.5, warmup=False)
    assert set(ema.shadow) == {"layer.weight", "layer.bias"}  # frozen weights not averaged
    with torch.no_grad():
        layer.weight.fill_(3.0)
    assert ema.update(holder.named_parameters(), step=1)
    assert not ema.update(holder.named_parameters(), step=1)  # same step: accumulation
    assert torch.equal(ema.shadow["layer.weight"], torch.full((1, 2), 2.0))
    with ema.applied(holder.named_parameters()):
        assert torch.equal(layer.weight, torch.full((1, 2), 2.0))
    assert torch.equal(layer.weight, torch.full((1, 2), 3.0))
    ramp = ExponentialMovingAverage(holder.named_parameters(), decay=0.999)
    assert [ramp.decay_at(n) for n in (0, 1, 10_000)] == [0.1, 2 / 11, 0.999]
    ramp.load_state_dict(ema.state_dict())
    assert ramp.updates == 1 and ramp.last_step == 1 and ramp.decay == 0.999
    bad = ema.state_dict()
    bad["shadow"]["layer.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"layer\.weight"):
        ramp.load_state_dict(bad)
    with pytest.raises(ValueError, match="ema_decay"):
        ExponentialMovingAverage(holder.named_parameters(), decay=1.0)


# -- export ------------------------------------------------------------------------------------


def test_export_reloads_to_identical_predictions(resumed, tiny_base, tmp_path):
    module = resumed["resumed"]
    images = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    prompts = ["pick up the red block", "push the blue block forward"]
    with module.ema_weights():
        expected = module.model.predict(images, prompts, [1, 2], FAST)
    checkpoint = module.export_checkpoint(tmp_path / "export", 4, pipeline_dir=tmp_path / "pipe")
    assert checkpoint == tmp_path / "export" / "checkpoint-4"
    assert not list((tmp_path / "export").glob("*.partial"))
    reloaded = DynamicsDiffusion.from_pretrained(tiny_base, unet=checkpoint)
    got = reloaded.predict(images, prompts, [1, 2], FAST)
    assert torch.equal(got.output_latents, expected.output_latents)
    # The full pipeline directory loads on its own (no base needed) and agrees too.
    from_pipeline = DynamicsDiffusion.from_pretrained(tmp_path / "pipe")
    again = from_pipeline.predict(images, prompts, [1, 2], FAST)
    assert torch.equal(again.output_latents, expected.output_latents)
    # Exporting again replaces the pipeline atomically.
    module.export_checkpoint(tmp_path / "export", 5, pipeline_dir=tmp_path / "pipe")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pipe")) == ["pipe"]


def test_exports_declare_the_resolution_trained_at(resumed, tiny_base, tmp_path):
    """A UNet fine-tuned at another size than its base declares must say so, or a bank
    built from it would query at the base's size (SD2 768-v: 768 px for a 128 px model)."""
    from agnostos.evaluation.bank import model_resolution

    module = resumed["resumed"]
    live = module.model.unet.config.sample_size  # the tiny base: 16 latents = 32 px
    checkpoint = module.export_checkpoint(
        tmp_path / "export", 4, pipeline_dir=tmp_path / "pipe", resolution=64
    )
    assert module.model.unet.config.sample_size == live  # the live model is unchanged
    assert json.loads((checkpoint / "unet" / "config.json").read_text())["sample_size"] == 32
    assert model_resolution(DynamicsDiffusion.from_pretrained(tiny_base, unet=checkpoint)) == 64
    assert model_resolution(DynamicsDiffusion.from_pretrained(tmp_path / "pipe")) == 64
    with pytest.raises(ValueError, match="resolution 63 is not a positive multiple"):
        module.export_checkpoint(tmp_path / "export", 5, resolution=63)


# -- the module's own checks ----------------------------------------------------------------------


def test_optimiser_matches_the_recipe_and_checkpointing_changes_nothing(tiny_base):
    module = DynamicsDiffusionModule(base=str(tiny_base), warmup_steps=4)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 1e-2)
    assert len(group["params"]) == len(list(module.model.unet.parameters()))
    assert config["lr_scheduler"]["interval"] == "step"
    assert [ConstantWithWarmup(4)(s) for s in (0, 2, 4, 100)] == [0.0, 0.5, 1.0, 1.0]
    assert ConstantWithWarmup(0)(0) == 1.0
    assert module.hparams.learning_rate == 5e-5
    assert module.hparams.conditioning_dropout_prob == 0.05 and module.ema is None

    images = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    losses, grads = [], []
    for checkpointing in (False, True):
        candidate = DynamicsDiffusionModule(
            base=str(tiny_base), gradient_checkpointing=checkpointing
        )
        assert candidate.model.unet.is_gradient_checkpointing == checkpointing
        candidate.train()
        loss = candidate.model.training_loss(images, images.flip(0), ["a", "b"], 7).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(candidate.model.unet.conv_in.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("argument", "value", "pattern"),
    [
        ("learning_rate", 0.0, "learning_rate must be > 0"),
        ("ema_decay", 1.0, r"ema_decay must lie in \[0, 1\)"),
        ("conditioning_dropout_prob", 0.5, "conditioning_dropout_prob"),
        ("adam_betas", (0.9, 1.5), "adam_betas"),
        ("sample_steps", 0, "sample_steps"),
    ],
)
def test_bad_arguments_name_the_argument(argument, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        DynamicsDiffusionModule(base="tiny", **{argument: value})


def test_base_and_unet_paths_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^base: .*nowhere.*does not exist"):
        DynamicsDiffusionModule(base=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"^unet: .*no UNet found"):
        DynamicsDiffusionModule(base="tiny", unet=str(tmp_path))
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a tiny base"):
        ensure_tiny_base(tmp_path / "occupied")


# -- the CLI -----------------------------------------------------------------------------------


def cli_args(shards: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--config", str(TINY_CONFIG), "--data.shards", str(shards),
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--data.batch_size={BATCH}",
        f"--data.epoch_samples={2 * BATCH}", "--model.sample_steps=2", *extra,
    ]  # fmt: skip


def test_fit_exports_declare_the_image_size_trained_at(shards, tmp_path):
    """The tiny base declares 32 px; trained at 64 px, its export says 64 (32 latents)."""
    root = tmp_path / "run"
    args = cli_args(
        shards, root, "--trainer.max_steps=1", "--trainer.logger=false",
        "--trainer.limit_val_batches=0", "--data.image_size=64",
    )  # fmt: skip
    assert run_fit(args) == 0
    config = root / "export" / "checkpoint-1" / "unet" / "config.json"
    assert json.loads(config.read_text())["sample_size"] == 32
    assert (
        json.loads((root / "tiny-base" / "unet" / "config.json").read_text())["sample_size"] == 16
    )


def test_run_fit_with_the_tiny_config_trains_logs_exports_and_resumes(shards, tmp_path):
    root = tmp_path / "run"
    args = cli_args(shards, root, "--trainer.max_steps=4", "--export.every_n_train_steps=2")
    assert run_fit(args) == 0
    assert (root / "config.yaml").is_file() and (root / "tiny-base" / "model_index.json").is_file()
    assert load_checkpoint(root / "checkpoints" / "last.ckpt")["global_step"] == 4
    exports = sorted(p.name for p in (root / "export").iterdir())
    assert exports == ["checkpoint-2", "checkpoint-4"]
    assert (
        root / "export" / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors"
    ).is_file()
    assert sorted(p.name for p in (root / "samples").iterdir()) == [
        "val-step-0000002.png",
        "val-step-0000004.png",
    ]
    media = list((root / "wandb").glob("offline-run-*/files/media/images/val/samples_*.png"))
    assert len(media) == 2  # the same grids, in the offline W&B run

    # `--ckpt_path last` resumes from <root>/checkpoints/last.ckpt at step 4.
    assert run_fit([*args, "--ckpt_path", "last", "--trainer.max_steps=6"]) == 0
    assert load_checkpoint(root / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert (root / "export" / "checkpoint-6").is_dir()
    # `validate` runs through the same entry point.
    assert run_fit(["validate", *args, "--ckpt_path", "last"]) == 0


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--model.learning_rate=-1"], ["learning_rate"]),
        (["--model.learning_rate=fast"], ["model.learning_rate"]),
        (["--model.ema_decay=1.5"], ["ema_decay"]),
        (["--model.base=/no/such/sd2"], ["base", "/no/such/sd2"]),
        (["--data.camera=nose"], ["camera", "nose"]),
        (["--export.every_n_train_steps=-5"], ["every_n_train_steps"]),
        (["--model.no_such_key=1"], ["no_such_key"]),
    ],
)
def test_bad_config_values_name_the_key(shards, tmp_path, capsys, extra, names):
    assert run_fit(cli_args(shards, tmp_path / "run", "--trainer.max_steps=1", *extra)) == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, err


def test_the_sd2_config_parses_to_the_published_recipe(tmp_path, capsys):
    """The SD2 config needs a local SD2 directory and shards: without them it stops with a
    message naming the missing key; `--print_config` shows the recipe's values."""
    assert run_fit(["--config", str(SD2_CONFIG)]) == 2
    assert "base" in capsys.readouterr().err
    code = run_fit(["--config", str(SD2_CONFIG), "--model.base", str(tmp_path), "--print_config"])
    assert code == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    model, data, trainer = printed["model"], printed["data"], printed["trainer"]
    assert (model["learning_rate"], model["weight_decay"], model["warmup_steps"]) == (
        5e-5,
        1e-2,
        0,
    )
    assert model["adam_betas"] == [0.9, 0.999] and model["conditioning_dropout_prob"] == 0.05
    assert model["ema_decay"] is None and model["gradient_checkpointing"] is True
    assert (data["batch_size"], data["image_size"], data["camera"]) == (16, 128, "front")
    assert (data["input_frame"], data["target_frame"], data["instruction"]) == (
        "first",
        "last",
        "first",
    )
    assert data["hflip"] is False
    assert (trainer["max_steps"], trainer["gradient_clip_val"]) == (20000, 1.0)
    assert trainer["precision"] in ("bf16-mixed", "16-mixed")
    assert printed["export"]["every_n_train_steps"] == 1000


def test_a_killed_run_resumes_from_its_last_checkpoint(shards, tmp_path):
    """SIGKILL a real `agnostos fit` process after its first checkpoint, resume it in a new
    process, and compare with an uninterrupted in-process run of the same config."""
    killed = tmp_path / "killed"
    base_args = cli_args(shards, killed, "--trainer.logger=false", "--export.every_n_train_steps=0")
    command = [sys.executable, "-m", "agnostos.trainers.cli"]
    env = {**os.environ, "PYTHONHASHSEED": "random", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, "fit", *base_args, "--trainer.max_steps=1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    try:
        while not last.exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    step = load_checkpoint(last)["global_step"]
    assert step >= 2 and step % 2 == 0  # checkpoints fall on epoch ends (2 steps each)

    final = step + 2
    resumed = subprocess.run(
        [*command, "fit", *base_args, "--ckpt_path", "last", f"--trainer.max_steps={final}"],
        capture_output=True, env=env, timeout=180,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert load_checkpoint(last)["global_step"] == final

    reference = tmp_path / "reference"
    ref_args = cli_args(
        shards, reference, "--trainer.logger=false", "--export.every_n_train_steps=0"
    )
    assert run_fit([*ref_args, f"--trainer.max_steps={final}"]) == 0
    weights = "unet/diffusion_pytorch_model.safetensors"
    got = (killed / "export" / f"checkpoint-{final}" / weights).read_bytes()
    expected = (reference / "export" / f"checkpoint-{final}" / weights).read_bytes()
    assert got == expected
