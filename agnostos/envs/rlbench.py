"""RLBenchEnv: the environment protocol on real RLBench (CoppeliaSim), set up as X-ICM does.

This backend is optional (the `rlbench` extra plus CoppeliaSim 4.1.0, PyRep and the PerAct
fork of RLBench; see docs/rlbench.md). Importing this module imports neither `rlbench` nor
`pyrep`: they are imported by the `RLBenchEnv` constructor, which raises `RLBenchUnavailable`
when they cannot be loaded. Nothing else in agnostos imports this module except the
evaluator's worker, and only for `backend: rlbench`.

Everything here follows X-ICM (jiaming-zhou/X-ICM @ 0a8cd6cd) and the PerAct fork of RLBench
(MohitShridhar/RLBench, branch peract @ ad991951):

- Observation config: X-ICM `main.py:create_obs_config` (L38-72). One shared
  `CameraConfig(rgb=True, point_cloud=True, mask=True, depth=False, image_size=IMAGE_SIZE,
  render_mode=RenderMode.OPENGL)` for every used camera, `CameraConfig().set_all(False)` for
  the others; low-dim `joint_positions`, `joint_velocities`, `gripper_pose`, `gripper_open`,
  `gripper_matrix`, `gripper_joint_positions` on and `joint_forces`, `task_low_dim_state`,
  `gripper_touch_forces` off.
- Action mode: X-ICM `main.py` L185-187 builds `MoveArmThenGripper(
  EndEffectorPoseViaPlanning(), Discrete())`; the defaults of the fork's
  `EndEffectorPoseViaPlanning.__init__` (`rlbench/action_modes/arm_action_modes.py`, also in
  X-ICM's vendored copy) are `absolute_mode=True, frame='world', collision_checking=False`,
  which are passed here explicitly.
- Environment: `Environment(action_mode=..., obs_config=..., dataset_root=..., headless=...)`
  then `launch()` (X-ICM `YARR/yarr/envs/rlbench_env.py:RLBenchEnv.__init__` and `launch`);
  one `TaskEnvironment` per task from `env.get_task(task_file_to_task_class(name))`, the task
  name checked against the files in `rlbench.backend.task.TASKS_PATH` first (X-ICM `main.py`
  L189-190 and L216-218).
- Reset: X-ICM `YARR/yarr/envs/custom_rlbench_env.py:CustomRLBenchEnv.reset_to_demo` runs
  `set_variation(-1)`, `get_demos(1, live_demos=False, random_selection=False,
  from_episode_number=i)`, `set_variation(d.variation_number)`, `reset_to_demo(d)`, then takes
  the instruction from `get_task_descriptions()[0]` and the first observation from
  `scene.get_observation()` (discarding the one `reset_to_demo` returns). The fork's
  `TaskEnvironment.reset_to_demo` (`rlbench/task_environment.py` L159) only calls
  `demo.restore_state()`, i.e. `np.random.set_state(demo.random_seed)` (`rlbench/demo.py`),
  and then `reset()`: the scene is fully determined by the task, the variation and the stored
  RNG state. `get_demos` reads nothing else that `reset_to_demo` uses (it never draws from
  the RNG with `random_selection=False`). So, by default, `reset_to_episode` builds the
  stored demo from the `Episode` itself (`rlbench.demo.Demo([], random_seed=...)` with
  `variation_number` set) and runs the same `set_variation` / `reset_to_demo` /
  `get_task_descriptions` / `get_observation` sequence: the same scene without reading the
  demo's images. With `test_data` given, the demo is loaded from that folder exactly as
  X-ICM loads it (with `image_paths=True`: the images are not needed) and checked against
  the episode.
- Step: `CustomRLBenchEnv.step` catches `IKError`, `ConfigurationPathError` (pyrep.errors)
  and `InvalidActionError` (rlbench.backend.exceptions) as a terminal failure and counts
  `reward >= 1` as success.

Observations (X-ICM's `RLBench/rlbench/backend/scene.py:Scene.get_observation`): rgb is
HxWx3 uint8; with `depth=False` there is no depth image but a world-frame point cloud, from
which metric depth is recovered exactly (depth is the camera-frame z of each point); masks
are one-channel handle images (float, from `rgb_handles_to_mask`), converted to int32
handles; camera parameters come from `obs.misc['<camera>_camera_<intrinsics|extrinsics|near|
far>']`; X-ICM's vendored RLBench adds `misc['<camera>_mask_id_to_name']` (the PerAct fork
alone does not, and then `mask_names` is empty).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agnostos.envs.protocol import (
    CameraFrame,
    InvalidActionError,
    Observation,
    SimulatorError,
    StepResult,
    check_action,
)
from agnostos.shards import codecs
from agnostos.shards.episode import CAMERAS

if TYPE_CHECKING:
    from agnostos.shards.episode import Episode

__all__ = ["RLBenchEnv", "RLBenchUnavailable", "depth_from_point_cloud", "mask_handles"]

UNAVAILABLE_MESSAGE = (
    "the rlbench backend needs CoppeliaSim 4.1.0, PyRep and the PerAct fork of RLBench; "
    "see docs/rlbench.md"
)
# X-ICM's low-dim observation flags (main.py:create_obs_config).
LOW_DIM_FLAGS = {
    "joint_forces": False,
    "joint_positions": True,
    "joint_velocities": True,
    "task_low_dim_state": False,
    "gripper_touch_forces": False,
    "gripper_pose": True,
    "gripper_open": True,
    "gripper_matrix": True,
    "gripper_joint_positions": True,
}
# Observation attributes kept in `Observation.low_dim` when the simulator fills them.
EXTRA_LOW_DIM = (
    "gripper_matrix",
    "gripper_joint_positions",
    "joint_forces",
    "gripper_touch_forces",
    "task_low_dim_state",
    "ignore_collisions",
)


class RLBenchUnavailable(ImportError):
    """rlbench or pyrep (or CoppeliaSim's libraries under them) cannot be imported."""


@dataclass(frozen=True)
class _Api:
    """The RLBench/PyRep names the adapter uses, imported once by the constructor."""

    Environment: Any
    ObservationConfig: Any
    CameraConfig: Any
    MoveArmThenGripper: Any
    EndEffectorPoseViaPlanning: Any
    Discrete: Any
    RenderMode: Any
    Demo: Any
    task_file_to_task_class: Any
    tasks_path: str
    planning_errors: tuple[type[BaseException], ...]
    TaskEnvironmentError: type[BaseException]


def _import_api() -> _Api:
    try:
        from pyrep.const import RenderMode
        from pyrep.errors import ConfigurationPathError, IKError
        from rlbench.action_modes.action_mode import MoveArmThenGripper
        from rlbench.action_modes.arm_action_modes import EndEffectorPoseViaPlanning
        from rlbench.action_modes.gripper_action_modes import Discrete
        from rlbench.backend.exceptions import InvalidActionError as RLBenchInvalidAction
        from rlbench.backend.exceptions import TaskEnvironmentError
        from rlbench.backend.task import TASKS_PATH
        from rlbench.backend.utils import task_file_to_task_class
        from rlbench.demo import Demo
        from rlbench.environment import Environment
        from rlbench.observation_config import CameraConfig, ObservationConfig
    except ImportError as error:  # includes a missing libcoppeliaSim.so under pyrep
        reason = f"{type(error).__name__}: {error}"
        raise RLBenchUnavailable(f"{UNAVAILABLE_MESSAGE} ({reason})") from error
    return _Api(
        Environment=Environment,
        ObservationConfig=ObservationConfig,
        CameraConfig=CameraConfig,
        MoveArmThenGripper=MoveArmThenGripper,
        EndEffectorPoseViaPlanning=EndEffectorPoseViaPlanning,
        Discrete=Discrete,
        RenderMode=RenderMode,
        Demo=Demo,
        task_file_to_task_class=task_file_to_task_class,
        tasks_path=str(TASKS_PATH),
        planning_errors=(IKError, ConfigurationPathError, RLBenchInvalidAction),
        TaskEnvironmentError=TaskEnvironmentError,
    )


def depth_from_point_cloud(points: np.ndarray, extrinsics: np.ndarray) -> np.ndarray:
    """Metric depth (H,W float32) of world-frame points seen by a camera.

    PyRep's points solve `P [p, 1] = [u z, v z, z, 1]` for its projection
    `P = [[K R^T, -K R^T C], [0, 1]]` (camera-to-world pose `[[R, C], [0, 1]]`). K's last
    row is [0, 0, 1], so P's third row gives `z = R[:, 2] . (p - C)` whether or not the
    stored R is exactly orthonormal; rounded to float32, the simulator's depth dtype, it
    is the depth PyRep started from, and `codecs.point_cloud` rebuilds its points exactly.
    """
    pose = np.asarray(extrinsics, dtype=np.float64)
    camera_frame = (np.asarray(points, dtype=np.float64) - pose[:3, 3]) @ pose[:3, :3]
    return camera_frame[..., 2].astype(np.float32)


def mask_handles(mask: np.ndarray) -> np.ndarray:
    """int32 object handles from an RLBench mask.

    One channel (`masks_as_one_channel=True`, the default): RLBench's `rgb_handles_to_mask`
    already gave handle values as floats. Three channels: the raw colour-coded image (floats
    in [0, 1] as the sensor returns them, or bytes), handle = R + 256 G + 65536 B.
    """
    values = np.asarray(mask)
    if values.ndim == 2:
        return np.rint(values).astype(np.int32)
    if values.ndim == 3 and values.shape[-1] == 3:
        if values.dtype != np.uint8:
            values = np.rint(values.astype(np.float64) * 255.0).astype(np.uint8)
        return codecs.mask_from_rgb(values).astype(np.int32)
    raise ValueError(f"unexpected mask shape {values.shape}")


def _same_random_state(first: tuple, second: tuple) -> bool:
    name_a, keys_a, pos_a, gauss_a, cached_a = first
    name_b, keys_b, pos_b, gauss_b, cached_b = second
    return (
        str(name_a) == str(name_b)
        and np.array_equal(np.asarray(keys_a), np.asarray(keys_b))
        and int(pos_a) == int(pos_b)
        and int(gauss_a) == int(gauss_b)
        and float(cached_a) == float(cached_b)
    )


class RLBenchEnv:
    """The environment protocol on the PerAct fork of RLBench (one CoppeliaSim per process).

    Args:
        image_size: square render size of every camera (AGNOSTOS data and X-ICM: 128).
        cameras: the cameras rendered and returned (X-ICM: all five).
        headless: run CoppeliaSim without its window (still needs an X display: run under
            `xvfb-run -a` or a VirtualGL X server).
        test_data: optional folder of stored test episodes
            (`<task>/all_variations/episodes/episode<i>`); given, stored demos are loaded from
            it as X-ICM does and `reset(task, variation, episode)` works.
    """

    def __init__(
        self,
        image_size: int = 128,
        cameras: Sequence[str] = CAMERAS,
        headless: bool = True,
        test_data: str | os.PathLike | None = None,
    ):
        self.cameras = tuple(cameras)
        unknown = [camera for camera in self.cameras if camera not in CAMERAS]
        if unknown or not self.cameras:
            raise ValueError(f"unknown camera(s) {unknown} (or none); RLBench has {list(CAMERAS)}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = int(image_size)
        self.headless = bool(headless)
        self.test_data = Path(test_data) if test_data is not None else None
        if self.test_data is not None and not self.test_data.is_dir():
            raise FileNotFoundError(f"{self.test_data}: test data folder does not exist")
        self._api = _import_api()
        api = self._api
        self.obs_config = self._observation_config()
        self.action_mode = api.MoveArmThenGripper(
            api.EndEffectorPoseViaPlanning(
                absolute_mode=True, frame="world", collision_checking=False
            ),
            api.Discrete(),
        )
        self.env = api.Environment(
            action_mode=self.action_mode,
            obs_config=self.obs_config,
            dataset_root=str(self.test_data) if self.test_data is not None else "",
            headless=self.headless,
        )
        try:
            self.env.launch()
        except RuntimeError as error:
            raise SimulatorError(f"CoppeliaSim failed to launch: {error}") from error
        self.task_name: str | None = None
        self.task_env: Any = None
        self.variation: int | None = None
        self.descriptions: tuple[str, ...] = ()
        self.instruction = ""
        self._last: Observation | None = None
        self._terminal = True

    def _observation_config(self) -> Any:
        api = self._api
        unused = api.CameraConfig()
        unused.set_all(False)
        used = api.CameraConfig(
            rgb=True,
            point_cloud=True,
            mask=True,
            depth=False,
            image_size=(self.image_size, self.image_size),
            render_mode=api.RenderMode.OPENGL,
        )
        per_camera = {
            f"{camera}_camera": used if camera in self.cameras else unused for camera in CAMERAS
        }
        return api.ObservationConfig(**per_camera, **LOW_DIM_FLAGS)

    # -- reset -------------------------------------------------------------------------------

    def _task_environment(self, task: str) -> Any:
        """The TaskEnvironment of `task`, kept while consecutive episodes use the same task."""
        if task == self.task_name and self.task_env is not None:
            return self.task_env
        files = {
            name[: -len(".py")]
            for name in os.listdir(self._api.tasks_path)
            if name.endswith(".py") and name != "__init__.py"
        }
        if task not in files:
            raise ValueError(f"unknown RLBench task {task!r} (no {task}.py in rlbench/tasks)")
        task_class = self._api.task_file_to_task_class(task)
        self.task_name, self.task_env = None, None
        try:
            task_env = self.env.get_task(task_class)
        except RuntimeError as error:
            raise SimulatorError(f"RLBench could not load task {task}: {error}") from error
        self.task_name, self.task_env = task, task_env
        return task_env

    def _stored_demo(self, task_env: Any, episode: Episode) -> Any:
        """The demo `reset_to_demo` needs: its RNG state and variation number."""
        stored = episode.random_state.as_tuple()
        if self.test_data is None:
            demo = self._api.Demo([], random_seed=stored)
            demo.variation_number = episode.variation
            return demo
        task_env.set_variation(-1)  # all_variations/, as X-ICM does
        try:
            demos = task_env.get_demos(
                1,
                live_demos=False,
                image_paths=True,
                random_selection=False,
                from_episode_number=episode.episode,
            )
        except (RuntimeError, OSError) as error:  # no such folder, 'Broken dataset assumption'
            raise ValueError(
                f"{episode.key}: cannot load stored demo {episode.episode} from "
                f"{self.test_data}: {error}"
            ) from error
        if len(demos) != 1:  # from_episode_number indexes the natsorted episode folders
            raise ValueError(
                f"{episode.key}: {self.test_data} has no stored demo at position "
                f"{episode.episode} of {episode.task}'s episodes"
            )
        (demo,) = demos
        if demo.variation_number != episode.variation or not _same_random_state(
            demo.random_seed, stored
        ):
            raise ValueError(
                f"{episode.key}: stored demo {episode.episode} in {self.test_data} is not this "
                f"episode (variation {demo.variation_number} vs {episode.variation}, or another "
                "random state)"
            )
        return demo

    def reset_to_episode(self, episode: Episode) -> Observation:
        """Restore the scene of a stored test episode, as X-ICM's `reset_to_demo(i)` does."""
        if episode.random_state is None:
            raise ValueError(f"{episode.key}: the stored episode has no random state")
        self._terminal = True
        task_env = self._task_environment(episode.task)
        count = task_env.variation_count()
        if not 0 <= episode.variation < count:
            raise ValueError(
                f"{episode.key}: variation {episode.variation} outside 0..{count - 1} "
                f"of {episode.task}"
            )
        demo = self._stored_demo(task_env, episode)
        try:
            task_env.set_variation(demo.variation_number)
            task_env.reset_to_demo(demo)
            # X-ICM's instruction; this runs the task's init_episode once more, as X-ICM does.
            descriptions = task_env.get_task_descriptions()
            raw = task_env.get_observation()
        except (RuntimeError, self._api.TaskEnvironmentError) as error:
            raise SimulatorError(
                f"RLBench reset of {episode.key} failed: {type(error).__name__}: {error}"
            ) from error
        self.variation = int(demo.variation_number)
        self.descriptions = tuple(str(text) for text in descriptions)
        self.instruction = self.descriptions[0] if self.descriptions else ""
        self._last = self.convert(raw)
        self._terminal = False
        return self._last

    def reset(self, task: str, variation: int, episode: int) -> Observation:
        """Stored test episode `episode` of `task` from `test_data` (which must be given)."""
        if self.test_data is None:
            raise ValueError(
                "RLBenchEnv.reset(task, variation, episode) replays a stored test episode and "
                "needs test_data; or call reset_to_episode(episode)"
            )
        from agnostos.shards.folders import read_episode

        folder = self.test_data / task / "all_variations" / "episodes" / f"episode{episode}"
        stored = read_episode(folder, cameras=(), check_frames=False)
        if stored.variation != variation:
            raise ValueError(
                f"{stored.key}: stored variation is {stored.variation}, not {variation}"
            )
        return self.reset_to_episode(stored)

    # -- acting ------------------------------------------------------------------------------

    def step(self, action: np.ndarray) -> StepResult:
        if self._last is None or self._terminal:
            raise RuntimeError("step() called before reset_to_episode() or after the episode ended")
        try:
            values = check_action(action)
        except InvalidActionError as error:
            self._terminal = True
            return StepResult(self._last, False, True, f"InvalidActionError: {error}")
        try:
            raw, reward, terminate = self.task_env.step(values)
        except self._api.planning_errors as error:
            # X-ICM keeps the previous observation when an action fails.
            self._terminal = True
            return StepResult(self._last, False, True, f"{type(error).__name__}: {error}")
        except RuntimeError as error:  # "The call failed on the V-REP side", ...
            self._terminal = True
            raise SimulatorError(f"RLBench step failed: {error}") from error
        success = float(reward) >= 1.0
        self._terminal = success or bool(terminate)
        self._last = self.convert(raw)
        return StepResult(self._last, success, self._terminal)

    # -- observing ---------------------------------------------------------------------------

    def convert(self, raw: Any) -> Observation:
        """The project's Observation from an RLBench Observation."""
        misc = raw.misc
        frames: dict[str, CameraFrame] = {}
        names: dict[int, str] = {}
        for camera in self.cameras:
            points = getattr(raw, f"{camera}_point_cloud")
            if points is None:
                raise ValueError(f"RLBench observation has no {camera}_point_cloud")
            extrinsics = np.asarray(misc[f"{camera}_camera_extrinsics"], dtype=np.float64)
            frames[camera] = CameraFrame(
                rgb=np.asarray(getattr(raw, f"{camera}_rgb"), dtype=np.uint8),
                depth=depth_from_point_cloud(points, extrinsics),
                mask=mask_handles(getattr(raw, f"{camera}_mask")),
                intrinsics=np.asarray(misc[f"{camera}_camera_intrinsics"], dtype=np.float64),
                extrinsics=extrinsics,
                near=float(misc[f"{camera}_camera_near"]),
                far=float(misc[f"{camera}_camera_far"]),
            )
            for handle, name in (misc.get(f"{camera}_mask_id_to_name") or {}).items():
                names[round(float(handle))] = str(name)
        low_dim = {
            name: np.asarray(value, dtype=np.float64)
            for name in EXTRA_LOW_DIM
            if (value := getattr(raw, name, None)) is not None
        }
        return Observation(
            cameras=frames,
            gripper_pose=np.asarray(raw.gripper_pose, dtype=np.float64),
            gripper_open=float(raw.gripper_open),
            joint_positions=np.asarray(raw.joint_positions, dtype=np.float64),
            joint_velocities=np.asarray(raw.joint_velocities, dtype=np.float64),
            mask_names=dict(sorted(names.items())),
            instruction=self.instruction,
            low_dim=low_dim,
        )

    def close(self) -> None:
        """Shut CoppeliaSim down (idempotent)."""
        if self.env is not None:
            self.env.shutdown()
            self.env = None
        self.task_env, self.task_name, self._last = None, None, None
