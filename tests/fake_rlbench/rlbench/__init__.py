"""Fake RLBench (tests only): the PerAct fork's API surface over an invented tabletop.

Mirrors MohitShridhar/RLBench@peract `rlbench/__init__.py`: it requires PyRep >= 4.1.0.2
and exports the environment and configuration classes.
"""

__version__ = "1.2.0"

import numpy as np
import pyrep

pr_v = np.array(pyrep.__version__.split("."), dtype=int)
if pr_v.size < 4 or np.any(pr_v < np.array([4, 1, 0, 2])):
    raise ImportError("PyRep version must be greater than 4.1.0.2. Please update PyRep.")

from rlbench.action_modes.action_mode import (  # noqa: E402
    ActionMode,
    ArmActionMode,
    GripperActionMode,
)
from rlbench.environment import Environment  # noqa: E402
from rlbench.observation_config import CameraConfig, ObservationConfig  # noqa: E402

__all__ = [
    "ActionMode",
    "ArmActionMode",
    "CameraConfig",
    "Environment",
    "GripperActionMode",
    "ObservationConfig",
]
