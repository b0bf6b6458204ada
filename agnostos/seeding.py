"""Stable seeds derived from what identifies a piece of work, and seeding every RNG from one.

Why derived seeds: a seed per item (a demo, an evaluation episode) makes its result
independent of batch composition, call order and which worker ran it. Python's `hash()` is
salted per process, so SHA-256 of the parts is used instead.
"""

from __future__ import annotations

import hashlib
import random
import sys

import numpy as np

__all__ = ["derive_seed", "seed_all"]


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from identifying parts, e.g. `derive_seed(task, episode, seed)`."""
    text = "\x1f".join(str(part) for part in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_all(seed: int) -> None:
    """Seed Python's `random`, numpy's legacy global RNG and, when it is loaded, torch.

    numpy's legacy seed takes 32 bits, so the seed is folded to that range for it.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
