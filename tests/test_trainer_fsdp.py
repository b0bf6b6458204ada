"""Two-process FSDP on CPU: the dynamics trainer under Lightning's FSDPStrategy (gloo).

The test runs this file as a script, as test_datamodules_ddp does: Lightning's launcher
starts the second rank by re-running it. Lightning only offers FSDP with CUDA, so the runs
use `CPUFSDPStrategy`, which differs from `FSDPStrategy` only in handing FSDP the CPU as
its device; the wrapping, the sharded checkpoints, the resume and the weight gathering for
the export are Lightning's and PyTorch's own code paths.

What is checked: the UNet exported from FSDP shards equals the one a DDP run of the same
steps exports (the gather returns the trained weights, not a shard); sharded checkpoints
hold the UNet and never the frozen VAE or text encoder; a run resumed from a sharded
checkpoint continues at the same step and ends where the DDP run does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.fsdp import FullyShardedDataParallel

from agnostos.datamodules import DynamicsDataModule
from agnostos.models.tiny import build_tiny_base
from agnostos.shards.convert import ConvertOptions, convert
from agnostos.shards.synthetic import write_synthetic_dataset
from agnostos.trainers.callbacks import DiffusersExport
from agnostos.trainers.dynamics import DynamicsDiffusionModule

BATCH = 2
STEPS_PER_EPOCH = 2


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU processes (gloo), for tests.

    Lightning checks for the exact FSDPStrategy class before refusing FSDP without CUDA,
    and passes FSDP the CUDA device index; this subclass passes the CPU device instead.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return FullyShardedDataParallel(
            module=model,
            device_id=torch.device("cpu"),
            sharding_strategy=self.sharding_strategy,
            **self.kwargs,
        )


def run(strategy_name: str, shards: str, base: str, root: str, steps: int, resume: str) -> None:
    """What each rank runs (rank 1 is started by Lightning re-running this script)."""
    torch.set_num_threads(1)
    if strategy_name == "fsdp":
        strategy = CPUFSDPStrategy(state_dict_type="sharded", process_group_backend="gloo")
    else:
        strategy = "ddp"
    data = DynamicsDataModule(
        shards=shards, image_size=32, batch_size=BATCH, num_workers=0,
        epoch_samples=2 * BATCH * STEPS_PER_EPOCH, shuffle_buffer=8, shuffle_initial=4,
    )  # fmt: skip
    module = DynamicsDiffusionModule(
        base=base, learning_rate=1e-3, sample_count=2, sample_steps=2, seed=3
    )
    trainer = L.Trainer(
        default_root_dir=root, max_steps=steps, accelerator="cpu", devices=2,
        strategy=strategy, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1, gradient_clip_val=1.0,
        callbacks=[
            ModelCheckpoint(dirpath=Path(root, "checkpoints"), save_top_k=-1,
                            every_n_epochs=1, save_on_train_epoch_end=True),
            DiffusersExport(every_n_train_steps=2 * STEPS_PER_EPOCH),
        ],
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=resume or None)
    if strategy_name == "fsdp":  # the trained weights as FSDP itself assembles them
        with FullyShardedDataParallel.summon_full_params(trainer.model, writeback=False):
            weights = {k: v.clone() for k, v in module.model.unet.state_dict().items()}
        if trainer.is_global_zero:
            save_file(weights, Path(root, "summoned_unet.safetensors"))
    Path(root, f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"global_step": trainer.global_step})
    )


def _launch(strategy: str, shards: Path, base: Path, root: Path, steps: int, resume: str = ""):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, __file__, strategy, str(shards), str(base), str(root),
               str(steps), resume]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return [json.loads((root / f"rank{rank}.json").read_text())["global_step"] for rank in (0, 1)]


def _exported_unet(root: Path, step: int) -> dict[str, torch.Tensor]:
    unet = root / "export" / f"checkpoint-{step}" / "unet"
    return load_file(unet / "diffusion_pytorch_model.safetensors")


def _assert_equal(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def _update(weights: dict, initial: dict) -> torch.Tensor:
    return torch.cat([(weights[key] - initial[key]).flatten() for key in sorted(initial)])


@pytest.mark.slow
def test_fsdp_exports_gathered_weights_and_resumes_from_sharded_checkpoints(tmp_path):
    source, shards = tmp_path / "episodes", tmp_path / "shards"
    write_synthetic_dataset(source, episodes_per_task=3)
    convert(source, shards, ConvertOptions(shard_size=1), show_progress=False)
    base = build_tiny_base(tmp_path / "base")
    middle, last = 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH
    fsdp, ddp, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resumed"

    assert _launch("fsdp", shards, base, fsdp, last) == [last, last]
    # The export holds the full trained weights, exactly as FSDP assembles them.
    _assert_equal(_exported_unet(fsdp, last), load_file(fsdp / "summoned_unet.safetensors"))
    grids = sorted(path.name for path in (fsdp / "samples").glob("*.png"))
    assert grids == [f"val-step-{step:07d}.png" for step in (2, 4, 6)]  # drawn under FSDP

    # Sharded checkpoints: the UNet and its optimiser state, never the frozen parts.
    checkpoint = fsdp / "checkpoints" / f"epoch=1-step={middle}.ckpt"
    assert checkpoint.is_dir()
    keys = list(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    assert any(".unet." in key for key in keys), keys[:5]
    assert not [key for key in keys if ".vae." in key or ".text_encoder." in key]

    # Resumed from the middle checkpoint, a run ends bit-exactly where the whole run did.
    assert _launch("fsdp", shards, base, resumed, last, str(checkpoint)) == [last, last]
    _assert_equal(_exported_unet(resumed, last), _exported_unet(fsdp, last))

    # The same steps under DDP: the same training, up to float reduction order.
    assert _launch("ddp", shards, base, ddp, last) == [last, last]
    initial = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    del initial["conv_in.weight"]  # widened to 8 input channels: not comparable to the base
    for step in (middle, last):
        fsdp_update = _update(_exported_unet(fsdp, step), initial)
        ddp_update = _update(_exported_unet(ddp, step), initial)
        cosine = torch.nn.functional.cosine_similarity(fsdp_update, ddp_update, dim=0)
        assert fsdp_update.abs().max() > 0 and cosine > 0.99, (step, cosine)


def test_ema_is_refused_under_fsdp_and_frozen_parts_stay_out_of_it(tmp_path):
    base = build_tiny_base(tmp_path / "base")
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=CPUFSDPStrategy(), logger=False)
    module = DynamicsDiffusionModule(base=str(base), ema_decay=0.99)
    module.trainer = trainer
    with pytest.raises(ValueError, match="ema_decay is not supported with FSDP"):
        module.setup("fit")
    plain = DynamicsDiffusionModule(base=str(base))
    plain.trainer = trainer
    plain.setup("fit")
    ignored = trainer.strategy.kwargs["ignored_modules"]
    assert [id(m) for m in ignored] == [id(plain.model.vae), id(plain.model.text_encoder)]
    plain.setup("validate")  # a second setup does not add them twice
    assert len(trainer.strategy.kwargs["ignored_modules"]) == 2


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
