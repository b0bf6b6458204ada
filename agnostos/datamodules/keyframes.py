"""Keyframe samples for VLA fine-tuning: observation at a state, the next keyframe action(s).

An episode with keyframes k1 < k2 < ... < kK gives K samples, one per transition: the state
is frame 0 for the first and the previous keyframe for the others (or always frame 0 with
state_frame="first", X-ICM's demo convention), and the target is the action reaching the
next keyframe, or the next `chunk` keyframes. A chunk running past the last keyframe is
padded with the last action and marked in `action_mask`.

Each sample carries the RGB images of the chosen cameras at the state frame, proprio
(gripper pose xyz + quaternion xyzw and gripper open, at the state frame), the instruction,
the continuous 9-dim target actions and their codes through the chosen action codec, and
optionally X-ICM's object-coordinate text of the state frame (`object_text=True`): the
published Qwen2.5-VL AGNOSTOS baseline shows its VLA that text. It is made by
`agnostos.observation_text.episode_observation_text`, the function behind the demo bank's
text and (through `frame_observation_text`) the X-ICM agent's query text, so training,
demo and query text can only differ where their inputs do.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
from agnostos.observation_text import DEFAULT_CAMERAS, episode_observation_text
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
from agnostos.tasks import SUITES, get_suite

log = logging.getLogger(__name__)

StateFrame = Literal["previous_keyframe", "first"]
CodecName = Literal["xicm", "token_bins"]
PROPRIO_DIM = 8
# What X-ICM's object text reads of a camera: its masks, and its depth for the points.
TEXT_MODALITIES: tuple[str, ...] = ("depth", "mask")


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
    object_text: str | None = None  # X-ICM's text of the state frame (object_text=True)

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
class ObjectText:
    """X-ICM's object-coordinate text of stored frames, as the demo bank writes it.

    `object_names` maps each task to its `{simulator name: prompt name}` map (plain dicts:
    the suites' read-only maps do not pickle into spawned workers).
    """

    cameras: tuple[str, ...]
    object_names: Mapping[str, Mapping[str, str]]

    def __call__(self, view: EpisodeView, frame: int, instruction: str) -> str:
        """The text of `frame`; decodes only those cameras' depth and mask PNGs there."""
        names = self.object_names.get(view.task)
        if names is None:
            raise SampleDataError(
                f"{view.origin}: sample '{view.key}': no object-name map for task {view.task!r}"
            )
        episode = view.as_episode(self.cameras)
        if not any(episode.mask_names.get(camera) for camera in self.cameras):
            raise SampleDataError(
                f"{view.origin}: sample '{view.key}': object_text needs the mask handle names "
                "(misc['<camera>_mask_id_to_name']), which this episode does not store "
                "(PerAct/X-ICM-fork data); turn object_text off for this data"
            )
        try:
            return episode_observation_text(
                episode,
                frame,
                object_names=names,
                cameras=self.cameras,
                instruction=instruction,
            )
        except SampleDataError:
            raise
        except (KeyError, ValueError, IndexError) as error:
            reason = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise SampleDataError(
                f"{view.origin}: sample '{view.key}': object text of frame {frame}: {reason}"
            ) from error


@dataclass(frozen=True)
class ExpandKeyframes:
    """Pipeline stage: episode views -> `KeyframeSpec`s (codes computed, no pixels decoded;
    with `object_text`, the text of each state frame, which decodes its depth and masks)."""

    cameras: tuple[str, ...]
    state_frame: StateFrame
    chunk: int
    instruction: Literal["first", "random"]
    codec: ActionCodec
    state: StreamState
    object_text: ObjectText | None = None

    def specs(self, view: EpisodeView) -> list[KeyframeSpec]:
        specs = []
        # state_frame="first" gives every transition frame 0: its text is made once.
        texts: dict[tuple[int, str], str] = {}
        for state, targets in keyframe_transitions(view.keyframes, self.state_frame, self.chunk):
            padded = targets + (targets[-1],) * (self.chunk - len(targets))
            actions = np.stack([keyframe_action(view, frame) for frame in padded])
            instruction = view.descriptions[0]
            if self.instruction == "random":
                rng = random.Random(self.state.sample_seed(view.key, state, targets[0]))
                instruction = rng.choice(view.descriptions)
            text = None
            if self.object_text is not None:
                if (state, instruction) not in texts:
                    texts[state, instruction] = self.object_text(view, state, instruction)
                text = texts[state, instruction]
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
                    object_text=text,
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
    ids: `<key>@<state>-><keyframes>`; state_frames: B; target_frames: B x chunk;
    object_texts: B strings, X-ICM's object-coordinate text of each state frame with the
    row's instruction (None unless the datamodule has `object_text=True`).
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
    object_texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> KeyframeBatch:
        """Called by the DataLoader when pin_memory=True: pins every tensor field and keeps
        the rest (strings, camera names) as they are."""
        pinned = {
            item.name: getattr(self, item.name).pin_memory()
            for item in dataclasses.fields(self)
            if isinstance(getattr(self, item.name), torch.Tensor)
        }
        return dataclasses.replace(self, **pinned)


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
        object_texts=None
        if specs[0].object_text is None
        else [str(spec.object_text) for spec in specs],
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
        object_text: add X-ICM's object-coordinate text of each state frame
            (`KeyframeBatch.object_texts`), as the published Qwen2.5-VL AGNOSTOS baseline
            prompts its VLA. Each sample then also reads those cameras' depth and mask PNGs
            at its state frame, and the episodes must store mask handle names (RLBench's
            `<camera>_mask_id_to_name`, minibench's; not the PerAct-fork data).
        object_text_cameras: cameras whose masks and point clouds place the objects
            (default: X-ICM's five, what the demo bank and the X-ICM agent use; the text
            of a sample and of a demo agree only with the same cameras).
        object_names: the benchmark whose object-name maps name the objects ("agnostos"
            or "minibench"; default: the one benchmark with a map for every task in the
            data; task names recur across benchmarks, so several is an error asking for
            this argument).
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
        object_text: bool = False,
        object_text_cameras: list[str] | None = None,
        object_names: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        chosen = tuple(cameras) if cameras is not None else ("front", "wrist")
        unknown = [camera for camera in chosen if camera not in CAMERAS]
        if unknown or not chosen:
            raise ValueError(f"unknown camera(s) {unknown}; choose from {list(CAMERAS)}")
        text_cameras = (
            tuple(object_text_cameras) if object_text_cameras is not None else DEFAULT_CAMERAS
        )
        unknown = [camera for camera in text_cameras if camera not in CAMERAS]
        if unknown or not text_cameras:
            raise ValueError(
                f"object_text_cameras: unknown camera(s) {unknown}; choose from {list(CAMERAS)}"
            )
        if object_names is not None and object_names not in SUITES:
            raise ValueError(
                f"object_names: {object_names!r} is not a benchmark with object-name maps; "
                f"choose one of {', '.join(sorted(SUITES))}"
            )
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
        self.object_text = object_text
        self.object_text_cameras = text_cameras
        self.object_names = object_names
        self._object_name_maps: dict[str, dict[str, str]] | None = None
        self._object_names_benchmark = ""

    @property
    def cameras(self) -> tuple[str, ...]:
        return self._cameras

    def _text_frames(self) -> list[tuple[str, str]]:
        """(camera, modality) of the frames the object text reads (none when it is off)."""
        if not self.object_text:
            return []
        return [(camera, modality) for camera in self.object_text_cameras
                for modality in TEXT_MODALITIES]  # fmt: skip

    def frames_needed(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        needed = super().frames_needed()
        if self.object_text:
            needed.append(("object_text_cameras", self.object_text_cameras, TEXT_MODALITIES))
        return needed

    def fields(self) -> FieldSelection:
        prefixes = [f"{camera}_rgb." for camera in self.cameras]
        prefixes += [f"{camera}_{modality}." for camera, modality in self._text_frames()]
        return FieldSelection(frozenset({JSON_EXT, LOW_DIM_EXT}), tuple(prefixes))

    def samples_per_episode(
        self, frames: int | None, keyframes: Sequence[int] | None = None
    ) -> int | None:
        return None if keyframes is None else len(keyframes)

    def exact_fields(
        self, frames: int | None, keyframes: Sequence[int] | None = None
    ) -> frozenset[str] | None:
        """Metadata, low-dim arrays and the chosen cameras' images at the state frames (and
        the object-text cameras' depth and masks there)."""
        if keyframes is None:
            return None
        states = {state for state, _ in keyframe_transitions(keyframes, self.state_frame)}
        kinds = [(camera, "rgb") for camera in self.cameras] + self._text_frames()
        images = {frame_ext(camera, modality, state)
                  for camera, modality in kinds for state in states}  # fmt: skip
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

    @property
    def object_name_maps(self) -> dict[str, dict[str, str]]:
        """task -> {simulator name: prompt name} for every task of the data (see
        `object_names`); an error names the tasks no map covers."""
        if self._object_name_maps is None:
            tasks = list(dict.fromkeys(e.task for e in (*self.split.train, *self.split.val)))
            if self.object_names is not None:
                suite = self.object_names
            else:
                covering = [name for name, candidate in SUITES.items()
                            if all(task in candidate.object_names for task in tasks)]  # fmt: skip
                if len(covering) != 1:
                    which = "no benchmark has" if not covering else (
                        f"benchmarks {', '.join(covering)} all have"
                    )  # fmt: skip
                    raise ValueError(
                        f"object_names: {which} object-name maps for every task of the data "
                        f"({', '.join(tasks)}); set object_names to "
                        f"{' or '.join(covering or sorted(SUITES))}"
                    )
                suite = covering[0]
            maps = get_suite(suite).object_names
            unnamed = [task for task in tasks if task not in maps]
            if unnamed:
                raise ValueError(
                    f"object_names: benchmark {suite!r} has no object-name map for task(s) "
                    f"{', '.join(unnamed)}"
                )
            self._object_name_maps = {task: dict(maps[task]) for task in tasks}
            self._object_names_benchmark = suite
        return self._object_name_maps

    @property
    def object_names_benchmark(self) -> str:
        """The benchmark whose object-name maps the object text uses (resolved)."""
        self.object_name_maps  # noqa: B018 (resolves the benchmark)
        return self._object_names_benchmark

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.codec  # noqa: B018  (statistics are computed once, before any loader forks)
        if self.object_text:
            self.object_name_maps  # noqa: B018  (a task without a map fails here, not in a worker)

    def expander(self, state: StreamState) -> ExpandKeyframes:
        text = (
            ObjectText(self.object_text_cameras, self.object_name_maps)
            if self.object_text
            else None
        )
        return ExpandKeyframes(
            self.cameras, self.state_frame, self.chunk, self.instruction, self.codec, state, text
        )

    def decoder(self) -> DecodeKeyframes:
        return DecodeKeyframes(self.image_size)

    def collator(self) -> Any:
        return collate_keyframes
