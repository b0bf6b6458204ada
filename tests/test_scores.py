"""Scores: parity with the published X-ICM summaries (recomputed here with plain numpy from
the per-seed files), X-ICM's episode logs, our own records, and the `eval scores` CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agnostos.evaluation.records import (
    EpisodeKey,
    EpisodeRecord,
    RecordsWriter,
    RunPlan,
    records_name,
)
from agnostos.evaluation.scores import (
    ScoresError,
    compare_table,
    format_table,
    load_scores,
    published_baselines,
    read_xicm_results,
    score_records,
)
from agnostos.evaluation.scores_cli import run_scores
from agnostos.tasks import AGNOSTOS

SAMPLE_LOG = Path("test_data_samples", "qwen2.5-7b-instruct", "lamp_off", "seed0", "test_data.csv")


def _shared() -> Path:
    """`$AGNOSTOS_SHARED_DATA`, else `../shared/data` next to the repository."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("AGNOSTOS_SHARED_DATA", default))


@pytest.fixture(scope="module")
def published() -> Path:
    root = _shared() / "xicm_published_scores"
    if not (root / "qwen2.5-72b-instruct" / "unseen_scores_0.txt").is_file():
        pytest.skip(
            f"published X-ICM scores not found at {root}; set AGNOSTOS_SHARED_DATA to the "
            "folder holding xicm_published_scores/"
        )
    return root


@pytest.fixture(scope="module")
def baselines_csv() -> Path:
    path = _shared() / "agnostos_published_baselines.csv"
    if not path.is_file():
        pytest.skip(f"published baselines not found at {path}; set AGNOSTOS_SHARED_DATA")
    return path


def _gather_score_by_hand(folder: Path) -> dict[str, list[float]]:
    """Per task, its scores in every unseen_scores_*.txt (the 'averaged' line dropped)."""
    values: dict[str, list[float]] = {}
    for path in sorted(folder.glob("unseen_scores_*.txt")):
        for line in path.read_text().splitlines():
            name, value = line.split(":")
            if name != "averaged success rate":
                values.setdefault(name, []).append(float(value))
    return values


@pytest.mark.parametrize(
    ("model", "overall", "level1", "level2"),
    [
        ("qwen2.5-72b-instruct", (30.09, 1.01), (37.64, 1.41), (20.27, 1.72)),
        ("qwen2.5-7b-instruct", (23.54, 1.66), (28.62, 1.96), (16.93, 1.32)),
    ],
)
def test_published_summaries_are_reproduced(
    published: Path, model: str, overall: tuple, level1: tuple, level2: tuple
) -> None:
    table = load_scores(published / model)
    assert table.complete and not table.missing and not table.notes
    for average, (mean, std) in [
        (table.overall, overall),
        (table.levels["level1"], level1),
        (table.levels["level2"], level2),
    ]:
        assert (round(average.mean, 2), round(average.std, 2)) == (mean, std), average.name
    by_hand = _gather_score_by_hand(published / model)
    assert [score.task for score in table.tasks] == list(AGNOSTOS.unseen) == list(by_hand)
    for score in table.tasks:
        assert score.mean == pytest.approx(np.mean(by_hand[score.task]), abs=1e-9)
        assert score.std == pytest.approx(np.std(by_hand[score.task]), abs=1e-9)
    seeds = np.array([by_hand[task] for task in AGNOSTOS.unseen])  # tasks x seeds
    assert table.overall.mean == pytest.approx(seeds.mean(axis=0).mean(), abs=1e-9)
    assert table.levels["level2"].std == pytest.approx(seeds[13:].mean(axis=0).std(), abs=1e-9)
    text = format_table(table)
    assert f"level-1 success rate              {level1[0]:.2f} ({level1[1]:.2f})" in text
    assert f"averaged success rate             {overall[0]:.2f} ({overall[1]:.2f})" in text


