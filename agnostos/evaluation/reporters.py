"""Evaluation reporters: the progress bar, the rollout video recorder and the W&B reporter.

Each is an `EvalCallback` (see `callbacks.py`) and only reports; the records file stays the
ground truth. The W&B reporter therefore computes everything it logs from the records it is
handed at run end (those of earlier invocations and other shards included), never from
counts it kept itself, so a resumed or sharded run reports the same numbers as one that ran
in one go.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from agnostos.evaluation.callbacks import EpisodeInfo, EvalCallback, RunInfo
from agnostos.evaluation.records import EpisodeKey, EpisodeRecord, RunPlan
from agnostos.evaluation.video import DEFAULT_FPS, encode_mp4

if TYPE_CHECKING:
    from tqdm import tqdm

    from agnostos.envs.protocol import Observation

__all__ = [
    "VIDEO_FOLDER",
    "ProgressBar",
    "VideoRecorder",
    "WandbReporter",
    "video_name",
]

VIDEO_FOLDER = "videos"
WANDB_MODES = ("online", "offline", "disabled")
_VIDEO_NAME = re.compile(r"^(?P<task>.+)_episode(?P<episode>\d+)_seed(?P<seed>-?\d+)\.mp4$")


def video_name(key: EpisodeKey) -> str:
    """The file name of an episode's video inside `<out>/videos/`."""
    return f"{key.task}_episode{key.episode}_seed{key.seed}.mp4"


class ProgressBar(EvalCallback):
    """A tqdm bar over the run's episodes, with the success rate and error count so far.

    The bar counts the whole run (`done + todo`) and starts at the episodes already done, so
    a resumed run shows how far the evaluation is, not how far this invocation is, and
    tqdm's ETA is based on this invocation's pace only. Success and errors include the
    resumed records too.
    """

    def __init__(self, enabled: bool = True, desc: str = "eval", file: IO[str] | None = None):
        self.enabled = enabled
        self.desc = desc
        self.file = file
        self.bar: tqdm | None = None
        self.finished = 0
        self.successes = 0
        self.errors = 0

    @property
    def success_rate(self) -> float:
        """Percentage of finished episodes that succeeded (an error counts as a failure)."""
        return 100.0 * self.successes / self.finished if self.finished else 0.0

    def _count(self, record: EpisodeRecord) -> None:
        self.finished += 1
        self.successes += int(record.success)
        self.errors += int(record.status == "error")

    def _postfix(self) -> None:
        if self.bar is not None:
            postfix = {"success": f"{self.success_rate:.1f}%", "errors": self.errors}
            self.bar.set_postfix(ordered_dict=postfix)  # kwargs would be sorted by name

    def on_run_start(self, run: RunInfo) -> None:
        from tqdm import tqdm

        self.close()
        self.finished = self.successes = self.errors = 0
        for record in run.done:
            self._count(record)
        if self.enabled:
            self.bar = tqdm(
                total=len(run.done) + len(run.todo),
                initial=len(run.done),
                desc=self.desc,
                unit="episode",
                file=self.file,
                dynamic_ncols=True,
            )
            self._postfix()

    def on_episode_end(self, record: EpisodeRecord) -> None:
        self._count(record)
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()

    def on_run_end(self, run: RunInfo, records: Sequence[EpisodeRecord]) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar (it keeps its counts, `n` and `postfix`, for reading afterwards)."""
        if self.bar is not None:
            self.bar.close()


class VideoRecorder(EvalCallback):
    """Records one camera of the first `episodes_per_task` episodes of each task as mp4.

    Which episodes is decided from the plan alone: the lowest episode numbers of each task,
    under the plan's first seed. A resumed run, or another shard of the same run, therefore
    records the same episodes (those it runs), and the folder ends up with one video per
    chosen episode however the run was split. Frames are kept only for chosen episodes in
    progress, and dropped once their video is written, at the end of the episode, to
    `<out>/videos/<task>_episode<i>_seed<s>.mp4`. `videos` lists the files written by this
    invocation.
    """

    def __init__(
        self, camera: str = "front", episodes_per_task: int = 1, fps: float = DEFAULT_FPS
    ) -> None:
        if not isinstance(camera, str) or not camera:
            raise ValueError(f"VideoRecorder camera must be a camera name, got {camera!r}")
        if (
            isinstance(episodes_per_task, bool)
            or not isinstance(episodes_per_task, int)
            or episodes_per_task < 0
        ):
            raise ValueError(
                f"VideoRecorder episodes_per_task must be an integer >= 0, got "
                f"{episodes_per_task!r}"
            )
        if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"VideoRecorder fps must be a positive number, got {fps!r}")
        self.camera = camera
        self.episodes_per_task = episodes_per_task
        self.fps = fps
        self.videos: list[Path] = []
        self._folder: Path | None = None
        self._chosen: frozenset[EpisodeKey] = frozenset()
        self._frames: dict[EpisodeKey, list[np.ndarray]] = {}

    def chosen(self, plan: RunPlan) -> list[EpisodeKey]:
        """The episodes this recorder films in a run of `plan`, in the plan's task order."""
        if not plan.seeds or self.episodes_per_task == 0:
            return []
        episodes = sorted(plan.episodes)[: self.episodes_per_task]
        return [
            EpisodeKey(task, episode, plan.seeds[0]) for task in plan.tasks for episode in episodes
        ]

    def on_run_start(self, run: RunInfo) -> None:
        self._folder = run.out / VIDEO_FOLDER
        self._chosen = frozenset(self.chosen(run.plan))
        self._frames = {}
        self.videos = []

    def on_episode_start(self, key: EpisodeKey, info: EpisodeInfo) -> None:
        if key in self._chosen:
            self._frames[key] = []  # a retried episode starts its video again

    def on_step(
        self, key: EpisodeKey, step: int, observation: Observation, action: np.ndarray | None
    ) -> None:
        if key not in self._chosen:
            return
        frame = observation.cameras.get(self.camera)
        if frame is None:
            raise ValueError(
                f"VideoRecorder camera {self.camera!r} is not in the observation of {key} "
                f"(cameras: {', '.join(sorted(observation.cameras)) or 'none'})"
            )
        if step == 0:
            self._frames[key] = []
        # A copy: an environment may reuse its buffers for the next observation.
        self._frames.setdefault(key, []).append(np.array(frame.rgb, dtype=np.uint8, copy=True))

    def on_episode_end(self, record: EpisodeRecord) -> None:
        frames = self._frames.pop(record.key, None)
        if not frames:  # not chosen, or it failed before its first observation
            return
        if self._folder is None:
            raise RuntimeError("VideoRecorder: on_run_start was not called")
        path = encode_mp4(frames, self._folder / video_name(record.key), fps=self.fps)
        self.videos.append(path)

    def on_run_end(self, run: RunInfo, records: Sequence[EpisodeRecord]) -> None:
        self._frames.clear()


