"""The fingerprinted stage runner behind `agnostos demo`: skip, re-run, resume, discard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agnostos.stages import Stage, StageRunner


class Interrupted(Exception):
    pass


def _pipeline(root: Path, calls: list[str], words: int, suffix: str, fail_at: str = ""):
    """Two stages: `write` makes `words` numbered files (resuming: files already there are
    kept); `join` reads them and adds `suffix`."""
    words_dir = root / "words"

    def write(records):
        words_dir.mkdir(exist_ok=True)
        for index in range(words):
            path = words_dir / f"{index}.txt"
            if path.exists():
                continue
            if fail_at == f"write:{index}":
                raise Interrupted
            calls.append(f"write {index}")
            path.write_text(f"word{index}")
        return {"files": sorted(p.name for p in words_dir.iterdir())}

    def join(records):
        calls.append("join")
        names = records["write"].result["files"]
        text = " ".join((words_dir / name).read_text() for name in names) + suffix
        (root / "joined.txt").write_text(text)
        return {"text": text}

    return [
        Stage("write", {"words": words}, (), (words_dir,), write),
        Stage("join", {"suffix": suffix}, ("write",), (root / "joined.txt",), join),
    ]


def _run(root: Path, *args, **kwargs) -> tuple[StageRunner, list[str], list[str]]:
    calls: list[str] = []
    log: list[str] = []
    runner = StageRunner(root / "stages", log=log.append)
    for stage in _pipeline(root, calls, *args, **kwargs):
        runner.run(stage)
    return runner, calls, log


def test_unchanged_settings_skip_every_stage(tmp_path: Path) -> None:
    first, calls, _ = _run(tmp_path, 2, "!")
    assert calls == ["write 0", "write 1", "join"]
    again, calls, log = _run(tmp_path, 2, "!")
    assert calls == []
    assert log == [
        f"stage write: already done ({tmp_path / 'stages' / 'write.json'})",
        f"stage join: already done ({tmp_path / 'stages' / 'join.json'})",
    ]
    assert again.records["join"].result == {"text": "word0 word1!"}
    assert not again.records["join"].ran and first.records["join"].ran


def test_a_changed_setting_reruns_its_stage_and_those_after_it(tmp_path: Path) -> None:
    _run(tmp_path, 2, "!")
    runner, calls, log = _run(tmp_path, 2, "?")  # only the last stage's setting
    assert calls == ["join"]
    assert log[1] == "stage join: re-running (suffix '!' -> '?')"
    assert runner.records["join"].settings == {"suffix": "?"}

    runner, calls, log = _run(tmp_path, 1, "?")  # the first stage's setting
    assert calls == ["write 0", "join"]  # its old outputs were discarded, not reused
    assert log == [
        "stage write: re-running (words 2 -> 1)",
        "stage join: re-running (input write changed)",
    ]
    assert (tmp_path / "joined.txt").read_text() == "word0?"
    assert sorted(p.name for p in (tmp_path / "words").iterdir()) == ["0.txt"]


def test_an_interrupted_stage_resumes_with_the_same_settings(tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        _run(tmp_path, 3, "!", fail_at="write:2")
    assert not (tmp_path / "stages" / "write.json").exists()
    started = json.loads((tmp_path / "stages" / "write.started.json").read_text())
    assert len(started["fingerprint"]) == 64
    runner, calls, log = _run(tmp_path, 3, "!")
    assert calls == ["write 2", "join"]  # files 0 and 1 were kept
    assert "stage write: resuming an interrupted run with the same settings" in log
    assert not (tmp_path / "stages" / "write.started.json").exists()
    assert runner.records["join"].result == {"text": "word0 word1 word2!"}


def test_an_interrupted_stage_restarted_with_other_settings_starts_clean(
    tmp_path: Path,
) -> None:
    _run(tmp_path, 3, "!")
    with pytest.raises(Interrupted):  # settings changed, then killed half-way
        _run(tmp_path, 4, "!", fail_at="write:1")
    # the old finished record is gone, so going back to 3 words cannot reuse half a run
    assert not (tmp_path / "stages" / "write.json").exists()
    runner, calls, _ = _run(tmp_path, 3, "!")
    assert calls == ["write 0", "write 1", "write 2"]
    # join's record matches again (same settings, same input fingerprint): its output,
    # made from that very input, is still valid
    assert runner.records["join"].result == {"text": "word0 word1 word2!"}
    assert (tmp_path / "joined.txt").read_text() == "word0 word1 word2!"


def test_outputs_of_unknown_origin_are_discarded(tmp_path: Path) -> None:
    (tmp_path / "words").mkdir()
    (tmp_path / "words" / "0.txt").write_text("stale")  # e.g. made by an older version
    runner, calls, _ = _run(tmp_path, 1, "")
    assert calls == ["write 0", "join"]
    assert runner.records["join"].result == {"text": "word0"}


def test_a_stage_cannot_run_before_its_inputs(tmp_path: Path) -> None:
    calls: list[str] = []
    _, join = _pipeline(tmp_path, calls, 1, "")
    with pytest.raises(ValueError, match=r"stage join: runs after \['write'\]"):
        StageRunner(tmp_path / "stages").run(join)
