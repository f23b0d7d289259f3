"""Conversations: a KV cache kept across calls, so each turn pays only for its new tokens.

`Model.stream(history)` runs on the model's own conversation: an app that passes the whole history every
turn (as docs/embedding.md shows) gets prefix reuse without changing a line. An app that holds several
independent chats makes one `model.conversation()` each. Reuse is decided on token ids alone (the longest
common prefix of what the cache holds and the new prompt), so it is exact whatever the app did in between:
a stop string that cut the last answer, a stream closed mid-way, an error, or old turns dropped to fit the
context (the system prompt's tokens are still reused).

A prompt cache file (`save_prefix` / `load_prefix` / `warm_start`) keeps a prefix's keys and values on disk so
a new process does not pay again for a long, fixed system prompt. It is keyed by the export's weight
checksums and holds the token ids; loading it into another export is refused.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RequestError, SmolexportRuntimeError
from .generate import GenerationStats, fit_to_context, stream_tokens
from .kv_state import CacheState
from .manifest import is_weight_data
from .prompt_cache import PromptCacheError, read_prompt_cache, refuse_foreign_file, write_prompt_cache
from .sampling import Sampler, SamplingConfig, greedy

if TYPE_CHECKING:
    from .model import Model, Prompt


class ConversationBusyError(SmolexportRuntimeError):
    """A conversation runs one generation at a time."""


def generate_cached(
    state: CacheState,
    prompt_ids: Sequence[int],
    sampler: Sampler,
    max_new_tokens: int,
    stats: GenerationStats,
    reuse_generated: bool = False,
    prompt_lookup: int = 0,
) -> Generator[int, None, None]:
    """`generate_tokens` on a kept cache: prefills only what the cache does not hold yet."""
    if max_new_tokens <= 0:
        return
    stats.cached_tokens = state.reuse(prompt_ids, reuse_generated)
    state.reserve(len(prompt_ids) + max_new_tokens)
    logits = state.extend(prompt_ids[state.length :])
    forced = getattr(sampler, "forced", None)  # a ConstrainedSampler: tokens its grammar forces next
    lookup = prompt_lookup if sampler is greedy and forced is None else 0
    produced = 0
    while True:
        step = [sampler(logits)]
        if forced is not None:
            step += forced(max_new_tokens - produced - 1)
        draft = (
            draft_from_context(state.tokens + step, lookup, max_new_tokens - produced - 1) if lookup else []
        )
        if draft:
            # Prompt lookup: the token and a draft copied from earlier text run as one step; the draft is
            # kept up to its first token that greedy decoding would not have chosen.
            rows = state.verify([*step, *draft])
            accepted = 0
            while accepted < len(draft) and int(np.argmax(rows[accepted])) == draft[accepted]:
                accepted += 1
            state.truncate(state.length - (len(draft) - accepted))
            stats.draft_tokens += len(draft)
            stats.accepted_tokens += accepted
            step += draft[:accepted]
            logits = rows[accepted]
        yield from step
        produced += len(step)
        if produced >= max_new_tokens:
            return
        if draft:
            continue
        # Forced tokens (a schema's fixed keys and punctuation) run as one multi-token step.
        logits = state.decode(step[0]) if len(step) == 1 else state.extend(step)


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


class Conversation:
    """One sequence's KV cache, kept between calls. `stream` and `generate` take the same arguments as
    `Model.stream`; pass the whole history each time. One generation at a time per conversation."""

    def __init__(
        self, model: Model, *, reuse_generated: bool = False, fall_back_when_busy: bool = False
    ) -> None:
        self.model = model
        self.reuse_generated = reuse_generated  # also reuse answers' keys and values: see CacheState.reuse
        self.state = CacheState(model.decoder, limit=model.context_length)
        self.last_stats: GenerationStats | None = None
        # The model's own conversation serves a second concurrent stream from a fresh, unkept cache instead
        # of refusing it: Model.stream from two threads worked before conversations existed.
        self._fall_back_when_busy = fall_back_when_busy
        self._lock = threading.Lock()
        self._busy = False

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys and values the cache holds now."""
        return self.state.length

    def reset(self) -> None:
        """Drops the cache and frees its memory (the next call prefills from scratch)."""
        with self._claim(fall_back=False):
            self.state.reset()

    def stream(
        self,
        prompt: Prompt,
        *,
        chat: bool | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        greedy: bool = False,
        stop: str | Sequence[str] | None = None,
        response_format: Any = None,
        prompt_lookup: int = 0,
    ) -> Iterator[str]:
        """Yields the completion piece by piece. Greedy unless temperature > 0; stats land in `last_stats`.
        `response_format` (a JSON Schema, a Pydantic model class, {"type": "json_object" | "json_schema" |
        "regex" | "lark", ...}) constrains the answer to it (constraints.py). `prompt_lookup=N` (greedy
        only): each step also checks up to N tokens copied from where the text's last tokens appeared before
        (prompt lookup decoding), all in one forward pass: faster on answers that quote or rewrite their
        input; the same tokens as plain greedy on float exports (see generate_cached)."""
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, greedy=greedy)
        sampler = self.model.sampler(sampling, response_format)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        ids = self.model.encode(prompt, chat)
        if not ids:
            raise RequestError("the prompt is empty: at least one token is needed to start generation")
        max_new_tokens = fit_to_context(len(ids), max_new_tokens, self.model.context_length)
        stats = GenerationStats()
        self.last_stats = self.model.last_stats = stats
        tokens = self._tokens(ids, sampler, max_new_tokens, stats, prompt_lookup)
        return stream_tokens(tokens, self.model.tokenizer, ids, stops, self.model.eos_token_ids, stats)

    def generate(self, prompt: Prompt, **kwargs: Any) -> str:
        return "".join(self.stream(prompt, **kwargs))

    def _tokens(
        self,
        ids: list[int],
        sampler: Sampler,
        max_new_tokens: int,
        stats: GenerationStats,
        prompt_lookup: int = 0,
    ) -> Generator[int, None, None]:
        # The conversation is claimed at the first token asked for, not when stream() is called: a stream
        # that is never read holds nothing.
        with self._claim(self._fall_back_when_busy) as state:
            yield from generate_cached(
                state, ids, sampler, max_new_tokens, stats, self.reuse_generated, prompt_lookup
            )

    @contextmanager
    def _claim(self, fall_back: bool) -> Iterator[CacheState]:
        with self._lock:
            busy, self._busy = self._busy, True
        if busy:
            if not fall_back:
                raise ConversationBusyError(
                    "this conversation is already generating; read its stream to the end or close() it first "
                    "(or use one model.conversation() per concurrent chat)"
                )
            yield CacheState(self.model.decoder, limit=self.model.context_length)
            return
        try:
            yield self.state
        finally:
            with self._lock:
                self._busy = False

    # --- prompt cache files ---------------------------------------------------------------------------

    def save_prefix(self, path: str | Path, prompt: Prompt, *, chat: bool | None = None) -> int:
        """Runs `prompt` (a string, or messages such as the system prompt alone) and writes its keys and
        values to `path`. Returns the number of tokens saved. Messages are rendered without the assistant's
        generation prompt, so that the saved ids are a prefix of every later conversation that starts so."""
        path = Path(path)
        refuse_foreign_file(path)  # before the prefill, not after
        ids = self.model.encode(prompt, chat, add_generation_prompt=False)
        if not ids:
            raise RequestError("the prompt is empty: nothing to save")
        fit_to_context(len(ids), 1, self.model.context_length)
        with self._claim(fall_back=False) as state:
            # Keeps what the cache holds of ids, computed as a prefill (see CacheState.reuse).
            state.reuse(ids)
            state.reserve(len(ids))
            if state.length < len(ids):
                state.extend(ids[state.length :])
            arrays = _cache_arrays(state, len(ids))
        write_prompt_cache(path, self._key(), ids, arrays)
        return len(ids)

    def load_prefix(self, path: str | Path) -> int:
        """Loads a prompt cache file into this conversation (replacing what it held). Returns its token count.
        Raises PromptCacheError if the file is damaged or was saved for another export."""
        ids, arrays = read_prompt_cache(Path(path), self._key())
        fit_to_context(len(ids), 1, self.model.context_length)
        self._install(ids, arrays)
        return len(ids)

    def warm_start(self, path: str | Path, prompt: Prompt, *, chat: bool | None = None) -> bool:
        """Loads `path` if it holds `prompt`'s prefix for this export; else computes it and saves it there
        (a missing, stale or damaged prompt cache file is rewritten;
        any other file is refused). Returns True when the file was used."""
        path = Path(path)
        ids = self.model.encode(prompt, chat, add_generation_prompt=False)
        if path.is_file():
            try:
                saved, arrays = read_prompt_cache(path, self._key())
            except PromptCacheError:
                saved = None
            if saved == ids:
                self._install(ids, arrays)
                return True
        self.save_prefix(path, prompt, chat=chat)
        return False

    def _install(self, ids: list[int], arrays: list[np.ndarray]) -> None:
        """Replaces the cache with a saved prefix (computed by a prefill when it was saved)."""
        with self._claim(fall_back=False) as state:
            state.reset()
            state.reserve(len(ids))
            _fill_cache(state, arrays)
            state.tokens, state.prefilled = list(ids), len(ids)

    def _key(self) -> dict[str, Any]:
        manifest = self.model.manifest
        if manifest is None:
            raise PromptCacheError("prompt cache files need a model loaded from an export folder")
        weights = {name: entry["sha256"] for name, entry in sorted(manifest.files.items())
                   if name == manifest.graph_file or is_weight_data(name)}  # fmt: skip
        spec = manifest.model
        return {
            "weights_sha256": weights,
            "kv_dtype": manifest.kv_dtype,
            "kv_shape": [spec.num_layers, spec.num_kv_heads, spec.head_dim],
        }


