"""`rlbench.noise_model`: the identity noise model the default configs use."""

from abc import abstractmethod

import numpy as np


class NoiseModel:
    @abstractmethod
    def apply(self, val: np.ndarray) -> np.ndarray:
        pass


class Identity(NoiseModel):
    def apply(self, val: np.ndarray) -> np.ndarray:
        return val
