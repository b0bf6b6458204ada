"""The script each rank of a two-process DDP VLA fit runs (test_trainer_vla.py starts it;
Lightning's DDP launcher starts the second rank by running it again).

Two CPU ranks (gloo) LoRA-fine-tune the tiny VLA for 3 steps with LoRA dropout on (each
rank draws its own masks) and `VLAExport` at the end; each rank writes its trainable
weights and what its export callback wrote, for the test to compare.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS = 3


def run_rank(shards: str, backbone: str, root: str) -> None:
    import lightning as L
    import torch
    from safetensors.torch import save_file

    from agnostos.trainers.vla_export import VLAExport

    torch.set_num_threads(1)
    data, module = tiny_fit_modules(shards, backbone)
    export = VLAExport()
    trainer = L.Trainer(
        default_root_dir=root, max_steps=STEPS, accelerator="cpu", devices=2,
        strategy="ddp", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        reload_dataloaders_every_n_epochs=1, callbacks=[export],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    weights = {
        name: parameter.detach().contiguous()
        for name, parameter in module.named_parameters()
        if parameter.requires_grad
    }
    save_file(weights, Path(root, f"rank{rank}.safetensors"))
    record = {
        "rank": rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "exported": [str(path) for path in export.exported],
    }
    Path(root, f"rank{rank}.json").write_text(json.dumps(record))


def tiny_fit_modules(shards: str, backbone: str):
    """The datamodule and VLA module every multi-process test rank trains (shared with
    vla_fsdp.py, so the DDP and FSDP runs compare the same fit)."""
    from agnostos.datamodules.keyframes import KeyframeDataModule
    from agnostos.trainers.vla import VLAModule

    data = KeyframeDataModule(
        shards=shards, cameras=["front", "wrist"], image_size=32, batch_size=4,
        num_workers=0, val_episodes_per_task=0, shuffle_buffer=8, shuffle_initial=4,
    )  # fmt: skip
    module = VLAModule(
        backbone=backbone, image_size=32, lora_r=8, lora_alpha=16, lora_dropout=0.1,
        learning_rate=3e-3,
    )  # fmt: skip
    return data, module


if __name__ == "__main__":
    run_rank(sys.argv[1], sys.argv[2], sys.argv[3])
