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

One concept per module, lowest first:

* `records`: file names, format version, `BankError`, the per-demo and per-bank records,
  the hashes that tie files together;
* `xicm_pickle`: the published pickle layout, read through the shards layer's allowlist
  unpickler and written for X-ICM;
* `store`: `DemoBank`, saving and loading a bank folder, conversion to the rankers' bank;
* `model`: loading the dynamics model, its resolution, batched feature extraction;
* `chunks`: a build's partial state (fingerprinted, atomically written chunks);
* `build`: the builder: shards in, demos through the model in batches, chunks, bank out;
* `summary`: the human report of `agnostos bank info`.

The command line lives in `agnostos.evaluation.bank_cli`, outside this package: importing
any module of a package runs its `__init__`, and these re-exports load the model and
builder code, which the parser (`agnostos --help`) must not wait for.
"""

from agnostos.evaluation.bank.build import (
    DEMO_TEXT_MODES,
    BankBuildConfig,
    BuildResult,
    DemoTextMode,
    build_bank,
)
from agnostos.evaluation.bank.chunks import BUILD_STATE, PARTIAL_DIR
from agnostos.evaluation.bank.model import (
    BatchFeatures,
    extract_features,
    load_model,
    model_identity,
    model_resolution,
)
from agnostos.evaluation.bank.records import (
    BANK_FORMAT,
    BANK_JSON,
    BANK_VERSION,
    FEATURES_FILE,
    IMAGES_DIR,
    OPTIONAL_TENSORS,
    REQUIRED_TENSORS,
    TENSOR_NAMES,
    BankError,
    DemoRecord,
    ExtractionSettings,
    ModelIdentity,
)
from agnostos.evaluation.bank.store import DemoBank
from agnostos.evaluation.bank.summary import format_bank_info
from agnostos.evaluation.bank.xicm_pickle import XICM_KEYS, XICM_ROOT, load_xicm_pickle

__all__ = [
    "BANK_FORMAT",
    "BANK_JSON",
    "BANK_VERSION",
    "BUILD_STATE",
    "DEMO_TEXT_MODES",
    "FEATURES_FILE",
    "IMAGES_DIR",
    "OPTIONAL_TENSORS",
    "PARTIAL_DIR",
    "REQUIRED_TENSORS",
    "TENSOR_NAMES",
    "XICM_KEYS",
    "XICM_ROOT",
    "BankBuildConfig",
    "BankError",
    "BatchFeatures",
    "BuildResult",
    "DemoBank",
    "DemoRecord",
    "DemoTextMode",
    "ExtractionSettings",
    "ModelIdentity",
    "build_bank",
    "extract_features",
    "format_bank_info",
    "load_model",
    "load_xicm_pickle",
    "model_identity",
    "model_resolution",
]