def _cache_arrays(state: CacheState, length: int) -> list[np.ndarray]:
    """The first `length` positions of each key/value as [kv_heads, length, head_dim] arrays."""
    arrays = getattr(state.cache, "arrays", None)
    if arrays is None:
        arrays = [v if isinstance(v, np.ndarray) else v.numpy() for v in state.cache]
    return [np.ascontiguousarray(a[0, :, :length]) for a in arrays]


def _fill_cache(state: CacheState, arrays: list[np.ndarray]) -> None:
    length = arrays[0].shape[1]
    buffers = getattr(state.cache, "arrays", None)
    if buffers is not None:
        for buffer, saved in zip(buffers, arrays, strict=True):
            buffer[0, :, :length] = saved
    elif state.capacity is None:  # a cache that grows by copying: the saved arrays are the cache
        state.cache = [saved[None].copy() for saved in arrays]
    else:  # a GPU buffer: rebuilt from the host, once per load
        state.cache = state.decoder.grow_cache(_HostCache(arrays, state.capacity), length, state.capacity)


class _HostCache(list):
    """Saved arrays dressed as a preallocated cache, for `grow_cache` to copy onto a device."""

    def __init__(self, arrays: list[np.ndarray], capacity: int) -> None:
        super().__init__()
        self.arrays = [a[None] for a in arrays]
        self.capacity = capacity
        self.batch = 1
