"""A sequence's KV cache with the token ids it holds, so that the next prompt pays only for what is new.

`CacheState` is the unit prefix reuse works on: a conversation keeps one across calls, a server slot keeps
one per row of its batch. The cache holds exactly `tokens`: the ids are appended only after the forward pass
that wrote their keys and values returned, so a stream closed mid-way, a stop string, or an error leaves a
state that is still true, and the next prompt reuses the longest common prefix of the two id lists.

The cache itself is a kv_cache.KVCache (a preallocated buffer, a cache that grows by copying, or a Core ML
state): with GroupQueryAttention's shared buffer, dropping the tail of the cache is just a shorter length, as
the graph reads each row's length from the attention mask and the next write overwrites the stale positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .generate import PREFILL_CHUNK, Decoder, decode_one_token, extend, ones_mask, prefill_chunks
from .kv_cache import KVCache, as_kv_cache

# Capacities are rounded up to this many positions, so a conversation grows its buffer rarely.
CAPACITY_STEP = 256
# A CPU buffer starts with room for this many tokens (at most `limit`): onnxruntime's allocation only reserves
# address space, pages are touched as positions are written, so the room costs no memory, and a chat of up to
# 2,048 tokens never pays for a growth (at 1.7B shapes, growing 512 -> 1024 positions copied 190 MB, ~0.1 s
# of that turn's time to first token). GPU buffers are real memory: they start at what is needed.
CPU_FIRST_CAPACITY = 2048


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

    def __init__(
        self,
        decoder: Decoder,
        limit: int | None = None,
        cache: KVCache | None = None,
        tokens: Sequence[int] = (),
    ):
        self.decoder = decoder
        self.limit = limit
        self.cache = cache
        self.tokens: list[int] = list(tokens)
        # The leading tokens whose keys and values came from multi-token prefill calls (see reuse).
        self.prefilled = len(self.tokens)

    @property
    def cache(self) -> KVCache | None:
        return self._cache

    @cache.setter
    def cache(self, cache) -> None:
        self._cache = as_kv_cache(cache)  # a decoder written to the plain contract returns lists

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def capacity(self) -> int | None:
        """Positions the preallocated buffer holds; None for a cache that grows by copying each step."""
        return None if self.cache is None else self.cache.capacity

    def reset(self) -> None:
        """Forgets the tokens and frees the buffer."""
        self.cache, self.tokens, self.prefilled = None, [], 0

    def reuse(self, prompt_ids: Sequence[int], generated: bool = False) -> int:
        """Keeps the longest common prefix of the cache and `prompt_ids` and drops the rest; returns the
        number of prompt tokens served from the cache. At least the last two prompt tokens run again (the
        last gives the logits of the first new token; two, so that they run as a prefill, see below).

        Only tokens that were computed by a multi-token prefill are kept unless `generated`: quantized
        MatMulNBits kernels compute a one-token step (decode) differently from a multi-token one (measured on
        the 135M int4 export: up to 0.7 apart in the logits of the same position), while multi-token chunks
        agree exactly however the prompt is split. Keeping only prefill-computed keys and values makes a
        reused prefix give bit for bit what a fresh prefill of the whole prompt gives; a conversation then
        prefills the last answer again with the new turn. generated=True keeps the answer's decode-computed
        keys and values too: faster, but not identical to a fresh prefill on quantized exports."""
        keep = min(common_prefix(self.tokens, prompt_ids), max(len(prompt_ids) - 2, 0))
        if not generated:
            keep = min(keep, self.prefilled)
        self.truncate(keep)
        return self.length

    def truncate(self, length: int) -> None:
        if length >= self.length:
            return
        self.tokens = self.tokens[:length]
        self.prefilled = min(self.prefilled, length)
        if self.cache is not None:
            self.cache = self.cache.truncated(length)

    def reserve(self, needed: int) -> None:
        """Makes room for `needed` tokens in all: allocates the buffer, or grows it (doubling, rounded up to
        CAPACITY_STEP, at most `limit`) with the cached positions copied over."""
        if self.cache is None:
            first = needed
            if getattr(self.decoder, "cache_device", None) == "cpu":
                first = max(needed, CPU_FIRST_CAPACITY)
            self.cache = self.decoder.empty_cache(1, capacity=self._capacity_for(first, 0))
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
        if not ids:
            raise ValueError("nothing to run: the prompt adds no tokens")
        logits = None
        step = getattr(self.decoder, "prefill_chunk", None) or PREFILL_CHUNK
        for chunk in prefill_chunks(ids, step):
            logits, self.cache, _ = extend(self.decoder, self.cache, self.length, chunk, len(chunk))
            if len(chunk) > 1 and self.prefilled == self.length:
                self.prefilled += len(chunk)
            self.tokens += chunk
        return logits

    def verify(self, ids: Sequence[int]) -> np.ndarray:
        """Runs `ids` (a sampled token and a draft after it) as one step; returns the logits of every one of
        its positions, [len(ids), vocab]: row i predicts the token after ids[i]. The caller truncates the
        draft tokens it rejects."""
        length = self.length
        end = length + len(ids)
        chunk = np.asarray([ids], dtype=np.int64)
        positions = np.arange(length, end, dtype=np.int64)[None, :]
        logits, self.cache = self.decoder.forward(
            chunk, ones_mask(end), positions, self.cache, logits_to_keep=0
        )
        if len(ids) > 1 and self.prefilled == self.length:
            self.prefilled += len(ids)
        self.tokens += list(ids)
        return logits[0, -len(ids) :]

    def decode(self, token: int) -> np.ndarray:
        """Feeds one token; returns its logits."""
        logits, self.cache, _ = decode_one_token(self.decoder, token, self.cache, self.length)
        self.tokens.append(token)
        return logits

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Feeds generated tokens: one decode step for one token, one multi-token step for several (a sampled
        token and those its grammar forces after it). Returns the last one's logits."""
        return self.decode(tokens[0]) if len(tokens) == 1 else self.extend(tokens)
