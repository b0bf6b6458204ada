"""`rlbench.utils` (PerAct fork): task lookup and `get_stored_demos`.

`get_stored_demos` follows the fork: natural order of `episodes/`, the pickled Demo (it
unpickles into this fake's `rlbench.demo.Demo`), `variation_number.pkl` when
`variation_number == -1`, descriptions into every `obs.misc['descriptions']`, the "Broken
dataset assumption" check on the rgb and depth folders and image paths set per the
observation config. Decoding the images (`image_paths=False`) is not faked.
"""

from __future__ import annotations

import importlib
import pickle
import re
from os import listdir
from os.path import exists, join

import numpy as np

from rlbench.backend.const import (
    CAMERA_NAMES,
    EPISODES_FOLDER,
    IMAGE_FORMAT,
    LOW_DIM_PICKLE,
    VARIATION_DESCRIPTIONS,
    VARIATION_NUMBER,
    VARIATIONS_ALL_FOLDER,
    VARIATIONS_FOLDER,
)


class InvalidTaskName(Exception):
    pass


def name_to_task_class(task_file: str):
    name = task_file.replace(".py", "")
    class_name = "".join([w[0].upper() + w[1:] for w in name.split("_")])
    try:
        mod = importlib.import_module(f"rlbench.tasks.{name}")
        mod = importlib.reload(mod)
    except ModuleNotFoundError as e:
        raise InvalidTaskName(
            f"The task file '{name}' does not exist or cannot be compiled."
        ) from e
    try:
        return getattr(mod, class_name)
    except AttributeError as e:
        raise InvalidTaskName(f"Cannot find the class name '{class_name}' in '{name}'.") from e


def _natural(name: str):
    """natsort's order for names like episode10 (digits compared as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def get_stored_demos(
    amount: int,
    image_paths: bool,
    dataset_root: str,
    variation_number: int,
    task_name: str,
    obs_config,
    random_selection: bool = True,
    from_episode_number: int = 0,
):
    task_root = join(dataset_root, task_name)
    if not exists(task_root):
        raise RuntimeError(f"Can't find the demos for {task_name} at: {task_root}")
    if variation_number == -1:
        examples_path = join(task_root, VARIATIONS_ALL_FOLDER, EPISODES_FOLDER)
    else:
        examples_path = join(task_root, VARIATIONS_FOLDER % variation_number, EPISODES_FOLDER)
    examples = [e for e in listdir(examples_path) if ".DS_Store" not in e]
    if amount == -1:
        amount = len(examples)
    if amount > len(examples):
        raise RuntimeError(
            f"You asked for {amount} examples, but only {len(examples)} were available."
        )
    if random_selection:
        selected = np.random.choice(examples, amount, replace=False)
    else:
        selected = sorted(examples, key=_natural)[
            from_episode_number : from_episode_number + amount
        ]
    if not image_paths:
        raise NotImplementedError("the fake serves stored demos with image_paths=True only")
    demos = []
    for example in selected:
        example_path = join(examples_path, example)
        with open(join(example_path, LOW_DIM_PICKLE), "rb") as f:
            obs = pickle.load(f)
        if variation_number == -1:
            with open(join(example_path, VARIATION_NUMBER), "rb") as f:
                obs.variation_number = pickle.load(f)
        else:
            obs.variation_number = variation_number
        descriptions_file = join(example_path, VARIATION_DESCRIPTIONS)
        if exists(descriptions_file):
            with open(descriptions_file, "rb") as f:
                descriptions = pickle.load(f)
        else:
            descriptions = ["unknown task description"]
        counts = {
            len(listdir(join(example_path, f"{camera}_{kind}")))
            for camera in CAMERA_NAMES
            for kind in ("rgb", "depth")
        }
        if counts != {len(obs)}:
            raise RuntimeError("Broken dataset assumption")
        for i in range(len(obs)):
            obs[i].misc["descriptions"] = descriptions
            frame = IMAGE_FORMAT % i
            for camera in CAMERA_NAMES:
                config = getattr(obs_config, f"{camera}_camera")
                if config.rgb:
                    setattr(obs[i], f"{camera}_rgb", join(example_path, f"{camera}_rgb", frame))
                if config.depth or config.point_cloud:
                    setattr(obs[i], f"{camera}_depth", join(example_path, f"{camera}_depth", frame))
                if config.mask:
                    setattr(obs[i], f"{camera}_mask", join(example_path, f"{camera}_mask", frame))
            for flag in (
                "joint_velocities",
                "joint_positions",
                "joint_forces",
                "gripper_open",
                "gripper_pose",
                "gripper_joint_positions",
                "gripper_touch_forces",
                "task_low_dim_state",
            ):
                if not getattr(obs_config, flag):
                    setattr(obs[i], flag, None)
        demos.append(obs)
    return demos
