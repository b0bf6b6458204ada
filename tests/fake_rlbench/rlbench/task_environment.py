"""`rlbench.task_environment.TaskEnvironment` (PerAct fork), recording calls in the FakeSim."""

from __future__ import annotations

import numpy as np

from rlbench import utils
from rlbench.backend.exceptions import BoundaryError, TaskEnvironmentError, WaypointError

_MAX_RESET_ATTEMPTS = 40
_MAX_DEMO_ATTEMPTS = 10


class TaskEnvironment:
    def __init__(
        self,
        pyrep,
        robot,
        scene,
        task,
        action_mode,
        dataset_root: str,
        obs_config,
        static_positions: bool = False,
        attach_grasped_objects: bool = True,
    ):
        self._pyrep = pyrep
        self._robot = robot
        self._scene = scene
        self._task = task
        self._variation_number = 0
        self._action_mode = action_mode
        self._dataset_root = dataset_root
        self._obs_config = obs_config
        self._static_positions = static_positions
        self._attach_grasped_objects = attach_grasped_objects
        self._reset_called = False
        self._scene.load(self._task)
        self._pyrep.start()
        self._fake = scene.fake

    def get_name(self) -> str:
        return self._task.get_name()

    def sample_variation(self) -> int:
        self._variation_number = np.random.randint(0, self._task.variation_count())
        return self._variation_number

    def set_variation(self, v: int) -> None:
        self._fake.record("set_variation", v=v)
        if v >= self.variation_count():
            raise TaskEnvironmentError(
                f"Requested variation {v}, but there are only {self.variation_count()} variations."
            )
        self._variation_number = v

    def variation_count(self) -> int:
        return self._task.variation_count()

    def reset(self):
        self._fake.record(
            "reset", variation=self._variation_number, rng_state=np.random.get_state()
        )
        self._scene.reset()
        try:
            desc = self._scene.init_episode(
                self._variation_number,
                max_attempts=_MAX_RESET_ATTEMPTS,
                randomly_place=not self._static_positions,
            )
        except (BoundaryError, WaypointError) as e:
            raise TaskEnvironmentError(
                f"Could not place the task {self._task.get_name()} in the scene. This should "
                "not happen, please raise an issues on this task."
            ) from e
        self._reset_called = True
        return desc, self._scene.get_observation()

    def get_task_descriptions(self) -> list[str]:
        self._fake.record("get_task_descriptions", variation=self._variation_number)
        return self._scene.task.init_episode(self._variation_number)

    def get_observation(self):
        self._fake.record("get_observation")
        return self._scene.get_observation()

    def step(self, action):
        self._fake.record("step", action=np.array(action, copy=True))
        if not self._reset_called:
            raise RuntimeError("Call 'reset' before calling 'step' on a task.")
        self._scene.actions_taken += 1
        self._action_mode.action(self._scene, action)
        success, terminate = self._task.success()
        task_reward = self._task.reward()
        reward = float(success) if task_reward is None else task_reward
        return self._scene.get_observation(), reward, terminate

    def get_demos(
        self,
        amount: int,
        live_demos: bool = False,
        image_paths: bool = False,
        callable_each_step=None,
        max_attempts: int = _MAX_DEMO_ATTEMPTS,
        random_selection: bool = True,
        from_episode_number: int = 0,
    ):
        self._fake.record(
            "get_demos",
            amount=amount,
            live_demos=live_demos,
            image_paths=image_paths,
            random_selection=random_selection,
            from_episode_number=from_episode_number,
            variation_number=self._variation_number,
        )
        if live_demos:
            raise NotImplementedError("the fake has no demo planner: live_demos=False only")
        if self._dataset_root is None or len(self._dataset_root) == 0:
            raise RuntimeError("Can't ask for a stored demo when no dataset root provided.")
        return utils.get_stored_demos(
            amount,
            image_paths,
            self._dataset_root,
            self._variation_number,
            self._task.get_name(),
            self._obs_config,
            random_selection,
            from_episode_number,
        )

    def reset_to_demo(self, demo):
        self._fake.record(
            "reset_to_demo",
            random_seed=demo.random_seed,
            variation_number=getattr(demo, "variation_number", None),
            observations=len(demo),
        )
        demo.restore_state()
        return self.reset()
