"""The text a VLA reads and the replies it writes: prompt lines and the two action formats.

Prompt (the user turn, after one image per camera):

    What action should the robot take to <instruction>?
    Observation: <X-ICM object-coordinate text>      (inputs.object_text)
    Gripper: [57, 49, 87, 0, 39, 0, 1]                (inputs.proprio)

Replies (the assistant turn), one entry per valid keyframe of the chunk, then the
template's end-of-reply token:

* `xicm_text`: X-ICM's 7 integers printed as X-ICM prints an action, `[57, 49, 87, 0, 39,
  0, 1]`; a chunk is the lists joined by ", ". Parsing finds 7-integer lists with a regex
  and range-checks them (0..voxel_size-1 for xyz, 0..rotation_bins-1 for the Euler bins,
  0..1 for the gripper); a list out of range is an invalid keyframe.
* `token_bins`: one token per code value (9 per keyframe), code c -> token id
  `first + c`, where the `bins` ids `first .. first+bins-1` are the last ids of the
  tokenizer's regular vocabulary (OpenVLA's trick: rarely used tokens stand for bins, no
  embedding resize). Generated ids outside that range make the keyframe invalid.

Chunk padding (`action_mask` False) is not supervised: the reply holds the valid
keyframes only, so at the end of an episode it is shorter and the model learns to stop.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agnostos.action_codecs import TokenBinCodec, XICMActionCodec

__all__ = [
    "XICM_LIST",
    "BinReplies",
    "ParsedReply",
    "Replies",
    "TextReplies",
    "prompt_text",
]

_INT = r"\s*(-?\d+)\s*"
XICM_LIST = re.compile(r"\[" + ",".join([_INT] * 7) + r"\]")
_WHOLE_TEXT = re.compile(
    r"\s*\[?\s*" + XICM_LIST.pattern + r"(?:\s*,\s*" + XICM_LIST.pattern + r")*\s*\]?\s*"
)


def prompt_text(
    instruction: str, pose: Sequence[int] | None = None, objects: str | None = None
) -> str:
    """The text of the user turn (see the module docstring)."""
    task = instruction.strip().rstrip(".?!")
    lines = [f"What action should the robot take to {task}?"]
    if objects is not None:
        lines.append(f"Observation: {objects}")
    if pose is not None:
        lines.append(f"Gripper: {[int(value) for value in pose]}")
    return "\n".join(lines)


@dataclass
class ParsedReply:
    codes: np.ndarray  # chunk x code_size int64 (zeros where invalid)
    valid: np.ndarray  # chunk bool
    parsed: bool  # the whole reply had the expected form
    text: str


class Replies(ABC):
    """An action format: target ids for training, parsing of generated ids."""

    name: str
    code_size: int

    @abstractmethod
    def reply_ids(self, codes: np.ndarray) -> list[int]:
        """Token ids of the reply holding these keyframe codes (n x code_size), no end."""

    @abstractmethod
    def parse(self, ids: Sequence[int], chunk: int) -> ParsedReply:
        """Generated ids (cut at the end token) -> codes of up to `chunk` keyframes."""

    @abstractmethod
    def max_new_tokens(self, chunk: int) -> int:
        """Enough new tokens for a full chunk reply and its end token."""


class TextReplies(Replies):
    name = "xicm_text"
    code_size = 7

    def __init__(self, tokenizer: Any, codec: XICMActionCodec):
        self.tokenizer = tokenizer
        self.codec = codec
        self.high = np.array([codec.voxel_size - 1] * 3 + [codec.rotation_bins - 1] * 3 + [1])

    def in_range(self, codes: np.ndarray) -> np.ndarray:
        return np.all((codes >= 0) & (codes <= self.high), axis=-1)

    def text(self, codes: np.ndarray) -> str:
        rows = np.asarray(codes, dtype=np.int64).reshape(-1, 7)
        return ", ".join(str(row.tolist()) for row in rows)

    def targets(self, codes: np.ndarray) -> np.ndarray:
        """Codes as the reply prints them: positions clamped into the voxel grid (the
        parity codec has no lower clamp, so a point below the bounds would read -10)."""
        clipped = np.asarray(codes, dtype=np.int64).copy()
        clipped[..., :3] = np.clip(clipped[..., :3], 0, self.codec.voxel_size - 1)
        return clipped

    def reply_ids(self, codes: np.ndarray) -> list[int]:
        if len(codes) == 0:
            return []
        text = self.text(self.targets(codes))
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def parse_text(self, text: str, chunk: int) -> ParsedReply:
        codes = np.zeros((chunk, 7), dtype=np.int64)
        valid = np.zeros(chunk, dtype=bool)
        found = [np.array([int(value) for value in match.groups()], dtype=np.int64)
                 for match in XICM_LIST.finditer(text)]  # fmt: skip
        for position, values in enumerate(found[:chunk]):
            if self.in_range(values):
                codes[position], valid[position] = values, True
        parsed = (
            0 < len(found) <= chunk
            and bool(valid[: len(found)].all())
            and _WHOLE_TEXT.fullmatch(text) is not None
        )
        return ParsedReply(codes, valid, parsed, text)

    def parse(self, ids: Sequence[int], chunk: int) -> ParsedReply:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return self.parse_text(text, chunk)

    def max_new_tokens(self, chunk: int) -> int:
        widest = np.array([[self.codec.voxel_size - 1] * 3 + [self.codec.rotation_bins - 1] * 3
                           + [1]] * chunk)  # fmt: skip
        longest = len(self.tokenizer(self.text(widest), add_special_tokens=False)["input_ids"])
        return longest + 1 + 2 * chunk  # end token, and slack for other spacings


class BinReplies(Replies):
    name = "token_bins"

    def __init__(self, tokenizer: Any, codec: TokenBinCodec, embedding_rows: int):
        self.tokenizer = tokenizer
        self.codec = codec
        self.bins = codec.bins
        self.code_size = codec.code_size
        self.first = self.first_action_id(tokenizer, codec.bins, embedding_rows)

    @staticmethod
    def first_action_id(tokenizer: Any, bins: int, embedding_rows: int) -> int:
        """The first of the last `bins` regular-vocabulary ids, none of them special."""
        from agnostos.models.vla_backbones import VLAError

        regular = int(tokenizer.vocab_size)
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        tail = range(regular - bins, regular)
        clash = [index for index in tail if index in special]
        if regular - bins < 1 or clash:
            raise VLAError(
                f"token_bins needs {bins} ordinary tokens at the end of the vocabulary, but "
                f"the tokenizer has {regular} regular ids"
                + (f" and special ids among them (e.g. {clash[0]})" if clash else "")
            )
        if regular > embedding_rows:
            raise VLAError(
                f"token_bins: tokenizer ids reach {regular - 1} but the model embeds only "
                f"{embedding_rows} rows"
            )
        return regular - bins

    def reply_ids(self, codes: np.ndarray) -> list[int]:
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if np.any((codes < 0) | (codes >= self.bins)):
            raise ValueError(f"token codes must lie in 0..{self.bins - 1}")
        return (codes + self.first).tolist()

    def is_action(self, ids: np.ndarray) -> np.ndarray:
        return (ids >= self.first) & (ids < self.first + self.bins)

    def parse(self, ids: Sequence[int], chunk: int) -> ParsedReply:
        ids = np.asarray(list(ids), dtype=np.int64)
        codes = np.zeros((chunk, self.code_size), dtype=np.int64)
        valid = np.zeros(chunk, dtype=bool)
        for position in range(min(chunk, len(ids) // self.code_size)):
            group = ids[position * self.code_size : (position + 1) * self.code_size]
            if self.is_action(group).all():
                codes[position], valid[position] = group - self.first, True
        complete = len(ids) % self.code_size == 0 and 0 < len(ids) <= chunk * self.code_size
        parsed = bool(complete and self.is_action(ids).all())
        text = " ".join(f"<bin_{int(value) - self.first}>" if self.is_action(value) else
                        self.tokenizer.decode([int(value)]) for value in ids)  # fmt: skip
        return ParsedReply(codes, valid, parsed, text)

    def max_new_tokens(self, chunk: int) -> int:
        return chunk * self.code_size + 1
