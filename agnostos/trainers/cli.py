"""`agnostos fit`: LightningCLI for the dynamics diffusion model and for VLA fine-tuning.

    agnostos fit --config configs/dynamics/tiny.yaml --data.shards DIR --trainer.max_steps=20
    agnostos fit --config configs/dynamics/tiny.yaml --data.shards DIR --ckpt_path last
    agnostos fit validate --config ... --ckpt_path last
    agnostos fit --config configs/vla/tiny.yaml --data.shards DIR

Which job a command runs is read from its config: a `model:` section with a `backbone`
key is a VLA (`VLAModule` over `KeyframeDataModule`), any other the dynamics model
(`DynamicsDiffusionModule` over `DynamicsDataModule`). The Trainer is `--trainer.*`; two
callbacks have their own groups: `--checkpoint.*` (Lightning's ModelCheckpoint, for
resuming) and `--export.*` (`DiffusersExport`, the `checkpoint-<step>/unet/` folders X-ICM
loads; `VLAExport`, the `step-<N>/` adapter folders the VLA agent loads). Evaluation
during VLA training is one more callback in `trainer.callbacks` (`RolloutEvaluation`,
named by class path, so training code never imports the evaluator).

Run-directory defaults, all under `trainer.default_root_dir` unless set explicitly:
`checkpoints/` (ModelCheckpoint; `--ckpt_path last` finds `last.ckpt` there), `export/`,
`samples/` (validation grids), `tiny-base/` (with `model.base: tiny`), `config.yaml`
(the full resolved config, rewritten on resume) and the W&B logger's files (`wandb/`,
offline unless configured otherwise).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from agnostos.datamodules.dynamics import DynamicsDataModule
from agnostos.shards.manifest import MANIFEST_NAME
from agnostos.trainers.callbacks import DiffusersExport
from agnostos.trainers.dynamics import TINY_BASE, DynamicsDiffusionModule
from agnostos.trainers.vla_export import VLAExport

__all__ = ["VLACLI", "DynamicsCLI", "FitConfigError", "check_paths", "local_path", "run_fit"]

SUBCOMMANDS = ("fit", "validate")
DEFAULT_ROOT = "runs/dynamics"
VLA_ROOT = "runs/vla"
CHECKPOINT_DIR = "checkpoints"
TINY_DIR = "tiny-base"


class FitConfigError(Exception):
    """A configuration value was rejected when the classes were built."""


def _init_args(node: Any) -> Any:
    """The init_args namespace of a `class_path` node, or None."""
    return getattr(node, "init_args", None) if hasattr(node, "class_path") else None


# A URL scheme (`pipe:`, `s3://`, `file:`...); two letters at least, so `C:` stays a path.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def local_path(text: str) -> Path | None:
    """`text` as a plain local path, or None when the shard reader treats it as URLs.

    Shard strings are expanded by `webdataset.shardlists.expand_urls` (see
    `agnostos.datamodules.catalogue.shard_catalogue`): brace patterns and `::`-separated
    lists name several shards, and a scheme (`pipe:`, `s3://`) names no local file, so
    only a string with none of these can be checked on disk up front.
    """
    if "::" in text or "{" in text or _SCHEME.match(text):
        return None
    return Path(text)


def check_paths(config: Any) -> None:
    """Refuse missing local inputs of a fit/validate config before anything is built.

    Without this a missing `data.shards` surfaced only when training started: after the
    tiny base was built and a W&B run opened. Raises `FitConfigError` naming the key.
    """
    # a `class_path` node keeps its settings in init_args
    model = _init_args(config.model) or config.model
    data = _init_args(config.data) or config.data
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        from agnostos.models.tiny_vla import TINY_BACKBONES
        from agnostos.models.vla import VLAError
        from agnostos.models.vla_backbones import make_backbone, resolve_model_dir

        if backbone not in TINY_BACKBONES:
            try:  # the model type too: an unsupported backbone fails here, not at step 0
                make_backbone(resolve_model_dir(backbone))
            except VLAError as error:
                raise FitConfigError(f"model.backbone: {error}") from None
    base = getattr(model, "base", None)
    if base is not None and base != TINY_BASE and not Path(base).exists():
        raise FitConfigError(
            f"model.base: {base} does not exist (a local Stable Diffusion folder in "
            f"diffusers layout, or {TINY_BASE})"
        )
    unet = getattr(model, "unet", None)
    if unet is not None and not Path(unet).exists():
        raise FitConfigError(f"model.unet: {unet} does not exist")
    shards, folders = getattr(data, "shards", None), getattr(data, "folders", None)
    manifest = getattr(data, "manifest", None)
    if (shards is None) == (folders is None):
        raise FitConfigError(
            "data: give exactly one data source, data.shards (a converted shard folder or "
            "shard URLs) or data.folders (an RLBench dataset root)"
        )
    if manifest is not None:
        path = local_path(str(manifest))
        if path is not None and not path.exists():
            raise FitConfigError(f"data.manifest: {manifest} does not exist")
        if path is not None and path.is_dir() and not (path / MANIFEST_NAME).is_file():
            raise FitConfigError(f"data.manifest: {manifest} holds no {MANIFEST_NAME}")
    if shards is not None:
        path = local_path(str(shards))
        if path is not None and not path.exists():
            raise FitConfigError(f"data.shards: {shards} does not exist")
        if path is not None and manifest is None and not (path / MANIFEST_NAME).is_file():
            raise FitConfigError(
                f"data.shards: {shards} is not a converted shard folder (no {MANIFEST_NAME}); "
                "give data.manifest as well for shard files or URLs"
            )
    if folders is not None:
        path = local_path(str(folders))
        if path is not None and not path.is_dir():
            state = "is not a folder" if path.exists() else "does not exist"
            raise FitConfigError(f"data.folders: {folders} {state}")


class DynamicsCLI(LightningCLI):
    """LightningCLI with run-directory defaults and errors that name the bad setting."""

    default_root = DEFAULT_ROOT
    export_callback: type[L.Callback] = DiffusersExport  # the `export` group

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: LightningCLI.subcommands()[name] for name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                # last.ckpt at every epoch end: the exact-resume point (docs/training.md).
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.every_n_epochs": 1,
                "checkpoint.save_on_train_epoch_end": True,
            }
        )
        parser.add_lightning_class_args(self.export_callback, "export")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # LightningCLI warns when both `args` and sys.argv are given; `agnostos fit` always
        # passes its own argv slice, so parse exactly that.
        self.config = parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        # First: nothing (run folder, tiny base, W&B run) may exist for a config that fails.
        check_paths(config)
        trainer = config.trainer
        if trainer.default_root_dir is None:
            trainer.default_root_dir = self.default_root
        root = Path(trainer.default_root_dir)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(root / CHECKPOINT_DIR)
        model = config.model
        if getattr(model, "base", None) == TINY_BASE and model.tiny_dir is None:
            model.tiny_dir = str(root / TINY_DIR)
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            init = _init_args(logger)
            if init is not None and "save_dir" in init and init.save_dir in (None, "."):
                init.save_dir = str(root)
                root.mkdir(parents=True, exist_ok=True)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, FileExistsError) as error:
            raise FitConfigError(str(error)) from error
        # A camera or modality the data does not hold: one line naming the key now, not a
        # traceback from the datamodule's setup once the Trainer runs.
        data = self.datamodule
        if callable(getattr(data, "check_frames", None)):
            try:
                data.split  # noqa: B018  (the catalogue; its errors name their key)
            except ValueError as error:
                raise FitConfigError(str(error)) from error
            try:
                data.check_frames()
            except ValueError as error:
                raise FitConfigError(f"data.{error}") from error


class VLACLI(DynamicsCLI):
    """The same CLI for `VLAModule`: its export group is `VLAExport`."""

    default_root = VLA_ROOT
    export_callback = VLAExport


def config_job(argv: list[str]) -> str:
    """ "vla" when the command's config describes a VLA (a `model.backbone` key in a
    `--config` file or on the command line), else "dynamics"."""
    import yaml

    for position, arg in enumerate(argv):
        if arg.startswith("--model.backbone"):
            return "vla"
        path = None
        if arg == "--config" and position + 1 < len(argv):
            path = argv[position + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None or not Path(path).is_file():
            continue  # LightningCLI names a missing config itself
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError:
            continue
        model = loaded.get("model") if isinstance(loaded, dict) else None
        if isinstance(model, dict):
            keys = set(model) | set(model.get("init_args") or {})
            if "backbone" in keys:
                return "vla"
    return "dynamics"


def _cli_args(argv: list[str], subcommand: str) -> list[str]:
    if argv and argv[0] in SUBCOMMANDS:
        return list(argv)
    return [subcommand, *argv]


def run_fit(argv: list[str], subcommand: str = "fit") -> int:
    """Run the dynamics LightningCLI on `argv` (the arguments after `agnostos fit`).

    `argv` may start with a subcommand ("fit" or "validate"); otherwise `subcommand` is
    used. Returns the exit status: 0 on success, 2 for a rejected configuration (the
    message names the setting), jsonargparse's status for parse errors and --help.
    Missing local inputs (`model.base`, `model.unet`, `data.shards`, `data.folders`,
    `data.manifest`) are refused before the run folder, the tiny base or a W&B run exist.
    Weights & Biases runs offline unless WANDB_MODE says otherwise, and the Hugging Face
    hub is never contacted (all weights are local).
    """
    if subcommand not in SUBCOMMANDS:
        raise ValueError(f"subcommand must be one of {SUBCOMMANDS}, got {subcommand!r}")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The frozen VAE and text encoder stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    refused: tuple[type[Exception], ...] = (FitConfigError,)
    if config_job(argv) == "vla":
        from agnostos.datamodules.keyframes import KeyframeDataModule
        from agnostos.models.vla import VLAError
        from agnostos.trainers.vla import VLAModule

        cli, module, data, root = VLACLI, VLAModule, KeyframeDataModule, VLA_ROOT
        refused = (FitConfigError, VLAError)  # VLAError: found when the model is built
    else:
        cli, module, data = DynamicsCLI, DynamicsDiffusionModule, DynamicsDataModule
        root = DEFAULT_ROOT
    try:
        cli(
            module,
            data,
            args=_cli_args(argv, subcommand),
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "default_root_dir": root,
                "reload_dataloaders_every_n_epochs": 1,
            },
            seed_everything_default=0,
            auto_configure_optimizers=False,
        )
    except SystemExit as stop:
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except refused as error:
        print(f"agnostos fit: error: {error}", file=sys.stderr)
        return 2
    finally:
        _finish_wandb_run()
    return 0


def _finish_wandb_run() -> None:
    """Close the logger's W&B run, so a caller in the same process can start its own.

    Lightning leaves the run open after `fit`; a later `wandb.init` in the same process
    would then not write its run (the demo job logs a retrieval run right after training).
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.finish()


def main() -> int:
    return run_fit(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
