"""The dynamics model as the bank sees it: loading it with its identity, its own query
resolution, and batched feature extraction.

The builder and a query at ranking time must run demos through the same model in the same
way, so both go through `extract_features` (one seed per item, float32 CPU outputs), and
`model_identity` records which weights made a bank (paths plus a hash of the UNet folder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from agnostos.evaluation.bank.records import TENSOR_NAMES, BankError, ModelIdentity, folder_sha256
from agnostos.models.dynamics_diffusion import DynamicsDiffusion, SamplingConfig, resolve_unet_dir


def model_identity(
    model: str | os.PathLike[str], base: str | os.PathLike[str] | None
) -> ModelIdentity:
    """Absolute paths of the base and UNet folders and the SHA-256 of the UNet folder."""
    model_dir = Path(model).resolve()
    unet_dir = resolve_unet_dir(model_dir)
    base_dir = Path(base).resolve() if base is not None else model_dir
    kind = "pipeline directory" if base is None else "UNet checkpoint on a base"
    return ModelIdentity(
        base=str(base_dir),
        unet=str(unet_dir),
        unet_sha256=folder_sha256(unet_dir),
        description=kind,
    )


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(
    model: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[DynamicsDiffusion, ModelIdentity]:
    """(DynamicsDiffusion, ModelIdentity) from an exported pipeline directory, or an
    exported `checkpoint-<step>` folder plus the Stable Diffusion base it was trained on."""
    model_dir = Path(model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    if base is not None and not Path(base).is_dir():
        raise FileNotFoundError(f"{base}: base model directory does not exist")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available to torch {torch.__version__}")
    is_pipeline = (model_dir / "model_index.json").is_file()
    if not is_pipeline and base is None:
        resolve_unet_dir(model_dir)  # a clear error when there is no UNet either
        raise BankError(
            f"{model_dir}: a UNet checkpoint without model_index.json; pass the Stable "
            "Diffusion base directory as well (--base)"
        )
    identity = model_identity(model_dir, base)
    if base is None:
        network = DynamicsDiffusion.from_pretrained(model_dir)
    else:
        network = DynamicsDiffusion.from_pretrained(base, unet=model_dir)
    network = network.to(device=torch.device(device), dtype=_DTYPES[dtype])
    network.eval()
    return network, identity


def model_resolution(model: DynamicsDiffusion) -> int:
    """The square image size the model's UNet is configured for, in pixels: its latent
    `sample_size` times the VAE's downsample factor (the tiny test model: 16 x 2 = 32).

    It is what the UNet's config declares, which a fine-tune keeps from its base: a UNet
    fine-tuned at 128 px from SD2 768-v still declares 96 x 8 = 768.
    """
    return int(model.unet.config.sample_size) * int(model.vae_scale_factor)


# --------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class BatchFeatures:
    """One batch's features on the CPU in float32 (images uint8 HxWx3 when decoded)."""

    input_latents: torch.Tensor
    output_latents: torch.Tensor
    prompt_bos: torch.Tensor
    prompt_pooled: torch.Tensor
    images: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {name: getattr(self, name) for name in TENSOR_NAMES}
        if self.images is not None:
            named["images"] = self.images
        return named


def extract_features(
    model: DynamicsDiffusion,
    images: torch.Tensor,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling: SamplingConfig,
    decode: bool = False,
) -> BatchFeatures:
    """Features of a batch of query images (Bx3xHxW uint8) through `model.predict`.

    Each item uses its own seed, so its features do not depend on the batch (to float
    round-off). Outputs are float32 on the CPU; decoded predictions become uint8 HxWx3.
    """
    from agnostos.images import to_unit_range

    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (B,3,H,W), got {images.dtype}")
    pixels = to_unit_range(images).to(device=model.device, dtype=model.unet.dtype)
    prediction = model.predict(pixels, list(prompts), list(seeds), sampling, decode=decode)

    def cpu(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()

    decoded = None
    if decode and prediction.images is not None:
        unit = (cpu(prediction.images) + 1.0) * 127.5
        decoded = unit.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return BatchFeatures(
        input_latents=cpu(prediction.input_latents),
        output_latents=cpu(prediction.output_latents),
        prompt_bos=cpu(prediction.prompt_bos),
        prompt_pooled=cpu(prediction.prompt_pooled),
        images=decoded,
    )
