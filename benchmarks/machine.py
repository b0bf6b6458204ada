"""Facts about the machine a benchmark ran on, recorded next to its numbers."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine_facts(**versions: str) -> dict[str, Any]:
    """CPU count and model, RAM, Python and kernel, plus the given package versions."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal"))
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        **versions,
        "kernel": platform.release(),
    }
