"""The generation loop as small functions over a decoder (gpt-fast style): prefill, decode_one_token and a
bare token loop (`generate_tokens`).

A decoder is anything with `empty_cache(batch, capacity=None)` and `forward(input_ids, attention_mask,
position_ids, past)` (see session.OnnxDecoder), so the loop is testable with a stub. `capacity` (prompt +
answer length) lets a decoder allocate its cache once; one that ignores it may grow its cache instead.
Generation is batch 1 without padding, so the attention mask is all ones and positions are 0..n-1;
`position_ids_from_mask` covers padded batches. The per-sequence state (sampling, stops, stats) and the loop
that streams text are in sequence.py.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from .errors import ContextLengthError, RequestError
from .sampling import Sampler

# Prompt tokens per forward call when the decoder names none (`prefill_chunk`). Older graphs (without
# `logits_to_keep`) return logits for every input position, so a long prompt in one call would need
# seq * vocab * 4 bytes (8k tokens x 49k vocab = 1.6 GB); chunks bound that at ~100 MB.
PREFILL_CHUNK = 512

FinishReason = Literal["stop", "length"]


class Decoder(Protocol):
    def empty_cache(self, batch: int = 1, capacity: int | None = None) -> list[np.ndarray]: ...

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence,
        logits_to_keep: int = 0,
    ) -> tuple[np.ndarray, list]: ...


@dataclass
class GenerationStats:
    """Filled in while a stream runs; finish_reason stays None if the caller stops reading early."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from a kept cache, not a prefill
    completion_tokens: int = 0  # tokens sampled, including a final eos token
    finish_reason: FinishReason | None = None
    ttft_s: float = 0.0  # prefill + first sample: time until the first token id exists
    decode_tok_s: float = 0.0  # tokens per second after the first
    total_s: float = 0.0
    draft_tokens: int = 0  # speculation: tokens drafted (prompt lookup or a draft model), and those kept
    accepted_tokens: int = 0


def position_ids_from_mask(attention_mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Positions for the last `seq_len` columns of a left-padded mask: count of real tokens so far, minus 1
    (0 at padding), matching what the exported graph was traced with."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions = np.where(attention_mask == 0, 0, positions)
    return positions[:, -seq_len:].astype(np.int64)


def ones_mask(length: int) -> np.ndarray:
    """An all-ones attention mask [1, length] for an unpadded sequence: a view of one shared array, grown by
    doubling, so that a decode step allocates nothing that grows with the text. Read-only."""
    global _ONES
    if _ONES.shape[1] < length:
        _ONES = np.ones((1, max(length, 2 * _ONES.shape[1])), dtype=np.int64)
        _ONES.flags.writeable = False
    return _ONES[:, :length]


_ONES = np.ones((1, 0), dtype=np.int64)


def prefill_chunks(ids: Sequence[int], chunk_size: int) -> list[list[int]]:
    """`ids` in chunks of at most `chunk_size` (one more when chunk_size is 2), never a single token when
    there are more: quantized kernels compute a one-token call like a decode step, not like a prefill
    (kv_state.py)."""
    ids = list(ids)
    chunk_size = max(chunk_size, 2)
    chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        if len(chunks[-2]) > 2:
            chunks[-2:] = [chunks[-2][:-1], chunks[-2][-1:] + chunks[-1]]
        else:  # chunks of two: one chunk of three rather than a single token
            chunks[-2:] = [chunks[-2] + chunks[-1]]
    return chunks


def extend(
    decoder: Decoder, cache: list, length: int, ids: Sequence[int], chunk_size: int | None = None
) -> tuple[np.ndarray, list, int]:
    """Feeds `ids` after `length` cached tokens, in chunks: returns the last position's logits, the cache and
    its new length. `prefill` is this on an empty cache; a conversation extends the cache it already has."""
    if len(ids) == 0:
        raise RequestError("the prompt is empty: at least one token is needed to start generation")
    chunk_size = chunk_size or getattr(decoder, "prefill_chunk", PREFILL_CHUNK)
    for part in prefill_chunks(ids, chunk_size):
        chunk = np.asarray([part], dtype=np.int64)
        end = length + chunk.shape[1]
        positions = np.arange(length, end, dtype=np.int64)[None, :]
        logits, cache = decoder.forward(chunk, ones_mask(end), positions, cache, logits_to_keep=1)
        length = end
    return logits[0, -1], cache, length


def prefill(
    decoder: Decoder, ids: Sequence[int], chunk_size: int | None = None, capacity: int | None = None
) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Runs the prompt through the model: returns the last position's logits, the cache, and its length.
    `capacity` (prompt + tokens to come) lets the decoder allocate its cache once for the whole sequence.
    `chunk_size`: prompt tokens per call; by default the decoder's `prefill_chunk`, else PREFILL_CHUNK."""
    if len(ids) == 0:
        raise RequestError("the prompt is empty: at least one token is needed to start generation")
    # Decoders written to the plain `empty_cache(batch)` contract keep working when no capacity is asked for.
    cache = decoder.empty_cache(1) if capacity is None else decoder.empty_cache(1, capacity=capacity)
    return extend(decoder, cache, 0, ids, chunk_size)


def decode_one_token(
    decoder: Decoder, token: int, cache: list[np.ndarray], length: int
) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Feeds one token after `length` cached ones: returns its logits, the grown cache and the new length."""
    input_ids = np.array([[token]], dtype=np.int64)
    positions = np.array([[length]], dtype=np.int64)
    logits, cache = decoder.forward(input_ids, ones_mask(length + 1), positions, cache)
    return logits[0, -1], cache, length + 1


def generate_tokens(
    decoder: Decoder, prompt_ids: Sequence[int], sampler: Sampler, max_new_tokens: int
) -> Generator[int, None, None]:
    """Yields sampled token ids. The next forward pass runs only when the caller asks for another token,
    so stopping on eos costs no wasted step."""
    if max_new_tokens <= 0:
        return
    logits, cache, length = prefill(decoder, prompt_ids, capacity=len(prompt_ids) + max_new_tokens)
    for i in range(max_new_tokens):
        token = sampler(logits)
        yield token
        if i + 1 < max_new_tokens:
            logits, cache, length = decode_one_token(decoder, token, cache, length)


def fit_to_context(prompt_tokens: int, max_new_tokens: int, context_length: int | None) -> int:
    """max_new_tokens clamped so prompt + completion fits the context; an overlong prompt is an error."""
    if max_new_tokens < 0:
        raise RequestError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_length is None:
        return max_new_tokens
    if prompt_tokens >= context_length:
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens but the model's context length is "
            f"{context_length} tokens, which leaves no room to generate; shorten the prompt"
        )
    return min(max_new_tokens, context_length - prompt_tokens)
