"""The VLA agent: a fine-tuned vision-language-action model (`agnostos.models.vla`) through
the evaluator.

At every query (an environment whose action queue is empty) the agent turns the live
observation into what the policy was trained on, for all waiting environments at once:

- the RGB of the policy's cameras (`policy.inputs.cameras`) as B x V x 3 x H x W uint8,
  the layout `KeyframeBatch` holds, centre-cropped and resized to `image_size` with the
  keyframe datamodule's own resize (`agnostos.images.centre_crop_resize`); the policy
  then resizes that to its backbone's size as it resizes training batches. Set
  `image_size` to the training data's `image_size` and the pixels take the training path
  exactly (default: the policy's `inputs.image_size`, which is the data's in the shipped
  configs);
- the proprio state B x 8 (gripper xyz, quaternion xyzw, gripper open), as the keyframe
  datamodule builds it from `gripper_pose` and `gripper_open`;
- when the policy was trained with it, X-ICM's object-coordinate text of the observation
  (`agnostos.observation_text.observation_text`, the code that writes the training text),
  the keyframe datamodule's `object_names` and `object_text_cameras` settings named here
  the same way;
- the episode's instruction.

One `policy.predict` call answers every waiting environment (greedy decoding, left
padded). Each row's valid keyframes (a chunk of them for a policy trained with `chunk > 1`)
are queued in order and executed one per step before the policy is asked again; a reply
with no valid keyframe ends that environment's episode as an error (`AgentError`), the
others carry on. The record of each episode gets the model calls, the replies that did
not parse, the keyframes that could not be decoded and up to a few of the failed replies.

Two ways to build it:

- `VLAAgent(export=DIR, ...)`: an export folder (`VLAPolicy.save_export`: the peft
  adapter, or merged weights, with processor, codec and `vla.json`); `base` overrides the
  base model directory the export names, `merge` merges the adapter into the base first
  (faster inference). This is what `agnostos eval --agent vla --agent.export DIR` builds.
- `VLAAgent.from_policy(policy, step=N)`: the live policy of a training run, as
  `RolloutEvaluation` evaluates it. The agent never moves, frees or re-types that model;
  each call switches it to eval mode and restores every submodule's own mode afterwards.

Model calls run under `torch.inference_mode` on the agent's own thread (the runner calls
agents on a thread of their own, and grad mode is per thread, so the training loop's
inference mode does not reach it) and, on CUDA, with the model's device current.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agnostos.envs.protocol import Observation
from agnostos.evaluation.agents.base import AgentError, EpisodeContext, QueuedAgent

if TYPE_CHECKING:
    import torch

__all__ = [
    "VLAAgent",
    "eval_mode",
    "observation_images",
    "observation_proprio",
    "resolve_export",
]

VLA_JSON = "vla.json"
FAILED_REPLIES_KEPT = 3  # failed replies kept per episode record (each cut to REPLY_CHARS)
REPLY_CHARS = 200


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside, each back in its own mode afterwards.

    `module.train()` would switch on submodules that were deliberately in eval mode (a
    frozen part), so the modes are captured and restored one by one, as Lightning's loops
    do.
    """
    modes = [(child, child.training) for child in module.modules()]
    if any(training for _, training in modes):
        module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            if child.training != training:
                child.training = training


