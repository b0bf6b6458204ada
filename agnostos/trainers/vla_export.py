"""Training callback: export of a fine-tuned VLA (adapter, processor, codec, model card).

Lightning checkpoints are for resuming (trainable weights and optimiser, read only by this
code). The export is for everyone else: `<dirpath>/step-<N>/` holds the peft adapter
(`save_pretrained`), the processor, the action codec with its statistics and a model card,
which the VLA agent (`agnostos eval ... agent: vla`) and `agnostos vla merge` read.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from agnostos.trainers.callbacks import EXPORT_DIR, PeriodicExport
from agnostos.trainers.full_weights import full_state_dict, shards_parameters

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

    Only global rank 0 writes (DDP replicates the adapter on every rank; under FSDP every
    rank first joins the gather of the trainable weights from the shards); the others wait
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

    def export_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        weights = None
        if shards_parameters(trainer.strategy):  # every rank takes part in the gather
            weights = _trainable_weights(trainer, pl_module)
        if trainer.is_global_zero:
            out = self.output_dir(trainer) / f"{STEP_PREFIX}{step}"
            path = pl_module.export(out, **({} if weights is None else {"weights": weights}))
            self.exported.append(path)
        trainer.strategy.barrier("vla-export")


def _trainable_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The trainable weights under `policy.model.`, gathered from FSDP shards (a collective;
    rank 0 receives them, on the CPU), keyed as in `policy.model.state_dict()`."""
    prefix = "policy.model."
    trainable = pl_module.trainable_names()
    state = full_state_dict(trainer.strategy.model, prefix)
    if not pl_module.policy.is_lora:  # full fine-tuning: the whole backbone
        return state
    return {key: value for key, value in state.items() if prefix + key in trainable}
