"""Packaging: configs/ ships inside the wheel, and a non-editable install runs `agnostos demo`.

The slow test builds the wheel from a copy of this checkout (so no build/ or *.egg-info lands
in the repository), installs it with --no-deps into a fresh venv whose only view of the
dependencies is a .pth line naming this environment's site-packages (plain paths from a .pth
are appended to sys.path, but the .pth files inside that folder, the editable install's
finder among them, are not run), and checks that the installed agnostos, not this checkout,
finds every default config.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest

from agnostos.demo import DEMO_CONFIG, DYNAMICS_CONFIG, DemoConfig
from agnostos.resources import MissingConfigError, packaged_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEFAULT_CONFIGS = ("demo.yaml", "dynamics/tiny.yaml", "dynamics/sd2_768.yaml")


def _repo_configs() -> list[str]:
    """Every YAML under configs/, as '/'-separated names relative to it."""
    return sorted(path.relative_to(CONFIGS).as_posix() for path in CONFIGS.rglob("*.yaml"))


def test_the_default_configs_are_in_configs() -> None:
    assert set(DEFAULT_CONFIGS) <= set(_repo_configs())


@pytest.mark.parametrize("name", _repo_configs())
def test_packaged_config_is_the_repository_file(name: str) -> None:
    path = packaged_config(name)
    assert path.is_file()
    assert path.name == name.rsplit("/", 1)[-1]
    assert path.read_bytes() == (CONFIGS / name).read_bytes()


def test_demo_defaults_come_from_packaged_configs() -> None:
    assert packaged_config("demo.yaml") == DEMO_CONFIG
    assert packaged_config("dynamics/tiny.yaml") == DYNAMICS_CONFIG


def test_missing_packaged_config_is_one_error_naming_it() -> None:
    with pytest.raises(MissingConfigError, match=r"'dynamics/absent\.yaml'"):
        packaged_config("dynamics/absent.yaml")
    # a folder is not a config
    with pytest.raises(MissingConfigError, match=r"'dynamics'"):
        packaged_config("dynamics")
    assert issubclass(MissingConfigError, FileNotFoundError)


@pytest.mark.parametrize("name", ["", "../pyproject.toml", "dynamics/../demo.yaml"])
def test_config_names_stay_inside_configs(name: str) -> None:
    with pytest.raises(ValueError, match="not a config name"):
        packaged_config(name)


def test_pyproject_ships_every_package_and_config() -> None:
    """The explicit package list (needed for the configs mapping) must not miss a package."""
    tomllib = pytest.importorskip("tomllib")
    setuptools_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools_config["package-dir"] == {"agnostos.configs": "configs"}

    # every folder holding Python files (with or without __init__.py) must ship
    code_packages = {
        ".".join(module.parent.relative_to(REPO).parts)
        for module in (REPO / "agnostos").rglob("*.py")
        if "__pycache__" not in module.parts
    }
    config_packages = {
        ".".join(("agnostos", *folder.relative_to(REPO).parts))
        for folder in [CONFIGS, *(p for p in CONFIGS.rglob("*") if p.is_dir())]
        if folder.name != "__pycache__"
    }
    assert (CONFIGS / "__init__.py").is_file()  # the editable finder resolves it by __init__
    listed = set(setuptools_config["packages"])
    expected = code_packages | config_packages
    assert not expected - listed, (
        f"add {sorted(expected - listed)} to [tool.setuptools] packages in pyproject.toml"
    )
    assert not listed - expected, (
        f"remove {sorted(listed - expected)} from [tool.setuptools] packages in pyproject.toml"
    )

    package_data = setuptools_config["package-data"]
    for name in _repo_configs():
        folder, _, filename = name.rpartition("/")
        package = ".".join(["agnostos", "configs", *filter(None, folder.split("/"))])
        patterns = package_data.get(package, [])
        assert any(fnmatch.fnmatch(filename, p) for p in patterns), (name, package, patterns)


def _copy_project(destination: Path) -> Path:
    """The files a build reads (top-level files, agnostos/, configs/), without caches."""
    destination.mkdir()
    for entry in REPO.iterdir():
        if entry.is_file():
            shutil.copy2(entry, destination / entry.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("agnostos", "configs"):
        shutil.copytree(REPO / folder, destination / folder, ignore=ignore)
    return destination


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{command} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


INSTALLED_CHECK = r"""
import json, sys
from dataclasses import asdict
from pathlib import Path

