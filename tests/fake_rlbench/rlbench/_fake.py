"""The fake's own controls (not part of RLBench): a call log and fault switches.

Every fake `Environment` owns one `FakeSim` (`env.fake`), shared with its scene, robot and
task environments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeSim:
    """What the fake simulator was asked to do, and what it should do next.

    succeed_after: the task's success condition holds after this many steps of an episode.
    fail_after: a fail condition holds (terminate without success) after this many steps.
    step_errors: step number (1-based, per episode) -> exception the arm action raises after
        its shape/quaternion/workspace checks, as an error escaping the planner would.
    unreachable: the arm's `get_path` raises ConfigurationPathError, which
        EndEffectorPoseViaPlanning turns into InvalidActionError as RLBench does.
    reset_error: raised by `Scene.reset` (e.g. PyRep's "The call failed on the V-REP side").
    placement_error: `Scene.init_episode` raises BoundaryError, which TaskEnvironment.reset
        turns into TaskEnvironmentError as RLBench does.
    """

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    succeed_after: int | None = None
    fail_after: int | None = None
    step_errors: dict[int, BaseException] = field(default_factory=dict)
    unreachable: bool = False
    reset_error: BaseException | None = None
    placement_error: bool = False

    def record(self, name: str, **details: Any) -> None:
        self.calls.append((name, details))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def details(self, name: str) -> list[dict[str, Any]]:
        return [details for call, details in self.calls if call == name]