class WandbReporter(EvalCallback):
    """One W&B run per evaluation (`job_type="eval"`), logged from the records at run end.

    The run starts at run start, logs `progress/episodes` and `progress/success` as episodes
    finish (to watch a long run online), and at run end logs the scores (`eval/success`,
    `eval/success_<level>`, `eval/<task>/success`, percentages; error counts; mean steps),
    a table with one row per episode (`eval/episodes_table`), a per-task bar chart
    (`eval/per_task_bar`) and the mp4 files under `<out>/videos/` (`eval/video/<task>`),
    which a `VideoRecorder` wrote in this run or an earlier invocation of it.

    Offline by default: the run is written to `<out>/wandb/offline-run-*` and uploaded later
    with `wandb sync`. `group` defaults to the name of the run folder, so evaluations of one
    experiment sit together.
    """

    def __init__(
        self,
        project: str = "agnostos-eval",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        mode: str = "offline",
        videos: bool = True,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(
                f"WandbReporter mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}"
            )
        if not isinstance(project, str) or not project:
            raise ValueError(f"WandbReporter project must be a non-empty name, got {project!r}")
        self.project = project
        self.entity = entity
        self.group = group
        self.name = name
        self.mode = mode
        self.videos = videos
        self.run: Any = None
        self.run_dir: Path | None = None
        self.metrics: dict[str, float] = {}
        self._started = 0.0
        self._finished = 0
        self._successes = 0

    def on_run_start(self, run: RunInfo) -> None:
        import wandb

        self._started = time.monotonic()
        self._finished = len(run.done)
        self._successes = sum(record.success for record in run.done)
        plan = run.plan
        config = {
            **plan.config,
            "plan": {
                "suite": plan.suite,
                "tasks": plan.tasks,
                "episodes": plan.episodes,
                "seeds": plan.seeds,
                "max_steps": plan.max_steps,
                "agent": plan.agent,
                "fingerprint": plan.fingerprint,
            },
            "shard": run.shard,
            "shards": run.shards,
        }
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group or run.out.resolve().name,
            name=self.name,
            job_type="eval",
            dir=str(run.out),
            mode=self.mode,
            config=config,
            # Never finish a run this process already has open (a training run evaluating
            # itself): the evaluation gets a run of its own beside it.
            reinit="create_new",
        )
        self.run_dir = Path(self.run.dir).parent if self.mode != "disabled" else None

    def on_episode_end(self, record: EpisodeRecord) -> None:
        self._finished += 1
        self._successes += int(record.success)
        if self.run is not None:
            self.run.log(
                {
                    "progress/episodes": self._finished,
                    "progress/success": 100.0 * self._successes / self._finished,
                }
            )

    def on_run_end(self, run: RunInfo, records: Sequence[EpisodeRecord]) -> None:
        import wandb

        if self.run is None:
            raise RuntimeError("WandbReporter: on_run_start was not called")
        try:
            ordered = _plan_order(run.plan, records)
            self.metrics = {
                **_score_metrics(run.plan, ordered),
                "eval/eval_s": time.monotonic() - self._started,
            }
            payload: dict[str, Any] = dict(self.metrics)
            payload["eval/episodes_table"] = _episodes_table(wandb, ordered)
            per_task = [
                [task, self.metrics[f"eval/{task}/success"]]
                for task in run.plan.tasks
                if f"eval/{task}/success" in self.metrics
            ]
            payload["eval/per_task_bar"] = wandb.plot.bar(
                wandb.Table(columns=["task", "success"], data=per_task),
                "task",
                "success",
                title="Success rate by task (%)",
            )
            if self.videos:
                payload.update(_videos(wandb, run.out / VIDEO_FOLDER, ordered))
            self.run.log(payload)
        finally:
            self.run.finish()
            self.run = None


