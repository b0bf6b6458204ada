"""X-ICM's demo bank: per-demo diffusion features and demo text, built once, stored versioned.

X-ICM ranks seen-task demos by the dynamics model's prediction for each demo's first front
image and instruction, and shows the chosen demos to the LLM as text. The published code
reads a precomputed `all_diffusion_features.pkl` (no script builds it) and rebuilds each
chosen demo's text from raw files on every query. Here both are computed once per demo:

* **Features** (`features.safetensors`, one row per demo): the conditioning latent
  (`input_latents`, X-ICM's `all_input_image_feats`), the predicted future latent
  (`output_latents`, `all_output_image_feats`), the text encoder's BOS hidden state
  (`prompt_bos`, `all_prompt_feats`: identical for every prompt because CLIP's text
  transformer is causal, kept for parity) and the pooled EOS text embedding
  (`prompt_pooled`, prompt-dependent, for the `cosine` ranker's text term).
* **Metadata** (`bank.json`): format version, model identity (paths and the SHA-256 of the
  UNet folder), sampling settings, seed rule, camera, frame, resolution, and per demo its
  task, variation, episode, instruction, shard and key, seed, the precomputed demo text
  (frame-0 observation + keyframe actions in X-ICM's format) or why it is missing, and the
  decoded predicted image when asked for (`images/`, for inspection).

Feature extraction is batched with one seed per demo (`derive_seed(task, episode, seed)`),
so a demo's features do not depend on the batch it ran in or on the order of the demos
(up to float round-off: BLAS kernels block matrix products by batch size, so rows computed
in batches of different sizes agree to ~1e-6, not bit for bit). Builds run in chunks of
demos, each written atomically; a rerun skips finished chunks, and because chunk and batch
boundaries depend only on the demo order, the final files are byte-identical to those of
an uninterrupted run with the same batch size.

`DemoBank` also reads and writes the published pickle layout (a dict with
`all_demo_paths`, `all_input_image_feats`, `all_output_image_feats`, `all_prompt_feats`),
loading it through an allowlist unpickler (numpy arrays and builtins only).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch

from agnostos import __version__
from agnostos.atomic import TMP_SUFFIX, atomic_write_bytes, atomic_write_json
from agnostos.evaluation.observation_text import (
    DEFAULT_CAMERAS,
    DemoText,
    episode_demo_text,
    format_actions,
)
from agnostos.evaluation.rankers import RankingBank, xicm_path_task_episode
from agnostos.models.dynamics_diffusion import (
    DynamicsDiffusion,
    SamplingConfig,
    derive_seed,
    resolve_unet_dir,
)
from agnostos.shards.episode import Episode

__all__ = [
    "BANK_FORMAT",
    "BANK_JSON",
    "BANK_VERSION",
    "FEATURES_FILE",
    "IMAGES_DIR",
    "PARTIAL_DIR",
    "XICM_ROOT",
    "BankBuildConfig",
    "BankError",
    "BatchFeatures",
    "BuildResult",
    "DemoBank",
    "DemoRecord",
    "ExtractionSettings",
    "ModelIdentity",
    "build_bank",
    "extract_features",
    "format_bank_info",
    "load_model",
    "load_xicm_pickle",
    "model_identity",
]

BANK_FORMAT = "agnostos-demo-bank"
BANK_VERSION = 1
BANK_JSON = "bank.json"
FEATURES_FILE = "features.safetensors"
IMAGES_DIR = "images"
PARTIAL_DIR = ".bank-partial"
BUILD_STATE = "build.json"
# X-ICM's bank paths are `<root>/<task>/all_variations/episodes/episode<N>` with this root.
XICM_ROOT = "data/seen_tasks/train"
# Tensor names in features.safetensors; the first three are always present.
REQUIRED_TENSORS: tuple[str, ...] = ("output_latents", "prompt_bos")
OPTIONAL_TENSORS: tuple[str, ...] = ("input_latents", "prompt_pooled")
TENSOR_NAMES: tuple[str, ...] = ("input_latents", "output_latents", "prompt_bos", "prompt_pooled")
# X-ICM pickle keys, in the order the published file lists them.
XICM_KEYS: tuple[str, ...] = (
    "all_demo_paths",
    "all_input_image_feats",
    "all_output_image_feats",
    "all_prompt_feats",
)
DemoTextMode = Literal["required", "optional", "off"]
DEMO_TEXT_MODES: tuple[str, ...] = ("required", "optional", "off")


class BankError(ValueError):
    """A bank file, build folder or input is unusable; the message names the file or key."""


# --------------------------------------------------------------------------- records


def _demo_text_json(text: DemoText | None) -> dict[str, str] | None:
    """Actions are stored as X-ICM prints them (a JSON-compatible string), one line each."""
    if text is None:
        return None
    return {"observation": text.observation, "actions": format_actions(text.actions)}


def _demo_text_from_json(data: Mapping[str, Any] | None, where: str) -> DemoText | None:
    if data is None:
        return None
    try:
        actions = json.loads(data["actions"])
        return DemoText(
            observation=str(data["observation"]),
            actions=tuple(tuple(int(value) for value in action) for action in actions),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise BankError(f"{where}: invalid demo_text ({type(error).__name__}: {error})") from None


@dataclass(frozen=True)
class DemoRecord:
    """One bank entry's metadata.

    id: the shard sample key `<task>/<variation folder>/episode<N>` (unique in a bank).
    source: the episode folder relative to the dataset root (RLBench layout).
    shard: the shard URL the demo was read from (None for an imported pickle).
    seed: the diffusion seed of this demo (None when imported).
    demo_text: frame-0 observation + keyframe actions, or None with `demo_text_error`.
    image: the decoded predicted future frame, relative to the bank folder, if saved.
    xicm_path: the path an imported X-ICM pickle gave this demo (kept for re-export).
    """

    id: str
    task: str
    episode: int
    variation: int | None
    variation_folder: str
    instruction: str | None
    source: str
    shard: str | None = None
    seed: int | None = None
    demo_text: DemoText | None = None
    demo_text_error: str | None = None
    image: str | None = None
    xicm_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["demo_text"] = _demo_text_json(self.demo_text)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> DemoRecord:
        try:
            return cls(
                id=str(data["id"]),
                task=str(data["task"]),
                episode=int(data["episode"]),
                variation=None if data["variation"] is None else int(data["variation"]),
                variation_folder=str(data["variation_folder"]),
                instruction=data["instruction"],
                source=str(data["source"]),
                shard=data.get("shard"),
                seed=data.get("seed"),
                demo_text=_demo_text_from_json(data.get("demo_text"), where),
                demo_text_error=data.get("demo_text_error"),
                image=data.get("image"),
                xicm_path=data.get("xicm_path"),
            )
        except KeyError as error:
            raise BankError(f"{where}: demo record lacks key {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            if isinstance(error, BankError):
                raise
            raise BankError(f"{where}: invalid demo record ({error})") from None


@dataclass(frozen=True)
class ModelIdentity:
    """Which dynamics model made the features: paths and a hash of the UNet folder."""

    base: str | None
    unet: str | None
    unet_sha256: str | None
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelIdentity:
        return cls(
            base=data.get("base"),
            unet=data.get("unet"),
            unet_sha256=data.get("unet_sha256"),
            description=data.get("description", ""),
        )


@dataclass(frozen=True)
class ExtractionSettings:
    """How each demo's features were computed (what a query must match for parity)."""

    sampling: SamplingConfig
    seed: int
    camera: str
    frame: int
    resolution: int
    dtype: str
    instruction: str = "descriptions[0]"
    seed_rule: str = "derive_seed(task, episode, seed)"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["sampling"] = asdict(self.sampling)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExtractionSettings:
        return cls(
            sampling=SamplingConfig(**data["sampling"]),
            seed=int(data["seed"]),
            camera=str(data["camera"]),
            frame=int(data["frame"]),
            resolution=int(data["resolution"]),
            dtype=str(data["dtype"]),
            instruction=str(data.get("instruction", "descriptions[0]")),
            seed_rule=str(data.get("seed_rule", "derive_seed(task, episode, seed)")),
        )


