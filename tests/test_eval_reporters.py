"""Evaluation reporters driven through their callback events, with real codecs and a real
offline W&B run: the progress bar, the video recorder (PyAV H.264) and the W&B reporter."""

from __future__ import annotations

import io
import json
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from agnostos.envs.protocol import CameraFrame, Observation
from agnostos.evaluation.callbacks import EpisodeInfo, EvalCallback, RunInfo
from agnostos.evaluation.records import EpisodeKey, EpisodeRecord, RunPlan
from agnostos.evaluation.reporters import ProgressBar, VideoRecorder, WandbReporter, video_name
from agnostos.evaluation.video import encode_mp4, read_mp4

TASKS = {"put_toilet_roll_on_stand": "level1", "close_jar": "level2"}
SIZE = (32, 48)  # H, W


def make_plan(episodes: Sequence[int] = (0, 1), seeds: Sequence[int] = (0,)) -> RunPlan:
    return RunPlan(
        suite="agnostos_unseen",
        tasks=dict(TASKS),
        episodes=list(episodes),
        seeds=list(seeds),
        max_steps=10,
        agent="replay",
        fingerprint="f" * 64,
        config={"agent": "replay", "agent_settings": {"demos": 3}},
    )


def observation(rgb: np.ndarray, cameras: Sequence[str] = ("front",)) -> Observation:
    height, width = rgb.shape[:2]
    frame = CameraFrame(
        rgb=rgb,
        depth=np.ones((height, width), np.float32),
        mask=np.zeros((height, width), np.int32),
        intrinsics=np.eye(3),
        extrinsics=np.eye(4),
        near=0.1,
        far=3.0,
    )
    return Observation(
        cameras={name: frame for name in cameras},
        gripper_pose=np.array([0, 0, 1, 0, 0, 0, 1.0]),
        gripper_open=1.0,
        joint_positions=np.zeros(7),
        joint_velocities=np.zeros(7),
        mask_names={},
        instruction="do it",
    )


def record(key: EpisodeKey, steps: int, success: bool, status: str = "ok", **extra: Any):
    return EpisodeRecord(
        task=key.task,
        level=TASKS[key.task],
        variation=key.episode % 2,
        episode=key.episode,
        seed=key.seed,
        instruction=f"{key.task} please",
        steps=steps,
        success=success,
        status=status,  # type: ignore[arg-type]
        seconds=0.5 + key.episode,
        **extra,
    )


def every(plan: RunPlan, steps: int, success: bool) -> dict[EpisodeKey, EpisodeRecord]:
    """The same outcome for every episode of the plan."""
    keys = plan.keys()
    return {key: record(key, steps=steps, success=success) for key in keys}


