"""push_block: the descriptions of agnostos' synthetic episodes (agnostos/shards/synthetic.py)."""

from rlbench.tasks.pick_block import PickBlock


class PushBlock(PickBlock):
    templates = ("push the {colour} block forward", "slide the {colour} block away")