# --------------------------------------------------------------------------- hashing


def _sha256_file(path: Path, digest: Any | None = None) -> Any:
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest


def _folder_sha256(folder: Path) -> str:
    """SHA-256 over every file's relative name, size and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        _sha256_file(path, digest)
    return digest.hexdigest()


def _json_sha256(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- X-ICM pickle

_PICKLE_BUILTINS = frozenset(
    {"list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str",
     "bytes", "bytearray", "slice"}
)  # fmt: skip
_PICKLE_NUMPY = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A features pickle named a global outside the allowlist."""


class _FeaturesUnpickler(pickle.Unpickler):
    """Resolves only numpy array/scalar reconstruction and plain builtins.

    Why: unpickling runs code named by the file; a downloaded bank must not be able to
    reach `os.system` or any other global.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if module in {"builtins", "__builtin__"} and name in _PICKLE_BUILTINS:
            return super().find_class("builtins", name)
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 writes bytes objects
            return super().find_class(module, name)
        if (module, name) in _PICKLE_NUMPY:
            if module.startswith("numpy.core."):  # numpy-1 names; numpy 2 keeps aliases
                module = "numpy._core." + module[len("numpy.core.") :]
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):  # numpy 1 has no numpy._core
                return super().find_class(module.replace("numpy._core.", "numpy.core."), name)
        raise _RefusedGlobal(
            f"{self._source}: refused to load global '{module}.{name}'; a features pickle may "
            "only hold numpy arrays and builtin containers"
        )


def load_xicm_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an `all_diffusion_features.pkl`-style dict through the allowlist unpickler."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}: no such features pickle") from None
    try:
        loaded = _FeaturesUnpickler(io.BytesIO(data), str(source)).load()
    except _RefusedGlobal as error:
        raise BankError(str(error)) from None
    except Exception as error:  # truncated or corrupt streams raise many types
        raise BankError(f"{source}: unreadable pickle ({type(error).__name__}: {error})") from None
    if not isinstance(loaded, dict):
        raise BankError(f"{source}: expected a dict, found {type(loaded).__name__}")
    return loaded


def _pickle_matrix(features: Mapping[str, Any], key: str, rows: int, where: str) -> torch.Tensor:
    try:
        array = np.asarray(features[key])
    except Exception as error:
        raise BankError(f"{where}: key {key!r} is not an array ({error})") from None
    if array.dtype == object or array.ndim < 1 or array.shape[0] != rows:
        raise BankError(
            f"{where}: key {key!r} has shape {array.shape} (dtype {array.dtype}); expected "
            f"{rows} numeric rows, one per path in 'all_demo_paths'"
        )
    return torch.from_numpy(np.ascontiguousarray(array.reshape(rows, -1)))


# --------------------------------------------------------------------------- the bank


def _rows(name: str, tensor: torch.Tensor, size: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.as_tensor(np.asarray(tensor))
    if tensor.ndim < 1 or tensor.shape[0] != size:
        raise BankError(f"{name} has shape {tuple(tensor.shape)}; expected {size} rows")
    return tensor.detach().to("cpu").contiguous()


@dataclass(eq=False)
class DemoBank:
    """Demo records plus their stacked features (row i belongs to `records[i]`).

    `origin` is "built" (by `build_bank`) or "xicm_pkl" (imported). `root` is the folder
    the bank was loaded from (image paths are relative to it); it is not saved.
    """

    records: tuple[DemoRecord, ...]
    output_latents: torch.Tensor
    prompt_bos: torch.Tensor
    input_latents: torch.Tensor | None = None
    prompt_pooled: torch.Tensor | None = None
    model: ModelIdentity | None = None
    extraction: ExtractionSettings | None = None
    demo_text_options: Mapping[str, Any] | None = None
    origin: str = "built"
    build_fingerprint: str | None = None
    created_by: str = f"agnostos {__version__}"
    root: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.records = tuple(self.records)
        size = len(self.records)
        counts = Counter(record.id for record in self.records)
        repeated = sorted(key for key, count in counts.items() if count > 1)
        if repeated:
            raise BankError(f"bank demo ids must be unique; repeated: {repeated[:5]}")
        self.output_latents = _rows("output_latents", self.output_latents, size)
        self.prompt_bos = _rows("prompt_bos", self.prompt_bos, size)
        for name in OPTIONAL_TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _rows(name, value, size))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(record.id for record in self.records)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(record.task for record in self.records)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (absent optional ones left out)."""
        named = {name: getattr(self, name) for name in TENSOR_NAMES}
        return {name: value for name, value in named.items() if value is not None}

    def record(self, demo_id: str) -> DemoRecord:
        for record in self.records:
            if record.id == demo_id:
                return record
        raise KeyError(f"no demo {demo_id!r} in the bank ({len(self)} demos)")

    def demo_text(self, demo_id: str) -> DemoText:
        """The precomputed demo text of one demo; the error says why it is missing."""
        record = self.record(demo_id)
        if record.demo_text is None:
            reason = record.demo_text_error or "not computed"
            raise BankError(f"demo {demo_id!r} has no demo text: {reason}")
        return record.demo_text

    # ---------------------------------------------------------------- ranking

    def to_ranking_bank(self) -> RankingBank:
        """Flattened features for the rankers: ids are the demo ids, BOS as X-ICM's
        `all_prompt_feats`, the pooled text embedding as `text_embeddings`."""
        pooled = self.prompt_pooled
        return RankingBank(
            ids=self.ids,
            tasks=self.tasks,
            output_latents=self.output_latents.reshape(len(self), -1).numpy(),
            prompt_bos=self.prompt_bos.reshape(len(self), -1).numpy(),
            text_embeddings=None if pooled is None else pooled.reshape(len(self), -1).numpy(),
        )

    # ---------------------------------------------------------------- save / load

    def to_json(self, features_sha256: str) -> dict[str, Any]:
        return {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "created_by": self.created_by,
            "origin": self.origin,
            "build_fingerprint": self.build_fingerprint,
            "model": None if self.model is None else self.model.to_json(),
            "extraction": None if self.extraction is None else self.extraction.to_json(),
            "demo_text_options": None
            if self.demo_text_options is None
            else dict(self.demo_text_options),
            "features": {
                "file": FEATURES_FILE,
                "sha256": features_sha256,
                "tensors": {
                    name: {
                        "dtype": str(value.dtype).removeprefix("torch."),
                        "shape": list(value.shape),
                    }
                    for name, value in self.tensors().items()
                },
            },
            "demos": [record.to_json() for record in self.records],
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `features.safetensors` then `bank.json` (each atomically) into `directory`.

        bank.json goes last and carries the features' SHA-256, so a reader never pairs
        it with features from another save. Saved images are copied along when the bank
        was loaded from another folder.
        """
        from safetensors.torch import save as save_tensors

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._copy_images(out)
        blob = save_tensors(self.tensors(), metadata={"format": BANK_FORMAT})
        atomic_write_bytes(out / FEATURES_FILE, blob)
        atomic_write_json(out / BANK_JSON, self.to_json(hashlib.sha256(blob).hexdigest()))
        self.root = out
        return out

    def _copy_images(self, out: Path) -> None:
        if self.root is None or self.root.resolve() == out.resolve():
            return
        for record in self.records:
            if record.image is not None:
                target = out / record.image
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.root / record.image, target)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DemoBank:
        """Read a bank folder, checking format, version, the features hash and shapes."""
        folder = Path(directory)
        meta_path = folder / BANK_JSON
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{meta_path}: no demo bank here (missing {BANK_JSON})"
            ) from None
        except json.JSONDecodeError as error:
            raise BankError(f"{meta_path}: invalid JSON ({error})") from None
        _check_format(meta, meta_path)
        try:
            tensors = _load_features(folder, meta["features"], meta_path)
            records = tuple(
                DemoRecord.from_json(item, f"{meta_path}: demos[{number}]")
                for number, item in enumerate(meta["demos"])
            )
            bank = cls(
                records=records,
                output_latents=tensors["output_latents"],
                prompt_bos=tensors["prompt_bos"],
                input_latents=tensors.get("input_latents"),
                prompt_pooled=tensors.get("prompt_pooled"),
                model=None if meta["model"] is None else ModelIdentity.from_json(meta["model"]),
                extraction=None
                if meta["extraction"] is None
                else ExtractionSettings.from_json(meta["extraction"]),
                demo_text_options=meta.get("demo_text_options"),
                origin=str(meta["origin"]),
                build_fingerprint=meta.get("build_fingerprint"),
                created_by=str(meta.get("created_by", "")),
                root=folder,
            )
        except KeyError as error:
            raise BankError(f"{meta_path}: missing key {error.args[0]!r}") from None
        except BankError as error:
            message = str(error)
            raise BankError(
                message if str(meta_path) in message else f"{meta_path}: {message}"
            ) from None
        return bank

    # ---------------------------------------------------------------- X-ICM pickle

    def xicm_paths(self, root: str | None = None) -> list[str]:
        """X-ICM bank paths: an imported demo keeps its original path unless `root` is
        given; a built one becomes `<root or XICM_ROOT>/<source>`."""
        paths = []
        for record in self.records:
            if root is None and record.xicm_path is not None:
                paths.append(record.xicm_path)
            else:
                paths.append(f"{(root or XICM_ROOT).rstrip('/')}/{record.source}")
        return paths

    def to_xicm_features(self, root: str | None = None) -> dict[str, Any]:
        """The published pickle's dict: paths plus flattened numpy feature matrices."""
        if self.input_latents is None:
            raise BankError(
                "this bank has no input_latents; X-ICM's pickle needs all_input_image_feats"
            )
        size = len(self)
        return {
            "all_demo_paths": self.xicm_paths(root),
            "all_input_image_feats": self.input_latents.reshape(size, -1).numpy(),
            "all_output_image_feats": self.output_latents.reshape(size, -1).numpy(),
            "all_prompt_feats": self.prompt_bos.reshape(size, -1).numpy(),
        }

    def export_xicm_pkl(self, path: str | os.PathLike[str], root: str | None = None) -> Path:
        """Write `all_diffusion_features.pkl` (protocol 4, numpy-1 global names, so X-ICM's
        numpy-1 environment and numpy 2 both read it), atomically."""
        from agnostos.shards.pickles import dump_pickle

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, dump_pickle(self.to_xicm_features(root)))
        return target

    @classmethod
    def from_xicm_features(cls, features: Mapping[str, Any], where: str = "<dict>") -> DemoBank:
        """A bank from the published dict; demo text, instructions and variations are
        unknown (the pickle holds only paths and features)."""
        missing = [
            key for key in XICM_KEYS if key != "all_input_image_feats" and key not in features
        ]
        if missing:
            raise BankError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
        paths = [str(path) for path in features["all_demo_paths"]]
        records = []
        for number, path in enumerate(paths):
            try:
                task, episode = xicm_path_task_episode(path)
            except ValueError as error:
                raise BankError(f"{where}: all_demo_paths[{number}]: {error}") from None
            parts = PurePosixPath(path.rstrip("/")).parts
            folder = parts[-3]
            records.append(
                DemoRecord(
                    id=f"{task}/{folder}/episode{episode}",
                    task=task,
                    episode=episode,
                    variation=None,
                    variation_folder=folder,
                    instruction=None,
                    source="/".join(parts[-4:]),
                    demo_text_error="imported from an X-ICM features pickle, which holds no "
                    "episode data",
                    xicm_path=path,
                )
            )
        size = len(records)
        has_input = "all_input_image_feats" in features
        return cls(
            records=tuple(records),
            output_latents=_pickle_matrix(features, "all_output_image_feats", size, where),
            prompt_bos=_pickle_matrix(features, "all_prompt_feats", size, where),
            input_latents=_pickle_matrix(features, "all_input_image_feats", size, where)
            if has_input
            else None,
            origin="xicm_pkl",
        )

    @classmethod
    def import_xicm_pkl(cls, path: str | os.PathLike[str]) -> DemoBank:
        """Read the published `all_diffusion_features.pkl` (allowlist unpickler)."""
        return cls.from_xicm_features(load_xicm_pickle(path), str(path))


