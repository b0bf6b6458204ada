"""The docs tell the truth: their YAML loads, the files they name exist, and they point
nowhere outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# repository paths named in prose or code: configs/..., docs/....md, benchmarks/....py, ...
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:agnostos|benchmarks|configs|docs|tests)/[\w/.-]*\w\.(?:py|md|yaml))"
)
# places that exist only on some development machine
OUTSIDE = re.compile(r"(/work/|/root/|/home/|shared/docs|file://)")
FIT_KEYS = {"model", "data", "trainer"}


def _blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for number, (lang, body) in enumerate(FENCE.findall(doc.read_text())):
            if lang == language:
                found.append((f"{doc.relative_to(REPO)}#{number}", body))
    return found


def test_the_docs_have_yaml_and_python_examples_to_check() -> None:
    assert _blocks("yaml"), "the scan found no YAML block: the fence pattern is wrong"
    assert _blocks("python")


@pytest.mark.parametrize(("where", "body"), _blocks("yaml"), ids=lambda v: str(v)[:40])
def test_every_yaml_snippet_loads_and_fit_accepts_fit_configs(
    where: str, body: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    value = yaml.safe_load(body)
    assert isinstance(value, dict), f"{where}: not a YAML mapping"
    if not set(value) & FIT_KEYS:
        return
    from agnostos.trainers.cli import run_fit

    config = tmp_path / "snippet.yaml"
    config.write_text(body)
    status = run_fit(["fit", "--config", str(config), "--print_config"])
    printed = capsys.readouterr()
    assert status == 0, f"{where}: agnostos fit refused it:\n{printed.err}"
    resolved = yaml.safe_load(printed.out)
    for section in set(value) & FIT_KEYS:
        assert section in resolved


@pytest.mark.parametrize(("where", "body"), _blocks("python"), ids=lambda v: str(v)[:40])
def test_every_python_snippet_compiles(where: str, body: str) -> None:
    compile(body, where, "exec")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repository_path_a_doc_names_exists(doc: Path) -> None:
    text = doc.read_text()
    missing = sorted({path for path in REPO_PATH.findall(text) if not (REPO / path).exists()})
    assert not missing, f"{doc.relative_to(REPO)} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", [*DOCS, REPO / "pyproject.toml"], ids=lambda p: p.name)
def test_no_doc_points_outside_the_repository(doc: Path) -> None:
    hits = [line for line in doc.read_text().splitlines() if OUTSIDE.search(line)]
    assert not hits, f"{doc.relative_to(REPO)}: {hits}"


def test_pyproject_names_only_existing_docs() -> None:
    text = (REPO / "pyproject.toml").read_text()
    missing = [path for path in REPO_PATH.findall(text) if not (REPO / path).exists()]
    assert not missing, f"pyproject.toml names {missing}"


@pytest.mark.parametrize("init", sorted((REPO / "agnostos").rglob("__init__.py")), ids=str)
def test_package_docstrings_name_only_modules_that_exist(init: Path) -> None:
    """A package docstring lists its modules as `name.py`; each must exist."""
    doc = init.read_text().split('"""')[1] if init.read_text().startswith('"""') else ""
    named = re.findall(r"`(\w+\.py)`", doc)
    missing = [name for name in named if not (init.parent / name).exists()]
    assert not missing, f"{init.relative_to(REPO)} names {missing}"
