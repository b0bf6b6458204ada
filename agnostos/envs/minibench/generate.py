"""Scripted demos written in RLBench's on-disk layout (`agnostos sim generate`).

Each episode is recorded by running the task's scripted keyframe actions through the same
`step()` an agent uses, with a frame recorded at every control step. A demo is kept only if
the task succeeded and the PerAct keyframe heuristic finds exactly the scripted waypoints;
otherwise the next seed is tried and the failure is counted in the summary, never written.
Episodes are written to a temporary folder and renamed, so an interrupted run resumes by
skipping the episodes that are already complete.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from agnostos.atomic import TMP_SUFFIX, atomic_write_json
from agnostos.envs.protocol import Observation
from agnostos.shards.codecs import depth_to_rgb, encode_png, mask_to_rgb
from agnostos.shards.episode import CAMERAS, MODALITIES
from agnostos.shards.folders import ALL_VARIATIONS, write_episode_folder
from agnostos.shards.keyframes import discover_keyframes

SUMMARY_NAME = "generate-summary.json"
MAX_ATTEMPTS = 20


@dataclass
class RecordedDemo:
    task: str
    variation: int
    frames: list[Observation]
    keyframes: list[int]  # frame index where each scripted action finished
    descriptions: tuple[str, ...]
    random_state: tuple
    success: bool
    error: str | None


@dataclass
class TaskSummary:
    written: int = 0
    already_present: int = 0
    failed_attempts: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    frames: int = 0


def record_demo(env, task: str, variation: int, episode: int, seed: int, attempt: int):
    """Run the scripted solution once, recording every frame."""
    frames: list[Observation] = []
    env.on_frame = frames.append
    try:
        env.reset(task, variation, episode, seed, attempt)
        random_state = env.random_state
        keyframes: list[int] = []
        result = None
        for action in env.scripted_actions():
            result = env.step(action)
            keyframes.append(len(frames) - 1)
            if result.terminal:
                break
    finally:
        env.on_frame = None
    return RecordedDemo(
        task,
        variation,
        frames,
        keyframes,
        env.descriptions,
        random_state,
        bool(result is not None and result.success),
        None if result is None else result.error,
    )


def demo_problem(demo: RecordedDemo) -> str | None:
    """Why a recorded demo must not be written, or None if it is good."""
    if not demo.success:
        return f"scripted demo failed ({demo.error})" if demo.error else "scripted demo failed"
    found = discover_keyframes(
        np.array([frame.gripper_open for frame in demo.frames]),
        np.array([frame.joint_velocities for frame in demo.frames]),
    )
    if found != demo.keyframes:
        return "keyframe heuristic disagrees with the scripted waypoints"
    return None


def frame_attributes(observation: Observation, cameras: Sequence[str]) -> dict:
    """An Observation's RLBench attributes (low-dim fields and `misc`)."""
    misc: dict = {}
    for camera in cameras:
        frame = observation.cameras[camera]
        misc[f"{camera}_camera_intrinsics"] = frame.intrinsics
        misc[f"{camera}_camera_extrinsics"] = frame.extrinsics
        misc[f"{camera}_camera_near"] = float(frame.near)
        misc[f"{camera}_camera_far"] = float(frame.far)
        visible = np.unique(frame.mask)
        misc[f"{camera}_mask_id_to_name"] = {
            int(handle): observation.mask_names[int(handle)]
            for handle in visible
            if int(handle) in observation.mask_names
        }
    return {
        "gripper_pose": observation.gripper_pose,
        "gripper_open": float(observation.gripper_open),
        "joint_positions": observation.joint_positions,
        "joint_velocities": observation.joint_velocities,
        **observation.low_dim,
        "misc": misc,
    }


def frame_pngs(observation: Observation, camera: str) -> dict[str, bytes]:
    """rgb, depth and mask PNGs of one camera, in RLBench's encodings."""
    frame = observation.cameras[camera]
    return {
        "rgb": encode_png(frame.rgb),
        "depth": encode_png(depth_to_rgb(frame.depth, frame.near, frame.far)),
        "mask": encode_png(mask_to_rgb(frame.mask)),
    }


