"""`agnostos bank ...`: build, inspect, import and export X-ICM demo banks.

  agnostos bank build --shards DIR_OR_URLS --model PATH [--base DIR] --out DIR
  agnostos bank info DIR
  agnostos bank import-pkl all_diffusion_features.pkl --out DIR
  agnostos bank export-pkl DIR all_diffusion_features.pkl

`add_bank_commands(subparsers)` adds the `bank` group to the `agnostos` parser; every
subcommand sets `handler`, a function of the parsed arguments returning the exit status.
Heavy imports (torch, diffusers) happen inside the handlers so `agnostos --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agnostos.cli_types import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CsvChoices,
    csv,
    error_message,
    positive_int,
)

__all__ = [
    "add_bank_commands",
    "bank_build",
    "bank_export_pkl",
    "bank_import_pkl",
    "bank_info",
]

# agnostos.evaluation.bank.DEMO_TEXT_MODES, repeated so that building the parser imports no torch.
DEMO_TEXT_MODES = ("required", "optional", "off")


def _fail(command: str, error: BaseException) -> int:
    """One error line (a KeyError's text without its repr quotes, see `error_message`)."""
    print(f"agnostos bank {command}: error: {error_message(error)}", file=sys.stderr)
    return EXIT_FAILED


def add_bank_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `bank build|info|import-pkl|export-pkl` to an `agnostos` subparser set."""
    from agnostos.observation_text import DEFAULT_CAMERAS
    from agnostos.shards.episode import CAMERAS
    from agnostos.tasks import SUITES

    bank = subparsers.add_parser("bank", help="build and inspect X-ICM demo banks")
    commands = bank.add_subparsers(dest="bank_command", required=True)

    build = commands.add_parser(
        "build",
        help="extract diffusion features and demo text of seen-task episodes",
        description="Run every episode's query image (camera frame 0) and first instruction "
        "through the dynamics model, batched with per-demo seeds, and store the features "
        "(features.safetensors), metadata and X-ICM demo text (bank.json) in OUT. Chunks "
        "are written atomically; rerunning the same command resumes an interrupted build.",
    )
    build.add_argument(
        "--shards",
        required=True,
        help="converted shard folder (with manifest.json), or shard URLs (brace pattern, "
        "'::'-separated list, pipe: commands)",
    )
    build.add_argument("--manifest", default=None, help="manifest.json for URL-given shards")
    build.add_argument(
        "--model",
        required=True,
        type=Path,
        help="exported pipeline directory, or an exported checkpoint-<step> folder (with --base)",
    )
    build.add_argument(
        "--base", type=Path, default=None, help="Stable Diffusion base for a checkpoint"
    )
    build.add_argument("--out", required=True, type=Path, help="bank folder to write")
    build.add_argument(
        "--batch-size", type=positive_int, default=16, help="demos through the model at once"
    )
    build.add_argument(
        "--chunk-size", type=positive_int, default=256, help="demos per resumable chunk"
    )
    build.add_argument("--seed", type=int, default=0, help="base of the per-demo seeds")
    build.add_argument("--steps", type=positive_int, default=50, help="sampling steps (X-ICM: 50)")
    build.add_argument("--guidance", type=float, default=2.5, help="text guidance (X-ICM: 2.5)")
    build.add_argument(
        "--image-guidance", type=float, default=2.5, help="image guidance (X-ICM: 2.5)"
    )
    build.add_argument(
        "--camera", choices=CAMERAS, default="front", help="query image camera (X-ICM: front)"
    )
    build.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="square query size in pixels; default: the model's resolution, its UNet's "
        "sample_size times the VAE factor (exports of `agnostos fit` declare the size they "
        "were trained at: 128 for the SD2 recipe). The published X-ICM checkpoint keeps "
        "SD2 768-v's 768 there: pass 128 with it, as X-ICM does",
    )
    build.add_argument("--tasks", type=csv, default=None, help="comma-separated task names")
    build.add_argument(
        "--demo-text",
        choices=DEMO_TEXT_MODES,
        default="optional",
        help="required: fail when a demo's text cannot be made; optional: store None and "
        "the reason; off: skip",
    )
    build.add_argument(
        "--suite",
        default="agnostos",
        choices=sorted(SUITES),
        help="task suite whose object-name maps the text uses",
    )
    build.add_argument(
        "--text-cameras",
        type=CsvChoices(CAMERAS, "camera"),
        default=DEFAULT_CAMERAS,
        help=f"cameras averaged for object positions, from {', '.join(CAMERAS)} (X-ICM: all five)",
    )
    build.add_argument(
        "--save-images", action="store_true", help="also write decoded predictions as PNG"
    )
    build.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    build.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="the model's weight dtype",
    )
    build.add_argument(
        "--max-chunks",
        type=positive_int,
        default=None,
        help="stop after writing this many chunks (rerun to resume)",
    )
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.set_defaults(handler=bank_build)

    info = commands.add_parser("info", help="summarise a bank folder")
    info.add_argument("bank", type=Path, help="bank folder (bank.json, features.safetensors)")
    info.set_defaults(handler=bank_info)

    importer = commands.add_parser(
        "import-pkl",
        help="convert X-ICM's all_diffusion_features.pkl into a bank folder",
        description="Read the published pickle with an allowlist unpickler (numpy arrays "
        "and builtins only) and write features.safetensors + bank.json.",
    )
    importer.add_argument("pkl", type=Path, help="X-ICM's all_diffusion_features.pkl")
    importer.add_argument("--out", required=True, type=Path, help="bank folder to write")
    importer.set_defaults(handler=bank_import_pkl)

    exporter = commands.add_parser(
        "export-pkl", help="write a bank as X-ICM's all_diffusion_features.pkl"
    )
    exporter.add_argument("bank", type=Path, help="bank folder to export")
    exporter.add_argument("pkl", type=Path, help="pickle file to write")
    exporter.add_argument(
        "--root",
        default=None,
        help="dataset root for all_demo_paths (default: data/seen_tasks/train for built "
        "banks, the original paths for imported ones)",
    )
    exporter.set_defaults(handler=bank_export_pkl)


def bank_build(args: argparse.Namespace) -> int:
    """Handler of `agnostos bank build`."""
    from agnostos.evaluation.bank import BankBuildConfig, BankError, build_bank, load_model
    from agnostos.models.dynamics_diffusion import SamplingConfig

    try:  # settings first: a bad one is usage (2), before any model is loaded
        config = BankBuildConfig(
            shards=args.shards,
            manifest=args.manifest,
            tasks=args.tasks,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            seed=args.seed,
            sampling=SamplingConfig(
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                image_guidance_scale=args.image_guidance,
            ),
            camera=args.camera,
            resolution=args.resolution,
            demo_text=args.demo_text,
            suite=args.suite,
            text_cameras=args.text_cameras,
            save_images=args.save_images,
        )
    except (BankError, ValueError) as error:
        print(f"agnostos bank build: error: {error_message(error)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        model, identity = load_model(args.model, args.base, args.device, args.dtype)
        result = build_bank(
            config,
            model,
            identity,
            args.out,
            progress=not args.no_progress,
            max_chunks=args.max_chunks,
        )
    except (BankError, FileNotFoundError, ValueError, KeyError) as error:
        return _fail("build", error)
    if result.already_complete:
        print(f"{args.out}: already complete ({result.demos_done} demos); nothing to do")
    elif not result.complete:
        print(
            f"{args.out}: stopped after {result.chunks_done} chunk(s), {result.demos_done} "
            "demos; rerun the same command to resume"
        )
    else:
        bank = result.bank
        texts = sum(record.demo_text is not None for record in bank.records)
        resumed = f", resumed after {result.resumed_from} demos" if result.resumed_from else ""
        print(
            f"{args.out}: {len(bank)} demos in {result.chunks_done} chunk(s){resumed}; "
            f"demo text for {texts}; queries at {bank.extraction.resolution} px"
        )
    return EXIT_OK


def bank_info(args: argparse.Namespace) -> int:
    """Handler of `agnostos bank info`."""
    from agnostos.evaluation.bank import BankError, DemoBank, format_bank_info

    try:
        print(format_bank_info(DemoBank.load(args.bank)))
    except (BankError, FileNotFoundError) as error:
        return _fail("info", error)
    return EXIT_OK


def bank_import_pkl(args: argparse.Namespace) -> int:
    """Handler of `agnostos bank import-pkl`."""
    from agnostos.evaluation.bank import BankError, DemoBank

    try:
        bank = DemoBank.import_xicm_pkl(args.pkl)
        bank.save(args.out)
    except (BankError, FileNotFoundError) as error:
        return _fail("import-pkl", error)
    print(f"{args.out}: {len(bank)} demos imported from {args.pkl}")
    return EXIT_OK


def bank_export_pkl(args: argparse.Namespace) -> int:
    """Handler of `agnostos bank export-pkl`."""
    from agnostos.evaluation.bank import BankError, DemoBank

    try:
        bank = DemoBank.load(args.bank)
        path = bank.export_xicm_pkl(args.pkl, root=args.root)
    except (BankError, FileNotFoundError) as error:
        return _fail("export-pkl", error)
    print(f"{path}: {len(bank)} demos in X-ICM's all_diffusion_features.pkl layout")
    return EXIT_OK
