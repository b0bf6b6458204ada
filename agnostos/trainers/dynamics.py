"""The Lightning module that trains X-ICM's dynamics diffusion model.

It wraps `DynamicsDiffusion` (the published InstructPix2Pix recipe, see
`agnostos/models/dynamics_diffusion.py`) and adds what a training run needs:

* AdamW over the UNet only, at a constant learning rate with an optional linear warmup
  (the published recipe: 5e-5, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2, no
  warmup). Precision, gradient clipping and DDP/FSDP come from the Trainer config.
* Reproducible noise: every random draw of a training step (VAE sample, noise, timesteps,
  conditioning dropout) comes from a CPU generator seeded from (seed, rank, global step,
  batch index), never from the global RNG. A run resumed from a checkpoint therefore
  replays exactly the noise the uninterrupted run would have drawn.
* Frozen weights never enter checkpoints: `DynamicsDiffusion` leaves its VAE and text
  encoder out of `state_dict()`, so a checkpoint holds the UNet, the optimiser state and
  (when on) the EMA weights. On load they come from the base model again.
* Optional EMA of the UNet weights (`ema_decay`), used for validation and export, saved
  in checkpoints under the key "ema" and restored on resume.
* Validation: the training loss on the validation pairs with noise seeded by the
  samples' ids (comparable across steps and runs), and a grid of a few fixed validation
  samples, one row each: input | predicted future | true future. The grid is saved as
  `<default_root_dir>/samples/val-step-<step>.png` and sent to a W&B logger if present.

`base: tiny` builds the deterministic tiny base model (`agnostos.models.tiny`) so a run
needs no weights on disk; see `load_dynamics_model`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from agnostos.atomic import atomic_write_bytes, fsync_directory, fsync_tree, replace_directory
from agnostos.datamodules.dynamics import DynamicsBatch
from agnostos.images import image_grid
from agnostos.models.dynamics_diffusion import (
    DynamicsDiffusion,
    SamplingConfig,
    resolve_unet_dir,
)
from agnostos.models.tiny import TinySpec, build_tiny_base
from agnostos.seeding import derive_seed
from agnostos.shards.codecs import encode_png
from agnostos.trainers.ema import ExponentialMovingAverage

__all__ = [
    "TINY_BASE",
    "ConstantWithWarmup",
    "DynamicsDiffusionModule",
    "ensure_tiny_base",
    "load_dynamics_model",
]

log = logging.getLogger(__name__)

TINY_BASE = "tiny"
TINY_MARKER = "agnostos-tiny.json"
SAMPLES_DIR = "samples"


# -- base model ------------------------------------------------------------------------------


def _tiny_marker() -> str:
    return json.dumps({"spec": asdict(TinySpec())}, sort_keys=True, default=list)


def ensure_tiny_base(directory: str | os.PathLike[str]) -> Path:
    """The tiny base model in `directory`, built there first if it is not there yet.

    The build goes to a sibling temporary folder that is renamed into place, so a killed
    build never leaves a half-written base and DDP ranks racing to build it agree on one
    copy. A folder built for another `TinySpec` (the marker file differs) is rebuilt; a
    folder that holds something else is refused rather than overwritten.
    """
    target = Path(directory)
    marker = target / TINY_MARKER
    if marker.is_file():
        if marker.read_text(encoding="utf-8") == _tiny_marker():
            return target
        log.info("%s: built for another TinySpec; rebuilding", target)
        shutil.rmtree(target)
    elif target.exists() and any(target.iterdir()):
        raise FileExistsError(
            f"tiny_dir {target} exists but is not a tiny base built by agnostos (no "
            f"{TINY_MARKER}); remove it or choose another folder"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    build_tiny_base(partial)
    (partial / TINY_MARKER).write_text(_tiny_marker(), encoding="utf-8")
    fsync_tree(partial)
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    try:
        partial.rename(target)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / TINY_MARKER).is_file():
            raise
    return target


def load_dynamics_model(
    base: str,
    unet: str | None = None,
    tiny_dir: str | None = None,
    conditioning_dropout_prob: float = 0.05,
) -> DynamicsDiffusion:
    """`DynamicsDiffusion` from a local base directory, or from the tiny base.

    base: a Stable Diffusion directory in diffusers layout (SD2 768-v for the published
        recipe), read offline; or "tiny" for the built-in tiny base, which is built into
        `tiny_dir` once and reused, or, without `tiny_dir`, into a temporary folder
        deleted after loading (it is deterministic, so every process builds the same).
    unet: an exported `checkpoint-<step>` folder (or its `unet/`) to start from.
    """
    if unet is not None:
        try:
            resolve_unet_dir(unet)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"unet: {error}") from None
    if base == TINY_BASE:
        if tiny_dir is not None:
            return _from_pretrained(ensure_tiny_base(tiny_dir), unet, conditioning_dropout_prob)
        with tempfile.TemporaryDirectory(prefix="agnostos-tiny-base-") as scratch:
            path = build_tiny_base(Path(scratch) / "base")
            return _from_pretrained(path, unet, conditioning_dropout_prob)
    return _from_pretrained(Path(base), unet, conditioning_dropout_prob)


def _from_pretrained(base: Path, unet: str | None, dropout: float) -> DynamicsDiffusion:
    try:
        return DynamicsDiffusion.from_pretrained(base, unet=unet, conditioning_dropout_prob=dropout)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"base: {error}") from None


# -- optimisation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstantWithWarmup:
    """LR multiplier: linear from 0 over `warmup_steps`, then 1 (constant without warmup).

    Same schedule as diffusers' `get_constant_schedule_with_warmup`. A dataclass rather
    than a lambda, so `LambdaLR.state_dict()` records it.
    """

    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        return 1.0


def _check_arguments(values: dict[str, Any]) -> None:
    """Reject impossible settings with the argument's name (LightningCLI shows it)."""
    checks = [
        ("learning_rate", values["learning_rate"] > 0, "must be > 0"),
        ("warmup_steps", values["warmup_steps"] >= 0, "must be >= 0"),
        ("adam_eps", values["adam_eps"] > 0, "must be > 0"),
        ("weight_decay", values["weight_decay"] >= 0, "must be >= 0"),
        ("sample_count", values["sample_count"] >= 0, "must be >= 0"),
        ("sample_steps", values["sample_steps"] >= 1, "must be >= 1"),
        (
            "conditioning_dropout_prob",
            0.0 <= values["conditioning_dropout_prob"] <= 1.0 / 3.0,
            "must lie in [0, 1/3]",
        ),
    ]
    betas = values["adam_betas"]
    checks.append(
        (
            "adam_betas",
            len(betas) == 2 and all(0.0 <= beta < 1.0 for beta in betas),
            "must be two numbers in [0, 1)",
        )
    )
    decay = values["ema_decay"]
    checks.append(("ema_decay", decay is None or 0.0 <= decay < 1.0, "must lie in [0, 1)"))
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"{name} {rule}, got {values[name]!r}")


