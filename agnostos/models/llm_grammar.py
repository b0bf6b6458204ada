"""The action-list grammar of constrained decoding, and its llguidance engine for transformers.

Why a grammar: X-ICM's replies are free text that its lenient parser mines for 7-int lists;
small models often write prose, floats or out-of-range bins, and the episode then falls back
to the home action. `decoding: constrained` makes every reply a list of 1 to 26 actions of 7
integers in range (0-99 three times for the voxel position, 0-71 three times for the 5-degree
Euler bins, 0/1 for the gripper), printed the way X-ICM prints its demo actions
(`[[57, 49, 87, 0, 39, 0, 1], ...]`, separators `", "`, the space optional).

One regex serves every backend, so the language is the same for all of them: llguidance
here (one of vLLM's structured-output engines too), vLLM's structured outputs, and a
server's request body. Leading zeros ("07") and
the empty list are not in the language; numbers are written without them in the demos.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

__all__ = [
    "ACTION_LIST_REGEX",
    "ActionGrammar",
    "GrammarProcessor",
    "action_grammar",
    "is_action_list",
]

MAX_ACTIONS = 26  # X-ICM truncates a reply to 26 actions

_POSITION = r"(?:[0-9]|[1-9][0-9])"  # 0..99, the voxel index of x, y, z
_ROTATION = r"(?:[0-9]|[1-6][0-9]|7[01])"  # 0..71, 5-degree bins with 72 folded to 0
_GRIPPER = r"[01]"
_SEP = r", ?"
_ACTION = r"\[" + _SEP.join([_POSITION] * 3 + [_ROTATION] * 3 + [_GRIPPER]) + r"\]"

ACTION_LIST_REGEX: str = (
    r"\[" + _ACTION + r"(?:" + _SEP + _ACTION + r"){0," + str(MAX_ACTIONS - 1) + r"}\]"
)

_COMPILED = re.compile(ACTION_LIST_REGEX)


def is_action_list(text: str) -> bool:
    """True when the whole of `text` is in the action-list language (the test oracle)."""
    return _COMPILED.fullmatch(text) is not None


class ActionGrammar:
    """The action-list regex for one tokenizer, through llguidance; a fresh processor per call.

    Why llguidance: it is the grammar engine behind vLLM's and SGLang's `guidance` backend
    and llama.cpp's, its wheel has no dependencies, and it needs neither triton nor a
    compiler. (xgrammar pulls in triton, whose bundled LLVM crashes any process that
    imports it after Mesa's software OpenGL has rendered, i.e. after minibench.)
    Building the token trie walks the whole vocabulary, so it is done once per tokenizer;
    a processor holds one matcher per batch row and serves a single `generate()` call.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import llguidance
        import llguidance.hf

        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=self.stop_token_ids
        )
        self._grammar = llguidance.LLMatcher.grammar_from_regex(ACTION_LIST_REGEX)
        probe = llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0)
        if probe.is_error():
            raise ValueError(f"llguidance refused the action grammar: {probe.get_error()}")

    def processor(self) -> GrammarProcessor:
        """A new `transformers` logits processor that masks every token leaving the grammar."""
        return GrammarProcessor(
            self._tokenizer, self._grammar, self.vocab_size, self.stop_token_ids
        )


class GrammarProcessor:
    """Masks, row by row, the tokens the grammar does not allow next (a logits processor).

    The first call sees the prompts; each later call first feeds every row's matcher the
    token sampled last. A matcher stops as soon as the list is complete and then allows
    only the stop tokens (its row ends; transformers pads it until the others finish).
    """

    def __init__(
        self, tokenizer: Any, grammar: str, vocab_size: int, stop_token_ids: list[int]
    ) -> None:
        self._tokenizer, self._grammar, self.vocab_size = tokenizer, grammar, vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._matchers: list[Any] | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import llguidance
        import llguidance.numpy
        import numpy as np
        import torch

        rows = int(input_ids.shape[0])
        if self._matchers is None:
            self._matchers = [
                llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0)
                for _ in range(rows)
            ]
        else:
            for matcher, token in zip(self._matchers, input_ids[:, -1].tolist(), strict=True):
                if not matcher.is_stopped():
                    matcher.consume_token(int(token))
        bitmask = llguidance.numpy.allocate_token_bitmask(rows, self.vocab_size)
        for row, matcher in enumerate(self._matchers):
            if matcher.is_error():
                raise RuntimeError(f"constrained decoding failed: {matcher.get_error()}")
            if not matcher.is_stopped():
                llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, row)
        # (a stopped matcher's row is overwritten below with its stop tokens)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        allowed = bits[:, : scores.shape[1]].astype(bool)
        for row, matcher in enumerate(self._matchers):
            if matcher.is_stopped():
                allowed[row] = False
                allowed[row, self.stop_token_ids] = True
        allowed = torch.from_numpy(allowed)
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))


_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], ActionGrammar]] = (
    weakref.WeakKeyDictionary()
)


def action_grammar(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> ActionGrammar:
    """The compiled action grammar of `tokenizer`, compiled once and cached with it."""
    key = (vocab_size, tuple(sorted(set(stop_token_ids))))
    per_tokenizer = _CACHE.setdefault(tokenizer, {})
    if key not in per_tokenizer:
        per_tokenizer[key] = ActionGrammar(tokenizer, vocab_size, list(key[1]))
    return per_tokenizer[key]
