"""X-ICM's dynamics diffusion model: InstructPix2Pix-style latent diffusion in diffusers.

The model predicts a future frame of the scene (as a VAE latent) from the current front
image and the instruction; X-ICM ranks cross-task demonstrations by dot products of these
predicted latents. It is rebuilt here from `dynamics_diffusion.md`:

* Base: any Stable Diffusion 1.x/2.x directory in diffusers layout (SD2 768-v by default),
  read from local disk only. `conv_in` is widened to 8 input channels (4 noisy target
  latent + 4 conditioning-image latent): the new input channels start at zero and the
  pretrained weights and bias are copied, so with a zero conditioning latent the widened
  UNet reproduces the base UNet exactly.
* Only the UNet trains; the VAE and the text encoder are frozen, kept in eval mode and left
  out of `state_dict()` (so Lightning checkpoints never carry them).
* The prediction type (v-prediction for SD2-768) comes from the base scheduler config and
  is never hard-coded.
* Latent conventions, exactly as the published training code and the diffusers pipeline:
  the conditioning latent is the VAE posterior *mode*, unscaled; the target latent is a
  posterior *sample* times `vae.config.scaling_factor`.
* Conditioning dropout: one uniform draw r per item; text -> "" when r < 2p, image latent
  -> 0 when p <= r < 3p (5% text only, 5% both, 5% image only at p = 0.05).
* Feature extraction runs the stock `StableDiffusionInstructPix2PixPipeline` (50 DDIM
  steps, text and image guidance 2.5, `output_type="latent"` in X-ICM) with one CPU
  `torch.Generator` per item, so an item's features depend only on its own seed, never on
  the batch it was computed in or on how many calls came before.

Export writes `checkpoint-<step>/unet/` (what X-ICM's loader reads with
`UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet")`) and a full pipeline
directory via `save_pretrained`; `DynamicsDiffusion.from_pretrained` loads a base
directory, a base plus an exported checkpoint, or an exported pipeline directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "COMPONENTS",
    "DynamicsDiffusion",
    "LossOutput",
    "Prediction",
    "SamplingConfig",
    "conditioning_dropout_masks",
    "expand_conv_in",
    "resolve_unet_dir",
]

# Sub-folders a Stable Diffusion directory must provide (diffusers layout).
COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Modules that never train and never enter `state_dict()`.
FROZEN_MODULES: tuple[str, ...] = ("vae", "text_encoder")
CONDITIONING_CHANNELS = 4


@dataclass(frozen=True)
class SamplingConfig:
    """Sampler settings for feature extraction; the defaults are X-ICM's (parity)."""

    num_inference_steps: int = 50
    guidance_scale: float = 2.5
    image_guidance_scale: float = 2.5


@dataclass
class LossOutput:
    """One training step's loss and what produced it (for logging and tests)."""

    loss: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    drop_text: torch.Tensor
    drop_image: torch.Tensor


@dataclass
class Prediction:
    """Per-item outputs of `DynamicsDiffusion.predict`.

    input_latents: (B,4,h,w) conditioning latents (posterior mode, unscaled), X-ICM's
        `all_input_image_feats` once flattened.
    output_latents: (B,4,h,w) final denoised latents in scaled latent space, X-ICM's
        "vis.out" feature (`all_output_image_feats`) once flattened.
    prompt_bos: (B,D) text-encoder last hidden state at token 0, X-ICM's "lang" feature
        (`all_prompt_feats`); identical for every prompt because of CLIP's causal mask.
    prompt_pooled: (B,D) the text encoder's pooled (EOS-token) output, a prompt feature
        that does depend on the prompt.
    images: (B,3,H,W) decoded predictions in [-1, 1], when asked for.
    """

    input_latents: torch.Tensor
    output_latents: torch.Tensor
    prompt_bos: torch.Tensor
    prompt_pooled: torch.Tensor
    images: torch.Tensor | None = None


