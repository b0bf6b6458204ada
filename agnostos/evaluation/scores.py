"""Scores: success rates per task, per level and per run, aggregated as X-ICM's gather_score.py.

Two kinds of folder hold results:

- our evaluation runs: `run.json` (the `RunPlan`) beside `episodes*.jsonl` (the records);
- X-ICM's own result folders: `unseen_scores_<seed>.txt` (one `task: score` line per task,
  then `averaged success rate: X`) and/or `<task>/seed<k>/test_data.csv` episode logs.

The aggregation is exactly gather_score.py's, so our numbers and the published ones are
comparable: a (task, seed) scores 100 * successes / episodes; a task's score is the mean
and population std (ddof=0) over seeds; a level's (and the overall) score is the mean and
population std over seeds of each seed's average over the level's (all) tasks.

Unlike gather_score, nothing is ever a silent 0. An episode that could not be evaluated
(status "error") counts as a failure, as X-ICM counts it, and is reported; a missing
(task, seed), episode or log is listed. Averages then use the tasks that have a score in
every seed that has any score (so every seed averages the same tasks and the std means
something), and the table says how many of the level's tasks that is.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agnostos.evaluation.records import (
    PLAN_NAME,
    RECORDS_GLOB,
    EpisodeKey,
    EpisodeRecord,
    RunPlan,
    read_records,
)
from agnostos.tasks import AGNOSTOS, AGNOSTOS_SHORT_NAMES, SUITES, TaskSuite

__all__ = [
    "Average",
    "ScoreTable",
    "ScoresError",
    "TaskScore",
    "bar_chart",
    "compare_table",
    "format_table",
    "load_scores",
    "published_baselines",
    "read_xicm_results",
    "report_lines",
    "score_records",
]

SCORES_TXT = re.compile(r"unseen_scores_(\d+)\.txt")
SEED_DIR = re.compile(r"seed(\d+)")
FINISHED = re.compile(r"^Finished (\S+) \| Final Score: (.*?)\s*$")
EPISODE = re.compile(r"^Evaluating (\S+) \| Episode (\d+) \| Step: (\d+) \| Score: ([^|\s]+)")
TOLERANCE = 0.006  # gather_score writes two decimals; a larger difference is a disagreement


class ScoresError(ValueError):
    """A folder or file that does not hold readable scores."""


@dataclass(frozen=True)
class TaskScore:
    """One task's success rate (%): per seed, and mean / population std over its seeds.

    `episodes` is how many episodes each seed's score is over (empty where the source does
    not say, as in `unseen_scores_<seed>.txt`); `errors` are episodes that could not be
    evaluated and count as failures; `missing_seeds` have no score at all.
    """

    task: str
    level: str
    mean: float | None
    std: float | None
    per_seed: dict[int, float]
    episodes: dict[int, int]
    errors: list[EpisodeKey]
    missing_episodes: list[EpisodeKey]
    missing_seeds: list[int]


@dataclass(frozen=True)
class Average:
    """A level's (or all tasks') score: mean / population std over seeds of per-seed averages.

    `tasks` are the tasks averaged (those scored in every counted seed), `of` how many tasks
    the level has: fewer means the average is over part of the level.
    """

    name: str
    mean: float | None
    std: float | None
    per_seed: dict[int, float]
    tasks: list[str]
    of: int

    @property
    def complete(self) -> bool:
        return len(self.tasks) == self.of


@dataclass(frozen=True)
class ScoreTable:
    """The AGNOSTOS results table of one run, with everything that is missing or failed."""

    source: str
    seeds: list[int]
    tasks: list[TaskScore]
    levels: dict[str, Average]
    overall: Average
    missing: list[tuple[str, int]]
    missing_episodes: list[EpisodeKey]
    errors: list[EpisodeKey]
    notes: list[str]
    complete: bool

    def task(self, name: str) -> TaskScore | None:
        return next((score for score in self.tasks if score.task == name), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))  # np.std: ddof=0, as gather_score


def _average(
    name: str, tasks: Sequence[str], seeds: Sequence[int], rates: Mapping[tuple[str, int], float]
) -> Average:
    used = [task for task in tasks if seeds and all((task, s) in rates for s in seeds)]
    per_seed = {seed: float(np.mean([rates[t, seed] for t in used])) for seed in seeds if used}
    mean, std = _mean_std(list(per_seed.values()))
    return Average(name, mean, std, per_seed, used, len(tasks))


def _by_level(layout: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    levels: dict[str, list[str]] = {}
    for task, level in layout:
        levels.setdefault(level, []).append(task)
    return levels


def _build_table(
    source: str,
    layout: Sequence[tuple[str, str]],
    seeds: Sequence[int],
    rates: Mapping[tuple[str, int], float],
    episodes: Mapping[tuple[str, int], int] | None = None,
    errors: Sequence[EpisodeKey] = (),
    missing_episodes: Sequence[EpisodeKey] = (),
    notes: Sequence[str] = (),
) -> ScoreTable:
    """The table of `rates[(task, seed)]` over `layout` (task, level) in canonical order."""
    episodes = episodes or {}
    task_scores = []
    for task, level in layout:
        per_seed = {seed: rates[task, seed] for seed in seeds if (task, seed) in rates}
        mean, std = _mean_std(list(per_seed.values()))
        counts = {seed: episodes[task, seed] for seed in seeds if (task, seed) in episodes}
        own_errors = [key for key in errors if key.task == task]
        gaps = [key for key in missing_episodes if key.task == task]
        absent = [seed for seed in seeds if seed not in per_seed]
        task_scores.append(
            TaskScore(task, level, mean, std, per_seed, counts, own_errors, gaps, absent)
        )
    missing = [(score.task, seed) for score in task_scores for seed in score.missing_seeds]
    tasks = [task for task, _ in layout]
    counted = [seed for seed in seeds if any((task, seed) in rates for task in tasks)]
    levels = _by_level(layout)
    return ScoreTable(
        source=source,
        seeds=list(seeds),
        tasks=task_scores,
        levels={name: _average(name, members, counted, rates) for name, members in levels.items()},
        overall=_average("all", tasks, counted, rates),
        missing=missing,
        missing_episodes=list(missing_episodes),
        errors=list(errors),
        notes=list(notes),
        complete=not missing and not missing_episodes,
    )


# --- our runs ----------------------------------------------------------------------------


def _suite_order(tasks: Sequence[str]) -> list[str]:
    """Tasks in their suite's canonical order when one suite holds them all (foreign records
    then line up with the published table), else in the order they were first seen."""
    for suite in SUITES.values():
        if set(tasks) <= set(suite.unseen):
            return [task for task in suite.unseen if task in tasks]
    return list(tasks)


def _infer_plan(
    records: Sequence[EpisodeRecord],
) -> tuple[list[tuple[str, str]], list[int], list[EpisodeKey]]:
    """Layout, seeds and expected keys of records without a plan: every task under every seed
    and episode that any record has, so a gap is still reported."""
    levels = {record.task: record.level for record in records}
    episodes = sorted({record.episode for record in records})
    seeds = sorted({record.seed for record in records})
    layout = [(task, levels[task]) for task in _suite_order(list(levels))]
    keys = [EpisodeKey(t, e, s) for s in seeds for t, _ in layout for e in episodes]
    return layout, seeds, keys


def score_records(
    plan: RunPlan | None, records: Sequence[EpisodeRecord], *, source: str | None = None
) -> ScoreTable:
    """Score a run's records against its plan (or, without one, against what they cover).

    Raises ScoresError when a record is not part of the plan: mixing another run's work
    into the table would silently change every number.
    """
    if plan is None:
        layout, seeds, expected = _infer_plan(records)
        source = source or "episode records (no run.json: tasks, episodes, seeds inferred)"
    else:
        layout, seeds, expected = list(plan.tasks.items()), list(plan.seeds), plan.keys()
        source = source or f"run of {plan.agent} on {plan.suite}"
    planned = set(expected)
    stray = sorted(record.key for record in records if record.key not in planned)
    if stray:
        raise ScoresError(f"{len(stray)} record(s) are not in the run's plan, first {stray[0]}")
    outcomes: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for record in records:
        outcomes[record.task, record.seed].append(record.success)
    done = {record.key for record in records}
    return _build_table(
        source,
        layout,
        seeds,
        rates={pair: 100.0 * sum(wins) / len(wins) for pair, wins in outcomes.items()},
        episodes={pair: len(wins) for pair, wins in outcomes.items()},
        errors=sorted(record.key for record in records if record.status == "error"),
        missing_episodes=[key for key in expected if key not in done],
    )


# --- X-ICM result folders ----------------------------------------------------------------


def _read_scores_txt(path: Path, suite: TaskSuite) -> tuple[dict[str, float], list[str]]:
    """One `unseen_scores_<seed>.txt`; its average line is checked against its task lines."""
    scores: dict[str, float] = {}
    average = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        name, _, value = line.partition(":")
        name = name.strip()
        try:
            number_value = float(value)
        except ValueError:
            raise ScoresError(f"{path}:{number}: expected 'task: score', got {line!r}") from None
        if name == "averaged success rate":
            average = number_value
        elif name not in suite.unseen:
            raise ScoresError(f"{path}:{number}: {name!r} is not an unseen {suite.name} task")
        elif name in scores:
            raise ScoresError(f"{path}:{number}: {name} is listed twice")
        else:
            scores[name] = number_value
    full = average is not None and len(scores) == len(suite.unseen)
    if full and abs(float(np.mean(list(scores.values()))) - average) > TOLERANCE:
        return scores, [f"{path.name}: its averaged success rate {average:.2f} is not the mean"]
    return scores, []


def _read_log(path: Path, task: str) -> tuple[float | None, int, list[str]]:
    """A `test_data.csv`: its Final Score (None, with a note, when absent or unparsable),
    its number of episode lines, and a note when their mean disagrees with the Final Score."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    episode_scores = []
    final: str | None = None
    for line in lines:
        if match := EPISODE.match(line):
            episode_scores.append(match[4])
        elif (match := FINISHED.match(line)) and match[1] == task:
            final = match[2]
    try:
        values = [float(value) for value in episode_scores]
        score = None if final is None else float(final)
    except ValueError:
        return None, len(episode_scores), [f"{path}: a score is not a number"]
    if score is None:
        return None, len(values), [f"{path}: no 'Finished {task} | Final Score: <number>' line"]
    if values and abs(float(np.mean(values)) - score) > TOLERANCE:
        note = f"{path}: Final Score {score:.2f} but its {len(values)} episodes average "
        return score, len(values), [note + f"{float(np.mean(values)):.2f}"]
    return score, len(values), []