def test_the_published_episode_log_parses_to_its_final_score(published: Path) -> None:
    table = read_xicm_results(published / "test_data_samples" / "qwen2.5-7b-instruct")
    lamp_off = table.task("lamp_off")
    assert lamp_off.per_seed == {0: 64.0} and lamp_off.episodes == {0: 25}
    assert not table.notes  # the 25 Score lines average to the Final Score
    assert table.seeds == [0] and not table.complete
    assert len(table.missing) == 22 and ("lamp_on", 0) in table.missing
    assert table.levels["level1"].tasks == ["lamp_off"] and table.levels["level2"].mean is None


def test_a_missing_episode_log_is_reported_missing_not_zero(published: Path, tmp_path: Path):
    text = (published / SAMPLE_LOG).read_text()
    for task in ("lamp_off", "lamp_on"):  # the same 64% log under two tasks
        target = tmp_path / task / "seed0" / "test_data.csv"
        target.parent.mkdir(parents=True)
        target.write_text(text.replace("lamp_off", task))
    (tmp_path / "close_fridge" / "seed0").mkdir(parents=True)  # a seed folder, no log
    cut = tmp_path / "open_grill" / "seed0" / "test_data.csv"
    cut.parent.mkdir(parents=True)
    cut.write_text("log_message\nEvaluating open_grill | Episode 0 | Step: 3 | Score: 0.0 |\n")
    table = load_scores(tmp_path)
    assert table.task("lamp_on").per_seed == {0: 64.0}
    for task in ("close_fridge", "open_grill"):
        assert table.task(task).mean is None and (task, 0) in table.missing
    assert any("open_grill" in note and "Final Score" in note for note in table.notes)
    assert table.levels["level1"].tasks == ["lamp_off", "lamp_on"]
    assert table.levels["level1"].mean == pytest.approx(64.0)  # not (64 + 64 + 0 + 0) / 4
    assert "level-1 success rate              64.00 (0.00) [2 of 13 tasks]" in format_table(table)


def test_an_episode_log_that_disagrees_with_its_final_score_is_noted(
    published: Path, tmp_path: Path
) -> None:
    target = tmp_path / "lamp_off" / "seed3" / "test_data.csv"
    target.parent.mkdir(parents=True)
    text = (published / SAMPLE_LOG).read_text()
    target.write_text(text.replace("Final Score: 64.0", "Final Score: 60.0"))
    table = read_xicm_results(tmp_path)
    assert table.task("lamp_off").per_seed == {3: 60.0}
    assert any("60.00" in note and "64.00" in note for note in table.notes)


# --- our records ---------------------------------------------------------------------------

TASKS = {"lamp_off": "level1", "basketball_in_hoop": "level2"}


def _plan(seeds: list[int]) -> RunPlan:
    return RunPlan("agnostos", dict(TASKS), [0, 1, 2], seeds, 25, "xicm", "f" * 16)


def _record(task: str, episode: int, seed: int, success: bool, error: bool = False):
    return EpisodeRecord(
        task=task,
        level=TASKS[task],
        variation=0,
        episode=episode,
        seed=seed,
        instruction="do it",
        steps=3,
        success=success,
        status="error" if error else "ok",
        error_type="RuntimeError" if error else None,
    )


# lamp_off: seed 0 2/3, seed 1 1/3 (one error); basketball: seed 0 0/3, seed 1 3/3.
OUTCOMES = {
    ("lamp_off", 0): [True, True, False],
    ("lamp_off", 1): [True, False, None],
    ("basketball_in_hoop", 0): [False, False, False],
    ("basketball_in_hoop", 1): [True, True, True],
}


def _records(skip: set[tuple[str, int]] = frozenset()) -> list[EpisodeRecord]:
    return [
        _record(task, episode, seed, bool(won), error=won is None)
        for (task, seed), wins in OUTCOMES.items()
        if (task, seed) not in skip
        for episode, won in enumerate(wins)
    ]


def _write_run(folder: Path, plan: RunPlan, records: list[EpisodeRecord], shards: int = 1):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(plan.to_json()))
    writers = [RecordsWriter(folder / records_name(i, shards)) for i in range(shards)]
    for index, record in enumerate(records):
        writers[index % shards].append(record)
    for writer in writers:
        writer.close()
    return folder


def test_records_score_as_gather_score_with_errors_as_reported_failures(tmp_path: Path):
    table = load_scores(_write_run(tmp_path / "run", _plan([0, 1]), _records()))
    assert table.complete and not table.missing
    lamp, ball = table.task("lamp_off"), table.task("basketball_in_hoop")
    assert lamp.per_seed == pytest.approx({0: 200 / 3, 1: 100 / 3})
    assert (lamp.mean, lamp.std) == pytest.approx((50.0, 50 / 3))
    assert (ball.mean, ball.std) == pytest.approx((50.0, 50.0))
    assert lamp.episodes == {0: 3, 1: 3}
    assert table.errors == [EpisodeKey("lamp_off", 2, 1)] == lamp.errors
    # per-seed average over both tasks: seed 0 (66.7 + 0) / 2, seed 1 (33.3 + 100) / 2
    assert table.overall.per_seed == pytest.approx({0: 100 / 3, 1: 200 / 3})
    assert (table.overall.mean, table.overall.std) == pytest.approx((50.0, 50 / 3))
    assert table.levels["level2"].mean == pytest.approx(50.0)
    text = format_table(table)
    assert "error: lamp_off seed 1: episode 2" in text and "counted as failures" in text


def test_a_missing_task_and_seed_is_listed_and_averages_say_they_are_partial(tmp_path: Path):
    records = _records({("basketball_in_hoop", 1)})
    records = [r for r in records if r.key != EpisodeKey("lamp_off", 1, 0)]
    table = load_scores(_write_run(tmp_path / "run", _plan([0, 1]), records))
    assert not table.complete
    assert table.missing == [("basketball_in_hoop", 1)]
    assert EpisodeKey("lamp_off", 1, 0) in table.missing_episodes
    assert table.task("lamp_off").per_seed[0] == pytest.approx(50.0)  # 1 of 2 recorded
    ball = table.task("basketball_in_hoop")
    assert ball.per_seed == {0: 0.0} and ball.missing_seeds == [1]
    assert table.overall.tasks == ["lamp_off"] and not table.overall.complete
    assert table.overall.mean == pytest.approx((50.0 + 100 / 3) / 2)
    assert table.levels["level2"].mean is None
    text = format_table(table)
    assert "missing: basketball_in_hoop seed 1" in text
    assert "missing episodes: lamp_off seed 0: episode 1" in text
    assert "[1 of 2 tasks]" in text and "[1 of 2 seeds]" in text and "INCOMPLETE" in text


def test_records_split_over_shard_files_merge(tmp_path: Path):
    whole = load_scores(_write_run(tmp_path / "one", _plan([0, 1]), _records()))
    sharded_folder = _write_run(tmp_path / "two", _plan([0, 1]), _records(), shards=2)
    assert sorted(p.name for p in sharded_folder.glob("episodes*")) == [
        "episodes-0-of-2.jsonl",
        "episodes-1-of-2.jsonl",
    ]
    sharded = load_scores(sharded_folder)
    assert sharded.complete and sharded.tasks == whole.tasks and sharded.overall == whole.overall


def test_records_without_a_plan_are_ordered_and_checked_from_what_they_cover():
    records = _records({("basketball_in_hoop", 1)})
    table = score_records(None, list(reversed(records)))
    assert [score.task for score in table.tasks] == ["lamp_off", "basketball_in_hoop"]
    assert table.seeds == [0, 1] and table.missing == [("basketball_in_hoop", 1)]


def test_a_record_outside_the_plan_is_refused():
    with pytest.raises(ScoresError, match="not in the run's plan"):
        score_records(_plan([0]), _records())


# --- comparison and CLI --------------------------------------------------------------------


