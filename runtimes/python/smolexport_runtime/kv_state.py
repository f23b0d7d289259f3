"""A sequence's KV cache with the token ids it holds, so that the next prompt pays only for what is new.

`CacheState` is the unit prefix reuse works on: a conversation keeps one across calls, a server slot keeps
one per row of its batch. The cache holds exactly `tokens`: the ids are appended only after the forward pass
that wrote their keys and values returned, so a stream closed mid-way, a stop string, or an error leaves a
state that is still true, and the next prompt reuses the longest common prefix of the two id lists.

With GroupQueryAttention's shared buffer, dropping the tail of the cache is just a shorter length: the graph
reads each row's length from the attention mask, and the next write overwrites the stale positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .generate import Decoder, decode_one_token, extend

# Capacities are rounded up to this many positions, so a conversation grows its buffer rarely.
CAPACITY_STEP = 256


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    if n and list(a[:n]) == list(b[:n]):
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class CacheState:
    """A decoder cache and the ids it holds. `limit` bounds the capacity (the model's context length)."""

    def __init__(self, decoder: Decoder, limit: int | None = None, cache=None, tokens: Sequence[int] = ()):
        self.decoder = decoder
        self.limit = limit
        self.cache = cache
        self.tokens: list[int] = list(tokens)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def capacity(self) -> int | None:
        """Positions the preallocated buffer holds; None for a cache that grows by copying each step."""
        return getattr(self.cache, "capacity", None)

    def reset(self) -> None:
        """Forgets the tokens and frees the buffer."""
        self.cache, self.tokens = None, []

    def reuse(self, prompt_ids: Sequence[int]) -> int:
        """Keeps the longest common prefix of the cache and `prompt_ids`, less at least one prompt token (the
        last prompt token must run to give the logits of the first new one); drops the rest. Returns the
        number of prompt tokens served from the cache."""
        keep = min(common_prefix(self.tokens, prompt_ids), len(prompt_ids) - 1)
        self.truncate(max(keep, 0))
        return self.length

    def truncate(self, length: int) -> None:
        if length >= self.length:
            return
        self.tokens = self.tokens[:length]
        if self.cache is None or self.capacity is not None:
            return  # a preallocated buffer: the next write overwrites positions >= length
        # A growing cache is a list of [batch, kv_heads, seq, head_dim] arrays or OrtValues: cut them.
        self.cache = [np.ascontiguousarray(_to_numpy(c)[:, :, :length]) for c in self.cache]

    def reserve(self, needed: int) -> None:
        """Makes room for `needed` tokens in all: allocates the buffer, or grows it (doubling, rounded up to
        CAPACITY_STEP, at most `limit`) with the cached positions copied over."""
        if self.cache is None:
            self.cache = self.decoder.empty_cache(1, capacity=self._capacity_for(needed, 0))
            return
        capacity = self.capacity
        if capacity is None or needed <= capacity:
            return
        grown = self._capacity_for(needed, capacity)
        self.cache = self.decoder.grow_cache(self.cache, self.length, grown)

    def _capacity_for(self, needed: int, current: int) -> int:
        capacity = max(needed, 2 * current)
        capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
        if self.limit is not None:
            capacity = min(capacity, max(self.limit, needed))
        return capacity

    def extend(self, ids: Sequence[int]) -> np.ndarray:
        """Runs `ids` after the cached tokens; returns the last position's logits."""
        logits = None
        step = getattr(self.decoder, "prefill_chunk", None) or len(ids)
        for start in range(0, len(ids), step):
            chunk = list(ids[start : start + step])
            logits, self.cache, _ = extend(self.decoder, self.cache, self.length, chunk, step)
            self.tokens += chunk
        if logits is None:
            raise ValueError("nothing to run: the prompt adds no tokens")
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Feeds one token; returns its logits."""
        logits, self.cache, _ = decode_one_token(self.decoder, token, self.cache, self.length)
        self.tokens.append(token)
        return logits


def _to_numpy(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()
