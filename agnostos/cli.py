"""The `agnostos` command.

Subcommands:
  agnostos shards convert SRC OUT   RLBench episode folders -> WebDataset shards (resumable)
  agnostos shards verify OUT        re-hash and fully decode every shard
  agnostos shards info OUT          tasks, episodes, frames, bytes, cameras
  agnostos demo [--out DIR]         the main job on the built-in data (see `run_demo`)

Heavy imports happen inside the handlers so `agnostos --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _add_shards_commands(subparsers: argparse._SubParsersAction) -> None:
    from agnostos.shards.episode import CAMERAS, MODALITIES

    shards = subparsers.add_parser("shards", help="convert, verify and inspect shards")
    commands = shards.add_subparsers(dest="shards_command", required=True)

    convert = commands.add_parser(
        "convert",
        help="convert RLBench episode folders into WebDataset shards",
        description="Convert <SRC>/<task>/{all_variations,variation<K>}/episodes/episode<N>/ "
        "into deterministic, resumable WebDataset shards plus manifest.json in OUT.",
    )
    convert.add_argument("src", type=Path, help="dataset root holding one folder per task")
    convert.add_argument("out", type=Path, help="output folder for shards and manifest.json")
    convert.add_argument("--tasks", type=_csv, default=None, help="comma-separated task names")
    convert.add_argument("--cameras", type=_csv, default=CAMERAS, help="default: all five")
    convert.add_argument(
        "--modalities", type=_csv, default=MODALITIES, help="subset of rgb,depth,mask"
    )
    convert.add_argument("--shard-size", default="1GB", help="maximum shard size (e.g. 1GB)")
    convert.add_argument("--workers", type=int, default=1, help="episode reader processes")
    convert.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="stop at a bad episode, or leave it out and list it in the manifest",
    )
    convert.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    convert.set_defaults(handler=_shards_convert)

    verify = commands.add_parser("verify", help="check checksums, decoding and counts")
    verify.add_argument("out", type=Path)
    verify.add_argument("--workers", type=int, default=1, help="shards verified in parallel")
    verify.set_defaults(handler=_shards_verify)

    info = commands.add_parser("info", help="summarise a converted dataset")
    info.add_argument("out", type=Path)
    info.set_defaults(handler=_shards_info)


def _shards_convert(args: argparse.Namespace) -> int:
    from agnostos.shards.convert import ConvertError, ConvertOptions, convert, parse_size

    try:
        options = ConvertOptions(
            tasks=args.tasks,
            cameras=args.cameras,
            modalities=args.modalities,
            shard_size=parse_size(args.shard_size),
            on_error=args.on_error,
        )
        result = convert(
            args.src, args.out, options, workers=args.workers, show_progress=not args.no_progress
        )
    except (ConvertError, ValueError, FileNotFoundError) as err:
        print(f"agnostos shards convert: error: {err}", file=sys.stderr)
        return 1
    totals = result.manifest.totals
    if result.already_complete:
        print(f"{args.out}: already complete ({totals['episodes']} episodes); nothing to do")
    else:
        resumed = f", resumed at episode {result.resumed_from}" if result.resumed_from else ""
        print(
            f"{args.out}: {totals['episodes']} episodes in {totals['shards']} shards "
            f"({totals['bytes'] / 1e6:.1f} MB), {totals['skipped']} skipped{resumed}"
        )
    for skipped in result.manifest.skipped:
        print(f"skipped {skipped.source}: {skipped.reason}", file=sys.stderr)
    if totals["episodes"] == 0:
        print("agnostos shards convert: error: no episode could be converted", file=sys.stderr)
        return 1
    return 0


def _shards_verify(args: argparse.Namespace) -> int:
    from agnostos.shards.verify import verify

    try:
        report = verify(args.out, workers=args.workers)
    except (FileNotFoundError, ValueError) as err:
        print(f"agnostos shards verify: error: {err}", file=sys.stderr)
        return 1
    for fault in report.faults:
        print(f"FAULT {fault}", file=sys.stderr)
    episodes = sum(shard.episodes for shard in report.shards)
    images = sum(shard.images for shard in report.shards)
    status = "OK" if report.ok else f"{len(report.faults)} fault(s)"
    print(
        f"{args.out}: {status}; {len(report.shards)} shards, {episodes} episodes, "
        f"{images} images decoded"
    )
    return 0 if report.ok else 1


def _shards_info(args: argparse.Namespace) -> int:
    from agnostos.shards.manifest import Manifest
    from agnostos.shards.verify import format_info

    try:
        print(format_info(Manifest.load(args.out)))
    except (FileNotFoundError, ValueError) as err:
        print(f"agnostos shards info: error: {err}", file=sys.stderr)
        return 1
    return 0


def _add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the main job on the built-in data",
        description="Write the built-in episodes in RLBench layout, convert them to shards, "
        "verify the shards and print their summary.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="working folder")
    demo.add_argument("--episodes-per-task", type=int, default=4)
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from agnostos.shards.convert import ConvertOptions, convert
    from agnostos.shards.synthetic import write_synthetic_dataset
    from agnostos.shards.verify import format_info, verify

    episodes_dir, shards_dir = args.out / "episodes", args.out / "shards"
    if not episodes_dir.exists():
        write_synthetic_dataset(episodes_dir, episodes_per_task=args.episodes_per_task)
    result = convert(episodes_dir, shards_dir, ConvertOptions(shard_size=200_000))
    report = verify(shards_dir)
    print(format_info(result.manifest))
    for fault in report.faults:
        print(f"FAULT {fault}", file=sys.stderr)
    print(f"\nverify: {'OK' if report.ok else 'FAILED'} ({shards_dir})")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agnostos", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_shards_commands(subparsers)
    _add_demo_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
