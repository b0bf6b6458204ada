"""`agnostos eval scores RUN [RUN ...]`: the AGNOSTOS results table of evaluation runs.

  agnostos eval scores runs/xicm-7b
  agnostos eval scores runs/xicm-7b runs/xicm-72b --compare published
  agnostos eval scores runs/xicm-7b --json

A RUN is one of our run folders (run.json beside episodes*.jsonl) or an X-ICM result folder
(unseen_scores_<seed>.txt, <task>/seed<k>/test_data.csv). `--compare published` also writes
scores.md (our runs beside the published baselines) and scores.png (a bar chart).
Exit status: 0 done, 1 a folder holds no readable scores, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agnostos.cli_types import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error_message
from agnostos.evaluation.records import RecordsError
from agnostos.evaluation.scores import (
    ScoresError,
    ScoreTable,
    bar_chart,
    compare_table,
    format_table,
    load_scores,
    published_baselines,
    report_lines,
)

__all__ = ["BASELINES_NAME", "build_parser", "default_baselines", "run_scores"]

PROG = "agnostos eval scores"
BASELINES_NAME = "agnostos_published_baselines.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print the AGNOSTOS table (per task mean (std) over seeds, level-1, "
        "level-2 and averaged success rate, aggregated as X-ICM's gather_score.py) of each "
        "RUN, with every missing score and unevaluated episode listed.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="an evaluation run folder (run.json, episodes*.jsonl) or an X-ICM result folder "
        "(unseen_scores_<seed>.txt, <task>/seed<k>/test_data.csv)",
    )
    parser.add_argument(
        "--compare",
        choices=["published"],
        default=None,
        help="'published': add the published baselines and write scores.md (markdown table) "
        "and scores.png (bar chart) into --out",
    )
    parser.add_argument(
        "--baselines",
        type=Path,
        default=None,
        metavar="CSV",
        help=f"published baselines CSV for --compare (default: $AGNOSTOS_SHARED_DATA/"
        f"{BASELINES_NAME}, else ../shared/data/{BASELINES_NAME} from the current folder)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for scores.md and scores.png with --compare (default: the first RUN)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the tables as JSON, keyed by run name"
    )
    return parser


def default_baselines() -> list[Path]:
    """Where the published baselines CSV is looked for when --baselines is not given."""
    places = []
    if shared := os.environ.get("AGNOSTOS_SHARED_DATA"):
        places.append(Path(shared) / BASELINES_NAME)
    places.append(Path.cwd().parent / "shared" / "data" / BASELINES_NAME)
    return places


def _names(runs: Sequence[Path]) -> list[str]:
    """Column names: each folder's name, or the paths as given when two names are the same."""
    names = [run.resolve().name or str(run) for run in runs]
    return names if len(set(names)) == len(names) else [str(run) for run in runs]


def _usage(parser: argparse.ArgumentParser, message: str) -> int:
    try:
        parser.error(message)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    return EXIT_USAGE


def _markdown(tables: dict[str, ScoreTable], comparison: str) -> str:
    sections = ["# Scores", "", comparison]
    for name, table in tables.items():
        sections += [f"## {name}", "", f"- {table.source}"]
        sections += [f"- {line}" for line in report_lines(table)] + [""]
    return "\n".join(sections)


def _write_comparison(args: argparse.Namespace, tables: dict[str, ScoreTable]) -> list[Path]:
    """scores.md and scores.png; the baselines CSV is found first, so a bad one writes nothing."""
    baselines = published_baselines(args.baselines)
    out = args.out or args.runs[0]
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "scores.md"
    markdown.write_text(_markdown(tables, compare_table(tables, baselines)), encoding="utf-8")
    return [markdown, bar_chart(tables, baselines, out / "scores.png")]


def run_scores(argv: list[str]) -> int:
    """`agnostos eval scores ...` with the arguments after `scores`; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if not args.compare and (args.baselines or args.out):
        return _usage(parser, "--baselines and --out need --compare published")
    if args.compare and args.baselines is None:
        found = [path for path in default_baselines() if path.is_file()]
        if not found:
            looked = ", ".join(str(path) for path in default_baselines())
            return _usage(parser, f"no published baselines at {looked}; pass --baselines CSV")
        args.baselines = found[0]
    if args.compare and not args.baselines.is_file():
        return _usage(parser, f"--baselines {args.baselines}: no such file")
    try:
        runs = zip(_names(args.runs), args.runs, strict=True)
        tables = {name: load_scores(run) for name, run in runs}
        written = _write_comparison(args, tables) if args.compare else []
    except (ScoresError, RecordsError, OSError, ValueError) as error:
        print(f"{PROG}: error: {error_message(error)}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({name: table.to_json() for name, table in tables.items()}, indent=2))
    else:
        print("\n".join(format_table(table) for table in tables.values()), end="")
    for path in written:
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK
