"""`agnostos demo` end to end at minimal size: real MuJoCo demos, real shards, a real
Lightning fit of the tiny model, a real bank, real retrieval, an offline W&B run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agnostos.cli import main
from agnostos.demo import DemoConfig

pytestmark = pytest.mark.timeout(600)

SEEN = ("push_button", "open_drawer")
UNSEEN = ("close_drawer",)
STAGES = ("seen_demos", "unseen_demos", "seen_shards", "unseen_shards", "base", "train",
          "bank", "retrieve", "eval", "vla_train", "vla_eval")  # fmt: skip
SMALL = [
    "--seen-tasks", ",".join(SEEN), "--unseen-tasks", ",".join(UNSEEN),
    "--seen-episodes", "2", "--unseen-episodes", "1", "--vae-steps", "2",
    "--train-steps", "3", "--sampling-steps", "2", "--batch-size", "2", "--top-k", "3",
    "--eval-episodes", "1", "--eval-max-steps", "2", "--llm-max-new-tokens", "24",
    "--vla-steps", "2", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agnostos.models.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("demo-llm") / "llm")


@pytest.fixture(scope="module")
def small(tiny_llm: Path) -> list[str]:
    """SMALL with the tiny chat model as the evaluation's LLM."""
    return [*SMALL, "--llm", str(tiny_llm)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, small: list[str]) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    status = main(["demo", "--out", str(out), *small, "--workers", "1"])
    mp.undo()
    assert status == 0
    return out


def test_demo_reports_top_k_for_every_unseen_demo(demo_run: Path) -> None:
    summary = json.loads((demo_run / "summary.json").read_text())
    retrievals = summary["retrievals"]
    assert [(r["task"], r["episode"]) for r in retrievals] == [("close_drawer", 0)]
    (query,) = retrievals
    assert query["level"] == "level1"
    assert query["instruction"] in (demo_run / "summary.txt").read_text()
    picked = query["retrieved"]
    assert len(picked) == 3
    assert len({item["demo_id"] for item in picked}) == 3
    assert {item["task"] for item in picked} <= set(SEEN)
    scores = [item["score"] for item in picked]
    assert scores == sorted(scores, reverse=True)  # lang_vis_out: most similar first
    for item in picked:
        assert item["demo_id"] in (demo_run / "summary.txt").read_text()


def test_demo_saves_the_prediction_strip(demo_run: Path) -> None:
    (query,) = json.loads((demo_run / "summary.json").read_text())["retrievals"]
    strip = np.asarray(Image.open(demo_run / query["image"]))
    assert strip.shape == (128, 5 * 128 + 4 * 4, 3)
    tiles = [strip[:, i * 132 : i * 132 + 128] for i in range(5)]
    # the query frame 0 and the true last frame differ (the drawer moved), and the
    # predicted future is an image of its own, not a copy of either
    assert not np.array_equal(tiles[0], tiles[2])
    assert not np.array_equal(tiles[1], tiles[0])
    assert strip[:, 128:132].min() == 255  # white gap between tiles


def test_demo_stages_leave_their_artefacts(demo_run: Path) -> None:
    stages = {path.name for path in (demo_run / "stages").iterdir()}
    assert stages == {f"{name}.json" for name in STAGES}  # no stage left half-done
    train = json.loads((demo_run / "stages" / "train.json").read_text())["result"]
    assert Path(train["export"]).name == "checkpoint-3"
    assert train["steps"] == 3
    assert (Path(train["export"]) / "unet" / "config.json").is_file()
    bank = json.loads((demo_run / "bank" / "bank.json").read_text())
    assert len(bank["demos"]) == 4
    assert all(demo["demo_text"] for demo in bank["demos"])  # minibench has mask names
    runs = list((demo_run / "wandb").glob("offline-run-*/*.wandb"))
    assert runs, "the retrieval table should be in an offline W&B run"
    manifest = json.loads((demo_run / "shards" / "unseen" / "manifest.json").read_text())
    assert manifest["totals"]["episodes"] == 1


def test_demo_evaluates_xicm_with_both_rankers_through_the_evaluator(demo_run: Path) -> None:
    from agnostos.evaluation.records import read_records

    result = json.loads((demo_run / "summary.json").read_text())["eval"]
    assert list(result["runs"]) == ["lang_vis_out", "random"]
    for run in result["runs"].values():
        (record,) = read_records(run["out"])
        assert (record.task, record.episode, record.status) == ("close_drawer", 0, "ok")
        assert 1 <= record.steps <= 2 and run["llm_calls"] == record.agent_stats["llm_calls"] >= 1
        assert run["all"] == run["level1"] == (100.0 if record.success else 0.0)
        assert run["level2"] is None  # no Level-2 task in this run: reported, not a 0
        assert (Path(run["out"]) / "llm_calls.jsonl").is_file()
    text = (demo_run / "summary.txt").read_text()
    assert "X-ICM on minibench unseen tasks" in text and "constrained decoding" in text
    assert "lang_vis_out" in text and "random" in text