def plain_frames(count: int, seed: int) -> list[np.ndarray]:
    """Flat frames of distinct colours (so order survives the codec), with a little noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        colour = rng.integers(30, 225, size=3)
        noise = rng.integers(-3, 4, size=(*SIZE, 3))
        frames.append(np.clip(colour + noise, 0, 255).astype(np.uint8))
    return frames


def drive(
    callbacks: Sequence[EvalCallback],
    plan: RunPlan,
    out: Path,
    outcomes: dict[EpisodeKey, EpisodeRecord],
    done: Sequence[EpisodeRecord] = (),
    frames: dict[EpisodeKey, list[np.ndarray]] | None = None,
) -> RunInfo:
    """Emit a run's events as the runner does: each episode gets `steps` action steps and one
    final step with `action=None`, so `steps + 1` observations."""
    frames = frames or {}
    done_keys = {item.key for item in done}
    keys = plan.keys()
    todo = tuple(key for key in keys if key not in done_keys)
    run = RunInfo(plan=plan, out=out, done=tuple(done), todo=todo)
    for callback in callbacks:
        callback.on_run_start(run)
    for index, key in enumerate(todo):
        result = outcomes[key]
        info = EpisodeInfo(key, result.level, result.variation, result.instruction, worker=0)
        for callback in callbacks:
            callback.on_episode_start(key, info)
        images = frames.get(key) or plain_frames(result.steps + 1, seed=index)
        assert len(images) == result.steps + 1
        for step, image in enumerate(images):
            action = None if step == result.steps else np.zeros(9)
            for callback in callbacks:
                callback.on_step(key, step, observation(image), action)
        for callback in callbacks:
            callback.on_episode_end(result)
    everything = [*done, *(outcomes[key] for key in todo)]
    for callback in callbacks:
        callback.on_run_end(run, everything)
    return run


# --- video encoding -----------------------------------------------------------------------


def moving_square(count: int, height: int, width: int) -> list[np.ndarray]:
    frames = []
    for index in range(count):
        frame = np.full((height, width, 3), (30, 40, 50), np.uint8)
        x = 2 + 3 * index
        frame[8:24, x : x + 16] = (220, 60, 30)
        frames.append(frame)
    return frames


@pytest.mark.parametrize("size", [(48, 64), (33, 47)])
def test_encode_mp4_is_h264_and_decodes_to_the_frames(tmp_path: Path, size: tuple[int, int]):
    height, width = size
    frames = moving_square(12, height, width)
    path = encode_mp4(frames, tmp_path / "clip.mp4", fps=10)
    assert path == tmp_path / "clip.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temp file left
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 10
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == 12
    # Odd sizes are padded to even (yuv420p needs it), never scaled.
    assert decoded[0].shape == (height + height % 2, width + width % 2, 3)
    for original, back in zip(frames, decoded, strict=True):
        error = np.abs(back[:height, :width].astype(int) - original.astype(int)).mean()
        assert error < 5.0  # yuv420p halves colour resolution: the red square's edges blur
    # The square moved: consecutive decoded frames differ where it went.
    assert np.abs(decoded[0].astype(int) - decoded[-1].astype(int)).max() > 100
    assert [frame.shape for frame in read_mp4(path)] == [decoded[0].shape] * 12


def test_encode_mp4_rejects_bad_frames(tmp_path: Path):
    good = moving_square(2, 16, 16)
    with pytest.raises(ValueError, match="at least one frame"):
        encode_mp4([], tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        encode_mp4([f.astype(np.float32) for f in good], tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="frame 1 has shape"):
        encode_mp4([good[0], good[1][:8]], tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(good, tmp_path / "a.mp4", fps=0)
    assert list(tmp_path.iterdir()) == []


# --- progress bar -------------------------------------------------------------------------


def test_progress_bar_counts_the_whole_run_and_shows_success_and_errors(tmp_path: Path):
    plan = make_plan()
    keys = plan.keys()
    done = [record(keys[0], steps=3, success=True)]
    outcomes = {
        keys[1]: record(keys[1], steps=4, success=False),
        keys[2]: record(keys[2], steps=0, success=False, status="error", error_type="Crash"),
        keys[3]: record(keys[3], steps=2, success=True),
    }
    stream = io.StringIO()
    bar = ProgressBar(file=stream)
    seen: list[tuple[int, int, str]] = []

    class Spy(EvalCallback):
        def on_run_start(self, run: RunInfo) -> None:
            seen.append((bar.bar.n, bar.bar.total, bar.bar.postfix))

        def on_episode_end(self, result: EpisodeRecord) -> None:
            seen.append((bar.bar.n, bar.bar.total, bar.bar.postfix))

    drive([bar, Spy()], plan, tmp_path, outcomes, done=done)
    assert seen == [
        (1, 4, "success=100.0%, errors=0"),  # resumed: starts at the episode already done
        (2, 4, "success=50.0%, errors=0"),
        (3, 4, "success=33.3%, errors=1"),
        (4, 4, "success=50.0%, errors=1"),
    ]
    assert (bar.finished, bar.successes, bar.errors) == (4, 2, 1)
    assert "4/4" in stream.getvalue()
    assert "success=50.0%" in stream.getvalue()


def test_progress_bar_disabled_shows_nothing(tmp_path: Path, capsys: pytest.CaptureFixture):
    plan = make_plan()
    outcomes = every(plan, steps=1, success=True)
    bar = ProgressBar(enabled=False)
    drive([bar], plan, tmp_path, outcomes)
    assert bar.bar is None
    assert bar.finished == 4 and bar.success_rate == 100.0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --- video recorder -----------------------------------------------------------------------


def test_video_recorder_films_the_plans_first_episodes_of_the_first_seed(tmp_path: Path):
    plan = make_plan(episodes=(4, 2, 7), seeds=(5, 6))
    recorder = VideoRecorder(episodes_per_task=2, fps=5)
    chosen = recorder.chosen(plan)
    assert chosen == [
        EpisodeKey(task, episode, 5) for task in TASKS for episode in (2, 4)
    ]  # lowest episode numbers, first seed, whatever order the plan lists them in
    keys = plan.keys()
    steps = {key: 2 + index for index, key in enumerate(keys)}
    outcomes = {key: record(key, steps=steps[key], success=True) for key in keys}
    frames = {key: plain_frames(steps[key] + 1, seed=index) for index, key in enumerate(keys)}
    # A resumed run: one chosen episode was done (with its video) by an earlier invocation.
    done = [outcomes[chosen[0]]]
    drive([recorder], plan, tmp_path, outcomes, done=done, frames=frames)

    expected = [tmp_path / "videos" / video_name(key) for key in chosen[1:]]
    assert sorted(recorder.videos) == sorted(expected)
    assert sorted((tmp_path / "videos").iterdir()) == sorted(expected)
    for key, path in zip(chosen[1:], expected, strict=True):
        assert path.name == f"{key.task}_episode{key.episode}_seed{key.seed}.mp4"
        decoded = read_mp4(path)
        assert len(decoded) == steps[key] + 1  # every step, the final action=None one too
        assert decoded[0].shape == (*SIZE, 3)
        for original, back in zip(frames[key], decoded, strict=True):
            assert np.abs(back.astype(int) - original.astype(int)).mean() < 4.0
    assert recorder._frames == {}  # nothing kept once the videos are written


def test_video_recorder_rerecords_a_retried_episode_from_its_start(tmp_path: Path):
    plan = make_plan(episodes=(0,))
    recorder = VideoRecorder()
    key = plan.keys()[0]
    run = RunInfo(plan=plan, out=tmp_path, done=(), todo=tuple(plan.keys()))
    recorder.on_run_start(run)
    info = EpisodeInfo(key, "level1", 0, "x", worker=0)
    recorder.on_episode_start(key, info)
    for step in range(5):  # the worker crashes after 5 frames; the runner retries
        recorder.on_step(key, step, observation(plain_frames(1, step)[0]), np.zeros(9))
    recorder.on_episode_start(key, info)
    for step in range(3):
        action = None if step == 2 else np.zeros(9)
        recorder.on_step(key, step, observation(plain_frames(1, step)[0]), action)
    recorder.on_episode_end(record(key, steps=2, success=False))
    assert len(read_mp4(recorder.videos[0])) == 3


def test_video_recorder_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="episodes_per_task must be an integer >= 0"):
        VideoRecorder(episodes_per_task=-1)
    with pytest.raises(ValueError, match="episodes_per_task"):
        VideoRecorder(episodes_per_task=True)
    with pytest.raises(ValueError, match="camera must be a camera name"):
        VideoRecorder(camera="")
    with pytest.raises(ValueError, match="fps must be a positive number"):
        VideoRecorder(fps=0)
    plan = make_plan()
    outcomes = every(plan, steps=1, success=True)
    with pytest.raises(ValueError, match=r"camera 'wrist' is not in the observation .*front"):
        drive([VideoRecorder(camera="wrist")], plan, tmp_path, outcomes)
    nothing = VideoRecorder(episodes_per_task=0)
    drive([nothing], plan, tmp_path, outcomes)
    assert nothing.videos == [] and not (tmp_path / "videos").exists()


# --- W&B reporter -------------------------------------------------------------------------


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a `.wandb` file: W&B's LevelDB-style log (a 7-byte header,
    then 32 KiB blocks of chunks, each `crc32 u32, length u16, type u8, data`)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if position + 7 + length > len(data):  # still being written
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, middle/last
        if kind in (1, 4):
            item = wandb_internal_pb2.Record()
            item.ParseFromString(pending)
            records.append(item)
    return records


def finished_run(run_dir: Path, timeout: float = 30.0) -> list[Any]:
    """The records of an offline run once its `.wandb` file is complete.

    `run.finish()` returns before W&B's service process has flushed the file (in about one
    run in five here the file still held only its header), so wait for the exit record.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = list(run_dir.glob("*.wandb"))
        items = wandb_records(files[0]) if len(files) == 1 else []
        if items and items[-1].WhichOneof("record_type") == "exit":
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_dir}: no complete .wandb file after {timeout} s")
        time.sleep(0.05)