def _log_seeds(folder: Path) -> dict[int, list[Path]]:
    seeds: dict[int, list[Path]] = defaultdict(list)
    for seed_dir in sorted(folder.glob("*/seed*")):
        if seed_dir.is_dir() and (match := SEED_DIR.fullmatch(seed_dir.name)):
            seeds[int(match[1])].append(seed_dir)
    return seeds


def read_xicm_results(folder: str | Path, suite: TaskSuite = AGNOSTOS) -> ScoreTable:
    """X-ICM's results: per seed, its `<task>/seed<k>/test_data.csv` logs where that seed has
    any (checked against `unseen_scores_<seed>.txt` when both exist), else the txt file.

    A missing or unparsable log is a missing score, not gather_score's silent 0.
    """
    folder = Path(folder)
    txt = {int(m[1]): p for p in folder.iterdir() if (m := SCORES_TXT.fullmatch(p.name))}
    logs = _log_seeds(folder)
    if not txt and not logs:
        raise ScoresError(f"{folder}: no unseen_scores_<seed>.txt or <task>/seed<k>/ logs")
    rates: dict[tuple[str, int], float] = {}
    episodes: dict[tuple[str, int], int] = {}
    notes: list[str] = []
    for task in sorted({p.parent.name for dirs in logs.values() for p in dirs}):
        if task not in suite.unseen:
            notes.append(f"{task}/: ignored, not an unseen {suite.name} task")
    for seed in sorted(set(txt) | set(logs)):
        published, txt_notes = _read_scores_txt(txt[seed], suite) if seed in txt else ({}, [])
        notes += txt_notes
        if seed not in logs:
            rates.update({(task, seed): value for task, value in published.items()})
            continue
        for task in suite.unseen:
            path = folder / task / f"seed{seed}" / "test_data.csv"
            if not path.is_file():
                continue
            score, count, log_notes = _read_log(path, task)
            notes += log_notes
            if score is None:
                continue
            rates[task, seed], episodes[task, seed] = score, count
            if task in published and abs(published[task] - score) > TOLERANCE:
                notes.append(f"{task} seed {seed}: log {score:.2f}, txt {published[task]:.2f}")
    parts = [f"unseen_scores_{seed}.txt" for seed in sorted(txt)]
    parts += [f"test_data.csv logs of seed {seed}" for seed in sorted(logs)]
    layout = [(task, suite.level_of(task)) for task in suite.unseen]
    source = f"X-ICM results in {folder} ({', '.join(parts)})"
    return _build_table(source, layout, sorted(set(txt) | set(logs)), rates, episodes, notes=notes)