def test_published_baselines_and_the_comparison_table(published: Path, baselines_csv: Path):
    baselines = published_baselines(baselines_csv)
    assert baselines["PerAct"]["close_fridge"] == 37.3
    assert baselines["3D-LOTUS"]["close_fridge"] is None
    table = compare_table({"72B": load_scores(published / "qwen2.5-72b-instruct")}, baselines)
    lines = table.splitlines()
    assert lines[0].startswith("| task | 72B | PerAct | RVT |")
    assert len(lines) == 2 + 23 + 3
    level1 = next(line for line in lines if line.startswith("| level-1 success rate"))
    assert "| 37.64 (1.41) | 18.97 |" in level1  # PerAct's 13 Level-1 values average 18.97
    assert "3.20 [10 of 13]" in level1  # 3D-LOTUS has no Fridge, Microwave, Laptop


def test_cli_prints_the_table(published: Path, capsys: pytest.CaptureFixture[str]):
    assert run_scores([str(published / "qwen2.5-7b-instruct")]) == 0
    out = capsys.readouterr().out
    assert "averaged success rate             23.54 (1.66)" in out
    assert "put_umbrella_in_umbrella_stand    0.00 (0.00)" in out


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run = _write_run(tmp_path / "run", _plan([0, 1]), _records())
    assert run_scores([str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["run"]["overall"]["mean"] == pytest.approx(50.0)
    assert data["run"]["complete"] is True
    assert data["run"]["errors"] == [{"task": "lamp_off", "episode": 2, "seed": 1}]


def test_cli_compare_writes_markdown_and_a_chart(
    tmp_path: Path, baselines_csv: Path, capsys: pytest.CaptureFixture[str]
):
    run = _write_run(tmp_path / "run", _plan([0, 1]), _records())
    assert run_scores([str(run), "--compare", "published", "--baselines", str(baselines_csv)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / 'scores.md'}" in out and f"wrote {run / 'scores.png'}" in out
    markdown = (run / "scores.md").read_text()
    assert "| task | run | PerAct |" in markdown and "| lamp_off | 50.00 (16.67) |" in markdown
    assert "| basketball_in_hoop | 50.00 (50.00) | 0.00 |" in markdown
    assert "error: lamp_off seed 1: episode 2" in markdown
    with Image.open(run / "scores.png") as image:
        image.load()
        assert image.format == "PNG" and image.width > 400 and image.height > 300
        assert len(image.getcolors(maxcolors=1 << 16)) > 10  # bars, text and legend drawn


def test_cli_an_empty_folder_fails_with_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert run_scores([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err and "holds no scores" in err


def test_cli_bad_usage_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert run_scores([str(tmp_path), "--no-such-flag"]) == 2
    assert run_scores([]) == 2
    assert run_scores([str(tmp_path), "--compare", "other"]) == 2
    assert run_scores([str(tmp_path), "--baselines", "x.csv"]) == 2  # needs --compare
    missing = tmp_path / "absent.csv"
    assert run_scores([str(tmp_path), "--compare", "published", "--baselines", str(missing)]) == 2
    assert "absent.csv" in capsys.readouterr().err


def test_cli_finds_the_baselines_through_the_environment(
    published: Path,
    baselines_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / baselines_csv.name).write_bytes(baselines_csv.read_bytes())
    monkeypatch.setenv("AGNOSTOS_SHARED_DATA", str(shared))
    monkeypatch.chdir(tmp_path)  # ../shared/data from here holds no baselines
    xicm = str(published / "qwen2.5-72b-instruct")  # read-only: the files go to --out
    assert run_scores([xicm, "--compare", "published", "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "scores.md").read_text()
    assert "| averaged success rate | 30.09 (1.01) | 14.03 |" in markdown
    assert (tmp_path / "out" / "scores.png").stat().st_size > 0
    capsys.readouterr()
    monkeypatch.setenv("AGNOSTOS_SHARED_DATA", str(tmp_path / "nowhere"))
    assert run_scores([xicm, "--compare", "published"]) == 2
    assert "no published baselines" in capsys.readouterr().err