import yaml

import agnostos
import agnostos.configs
from agnostos.demo import DEMO_CONFIG, DYNAMICS_CONFIG, DemoConfig
from agnostos.resources import packaged_config

names = json.loads(sys.argv[1])
paths = {name: str(packaged_config(name)) for name in names}
demo = DemoConfig.from_yaml(packaged_config("demo.yaml"))
assert demo == DemoConfig.from_yaml(DEMO_CONFIG), "DEMO_CONFIG is not the packaged demo.yaml"
assert DYNAMICS_CONFIG == packaged_config("dynamics/tiny.yaml")
for name in names:
    if name.startswith("dynamics/"):
        loaded = yaml.safe_load(Path(paths[name]).read_text())
        assert isinstance(loaded, dict) and {"model", "data", "trainer"} <= set(loaded), name
print(json.dumps({
    "agnostos": agnostos.__file__,
    "configs_package": agnostos.configs.__file__,
    "paths": paths,
    "demo": asdict(demo),
}))
"""


def test_wheel_install_finds_its_configs_and_runs_the_demo_cli(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["WANDB_MODE"] = "offline"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

    # 1. the wheel, built from a copy of the checkout with this environment's setuptools
    source = _copy_project(tmp_path / "source")
    wheels = tmp_path / "wheels"
    _run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels),
         str(source)],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    (wheel,) = wheels.glob("agnostos-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
    for name in _repo_configs():
        assert f"agnostos/configs/{name}" in members, f"configs/{name} is not in {wheel.name}"
    assert "agnostos/configs/__init__.py" in members
    modules = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "agnostos").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert modules <= members, f"modules missing from the wheel: {sorted(modules - members)}"

    # 2. a fresh venv with only the wheel installed (before the .pth, so pip cannot see the
    #    editable agnostos of this environment)
    fresh = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], cwd=tmp_path, env=env)
    fresh_python = fresh / "bin" / "python"
    _run(
        [*pip, "--python", str(fresh_python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    fresh_site = Path(
        _run(
            [str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            cwd=tmp_path,
            env=env,
        ).stdout.strip()
    )
    # this interpreter's site-packages folders (where the dependencies are), never the
    # checkout itself
    dependency_dirs = dict.fromkeys(
        entry
        for entry in sys.path
        if Path(entry).name in ("site-packages", "dist-packages") and Path(entry).is_dir()
    )
    assert dependency_dirs, sys.path
    (fresh_site / "agnostos_test_dependencies.pth").write_text("\n".join(dependency_dirs) + "\n")

    # 3. the installed package finds every config inside the fresh venv
    check = _run(
        [str(fresh_python), "-I", "-c", INSTALLED_CHECK, json.dumps(_repo_configs())],
        cwd=tmp_path,
        env=env,
    )
    report = json.loads(check.stdout.strip().splitlines()[-1])
    assert Path(report["agnostos"]).is_relative_to(fresh_site), report["agnostos"]
    assert Path(report["configs_package"]).is_relative_to(fresh_site)
    expected_demo = asdict(DemoConfig.from_yaml(CONFIGS / "demo.yaml"))
    assert report["demo"] == json.loads(json.dumps(expected_demo))
    for name, path in report["paths"].items():
        assert Path(path).is_relative_to(fresh_site / "agnostos" / "configs"), (name, path)
        assert Path(path).read_bytes() == (CONFIGS / name).read_bytes(), name

    # 4. the console scripts: `agnostos demo --help`, and LightningCLI reading the packaged
    #    tiny config (the path `agnostos demo` hands to `agnostos fit`)
    demo_help = _run([str(fresh / "bin" / "agnostos"), "demo", "--help"], cwd=tmp_path, env=env)
    assert "--config" in demo_help.stdout
    tiny = report["paths"]["dynamics/tiny.yaml"]
    printed = _run(
        [str(fresh / "bin" / "agnostos"), "fit", "--config", tiny, "--print_config"],
        cwd=tmp_path,
        env=env,
    )
    assert "base: tiny" in printed.stdout
    assert not (tmp_path / "runs").exists()  # --print_config trains nothing