def load_scores(path: str | Path) -> ScoreTable:
    """The scores of a folder: our run (run.json, episodes*.jsonl) or X-ICM's results."""
    folder = Path(path)
    if not folder.is_dir():
        raise ScoresError(f"{folder}: no such folder")
    if (folder / PLAN_NAME).is_file() or any(folder.glob(RECORDS_GLOB)):
        plan = RunPlan.load(folder) if (folder / PLAN_NAME).is_file() else None
        table = score_records(plan, read_records(folder))
        return replace(table, source=f"{table.source} in {folder}")
    xicm = any(SCORES_TXT.fullmatch(p.name) for p in folder.iterdir())
    if xicm or any(folder.glob("*/seed*/test_data.csv")):
        return read_xicm_results(folder)
    raise ScoresError(
        f"{folder}: holds no scores (neither an evaluation run with {PLAN_NAME} and "
        f"{RECORDS_GLOB}, nor X-ICM results unseen_scores_<seed>.txt or "
        "<task>/seed<k>/test_data.csv)"
    )


# --- text --------------------------------------------------------------------------------


def _level_label(level: str) -> str:
    """`level1` -> `level-1`, gather_score's spelling in `level-1 success rate`."""
    return re.sub(r"(\D)(\d+)$", r"\1-\2", level)


