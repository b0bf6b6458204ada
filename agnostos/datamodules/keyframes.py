"""Keyframe samples for VLA fine-tuning: observation at a state, the next keyframe action(s).

An episode with keyframes k1 < k2 < ... < kK gives K samples, one per transition: the state
is frame 0 for the first and the previous keyframe for the others (or always frame 0 with
state_frame="first", X-ICM's demo convention), and the target is the action reaching the
next keyframe, or the next `chunk` keyframes. A chunk running past the last keyframe is
padded with the last action and marked in `action_mask`.

Each sample carries the RGB images of the chosen cameras at the state frame, proprio
(gripper pose xyz + quaternion xyzw and gripper open, at the state frame), the instruction,
the continuous 9-dim target actions and their codes through the chosen action codec.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from agnostos.action_codecs import ActionCodec, ActionStats, TokenBinCodec, XICMActionCodec
from agnostos.datamodules.base import EpisodeDataModule
from agnostos.datamodules.catalogue import CatalogueEntry, Split
from agnostos.datamodules.dynamics import decode_frame
from agnostos.datamodules.streams import StreamState
from agnostos.datamodules.tar_stream import FieldSelection, TarSamples
from agnostos.shards.episode import CAMERAS
from agnostos.shards.samples import JSON_EXT, LOW_DIM_EXT, frame_ext
from agnostos.shards.views import (
    EpisodeView,
    ReadFolderEpisodes,
    SampleDataError,
    ToShardEpisodes,
    keyframe_action,
    keyframe_actions,
)

log = logging.getLogger(__name__)

StateFrame = Literal["previous_keyframe", "first"]
CodecName = Literal["xicm", "token_bins"]
PROPRIO_DIM = 8


def keyframe_transitions(
    keyframes: Sequence[int], state_frame: StateFrame = "previous_keyframe", chunk: int = 1
) -> list[tuple[int, tuple[int, ...]]]:
    """(state frame, target keyframes) per transition; chunks shorter at the end."""
    if state_frame not in ("previous_keyframe", "first"):
        raise ValueError(f"state_frame must be previous_keyframe or first, not {state_frame!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    ordered = sorted(keyframes)
    return [
        (0 if position == 0 or state_frame == "first" else ordered[position - 1],
         tuple(ordered[position : position + chunk]))
        for position in range(len(ordered))
    ]  # fmt: skip


@dataclass(frozen=True)
class KeyframeSpec:
    """One transition before decoding its images."""

    key: str
    origin: str
    task: str
    state_frame: int
    target_frames: tuple[int, ...]  # padded to the chunk length with the last keyframe
    instruction: str
    cameras: tuple[str, ...]
    proprio: np.ndarray
    actions: np.ndarray  # (chunk, 9) float64
    codes: np.ndarray  # (chunk, code_size) int64
    mask: np.ndarray  # (chunk,) bool, False on padding
    pngs: tuple[bytes, ...] = field(repr=False)

    @property
    def id(self) -> str:
        real = [frame for frame, valid in zip(self.target_frames, self.mask, strict=True) if valid]
        return f"{self.key}@{self.state_frame}->{','.join(map(str, real))}"


def proprio_at(view: EpisodeView, frame: int) -> np.ndarray:
    """Gripper pose (xyz, quaternion xyzw) and gripper open at one frame, float32 (8,)."""
    pose, gripper = view.low_dim("gripper_pose"), view.low_dim("gripper_open")
    if pose is None or gripper is None:
        raise SampleDataError(f"{view.origin}: sample '{view.key}': no gripper_pose/gripper_open")
    return np.concatenate([pose[frame], [gripper[frame]]]).astype(np.float32)


@dataclass(frozen=True)
class ExpandKeyframes:
    """Pipeline stage: episode views -> `KeyframeSpec`s (codes computed, no pixels decoded)."""

    cameras: tuple[str, ...]
    state_frame: StateFrame
    chunk: int
    instruction: Literal["first", "random"]
    codec: ActionCodec
    state: StreamState

    def specs(self, view: EpisodeView) -> list[KeyframeSpec]:
        specs = []
        for state, targets in keyframe_transitions(view.keyframes, self.state_frame, self.chunk):
            padded = targets + (targets[-1],) * (self.chunk - len(targets))
            actions = np.stack([keyframe_action(view, frame) for frame in padded])
            instruction = view.descriptions[0]
            if self.instruction == "random":
                rng = random.Random(self.state.sample_seed(view.key, state, targets[0]))
                instruction = rng.choice(view.descriptions)
            specs.append(
                KeyframeSpec(
                    key=view.key,
                    origin=view.origin,
                    task=view.task,
                    state_frame=state,
                    target_frames=padded,
                    instruction=instruction,
                    cameras=self.cameras,
                    proprio=proprio_at(view, state),
                    actions=actions,
                    codes=self.codec.encode(actions),
                    mask=np.arange(self.chunk) < len(targets),
                    pngs=tuple(view.png(camera, "rgb", state) for camera in self.cameras),
                )
            )
        return specs

    def __call__(self, views: Iterable[EpisodeView]) -> Iterator[KeyframeSpec]:
        for view in views:
            yield from self.specs(view)


@dataclass(frozen=True)
class KeyframeItem:
    spec: KeyframeSpec
    images: torch.Tensor  # V x 3 x H x W uint8


@dataclass(frozen=True)
class DecodeKeyframes:
    """spec -> `KeyframeItem`: decodes the state frame of every camera."""

    image_size: int

    def __call__(self, spec: KeyframeSpec) -> KeyframeItem:
        images = [
            decode_frame(png, self.image_size, False, spec.origin, spec.key,
                         frame_ext(camera, "rgb", spec.state_frame))
            for camera, png in zip(spec.cameras, spec.pngs, strict=True)
        ]  # fmt: skip
        return KeyframeItem(spec, torch.stack(images))


@dataclass
class KeyframeBatch:
    """A batch of keyframe transitions.

    images: B x V x 3 x H x W uint8 (cameras in `cameras` order); proprio: B x 8 float32
    (gripper xyz, quaternion xyzw, open) at the state frame; instructions: B strings;
    actions: B x chunk x code_size int64 codes; action_values: B x chunk x 9 float32
    continuous targets; action_mask: B x chunk bool (False on chunk padding);
    ids: `<key>@<state>-><keyframes>`; state_frames: B; target_frames: B x chunk.
    """

    images: torch.Tensor
    cameras: list[str]
    proprio: torch.Tensor
    instructions: list[str]
    actions: torch.Tensor
    action_values: torch.Tensor
    action_mask: torch.Tensor
    ids: list[str]
    tasks: list[str]
    state_frames: torch.Tensor
    target_frames: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> KeyframeBatch:
        """Called by the DataLoader when pin_memory=True."""
        return KeyframeBatch(
            self.images.pin_memory(), self.cameras, self.proprio.pin_memory(),
            self.instructions, self.actions.pin_memory(), self.action_values.pin_memory(),
            self.action_mask.pin_memory(), self.ids, self.tasks,
            self.state_frames.pin_memory(), self.target_frames.pin_memory(),
        )  # fmt: skip


def collate_keyframes(items: list[KeyframeItem]) -> KeyframeBatch:
    specs = [item.spec for item in items]
    return KeyframeBatch(
        images=torch.stack([item.images for item in items]),
        cameras=list(specs[0].cameras),
        proprio=torch.from_numpy(np.stack([spec.proprio for spec in specs])),
        instructions=[spec.instruction for spec in specs],
        actions=torch.from_numpy(np.stack([spec.codes for spec in specs])),
        action_values=torch.from_numpy(np.stack([spec.actions for spec in specs])).float(),
        action_mask=torch.from_numpy(np.stack([spec.mask for spec in specs])),
        ids=[spec.id for spec in specs],
        tasks=[spec.task for spec in specs],
        state_frames=torch.tensor([spec.state_frame for spec in specs], dtype=torch.int64),
        target_frames=torch.tensor([spec.target_frames for spec in specs], dtype=torch.int64),
    )


def action_stats(views: Iterable[EpisodeView]) -> ActionStats:
    """Statistics of every keyframe action of the given episodes (for `TokenBinCodec`)."""
    actions = [keyframe_actions(view) for view in views]
    stacked = np.concatenate(actions) if actions else np.zeros((0, 9))
    return ActionStats.compute(stacked)


class KeyframeDataModule(EpisodeDataModule):
    """Keyframe transitions for VLA fine-tuning (see the module docstring).

    Args:
        cameras: cameras whose RGB images each sample carries, in this order (default:
            front and wrist).
        state_frame: "previous_keyframe" (frame 0 for the first transition) or "first".
        chunk: how many next keyframe actions each sample targets.
        codec: "xicm" (the 7-integer X-ICM code) or "token_bins" (OpenVLA-style bins).
        xicm_parity: X-ICM codec in exact-parity mode (no lower clamp, no range checks).
        token_bins: bins per dimension for the token codec.
        token_bounds: normalisation bounds of the token codec ("q01_q99" or "minmax").
        action_stats: JSON file of `ActionStats` for the token codec; when absent the
            statistics are computed from the training episodes at setup (low-dim data only)
            and kept in `self.stats`, so they can be saved with the model.
        **kwargs: the data source, split, batching and seed arguments of
            `EpisodeDataModule` (shards, batch_size, image_size, instruction, ...).

    Without epoch_samples, an epoch is one pass over the training transitions when the
    catalogue knows every episode's keyframes (shards with a version-2 manifest), else one
    sample per training episode (folders, older manifests: counting keyframes would mean
    reading every pickle or shard). Known keyframes also let the shard reader fetch only
    the state frames the transitions use.
    """

    def __init__(
        self,
        cameras: list[str] | None = None,
        state_frame: StateFrame = "previous_keyframe",
        chunk: int = 1,
        codec: CodecName = "xicm",
        xicm_parity: bool = True,
        token_bins: int = 256,
        token_bounds: Literal["q01_q99", "minmax"] = "q01_q99",
        action_stats: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        chosen = tuple(cameras) if cameras is not None else ("front", "wrist")
        unknown = [camera for camera in chosen if camera not in CAMERAS]
        if unknown or not chosen:
            raise ValueError(f"unknown camera(s) {unknown}; choose from {list(CAMERAS)}")
        if codec not in ("xicm", "token_bins"):
            raise ValueError(f"codec must be 'xicm' or 'token_bins', not {codec!r}")
        keyframe_transitions((), state_frame, chunk)  # validates state_frame and chunk
        self._cameras = chosen
        self.state_frame = state_frame
        self.chunk = chunk
        self.codec_name = codec
        self.xicm_parity = xicm_parity
        self.token_bins = token_bins
        self.token_bounds = token_bounds
        self.action_stats_path = action_stats
        self.stats: ActionStats | None = None
        self._codec: ActionCodec | None = None

    @property
    def cameras(self) -> tuple[str, ...]:
        return self._cameras

    def fields(self) -> FieldSelection:
        return FieldSelection(
            frozenset({JSON_EXT, LOW_DIM_EXT}), tuple(f"{camera}_rgb." for camera in self.cameras)
        )

    def samples_per_episode(
        self, frames: int | None, keyframes: Sequence[int] | None = None
    ) -> int | None:
        return None if keyframes is None else len(keyframes)

    def exact_fields(
        self, frames: int | None, keyframes: Sequence[int] | None = None
    ) -> frozenset[str] | None:
        """Metadata, low-dim arrays and the chosen cameras' images at the state frames."""
        if keyframes is None:
            return None
        states = {state for state, _ in keyframe_transitions(keyframes, self.state_frame)}
        images = {frame_ext(camera, "rgb", state) for camera in self.cameras for state in states}
        return frozenset({JSON_EXT, LOW_DIM_EXT, *images})

    def low_dim_views(self, entries: Sequence[CatalogueEntry]) -> Iterator[EpisodeView]:
        """Episode views without images (metadata and low-dim arrays only), in order."""
        items = ({"url": unit} for unit in Split.units(entries))
        if self.shards is not None:
            select = FieldSelection(frozenset({JSON_EXT, LOW_DIM_EXT}))
            return ToShardEpisodes()(TarSamples(select, Split.keys(entries))(items))
        return ReadFolderEpisodes(str(self.folders), (), ())(items)

    @property
    def codec(self) -> ActionCodec:
        if self._codec is None:
            if self.codec_name == "xicm":
                self._codec = XICMActionCodec(parity=self.xicm_parity)
            else:
                if self.stats is None:
                    self.stats = self._load_or_compute_stats()
                self._codec = TokenBinCodec(self.stats, self.token_bins, self.token_bounds)
        return self._codec

    def _load_or_compute_stats(self) -> ActionStats:
        if self.action_stats_path is not None:
            return ActionStats.load(self.action_stats_path)
        stats = action_stats(self.low_dim_views(self.split.train))
        log.info("action statistics from %d training keyframe actions", stats.count)
        return stats

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.codec  # noqa: B018  (statistics are computed once, before any loader forks)

    def expander(self, state: StreamState) -> ExpandKeyframes:
        return ExpandKeyframes(
            self.cameras, self.state_frame, self.chunk, self.instruction, self.codec, state
        )

    def decoder(self) -> DecodeKeyframes:
        return DecodeKeyframes(self.image_size)

    def collator(self) -> Any:
        return collate_keyframes
