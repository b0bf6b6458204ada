"""The dynamics diffusion model on a tiny SD-shaped base built from configs (CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agnostos.models.dynamics_diffusion import (
    DynamicsDiffusion,
    SamplingConfig,
    conditioning_dropout_masks,
    expand_conv_in,
    resolve_unet_dir,
)
from agnostos.models.tiny import TinySpec, build_tiny_base
from agnostos.seeding import derive_seed
from agnostos.shards.folders import discover_episodes, read_episode

FAST = SamplingConfig(num_inference_steps=4)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base") / "sd")


@pytest.fixture(scope="module")
def model(tiny_base: Path) -> DynamicsDiffusion:
    return DynamicsDiffusion.from_pretrained(tiny_base)


def _to_model_range(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [-1, 1]."""
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def frames(synthetic_root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """First and last front frames (real PNG decodes) and instructions of 4 episodes."""
    episodes = [read_episode(location) for location in discover_episodes(synthetic_root)][:4]
    first = torch.stack([_to_model_range(e.rgb("front", 0)) for e in episodes])
    last = torch.stack([_to_model_range(e.rgb("front", e.num_frames - 1)) for e in episodes])
    return first, last, [e.instruction for e in episodes]


def test_tiny_base_is_a_diffusers_directory(tiny_base: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    index = json.loads((tiny_base / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    for folder in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_base / folder).is_dir()
    assert (tiny_base / "tokenizer" / "vocab.json").is_file()
    assert (tiny_base / "tokenizer" / "merges.txt").read_text().startswith("#version: 0.2")
    assert json.loads((tiny_base / "unet" / "config.json").read_text())["in_channels"] == 4
    # The stock loader reads it too, and the same seed rebuilds the same weights without
    # touching the global RNG.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    assert pipe.tokenizer("open the drawer").input_ids[0] == pipe.tokenizer.bos_token_id
    state = torch.random.get_rng_state()
    again = build_tiny_base(tmp_path / "again")
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = "unet/diffusion_pytorch_model.safetensors"
    first, second = load_file(tiny_base / weights), load_file(again / weights)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_conv_in_widening_keeps_the_base_output(tiny_base: Path, model: DynamicsDiffusion) -> None:
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
    widened = model.unet
    assert widened.config.in_channels == 8 and widened.conv_in.in_channels == 8
    assert torch.equal(widened.conv_in.weight[:, :4], base.conv_in.weight)
    assert torch.count_nonzero(widened.conv_in.weight[:, 4:]) == 0
    assert torch.equal(widened.conv_in.bias, base.conv_in.bias)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        expected = base(latents, timesteps, encoder_hidden_states=text).sample
        zero_condition = torch.cat([latents, torch.zeros_like(latents)], dim=1)
        got = widened(zero_condition, timesteps, encoder_hidden_states=text).sample
        other = torch.cat([latents, torch.ones_like(latents)], dim=1)
        changed = widened(other, timesteps, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Until training moves the new (zero) weights, any condition is ignored.
    torch.testing.assert_close(changed, expected, rtol=0, atol=1e-6)
    assert expand_conv_in(widened, 8) is widened  # already widened: untouched
    with pytest.raises(ValueError, match="cannot widen"):
        expand_conv_in(widened, 4)


def test_frozen_parts_stay_frozen_and_out_of_the_state_dict(model: DynamicsDiffusion) -> None:
    assert model.prediction_type == "v_prediction"
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    model.train()
    assert model.unet.training and not model.vae.training and not model.text_encoder.training
    state = model.state_dict()
    assert state and all(key.startswith("unet.") for key in state)
    assert len(state) == len(model.unet.state_dict())
    assert len(model.trainable_parameters()) == len(list(model.unet.parameters()))

    # Nested like a LightningModule holds it: the checkpoint still has no frozen weights,
    # and loading it back with strict=True works.
    holder = torch.nn.Module()
    holder.model = model
    nested = {key: value.clone() for key, value in holder.state_dict().items()}
    assert all(key.startswith("model.unet.") for key in nested)
    changed = {key: value + 1.0 for key, value in nested.items()}
    holder.load_state_dict(changed, strict=True)
    key = next(iter(nested))
    assert torch.equal(holder.state_dict()[key], changed[key])
    holder.load_state_dict(nested, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        holder.load_state_dict({k: v for k, v in nested.items() if k != key}, strict=True)


def test_prediction_type_comes_from_the_base_scheduler(tmp_path: Path) -> None:
    spec = TinySpec(prediction_type="epsilon")
    model = DynamicsDiffusion.from_pretrained(build_tiny_base(tmp_path / "eps", spec))
    assert model.prediction_type == "epsilon"
    assert model.sample_scheduler.config.prediction_type == "epsilon"
    images = torch.zeros(2, 3, 32, 32)
    generator = torch.Generator().manual_seed(3)
    out = model.training_loss(images, images, ["a", "b"], generator=3)
    model.encode_target(images, generator)
    noise = torch.randn(out.target.shape, generator=generator)
    torch.testing.assert_close(out.target, noise)  # epsilon target = the noise drawn


def test_dropout_masks_follow_the_published_recipe() -> None:
    uniform = torch.rand(400_000, generator=torch.Generator().manual_seed(0))
    drop_text, drop_image = conditioning_dropout_masks(uniform, 0.05)
    fractions = {
        "text only": (drop_text & ~drop_image).float().mean().item(),
        "both": (drop_text & drop_image).float().mean().item(),
        "image only": (~drop_text & drop_image).float().mean().item(),
        "none": (~drop_text & ~drop_image).float().mean().item(),
    }
    for name, expected in {
        "text only": 0.05,
        "both": 0.05,
        "image only": 0.05,
        "none": 0.85,
    }.items():
        assert fractions[name] == pytest.approx(expected, abs=0.003), name
    edges = torch.tensor([0.0, 0.0499, 0.05, 0.0999, 0.1, 0.1499, 0.15, 0.9])
    text, image = conditioning_dropout_masks(edges, 0.05)
    assert text.tolist() == [True, True, True, True, False, False, False, False]
    assert image.tolist() == [False, False, True, True, True, True, False, False]
    with pytest.raises(ValueError, match="conditioning_dropout_prob"):
        conditioning_dropout_masks(edges, 0.5)


def test_training_loss_replays_the_recipe_exactly(tiny_base: Path, frames) -> None:
    """Recompute one step by hand from the same generator stream: VAE sample x scaling for
    the target, VAE mode (unscaled) for the condition, v-target, text/image dropout."""
    model = DynamicsDiffusion.from_pretrained(tiny_base, conditioning_dropout_prob=0.3)
    first, last, instructions = frames
    images = torch.cat([first, first])
    targets = torch.cat([last, last])
    prompts = instructions + instructions
    seed = 11
    out = model.training_loss(images, targets, prompts, generator=seed)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        posterior = model.vae.encode(targets).latent_dist
        latents = posterior.sample(generator) * model.vae.config.scaling_factor
        condition = model.vae.encode(images).latent_dist.mode()
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (8,), generator=generator)
        uniform = torch.rand(8, generator=generator)
        drop_text = uniform < 0.6
        drop_image = (uniform >= 0.3) & (uniform < 0.9)
        assert drop_text.any() and (~drop_text).any() and drop_image.any()
        text, _ = model.encode_prompts(
            [("" if d else p) for d, p in zip(drop_text, prompts, strict=True)]
        )
        condition[drop_image] = 0.0
        noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = model.unet(torch.cat([noisy, condition], 1), timesteps, text).sample
        velocity = model.noise_scheduler.get_velocity(latents, noise, timesteps)

    assert torch.equal(out.timesteps, timesteps)
    assert torch.equal(out.drop_text, drop_text) and torch.equal(out.drop_image, drop_image)
    torch.testing.assert_close(out.target, velocity, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.prediction.detach(), prediction, rtol=1e-5, atol=1e-5)
    expected_loss = torch.mean((prediction - velocity) ** 2)
    torch.testing.assert_close(out.loss.detach(), expected_loss, rtol=1e-5, atol=1e-6)
    again = model.training_loss(images, targets, prompts, generator=seed)
    assert torch.equal(again.loss, out.loss)
    with pytest.raises(ValueError, match="instructions"):
        model.training_loss(images, targets, prompts[:3])


def test_a_few_steps_fit_a_fixed_batch(tiny_base: Path, frames) -> None:
    model = DynamicsDiffusion.from_pretrained(tiny_base)
    first, last, instructions = frames
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3, weight_decay=1e-2)
    frozen_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    losses = []
    for _ in range(12):
        loss = model.training_loss(first, last, instructions, generator=5).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(torch.equal(v, model.vae.state_dict()[k]) for k, v in frozen_before.items())


def test_features_do_not_depend_on_batch_or_order(model: DynamicsDiffusion, frames) -> None:
    first, _, instructions = frames
    seeds = [derive_seed("task", episode, 0) for episode in range(3)]
    batch = model.predict(first[:3], instructions[:3], seeds, FAST)
    shuffled = model.predict(
        first[[2, 0]], [instructions[2], instructions[0]], [seeds[2], seeds[0]], FAST
    )
    single = model.predict(first[1:2], instructions[1:2], seeds[1:2], FAST)
    assert batch.output_latents.shape == (3, 4, 16, 16)
    torch.testing.assert_close(
        shuffled.output_latents[0], batch.output_latents[2], rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        shuffled.output_latents[1], batch.output_latents[0], rtol=0, atol=1e-5
    )
    torch.testing.assert_close(single.output_latents[0], batch.output_latents[1], rtol=0, atol=1e-5)
    # Repeating a call gives the same result: no RNG state carries over between calls.
    torch.testing.assert_close(
        model.predict(first[:3], instructions[:3], seeds, FAST).output_latents,
        batch.output_latents,
        rtol=0,
        atol=0,
    )
    other_seed = model.predict(first[1:2], instructions[1:2], [seeds[1] + 1], FAST)
    assert (other_seed.output_latents - single.output_latents).abs().max() > 1e-3
    torch.testing.assert_close(batch.input_latents, model.encode_condition(first[:3]))


def test_predict_matches_the_pipeline_called_as_xicm_does(model: DynamicsDiffusion, frames):
    first, _, instructions = frames
    prediction = model.predict(first[:1], instructions[:1], [123], FAST, decode=True)
    pipe = model.pipeline()
    image01 = (first[:1] + 1.0) / 2.0  # X-ICM hands the pipeline img / 255
    reference = pipe(
        instructions[0],
        image=image01,
        num_inference_steps=FAST.num_inference_steps,
        image_guidance_scale=2.5,
        guidance_scale=2.5,
        generator=torch.Generator().manual_seed(123),
        output_type="latent",
    ).images
    torch.testing.assert_close(prediction.output_latents, reference, rtol=0, atol=1e-5)
    prompt_embeds = pipe._encode_prompt(instructions[0], model.device, 1, True)
    torch.testing.assert_close(prediction.prompt_bos[0], prompt_embeds[0][0, :])
    assert prediction.images.shape == (1, 3, 32, 32)
    assert prediction.images.min() >= -1.0 and prediction.images.max() <= 1.0
    torch.testing.assert_close(prediction.images, model.decode_latents(prediction.output_latents))


def test_export_unet_and_pipeline_reload_identically(
    tiny_base: Path, frames, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    model = DynamicsDiffusion.from_pretrained(tiny_base)
    first, last, instructions = frames
    optimiser = torch.optim.SGD(model.trainable_parameters(), lr=0.05)
    model.training_loss(first, last, instructions, generator=1).loss.backward()
    optimiser.step()  # weights now differ from the base model
    expected = model.predict(first[:2], instructions[:2], [4, 5], FAST)

    checkpoint = model.export_unet(tmp_path / "run", step=7)
    assert checkpoint == tmp_path / "run" / "checkpoint-7"
    assert (checkpoint / "unet" / "config.json").is_file()
    assert (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (checkpoint / "scheduler" / "scheduler_config.json").is_file()
    assert not (tmp_path / "run" / "checkpoint-7.partial").exists()
    xicm_unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")  # X-ICM's call
    assert xicm_unet.config.in_channels == 8
    for key, value in model.unet.state_dict().items():
        assert torch.equal(xicm_unet.state_dict()[key], value), key
    reloaded = DynamicsDiffusion.from_pretrained(tiny_base, unet=checkpoint)
    got = reloaded.predict(first[:2], instructions[:2], [4, 5], FAST)
    assert torch.equal(got.output_latents, expected.output_latents)

    pipeline_dir = model.save_pipeline(tmp_path / "pipeline")
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    from_dir = DynamicsDiffusion.from_pretrained(pipeline_dir)
    again = from_dir.predict(first[:2], instructions[:2], [4, 5], FAST)
    assert torch.equal(again.output_latents, expected.output_latents)
    assert torch.equal(again.prompt_bos, expected.prompt_bos)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(
        instructions[:2],
        image=(first[:2] + 1.0) / 2.0,
        num_inference_steps=FAST.num_inference_steps,
        image_guidance_scale=2.5,
        guidance_scale=2.5,
        generator=[torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)],
        output_type="latent",
    ).images
    torch.testing.assert_close(stock, expected.output_latents, rtol=0, atol=1e-5)


def test_loading_errors_name_the_path(tmp_path: Path, tiny_base: Path) -> None:
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="vae, text_encoder, tokenizer, scheduler"):
        DynamicsDiffusion.from_pretrained(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DynamicsDiffusion.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no UNet found"):
        resolve_unet_dir(tmp_path / "half")
    assert resolve_unet_dir(tiny_base) == tiny_base / "unet"
    assert resolve_unet_dir(tiny_base / "unet") == tiny_base / "unet"
    with pytest.raises(ValueError, match="unknown diffusers scheduler"):
        DynamicsDiffusion.from_pretrained(tiny_base, sample_scheduler="NoSuchScheduler")


def test_derived_seeds_are_stable_and_distinct() -> None:
    seeds = {derive_seed(task, episode, 0) for task in ("a", "b") for episode in range(50)}
    assert len(seeds) == 100
    assert derive_seed("a", 1, 0) == derive_seed("a", 1, 0)
    assert derive_seed("a", 1, 0) != derive_seed("a", 10)
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_fitting_the_tiny_vae_makes_it_reconstruct(tmp_path: Path, frames) -> None:
    import shutil

    from agnostos.models.tiny import fit_tiny_vae

    base = build_tiny_base(tmp_path / "sd")
    first, last, _ = frames
    images = ((torch.cat([first, last]) + 1.0) * 127.5).round().to(torch.uint8)
    untouched = {p.name: p.read_bytes() for p in (base / "unet").iterdir()}
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        fit = fit_tiny_vae(base, images, steps=40, batch_size=8, learning_rate=2e-3)
    assert fit.mse_after < fit.mse_before / 4
    assert {p.name: p.read_bytes() for p in (base / "unet").iterdir()} == untouched
    assert not list(tmp_path.glob("sd/vae.*"))  # no scratch folders left behind
    reloaded = DynamicsDiffusion.from_pretrained(base)
    assert reloaded.scaling_factor == pytest.approx(fit.scaling_factor)
    with torch.no_grad():
        posterior = reloaded.vae.encode(torch.cat([first, last])).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(1))
    # the diffusion target (a posterior sample times the factor) has unit variance
    assert (latents * fit.scaling_factor).std().item() == pytest.approx(1.0, abs=0.1)
    shutil.rmtree(base)
    with pytest.raises(ValueError, match="uint8"):
        fit_tiny_vae(tmp_path, images.float())