def observation_images(
    observations: Sequence[Observation], cameras: Sequence[str], size: int | None = None
) -> torch.Tensor:
    """B x V x 3 x S x S uint8: each camera's RGB, centre-cropped to a square and, when
    `size` is given, resized to it (bilinear, antialiased)."""
    import torch

    from agnostos.images import centre_crop_box, centre_crop_resize

    rows = []
    for observation in observations:
        views = []
        for camera in cameras:
            frame = observation.cameras.get(camera)
            if frame is None:
                raise AgentError(
                    f"vla: the observation has no {camera} camera (it has "
                    f"{', '.join(sorted(observation.cameras)) or 'none'}); render it "
                    "with suite.cameras"
                )
            rgb = np.asarray(frame.rgb)
            side = size if size is not None else centre_crop_box(*rgb.shape[:2])[2]
            pixels = centre_crop_resize(rgb, side)
            views.append(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        rows.append(np.stack(views))
    return torch.from_numpy(np.stack(rows))


def observation_proprio(observations: Sequence[Observation]) -> torch.Tensor:
    """B x 8 float32: gripper xyz, quaternion xyzw and open, as the keyframe datamodule."""
    import torch

    rows = [
        np.concatenate([np.asarray(o.gripper_pose, dtype=np.float64), [float(o.gripper_open)]])
        for o in observations
    ]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def resolve_export(export: str | Path) -> Path:
    """An export folder, or the latest `step-<N>/` export in a folder of them (what
    `agnostos fit` writes under `<run>/export/`)."""
    folder = Path(export)
    if (folder / VLA_JSON).is_file():
        return folder
    from agnostos.trainers.vla_export import latest_export

    latest = latest_export(folder) if folder.is_dir() else None
    if latest is not None and (latest / VLA_JSON).is_file():
        return latest
    raise FileNotFoundError(
        f"export: {folder} is not a VLA export (no {VLA_JSON}) nor a folder of step-<N> "
        "exports; give a folder written by VLAPolicy.save_export (agnostos fit: "
        "<run>/export/step-<N>)"
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _torch_dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: {name!r} is not a torch dtype (float32, bfloat16, float16)")
    return dtype


@dataclass
class _EpisodeStats:
    model_calls: int = 0
    parse_failures: int = 0
    keyframes: int = 0
    invalid_keyframes: int = 0
    failed_replies: list[str] = field(default_factory=list)


class VLAAgent(QueuedAgent):
    """A VLA policy, batched over the waiting environments (see the module docstring).

    Args:
        export: the export folder (`VLAPolicy.save_export`; `agnostos fit` writes them
            under `<run>/export/step-<N>/`), or a folder of such exports (the highest step
            is evaluated; the run fingerprint names the one chosen).
        base: the base model directory, overriding the one `vla.json` names (the export
            refuses a base whose config differs from the one it was trained on).
        device: where the model runs (`cpu`, `cuda`, `cuda:1`).
        dtype: weights dtype (`float32`, `bfloat16`); default: the export's.
        merge: merge the LoRA adapter into the base weights before evaluating.
        max_new_tokens: reply length limit (default: the action format's).
        image_size: the size camera images are resized to first, as the keyframe
            datamodule resized the training images (default: the policy's image size).
        object_names: the benchmark (`minibench`, `agnostos`) whose object-name maps name
            the objects of the object-coordinate text, for a policy trained with it (default:
            the one benchmark with a map for the task; `RolloutEvaluation` sets its suite's).
        object_text_cameras: cameras placing the objects of that text (default: X-ICM's
            five, the keyframe datamodule's default); the suite must render them.
    """

    name = "vla"

    def __init__(
        self,
        export: str,
        base: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        merge: bool = False,
        max_new_tokens: int | None = None,
        image_size: int | None = None,
        object_names: str | None = None,
        object_text_cameras: list[str] | None = None,
    ) -> None:
        super().__init__()
        from agnostos.models.vla import VLAPolicy

        folder = resolve_export(export)
        if base is not None and not Path(base).is_dir():
            raise FileNotFoundError(f"base: model directory {base} does not exist")
        policy = VLAPolicy.from_export(folder, base=base, dtype=_torch_dtype(dtype), merge=merge)
        policy.to(device)
        identity = {
            "export": str(folder.resolve()),
            "vla_json_sha256": _sha256(folder / VLA_JSON),
            "base": None if base is None else str(Path(base).resolve()),
            "dtype": dtype,
            "merge": merge,
        }
        self._setup(
            policy, identity, max_new_tokens, image_size, object_names, object_text_cameras,
            owned=True,
        )  # fmt: skip

    @classmethod
    def from_policy(
        cls,
        policy: Any,
        *,
        step: int | None = None,
        identity: dict[str, Any] | None = None,
        max_new_tokens: int | None = None,
        image_size: int | None = None,
        object_names: str | None = None,
        object_text_cameras: list[str] | None = None,
    ) -> VLAAgent:
        """An agent over a live `VLAPolicy` (a training run's), left where and as it is.

        `step` (the training step) and `identity` (any JSON that tells these weights
        apart) go into `settings()`, so two evaluations of different weights never share a
        run fingerprint.
        """
        agent = cls.__new__(cls)
        QueuedAgent.__init__(agent)
        live = {"policy": "live", "step": step, **(identity or {})}
        agent._setup(
            policy, live, max_new_tokens, image_size, object_names, object_text_cameras,
            owned=False,
        )  # fmt: skip
        return agent

    def _setup(
        self,
        policy: Any,
        identity: dict[str, Any],
        max_new_tokens: int | None,
        image_size: int | None,
        object_names: str | None,
        object_text_cameras: Sequence[str] | None,
        owned: bool,
    ) -> None:
        from agnostos.tasks import SUITES

        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if object_names is not None and object_names not in SUITES:
            raise ValueError(
                f"object_names: {object_names!r} is not a benchmark with object-name maps; "
                f"choose one of {', '.join(sorted(SUITES))}"
            )
        self.policy = policy
        self.inputs = policy.inputs
        self.identity = identity
        self.max_new_tokens = max_new_tokens
        # Defaults: what the training data did, as the export records it.
        trained_size = getattr(policy.inputs, "data_image_size", None)
        if image_size is None:
            image_size = trained_size if trained_size is not None else policy.inputs.image_size
        self.image_size = image_size
        if object_names is None:
            object_names = getattr(policy.inputs, "object_names", None)
        self.object_names = object_names
        if object_text_cameras is None:
            object_text_cameras = getattr(policy.inputs, "object_text_cameras", None)
        self.object_text_cameras = (
            None if object_text_cameras is None else tuple(object_text_cameras)
        )
        self._owned = owned
        self._stats: dict[int, _EpisodeStats] = {}

    # -- the protocol --------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        inputs = self.inputs
        return {
            **self.identity,
            "backbone": getattr(self.policy, "backbone", None),
            "action_format": getattr(self.policy, "action_format", None),
            "inputs": {
                "cameras": list(inputs.cameras),
                "image_size": inputs.image_size,
                "proprio": inputs.proprio,
                "object_text": inputs.object_text,
                "chunk": inputs.chunk,
            },
            "max_new_tokens": self.max_new_tokens,
            "image_size": self.image_size,
            "object_names": self.object_names if inputs.object_text else None,
            "object_text_cameras": (
                list(self.object_text_cameras)
                if inputs.object_text and self.object_text_cameras
                else None
            ),
        }

    def reset(self, env_id: int, context: EpisodeContext) -> None:
        super().reset(env_id, context)
        self._stats[env_id] = _EpisodeStats()

    def episode_stats(self, env_id: int) -> dict[str, Any]:
        stats = self._stats.get(env_id, _EpisodeStats())
        return {
            **super().episode_stats(env_id),
            "model_calls": stats.model_calls,
            "parse_failures": stats.parse_failures,
            "keyframes": stats.keyframes,
            "invalid_keyframes": stats.invalid_keyframes,
            "failed_replies": list(stats.failed_replies),
        }

    def close(self) -> None:
        """Drop the episode state; an exported model is released, a live one left alone."""
        self._queues.clear()
        self._contexts.clear()
        self._stats.clear()
        if self._owned:
            self.policy = None

    # -- planning ------------------------------------------------------------------------------

    def plan(self, batch: Sequence[tuple[int, Observation]]) -> list[Any]:
        if self.policy is None:
            raise AgentError("vla: the agent was closed")
        outcomes: list[Any] = [None] * len(batch)
        rows: list[int] = []
        images, texts = [], []
        for index, (env_id, observation) in enumerate(batch):
            try:
                images.append(
                    observation_images([observation], self.inputs.cameras, self.image_size)
                )
                texts.append(self._object_text(env_id, observation))
            except AgentError as error:  # this environment's episode only
                outcomes[index] = error
                continue
            except Exception as error:
                key = self.context(env_id).key
                outcomes[index] = AgentError(f"vla: {key}: {type(error).__name__}: {error}")
                continue
            rows.append(index)
        if rows:
            import torch

            observations = [batch[i][1] for i in rows]
            prediction = self._predict(
                torch.cat(images),
                [self.context(batch[i][0]).instruction for i in rows],
                observation_proprio(observations) if self.inputs.proprio else None,
                texts if self.inputs.object_text else None,
            )
            for row, index in enumerate(rows):
                outcomes[index] = self._queued(batch[index][0], prediction, row)
        return outcomes

    def _object_text(self, env_id: int, observation: Observation) -> str | None:
        if not self.inputs.object_text:
            return None
        from agnostos.observation_text import observation_text

        context = self.context(env_id)
        return observation_text(
            observation, context.task, context.instruction,
            object_names=self._name_map(context.task), cameras=self.object_text_cameras,
        )  # fmt: skip

    def _name_map(self, task: str) -> dict[str, str]:
        from agnostos.tasks import SUITES

        if self.object_names is not None:
            maps = SUITES[self.object_names].object_names
            if task not in maps:
                raise AgentError(f"vla: no {self.object_names} object-name map for task {task}")
            return dict(maps[task])
        having = [name for name, suite in SUITES.items() if task in suite.object_names]
        if len(having) != 1:
            raise AgentError(
                f"vla: task {task} has object-name maps in {having or 'no benchmark'}; "
                "set object_names to the benchmark the policy was trained on"
            )
        return dict(SUITES[having[0]].object_names[task])

    def _predict(
        self,
        images: torch.Tensor,
        instructions: list[str],
        proprio: torch.Tensor | None,
        object_texts: list[str] | None,
    ) -> Any:
        """One batched `predict` in inference mode, eval mode and on the model's device."""
        import torch

        device = getattr(self.policy, "device", None)
        on_cuda = device is not None and device.type == "cuda"
        device_context = torch.cuda.device(device) if on_cuda else contextlib.nullcontext()
        with device_context, torch.inference_mode(), eval_mode(self.policy):
            return self.policy.predict(
                images, instructions, proprio=proprio, object_texts=object_texts,
                max_new_tokens=self.max_new_tokens,
            )  # fmt: skip

    def _queued(self, env_id: int, prediction: Any, row: int) -> Any:
        """Row `row`'s valid keyframes, in order, or an AgentError when it has none."""
        stats = self._stats[env_id]
        stats.model_calls += 1
        text = str(prediction.texts[row])
        parsed = bool(prediction.parsed[row])
        valid = np.asarray(prediction.valid[row], dtype=bool)
        actions = np.asarray(prediction.actions[row], dtype=np.float64)
        if not parsed:
            stats.parse_failures += 1
            if len(stats.failed_replies) < FAILED_REPLIES_KEPT:
                stats.failed_replies.append(text[:REPLY_CHARS])
        stats.invalid_keyframes += int((~valid).sum())
        chosen = [action for action, ok in zip(actions, valid, strict=True) if ok]
        stats.keyframes += len(chosen)
        if not chosen:
            return AgentError(
                f"vla: {self.context(env_id).key}: the reply has no valid keyframe: "
                f"{text[:REPLY_CHARS]!r}"
            )
        return chosen
