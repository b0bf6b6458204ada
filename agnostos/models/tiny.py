"""A tiny Stable-Diffusion-shaped base model, built from configs, for CPU tests and demos.

Nothing here downloads anything: every component is randomly initialised from a config and
the CLIP tokenizer is written from scratch (a byte-level alphabet, no merges). The result is
saved to a directory in the diffusers layout (`model_index.json`, `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`), so the dynamics model loads it through exactly
the same from-directory code path it uses for a local copy of SD2-768.

Shapes follow `dynamics_diffusion.md` section 9: a 2-level VAE (downsample factor 2, so a
32 px image gives a 4x16x16 latent and 1024-dim features like the real 128 px model) and a
2-level UNet with cross-attention only at the coarse level. The UNet is saved with 4 input
channels, like a text-to-image base, so loading it exercises the conv_in widening.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from agnostos.atomic import replace_directory

__all__ = [
    "TinySpec",
    "build_tiny_base",
    "byte_alphabet",
    "write_clip_tokenizer_files",
]

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny base model; the defaults run a training step in well under a second.

    `prediction_type` defaults to v-prediction so the tiny model behaves like SD2-768
    (the sampling and training schedulers both read it from the saved scheduler config).
    """

    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (32, 64)
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 37
    cross_attention_head_dim: int = 8
    max_length: int = 77
    image_size: int = 32
    prediction_type: str = "v_prediction"
    seed: int = 0


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode symbols, in byte order (transformers 5 no longer exports it).

    Printable bytes map to themselves; every other byte maps, in order, to chr(256 + n).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols: dict[int, str] = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def write_clip_tokenizer_files(directory: str | Path) -> Path:
    """Write `vocab.json` + `merges.txt` of a merge-free byte-level CLIP BPE vocabulary.

    Every string tokenises (one token per character, `</w>` on the last of a word), which
    is all a tiny text encoder needs; `CLIPTokenizer.from_pretrained(directory)` reads it.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_alphabet()
    vocab: dict[str, int] = {symbol: index for index, symbol in enumerate(symbols)}
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab[START_TOKEN] = len(vocab)
    vocab[END_TOKEN] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def _tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="agnostos-clip-tok-") as scratch:
        write_clip_tokenizer_files(scratch)
        return CLIPTokenizer.from_pretrained(
            scratch, model_max_length=max_length, pad_token=END_TOKEN
        )


def _components(spec: TinySpec, tokenizer):
    """Randomly initialised UNet (4 inputs, like a text-to-image base), VAE, text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_levels = len(spec.vae_channels)
    vae_factor = 2 ** (vae_levels - 1)
    unet = UNet2DConditionModel(
        sample_size=spec.image_size // vae_factor,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=spec.unet_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=spec.cross_attention_head_dim,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        latent_channels=4,
        sample_size=spec.image_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_intermediate,
            num_attention_heads=spec.text_heads,
            num_hidden_layers=spec.text_layers,
            max_position_embeddings=spec.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return unet, vae, text_encoder


def build_tiny_base(directory: str | Path, spec: TinySpec | None = None) -> Path:
    """Create a tiny SD-style base model directory (diffusers layout) and return its path.

    The directory is complete: `DynamicsDiffusion.from_pretrained(directory)` and
    `StableDiffusionPipeline.from_pretrained(directory)` both load it offline. Weights are
    deterministic for a given `spec.seed`.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    spec = spec or TinySpec()
    if len(spec.unet_channels) != 2 or len(spec.vae_channels) < 1:
        raise ValueError(
            f"TinySpec.unet_channels must have 2 levels (got {spec.unet_channels}) and "
            f"vae_channels at least 1 (got {spec.vae_channels})"
        )
    out = Path(directory)
    tokenizer = _tokenizer(spec.max_length)
    with torch.random.fork_rng(devices=[]):  # seeded weights; the global RNG is left alone
        torch.manual_seed(spec.seed)
        unet, vae, text_encoder = _components(spec, tokenizer)
    # SD2-768's scheduler settings (scaled-linear betas, DDIM, steps_offset 1).
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=spec.prediction_type,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep the slow-tokenizer files as well so
    # transformers 4 (and any reader expecting SD's layout) loads the same vocabulary.
    write_clip_tokenizer_files(out / "tokenizer")
    return out


@dataclass(frozen=True)
class VaeFit:
    """What `fit_tiny_vae` did: reconstruction error before and after, and the new scale."""

    steps: int
    mse_before: float
    mse_after: float
    scaling_factor: float


def _reconstruction_mse(vae, images: torch.Tensor) -> float:
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    return float(torch.mean((recon - images) ** 2))


def fit_tiny_vae(
    base: str | Path,
    images: torch.Tensor,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
) -> VaeFit:
    """Teach the tiny base's random VAE to reconstruct `images` (N x 3 x S x S uint8), in place.

    Why: a real Stable Diffusion base comes with a pretrained autoencoder, so its latents
    describe the picture and its decoded predictions are images. The tiny base's VAE is
    random: predicted futures decode to noise and latent similarity means little. A few
    hundred steps on the frames at hand give the tiny pipeline the same property. The
    latent scaling factor is then set to 1 / std of the latents (how SD's 0.18215 was
    chosen), so diffusion targets have unit variance. The VAE folder is replaced
    atomically; the rest of the base is untouched.
    """
    from diffusers import AutoencoderKL

    from agnostos.images import to_unit_range

    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be N x 3 x S x S uint8, got {tuple(images.shape)} {images.dtype}"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    base = Path(base)
    vae = AutoencoderKL.from_pretrained(base / "vae")
    pixels = to_unit_range(images)
    generator = torch.Generator().manual_seed(seed)
    before = _reconstruction_mse(vae.eval(), pixels)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    vae.train()
    for _ in range(steps):
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.mean((recon - batch) ** 2) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval()
    after = _reconstruction_mse(vae, pixels)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator=generator)
    scaling_factor = float(1.0 / latents.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=scaling_factor)
    partial = base / "vae.partial"
    shutil.rmtree(partial, ignore_errors=True)
    vae.save_pretrained(partial, safe_serialization=True)
    replace_directory(partial, base / "vae")
    return VaeFit(steps, before, after, scaling_factor)
