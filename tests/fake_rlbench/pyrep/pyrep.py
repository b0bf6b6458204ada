"""Fake `pyrep.pyrep.PyRep`: records launch/start/step/shutdown instead of running CoppeliaSim."""

from __future__ import annotations

from pyrep.const import Verbosity
from pyrep.errors import PyRepError


class PyRep:
    def __init__(self):
        self.launched = False
        self.headless: bool | None = None
        self.scene_file: str | None = None
        self.running = False
        self.steps = 0

    def launch(
        self,
        scene_file: str = "",
        headless: bool = False,
        responsive_ui: bool = False,
        blocking: bool = False,
        verbosity: Verbosity = Verbosity.NONE,
    ) -> None:
        self.scene_file = scene_file
        self.headless = headless
        self.launched = True

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def step(self) -> None:
        self.steps += 1

    def shutdown(self) -> None:
        if not self.launched:
            raise PyRepError("CoppeliaSim has not been launched. Call launch() first.")
        self.launched = False
        self.running = False
