"""Evaluate your own policy: a class loaded by import path, behind X-ICM's custom-agent terms.

X-ICM's `custom_agent.py` template is how AGNOSTOS users plug in a fine-tuned VLA: the
policy sees camera images, the gripper pose (xyz + Euler xyz in radians) and open state and
the instruction, and returns a chunk of `[x, y, z, roll, pitch, yaw, gripper]` rows in the
world frame; the template converts each row to RLBench's 9-dim action (quaternion from the
Euler angles, gripper 1 when >= 0.5, ignore_collisions 1) and keeps the first
`action_chunk_length` rows. `CustomAgent` does the same, batched:

    class MyPolicy:
        def __init__(self, **policy_args): ...
        def reset(self, env_id: int, instruction: str, task: str, seed: int) -> None: ...
        def predict(self, observations: list[dict]) -> list[np.ndarray]: ...

`reset` is optional. `predict` gets one dict per waiting environment with
`<camera>_rgb` (H x W x 3 uint8, resized to `image_size`), `gripper_pose` (7: xyz +
quaternion xyzw), `gripper_euler` (3, radians), `gripper_open`, `state` (7: xyz, Euler,
open, as X-ICM's template builds it), `instruction`, `task`, `step` and `env_id`; it
returns, per dict, either one 9-dim RLBench action or an (N, 7) chunk as above (an (N, 9)
array is taken as N RLBench actions). See docs/evaluation.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from agnostos.action_codecs import euler_xyz_to_quaternion, quaternion_to_euler_xyz
from agnostos.envs.protocol import ACTION_SIZE, Observation
from agnostos.evaluation.agents.base import AgentError, EpisodeContext, QueuedAgent
from agnostos.images import centre_crop_resize

__all__ = ["CustomAgent", "chunk_to_actions", "load_class"]


def load_class(path: str) -> type:
    """`package.module:Class` or `package.module.Class` -> the class, or one clear error."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"policy {path!r}: expected 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"policy {path!r}: cannot import {module_name!r} ({error})") from None
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"policy {path!r}: {module_name} has no {attribute!r}") from None
    if not isinstance(found, type):
        raise ValueError(f"policy {path!r}: {attribute!r} is not a class")
    return found


def chunk_to_actions(output: Any, chunk_length: int | None) -> list[np.ndarray]:
    """A policy's output -> 9-dim RLBench actions, as X-ICM's custom-agent template does."""
    values = np.asarray(output, dtype=np.float64)
    if values.shape == (ACTION_SIZE,):
        return [values]
    if values.ndim != 2 or values.shape[1] not in (7, ACTION_SIZE) or not len(values):
        raise AgentError(
            f"custom policy returned shape {values.shape}; expected (9,), (N, 7) or (N, 9)"
        )
    if values.shape[1] == 7:
        quaternions = euler_xyz_to_quaternion(values[:, 3:6], degrees=False)
        gripper = (values[:, 6:7] >= 0.5).astype(np.float64)
        values = np.concatenate([values[:, :3], quaternions, gripper, np.ones_like(gripper)], 1)
    rows = values if chunk_length is None else values[:chunk_length]
    return list(rows)


class CustomAgent(QueuedAgent):
    """A user policy class, called once per batch of waiting environments.

    Args:
        policy: import path of the policy class (`package.module:Class`).
        policy_args: keyword arguments for its constructor.
        cameras: cameras whose RGB the policy receives.
        image_size: square size the images are centre-cropped and resized to.
        chunk_length: rows of a returned chunk that are executed before the policy is
            asked again (X-ICM's template: `action_chunk_length`, 1 in its runs); None
            executes the whole chunk.
    """

    name = "custom"

    def __init__(
        self,
        policy: str,
        policy_args: dict[str, Any] | None = None,
        cameras: Sequence[str] = ("front", "wrist"),
        image_size: int = 256,
        chunk_length: int | None = 1,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if chunk_length is not None and chunk_length < 1:
            raise ValueError(f"chunk_length must be >= 1 or null, got {chunk_length}")
        self.policy_path = policy
        self.policy_args = dict(policy_args or {})
        self.cameras = tuple(cameras)
        self.image_size = image_size
        self.chunk_length = chunk_length
        self.policy = load_class(policy)(**self.policy_args)
        if not callable(getattr(self.policy, "predict", None)):
            raise ValueError(f"policy {policy!r} has no predict(observations) method")
        self._steps: dict[int, int] = {}

    def settings(self) -> dict[str, Any]:
        return {
            "policy": self.policy_path,
            "policy_args": self.policy_args,
            "cameras": list(self.cameras),
            "image_size": self.image_size,
            "chunk_length": self.chunk_length,
        }

    def reset(self, env_id: int, context: EpisodeContext) -> None:
        super().reset(env_id, context)
        self._steps[env_id] = 0
        reset = getattr(self.policy, "reset", None)
        if callable(reset):
            reset(env_id, context.instruction, context.task, context.seed)

    def observation_dict(self, env_id: int, observation: Observation) -> dict[str, Any]:
        context = self.context(env_id)
        pose = np.asarray(observation.gripper_pose, dtype=np.float64)
        euler = quaternion_to_euler_xyz(pose[3:7], degrees=False)
        item: dict[str, Any] = {
            "env_id": env_id,
            "task": context.task,
            "instruction": context.instruction,
            "step": self._steps[env_id],
            "gripper_pose": pose,
            "gripper_euler": euler,
            "gripper_open": float(observation.gripper_open),
            "state": np.concatenate([pose[:3], euler, [float(observation.gripper_open)]]),
        }
        for camera in self.cameras:
            if camera not in observation.cameras:
                raise AgentError(f"custom: the environment does not render camera {camera!r}")
            rgb = observation.cameras[camera].rgb
            item[f"{camera}_rgb"] = centre_crop_resize(rgb, self.image_size)
        return item

    def plan(self, batch: Sequence[tuple[int, Observation]]) -> list[Sequence[np.ndarray]]:
        inputs = [self.observation_dict(env_id, observation) for env_id, observation in batch]
        outputs = self.policy.predict(inputs)
        if len(outputs) != len(inputs):
            raise AgentError(
                f"custom policy returned {len(outputs)} outputs for {len(inputs)} observations"
            )
        return [chunk_to_actions(output, self.chunk_length) for output in outputs]

    def act(self, batch: Sequence[tuple[int, Observation]]) -> list[np.ndarray]:
        actions = super().act(batch)
        for env_id, _ in batch:
            self._steps[env_id] += 1
        return actions
