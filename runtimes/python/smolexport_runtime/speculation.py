"""Speculative decoding's drafters: cheap guesses of the next tokens, which the model then checks all at once.

A drafter proposes up to `limit` tokens that may follow `context` (the prompt and the answer so far, with the
token just sampled). `run_sequence` feeds the sampled token and the draft as one multi-token step and keeps
the draft up to its first token greedy decoding would not have chosen, so the text is greedy's (exactly, on
float exports; on int4 a multi-token step computes slightly other logits than a decode step). A step costs
about one decode step at small k (memory-bound: the weights are read once for all k tokens; see
benchmarks/README.md, "verification cost"), so every accepted token is nearly free.

- `PromptLookup`: copies what followed the latest earlier occurrence of the text's last tokens. Free, and
  strong where the answer quotes its input (rewrite, extract, summarize).
- `DraftModel`: a smaller model of the same family (SmolLM2-135M drafting for 1.7B: the same tokenizer)
  decodes the draft greedily on a KV cache of its own, kept across steps and turns like the target's.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import RequestError
from .kv_state import CacheState

if TYPE_CHECKING:
    from .model import Model


class Drafter(Protocol):
    def propose(self, context: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens that may follow `context`."""
        ...


class PromptLookup:
    """Drafts of up to `size` tokens copied from the context (prompt lookup decoding)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def propose(self, context: Sequence[int], limit: int) -> list[int]:
        return draft_from_context(context, self.size, limit)


class DraftModel:
    """Drafts of `size` tokens decoded greedily by a smaller model with the same tokenizer. `state` is the
    draft model's cache; pass the same one each turn (a Conversation keeps it) so only new tokens run."""

    def __init__(self, model: Model, size: int, state: CacheState | None = None) -> None:
        self.model = model
        self.size = size
        self.state = state if state is not None else new_draft_state(model)

    def propose(self, context: Sequence[int], limit: int) -> list[int]:
        size = min(self.size, limit)
        room = self.model.context_length
        if size <= 0 or (room is not None and len(context) + size > room):
            return []
        state = self.state
        # Keeps the longest common prefix with the context: rejected draft tokens drop out here. Its keys and
        # values need not match a fresh prefill (generated=True): a draft only has to be a good guess.
        state.reuse(context, generated=True)
        state.reserve(len(context) + size)
        logits = state.extend(context[state.length :])
        draft = [int(np.argmax(logits))]
        while len(draft) < size:
            draft.append(int(np.argmax(state.decode(draft[-1]))))
        return draft


def accepted_length(rows: np.ndarray, draft: Sequence[int]) -> int:
    """How many draft tokens greedy decoding would have chosen, in order: row i predicts draft[i]."""
    accepted = 0
    while accepted < len(draft) and int(np.argmax(rows[accepted])) == draft[accepted]:
        accepted += 1
    return accepted


def new_draft_state(model: Model) -> CacheState:
    return CacheState(model.decoder, limit=model.context_length)


def check_speculation(target: Model, prompt_lookup: int, draft: Model | None, draft_tokens: int) -> None:
    """Refuses bad speculation arguments at the call; a draft model must speak the target's tokens (the same
    vocabulary, id for id)."""
    if not _whole(prompt_lookup) or prompt_lookup < 0:
        raise RequestError(f"prompt_lookup must be a whole number >= 0, got {prompt_lookup!r}")
    if draft is None:
        return
    if prompt_lookup:
        raise RequestError("use prompt_lookup or a draft_model, not both")
    if not _whole(draft_tokens) or not 1 <= draft_tokens <= 64:
        raise RequestError(f"draft_tokens must be a whole number from 1 to 64, got {draft_tokens!r}")
    if draft is target:
        raise RequestError("the draft model is the model itself: pass a smaller model of the same family")
    if draft in _CHECKED.setdefault(target, weakref.WeakSet()):
        return
    if _vocab(draft) != _vocab(target):
        raise RequestError(
            "the draft model's tokenizer differs from the model's: a draft model must share the tokenizer "
            "(for SmolLM2-1.7B-Instruct, SmolLM2-135M-Instruct or -360M-Instruct)"
        )
    _CHECKED[target].add(draft)


# Drafts whose vocabulary matched, per target: comparing two 49,152-token vocabularies takes ~40 ms.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab(model: Model) -> dict[str, int]:
    return model.tokenizer.get_vocab(with_added_tokens=True)


def _whole(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def draft_from_context(tokens: Sequence[int], size: int, limit: int, longest: int = 3) -> list[int]:
    """Up to `size` tokens (and `limit`) that followed the latest earlier occurrence of the text's last n
    tokens (the largest n up to `longest` that occurs): what an answer that quotes or rewrites its input
    likely says next. One pass over the text, comparing further back only where the last token matches:
    this runs every decode step."""
    size = min(size, limit)
    last = len(tokens) - 1
    top = min(longest, last)
    if size <= 0 or top <= 0:
        return []
    best_n, best_end = 0, -1
    for end in range(last - 1, -1, -1):  # latest first: the first end to reach a length is the latest
        if tokens[end] != tokens[last]:
            continue
        n = 1
        while n < top and end - n >= 0 and tokens[end - n] == tokens[last - n]:
            n += 1
        if n > best_n:
            best_n, best_end = n, end
            if n == top:
                break
    return list(tokens[best_end + 1 : best_end + 1 + size]) if best_n else []
