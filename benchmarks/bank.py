"""Bank extraction throughput: batched feature extraction vs one demo at a time.

Why: X-ICM computes diffusion features one image per pipeline call; a bank of the ~3,600
seen-task demos needs 50 sampling steps x 3 guidance branches per demo, so batching is the
main lever on build time. This script measures `build_bank` (the whole path: shard
reading, image preparation, the model, chunk writes and the final files) on the same demos
with the same sampling steps, at --batch-size and at batch 1 (the X-ICM way), and reports
demos/s and the speed-up.

Models:
* `--model-size tiny` (default): the tiny SD-shaped config of `agnostos.models.tiny`
  (32 px, 4x16x16 latents), CPU by default;
* `--model-size sd2`: an SD2-768-size UNet (8 input channels), SD2 VAE and a 23-layer,
  1024-wide CLIP text tower built from configs with random weights (nothing downloaded),
  at 128 px; meant for `--device cuda` (on a CPU one demo takes minutes).

Input: synthetic RLBench episodes (`agnostos.shards.synthetic`) converted to shards; demo
text is off so the model is what is measured. Each mode runs once untimed (warm-up), then
--repeats timed runs in alternating order into fresh folders; the best run is reported and
all runs are listed.

    python benchmarks/bank.py [--demos 32] [--steps 50] [--batch-size 16] [--repeats 2]
                              [--device cpu|cuda] [--model-size tiny|sd2] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from machine import machine_facts

from agnostos.evaluation.bank import (
    BankBuildConfig,
    ModelIdentity,
    build_bank,
    load_model,
    model_resolution,
)
from agnostos.models.dynamics_diffusion import DynamicsDiffusion, SamplingConfig
from agnostos.models.tiny import END_TOKEN, build_tiny_base, write_clip_tokenizer_files
from agnostos.shards.convert import ConvertOptions, convert
from agnostos.shards.synthetic import write_synthetic_dataset


def sd2_sized_model(device: str, dtype: torch.dtype, workdir: Path) -> DynamicsDiffusion:
    """SD2-768-size components from configs, random weights, built on `device`."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_dir = write_clip_tokenizer_files(workdir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(
        tokenizer_dir, model_max_length=77, pad_token=END_TOKEN
    )
    scheduler_config = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "v_prediction",
    }
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=96,
            in_channels=8,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=True,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=1024,
                intermediate_size=4096,
                num_attention_heads=16,
                num_hidden_layers=23,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=512,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    sampler = DDIMScheduler(**scheduler_config)
    model = DynamicsDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler.from_config(sampler.config),
        sample_scheduler=sampler,
    )
    return model.to(dtype=dtype).eval()


def make_model(args: argparse.Namespace, workdir: Path) -> tuple[Any, ModelIdentity, int]:
    """(model, identity, resolution) for the chosen size: the tiny model's own 32 px, and
    X-ICM's 128 px for the SD2-size one (its UNet config declares SD2's 768)."""
    if args.model_size == "tiny":
        base = build_tiny_base(workdir / "tiny-sd")
        model, identity = load_model(base, device=args.device, dtype=args.dtype)
        return model, identity, model_resolution(model)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    model = sd2_sized_model(args.device, dtype[args.dtype], workdir)
    identity = ModelIdentity(None, None, None, "SD2-768-size config, random weights")
    return model, identity, 128


def make_shards(demos: int, image_size: int, workdir: Path) -> Path:
    per_task = (demos + 1) // 2
    write_synthetic_dataset(workdir / "episodes", episodes_per_task=per_task, image_size=image_size)
    out = workdir / "shards"
    convert(workdir / "episodes", out, ConvertOptions(), show_progress=False)
    return out


def timed_build(
    model: Any,
    identity: ModelIdentity,
    config: BankBuildConfig,
    out: Path,
    device: str,
    max_chunks: int | None = None,
) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = build_bank(config, model, identity, out, progress=False, max_chunks=max_chunks)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return seconds, result.demos_done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demos", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (X-ICM: 50)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--model-size", choices=("tiny", "sd2"), default="tiny")
    parser.add_argument("--gpu", action="store_true", help="shorthand for --device cuda")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path("/tmp/bank_benchmark.json"))
    args = parser.parse_args(argv)
    if args.gpu:
        args.device = "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="agnostos-bank-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model, identity, resolution = make_model(args, workdir)
        shards = make_shards(args.demos, 32 if args.model_size == "tiny" else 128, workdir)
        sampling = SamplingConfig(num_inference_steps=args.steps)
        modes = {
            f"batched (batch {args.batch_size})": args.batch_size,
            "one at a time (batch 1, X-ICM)": 1,
        }
        configs = {
            name: BankBuildConfig(
                shards=str(shards),
                batch_size=batch,
                chunk_size=max(args.demos, 1),
                sampling=sampling,
                resolution=resolution,
                demo_text="off",
            )
            for name, batch in modes.items()
        }
        runs: dict[str, list[float]] = {name: [] for name in modes}
        counted = 0
        for config in configs.values():  # warm-up (one batch): lazy inits, allocator, caches
            warm = dataclasses.replace(config, chunk_size=config.batch_size)
            timed_build(model, identity, warm, workdir / "warm", args.device, max_chunks=1)
        for repeat in range(args.repeats):
            order = list(configs) if repeat % 2 == 0 else list(reversed(configs))
            for name in order:
                seconds, counted = timed_build(
                    model, identity, configs[name], workdir / "bank", args.device
                )
                runs[name].append(seconds)
        results: dict[str, Any] = {}
        for name in modes:
            best = min(runs[name])
            results[name] = {
                "best_seconds": round(best, 3),
                "demos_per_second": round(counted / best, 3),
                "runs_seconds": [round(value, 3) for value in runs[name]],
            }
        batched, single = (results[name]["demos_per_second"] for name in modes)
        report = {
            "what": "build_bank throughput, same demos and sampling steps",
            "model_size": args.model_size,
            "device": args.device,
            "dtype": args.dtype,
            "demos": counted,
            "steps": args.steps,
            "resolution": resolution,
            "torch_threads": torch.get_num_threads(),
            "results": results,
            "speed_up": round(batched / single, 2),
            "load_average": os.getloadavg(),
            "machine": machine_facts(
                torch=torch.__version__,
                diffusers=diffusers.__version__,
                transformers=transformers.__version__,
                gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else "none",
            ),
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("| mode | demos/s | best s | runs (s) |\n|---|---:|---:|---|")
    for name, row in results.items():
        runs_text = ", ".join(f"{value:.2f}" for value in row["runs_seconds"])
        print(
            f"| {name} | {row['demos_per_second']:.2f} | {row['best_seconds']:.2f} | {runs_text} |"
        )
    print(f"speed-up: {report['speed_up']}x")
    print(json.dumps(report, indent=2))
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
