"""An exponential moving average (EMA) of a model's trainable weights.

Why our own class: the trainer needs three things a generic helper does not give together,
namely weights keyed by parameter *name* (so a checkpoint names what it holds and a
mismatch is an error, not a silent zip of two lists), an exact swap in and out of the live
model (validation and export use the EMA weights, training resumes on the raw ones bit for
bit), and a state that records the global step of its last update (so a resumed run
neither skips nor repeats an update).

The average is kept in float32 on the parameters' device whatever the training precision.
Update n (counting from 0) uses the decay `min(decay, (1 + n) / (10 + n))` when `warmup`
is on (the schedule diffusers' EMAModel uses by default), else `decay`: without the ramp
an EMA at 0.9999 would still weigh the initial weights by e^-2 after 20k steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["ExponentialMovingAverage"]

NamedParameters = Iterable[tuple[str, nn.Parameter]]


def _trainable(parameters: NamedParameters) -> list[tuple[str, nn.Parameter]]:
    return [(name, parameter) for name, parameter in parameters if parameter.requires_grad]


class ExponentialMovingAverage:
    """EMA of named parameters; `update` after each optimiser step, `applied` to use it.

    Args:
        parameters: `module.named_parameters()`; only those with `requires_grad` are kept.
        decay: the target decay in [0, 1).
        warmup: ramp the decay up as `(1 + n) / (10 + n)` (see the module docstring).
    """

    def __init__(self, parameters: NamedParameters, decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.last_step = -1
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: parameter.detach().float().clone()
                for name, parameter in _trainable(parameters)
            }
        if not self.shadow:
            raise ValueError("no trainable parameters to average")

    def decay_at(self, update: int) -> float:
        """The decay used by update number `update` (0 for the first)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + update) / (10.0 + update))

    def _matched(self, parameters: NamedParameters) -> list[tuple[torch.Tensor, nn.Parameter]]:
        live = dict(_trainable(parameters))
        if live.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - live.keys())[:3]
            extra = sorted(live.keys() - self.shadow.keys())[:3]
            raise ValueError(
                f"EMA and model parameters differ: missing from the model {missing}, "
                f"unknown to the EMA {extra}"
            )
        pairs = []
        for name, parameter in live.items():
            shadow = self.shadow[name]
            if shadow.device != parameter.device:
                shadow = shadow.to(parameter.device)
                self.shadow[name] = shadow
            pairs.append((shadow, parameter))
        return pairs

    @torch.no_grad()
    def update(self, parameters: NamedParameters, step: int) -> bool:
        """Blend the current weights in, once per global step; True if an update happened.

        `step` is the trainer's global step after the optimiser step; a second call with
        the same step (gradient accumulation calls back once per micro-batch) does nothing.
        """
        if step <= self.last_step:
            return False
        pairs = self._matched(parameters)
        weight = 1.0 - self.decay_at(self.updates)
        shadows = [shadow for shadow, _ in pairs]
        values = [parameter.detach().float() for _, parameter in pairs]
        torch._foreach_lerp_(shadows, values, weight)
        self.updates += 1
        self.last_step = int(step)
        return True

    @contextmanager
    def applied(self, parameters: NamedParameters) -> Iterator[None]:
        """Run the body with the EMA weights in the model, then restore the raw weights.

        The raw weights are copied aside and copied back, so training continues exactly as
        if the swap had never happened.
        """
        pairs = self._matched(parameters)
        with torch.no_grad():
            backup = [parameter.detach().clone() for _, parameter in pairs]
            for shadow, parameter in pairs:
                parameter.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, (_, parameter) in zip(backup, pairs, strict=True):
                    parameter.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "updates": self.updates,
            "last_step": self.last_step,
            "shadow": {name: tensor.detach().clone() for name, tensor in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved EMA; the parameter names and shapes must match this one's.

        The decay settings stay this object's (a resumed run may change them); the counts
        and the average come from `state`.
        """
        shadow = state.get("shadow")
        if not isinstance(shadow, dict):
            raise ValueError("EMA state has no 'shadow' weights")
        if shadow.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - shadow.keys())[:3]
            raise ValueError(f"EMA state does not match the model: missing {missing}")
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA state for {name} has shape {tuple(tensor.shape)}, the model "
                    f"{tuple(self.shadow[name].shape)}"
                )
        self.shadow = {
            name: tensor.detach().to(self.shadow[name].device, torch.float32).clone()
            for name, tensor in shadow.items()
        }
        self.updates = int(state.get("updates", 0))
        self.last_step = int(state.get("last_step", -1))
