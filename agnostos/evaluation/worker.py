"""An environment worker process: one simulator, driven over a pipe by the runner.

One simulator per process because PyRep allows one CoppeliaSim per process and every
minibench renderer needs its own GL context. The worker knows nothing about agents or
records: it resets to a stored episode and executes actions, and answers every request
with exactly one message:

    ("reset", folder, seed)  -> ("observation", Observation, Episode)
    ("step", action)         -> ("step", StepResult)
    ("close",)               -> the process exits

A simulator failure answers ("simulator_error", message) and any other exception
("error", type name, message); the runner decides whether to retry. A crash or hang gets
no answer at all, which the runner notices (end of pipe, or its deadline).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["make_environment", "worker_main"]


def make_environment(backend: str, image_size: int, cameras: Sequence[str]) -> Any:
    """The simulator a suite names: minibench, rlbench, or `package.module:factory`."""
    if backend == "minibench":
        from agnostos.envs.minibench.env import MiniBenchEnv

        return MiniBenchEnv(image_size=image_size, cameras=tuple(cameras))
    if backend == "rlbench":
        from agnostos.envs.rlbench import RLBenchEnv

        return RLBenchEnv(image_size=image_size, cameras=tuple(cameras))
    module, _, name = backend.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(image_size=image_size, cameras=tuple(cameras))


def worker_main(
    conn: Connection, backend: str, image_size: int, cameras: Sequence[str], threads: int = 1
) -> None:
    """The worker's loop (the target of a spawned process)."""
    # Several simulators share the machine's cores: one thread each unless told otherwise.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads))
    from agnostos.envs.protocol import SimulatorError
    from agnostos.seeding import seed_all
    from agnostos.shards.folders import read_episode

    env = None
    try:
        env = make_environment(backend, image_size, cameras)
    except Exception as error:  # reported on the first request, so the runner names it
        startup_error: BaseException | None = error
    else:
        startup_error = None
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the runner went away
            break
        if request[0] == "close":
            break
        try:
            if startup_error is not None:
                raise SimulatorError(
                    f"cannot start the {backend} simulator: "
                    f"{type(startup_error).__name__}: {startup_error}"
                )
            if request[0] == "reset":
                _, folder, seed = request
                seed_all(seed)
                episode = read_episode(folder, cameras=(), check_frames=False)
                observation = env.reset_to_episode(episode)
                # The stored episode travels back (low-dim data only, a C pickle) so the
                # runner reads no episode pickle itself: reading one costs as much as a step.
                conn.send(("observation", observation, episode))
            elif request[0] == "step":
                conn.send(("step", env.step(request[1])))
            else:
                raise ValueError(f"unknown request {request[0]!r}")
        except SimulatorError as error:
            conn.send(("simulator_error", str(error)))
        except Exception as error:
            conn.send(("error", type(error).__name__, str(error)))
    if env is not None:
        env.close()
