"""Locate the YAML configs shipped with the package.

The defaults live in `configs/` at the repository root (where users look for them) and the
build maps that folder to the data-only package `agnostos.configs` (pyproject.toml,
`[tool.setuptools] package-dir`), so the same files are found through `importlib.resources`
in an editable install (they are the repository's own files) and in a regular wheel (the
installed copies under `site-packages/agnostos/configs/`).

    packaged_config("demo.yaml")            # configs/demo.yaml
    packaged_config("dynamics/tiny.yaml")   # configs/dynamics/tiny.yaml

From an installed wheel, where the repository's `configs/` is not at hand:

    c=$(python -c 'import agnostos.resources as r; print(r.packaged_config("dynamics/tiny.yaml"))')
    agnostos fit --config "$c" --data.shards DIR
"""

from __future__ import annotations

import atexit
import functools
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

CONFIG_PACKAGE = "agnostos.configs"

# Files handed out by `packaged_config` must stay on disk for the whole process (LightningCLI
# reads `--config` long after the call). For an installed wheel `as_file` returns the file
# itself; were the package ever imported from a zip, it extracts a temporary copy, which this
# stack keeps until the interpreter exits.
_EXTRACTED = ExitStack()
atexit.register(_EXTRACTED.close)


class MissingConfigError(FileNotFoundError):
    """A config that should ship with agnostos is not in the installed package."""


@functools.cache
def packaged_config(name: str) -> Path:
    """The filesystem path of the shipped config `name` (relative to `configs/`, '/'-separated).

    Raises MissingConfigError, naming the config, when the install does not hold it.
    """
    parts = [part for part in name.split("/") if part]
    if not parts or any(part in (".", "..") for part in parts):
        raise ValueError(f"not a config name relative to configs/: {name!r}")
    try:
        resource = resources.files(CONFIG_PACKAGE)
    except ModuleNotFoundError as error:
        raise MissingConfigError(
            f"packaged config {name!r} not found: the package {CONFIG_PACKAGE!r} is not "
            "installed (reinstall agnostos; its wheel ships configs/ as agnostos/configs/)"
        ) from error
    for part in parts:
        resource = resource / part
    if not resource.is_file():
        raise MissingConfigError(
            f"packaged config {name!r} not found in {CONFIG_PACKAGE} ({resource}); the install "
            "is incomplete or the name is wrong (names are relative to configs/, e.g. "
            "'dynamics/tiny.yaml')"
        )
    return Path(_EXTRACTED.enter_context(resources.as_file(resource)))
