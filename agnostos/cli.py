"""The `agnostos` command.

Subcommands:
  agnostos shards convert SRC OUT   RLBench episode folders -> WebDataset shards (resumable)
  agnostos shards verify OUT        re-hash and fully decode every shard
  agnostos shards info OUT          tasks, episodes, frames, bytes, cameras
  agnostos sim generate|render|tasks  minibench: scripted demos, scene views, task list
  agnostos fit --config YAML ...    train the dynamics model or fine-tune a VLA (LightningCLI)
  agnostos vla merge EXPORT --out DIR   merge a VLA's LoRA adapter into its base (CPU)
  agnostos eval --config YAML ...   evaluate an agent on stored test episodes; eval scores RUN
  agnostos bank build|info|import-pkl|export-pkl   the X-ICM demo bank
  agnostos demo [--config YAML]     the main job on minibench (see `agnostos.demo`)

Exit status, the same for every subcommand: 0 done, 1 the work failed (bad data, a failed
run), 2 bad usage or configuration. Settings are checked before any work starts (argument
types and choices in the parser, then each handler's own checks), so a bad one costs
nothing and leaves no output behind.

Heavy imports happen inside the handlers so `agnostos --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from agnostos.cli_types import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CsvChoices,
    csv,
    error_message,
    non_negative_int,
    positive_int,
)
from agnostos.evaluation.bank_cli import add_bank_commands

# Subcommands whose arguments go to LightningCLI unparsed.
LIGHTNING_COMMANDS = ("fit", "validate")


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
    convert.add_argument(
        "--tasks", type=csv, default=None, help="comma-separated task names (default: all in SRC)"
    )
    cameras = CsvChoices(CAMERAS, "camera")
    convert.add_argument(
        "--cameras",
        type=cameras,
        default=CAMERAS,
        help=f"comma-separated subset of {cameras.allowed()} (default: all five)",
    )
    modalities = CsvChoices(MODALITIES, "modality")
    convert.add_argument(
        "--modalities",
        type=modalities,
        default=MODALITIES,
        help=f"comma-separated subset of {modalities.allowed()} (default: all three)",
    )
    convert.add_argument(
        "--shard-size", type=_size, default="1GB", help="maximum shard size (e.g. 1GB, 512MiB)"
    )
    convert.add_argument("--workers", type=positive_int, default=1, help="episode reader processes")
    convert.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="stop at a bad episode, or leave it out and list it in the manifest",
    )
    convert.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    convert.add_argument(
        "--buffered-writes",
        action="store_true",
        help="write shards through the page cache instead of with direct I/O (same bytes; "
        "for file systems where direct I/O is slow, such as some network file systems)",
    )
    convert.set_defaults(handler=_shards_convert)

    verify = commands.add_parser("verify", help="check checksums, decoding and counts")
    verify.add_argument("out", type=Path, help="converted folder (with manifest.json)")
    verify.add_argument(
        "--workers", type=positive_int, default=1, help="shards verified in parallel"
    )
    verify.set_defaults(handler=_shards_verify)

    info = commands.add_parser("info", help="summarise a converted dataset")
    info.add_argument("out", type=Path, help="converted folder (with manifest.json)")
    info.set_defaults(handler=_shards_info)


def _size(text: str) -> int:
    """`--shard-size`: a byte count such as 1GB, refused at parse time when malformed."""
    from agnostos.shards.convert import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _shards_convert(args: argparse.Namespace) -> int:
    """Bad options and a missing SRC are usage errors (2), found before OUT is created;
    a conversion that fails on the data is 1."""
    from agnostos.shards.convert import ConvertError, ConvertOptions, convert

    def usage(message: str) -> int:
        print(f"agnostos shards convert: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        options = ConvertOptions(
            tasks=args.tasks,
            cameras=args.cameras,
            modalities=args.modalities,
            shard_size=args.shard_size,
            on_error=args.on_error,
        )
    except ValueError as err:
        return usage(str(err))
    if not args.src.is_dir():
        state = "is not a folder" if args.src.exists() else "does not exist"
        return usage(f"SRC: {args.src} {state}")
    if args.out.exists() and not args.out.is_dir():
        return usage(f"OUT: {args.out} exists and is not a folder")
    try:
        result = convert(
            args.src,
            args.out,
            options,
            workers=args.workers,
            show_progress=not args.no_progress,
            direct_io=not args.buffered_writes,
        )
    except (ConvertError, ValueError, KeyError, OSError) as err:
        print(f"agnostos shards convert: error: {error_message(err)}", file=sys.stderr)
        return EXIT_FAILED
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
        return EXIT_FAILED
    return EXIT_OK


def _shards_verify(args: argparse.Namespace) -> int:
    from agnostos.shards.verify import verify

    try:
        report = verify(args.out, workers=args.workers)
    except (FileNotFoundError, ValueError) as err:
        print(f"agnostos shards verify: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    for fault in report.faults:
        print(f"FAULT {fault}", file=sys.stderr)
    episodes = sum(shard.episodes for shard in report.shards)
    images = sum(shard.images for shard in report.shards)
    status = "OK" if report.ok else f"{len(report.faults)} fault(s)"
    print(
        f"{args.out}: {status}; {len(report.shards)} shards, {episodes} episodes, "
        f"{images} images decoded"
    )
    return EXIT_OK if report.ok else EXIT_FAILED


def _shards_info(args: argparse.Namespace) -> int:
    from agnostos.shards.manifest import Manifest
    from agnostos.shards.verify import format_info

    try:
        print(format_info(Manifest.load(args.out)))
    except (FileNotFoundError, ValueError) as err:
        print(f"agnostos shards info: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _add_sim_commands(subparsers: argparse._SubParsersAction) -> None:
    from agnostos.tasks import MINIBENCH

    sim = subparsers.add_parser("sim", help="minibench, the embedded MuJoCo benchmark")
    commands = sim.add_subparsers(dest="sim_command", required=True)

    generate = commands.add_parser(
        "generate",
        help="write scripted demos in RLBench's on-disk layout",
        description="Record scripted minibench demos into OUT/<task>/all_variations/episodes/ "
        "(RLBench layout: 15 image folders, low_dim_obs.pkl, variation pickles). Resumes: "
        "episodes already written are kept.",
    )
    tasks = _minibench_tasks()
    generate.add_argument(
        "--tasks",
        type=tasks,
        default=MINIBENCH.seen,
        help=f"seen, unseen, all, or comma-separated task names: {', '.join(tasks.choices)} "
        "(default: seen)",
    )
    generate.add_argument("--episodes", type=positive_int, required=True, help="episodes per task")
    generate.add_argument(
        "--out", type=Path, required=True, help="dataset root (one folder per task)"
    )
    generate.add_argument("--seed", type=int, default=0, help="selects a different set of scenes")
    generate.add_argument(
        "--image-size", type=positive_int, default=128, help="square camera size in pixels"
    )
    generate.add_argument("--workers", type=positive_int, default=1, help="recording processes")
    generate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    generate.set_defaults(handler=_sim_generate)

    render = commands.add_parser("render", help="save the five camera views of a task's scene")
    render.add_argument(
        "task",
        choices=MINIBENCH.all_tasks,
        metavar="TASK",
        help=f"one of {', '.join(MINIBENCH.all_tasks)}",
    )
    render.add_argument(
        "--variation", type=non_negative_int, default=0, help="task variation (from 0)"
    )
    render.add_argument(
        "--episode", type=non_negative_int, default=0, help="episode number: picks the scene"
    )
    render.add_argument(
        "--image-size", type=positive_int, default=128, help="square camera size in pixels"
    )
    render.add_argument("--out", type=Path, required=True, help="PNG file to write")
    render.set_defaults(handler=_sim_render)

    tasks = commands.add_parser("tasks", help="list minibench tasks with split and level")
    tasks.set_defaults(handler=_sim_tasks)


def _minibench_tasks() -> CsvChoices:
    """`--tasks` of `sim generate`: minibench task names, or the words seen, unseen, all."""
    from agnostos.tasks import MINIBENCH

    groups = {"seen": MINIBENCH.seen, "unseen": MINIBENCH.unseen, "all": MINIBENCH.all_tasks}
    return CsvChoices(MINIBENCH.all_tasks, "minibench task", groups)


def _sim_generate(args: argparse.Namespace) -> int:
    """Bad arguments (an unknown task, a count below 1) are usage errors (2), refused before
    anything is written; a scripted run that fails is 1."""
    from agnostos.envs.minibench.generate import check_generate_arguments, generate

    try:
        check_generate_arguments(args.tasks, args.episodes, args.image_size, args.workers)
    except (KeyError, ValueError) as err:
        print(f"agnostos sim generate: error: {error_message(err)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = generate(
            args.tasks,
            args.episodes,
            args.out,
            seed=args.seed,
            image_size=args.image_size,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        print(f"agnostos sim generate: error: {error_message(err)}", file=sys.stderr)
        return EXIT_FAILED
    for task, record in summary.items():
        print(
            f"{task}: {record.written} written, {record.already_present} already present, "
            f"{record.failed_attempts} failed scripted attempts retried"
        )
    return EXIT_OK


def _sim_render(args: argparse.Namespace) -> int:
    """A variation the task does not have is a usage error (2), checked before the scene
    is built; a render that fails is 1."""
    from agnostos.envs.minibench.render import render_task
    from agnostos.envs.minibench.tasks import TASKS

    try:
        TASKS[args.task].check_variation(args.variation)
    except ValueError as err:
        print(f"agnostos sim render: error: --variation: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = render_task(args.task, args.out, args.variation, args.episode, args.image_size)
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        print(f"agnostos sim render: error: {error_message(err)}", file=sys.stderr)
        return EXIT_FAILED
    print(path)
    return EXIT_OK


def _sim_tasks(args: argparse.Namespace) -> int:
    from agnostos.envs.minibench.tasks import TASKS
    from agnostos.tasks import MINIBENCH

    print(f"{'task':<24} {'split':<7} {'level':<7} variations  instruction (variation 0)")
    for name in MINIBENCH.all_tasks:
        split = MINIBENCH.split_of(name)
        level = MINIBENCH.level_of(name) if split == "unseen" else "-"
        task = TASKS[name]
        print(f"{name:<24} {split:<7} {level:<7} {task.variations:>10}  {task.descriptions(0)[0]}")
    return EXIT_OK


# `agnostos demo` flags that override a count in the demo YAML: (flag, help).
_DEMO_COUNTS = (
    ("seen-episodes", "demos per seen task (the bank)"),
    ("unseen-episodes", "demos per unseen task (the queries)"),
    ("vae-steps", "steps fitting the tiny base's autoencoder"),
    ("train-steps", "dynamics-model training steps"),
    ("batch-size", "training batch size"),
    ("sampling-steps", "denoising steps for bank and query features"),
    ("top-k", "demos retrieved per query"),
    ("workers", "demo-generation processes and evaluation workers"),
    ("eval-episodes", "stored test episodes per unseen task for the X-ICM evaluation"),
    ("eval-max-steps", "keyframe steps per evaluation episode"),
    ("llm-max-new-tokens", "new tokens per LLM reply"),
    ("vla-steps", "LoRA fine-tuning steps of the tiny VLA"),
)


def _add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    from agnostos.tasks import MINIBENCH

    demo = subparsers.add_parser(
        "demo",
        help="run the main jobs: minibench demos -> shards -> dynamics model -> bank -> "
        "retrieval -> X-ICM evaluation; VLA fine-tuning and evaluation",
        description="Generate minibench demos of the seen and unseen tasks, convert them to "
        "shards, train the tiny dynamics diffusion model, build the demo bank and report the "
        "top-K demos retrieved for every unseen-task demo, then evaluate X-ICM with the embedded "
        "LLM on the unseen tasks; LoRA-fine-tune the tiny VLA on the seen shards (with rollouts "
        "during training) and evaluate it on the same unseen tasks. Resumes where it stopped. "
        "Settings "
        "come from --config (default configs/demo.yaml); flags override them.",
    )
    demo.add_argument(
        "--config",
        type=Path,
        default=None,
        help="demo YAML (default: the installed configs/demo.yaml)",
    )
    demo.add_argument("--out", default=None, help="working folder (runs/demo)")
    for flag, text in _DEMO_COUNTS:
        demo.add_argument(f"--{flag}", type=positive_int, default=None, help=text)
    demo.add_argument("--seed", type=int, default=None, help="selects other scenes and seeds")
    for split, known in (("seen", MINIBENCH.seen), ("unseen", MINIBENCH.unseen)):
        tasks = CsvChoices(known, f"{split} task")
        demo.add_argument(
            f"--{split}-tasks",
            type=tasks,
            default=None,
            help=f"comma-separated subset of {tasks.allowed()} (default: all)",
        )
    from agnostos.evaluation.rankers import RANKER_NAMES  # numpy only: --help stays fast

    demo.add_argument(
        "--ranker",
        choices=RANKER_NAMES,
        default=None,
        help="lang_vis_out (X-ICM's ranking, also spelt lang_vis.out), cosine or random",
    )
    demo.add_argument(
        "--llm", default=None, help="the evaluation's LLM: smollm2, a model folder or a .gguf"
    )
    demo.add_argument("--no-wandb", action="store_true", help="skip the offline W&B runs")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from agnostos.demo import DEMO_CONFIG, DemoConfig, run_demo

    overrides = {
        name: getattr(args, name)
        for name in ("out", "seen_episodes", "unseen_episodes", "vae_steps", "train_steps",
                     "batch_size", "sampling_steps", "top_k", "workers", "seed", "ranker",
                     "seen_tasks", "unseen_tasks", "eval_episodes", "eval_max_steps",
                     "llm", "llm_max_new_tokens", "vla_steps")
    }  # fmt: skip
    if args.no_wandb:
        overrides["wandb"] = False
    if args.no_progress:
        overrides["progress"] = False
    config_path = args.config or DEMO_CONFIG
    try:
        config = DemoConfig.from_yaml(config_path, **overrides)
    except ValueError as error:
        print(f"agnostos demo: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    run_demo(config)
    return EXIT_OK


def _add_vla_commands(subparsers: argparse._SubParsersAction) -> None:
    vla = subparsers.add_parser("vla", help="fine-tuned VLA exports")
    commands = vla.add_subparsers(dest="vla_command", required=True)
    merge = commands.add_parser(
        "merge",
        help="merge a LoRA adapter export into its base model, on the CPU",
        description="Write a full-weight export (the base with the adapter merged in, the "
        "processor, the codec and the model card) that `agnostos eval ... agent: vla` and "
        "VLAPolicy.from_export read like the adapter export. Runs on the CPU, so merging a "
        "7B model never needs a second GPU copy of it.",
    )
    merge.add_argument("export", type=Path, help="an adapter export folder (export/step-<N>)")
    merge.add_argument("--out", type=Path, required=True, help="the merged export's folder")
    merge.add_argument(
        "--base", type=Path, default=None,
        help="base model directory, overriding the one the export names",
    )  # fmt: skip
    merge.set_defaults(handler=_vla_merge)


def _vla_merge(args: argparse.Namespace) -> int:
    if not (args.export / "vla.json").is_file():
        print(f"agnostos vla merge: error: {args.export} is not a VLA export (no vla.json)",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if args.out.exists():
        print(f"agnostos vla merge: error: --out {args.out} exists; choose a new folder",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    from agnostos.models.vla import VLAError, merge_export

    try:
        path = merge_export(args.export, args.out, base=args.base)
    except VLAError as error:
        print(f"agnostos vla merge: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"merged {args.export} into {path}")
    return EXIT_OK


def _add_fit_commands(subparsers: argparse._SubParsersAction) -> None:
    """Listed for --help only: `main` hands these arguments to LightningCLI untouched."""
    for name, text in (
        ("fit", "train the dynamics model or a VLA (LightningCLI: --config, --trainer.*, ...)"),
        ("validate", "validate a dynamics or VLA checkpoint (LightningCLI)"),
        ("eval", "evaluate an agent on stored test episodes; `eval scores RUN` prints scores"),
    ):
        subparsers.add_parser(name, help=text, add_help=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agnostos", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_shards_commands(subparsers)
    _add_sim_commands(subparsers)
    _add_fit_commands(subparsers)
    _add_vla_commands(subparsers)
    add_bank_commands(subparsers)
    _add_demo_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit status (see `agnostos.cli_types`).

    argparse ends a bad command line (and --help) with SystemExit; that status is returned
    like every handler's, so callers (and `agnostos fit`, whose LightningCLI does the same)
    see one convention: 0 done, 1 the work failed, 2 bad usage or configuration.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from agnostos.trainers.cli import run_fit

        return run_fit(argv)
    if argv and argv[0] == "eval":
        from agnostos.evaluation.cli import run_eval

        return run_eval(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return _exit_status(stop)
    return args.handler(args)


def _exit_status(stop: SystemExit) -> int:
    code = stop.code
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
