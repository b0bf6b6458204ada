"""Dynamics pairs for the X-ICM diffusion model: (input frame, target frame, instruction).

Defaults are the X-ICM setting (`dynamics_diffusion.md`): the front camera, input frame 0,
target the episode's last frame, the first variation description, 128x128, no flip (tasks
say "left" and "right"). Other choices: inputs from every frame or from frame 0 and each
keyframe; targets at the next keyframe or k frames ahead (a pair whose target would lie
past the end is dropped); instructions drawn among the variation's descriptions.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from agnostos.datamodules.base import EpisodeDataModule
from agnostos.datamodules.streams import StreamState
from agnostos.datamodules.tar_stream import FieldSelection
from agnostos.images import prepare_rgb, to_unit_range
from agnostos.shards.episode import CAMERAS
from agnostos.shards.samples import JSON_EXT, frame_ext
from agnostos.shards.views import EpisodeView, SampleDataError

InputFrame = Literal["first", "all", "keyframes"]
TargetFrame = Literal["last", "next_keyframe", "offset"]


def dynamics_pairs(
    num_frames: int,
    keyframes: Sequence[int],
    input_frame: InputFrame = "first",
    target_frame: TargetFrame = "last",
    target_offset: int = 1,
) -> list[tuple[int, int]]:
    """(input, target) frame pairs of one episode; every target lies after its input."""
    if input_frame == "first":
        inputs: Iterable[int] = (0,)
    elif input_frame == "all":
        inputs = range(num_frames)
    elif input_frame == "keyframes":
        inputs = sorted({0, *keyframes})
    else:
        raise ValueError(f"input_frame must be first, all or keyframes, not {input_frame!r}")
    if target_frame not in ("last", "next_keyframe", "offset"):
        raise ValueError(
            f"target_frame must be last, next_keyframe or offset, not {target_frame!r}"
        )
    if target_frame == "offset" and target_offset < 1:
        raise ValueError(f"target_offset must be >= 1, got {target_offset}")
    ordered = sorted(keyframes)
    pairs = []
    for index in inputs:
        if target_frame == "last":
            target: int | None = num_frames - 1
        elif target_frame == "next_keyframe":
            target = next((k for k in ordered if k > index), None)
        else:
            target = index + target_offset
        if target is not None and index < target < num_frames:
            pairs.append((index, target))
    return pairs


@dataclass(frozen=True)
class DynamicsSpec:
    """One pair before decoding: what to decode (PNG bytes) and where it came from."""

    key: str
    origin: str
    task: str
    camera: str
    input_frame: int
    target_frame: int
    instruction: str
    flip: bool
    input_png: bytes = field(repr=False)
    target_png: bytes = field(repr=False)

    @property
    def id(self) -> str:
        return f"{self.key}@{self.input_frame}->{self.target_frame}"


@dataclass(frozen=True)
class ExpandDynamics:
    """Pipeline stage: episode views -> `DynamicsSpec`s (no pixels decoded here)."""

    camera: str
    input_frame: InputFrame
    target_frame: TargetFrame
    target_offset: int
    instruction: Literal["first", "random"]
    hflip: bool
    state: StreamState

    def specs(self, view: EpisodeView) -> list[DynamicsSpec]:
        specs = []
        for index, target in dynamics_pairs(
            view.num_frames, view.keyframes, self.input_frame, self.target_frame,
            self.target_offset,
        ):  # fmt: skip
            instruction, flip = view.descriptions[0], False
            if self.instruction == "random" or self.hflip:
                rng = random.Random(self.state.sample_seed(view.key, index, target))
                if self.instruction == "random":
                    instruction = rng.choice(view.descriptions)
                flip = self.hflip and rng.random() < 0.5
            specs.append(
                DynamicsSpec(
                    key=view.key,
                    origin=view.origin,
                    task=view.task,
                    camera=self.camera,
                    input_frame=index,
                    target_frame=target,
                    instruction=instruction,
                    flip=flip,
                    input_png=view.png(self.camera, "rgb", index),
                    target_png=view.png(self.camera, "rgb", target),
                )
            )
        return specs

    def __call__(self, views: Iterable[EpisodeView]) -> Iterator[DynamicsSpec]:
        for view in views:
            yield from self.specs(view)


@dataclass(frozen=True)
class DynamicsItem:
    spec: DynamicsSpec
    input_image: torch.Tensor
    target_image: torch.Tensor


def decode_frame(png: bytes, size: int, flip: bool, origin: str, key: str, field_name: str):
    """`prepare_rgb` with an error naming the shard (or folder), sample and frame."""
    try:
        return prepare_rgb(png, size, flip)
    except Exception as err:
        raise SampleDataError(
            f"{origin}: sample '{key}': cannot decode {field_name} ({type(err).__name__}: {err})"
        ) from err


@dataclass(frozen=True)
class DecodeDynamics:
    """spec -> `DynamicsItem`: decodes, centre-crops, resizes and (maybe) flips both frames."""

    image_size: int

    def __call__(self, spec: DynamicsSpec) -> DynamicsItem:
        images = [
            decode_frame(
                png, self.image_size, spec.flip, spec.origin, spec.key,
                frame_ext(spec.camera, "rgb", index),
            )
            for png, index in ((spec.input_png, spec.input_frame),
                               (spec.target_png, spec.target_frame))
        ]  # fmt: skip
        return DynamicsItem(spec, images[0], images[1])


@dataclass
class DynamicsBatch:
    """A batch of dynamics pairs.

    input_images / target_images: B x 3 x H x W uint8 (use `to_unit_range` for [-1, 1]);
    instructions: B strings; ids: `<key>@<input>-><target>`; tasks: B task names;
    input_frames / target_frames: B frame indices (int64).
    """

    input_images: torch.Tensor
    target_images: torch.Tensor
    instructions: list[str]
    ids: list[str]
    tasks: list[str]
    input_frames: torch.Tensor
    target_frames: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def unit_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) as float32 in [-1, 1], what the diffusion model consumes."""
        return to_unit_range(self.input_images), to_unit_range(self.target_images)

    def pin_memory(self) -> DynamicsBatch:
        """Called by the DataLoader when pin_memory=True."""
        return DynamicsBatch(
            self.input_images.pin_memory(), self.target_images.pin_memory(),
            self.instructions, self.ids, self.tasks,
            self.input_frames.pin_memory(), self.target_frames.pin_memory(),
        )  # fmt: skip


