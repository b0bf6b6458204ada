"""The agent's own thread: every agent call runs there, one at a time, in submission order.

A model-backed agent's call (an LLM or a VLA on a GPU) and a simulator's step (RLBench
plans a path for every keyframe) each take about a second; run one after the other, the
GPU waits for the simulators and the simulators for the GPU. The runner therefore hands
every agent call to this thread and goes on collecting the workers' answers, starting
resets and sending actions meanwhile.

The agent itself still sees one call at a time, in the order the runner submitted them
(`reset` of a slot before its first `act`, `episode_stats` of a finished episode before
the slot's next `reset`), so an agent needs no locking.

Finished jobs wait in a queue; `ready` is a readable connection for
`multiprocessing.connection.wait`, so the runner sleeps on the workers' pipes and the
agent at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Pipe
from typing import Any

__all__ = ["AgentThread", "Done"]


@dataclass
class Done:
    """A finished job: what was submitted with it, its result or exception, its duration."""

    tag: Any
    result: Any = None
    error: BaseException | None = None
    seconds: float = 0.0


class AgentThread:
    """Runs submitted calls on one daemon thread (a hung agent never blocks the exit)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self.ready, self._signal = Pipe(duplex=False)
        self.pending = 0  # jobs submitted and not yet collected
        self._thread = threading.Thread(target=self._serve, name="agnostos-agent", daemon=True)
        self._thread.start()

    def submit(self, tag: Any, call: Callable[..., Any], *args: Any) -> None:
        self.pending += 1
        self._jobs.put((tag, call, args))

    def collect(self) -> list[Done]:
        """The jobs finished so far (call when `ready` is readable, or any time)."""
        finished = []
        while self.ready.poll():
            self.ready.recv_bytes()
            finished.append(self._done.get())
        self.pending -= len(finished)
        return finished

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
        self.ready.close()
        self._signal.close()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            tag, call, args = job
            started = time.perf_counter()
            try:
                done = Done(tag, result=call(*args))
            except BaseException as error:  # reported to the runner, never lost
                done = Done(tag, error=error)
            done.seconds = time.perf_counter() - started
            self._done.put(done)
            self._signal.send_bytes(b"1")
