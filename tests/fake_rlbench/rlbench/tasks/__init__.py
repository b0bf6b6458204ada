"""The fake's tasks: RLBench's open_drawer and the two tasks of agnostos' synthetic data."""

from rlbench.tasks.open_drawer import OpenDrawer
from rlbench.tasks.pick_block import PickBlock
from rlbench.tasks.push_block import PushBlock

__all__ = ["OpenDrawer", "PickBlock", "PushBlock"]