def _cell(mean: float | None, std: float | None) -> str:
    return "missing" if mean is None or std is None else f"{mean:.2f} ({std:.2f})"


def _group(keys: Iterable[EpisodeKey]) -> list[str]:
    """`task seed s: episodes 1, 2` per (task, seed), so a long list stays readable."""
    grouped: dict[tuple[str, int], list[int]] = defaultdict(list)
    for key in keys:
        grouped[key.task, key.seed].append(key.episode)
    return [
        f"{task} seed {seed}: episode{'s' * (len(eps) > 1)} {', '.join(map(str, sorted(eps)))}"
        for (task, seed), eps in grouped.items()
    ]


def report_lines(table: ScoreTable) -> list[str]:
    """What is missing, failed to evaluate or disagrees, one line each."""
    pairs = len(table.tasks) * len(table.seeds)
    if table.complete:
        lines = [f"complete: {len(table.tasks)} tasks x {len(table.seeds)} seed(s)"]
    else:
        line = f"INCOMPLETE: {len(table.missing)} of {pairs} (task, seed) scores missing"
        if table.missing_episodes:
            line += f", {len(table.missing_episodes)} planned episode(s) without a record"
        lines = [line]
    lines += [f"missing: {task} seed {seed}" for task, seed in table.missing]
    missing_pairs = set(table.missing)
    partial = [k for k in table.missing_episodes if (k.task, k.seed) not in missing_pairs]
    lines += [f"missing episodes: {line}" for line in _group(partial)]
    if table.errors:
        lines.append(f"errors: {len(table.errors)} episode(s) not evaluated, counted as failures")
        lines += [f"error: {line}" for line in _group(table.errors)]
    return lines + [f"note: {note}" for note in table.notes]


