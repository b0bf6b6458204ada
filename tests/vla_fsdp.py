"""The script each rank of a two-process FSDP (or DDP) VLA fit runs (test_trainer_vla.py
starts it; Lightning's launcher starts the second rank by running it again).

Two CPU ranks (gloo) LoRA-fine-tune the tiny VLA with LoRA dropout on, a checkpoint at
every epoch end (full state dict), gradient-norm clipping (tight, so that it acts) and
`VLAExport` at the end, under `CPUFSDPStrategy`
(Lightning's FSDPStrategy on the CPU, as in test_trainer_fsdp.py) or DDP; optionally
resumed from a checkpoint. Rank 0 writes the trained weights (under FSDP as
`summon_full_params` assembles them) and each rank what its export callback wrote.

Usage: vla_fsdp.py SHARDS BACKBONE ROOT fsdp|ddp STEPS [RESUME]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_rank(shards: str, backbone: str, root: str, name: str, steps: int, resume: str) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullyShardedDataParallel
    from vla_ddp import tiny_fit_modules  # this script's folder is on sys.path

    from agnostos.trainers.vla_export import VLAExport

    class CPUFSDPStrategy(FSDPStrategy):
        """FSDPStrategy handing FSDP the CPU as its device (test_trainer_fsdp.py)."""

        def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
            return FullyShardedDataParallel(
                module=model, device_id=torch.device("cpu"),
                sharding_strategy=self.sharding_strategy, **self.kwargs,
            )  # fmt: skip

    torch.set_num_threads(1)
    _full_state_dicts_without_cpu_offload()
    fsdp = name == "fsdp"
    L.seed_everything(0, verbose=False)  # as `agnostos fit` does: one LoRA init on all ranks
    strategy = CPUFSDPStrategy(process_group_backend="gloo") if fsdp else "ddp"
    data, module = tiny_fit_modules(shards, backbone)
    export = VLAExport()
    checkpoints = ModelCheckpoint(
        dirpath=Path(root, "checkpoints"), save_top_k=-1, every_n_epochs=1,
        save_on_train_epoch_end=True,
    )  # fmt: skip
    trainer = L.Trainer(
        default_root_dir=root, max_steps=steps, accelerator="cpu", devices=2,
        strategy=strategy, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        reload_dataloaders_every_n_epochs=1, gradient_clip_val=0.05,
        callbacks=[export, checkpoints],
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=resume or None)
    summon = FullyShardedDataParallel.summon_full_params if fsdp else None
    with summon(trainer.model, writeback=False) if summon else _nothing():
        weights = {
            key: parameter.detach().clone().contiguous()
            for key, parameter in module.named_parameters()
            if parameter.requires_grad
        }
    rank = trainer.global_rank
    Path(root).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_file(weights, Path(root, "trained.safetensors"))
    record = {
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "exported": [str(path) for path in export.exported],
        "use_orig_params": getattr(trainer.strategy, "kwargs", {}).get("use_orig_params"),
    }
    Path(root, f"rank{rank}.json").write_text(json.dumps(record))


def _full_state_dicts_without_cpu_offload() -> None:
    """Lightning gathers full state dicts with FSDP's CPU offload, which segfaults when the
    parameters already live on the CPU (full_weights.py); on the CPU gather without it."""
    import lightning.fabric.strategies.fsdp as fabric_fsdp
    import lightning.pytorch.strategies.fsdp as pytorch_fsdp
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        FullyShardedDataParallel,
        StateDictType,
    )

    def context(module, world_size: int, rank0_only: bool = True):
        return FullyShardedDataParallel.state_dict_type(
            module, StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        )  # fmt: skip

    fabric_fsdp._get_full_state_dict_context = context
    pytorch_fsdp._get_full_state_dict_context = context


def _nothing():
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    args = sys.argv[1:]
    run_rank(args[0], args[1], args[2], args[3], int(args[4]), args[5] if len(args) > 5 else "")
