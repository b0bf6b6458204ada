"""The two helpers of `rlbench/backend/utils.py` that RLBench users call."""

import importlib


def task_file_to_task_class(task_file):
    """'open_drawer' -> rlbench.tasks.open_drawer.OpenDrawer (module reloaded, as RLBench does)."""
    name = task_file.replace(".py", "")
    class_name = "".join([w[0].upper() + w[1:] for w in name.split("_")])
    mod = importlib.import_module(f"rlbench.tasks.{name}")
    mod = importlib.reload(mod)
    return getattr(mod, class_name)


def rgb_handles_to_mask(rgb_coded_handles):
    """Handles from a colour-coded float image in [0, 1]: R + 256 G + 65536 B.

    Like RLBench it scales its argument in place and returns floats (the `astype(int)` in
    the original discards its result).
    """
    rgb_coded_handles *= 255
    return (
        rgb_coded_handles[:, :, 0]
        + rgb_coded_handles[:, :, 1] * 256
        + rgb_coded_handles[:, :, 2] * 256 * 256
    )