def write_demo(episode_dir: Path, demo: RecordedDemo, cameras: Sequence[str]) -> None:
    """Write one episode folder atomically (temp folder + rename)."""
    images: dict[tuple[str, str], list[bytes]] = {
        (camera, modality): [] for camera in cameras for modality in MODALITIES
    }
    for observation in demo.frames:
        for camera in cameras:
            for modality, data in frame_pngs(observation, camera).items():
                images[(camera, modality)].append(data)
    tmp = episode_dir.with_name(episode_dir.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    write_episode_folder(
        tmp,
        [frame_attributes(observation, cameras) for observation in demo.frames],
        images,
        demo.descriptions,
        demo.variation,
        demo.random_state,
    )
    tmp.rename(episode_dir)


# -- the generation job ---------------------------------------------------------------------


@dataclass(frozen=True)
class EpisodeJob:
    task: str
    variation: int
    episode: int
    seed: int
    out: str
    image_size: int


_WORKER_ENV = None


def _env(image_size: int):
    global _WORKER_ENV
    if _WORKER_ENV is None or _WORKER_ENV.image_size != image_size:
        from agnostos.envs.minibench.env import MiniBenchEnv

        _WORKER_ENV = MiniBenchEnv(image_size=image_size)
    return _WORKER_ENV


def episode_dir(out: str | Path, task: str, episode: int) -> Path:
    return Path(out) / task / ALL_VARIATIONS / "episodes" / f"episode{episode}"


def run_job(job: EpisodeJob) -> tuple[str, int, list[str]]:
    """Record until a good demo is written; returns (task, frames, failure reasons)."""
    env = _env(job.image_size)
    failures: list[str] = []
    for attempt in range(MAX_ATTEMPTS):
        demo = record_demo(env, job.task, job.variation, job.episode, job.seed, attempt)
        problem = demo_problem(demo)
        if problem is None:
            write_demo(episode_dir(job.out, job.task, job.episode), demo, CAMERAS)
            return job.task, len(demo.frames), failures
        failures.append(problem)
    raise RuntimeError(
        f"{job.task} episode {job.episode}: no good scripted demo in {MAX_ATTEMPTS} seeds "
        f"({failures[-1]})"
    )


def check_generate_arguments(
    tasks: Sequence[str], episodes: int, image_size: int = 128, workers: int = 1
) -> None:
    """Refuse bad arguments of `generate` before any folder is made or scene is built.

    An unknown task is a KeyError naming the known ones; a count below 1, an empty or
    repeated task list is a ValueError naming the argument. `agnostos sim generate` calls
    this first so it can tell a bad command (exit 2) from a failed run (exit 1).
    """
    from agnostos.envs.minibench.tasks import TASKS

    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a sequence of task names, not the string {tasks!r}")
    if not tasks:
        raise ValueError("tasks: at least one minibench task is needed")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise KeyError(f"unknown minibench task {unknown[0]!r}; known: {', '.join(sorted(TASKS))}")
    repeated = sorted({task for task in tasks if list(tasks).count(task) > 1})
    if repeated:
        raise ValueError(f"tasks: {', '.join(repeated)} listed more than once")
    for name, value in (("episodes", episodes), ("image_size", image_size), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def generate(
    tasks: Sequence[str],
    episodes: int,
    out: str | Path,
    seed: int = 0,
    image_size: int = 128,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, TaskSummary]:
    """Write `episodes` demos of every task under `out`; variations cycle over episodes."""
    from agnostos.envs.minibench.tasks import TASKS

    check_generate_arguments(tasks, episodes, image_size, workers)
    out = Path(out)
    summary = {task: TaskSummary() for task in tasks}
    jobs = []
    for task in tasks:
        (out / task / ALL_VARIATIONS / "episodes").mkdir(parents=True, exist_ok=True)
        for episode in range(episodes):
            if episode_dir(out, task, episode).is_dir():
                summary[task].already_present += 1
                continue
            variation = episode % TASKS[task].variations
            jobs.append(EpisodeJob(task, variation, episode, seed, str(out), image_size))
    started = time.monotonic()
    from tqdm import tqdm

    with tqdm(total=len(jobs), unit="ep", disable=not progress) as bar:
        for task, frames, failures in _run_all(jobs, workers):
            record = summary[task]
            record.written += 1
            record.frames += frames
            record.failed_attempts += len(failures)
            for reason in failures:
                record.failure_reasons[reason] = record.failure_reasons.get(reason, 0) + 1
            bar.update(1)
    atomic_write_json(
        out / SUMMARY_NAME,
        {
            "seed": seed,
            "image_size": image_size,
            "episodes_per_task": episodes,
            "seconds": round(time.monotonic() - started, 2),
            "tasks": {task: asdict(record) for task, record in summary.items()},
        },
    )
    return summary


def _run_all(jobs: list[EpisodeJob], workers: int):
    if workers <= 1:
        for job in jobs:
            yield run_job(job)
        return
    context = multiprocessing.get_context("spawn")  # a fresh GL context per process
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(run_job, jobs)
