"""`rlbench.demo.Demo` as the PerAct fork defines it (stored pickles unpickle into it)."""

import numpy as np


class Demo:
    def __init__(self, observations, random_seed=None):
        self._observations = observations
        self.random_seed = random_seed
        self.variation_number = 0

    def __len__(self):
        return len(self._observations)

    def __getitem__(self, i):
        return self._observations[i]

    def restore_state(self):
        np.random.set_state(self.random_seed)