def test_demo_fine_tunes_the_vla_with_rollouts_and_evaluates_it_next_to_xicm(
    demo_run: Path,
) -> None:
    from agnostos.evaluation.records import read_records
    from agnostos.models.vla import VLAPolicy

    trained = json.loads((demo_run / "stages" / "vla_train.json").read_text())["result"]
    assert trained["steps"] == 2 and trained["rollout_task"] == "push_button"
    assert list(trained["rollouts"]) == ["step-1", "step-2"]  # halfway and at the end
    policy = VLAPolicy.from_export(trained["export"])
    assert policy.is_lora and policy.inputs.object_text
    result = json.loads((demo_run / "summary.json").read_text())["vla"]
    (record,) = read_records(result["run"]["out"])
    assert (record.task, record.episode) == ("close_drawer", 0)
    assert record.agent_stats["model_calls"] >= 1
    text = (demo_run / "summary.txt").read_text()
    rows = [line for line in text.splitlines() if line.startswith("  VLA 2 st")]
    assert len(rows) == 1  # in the X-ICM table
    assert "VLA rollouts during training (push_button success): step-1" in text


def test_demo_rerun_skips_finished_stages_and_gives_the_same_retrieval(
    demo_run: Path, small: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = json.loads((demo_run / "summary.json").read_text())["retrievals"]
    export = json.loads((demo_run / "stages" / "train.json").read_text())["result"]["export"]
    mtime = (Path(export) / "unet" / "config.json").stat().st_mtime_ns
    status = main(["demo", "--out", str(demo_run), *small, "--no-wandb", "--workers", "2"])
    assert status == 0  # worker counts and W&B change how stages run, not what they make
    log = capsys.readouterr().out
    for stage in STAGES:
        assert f"stage {stage}: already done" in log
    assert (Path(export) / "unet" / "config.json").stat().st_mtime_ns == mtime
    after = json.loads((demo_run / "summary.json").read_text())["retrievals"]
    assert after == before


def test_demo_config_errors_name_the_setting(tmp_path: Path) -> None:
    bad = tmp_path / "demo.yaml"
    bad.write_text("train_step: 3\n")
    with pytest.raises(ValueError, match="train_step"):
        DemoConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="unseen_tasks"):
        DemoConfig(unseen_tasks=("open_drawer",))
    with pytest.raises(ValueError, match="top_k"):
        DemoConfig(top_k=0)
    assert main(["demo", "--config", str(bad)]) == 2


def _flag(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_demo_rerun_with_changed_settings_reruns_exactly_the_affected_stages(
    demo_run: Path, small: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's `--train-steps 50 --top-k 3` after a full run: training, the bank and
    the retrieval run again, the demos, shards and base are re-used, and the summary says
    what the results were made with. (Runs last: it changes the module's demo folder.)"""
    changed = _flag(_flag(small, "--train-steps", "2"), "--top-k", "2")
    assert main(["demo", "--out", str(demo_run), *changed, "--no-wandb"]) == 0
    log = capsys.readouterr().out
    for stage in ("seen_demos", "unseen_demos", "seen_shards", "unseen_shards", "base"):
        assert f"stage {stage}: already done" in log
    assert "stage train: re-running (train_steps 3 -> 2)" in log
    assert "stage bank: re-running (input train changed)" in log
    assert "stage retrieve: re-running (top_k 3 -> 2; input train changed" in log
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["used"]["training_steps"] == 2 and summary["used"]["top_k"] == 2
    (query,) = summary["retrievals"]
    assert len(query["retrieved"]) == 2
    exports = sorted(path.name for path in (demo_run / "train" / "export").iterdir())
    assert exports == ["checkpoint-2"]  # the 3-step run's outputs were discarded
    text = (demo_run / "summary.txt").read_text()
    assert "top-2" in text and "2 training steps" in text and "3 training steps" not in text
    assert "re-used from an earlier run with the same settings: seen_demos" in text

    # a query-side change leaves the whole seen side (bank, model) alone
    fewer = _flag(changed, "--unseen-tasks", "close_box_lid")
    assert main(["demo", "--out", str(demo_run), *fewer, "--no-wandb"]) == 0
    log = capsys.readouterr().out
    for stage in ("seen_demos", "seen_shards", "base", "train", "bank"):
        assert f"stage {stage}: already done" in log
    for stage in ("unseen_demos", "unseen_shards", "retrieve"):
        assert f"stage {stage}: re-running" in log
    summary = json.loads((demo_run / "summary.json").read_text())
    assert [item["task"] for item in summary["retrievals"]] == ["close_box_lid"]
    assert summary["used"]["unseen_tasks"] == ["close_box_lid"]
    assert sorted(path.name for path in (demo_run / "retrievals").iterdir()) == [
        "close_box_lid_episode0.png"
    ]
