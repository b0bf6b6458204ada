"""open_drawer with the real task's variations and descriptions (rlbench/tasks/open_drawer.py)."""

import numpy as np

from rlbench.backend.task import Task


class OpenDrawer(Task):
    object_name = "drawer_frame"
    object_handle = 302  # > 255: the mask's green byte matters

    def init_task(self) -> None:
        self._options = ["bottom", "middle", "top"]

    def init_episode(self, index: int) -> list[str]:
        option = self._options[index]
        return [
            f"open the {option} drawer",
            f"grip the {option} handle and pull the {option} drawer open",
            f"slide the {option} drawer open",
        ]

    def variation_count(self) -> int:
        return 3

    def base_rotation_bounds(self):
        return [0, 0, -np.pi / 8], [0, 0, np.pi / 8]
