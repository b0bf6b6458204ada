"""Complete (unsharded) weights of a module, whichever Lightning strategy wraps it.

Why: under FSDP each rank holds only a shard of every parameter, so writing
`pl_module.model.unet` on rank 0 would save a fraction of the model. PyTorch's
distributed-checkpoint API gathers the full tensors for plain modules, DDP and both FSDP
generations alike; the export uses it whenever the strategy shards parameters. Gathering
is a collective: every rank must call `full_state_dict` at the same point.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

__all__ = ["full_state_dict", "shards_parameters"]


def shards_parameters(strategy: L.pytorch.strategies.Strategy) -> bool:
    """Whether `strategy` splits parameters across ranks (FSDP, model parallel)."""
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def full_state_dict(wrapped: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The full state dict of `wrapped` (the strategy's model), keys under `prefix` only,
    with `prefix` removed.

    On an accelerator the gathered tensors are moved to the CPU and only rank 0 receives
    them (the other ranks get an empty dict), so no GPU holds a second full copy. On the
    CPU (tests) every rank receives them: PyTorch's CPU offload of FSDP state cannot be
    used there.
    """
    on_accelerator = any(p.device.type != "cpu" for p in wrapped.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_accelerator)
    state = get_model_state_dict(wrapped, options=options)
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