def _check_format(meta: Any, meta_path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != BANK_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BankError(f"{meta_path}: not an agnostos demo bank (format {found!r})")
    if meta.get("version") != BANK_VERSION:
        raise BankError(
            f"{meta_path}: bank format version {meta.get('version')!r}; this agnostos "
            f"({__version__}) reads version {BANK_VERSION}. Rebuild the bank or use a "
            "matching agnostos"
        )


def _load_features(
    folder: Path, spec: Mapping[str, Any], meta_path: Path
) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_tensors

    path = folder / spec.get("file", FEATURES_FILE)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise BankError(f"{path}: missing (listed in {meta_path})") from None
    if hashlib.sha256(blob).hexdigest() != spec["sha256"]:
        raise BankError(
            f"{path}: SHA-256 differs from the one recorded in {meta_path}; the two files "
            "come from different saves"
        )
    try:
        tensors = load_tensors(blob)
    except Exception as error:
        raise BankError(f"{path}: unreadable safetensors ({error})") from None
    expected = spec["tensors"]
    for name in REQUIRED_TENSORS:
        if name not in expected:
            raise BankError(f"{meta_path}: features.tensors lacks required key {name!r}")
    for name, info in expected.items():
        if name not in tensors:
            raise BankError(f"{path}: missing tensor {name!r} (listed in {meta_path})")
        shape, dtype = list(tensors[name].shape), str(tensors[name].dtype).removeprefix("torch.")
        if shape != list(info["shape"]) or dtype != info["dtype"]:
            raise BankError(
                f"{path}: tensor {name!r} is {dtype} {shape}; {meta_path} records "
                f"{info['dtype']} {info['shape']}"
            )
    return {name: tensors[name] for name in expected}


# --------------------------------------------------------------------------- model


def model_identity(
    model: str | os.PathLike[str], base: str | os.PathLike[str] | None
) -> ModelIdentity:
    """Absolute paths of the base and UNet folders and the SHA-256 of the UNet folder."""
    model_dir = Path(model).resolve()
    unet_dir = resolve_unet_dir(model_dir)
    base_dir = Path(base).resolve() if base is not None else model_dir
    kind = "pipeline directory" if base is None else "UNet checkpoint on a base"
    return ModelIdentity(
        base=str(base_dir),
        unet=str(unet_dir),
        unet_sha256=_folder_sha256(unet_dir),
        description=kind,
    )


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(
    model: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[DynamicsDiffusion, ModelIdentity]:
    """(DynamicsDiffusion, ModelIdentity) from an exported pipeline directory, or an
    exported `checkpoint-<step>` folder plus the Stable Diffusion base it was trained on."""
    model_dir = Path(model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    if base is not None and not Path(base).is_dir():
        raise FileNotFoundError(f"{base}: base model directory does not exist")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available to torch {torch.__version__}")
    is_pipeline = (model_dir / "model_index.json").is_file()
    if not is_pipeline and base is None:
        resolve_unet_dir(model_dir)  # a clear error when there is no UNet either
        raise BankError(
            f"{model_dir}: a UNet checkpoint without model_index.json; pass the Stable "
            "Diffusion base directory as well (--base)"
        )
    identity = model_identity(model_dir, base)
    if base is None:
        network = DynamicsDiffusion.from_pretrained(model_dir)
    else:
        network = DynamicsDiffusion.from_pretrained(base, unet=model_dir)
    network = network.to(device=torch.device(device), dtype=_DTYPES[dtype])
    network.eval()
    return network, identity


# --------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class BatchFeatures:
    """One batch's features on the CPU in float32 (images uint8 HxWx3 when decoded)."""

    input_latents: torch.Tensor
    output_latents: torch.Tensor
    prompt_bos: torch.Tensor
    prompt_pooled: torch.Tensor
    images: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {name: getattr(self, name) for name in TENSOR_NAMES}
        if self.images is not None:
            named["images"] = self.images
        return named


def extract_features(
    model: DynamicsDiffusion,
    images: torch.Tensor,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling: SamplingConfig,
    decode: bool = False,
) -> BatchFeatures:
    """Features of a batch of query images (Bx3xHxW uint8) through `model.predict`.

    Each item uses its own seed, so its features do not depend on the batch (to float
    round-off). Outputs are float32 on the CPU; decoded predictions become uint8 HxWx3.
    """
    from agnostos.images import to_unit_range

    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (B,3,H,W), got {images.dtype}")
    pixels = to_unit_range(images).to(device=model.device, dtype=model.unet.dtype)
    prediction = model.predict(pixels, list(prompts), list(seeds), sampling, decode=decode)

    def cpu(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()

    decoded = None
    if decode and prediction.images is not None:
        unit = (cpu(prediction.images) + 1.0) * 127.5
        decoded = unit.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return BatchFeatures(
        input_latents=cpu(prediction.input_latents),
        output_latents=cpu(prediction.output_latents),
        prompt_bos=cpu(prediction.prompt_bos),
        prompt_pooled=cpu(prediction.prompt_pooled),
        images=decoded,
    )


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BankBuildConfig:
    """What to build. Shards: a converted folder (with manifest.json) or shard URLs (brace
    pattern, `::`-separated list, `pipe:` commands), optionally with their `manifest`.

    demo_text: "required" fails on a demo whose text cannot be made (no mask-name maps, no
    object-name map for the task, a missing camera), "optional" stores None and the
    reason, "off" skips it. `object_names` (task -> {simulator name: prompt name})
    replaces the suite's maps. `batch_size` is not part of the build's identity: resuming
    with another one is allowed (rows then agree to float round-off, not bit for bit).
    """

    shards: str
    manifest: str | None = None
    tasks: tuple[str, ...] | None = None
    batch_size: int = 16
    chunk_size: int = 256
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    camera: str = "front"
    frame: int = 0
    resolution: int = 128
    demo_text: DemoTextMode = "optional"
    suite: str = "agnostos"
    object_names: Mapping[str, Mapping[str, str]] | None = None
    text_cameras: tuple[str, ...] = DEFAULT_CAMERAS
    save_images: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(
                f"batch_size ({self.batch_size}) and chunk_size ({self.chunk_size}) must be >= 1"
            )
        if self.demo_text not in DEMO_TEXT_MODES:
            raise ValueError(
                f"demo_text must be one of {', '.join(DEMO_TEXT_MODES)}, got {self.demo_text!r}"
            )
        if self.resolution < 1 or self.frame < 0:
            raise ValueError(f"resolution {self.resolution} / frame {self.frame} out of range")
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "text_cameras", tuple(self.text_cameras))

    def name_maps(self) -> Mapping[str, Mapping[str, str]]:
        if self.object_names is not None:
            return self.object_names
        from agnostos.tasks import get_suite

        return get_suite(self.suite).object_names

    def identity_json(self) -> dict[str, Any]:
        """Everything that changes the stored bytes (batch_size aside, see the class)."""
        return {
            "tasks": None if self.tasks is None else list(self.tasks),
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "sampling": asdict(self.sampling),
            "camera": self.camera,
            "frame": self.frame,
            "resolution": self.resolution,
            "demo_text": self.demo_text,
            "suite": self.suite if self.object_names is None else None,
            "object_names": None
            if self.object_names is None
            else {task: dict(names) for task, names in self.object_names.items()},
            "text_cameras": list(self.text_cameras),
            "save_images": self.save_images,
        }


@dataclass(frozen=True)
class BuildResult:
    """What a `build_bank` call did. `bank` is None until the build is complete."""

    out: Path
    complete: bool
    demos_done: int
    chunks_done: int
    resumed_from: int
    bank: DemoBank | None
    already_complete: bool = False


@dataclass(frozen=True)
class _ShardPlan:
    """The shard URLs to read and, with a manifest, every demo's key in order."""

    urls: tuple[str, ...]
    keys: tuple[str, ...] | None
    units: tuple[str, ...] | None  # per key: the URL holding it


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def _plan_shards(config: BankBuildConfig) -> _ShardPlan:
    from webdataset.shardlists import expand_urls

    from agnostos.datamodules.catalogue import shard_catalogue
    from agnostos.shards.manifest import MANIFEST_NAME

    folder = Path(config.shards)
    if config.manifest is not None or (folder / MANIFEST_NAME).is_file():
        entries = shard_catalogue(config.shards, config.manifest, config.tasks)
        if not entries:
            raise BankError(f"{config.shards}: no episodes to put in the bank")
        units = tuple(entry.unit for entry in entries)
        return _ShardPlan(tuple(dict.fromkeys(units)), tuple(e.key for e in entries), units)
    if folder.is_dir():
        raise BankError(
            f"{folder}: not a converted shard folder (no {MANIFEST_NAME}); convert it with "
            "`agnostos shards convert` or pass shard URLs"
        )
    urls = tuple(expand_urls(config.shards))
    missing = [url for url in urls if _is_local(url) and not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(f"shard file(s) not found: {', '.join(missing[:5])}")
    return _ShardPlan(urls, None, None)


def _key_task(key: str) -> str:
    return key.split("/", 1)[0]


def _iter_demos(
    plan: _ShardPlan, tasks: Sequence[str] | None, start: int
) -> Iterator[tuple[int, str, Episode]]:
    """(index, shard URL, Episode) of every demo from index `start` on, in bank order.

    With a manifest only the shards holding pending demos are opened; without one the
    stream is counted from the first shard (skipped samples are not decoded).
    """
    from agnostos.shards.reading import iter_samples
    from agnostos.shards.samples import sample_to_episode

    if plan.keys is not None:
        if start >= len(plan.keys):
            return
        position = {key: index for index, key in enumerate(plan.keys)}
        urls = list(dict.fromkeys(plan.units[start:]))
        expected = start
        for sample in iter_samples(urls):
            key, url = sample["__key__"], sample.get("__url__", "?")
            index = position.get(key)
            if index is None or index < start:
                continue
            if index != expected:
                raise BankError(
                    f"{url}: sample {key!r} comes where the manifest lists "
                    f"{plan.keys[expected]!r}; the manifest does not describe these shards"
                )
            expected += 1
            yield index, url, sample_to_episode(sample)
        if expected != len(plan.keys):
            raise BankError(
                f"the manifest lists {len(plan.keys)} demos but the shards gave {expected}; "
                f"first missing: {plan.keys[expected]!r}"
            )
        return
    wanted = None if tasks is None else set(tasks)
    index = 0
    for sample in iter_samples(list(plan.urls)):
        key = sample["__key__"]
        if wanted is not None and _key_task(key) not in wanted:
            continue
        if index >= start:
            yield index, sample.get("__url__", "?"), sample_to_episode(sample)
        index += 1


@dataclass
class _Item:
    record: DemoRecord
    pixels: torch.Tensor  # 3 x R x R uint8


def _error_text(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def _query_pixels(episode: Episode, url: str, config: BankBuildConfig) -> torch.Tensor:
    from agnostos.images import prepare_rgb

    try:
        png = episode.png(config.camera, "rgb", config.frame)
    except (KeyError, IndexError) as error:
        raise BankError(
            f"{url}: sample {episode.key!r}: no query image {config.camera}_rgb/"
            f"{config.frame}.png ({_error_text(error)})"
        ) from None
    return prepare_rgb(png, config.resolution)


def _demo_text(
    episode: Episode, url: str, config: BankBuildConfig, maps: Mapping[str, Mapping[str, str]]
) -> tuple[DemoText | None, str | None]:
    if config.demo_text == "off":
        return None, "demo text disabled for this build (--demo-text off)"
    try:
        names = maps.get(episode.task)
        if names is None:
            where = "the given object_names" if config.object_names else f"suite {config.suite!r}"
            raise KeyError(f"no object-name map for task {episode.task!r} in {where}")
        return (
            episode_demo_text(episode, object_names=names, cameras=config.text_cameras),
            None,
        )
    except (KeyError, ValueError, IndexError) as error:
        reason = _error_text(error)
        if config.demo_text == "required":
            raise BankError(f"{url}: sample {episode.key!r}: demo text: {reason}") from None
        return None, reason


def _image_name(index: int, episode: Episode) -> str:
    return (
        f"{IMAGES_DIR}/{index:05d}_{episode.task}_{episode.variation_folder}_"
        f"episode{episode.episode}.png"
    )


def _prepare(
    index: int,
    url: str,
    episode: Episode,
    config: BankBuildConfig,
    maps: Mapping[str, Mapping[str, str]],
) -> _Item:
    if not episode.descriptions:
        raise BankError(f"{url}: sample {episode.key!r} has no instruction (descriptions)")
    pixels = _query_pixels(episode, url, config)
    text, reason = _demo_text(episode, url, config, maps)
    record = DemoRecord(
        id=episode.key,
        task=episode.task,
        episode=episode.episode,
        variation=episode.variation,
        variation_folder=episode.variation_folder,
        instruction=episode.instruction,
        source=episode.source,
        shard=url,
        seed=derive_seed(episode.task, episode.episode, config.seed),
        demo_text=text,
        demo_text_error=reason,
        image=_image_name(index, episode) if config.save_images else None,
    )
    return _Item(record, pixels)


# ---- chunk files


def _chunk_path(partial: Path, number: int) -> Path:
    return partial / f"chunk-{number:05d}.safetensors"


def _write_chunk(
    partial: Path,
    number: int,
    fingerprint: str,
    records: Sequence[DemoRecord],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    from safetensors.torch import save as save_tensors

    metadata = {
        "fingerprint": fingerprint,
        "chunk": str(number),
        "records": json.dumps([r.to_json() for r in records], sort_keys=True),
    }
    atomic_write_bytes(_chunk_path(partial, number), save_tensors(dict(tensors), metadata))


def _read_chunk(path: Path, fingerprint: str) -> tuple[list[DemoRecord], dict[str, torch.Tensor]]:
    from safetensors.torch import load as load_tensors
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_tensors(path.read_bytes())
    except Exception as error:
        raise BankError(f"{path}: unreadable chunk ({error})") from None
    if metadata.get("fingerprint") != fingerprint:
        raise BankError(f"{path}: chunk from another build (fingerprint differs)")
    items = json.loads(metadata["records"])
    records = [DemoRecord.from_json(item, f"{path}: records[{n}]") for n, item in enumerate(items)]
    return records, tensors


def _done_chunks(partial: Path) -> list[Path]:
    """The finished chunks of a build: a gap-free prefix, all full but maybe the last."""
    for leftover in partial.glob("*" + TMP_SUFFIX):
        leftover.unlink()  # a write killed before its rename
    done: list[Path] = []
    while _chunk_path(partial, len(done)).is_file():
        done.append(_chunk_path(partial, len(done)))
    return done


def _build_state(out: Path, fingerprint: str, identity_json: Mapping[str, Any]) -> Path:
    """Create or check `<out>/.bank-partial/build.json`; returns the partial folder."""
    partial = out / PARTIAL_DIR
    state_path = partial / BUILD_STATE
    if state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            raise BankError(
                f"{state_path}: {out} holds an unfinished bank build with other options, "
                f"model or shards; delete {partial} or choose another output folder"
            )
        return partial
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path, {"fingerprint": fingerprint, "build": identity_json})
    return partial


def _build_fingerprint(
    config: BankBuildConfig, identity: ModelIdentity, plan: _ShardPlan, dtype: str
) -> tuple[str, dict[str, Any]]:
    build = {
        "format": BANK_FORMAT,
        "version": BANK_VERSION,
        "config": config.identity_json(),
        "model": identity.to_json(),
        "dtype": dtype,
        "shards": list(plan.urls),
        "keys_sha256": None if plan.keys is None else _json_sha256(list(plan.keys)),
    }
    return _json_sha256(build), build


def _check_complete(out: Path, fingerprint: str) -> DemoBank | None:
    """The finished bank in `out` if it is this build's; an error if it is another's."""
    if not (out / BANK_JSON).is_file():
        return None
    bank = DemoBank.load(out)
    if bank.build_fingerprint != fingerprint:
        raise BankError(
            f"{out / BANK_JSON}: {out} already holds a bank built with other options, model "
            "or shards; choose another output folder"
        )
    return bank


class _ChunkWriter:
    """Collects one chunk's records and batch outputs, then writes them atomically."""

    def __init__(self, partial: Path, fingerprint: str, number: int) -> None:
        self.partial, self.fingerprint, self.number = partial, fingerprint, number
        self.records: list[DemoRecord] = []
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, items: Sequence[_Item], features: BatchFeatures) -> None:
        self.records.extend(item.record for item in items)
        for name, tensor in features.tensors().items():
            self.parts.setdefault(name, []).append(tensor)

    def write(self) -> int:
        tensors = {name: torch.cat(parts) for name, parts in self.parts.items()}
        _write_chunk(self.partial, self.number, self.fingerprint, self.records, tensors)
        return len(self.records)


def _run_batch(
    model: DynamicsDiffusion, items: Sequence[_Item], config: BankBuildConfig
) -> BatchFeatures:
    return extract_features(
        model,
        torch.stack([item.pixels for item in items]),
        [item.record.instruction or "" for item in items],
        [int(item.record.seed) for item in items],
        config.sampling,
        decode=config.save_images,
    )


def _dtype_name(model: DynamicsDiffusion) -> str:
    return str(model.unet.dtype).removeprefix("torch.")


def _check_resolution(model: DynamicsDiffusion, config: BankBuildConfig) -> None:
    factor = int(model.vae_scale_factor)
    if config.resolution % factor:
        raise BankError(
            f"resolution {config.resolution} is not a multiple of the VAE's downsample "
            f"factor {factor}"
        )


def _finalize(
    out: Path,
    partial: Path,
    chunks: Sequence[Path],
    fingerprint: str,
    config: BankBuildConfig,
    identity: ModelIdentity,
    dtype: str,
) -> DemoBank:
    from agnostos.shards.codecs import encode_png

    records: list[DemoRecord] = []
    parts: dict[str, list[torch.Tensor]] = {}
    for path in chunks:
        chunk_records, tensors = _read_chunk(path, fingerprint)
        records.extend(chunk_records)
        for name, tensor in tensors.items():
            parts.setdefault(name, []).append(tensor)
    tensors = {name: torch.cat(values) for name, values in parts.items()}
    if config.save_images:
        (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        for record, pixels in zip(records, tensors["images"], strict=True):
            atomic_write_bytes(out / str(record.image), encode_png(pixels.numpy()))
    bank = DemoBank(
        records=tuple(records),
        output_latents=tensors["output_latents"],
        prompt_bos=tensors["prompt_bos"],
        input_latents=tensors["input_latents"],
        prompt_pooled=tensors["prompt_pooled"],
        model=identity,
        extraction=ExtractionSettings(
            sampling=config.sampling,
            seed=config.seed,
            camera=config.camera,
            frame=config.frame,
            resolution=config.resolution,
            dtype=dtype,
        ),
        demo_text_options={
            "mode": config.demo_text,
            "suite": config.suite if config.object_names is None else None,
            "cameras": list(config.text_cameras),
        },
        origin="built",
        build_fingerprint=fingerprint,
    )
    bank.save(out)
    shutil.rmtree(partial)
    return bank


def build_bank(
    config: BankBuildConfig,
    model: DynamicsDiffusion,
    identity: ModelIdentity,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    max_chunks: int | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Extract every demo's features and text into `out`, resuming an unfinished build.

    Demos go through the model `config.batch_size` at a time; every `config.chunk_size`
    demos form a chunk written atomically to `out/.bank-partial/`. A rerun with the same
    options, model and shards skips the finished chunks. When the last chunk is written
    the chunks are stacked into `features.safetensors` + `bank.json` (+ `images/`) and the
    partial folder is removed. `max_chunks` stops after that many chunks written in this
    call (the build stays resumable); `on_chunk(chunk_number, demos_done)` runs after each.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    _check_resolution(model, config)
    plan = _plan_shards(config)
    dtype = _dtype_name(model)
    fingerprint, build_json = _build_fingerprint(config, identity, plan, dtype)
    finished = _check_complete(out, fingerprint)
    if finished is not None:
        shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
        count = len(finished)
        chunks = -(-count // config.chunk_size)
        return BuildResult(out, True, count, chunks, count, finished, already_complete=True)

    partial = _build_state(out, fingerprint, build_json)
    chunks = _done_chunks(partial)
    seen_ids: set[str] = set()
    tasks_found: set[str] = set()
    done = 0
    for number, path in enumerate(chunks):
        records, _ = _read_chunk(path, fingerprint)
        if number < len(chunks) - 1 and len(records) != config.chunk_size:
            raise BankError(f"{path}: {len(records)} demos in a chunk of {config.chunk_size}")
        seen_ids.update(record.id for record in records)
        tasks_found.update(record.task for record in records)
        done += len(records)
    resumed_from = done
    maps = config.name_maps() if config.demo_text != "off" else {}
    total = None if plan.keys is None else len(plan.keys)
    bar = tqdm(total=total, initial=done, unit="demo", disable=not progress, dynamic_ncols=True)
    written_now = 0
    stopped = False
    writer = _ChunkWriter(partial, fingerprint, len(chunks))
    batch: list[_Item] = []

    def flush_batch() -> None:
        if batch:
            writer.add(batch, _run_batch(model, batch, config))
            bar.update(len(batch))
            batch.clear()

    def close_chunk() -> None:
        nonlocal done, writer, written_now
        done += writer.write()
        chunks.append(_chunk_path(partial, writer.number))
        written_now += 1
        bar.set_postfix_str(f"chunk {writer.number + 1}", refresh=False)
        if on_chunk is not None:
            on_chunk(writer.number, done)
        writer = _ChunkWriter(partial, fingerprint, len(chunks))

    try:
        for index, url, episode in _iter_demos(plan, config.tasks, done):
            item = _prepare(index, url, episode, config, maps)
            if item.record.id in seen_ids:
                raise BankError(f"{url}: demo {item.record.id!r} appears twice in the shards")
            seen_ids.add(item.record.id)
            tasks_found.add(item.record.task)
            batch.append(item)
            if len(batch) == config.batch_size or len(writer.records) + len(batch) == (
                config.chunk_size
            ):
                flush_batch()
            if len(writer.records) == config.chunk_size:
                close_chunk()
                if max_chunks is not None and written_now >= max_chunks:
                    stopped = True
                    break
        if not stopped:
            flush_batch()
            if writer.records:
                close_chunk()
    finally:
        bar.close()
    if stopped:
        return BuildResult(out, False, done, len(chunks), resumed_from, None)
    if not chunks:
        raise BankError(f"{config.shards}: no demos to put in the bank (tasks {config.tasks})")
    absent = sorted(set(config.tasks or ()) - tasks_found)
    if absent:
        raise BankError(f"{config.shards}: no episodes for task(s) {absent}")
    bank = _finalize(out, partial, chunks, fingerprint, config, identity, dtype)
    return BuildResult(out, True, len(bank), len(chunks), resumed_from, bank)


# --------------------------------------------------------------------------- summary


def format_bank_info(bank: DemoBank) -> str:
    """A human summary: demos per task, model, sampling, tensors, demo-text coverage.

    It also reports whether the BOS rows are one constant vector, the check
    `xicm_method.md` recommends on the published bank (if so, X-ICM's "lang" term adds
    the same amount to every score).
    """
    lines = [f"demo bank: {len(bank)} demos, origin {bank.origin}, {bank.created_by}"]
    if bank.root is not None:
        lines[0] += f" ({bank.root})"
    tasks = Counter(bank.tasks)
    lines.append(f"tasks ({len(tasks)}): " + ", ".join(f"{t} {n}" for t, n in tasks.items()))
    if bank.model is not None:
        model = bank.model
        lines.append(f"model: {model.description}; base {model.base}; unet {model.unet}")
        lines.append(f"unet sha256: {model.unet_sha256}")
    if bank.extraction is not None:
        ex = bank.extraction
        sampling = ex.sampling
        lines.append(
            f"extraction: {ex.camera} camera frame {ex.frame} at {ex.resolution}px, "
            f"{sampling.num_inference_steps} steps, guidance {sampling.guidance_scale} / "
            f"image {sampling.image_guidance_scale}, seed {ex.seed} ({ex.seed_rule}), {ex.dtype}"
        )
    for name, tensor in bank.tensors().items():
        lines.append(f"  {name}: {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}")
    bos = bank.prompt_bos.reshape(len(bank), -1)
    constant = bool(len(bank)) and bool((bos == bos[:1]).all())
    lines.append(
        "prompt_bos: "
        + ("one constant vector (X-ICM's lang term is a constant)" if constant else "varies")
    )
    with_text = sum(record.demo_text is not None for record in bank.records)
    lines.append(f"demo text: {with_text}/{len(bank)} demos")
    reasons = Counter(record.demo_text_error for record in bank.records if record.demo_text is None)
    for reason, count in reasons.most_common(5):
        lines.append(f"  missing ({count}): {reason}")
    images = sum(record.image is not None for record in bank.records)
    if images:
        lines.append(f"images: {images} predicted frames under {IMAGES_DIR}/")
    return "\n".join(lines)