def summary_of(items: list[Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for item in items:
        if item.WhichOneof("record_type") == "summary":
            for update in item.summary.update:
                summary["/".join(update.nested_key) or update.key] = json.loads(update.value_json)
    return summary


@pytest.fixture
def wandb_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)


def two_seed_run(tmp_path: Path) -> tuple[RunPlan, dict[EpisodeKey, EpisodeRecord], Path]:
    """2 tasks x 2 episodes x 2 seeds; level1 task: 100 then 50; level2 task: 50 then 0,
    with one error episode (counts as a failure) and one planner error (an ok failure)."""
    plan = make_plan(seeds=(0, 1))
    toilet, jar = TASKS
    wins = {
        (toilet, 0, 0): True, (toilet, 1, 0): True, (jar, 0, 0): True, (jar, 1, 0): False,
        (toilet, 0, 1): True, (toilet, 1, 1): False, (jar, 0, 1): False, (jar, 1, 1): False,
    }  # fmt: skip
    outcomes = {}
    keys = plan.keys()
    for key in keys:
        if (key.task, key.episode, key.seed) == (jar, 1, 1):
            outcomes[key] = record(key, 0, False, status="error", error_type="WorkerCrashed")
        elif (key.task, key.episode, key.seed) == (jar, 1, 0):
            outcomes[key] = record(key, 3, False, error_type="InvalidActionError")
        else:
            outcomes[key] = record(key, 2 + key.episode + key.seed, wins[key.task, key.episode,
                                   key.seed])  # fmt: skip
    out = tmp_path / "my-experiment"
    out.mkdir()
    return plan, outcomes, out


def test_wandb_reporter_writes_an_offline_run_with_scores_table_chart_and_videos(
    tmp_path: Path, wandb_env: None
):
    plan, outcomes, out = two_seed_run(tmp_path)
    keys = plan.keys()
    done = [outcomes[keys[0]]]  # resumed: the first episode came from an earlier invocation
    recorder = VideoRecorder()
    reporter = WandbReporter()
    drive([recorder, reporter], plan, out, outcomes, done=done)
    assert reporter.run is None  # finished

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_dir = runs[0]
    assert reporter.run_dir == run_dir
    items = finished_run(run_dir)

    # Scores as AGNOSTOS aggregates them: task mean over seeds, level = mean over seeds of
    # each seed's task average; std is the population std over seeds.
    toilet, jar = TASKS
    expected = {
        f"eval/{toilet}/success": 75.0, f"eval/{toilet}/success_std": 25.0,
        f"eval/{jar}/success": 25.0, f"eval/{jar}/success_std": 25.0,
        "eval/success_level1": 75.0, "eval/success_level2": 25.0,
        "eval/success": 50.0, "eval/success_std": 25.0,
        "eval/errors": 1, f"eval/{jar}/errors": 1, f"eval/{toilet}/errors": 0,
        "eval/episodes": 8, "eval/missing": 0,
        # ok episodes only: toilet 2,3,3,4; jar 2, 3 (planner error), 3
        "eval/steps_mean": (2 + 3 + 3 + 4 + 2 + 3 + 3) / 7,
    }  # fmt: skip
    summary = summary_of(items)
    for name, value in expected.items():
        assert reporter.metrics[name] == pytest.approx(value), name
        assert summary[name] == pytest.approx(value), name
    assert summary["eval/eval_s"] > 0
    assert summary["progress/episodes"] == 8 and summary["progress/success"] == 50.0

    run_record = next(item.run for item in items if item.WhichOneof("record_type") == "run")
    assert run_record.run_group == "my-experiment" and run_record.job_type == "eval"
    config = {update.key: json.loads(update.value_json) for update in run_record.config.update}
    assert config["plan"]["tasks"] == TASKS and config["plan"]["seeds"] == [0, 1]
    assert config["agent_settings"] == {"demos": 3}

    # The per-episode table, in plan order, resumed episode included.
    media = run_dir / "files" / "media"
    (table_file,) = (media / "table" / "eval").glob("episodes_table_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == [
        "task", "level", "variation", "episode", "seed", "instruction", "steps", "success",
        "status", "error_type", "seconds",
    ]  # fmt: skip
    assert len(table["data"]) == 8
    rows = {(row[0], row[3], row[4]): row for row in table["data"]}
    assert [(row[0], row[3], row[4]) for row in table["data"]] == [
        (key.task, key.episode, key.seed) for key in keys
    ]
    assert rows[jar, 1, 1][6:10] == [0, False, "error", "WorkerCrashed"]
    assert rows[toilet, 0, 0][7] is True

    # The bar chart: its own table of task vs mean success, and its Vega panel.
    (bar_file,) = (media / "table" / "eval").glob("per_task_bar_table_*.table.json")
    bar = json.loads(bar_file.read_text())
    assert bar["columns"] == ["task", "success"]
    assert bar["data"] == [[toilet, 75.0], [jar, 25.0]]
    panels = [
        update
        for item in items
        if item.WhichOneof("record_type") == "config"
        for update in item.config.update
        if list(update.nested_key) == ["_wandb", "visualize", "eval/per_task_bar"]
    ]
    assert panels and json.loads(panels[0].value_json)["panel_config"]["panelDefId"] == (
        "wandb/bar/v0"
    )

    # One video per task (first episode, first seed), the resumed one absent: it was done
    # before this invocation and had no recorder then.
    assert [path.name for path in recorder.videos] == [f"{jar}_episode0_seed0.mp4"]
    logged = sorted((media / "videos" / "eval" / "video").glob("*.mp4"))
    assert len(logged) == 1 and logged[0].name.startswith(f"{jar}_")
    assert logged[0].read_bytes() == recorder.videos[0].read_bytes()
    assert len(read_mp4(logged[0])) == outcomes[keys[2]].steps + 1
    assert summary[f"eval/video/{jar}/captions"] == ["episode 0, seed 0: success in 2 steps"]


def test_wandb_reporter_logs_videos_from_earlier_invocations(tmp_path: Path, wandb_env: None):
    plan = make_plan()
    outcomes = every(plan, steps=2, success=False)
    out = tmp_path / "run"
    # An earlier invocation filmed every episode of this run.
    first = VideoRecorder(episodes_per_task=2)
    drive([first], plan, out, outcomes)
    assert len(first.videos) == 4
    reporter = WandbReporter(videos=True, group="g", name="resumed")
    drive([reporter], plan, out, outcomes, done=list(outcomes.values()))
    summary = summary_of(finished_run(reporter.run_dir))
    toilet, jar = TASKS
    assert summary[f"eval/video/{toilet}/count"] == 2
    assert summary[f"eval/video/{jar}/captions"] == [
        "episode 0, seed 0: failure in 2 steps",
        "episode 1, seed 0: failure in 2 steps",
    ]
    assert summary["eval/success"] == 0.0
    assert len(list((reporter.run_dir / "files" / "media" / "videos").rglob("*.mp4"))) == 4

    quiet = WandbReporter(videos=False)
    drive([quiet], plan, out, outcomes, done=list(outcomes.values()))
    assert not (quiet.run_dir / "files" / "media" / "videos").exists()


def test_wandb_reporter_finishes_its_run_when_reporting_fails(
    tmp_path: Path, wandb_env: None, monkeypatch: pytest.MonkeyPatch
):
    import wandb

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("chart failed")

    monkeypatch.setattr(wandb.plot, "bar", broken)
    plan = make_plan()
    outcomes = every(plan, steps=1, success=True)
    reporter = WandbReporter()
    with pytest.raises(RuntimeError, match="chart failed"):
        drive([reporter], plan, tmp_path, outcomes)
    assert reporter.run is None
    items = finished_run(reporter.run_dir)  # raises unless the run got its exit record
    assert not any(
        item.WhichOneof("record_type") == "history"
        and any(update.key == "eval/success" for update in item.history.item)
        for item in items
    )


def test_wandb_reporter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of online, offline, disabled"):
        WandbReporter(mode="dryrun")
    with pytest.raises(ValueError, match="project"):
        WandbReporter(project="")
    with pytest.raises(RuntimeError, match="on_run_start was not called"):
        WandbReporter().on_run_end(RunInfo(make_plan(), Path("."), (), ()), [])
