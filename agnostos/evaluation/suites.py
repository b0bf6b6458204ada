"""Evaluation suites: which stored test episodes an evaluation runs, on which simulator.

AGNOSTOS evaluates on *stored* test episodes: episode i of a task is the scene saved with
its demo (RLBench's `reset_to_demo(i)` from the test data folder; minibench's
`reset_to_state` from the random state `agnostos sim generate` stored). A suite names the
benchmark's tasks (with their levels), how many episodes per task, the step limit (25
keyframe steps in AGNOSTOS), the seeds (repeats of the whole suite), the cameras and image
size the simulator renders, the backend and the test data folder.

Shipped suite configs (`configs/eval/`): the AGNOSTOS unseen 23 (Level-1 13, Level-2 10)
and seen 18 on RLBench, and minibench's unseen 6 and seen 6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agnostos.shards.episode import CAMERAS
from agnostos.tasks import SUITES, get_suite

__all__ = ["BACKENDS", "SuiteConfig", "SuiteError", "episode_folder"]

BACKENDS = ("minibench", "rlbench")
SEEN_LEVEL = "seen"


class SuiteError(ValueError):
    """A suite setting or test-data problem, named before any episode runs."""


def episode_folder(test_data: str | Path, task: str, episode: int) -> Path:
    """Where a stored test episode lives (RLBench's layout, as the AGNOSTOS test data)."""
    return Path(test_data) / task / "all_variations" / "episodes" / f"episode{episode}"


@dataclass(frozen=True)
class SuiteConfig:
    """One evaluation suite.

    Args:
        benchmark: the task registry the tasks come from (`agnostos` or `minibench`).
        split: `unseen` (the cross-task test tasks) or `seen` (in-distribution success).
        tasks: a subset of the split's tasks (default: all, in canonical order).
        episodes: stored test episodes per task (AGNOSTOS: 25), episodes 0..N-1.
        max_steps: keyframe steps before an episode counts as failed (AGNOSTOS: 25).
        seeds: evaluation seeds; each repeats the whole suite with its own RNG state.
        cameras: cameras the simulator renders for the agent.
        image_size: square render size (RLBench data: 128; X-ICM's custom agents: 256).
        backend: `minibench`, `rlbench` (CoppeliaSim, the `rlbench` extra), or
            `package.module:factory` for a factory `(image_size, cameras) -> Environment`.
        test_data: folder of stored test episodes, `<task>/all_variations/episodes/episode<i>`.
        generate_missing: minibench only: write missing test episodes with `sim generate`.
        test_seed: minibench only: the scene seed of generated test episodes (the demo
            bank uses seed 0, so the default 1 gives test scenes the bank never saw).
    """

    benchmark: str = "minibench"
    split: Literal["unseen", "seen"] = "unseen"
    tasks: list[str] | None = None
    episodes: int = 25
    max_steps: int = 25
    seeds: list[int] = field(default_factory=lambda: [0])
    cameras: list[str] = field(default_factory=lambda: list(CAMERAS))
    image_size: int = 128
    backend: str = "minibench"
    test_data: str = "data/minibench/test"
    generate_missing: bool = True
    test_seed: int = 1

    def __post_init__(self) -> None:
        if self.benchmark not in SUITES:
            raise SuiteError(
                f"suite.benchmark: unknown benchmark {self.benchmark!r}; "
                f"choose from {', '.join(sorted(SUITES))}"
            )
        if self.split not in ("unseen", "seen"):
            raise SuiteError(f"suite.split must be unseen or seen, got {self.split!r}")
        known = self._split_tasks()
        if self.tasks is not None:
            unknown = [task for task in self.tasks if task not in known]
            if unknown or not self.tasks:
                raise SuiteError(
                    f"suite.tasks: unknown {self.split} task(s) {unknown} of {self.benchmark} "
                    f"(or none); choose from {', '.join(known)}"
                )
        for name in ("episodes", "max_steps", "image_size"):
            if getattr(self, name) < 1:
                raise SuiteError(f"suite.{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SuiteError(f"suite.seeds must be distinct and not empty, got {self.seeds}")
        bad = [camera for camera in self.cameras if camera not in CAMERAS]
        if bad or not self.cameras:
            raise SuiteError(
                f"suite.cameras: unknown camera(s) {bad} (or none); choose from "
                f"{', '.join(CAMERAS)}"
            )
        if self.backend not in BACKENDS and ":" not in self.backend:
            raise SuiteError(
                f"suite.backend: unknown backend {self.backend!r}; choose from "
                f"{', '.join(BACKENDS)} or give package.module:factory"
            )

    def check_backend(self) -> None:
        """The backend can be loaded here, before any worker starts (one clear error if not)."""
        import importlib
        import importlib.util

        if self.backend == "rlbench":
            missing = [
                name for name in ("rlbench", "pyrep") if importlib.util.find_spec(name) is None
            ]
            if missing:
                raise SuiteError(
                    f"suite.backend: rlbench needs {' and '.join(missing)}, which cannot be "
                    "imported here: install CoppeliaSim 4.1.0, PyRep and the PerAct fork of "
                    "RLBench (docs/rlbench.md), or choose backend: minibench"
                )
        elif self.backend != "minibench":
            module, _, name = self.backend.partition(":")
            try:
                factory = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as error:
                raise SuiteError(f"suite.backend: cannot load {self.backend!r} ({error})") from None
            if not callable(factory):
                raise SuiteError(f"suite.backend: {self.backend!r} is not callable")

    def _split_tasks(self) -> tuple[str, ...]:
        suite = get_suite(self.benchmark)
        return suite.unseen if self.split == "unseen" else suite.seen

    def task_levels(self) -> dict[str, str]:
        """The suite's tasks in canonical order, each with its level (`seen` on that split)."""
        suite = get_suite(self.benchmark)
        chosen = set(self.tasks) if self.tasks is not None else None
        ordered = [task for task in self._split_tasks() if chosen is None or task in chosen]
        if self.split == "seen":
            return {task: SEEN_LEVEL for task in ordered}
        return {task: suite.level_of(task) for task in ordered}

    def episode_numbers(self) -> list[int]:
        return list(range(self.episodes))

    def settings(self) -> dict[str, Any]:
        """What changes results (part of the run fingerprint); test_data's path is not,
        generation options are (they decide which scenes are stored)."""
        return {
            "benchmark": self.benchmark,
            "split": self.split,
            "tasks": list(self.task_levels()),
            "episodes": self.episodes,
            "max_steps": self.max_steps,
            "seeds": list(self.seeds),
            "cameras": list(self.cameras),
            "image_size": self.image_size,
            "backend": self.backend,
            "test_seed": self.test_seed if self.backend == "minibench" else None,
        }

    def missing_episodes(self) -> list[Path]:
        """Stored test episodes the suite needs that are not in `test_data`."""
        return [
            folder
            for task in self.task_levels()
            for episode in self.episode_numbers()
            if not (folder := episode_folder(self.test_data, task, episode)).is_dir()
        ]

    def prepare_test_data(self, workers: int = 1, progress: bool = True) -> list[Path]:
        """Make sure every stored test episode exists; returns the ones it generated.

        On minibench, missing episodes are generated with the suite's test seed (when
        `generate_missing`); elsewhere, a missing episode is an error naming the folder.
        """
        missing = self.missing_episodes()
        if not missing:
            return []
        if self.backend != "minibench" or not self.generate_missing:
            listed = ", ".join(str(path) for path in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise SuiteError(f"suite.test_data: missing stored test episodes: {listed}{more}")
        from agnostos.envs.minibench.generate import generate

        tasks = sorted({path.parent.parent.parent.name for path in missing}, key=self._order)
        generate(
            tasks, self.episodes, self.test_data, seed=self.test_seed,
            image_size=self.image_size, workers=workers, progress=progress,
        )  # fmt: skip
        return missing

    def _order(self, task: str) -> int:
        return list(self.task_levels()).index(task)
