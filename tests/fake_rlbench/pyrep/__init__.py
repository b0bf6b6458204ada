"""Fake PyRep (tests only): the names RLBench and agnostos use, no CoppeliaSim."""

__version__ = "4.1.0.3"  # stepjam/PyRep @ 8f420be8 pyrep/__init__.py

testing = False

from .pyrep import PyRep  # noqa: E402

__all__ = ["PyRep"]
