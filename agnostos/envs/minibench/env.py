"""MiniBenchEnv: RLBench-style episodes on the minibench MuJoCo scene.

`step(action9)` moves the gripper tip along a straight line to the target pose (IK at
every control step, smoothstep timing so the arm starts and stops at rest), holds until the
arm has settled, then opens or closes the gripper. An action outside the workspace or one
IK cannot reach ends the episode with an error, like RLBench's InvalidActionError. Success
is checked after every physics step and stops the motion early.

For demo recording, every control step (10 Hz) is a frame; so is the settled pose at the
end of each motion and the frame after each gripper change. With that timing the PerAct
keyframe heuristic finds exactly the scripted waypoints (a property the tests check).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mujoco
import numpy as np

from agnostos.envs.minibench.cameras import CameraRig, geom_names
from agnostos.envs.minibench.ik import PandaIK, site_pose
from agnostos.envs.minibench.scene import (
    FINGER_OPEN,
    RENDERED_GROUPS,
    STATIC_CAMERAS,
    TABLE_HEIGHT,
    WRIST_CAMERA,
    SceneModel,
    build_scene,
)
from agnostos.envs.minibench.task import TOP_DOWN, Layout, MiniTask
from agnostos.envs.protocol import (
    CameraFrame,
    InvalidActionError,
    Observation,
    StepResult,
    check_action,
)
from agnostos.shards.episode import CAMERAS, Episode

# X-ICM's scene bounds (the action code voxelises over them); targets must lie inside.
WORKSPACE_LOW = np.array([-0.3, -0.5, 0.6])
WORKSPACE_HIGH = np.array([0.7, 0.5, 1.6])
CONTROL_DT = 0.1
LINEAR_SPEED = 0.25  # m/s along the straight-line path
ANGULAR_SPEED = 1.5  # rad/s
MIN_MOTION_STEPS = 5  # >= the keyframe heuristic's 4-frame cooldown + 1
SETTLE_SPEED = 0.02  # rad/s: below this on every arm joint the arm counts as stopped
MAX_SETTLE_STEPS = 400
GRIPPER_STEPS = 250  # 0.5 s of physics for the fingers to open or close
HOME_TIP = np.array([0.1, 0.0, 1.1])
REST_POSTURE = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])


def episode_seed(task: str, variation: int, episode: int, seed: int = 0, attempt: int = 0) -> int:
    """A stable 32-bit seed for one scene: the same layout on every machine and run.

    `seed` selects a whole different set of scenes; `attempt` the next scene for the same
    episode when a scripted demo had to be retried.
    """
    return zlib.crc32(f"minibench/{task}/{variation}/{episode}/{seed}/{attempt}".encode())


@dataclass
class _Loaded:
    task: MiniTask
    scene: SceneModel
    data: mujoco.MjData
    ik: PandaIK
    rig: CameraRig | None
    home: np.ndarray
    names: dict[int, str]


FrameCallback = Callable[[Observation], None]


class MiniBenchEnv:
    """The environment protocol on minibench tasks (one compiled scene per task, cached)."""

    def __init__(
        self,
        tasks: dict[str, MiniTask] | None = None,
        image_size: int = 128,
        cameras: Sequence[str] = CAMERAS,
        render: bool = True,
    ):
        from agnostos.envs.minibench.tasks import TASKS

        self.tasks = dict(TASKS if tasks is None else tasks)
        self.image_size = image_size
        self.cameras = tuple(cameras)
        unknown = [camera for camera in self.cameras if camera not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown camera {unknown[0]!r}; minibench has {list(CAMERAS)}")
        self.render_images = render
        self._loaded: dict[str, _Loaded] = {}
        self._current: _Loaded | None = None
        self.layout: Layout | None = None
        self.instruction = ""
        self.descriptions: tuple[str, ...] = ()
        self.random_state: tuple | None = None  # the RandomState the scene was drawn with
        self.on_frame: FrameCallback | None = None  # set while recording a demo
        self.ignore_collisions = 0.0
        self._gripper_open = 1.0
        self._terminal = True

    # -- loading and reset -----------------------------------------------------------------

    def _load(self, name: str) -> _Loaded:
        if name not in self._loaded:
            if name not in self.tasks:
                raise KeyError(f"unknown minibench task {name!r}; known: {sorted(self.tasks)}")
            task = self.tasks[name]
            scene = build_scene(name, task.objects_xml, task.extra_xml, image_size=self.image_size)
            data = mujoco.MjData(scene.model)
            ik = PandaIK(scene.model, scene.tip_site, scene.arm_qpos, scene.arm_dof, REST_POSTURE)
            data.qpos[scene.arm_qpos] = REST_POSTURE
            solution = ik.solve(data.qpos.copy(), HOME_TIP, np.array(TOP_DOWN))
            if not solution.converged:
                raise RuntimeError("minibench: the home pose is unreachable (model changed?)")
            ik.rest = solution.joints
            rig = (
                CameraRig(scene.model, (self.image_size, self.image_size), RENDERED_GROUPS)
                if self.render_images
                else None
            )
            self._loaded[name] = _Loaded(
                task, scene, data, ik, rig, solution.joints, geom_names(scene.model)
            )
        return self._loaded[name]

    def reset(
        self, task: str, variation: int, episode: int, seed: int = 0, attempt: int = 0
    ) -> Observation:
        """Deterministic in (task, variation, episode, seed, attempt)."""
        rng = np.random.RandomState(episode_seed(task, variation, episode, seed, attempt))
        return self.reset_to_state(task, variation, rng.get_state())

    def reset_to_episode(self, episode: Episode) -> Observation:
        """The scene of a stored episode (a test-set episode written by `sim generate`)."""
        if episode.random_state is None:
            raise ValueError(f"{episode.key}: the stored episode has no random state")
        return self.reset_to_state(episode.task, episode.variation, episode.random_state.as_tuple())

    def reset_to_state(self, task: str, variation: int, random_state: tuple) -> Observation:
        """Rebuild a scene from a stored RandomState tuple (RLBench's `reset_to_demo`)."""
        loaded = self._load(task)
        loaded.task.check_variation(variation)
        rng = np.random.RandomState()
        rng.set_state(random_state)
        self.random_state = rng.get_state()
        self._current = loaded
        model, data, scene = loaded.scene.model, loaded.data, loaded.scene
        mujoco.mj_resetData(model, data)
        data.qpos[scene.arm_qpos] = loaded.home
        data.qpos[scene.finger_qpos] = FINGER_OPEN
        data.ctrl[:7] = loaded.home
        data.ctrl[7:9] = FINGER_OPEN
        self.layout = loaded.task.sample(rng, variation)
        loaded.task.apply(scene, data, self.layout)
        mujoco.mj_forward(model, data)
        for _ in range(100):  # let objects come to rest on the table
            mujoco.mj_step(model, data)
        data.qvel[:] = 0.0
        mujoco.mj_forward(model, data)
        descriptions = loaded.task.descriptions(variation)
        self.descriptions = descriptions
        self.instruction = descriptions[0]
        self._gripper_open = 1.0
        self.ignore_collisions = 0.0
        self._terminal = False
        observation = self.observe()
        if self.on_frame is not None:
            self.on_frame(observation)
        return observation

    # -- acting ------------------------------------------------------------------------------

    def step(self, action: np.ndarray) -> StepResult:
        if self._current is None or self._terminal:
            raise RuntimeError("step() called before reset() or after the episode ended")
        try:
            values = check_action(action)
            self._check_workspace(values[:3])
            success = self._move(values[:3], values[3:7], values[8])
            if not success:
                success = self._actuate_gripper(values[7] > 0.5)
        except InvalidActionError as err:
            self._terminal = True
            return StepResult(self.observe(), False, True, f"InvalidActionError: {err}")
        self._terminal = success
        return StepResult(self.observe(), success, success)

    def scripted_actions(self) -> list[np.ndarray]:
        """The current task's scripted keyframe actions for the scene as reset."""
        loaded = self._require()
        return [
            waypoint.action()
            for waypoint in loaded.task.waypoints(loaded.scene, loaded.data, self.layout)
        ]

    def success(self) -> bool:
        loaded = self._require()
        return bool(loaded.task.success(loaded.scene, loaded.data, self.layout))

    def _require(self) -> _Loaded:
        if self._current is None:
            raise RuntimeError("reset() first")
        return self._current

    def _check_workspace(self, position: np.ndarray) -> None:
        if np.any(position < WORKSPACE_LOW) or np.any(position > WORKSPACE_HIGH):
            raise InvalidActionError(
                f"target {np.round(position, 3).tolist()} is outside the workspace "
                f"{WORKSPACE_LOW.tolist()}-{WORKSPACE_HIGH.tolist()}"
            )
        if position[2] < TABLE_HEIGHT + 0.005:
            raise InvalidActionError(f"target z {position[2]:.3f} is inside the table")

    def _move(self, position: np.ndarray, quat: np.ndarray, ignore_collisions: float) -> bool:
        """Straight-line tip motion to the pose, run to its end; True if the task succeeded
        at any moment on the way."""
        loaded = self._require()
        scene, data = loaded.scene, loaded.data
        goal = loaded.ik.solve(data.qpos.copy(), position, quat)
        if not goal.converged:
            raise InvalidActionError(
                f"pose {np.round(position, 3).tolist()} quat {np.round(quat, 3).tolist()} is "
                f"unreachable (IK error {goal.position_error * 100:.1f} cm, "
                f"{np.rad2deg(goal.rotation_error):.1f} deg)"
            )
        self.ignore_collisions = float(ignore_collisions > 0.5)
        start = site_pose(scene.model, data, scene.tip_site)
        distance = float(np.linalg.norm(position - start[:3]))
        angle = _quat_angle(start[3:], quat)
        if distance < 1e-3 and angle < np.deg2rad(0.5):
            return False  # already there: only the gripper acts (no motion frames)
        steps = max(
            MIN_MOTION_STEPS,
            int(np.ceil(distance / LINEAR_SPEED / CONTROL_DT)),
            int(np.ceil(angle / ANGULAR_SPEED / CONTROL_DT)),
        )
        seed = data.qpos.copy()
        previous = data.ctrl[:7].copy()
        succeeded = False
        for index in range(1, steps + 1):
            fraction = _trapezoid(index / steps, 1.0 / steps)
            waypoint = start[:3] + fraction * (position - start[:3])
            orientation = _slerp(start[3:], quat, fraction)
            solution = loaded.ik.solve(seed, waypoint, orientation)
            target = solution.joints if index < steps else goal.joints
            seed[scene.arm_qpos] = target
            succeeded |= self._simulate(target, CONTROL_DT, previous)
            previous = target
            self._record_frame()
        return self._settle(goal.joints) or succeeded

    def _settle(self, joints: np.ndarray) -> bool:
        loaded = self._require()
        data, scene = loaded.data, loaded.scene
        succeeded = False
        for _ in range(MAX_SETTLE_STEPS // 10):
            succeeded |= self._simulate(joints, 10 * scene.model.opt.timestep)
            if np.all(np.abs(data.qvel[scene.arm_dof]) < SETTLE_SPEED):
                break
        self._record_frame()
        return succeeded

    def _actuate_gripper(self, open_: bool) -> bool:
        if float(open_) == self._gripper_open:
            return False
        self._gripper_open = float(open_)
        loaded = self._require()
        joints = loaded.data.ctrl[:7].copy()
        succeeded = self._simulate(joints, GRIPPER_STEPS * loaded.scene.model.opt.timestep)
        self._record_frame()
        return succeeded

    def _simulate(
        self, joints: np.ndarray, duration: float, start: np.ndarray | None = None
    ) -> bool:
        """Drive the arm targets to `joints` over `duration` seconds (linearly from `start`,
        else at once) and hold; True if the task succeeded at any moment of it.

        Success is latched, not a reason to stop: every action runs to its end, so a
        recorded demo's keyframe is the pose its waypoint reached (not the first pose at
        which a success test happened to pass, which a replay could land just short of),
        and a stored demo replayed from its keyframes succeeds again."""
        loaded = self._require()
        model, data = loaded.scene.model, loaded.data
        data.ctrl[7:9] = FINGER_OPEN * self._gripper_open
        count = round(duration / model.opt.timestep)
        succeeded = False
        for index in range(1, count + 1):
            if start is None:
                data.ctrl[:7] = joints
            else:
                data.ctrl[:7] = start + (index / count) * (joints - start)
            mujoco.mj_step(model, data)
            succeeded = succeeded or loaded.task.success(loaded.scene, data, self.layout)
        return succeeded

    def _record_frame(self) -> None:
        """Observe (render) only while a demo is being recorded."""
        if self.on_frame is not None:
            self.on_frame(self.observe())

    # -- observing ---------------------------------------------------------------------------

    def observe(self) -> Observation:
        loaded = self._require()
        scene, data, model = loaded.scene, loaded.data, loaded.scene.model
        frames: dict[str, CameraFrame] = {}
        if loaded.rig is not None:
            for camera in self.cameras:
                fovy = WRIST_CAMERA[1] if camera == WRIST_CAMERA[0] else STATIC_CAMERAS[camera][2]
                near, far = scene.camera_planes[camera]
                frames[camera] = loaded.rig.render(data, scene.camera_ids[camera], fovy, near, far)
        pose = site_pose(model, data, scene.tip_site)
        matrix = np.eye(4)
        matrix[:3, :3] = data.site_xmat[scene.tip_site].reshape(3, 3)
        matrix[:3, 3] = pose[:3]
        low_dim = {
            "gripper_matrix": matrix,
            "gripper_joint_positions": data.qpos[scene.finger_qpos].copy(),
            "joint_forces": data.actuator_force[:7].copy(),
            "task_low_dim_state": _free_body_state(model, data),
            "ignore_collisions": np.array(self.ignore_collisions),
        }
        return Observation(
            cameras=frames,
            gripper_pose=pose,
            gripper_open=self._gripper_open,
            joint_positions=data.qpos[scene.arm_qpos].copy(),
            joint_velocities=data.qvel[scene.arm_dof].copy(),
            mask_names=loaded.names,
            instruction=self.instruction,
            low_dim=low_dim,
        )

    def close(self) -> None:
        for loaded in self._loaded.values():
            if loaded.rig is not None:
                loaded.rig.close()
        self._loaded.clear()
        self._current = None


def _free_body_state(model: mujoco.MjModel, data: mujoco.MjData) -> np.ndarray:
    """Positions and orientations of every free body and values of every object joint."""
    values = []
    for joint in range(model.njnt):
        name = model.joint(joint).name
        if name.startswith("robot:"):
            continue
        address = model.jnt_qposadr[joint]
        width = 7 if int(model.jnt_type[joint]) == int(mujoco.mjtJoint.mjJNT_FREE) else 1
        values.append(data.qpos[address : address + width])
    return np.concatenate(values) if values else np.zeros(0)


def _trapezoid(t: float, ramp: float) -> float:
    """Path fraction at time t in [0, 1] under a trapezoidal speed profile.

    The arm reaches cruise speed within the first control step (`ramp`), so the keyframe
    heuristic never mistakes the start of a motion for a stop, and slows to rest over the
    last one.
    """
    ramp = min(ramp, 1.0 / 3.0)
    peak = 1.0 / (1.0 - ramp)
    if t < ramp:
        return 0.5 * peak * t * t / ramp
    if t <= 1.0 - ramp:
        return peak * (t - ramp / 2.0)
    return 1.0 - 0.5 * peak * (1.0 - t) ** 2 / ramp


def _quat_angle(a: np.ndarray, b: np.ndarray) -> float:
    dot = abs(float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))
    return 2.0 * float(np.arccos(min(1.0, dot)))


def _slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64) / np.linalg.norm(a)
    b = np.asarray(b, dtype=np.float64) / np.linalg.norm(b)
    dot = float(np.dot(a, b))
    if dot < 0:
        b, dot = -b, -dot
    if dot > 0.9995:
        out = a + t * (b - a)
        return out / np.linalg.norm(out)
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
