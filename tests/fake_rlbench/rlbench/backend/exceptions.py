"""`rlbench.backend.exceptions` (same classes and constructors as the PerAct fork)."""


class BoundaryError(Exception):
    """Raised when a boundary error occurs."""


class WaypointError(Exception):
    """Raised when we place a task but cant complete it with path planning."""

    def __init__(self, message, task):
        super().__init__(f"Error in task {task.get_name()}. {message}")


class NoWaypointsError(Exception):
    def __init__(self, message, task):
        super().__init__(f"Error in task {task.get_name()}. {message}")


class DemoError(Exception):
    def __init__(self, message, task):
        super().__init__(f"Error in task {task.get_name()}. {message}")


class InvalidActionError(Exception):
    pass


class TaskEnvironmentError(Exception):
    pass