def format_table(table: ScoreTable) -> str:
    """The AGNOSTOS table as gather_score's unseen_summary.txt shows it, plus the report."""
    rows: list[tuple[str, str]] = []
    for score in table.tasks:
        seen = len(table.seeds) - len(score.missing_seeds)
        extra = f" [{seen} of {len(table.seeds)} seeds]" if score.missing_seeds and seen else ""
        rows.append((score.task, _cell(score.mean, score.std) + extra))
    averages = [*table.levels.values(), table.overall]
    for average in averages:
        label = "averaged" if average is table.overall else _level_label(average.name)
        extra = "" if average.complete else f" [{len(average.tasks)} of {average.of} tasks]"
        rows.append((f"{label} success rate", _cell(average.mean, average.std) + extra))
    width = max(len(name) for name, _ in rows) + 2
    lines = [table.source, f"seeds: {', '.join(map(str, table.seeds))}"]
    lines += [f"{name:<{width}}{value}" for name, value in rows]
    return "\n".join(lines + report_lines(table)) + "\n"


# --- published baselines -----------------------------------------------------------------


def published_baselines(csv_path: str | Path) -> dict[str, dict[str, float | None]]:
    """`method -> task -> success %` from the published baselines CSV (N/A -> None)."""
    path = Path(csv_path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "method" not in reader.fieldnames:
            raise ScoresError(f"{path}: not a baselines table (no 'method' column)")
        tasks = [name for name in reader.fieldnames if name not in ("method", "category")]
        methods: dict[str, dict[str, float | None]] = {}
        for number, row in enumerate(reader, start=2):
            values: dict[str, float | None] = {}
            for task in tasks:
                text = (row.get(task) or "").strip()
                try:
                    values[task] = None if text in ("", "N/A") else float(text)
                except ValueError:
                    raise ScoresError(f"{path}:{number}: {task} is {text!r}") from None
            methods[row["method"]] = values
    return methods


def _layout(tables: Mapping[str, ScoreTable]) -> list[tuple[str, str]]:
    for table in tables.values():
        return [(score.task, score.level) for score in table.tasks]
    return [(task, AGNOSTOS.level_of(task)) for task in AGNOSTOS.unseen]


def _plain_average(values: Sequence[float | None]) -> tuple[float | None, int]:
    present = [value for value in values if value is not None]
    return (float(np.mean(present)) if present else None), len(present)


def _rows(
    tables: Mapping[str, ScoreTable], baselines: Mapping[str, Mapping[str, float | None]]
) -> list[tuple[str, list[tuple[float | None, float | None, str]]]]:
    """Row label -> one (value, std, annotation) per series: our runs, then the baselines."""
    layout = _layout(tables)
    levels = _by_level(layout)
    rows = []
    for task, _ in layout:
        scores = [table.task(task) for table in tables.values()]
        ours = [(s.mean, s.std, "") if s else (None, None, "") for s in scores]
        theirs = [(b.get(task), None, "") for b in baselines.values()]
        rows.append((task, ours + theirs))
    for name, members in [*levels.items(), ("all", [task for task, _ in layout])]:
        ours = []
        for table in tables.values():
            average = table.overall if name == "all" else table.levels.get(name)
            if average is None:
                ours.append((None, None, ""))
                continue
            note = "" if average.complete else f" [{len(average.tasks)} of {average.of}]"
            ours.append((average.mean, average.std, note))
        theirs = []
        for values in baselines.values():
            mean, count = _plain_average([values.get(task) for task in members])
            note = "" if count == len(members) else f" [{count} of {len(members)}]"
            theirs.append((mean, None, note))
        label = "averaged" if name == "all" else _level_label(name)
        rows.append((f"{label} success rate", ours + theirs))
    return rows


def compare_table(
    tables: Mapping[str, ScoreTable], baselines: Mapping[str, Mapping[str, float | None]]
) -> str:
    """Markdown: one row per task and per level average, our runs then published methods.

    A baseline's level averages are plain means of its per-task values (the CSV has no
    per-seed numbers), over the tasks it has ("[10 of 13]" where some are N/A).
    """
    header = ["task", *tables, *baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, cells in _rows(tables, baselines):
        texts = []
        for series, (mean, std, note) in enumerate(cells):
            if mean is None:
                texts.append("N/A" if series >= len(tables) else "missing")
            else:
                texts.append((f"{mean:.2f}" if std is None else _cell(mean, std)) + note)
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


# --- bar chart (PIL: matplotlib is not a dependency of this package) ---------------------

# matplotlib's tab20 colours: our runs take the strong ones first, then the baselines.
PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ff9896", "#98df8a", "#ffbb78", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip


def _chart_label(label: str) -> str:
    """Short column names of the published table (Toilet, Knife, ...) so labels fit a group."""
    if label.endswith(" success rate"):
        name = label.removesuffix(" success rate")
        return "All" if name == "averaged" else name.capitalize()
    return AGNOSTOS_SHORT_NAMES.get(label, label)


def _font(size: int = 14) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def bar_chart(
    tables: Mapping[str, ScoreTable],
    baselines: Mapping[str, Mapping[str, float | None]],
    path: str | Path,
) -> Path:
    """A grouped bar chart PNG: per task (then per level and overall) one bar per series,
    our runs first with their std over seeds as a whisker; N/A or missing draws no bar."""
    from PIL import Image, ImageDraw

    font, names, rows = _font(), [*tables, *baselines], _rows(tables, baselines)
    bar = max(3, min(16, 120 // max(1, len(names))))
    group = bar * len(names) + 14
    left, top, plot_h = 60, 50, 420
    plot_w = group * len(rows)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = 30 + int(max(measure.textlength(name, font=font) for name in names))
    size = (left + plot_w + 20 + legend_w, max(top + plot_h + 50, top + 20 * len(names) + 10))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def y_of(value: float) -> float:
        return top + plot_h - min(100.0, max(0.0, value)) * plot_h / 100

    draw.text((left, 15), "success rate (%) per task", fill="black", font=font)
    for tick in range(0, 101, 20):
        draw.line([(left, y_of(tick)), (left + plot_w, y_of(tick))], fill="#dddddd")
        draw.text((left - 8, y_of(tick)), str(tick), fill="black", font=font, anchor="rm")
    for index, (label, cells) in enumerate(rows):
        x0 = left + index * group + 7
        for series, (mean, std, _) in enumerate(cells):
            if mean is None:
                continue
            x = x0 + series * bar
            colour = PALETTE[series % len(PALETTE)]
            draw.rectangle([(x, y_of(mean)), (x + bar - 2, y_of(0))], fill=colour)
            if std:
                centre = x + (bar - 2) / 2
                draw.line([(centre, y_of(mean - std)), (centre, y_of(mean + std))], fill="black")
        where = (x0 + (group - 14) / 2, y_of(0) + 8)
        draw.text(where, _chart_label(label), fill="black", font=font, anchor="ma")
    draw.line([(left, top), (left, y_of(0)), (left + plot_w, y_of(0))], fill="black")
    for series, name in enumerate(names):
        x, y = left + plot_w + 20, top + series * 20
        draw.rectangle([(x, y), (x + 14, y + 14)], fill=PALETTE[series % len(PALETTE)])
        draw.text((x + 20, y), name, fill="black", font=font)
    image.save(path, format="PNG")
    return Path(path)
