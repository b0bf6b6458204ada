"""Training callbacks: export of the dynamics UNet in the layout X-ICM loads.

Lightning checkpoints (`.ckpt`) are for resuming; they hold optimiser state and are read
only by this code. The export is for everyone else: `<dirpath>/checkpoint-<step>/unet/`
is a plain diffusers folder that X-ICM's loader reads with
`UNet2DConditionModel.from_pretrained(path, subfolder="unet")`, next to `scheduler/` so the
prediction type travels with the weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import lightning as L
import torch

from agnostos.trainers.full_weights import full_state_dict, shards_parameters

__all__ = ["DiffusersExport", "PeriodicExport"]

EXPORT_DIR = "export"
PIPELINE_DIR = "pipeline"


class PeriodicExport(L.Callback, ABC):
    """Export every `every_n_train_steps` optimiser steps and when training ends.

    Subclasses write the export (`export_step`); this class decides when, once per step.
    `dirpath` defaults to `<trainer.default_root_dir>/export`; `every_n_train_steps` 0
    exports only at the end (with `export_on_train_end`).
    """

    def __init__(
        self, dirpath: str | None, every_n_train_steps: int, export_on_train_end: bool
    ) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.export_on_train_end = export_on_train_end
        self.exported: list[Path] = []
        self._last_step = -1

    def output_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.default_root_dir) / EXPORT_DIR

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        every = self.every_n_train_steps
        if every > 0 and step > 0 and step % every == 0 and step != self._last_step:
            self._last_step = step
            self.export_step(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.export_on_train_end and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.export_step(trainer, pl_module, trainer.global_step)

    @abstractmethod
    def export_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Write the export of `step` (every rank calls it; subclasses decide who writes)."""


class DiffusersExport(PeriodicExport):
    """Export the UNet every `every_n_train_steps` optimiser steps and when training ends.

    Args:
        dirpath: output folder; default `<trainer.default_root_dir>/export`.
        every_n_train_steps: export period in global steps (0: only at the end).
        save_pipeline: at the end of training also write a full
            `StableDiffusionInstructPix2PixPipeline` to `<dirpath>/pipeline/` (the
            published training script's final output).
        export_on_train_end: export the final step when training stops (max_steps
            reached, or a graceful stop).

    Only global rank 0 writes. Under a strategy that shards parameters (FSDP) every rank
    first takes part in gathering the full UNet weights, which rank 0 then exports. Each
    export goes to a temporary folder that is flushed and renamed, so a run killed
    mid-export leaves the previous exports intact and no half-written `checkpoint-<step>`.
    With EMA on, the EMA weights are exported.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 1000,
        save_pipeline: bool = False,
        export_on_train_end: bool = True,
    ) -> None:
        super().__init__(dirpath, every_n_train_steps, export_on_train_end)
        self.save_pipeline = save_pipeline

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "export_checkpoint", None)):
            raise TypeError(
                f"DiffusersExport needs a module with export_checkpoint(); "
                f"{type(pl_module).__name__} has none"
            )

    def export_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self.export(trainer, pl_module, step, pipeline=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.save_pipeline or (self.export_on_train_end and step != self._last_step):
            self.export(trainer, pl_module, step, pipeline=self.save_pipeline)

    def export(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, pipeline: bool
    ) -> None:
        self._last_step = step
        unet_weights = None
        if shards_parameters(trainer.strategy):  # every rank takes part in the gather
            prefix = _module_name(pl_module, pl_module.model.unet) + "."
            unet_weights = full_state_dict(trainer.strategy.model, prefix)
        if trainer.is_global_zero:
            out = self.output_dir(trainer)
            pipeline_dir = out / PIPELINE_DIR if pipeline else None
            # the datamodule's image size is what the UNet was trained at
            resolution = getattr(trainer.datamodule, "image_size", None)
            path = pl_module.export_checkpoint(
                out, step, pipeline_dir=pipeline_dir, unet_weights=unet_weights,
                resolution=resolution,
            )  # fmt: skip
            self.exported.append(path)
        trainer.strategy.barrier("dynamics-export")


def _module_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """The qualified name of `module` inside `root` (as state-dict keys spell it)."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")