def expand_conv_in(unet: nn.Module, in_channels: int = 8) -> nn.Module:
    """Widen `unet.conv_in` to `in_channels` inputs, in place; returns the UNet.

    The old weights fill the first input channels, the new ones are zero and the bias is
    copied, so the output is unchanged while the extra inputs are zero. A UNet that
    already has `in_channels` inputs (an exported IP2P UNet) is returned untouched.
    """
    old = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    if old.in_channels > in_channels:
        raise ValueError(
            f"cannot widen conv_in from {old.in_channels} to {in_channels} input channels"
        )
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dtype=old.weight.dtype,
        device=old.weight.device,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def conditioning_dropout_masks(
    uniform: torch.Tensor, probability: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_text, drop_image) boolean masks from one uniform draw per item.

    The published recipe: text is dropped when r < 2p and the image when p <= r < 3p, so
    [0, p) drops text only, [p, 2p) both, [2p, 3p) image only.
    """
    if not 0.0 <= probability <= 1.0 / 3.0:
        raise ValueError(f"conditioning_dropout_prob must lie in [0, 1/3], got {probability}")
    drop_text = uniform < 2 * probability
    drop_image = (uniform >= probability) & (uniform < 3 * probability)
    return drop_text, drop_image


def resolve_unet_dir(path: str | os.PathLike[str]) -> Path:
    """The folder holding the UNet's `config.json`: a `checkpoint-<step>` folder (with a
    `unet/` inside), a pipeline directory, or a `unet/` folder itself."""
    folder = Path(path)
    for candidate in (folder / "unet", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{folder}: no UNet found (expected {folder / 'unet' / 'config.json'} or "
        f"{folder / 'config.json'})"
    )


def _check_base_dir(base: Path) -> None:
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: Stable Diffusion base directory does not exist")
    missing = [name for name in COMPONENTS if not (base / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{base}: not a Stable Diffusion directory in diffusers layout; missing "
            f"sub-folder(s) {', '.join(missing)}"
        )


def _sampler_class_name(base: Path, override: str | None) -> str:
    """The scheduler class the base pipeline samples with (model_index.json), e.g. DDIM."""
    if override:
        return override
    index = base / "model_index.json"
    if not index.is_file():
        return "DDIMScheduler"
    try:
        entry = json.loads(index.read_text(encoding="utf-8")).get("scheduler")
    except json.JSONDecodeError as error:
        raise ValueError(f"{index}: invalid JSON ({error})") from None
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
        raise ValueError(f"{index}: key 'scheduler' must be [library, class], got {entry!r}")
    return entry[1]


def _make_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


class DynamicsDiffusion(nn.Module):
    """InstructPix2Pix-style dynamics model (see the module docstring).

    Build with `from_pretrained`; the constructor takes ready components so tests and
    the trainer can assemble one however they like.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        noise_scheduler: Any,
        sample_scheduler: Any,
        conditioning_dropout_prob: float = 0.05,
        in_channels: int = 8,
    ) -> None:
        super().__init__()
        conditioning_dropout_masks(torch.zeros(1), conditioning_dropout_prob)  # validates p
        latent_channels = int(vae.config.latent_channels)
        if in_channels != latent_channels + CONDITIONING_CHANNELS:
            raise ValueError(
                f"in_channels={in_channels} must equal the VAE's latent_channels "
                f"({latent_channels}) + {CONDITIONING_CHANNELS} conditioning channels"
            )
        self.unet = expand_conv_in(unet, in_channels)
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.sample_scheduler = sample_scheduler
        self.conditioning_dropout_prob = float(conditioning_dropout_prob)
        train_type = noise_scheduler.config.prediction_type
        sample_type = sample_scheduler.config.prediction_type
        if train_type != sample_type:
            raise ValueError(
                f"training scheduler predicts {train_type!r} but the sampling scheduler "
                f"predicts {sample_type!r}; both must come from the same base config"
            )
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        self._null_text: torch.Tensor | None = None
        self._load_prefix = ""
        self.register_state_dict_post_hook(_drop_frozen_from_state_dict)
        self.register_load_state_dict_pre_hook(_remember_load_prefix)
        self.register_load_state_dict_post_hook(_forgive_missing_frozen)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike[str],
        *,
        unet: str | os.PathLike[str] | None = None,
        conditioning_dropout_prob: float = 0.05,
        sample_scheduler: str | None = None,
    ) -> DynamicsDiffusion:
        """Load from a local Stable Diffusion directory (diffusers layout), offline.

        `base` may be an SD 1.x/2.x base (its 4-channel UNet is widened) or an exported
        pipeline directory (its UNet already has 8 inputs). `unet` optionally points at
        an exported `checkpoint-<step>` (or its `unet/` folder) to use instead of the
        base UNet, which is how X-ICM loads its checkpoint. `sample_scheduler` overrides
        the sampler class named in `model_index.json` (a diffusers class name).
        """
        import diffusers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        base_dir = Path(base)
        _check_base_dir(base_dir)
        unet_dir = resolve_unet_dir(unet) if unet is not None else base_dir / "unet"
        name = _sampler_class_name(base_dir, sample_scheduler)
        sampler_class = getattr(diffusers, name, None)
        if sampler_class is None or not hasattr(sampler_class, "from_pretrained"):
            raise ValueError(f"{base_dir}: unknown diffusers scheduler class {name!r}")
        return cls(
            unet=UNet2DConditionModel.from_pretrained(unet_dir),
            vae=AutoencoderKL.from_pretrained(base_dir, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer"),
            noise_scheduler=DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler"),
            sample_scheduler=sampler_class.from_pretrained(base_dir, subfolder="scheduler"),
            conditioning_dropout_prob=conditioning_dropout_prob,
        )

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent for a square image of `resolution` pixels."""
        side = resolution // self.vae_scale_factor
        return (int(self.vae.config.latent_channels), side, side)

    def train(self, mode: bool = True) -> DynamicsDiffusion:
        """Switch the UNet's mode; the frozen VAE and text encoder always stay in eval."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    # ------------------------------------------------------------------ encoders

    def _tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens.input_ids.to(self.text_encoder.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states (B,L,D), pooled EOS output (B,D)) of the frozen text encoder.

        The hidden states are exactly what the pipeline feeds the UNet (no attention mask,
        padded to `model_max_length`).
        """
        output = self.text_encoder(self._tokenize(prompts))
        return output.last_hidden_state, output.pooler_output

    def null_text_embedding(self) -> torch.Tensor:
        """Hidden states of the empty prompt (1,L,D), cached: the encoder never changes."""
        device = self.text_encoder.device
        cached = self._null_text
        if cached is None or cached.device != device:
            cached, _ = self.encode_prompts([""])
            self._null_text = cached
        return cached

    @torch.no_grad()
    def encode_condition(self, images: torch.Tensor) -> torch.Tensor:
        """Conditioning latents: VAE posterior mode, *unscaled* (IP2P convention)."""
        vae_input = images.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.encode(vae_input).latent_dist.mode()

    @torch.no_grad()
    def encode_target(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Target latents: a VAE posterior sample times the scaling factor."""
        vae_input = images.to(device=self.vae.device, dtype=self.vae.dtype)
        sample = self.vae.encode(vae_input).latent_dist.sample(generator)
        return sample * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""
        scaled = latents.to(device=self.vae.device, dtype=self.vae.dtype) / self.scaling_factor
        return self.vae.decode(scaled).sample.clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ training

    def _check_batch(self, images: torch.Tensor, targets: torch.Tensor, count: int) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"input images must be Bx3xHxW, got {tuple(images.shape)}")
        if targets.shape != images.shape:
            raise ValueError(
                f"target images {tuple(targets.shape)} must match input images "
                f"{tuple(images.shape)}"
            )
        if count != images.shape[0]:
            raise ValueError(f"{count} instructions for a batch of {images.shape[0]} images")

    def training_loss(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        instructions: Sequence[str],
        generator: torch.Generator | int | None = None,
    ) -> LossOutput:
        """The published IP2P training loss for one batch.

        images and targets are Bx3xHxW in [-1, 1]. `generator` (or an int seed) drives
        every random draw of the step (VAE sample, noise, timesteps, dropout), so a step
        can be replayed exactly; None uses torch's global RNG.
        """
        self._check_batch(images, targets, len(instructions))
        if isinstance(generator, int):
            generator = _make_generator(generator)
        device = self.device
        dtype = self.unet.dtype
        batch = images.shape[0]
        random_device = generator.device if generator is not None else device

        latents = self.encode_target(targets, generator).to(device=device, dtype=dtype)
        condition = self.encode_condition(images).to(device=device, dtype=dtype)
        text, _ = self.encode_prompts(instructions)
        text = text.to(device=device, dtype=dtype)

        noise = torch.randn(
            latents.shape, generator=generator, device=random_device, dtype=dtype
        ).to(device)
        timesteps = torch.randint(
            0,
            int(self.noise_scheduler.config.num_train_timesteps),
            (batch,),
            generator=generator,
            device=random_device,
        ).to(device)
        uniform = torch.rand(batch, generator=generator, device=random_device).to(device)
        drop_text, drop_image = conditioning_dropout_masks(uniform, self.conditioning_dropout_prob)
        null_text = self.null_text_embedding().to(device=device, dtype=dtype)
        text = torch.where(drop_text[:, None, None], null_text, text)
        condition = condition * (~drop_image).to(dtype)[:, None, None, None]

        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(
            torch.cat([noisy, condition], dim=1), timesteps, encoder_hidden_states=text
        ).sample
        target = self._loss_target(latents, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        return LossOutput(loss, prediction, target, timesteps, drop_text, drop_image)

    def _loss_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config")

    def frozen_modules(self) -> list[nn.Module]:
        """The parts that are never trained (and never checkpointed): VAE, text encoder."""
        return [getattr(self, name) for name in FROZEN_MODULES]

    def unet_with_weights(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """A new UNet of this model's architecture holding `weights` (a full state dict,
        e.g. gathered from FSDP shards); this model is left untouched."""
        unet = type(self.unet).from_config(self.unet.config)
        unet.load_state_dict(weights, strict=True)
        return unet.to(dtype=self.unet.dtype).eval()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the UNet's parameters only."""
        return [parameter for parameter in self.unet.parameters() if parameter.requires_grad]

    # ------------------------------------------------------------------ inference

    def pipeline(self, unet: nn.Module | None = None):
        """A `StableDiffusionInstructPix2PixPipeline` sharing this model's components."""
        from diffusers import StableDiffusionInstructPix2PixPipeline

        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet if unet is not None else self.unet,
            scheduler=self.sample_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampling: SamplingConfig | None = None,
        decode: bool = False,
    ) -> Prediction:
        """Predict each item's future latent (and image) with the X-ICM sampler.

        images are Bx3xHxW in [-1, 1]; item i's initial noise comes from its own CPU
        generator seeded with `seeds[i]`, so its result does not depend on the other
        items in the batch, their order, or earlier calls (up to float round-off between
        batch sizes). The conditioning latents are computed here (mode, unscaled) and
        handed to the pipeline as 4-channel image latents, which it uses unchanged.
        """
        sampling = sampling or SamplingConfig()
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be Bx3xHxW, got {tuple(images.shape)}")
        if not len(prompts) == len(seeds) == images.shape[0]:
            raise ValueError(
                f"{images.shape[0]} images, {len(prompts)} prompts and {len(seeds)} seeds "
                "must all be equal"
            )
        was_training = self.unet.training
        self.unet.eval()
        try:
            condition = self.encode_condition(images).to(dtype=self.unet.dtype)
            hidden, pooled = self.encode_prompts(prompts)
            result = self.pipeline()(
                prompt=None,
                prompt_embeds=hidden,
                image=condition,
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                image_guidance_scale=sampling.image_guidance_scale,
                generator=[_make_generator(seed) for seed in seeds],
                output_type="latent",
            )
        finally:
            self.unet.train(was_training)
        latents = result.images
        return Prediction(
            input_latents=condition,
            output_latents=latents,
            prompt_bos=hidden[:, 0, :],
            prompt_pooled=pooled,
            images=self.decode_latents(latents) if decode else None,
        )

    # ------------------------------------------------------------------ export

    def export_unet(
        self,
        output_dir: str | os.PathLike[str],
        step: int,
        unet: nn.Module | None = None,
        resolution: int | None = None,
    ) -> Path:
        """Write `<output_dir>/checkpoint-<step>/unet/` (config.json + safetensors).

        This is the folder X-ICM loads with `from_pretrained(ckpt, subfolder="unet")`.
        The sampling scheduler config goes alongside in `scheduler/` so the prediction
        type travels with the weights. `unet` overrides the weights exported (EMA).
        `resolution`, the image size the UNet was trained at, goes into the exported
        config's `sample_size` (in latents): a fine-tune otherwise keeps its base's value
        (SD2 768-v: 96, i.e. 768 px, for a model trained at 128 px), and bank builds take
        their default query size from it. Written to a temporary folder and renamed, so a
        killed run never leaves a half-written checkpoint under the final name.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        final = Path(output_dir) / f"checkpoint-{step}"
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        target = unet if unet is not None else self.unet
        with self._declaring(target, resolution):
            target.save_pretrained(partial / "unet", safe_serialization=True)
        self.sample_scheduler.save_pretrained(partial / "scheduler")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        return final

    def save_pipeline(
        self,
        output_dir: str | os.PathLike[str],
        unet: nn.Module | None = None,
        resolution: int | None = None,
    ) -> Path:
        """Write a full `StableDiffusionInstructPix2PixPipeline` directory (`resolution`
        as in `export_unet`)."""
        out = Path(output_dir)
        with self._declaring(unet if unet is not None else self.unet, resolution):
            self.pipeline(unet).save_pretrained(out, safe_serialization=True)
        return out

    @contextmanager
    def _declaring(self, unet: nn.Module, resolution: int | None) -> Iterator[None]:
        """While saving, the UNet's config declares `resolution` px as its sample size."""
        if resolution is None:
            yield
            return
        if resolution < 1 or resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} is not a positive multiple of the VAE's "
                f"downsample factor {self.vae_scale_factor}"
            )
        original = unet.config.sample_size
        unet.register_to_config(sample_size=resolution // self.vae_scale_factor)
        try:
            yield
        finally:
            unet.register_to_config(sample_size=original)


def _drop_frozen_from_state_dict(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict post hook: frozen weights come from the base model, never a checkpoint."""
    frozen = tuple(prefix + name + "." for name in FROZEN_MODULES)
    for key in [key for key in state_dict if key.startswith(frozen)]:
        del state_dict[key]


def _remember_load_prefix(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre hook: note where this model sits in the checkpoint being loaded."""
    module._load_prefix = prefix


def _forgive_missing_frozen(module: nn.Module, incompatible_keys: Any) -> None:
    """Load post hook: a checkpoint without frozen weights still loads with strict=True.

    The frozen weights already hold the base model's values, which is what a checkpoint
    would have contained.
    """
    prefix = getattr(module, "_load_prefix", "")
    frozen = tuple(prefix + name + "." for name in FROZEN_MODULES)
    incompatible_keys.missing_keys[:] = [
        key for key in incompatible_keys.missing_keys if not key.startswith(frozen)
    ]