def _plan_order(plan: RunPlan, records: Sequence[EpisodeRecord]) -> list[EpisodeRecord]:
    """Records in the plan's order (seeds, then tasks, then episodes)."""
    position = {key: index for index, key in enumerate(plan.keys())}
    return sorted(records, key=lambda record: (position.get(record.key, len(position)), record.key))


def _score_metrics(plan: RunPlan, records: Sequence[EpisodeRecord]) -> dict[str, float]:
    """The run's scalar metrics, from `score_records` (AGNOSTOS aggregation), in percent.

    Per task: the mean (and population std) over seeds of its success rate; per level and
    overall: over seeds of each seed's average over the tasks; an error episode counts as a
    failure. A score that cannot be computed (no records yet) is left out rather than logged
    as 0, and the gaps are counted in `eval/missing`. Steps are averaged over evaluated
    ("ok") episodes, since an episode that could not be evaluated has no meaningful length.
    """
    from agnostos.evaluation.scores import score_records

    table = score_records(plan, records)
    metrics: dict[str, float] = {}

    def put(key: str, mean: float | None, std: float | None) -> None:
        if mean is not None:
            metrics[key] = mean
        if std is not None:
            metrics[f"{key}_std"] = std

    put("eval/success", table.overall.mean, table.overall.std)
    for level, average in table.levels.items():
        put(f"eval/success_{level}", average.mean, average.std)
    for score in table.tasks:
        put(f"eval/{score.task}/success", score.mean, score.std)
        metrics[f"eval/{score.task}/errors"] = len(score.errors)
    metrics["eval/episodes"] = len(records)
    metrics["eval/errors"] = len(table.errors)
    metrics["eval/missing"] = len(table.missing_episodes)
    evaluated = [record.steps for record in records if record.status == "ok"]
    if evaluated:
        metrics["eval/steps_mean"] = float(np.mean(evaluated))
    return metrics


_TABLE_COLUMNS = [
    "task", "level", "variation", "episode", "seed", "instruction", "steps", "success",
    "status", "error_type", "seconds",
]  # fmt: skip


def _episodes_table(wandb: Any, records: Sequence[EpisodeRecord]) -> Any:
    return wandb.Table(
        columns=_TABLE_COLUMNS,
        data=[[getattr(record, column) for column in _TABLE_COLUMNS] for record in records],
    )


def _videos(wandb: Any, folder: Path, records: Sequence[EpisodeRecord]) -> dict[str, Any]:
    """`eval/video/<task>`: that task's videos in the folder (a list, by episode and seed),
    each captioned with its episode, seed and outcome; a file not named by `video_name`
    (put there by hand) is logged under its own name, uncaptioned."""
    by_key = {record.key: record for record in records}
    found: dict[str, list[tuple[EpisodeKey | None, Path]]] = defaultdict(list)
    for path in sorted(folder.glob("*.mp4")):
        match = _VIDEO_NAME.match(path.name)
        if match is None:
            found[path.stem].append((None, path))
        else:
            key = EpisodeKey(match["task"], int(match["episode"]), int(match["seed"]))
            found[key.task].append((key, path))
    logged = {}
    for name, items in found.items():
        videos = []
        for key, path in sorted(items, key=lambda item: (item[0] or EpisodeKey("", 0, 0), item[1])):
            caption = None
            if key is not None:
                caption = f"episode {key.episode}, seed {key.seed}"
                record = by_key.get(key)
                if record is not None:
                    outcome = "success" if record.success else record.error_type or "failure"
                    caption += f": {outcome} in {record.steps} steps"
            videos.append(wandb.Video(str(path), caption=caption, format="mp4"))
        logged[f"eval/video/{name}"] = videos
    return logged
