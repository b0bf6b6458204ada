"""pick_block: the descriptions of agnostos' synthetic episodes (agnostos/shards/synthetic.py)."""

from rlbench.backend.task import Task

COLOURS = ("red", "green", "blue")


class PickBlock(Task):
    object_name = "block"
    object_handle = 57
    object_half_width = 0.03
    object_height = 0.05
    templates = ("pick up the {colour} block", "grasp the {colour} block and lift it")

    def init_episode(self, index: int) -> list[str]:
        colour = COLOURS[index % len(COLOURS)]
        return [text.format(colour=colour) for text in self.templates]

    def variation_count(self) -> int:
        return len(COLOURS)
