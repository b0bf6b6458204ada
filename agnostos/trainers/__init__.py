"""Lightning training for the agnostos models.

- `DynamicsDiffusionModule`: trains X-ICM's dynamics diffusion model (UNet only, the
  published InstructPix2Pix recipe), with optional EMA, seeded per-step noise and
  validation sample grids (`dynamics.py`).
- `DiffusersExport`: writes `checkpoint-<step>/unet/` folders that X-ICM loads
  (`callbacks.py`).
- `run_fit(argv)`: the `agnostos fit` LightningCLI (`cli.py`; imported lazily there).

Importing this package does not import LightningCLI or jsonargparse.
"""

from agnostos.trainers.callbacks import DiffusersExport
from agnostos.trainers.dynamics import DynamicsDiffusionModule, load_dynamics_model
from agnostos.trainers.ema import ExponentialMovingAverage

__all__ = [
    "DiffusersExport",
    "DynamicsDiffusionModule",
    "ExponentialMovingAverage",
    "load_dynamics_model",
]