def collate_dynamics(items: list[DynamicsItem]) -> DynamicsBatch:
    return DynamicsBatch(
        input_images=torch.stack([item.input_image for item in items]),
        target_images=torch.stack([item.target_image for item in items]),
        instructions=[item.spec.instruction for item in items],
        ids=[item.spec.id for item in items],
        tasks=[item.spec.task for item in items],
        input_frames=torch.tensor([item.spec.input_frame for item in items], dtype=torch.int64),
        target_frames=torch.tensor([item.spec.target_frame for item in items], dtype=torch.int64),
    )


class DynamicsDataModule(EpisodeDataModule):
    """(input frame, target frame, instruction) pairs for the dynamics diffusion model.

    Args:
        camera: the camera both frames come from ("front" in X-ICM).
        input_frame: "first" (frame 0, X-ICM), "all" (every frame) or "keyframes" (frame 0
            and each keyframe).
        target_frame: "last" (X-ICM default), "next_keyframe", or "offset" (input +
            target_offset).
        target_offset: frames ahead for target_frame="offset".
        hflip: flip both frames horizontally with probability 0.5 (off: tasks say left and
            right).
        **kwargs: the data source, split, batching and seed arguments of
            `EpisodeDataModule` (shards, batch_size, image_size, instruction, ...).
    """

    def __init__(
        self,
        camera: str = "front",
        input_frame: InputFrame = "first",
        target_frame: TargetFrame = "last",
        target_offset: int = 1,
        hflip: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if camera not in CAMERAS:
            raise ValueError(f"unknown camera {camera!r}; choose from {list(CAMERAS)}")
        dynamics_pairs(2, (), input_frame, target_frame, target_offset)  # validates the modes
        self.camera = camera
        self.input_frame = input_frame
        self.target_frame = target_frame
        self.target_offset = target_offset
        self.hflip = hflip

    @property
    def cameras(self) -> tuple[str, ...]:
        return (self.camera,)

    def fields(self) -> FieldSelection:
        return FieldSelection(frozenset({JSON_EXT}), (f"{self.camera}_rgb.",))

    def _pairs(
        self, frames: int | None, keyframes: Sequence[int] | None
    ) -> list[tuple[int, int]] | None:
        """An episode's pairs, when its frame count (and, in the keyframe modes, its
        keyframes) are known before reading it."""
        needs_keyframes = self.input_frame == "keyframes" or self.target_frame == "next_keyframe"
        if frames is None or (needs_keyframes and keyframes is None):
            return None
        return dynamics_pairs(frames, keyframes or (), self.input_frame, self.target_frame,
                              self.target_offset)  # fmt: skip

    def samples_per_episode(
        self, frames: int | None, keyframes: Sequence[int] | None = None
    ) -> int | None:
        pairs = self._pairs(frames, keyframes)
        return None if pairs is None else len(pairs)

    def exact_fields(
        self, frames: int | None, keyframes: Sequence[int] | None = None
    ) -> frozenset[str] | None:
        """X-ICM pairs need two frames of ~125, keyframe pairs about four: name them so the
        reader fetches only those (every-frame inputs read the camera's whole prefix)."""
        pairs = self._pairs(frames, keyframes)
        if pairs is None or self.input_frame == "all":
            return None
        used = {index for pair in pairs for index in pair}
        return frozenset({JSON_EXT, *(frame_ext(self.camera, "rgb", i) for i in used)})

    def expander(self, state: StreamState) -> ExpandDynamics:
        return ExpandDynamics(
            self.camera, self.input_frame, self.target_frame, self.target_offset,
            self.instruction, self.hflip, state,
        )  # fmt: skip

    def decoder(self) -> DecodeDynamics:
        return DecodeDynamics(self.image_size)

    def collator(self):
        return collate_dynamics
