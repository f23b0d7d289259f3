"""The ways a decoder holds a sequence's keys and values, behind one small interface.

`CacheState` (kv_state.py) keeps whatever cache its decoder hands out and needs three things from it: how many
positions it can hold without growing (`capacity`), a version that forgets positions from some length on
(`truncated`), and its contents on the host (`host_arrays`, for prompt cache files). The variants:

- `session.KVBuffers`: one preallocated buffer per key/value that GroupQueryAttention reads and writes in
  place. A shorter length is just a shorter attention mask, so truncating changes nothing.
- `GrowingCache`: arrays (or OrtValues) that every step returns grown by a copy; truncating cuts them.
- `coreml.CoreMLCache`: a Core ML program's state and the length it holds.

A decoder written to the plain contract (`empty_cache` and `forward` returning lists of arrays, as the tests'
stubs do) gets `GrowingCache` semantics through `as_kv_cache`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class KVCache(Protocol):
    """A sequence's keys and values as a decoder holds them; passed back to `decoder.forward` as `past`."""

    @property
    def capacity(self) -> int | None:
        """Positions the cache holds without growing; None for a cache that grows by copying each step."""
        ...

    def truncated(self, length: int) -> KVCache:
        """This cache without positions `length` and later (may be `self`, changed or not)."""
        ...

    def host_arrays(self) -> list[np.ndarray]:
        """Each key and value as a [batch, kv_heads, positions, head_dim] host array (a view where it can)."""
        ...


class GrowingCache(list):
    """Keys and values that each forward pass returns grown by a copy: a list of numpy arrays or OrtValues."""

    @property
    def capacity(self) -> None:
        return None

    def truncated(self, length: int) -> GrowingCache:
        return GrowingCache(np.ascontiguousarray(a[:, :, :length]) for a in self.host_arrays())

    def host_arrays(self) -> list[np.ndarray]:
        return [v if isinstance(v, np.ndarray) else v.numpy() for v in self]


def as_kv_cache(cache) -> KVCache | None:
    """A decoder's cache as a KVCache: the plain decoder contract returns lists of arrays."""
    if cache is None or isinstance(cache, KVCache):
        return cache
    return GrowingCache(cache)
