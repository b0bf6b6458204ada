"""`rlbench.environment.Environment` (PerAct fork signature) over the fake scene."""

from __future__ import annotations

from os.path import abspath, dirname, exists, join

from pyrep import PyRep

from rlbench._fake import FakeSim
from rlbench.backend.const import TTT_FILE
from rlbench.backend.robot import Robot
from rlbench.backend.scene import Scene
from rlbench.const import SUPPORTED_ROBOTS
from rlbench.observation_config import ObservationConfig
from rlbench.task_environment import TaskEnvironment

DIR_PATH = dirname(abspath(__file__))


class Environment:
    """Each environment has a scene."""

    def __init__(
        self,
        action_mode,
        dataset_root: str = "",
        obs_config: ObservationConfig = ObservationConfig(),  # noqa: B008 (as in RLBench)
        headless: bool = False,
        static_positions: bool = False,
        robot_setup: str = "panda",
        randomize_every=None,
        frequency: int = 1,
        visual_randomization_config=None,
        dynamics_randomization_config=None,
        attach_grasped_objects: bool = True,
    ):
        self.fake = FakeSim()
        self.fake.record(
            "Environment",
            action_mode=action_mode,
            dataset_root=dataset_root,
            obs_config=obs_config,
            headless=headless,
            static_positions=static_positions,
            robot_setup=robot_setup,
            randomize_every=randomize_every,
        )
        self._dataset_root = dataset_root
        self._action_mode = action_mode
        self._obs_config = obs_config
        self._headless = headless
        self._static_positions = static_positions
        self._robot_setup = robot_setup.lower()
        self._attach_grasped_objects = attach_grasped_objects
        if robot_setup not in SUPPORTED_ROBOTS:
            raise ValueError(f"robot_configuration must be one of {list(SUPPORTED_ROBOTS)}")
        if randomize_every is not None:
            raise NotImplementedError("the fake has no domain randomisation")
        self._check_dataset_structure()
        self._pyrep = None
        self._robot = None
        self._scene = None
        self._prev_task = None

    def _check_dataset_structure(self):
        if len(self._dataset_root) > 0 and not exists(self._dataset_root):
            raise RuntimeError(f"Data set root does not exists: {self._dataset_root}")

    def launch(self):
        if self._pyrep is not None:
            raise RuntimeError("Already called launch!")
        self.fake.record("launch", headless=self._headless)
        self._pyrep = PyRep()
        self._pyrep.launch(join(DIR_PATH, TTT_FILE), headless=self._headless)
        arm_class, gripper_class, _ = SUPPORTED_ROBOTS[self._robot_setup]
        arm, gripper = arm_class(), gripper_class()
        arm.fake = self.fake
        self._robot = Robot(arm, gripper)
        self._scene = Scene(self._pyrep, self._robot, self._obs_config, self._robot_setup)
        self._scene.fake = self.fake
        self._action_mode.arm_action_mode.set_control_mode(self._robot)

    def shutdown(self):
        self.fake.record("shutdown")
        if self._pyrep is not None:
            self._pyrep.shutdown()
        self._pyrep = None

    def get_task(self, task_class) -> TaskEnvironment:
        self.fake.record("get_task", task_class=task_class)
        if self._pyrep is None:
            self.launch()
        self._scene.unload()
        task = task_class(self._pyrep, self._robot)
        self._prev_task = task
        return TaskEnvironment(
            self._pyrep,
            self._robot,
            self._scene,
            task,
            self._action_mode,
            self._dataset_root,
            self._obs_config,
            self._static_positions,
            self._attach_grasped_objects,
        )

    @property
    def action_shape(self):
        return (self._action_mode.action_shape(self._scene),)
