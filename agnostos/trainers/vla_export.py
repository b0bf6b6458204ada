"""Training callback: export of a fine-tuned VLA (adapter, processor, codec, model card).

Lightning checkpoints are for resuming (trainable weights and optimiser, read only by this
code). The export is for everyone else: `<dirpath>/step-<N>/` holds the peft adapter
(`save_pretrained`), the processor, the action codec with its statistics and a model card,
which the VLA agent (`agnostos eval ... agent: vla`) and `agnostos vla merge` read.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

from agnostos.trainers.callbacks import EXPORT_DIR, PeriodicExport

__all__ = ["EXPORT_DIR", "VLAExport", "latest_export"]

STEP_PREFIX = "step-"


def latest_export(directory: str | Path) -> Path | None:
    """The export folder with the highest step under `directory`, or None."""
    folders = [
        path
        for path in Path(directory).glob(f"{STEP_PREFIX}*")
        if path.is_dir() and path.name[len(STEP_PREFIX) :].isdigit()
    ]
    return max(folders, key=lambda path: int(path.name[len(STEP_PREFIX) :]), default=None)


class VLAExport(PeriodicExport):
    """Export the policy every `every_n_train_steps` optimiser steps and when training ends.

    Args:
        dirpath: output folder; default `<trainer.default_root_dir>/export`.
        every_n_train_steps: export period in global steps (0: only at the end).
        export_on_train_end: export the final step when training stops.

    Only global rank 0 writes (DDP replicates the adapter on every rank); the others wait
    at a barrier, so no rank runs ahead of an export. Each export is written to a temporary
    folder and renamed into place by `VLAPolicy.save_export`, so a run killed mid-export
    leaves the earlier exports intact.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 0,
        export_on_train_end: bool = True,
    ) -> None:
        super().__init__(dirpath, every_n_train_steps, export_on_train_end)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "export", None)):
            raise TypeError(
                f"VLAExport needs a module with export(); {type(pl_module).__name__} has none"
            )
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "VLAExport: FSDP shards the adapter across ranks and gathering it is not "
                "implemented; LoRA adapters fit on every GPU, so train with strategy: ddp"
            )

    def export_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if trainer.is_global_zero:
            path = pl_module.export(self.output_dir(trainer) / f"{STEP_PREFIX}{step}")
            self.exported.append(path)
        trainer.strategy.barrier("vla-export")