# -- the module ----------------------------------------------------------------------------------


class DynamicsDiffusionModule(L.LightningModule):
    """Trains the dynamics diffusion UNet (see the module docstring for the design).

    Args:
        base: local Stable Diffusion directory (diffusers layout; SD2 768-v for the
            published recipe) or "tiny" for the built-in tiny base (CPU tests and demos).
        unet: optional exported `checkpoint-<step>` (or `unet/` folder) to start from
            instead of the base UNet (widened to 8 input channels).
        tiny_dir: where base="tiny" keeps its generated base (built once, then reused);
            default: a temporary folder removed after loading.
        learning_rate: AdamW learning rate, constant after the warmup (recipe: 5e-5).
        warmup_steps: linear warmup from 0 (recipe: 0).
        adam_betas, adam_eps, weight_decay: AdamW settings (recipe: (0.9, 0.999), 1e-8, 1e-2).
        conditioning_dropout_prob: p of the IP2P dropout (recipe: 0.05).
        ema_decay: keep an EMA of the UNet weights with this decay (None: off, as in the
            recipe); validation and export then use the EMA weights.
        ema_warmup: ramp the EMA decay as (1 + n) / (10 + n) over the first updates.
        gradient_checkpointing: recompute UNet activations in the backward pass (the
            recipe's setting; saves memory for about a third more compute).
        seed: seeds the per-step noise generators and the validation noise.
        sample_count: validation samples drawn into the image grid (0: no grid).
        sample_steps, guidance_scale, image_guidance_scale: the sampler for the grid
            (X-ICM: 50 DDIM steps, both guidances 2.5).
    """

    def __init__(
        self,
        base: str,
        unet: str | None = None,
        tiny_dir: str | None = None,
        learning_rate: float = 5e-5,
        warmup_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 1e-2,
        conditioning_dropout_prob: float = 0.05,
        ema_decay: float | None = None,
        ema_warmup: bool = True,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        sample_count: int = 4,
        sample_steps: int = 50,
        guidance_scale: float = 2.5,
        image_guidance_scale: float = 2.5,
    ) -> None:
        super().__init__()
        _check_arguments(dict(locals()))
        self.save_hyperparameters()
        self.model = load_dynamics_model(base, unet, tiny_dir, conditioning_dropout_prob)
        if gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
        self.ema: ExponentialMovingAverage | None = None
        if ema_decay is not None:
            self.ema = ExponentialMovingAverage(self._unet_parameters(), ema_decay, ema_warmup)
        self.sampling = SamplingConfig(sample_steps, guidance_scale, image_guidance_scale)
        self._ema_reset_pending = False
        self._validation_weights: ExitStack | None = None
        self._grid: np.ndarray | None = None

    # -- helpers -------------------------------------------------------------------------------

    def _unet_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self.model.unet.named_parameters()

    def ema_weights(self) -> AbstractContextManager[None]:
        """Context: the EMA weights in the UNet (no-op without EMA)."""
        if self.ema is None:
            return nullcontext()
        return self.ema.applied(self._unet_parameters())

    def step_seed(self, batch_idx: int) -> int:
        """The seed of a training step's generator: a function of where the run is only."""
        return derive_seed(
            self.hparams.seed, "train", self.global_rank, self.global_step, batch_idx
        )

    # -- Lightning hooks: setup --------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            if self.ema is not None:
                raise ValueError(
                    "ema_decay is not supported with FSDP (the EMA would average parameter "
                    "shards); use the ddp strategy, which fits this model on one GPU per rank"
                )
            self._keep_frozen_outside_fsdp(strategy)

    def _keep_frozen_outside_fsdp(self, strategy: FSDPStrategy) -> None:
        """Leave the frozen VAE and text encoder out of FSDP (before it wraps the model).

        Why: they are never trained, so sharding them would only add all-gathers to every
        step; and FSDP insists on finding every parameter it manages in each state dict,
        while checkpoints here never hold the frozen weights. FSDP moves only what it
        manages to the device, so they are moved here.
        """
        frozen = self.model.frozen_modules()
        ignored = list(strategy.kwargs.get("ignored_modules") or [])
        ignored += [module for module in frozen if all(module is not i for i in ignored)]
        strategy.kwargs["ignored_modules"] = ignored
        for module in frozen:
            module.to(strategy.root_device)

    def on_fit_start(self) -> None:
        trainer = self.trainer
        if trainer.ckpt_path and trainer.reload_dataloaders_every_n_epochs != 1:
            rank_zero_warn(
                "resuming with trainer.reload_dataloaders_every_n_epochs != 1: the data "
                "stream after the resume point will differ from an uninterrupted run's "
                "(see docs/training.md, 'Resume')"
            )
        if self._ema_reset_pending and self.ema is not None:
            self.ema = ExponentialMovingAverage(
                self._unet_parameters(), self.ema.decay, self.ema.warmup
            )
            self.ema.last_step = trainer.global_step
            self._ema_reset_pending = False

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.model.trainable_parameters(),
            lr=hp.learning_rate,
            betas=tuple(hp.adam_betas),
            eps=hp.adam_eps,
            weight_decay=hp.weight_decay,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, ConstantWithWarmup(hp.warmup_steps))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1},
        }

    # -- training ------------------------------------------------------------------------------

    def training_step(self, batch: DynamicsBatch, batch_idx: int) -> torch.Tensor:
        images, targets = batch.unit_range()
        out = self.model.training_loss(
            images, targets, batch.instructions, self.step_seed(batch_idx)
        )
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch))
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=len(batch))
        return out.loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA update.

        Here rather than in `on_train_batch_end`, which runs after the callbacks' hooks:
        the export callback must see the EMA of the step it exports.
        """
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            # The trainer counts this step once this hook returns.
            self.ema.update(self._unet_parameters(), self.trainer.global_step + 1)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """`trainer.gradient_clip_val` as usual; under FSDP through FSDP's own clipping.

        Why: Lightning's FSDP precision plugin refuses norm clipping (each rank holds only
        a shard of every gradient), but the published recipe clips the global norm at
        1.0. `FullyShardedDataParallel.clip_grad_norm_` computes that norm across the
        shards, so the update equals the DDP one.
        """
        fsdp = isinstance(self.trainer.strategy, FSDPStrategy)
        if fsdp and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- validation ----------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._grid = None
        if self.ema is not None:
            self._validation_weights = ExitStack()
            self._validation_weights.enter_context(self.ema_weights())

    def validation_step(self, batch: DynamicsBatch, batch_idx: int) -> torch.Tensor:
        images, targets = batch.unit_range()
        seed = derive_seed(self.hparams.seed, "val", *batch.ids)
        out = self.model.training_loss(images, targets, batch.instructions, seed)
        self.log("val/loss", out.loss, batch_size=len(batch), sync_dist=True)
        trainer = self.trainer
        if (
            batch_idx == 0
            and self.hparams.sample_count > 0
            and trainer.is_global_zero
            and not trainer.sanity_checking
        ):
            self._grid = self.sample_grid(batch)
        return out.loss

    def sample_grid(self, batch: DynamicsBatch) -> np.ndarray:
        """Rows of input | predicted future | true future for the batch's first samples.

        Each sample's sampler noise is seeded by its id, so the same sample gives the same
        noise at every validation and the rows show only what training changed.
        """
        count = min(self.hparams.sample_count, len(batch))
        images, targets = batch.unit_range()
        seeds = [derive_seed(self.hparams.seed, "sample", key) for key in batch.ids[:count]]
        prediction = self.model.predict(
            images[:count], batch.instructions[:count], seeds, self.sampling, decode=True
        )
        rows = [[images[i], prediction.images[i], targets[i]] for i in range(count)]
        return image_grid(rows)

    def on_validation_epoch_end(self) -> None:
        if self._validation_weights is not None:
            self._validation_weights.close()  # raw weights back before any checkpoint
            self._validation_weights = None
        if self._grid is not None:
            self.publish_grid(self._grid)
            self._grid = None

    def publish_grid(self, grid: np.ndarray) -> Path:
        """Save the grid as a PNG under the run directory and log it to W&B loggers."""
        from lightning.pytorch.loggers import WandbLogger

        step = self.global_step
        path = Path(self.trainer.default_root_dir) / SAMPLES_DIR / f"val-step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, encode_png(grid))
        caption = "rows: validation samples; columns: input | predicted future | true future"
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/samples", images=[grid], step=step, caption=[caption])
        return path

    # -- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is None:
            return
        state = checkpoint.get("ema")
        if state is None:
            # A checkpoint from a run without EMA: start the average from its weights.
            rank_zero_warn("checkpoint holds no EMA state; the EMA restarts from its weights")
            self._ema_reset_pending = True
            return
        self.ema.load_state_dict(state)

    # -- export --------------------------------------------------------------------------------

    def export_checkpoint(
        self,
        output_dir: str | os.PathLike[str],
        step: int,
        pipeline_dir: str | os.PathLike[str] | None = None,
        unet_weights: dict[str, torch.Tensor] | None = None,
        resolution: int | None = None,
    ) -> Path:
        """Write `<output_dir>/checkpoint-<step>/unet/` (X-ICM's layout), EMA weights if on.

        `resolution` is the image size trained at, recorded in the UNet's config.

        With `pipeline_dir`, also a full `StableDiffusionInstructPix2PixPipeline` there.
        `unet_weights` (the full UNet state, gathered from FSDP shards by the caller)
        replaces this process's UNet weights, which under FSDP are only a shard. Both
        are written to temporary folders, flushed and renamed into place.
        """
        if unet_weights is not None and self.ema is not None:
            raise ValueError("unet_weights and EMA exclude each other (EMA is refused with FSDP)")
        unet = self.model.unet_with_weights(unet_weights) if unet_weights is not None else None
        with self.ema_weights():
            path = self.model.export_unet(output_dir, step, unet=unet, resolution=resolution)
            fsync_tree(path)
            fsync_directory(path.parent)
            if pipeline_dir is not None:
                final = Path(pipeline_dir)
                partial = final.with_name(final.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                self.model.save_pipeline(partial, unet=unet, resolution=resolution)
                replace_directory(partial, final)
        return path
