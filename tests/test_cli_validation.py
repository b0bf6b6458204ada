"""Every setting is checked before any work starts (issue 11, point 2).

A bad flag or config value must stop the command with exit status 2 and one line naming
the key and the allowed values, and leave nothing behind: no output folder, no W&B run,
no tiny base. Each case here would otherwise run for a while (the demo for minutes) before
failing, so these tests are fast exactly because the checks fire first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from agnostos.cli import build_parser, main
from agnostos.cli_types import CsvChoices, csv, error_message, non_negative_int, positive_int
from agnostos.demo import DemoConfig
from agnostos.evaluation.rankers import RANKERS, make_ranker
from agnostos.shards.convert import ConvertOptions
from agnostos.shards.episode import CAMERAS, MODALITIES
from agnostos.tasks import MINIBENCH
from agnostos.trainers.cli import FitConfigError, check_paths, local_path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "dynamics" / "tiny.yaml"
RANKER_NAMES = (*RANKERS, "lang_vis.out")


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a refused command (argparse prints its usage above it)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


# -- the parser as a whole --------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, name: str = "agnostos"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, subparser in action.choices.items():
                yield from _parsers(subparser, f"{name} {command}")


def test_every_subcommand_and_flag_has_help() -> None:
    missing = []
    walked = 0
    for name, parser in _parsers(build_parser()):
        walked += 1
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                missing += [
                    f"{name} {choice.dest}"
                    for choice in action._choices_actions
                    if not (choice.help or "").strip()
                ]
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert walked >= 15  # agnostos, shards x3, sim x3, fit, validate, bank x4, demo, ...
    assert missing == []


def test_demo_help_lists_the_rankers_and_tasks(capsys) -> None:
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "{" + ",".join(RANKER_NAMES) + "}" in out
    for task in (*MINIBENCH.seen, *MINIBENCH.unseen):
        assert task in out


def test_convert_help_lists_cameras_and_modalities(capsys) -> None:
    assert main(["shards", "convert", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ", ".join(CAMERAS) in out and ", ".join(MODALITIES) in out


def test_ranker_choices_are_exactly_what_make_ranker_accepts() -> None:
    for name in RANKER_NAMES:
        make_ranker(name)
    with pytest.raises(ValueError):
        make_ranker("cosin")


def test_usage_errors_and_help_return_their_status(capsys) -> None:
    assert main([]) == 2
    assert main(["nonsense"]) == 2
    assert main(["--help"]) == 0
    assert "shards" in capsys.readouterr().out


def test_the_console_command_exits_2_with_one_line() -> None:
    env = {**os.environ, "MUJOCO_GL": "egl"}
    run = subprocess.run(
        [sys.executable, "-m", "agnostos", "demo", "--ranker", "cosin"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 2
    line = run.stderr.splitlines()[-1]
    assert line.startswith("agnostos demo: error: argument --ranker: invalid choice: 'cosin'")
    assert all(name in line for name in RANKER_NAMES)


# -- shared argument types --------------------------------------------------------------------


def test_argument_types() -> None:
    assert csv(" a, b,,c ") == ("a", "b", "c")
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    for parse, text, message in (
        (csv, " , ", "expected a comma-separated list"),
        (positive_int, "0", "expected a positive integer, got 0"),
        (positive_int, "two", "expected a positive integer, got 'two'"),
        (non_negative_int, "-1", "expected a non-negative integer, got -1"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
    cameras = CsvChoices(CAMERAS, "camera")
    assert cameras("front,wrist") == ("front", "wrist")
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        cameras("front,frnt,nose")
    assert str(refused.value) == (
        "unknown camera 'frnt', 'nose'; choose from " + ", ".join(CAMERAS)
    )
    with pytest.raises(argparse.ArgumentTypeError, match="camera 'front' listed twice"):
        cameras("front,front")
    tasks = CsvChoices(("a", "b", "c"), "task", {"seen": ("a", "b")})
    assert tasks("seen") == ("a", "b") and tasks("c") == ("c",)
    assert tasks.allowed() == "seen, a, b, c"


def test_error_message_drops_the_quotes_of_a_key_error() -> None:
    assert error_message(KeyError("unknown task 'x'")) == "unknown task 'x'"
    assert error_message(ValueError("bad")) == "bad"
    assert error_message(KeyError("a", "b")) == "('a', 'b')"


# -- agnostos demo ----------------------------------------------------------------------------


def test_demo_refuses_an_unknown_ranker_flag(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--ranker", "cosin"]) == 2
    line = error_line(capsys)
    assert "--ranker" in line and "'cosin'" in line
    assert all(name in line for name in RANKER_NAMES)
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("ranker: cosin", "ranker must be one of random, lang_vis_out, cosine, lang_vis.out, "
                          "got 'cosin'"),
        ("top_k: five", "top_k must be an integer, got 'five'"),
        ("top_k: 0", "top_k must be >= 1, got 0"),
        ("top_k: true", "top_k must be an integer, got True"),
        ("learning_rate: fast", "learning_rate must be a number, got 'fast'"),
        ("learning_rate: 1e-4", "learning_rate must be a number, got '1e-4' (YAML reads it as "
                                "text: write e.g. 1.0e-4)"),
        ("wandb: maybe", "wandb must be true or false, got 'maybe'"),
        ("seen_tasks: open_drawer", "seen_tasks must be a list of task names, got "
                                    "'open_drawer'"),
        ("unseen_tasks: [open_drawer]", "unseen_tasks has unknown task(s) 'open_drawer'; "
                                        "choose from " + ", ".join(MINIBENCH.unseen)),
        ("seen_tasks: []", "seen_tasks must name at least one task"),
        ("workers: 0", "workers must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_demo_config_values_are_checked_before_any_stage(tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    config = tmp_path / "demo.yaml"
    config.write_text(f"out: {out}\n{setting}\n")
    assert main(["demo", "--config", str(config)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"agnostos demo: error: {config}: {message}"), line
    assert not out.exists()
    assert files_under(tmp_path) == [config]


def test_demo_config_checks_every_field_type() -> None:
    config = DemoConfig(learning_rate=1, seen_tasks=["open_drawer"], out=Path("x"))
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.seen_tasks == ("open_drawer",) and config.out == "x"
    assert DemoConfig(ranker="lang_vis.out").ranker == "lang_vis.out"
    for name, bad in (
        ("seed", 1.5), ("image_size", "128"), ("batch_size", False), ("progress", 1),
        ("learning_rate", True), ("learning_rate", -1.0), ("ranker", 3), ("out", None),
        ("unseen_tasks", ("close_drawer", "close_drawer")), ("seen_tasks", "open_drawer"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^demo config: {name} "):
            DemoConfig(**{name: bad})


def test_demo_config_blames_the_file_for_file_values_only(tmp_path) -> None:
    config = tmp_path / "demo.yaml"
    config.write_text("top_k: 4\n")
    with pytest.raises(ValueError, match=r"^demo config: top_k must be >= 1, got 0"):
        DemoConfig.from_yaml(config, top_k=0)
    assert DemoConfig.from_yaml(config, top_k=None).top_k == 4


def test_demo_count_flags_must_be_positive(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--top-k", "0"]) == 2
    assert "argument --top-k: expected a positive integer, got 0" in error_line(capsys)
    assert main(["demo", "--out", str(out), "--seen-tasks", "close_drawer"]) == 2
    line = error_line(capsys)
    assert "--seen-tasks" in line and ", ".join(MINIBENCH.seen) in line
    assert not out.exists()


# -- agnostos fit -----------------------------------------------------------------------------


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_fit_refuses_missing_shards_before_building_anything(tmp_path, capsys, offline_wandb):
    root, missing = tmp_path / "run", tmp_path / "no-such-shards"
    argv = ["fit", "--config", str(TINY_CONFIG), "--data.shards", str(missing),
            "--trainer.default_root_dir", str(root)]  # fmt: skip
    assert main(argv) == 2
    assert error_line(capsys) == f"agnostos fit: error: data.shards: {missing} does not exist"
    assert not root.exists()  # so no wandb/, tiny-base/ or checkpoints/ either
    assert not (tmp_path / "wandb").exists()


def test_fit_refuses_a_folder_that_is_not_converted(tmp_path, capsys, offline_wandb):
    root, folder = tmp_path / "run", tmp_path / "raw"
    folder.mkdir()
    argv = ["validate", "--config", str(TINY_CONFIG), "--data.shards", str(folder),
            "--trainer.default_root_dir", str(root)]  # fmt: skip
    assert main(argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"agnostos fit: error: data.shards: {folder} is not a converted")
    assert "data.manifest" in line
    assert not root.exists()


VLA_CONFIGS = sorted((REPO / "configs" / "vla").glob("*.yaml"))


@pytest.mark.parametrize("config", VLA_CONFIGS, ids=[path.stem for path in VLA_CONFIGS])
def test_every_vla_config_parses_as_a_vla_job(config, capsys, offline_wandb):
    assert main(["fit", "--config", str(config), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "backbone:" in printed and "action_format:" in printed  # VLAModule's arguments
    assert "object_text:" in printed  # KeyframeDataModule's


def test_fit_refuses_a_backbone_that_is_neither_a_folder_nor_cached(tmp_path, capsys,
                                                                   offline_wandb):  # fmt: skip
    root = tmp_path / "run"
    config = REPO / "configs" / "vla" / "qwen2.5_vl_3b_lora.yaml"
    argv = ["fit", "--config", str(config), "--model.backbone", "nobody/no-such-model",
            "--trainer.default_root_dir", str(root)]  # fmt: skip
    assert main(argv) == 2
    line = error_line(capsys)
    assert line.startswith("agnostos fit: error: model.backbone: nobody/no-such-model: not a")
    assert "qwen2_5_vl" in line and "smolvlm" in line
    assert not root.exists()


def test_vla_merge_refuses_a_folder_that_is_no_export(tmp_path, capsys):
    folder, out = tmp_path / "run", tmp_path / "merged"
    folder.mkdir()
    assert main(["vla", "merge", str(folder), "--out", str(out)]) == 2
    assert error_line(capsys) == (
        f"agnostos vla merge: error: {folder} is not a VLA export (no vla.json)"
    )
    assert not out.exists()


def test_vla_merge_refuses_to_overwrite(tmp_path, capsys):
    export, out = tmp_path / "export", tmp_path / "merged"
    export.mkdir()
    (export / "vla.json").write_text("{}")
    out.mkdir()
    assert main(["vla", "merge", str(export), "--out", str(out)]) == 2
    assert "exists; choose a new folder" in error_line(capsys)


@pytest.mark.parametrize(
    "text",
    ["pipe:cat shards/shard-000000.tar", "shards/shard-{000000..000003}.tar",
     "a/shard-000000.tar::b/shard-000001.tar", "s3://bucket/shard-000000.tar"],
)  # fmt: skip
def test_shard_urls_are_not_local_paths(text) -> None:
    assert local_path(text) is None


def _config(tmp_path: Path, **data) -> SimpleNamespace:
    values = {"shards": None, "folders": None, "manifest": None, **data}
    return SimpleNamespace(
        model=SimpleNamespace(base="tiny", unet=None), data=SimpleNamespace(**values)
    )


def test_check_paths_names_each_missing_input(tmp_path) -> None:
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "manifest.json").write_text("{}")
    check_paths(_config(tmp_path, shards=str(converted)))
    check_paths(_config(tmp_path, shards="pipe:cat x.tar", manifest=str(converted)))
    check_paths(_config(tmp_path, shards="pipe:cat x.tar", manifest="s3://b/manifest.json"))
    check_paths(_config(tmp_path, folders=str(tmp_path)))
    nowhere = str(tmp_path / "nowhere")
    for data, message in (
        ({}, "data: give exactly one data source"),
        ({"shards": str(converted), "folders": str(tmp_path)}, "data: give exactly one"),
        ({"shards": "pipe:cat x.tar", "manifest": nowhere}, f"data.manifest: {nowhere} does "),
        ({"shards": str(tmp_path / "x.tar"), "manifest": str(tmp_path)}, "data.manifest: .* "
         "holds no manifest.json"),
        ({"shards": nowhere, "manifest": str(converted)}, f"data.shards: {nowhere} does not"),
        ({"folders": nowhere}, f"data.folders: {nowhere} does not exist"),
        ({"folders": str(converted / "manifest.json")}, "data.folders: .* is not a folder"),
    ):  # fmt: skip
        with pytest.raises(FitConfigError, match=f"^{message}"):
            check_paths(_config(tmp_path, **data))
    config = _config(tmp_path, shards=str(converted))
    config.model.base = nowhere
    with pytest.raises(FitConfigError, match=f"^model.base: {nowhere} does not exist"):
        check_paths(config)
    config.model.base, config.model.unet = "tiny", nowhere
    with pytest.raises(FitConfigError, match=f"^model.unet: {nowhere} does not exist"):
        check_paths(config)


# -- agnostos shards convert ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cameras", "frnt"], "argument --cameras: unknown camera 'frnt'; choose from "
                                + ", ".join(CAMERAS)),
        (["--modalities", "rgb,dpth"], "argument --modalities: unknown modality 'dpth'; "
                                       "choose from " + ", ".join(MODALITIES)),
        (["--cameras", "front,front"], "argument --cameras: camera 'front' listed twice"),
        (["--workers", "0"], "argument --workers: expected a positive integer, got 0"),
        (["--shard-size", "0"], "argument --shard-size: size must be positive"),
        (["--shard-size", "lots"], "argument --shard-size: cannot parse size 'lots'"),
        (["--on-error", "ignore"], "argument --on-error: invalid choice: 'ignore'"),
    ],
)  # fmt: skip
def test_convert_refuses_bad_options_before_creating_out(
    synthetic_root, tmp_path, capsys, flags, message
):
    out = tmp_path / "out"
    assert main(["shards", "convert", str(synthetic_root), str(out), *flags]) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_convert_refuses_a_missing_source(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["shards", "convert", str(tmp_path / "nowhere"), str(out)]) == 2
    assert error_line(capsys) == (
        f"agnostos shards convert: error: SRC: {tmp_path / 'nowhere'} does not exist"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cameras": ("frnt",)}, "cameras: unknown 'frnt'; choose from " + ", ".join(CAMERAS)),
        ({"modalities": ("rgb", "dpth")}, "modalities: unknown 'dpth'"),
        ({"cameras": ()}, "cameras: at least one is needed"),
        ({"cameras": "front"}, "cameras must be a list of names"),
        ({"tasks": ("a", "a")}, "tasks: a listed more than once"),
        ({"shard_size": 0}, "shard_size must be a positive number of bytes, got 0"),
        ({"shard_size": 1.5}, "shard_size must be a positive number of bytes"),
        ({"on_error": "ignore"}, "on_error must be 'fail' or 'skip'"),
    ],
)
def test_convert_options_name_the_bad_option(options, message) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        ConvertOptions(**options)


def test_convert_options_normalise_lists() -> None:
    options = ConvertOptions(tasks=["a"], cameras=["front"], modalities=["rgb"])
    assert (options.tasks, options.cameras, options.modalities) == (("a",), ("front",), ("rgb",))


# -- agnostos sim -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--episodes", "0"], "argument --episodes: expected a positive integer, got 0"),
        (["--episodes", "1", "--workers", "-2"], "argument --workers: expected a positive "
                                                 "integer, got -2"),
        (["--episodes", "1", "--image-size", "0"], "argument --image-size: expected a positive"),
        (["--episodes", "1", "--tasks", "fly_away"], "argument --tasks: unknown minibench task "
                                                     "'fly_away'; choose from seen, unseen, all, "
                                                     + ", ".join(MINIBENCH.all_tasks)),
        (["--episodes", "1", "--tasks", "open_drawer,open_drawer"], "listed twice"),
    ],
)  # fmt: skip
def test_sim_generate_refuses_bad_arguments(tmp_path, capsys, flags, message) -> None:
    out = tmp_path / "demos"
    assert main(["sim", "generate", "--out", str(out), *flags]) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_sim_generate_handler_prints_key_errors_without_quotes(tmp_path, capsys) -> None:
    """The handler's own check (for callers that skip the parser) is usage too, and its
    KeyError prints as a plain sentence."""
    from agnostos.cli import _sim_generate

    args = argparse.Namespace(
        tasks=("fly_away",), episodes=1, out=tmp_path / "demos", seed=0, image_size=32,
        workers=1, no_progress=True,
    )  # fmt: skip
    assert _sim_generate(args) == 2
    line = error_line(capsys)
    assert line.startswith("agnostos sim generate: error: unknown minibench task 'fly_away'")
    assert not (tmp_path / "demos").exists()


def test_generate_checks_its_arguments_first(tmp_path) -> None:
    from agnostos.envs.minibench.generate import generate

    for kwargs, error, message in (
        ({"episodes": 0}, ValueError, "episodes must be a positive integer, got 0"),
        ({"episodes": 1, "workers": 0}, ValueError, "workers must be a positive integer"),
        ({"episodes": 1, "image_size": -3}, ValueError, "image_size must be a positive"),
        ({"episodes": 1, "tasks": ()}, ValueError, "at least one minibench task"),
        ({"episodes": 1, "tasks": "open_drawer"}, ValueError, "not the string"),
        ({"episodes": 1, "tasks": ("fly",)}, KeyError, "unknown minibench task 'fly'"),
    ):
        kwargs = {"tasks": ("open_drawer",), **kwargs}
        with pytest.raises(error, match=message):
            generate(out=tmp_path / "demos", progress=False, **kwargs)
    assert not (tmp_path / "demos").exists()


def test_sim_render_refuses_bad_arguments(tmp_path, capsys) -> None:
    out = tmp_path / "views.png"
    assert main(["sim", "render", "fly_away", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert "argument TASK: invalid choice: 'fly_away'" in line and "open_drawer" in line
    assert main(["sim", "render", "open_drawer", "--episode", "-1", "--out", str(out)]) == 2
    assert "argument --episode: expected a non-negative integer, got -1" in error_line(capsys)
    assert main(["sim", "render", "open_drawer", "--variation", "99", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert line.startswith("agnostos sim render: error: --variation: task 'open_drawer' has ")
    assert not out.exists()


# -- agnostos bank / shards verify ------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
        (["--camera", "nose"], "argument --camera: invalid choice: 'nose'"),
        (["--text-cameras", "front,frnt"], "argument --text-cameras: unknown camera 'frnt'; "
                                           "choose from " + ", ".join(CAMERAS)),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--demo-text", "maybe"], "argument --demo-text: invalid choice: 'maybe'"),
        (["--suite", "agnostoss"], "argument --suite: invalid choice: 'agnostoss'"),
    ],
)  # fmt: skip
def test_bank_build_refuses_bad_flags(tmp_path, capsys, flags, message) -> None:
    out = tmp_path / "bank"
    argv = ["bank", "build", "--shards", str(tmp_path), "--model", str(tmp_path), "--out",
            str(out), *flags]  # fmt: skip
    assert main(argv) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_shards_verify_workers_must_be_positive(tmp_path, capsys) -> None:
    assert main(["shards", "verify", str(tmp_path), "--workers", "0"]) == 2
    assert "argument --workers: expected a positive integer, got 0" in error_line(capsys)


def test_an_incomplete_manifest_names_the_missing_key_without_quotes(tmp_path, capsys) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "agnostos-shards", "version": 2}')
    assert main(["shards", "info", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"agnostos shards info: error: {tmp_path / 'manifest.json'}")
    assert "missing key" in err and "'" not in err


def test_bank_build_config_errors_are_usage_and_come_before_the_model(tmp_path, capsys):
    """A setting BankBuildConfig refuses exits 2 before the (missing) model is loaded."""
    from agnostos.evaluation.bank import BankBuildConfig

    with pytest.raises(ValueError, match="suite must be one of agnostos, minibench"):
        BankBuildConfig(shards=str(tmp_path), suite="nope")
    out = tmp_path / "bank"
    argv = ["bank", "build", "--shards", str(tmp_path), "--model", str(tmp_path / "absent"),
            "--out", str(out), "--resolution", "0"]  # fmt: skip
    assert main(argv) == 2  # argparse: positive_int
    capsys.readouterr()
    assert main([*argv[:-1], "64", "--chunk-size", "1"]) == 1  # settings fine: the model fails
    assert "absent" in error_line(capsys)
    assert not out.exists()
