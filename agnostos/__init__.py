"""agnostos: training and evaluation for cross-task robot manipulation on AGNOSTOS."""

__version__ = "0.1.0"
