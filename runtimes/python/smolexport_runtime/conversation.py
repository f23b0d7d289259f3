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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RequestError, SmolexportRuntimeError
from .generate import GenerationStats, fit_to_context
from .kv_cache import GrowingCache
from .kv_state import CacheState
from .manifest import is_weight_data
from .prompt_cache import PromptCacheError, read_prompt_cache, refuse_foreign_file, write_prompt_cache
from .sampling import SamplingConfig
from .sequence import SequenceState, run_sequence
from .session import KVBuffers
from .speculation import Drafter, DraftModel, PromptLookup, check_speculation, new_draft_state

if TYPE_CHECKING:
    from .model import Model, Prompt


class ConversationBusyError(SmolexportRuntimeError):
    """A conversation runs one generation at a time."""


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
        self._draft: tuple[Model, CacheState] | None = None  # a draft model and its cache, kept across turns
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
            self._draft = None

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
        draft_model: Model | None = None,
        draft_tokens: int = 3,
    ) -> Iterator[str]:
        """Yields the completion piece by piece. Greedy unless temperature > 0; stats land in `last_stats`.
        `response_format` (a JSON Schema, a Pydantic model class, {"type": "json_object" | "json_schema" |
        "regex" | "lark", ...}) constrains the answer to it (constraints.py). `prompt_lookup=N` (greedy
        only): each step also checks up to N tokens copied from where the text's last tokens appeared before
        (prompt lookup decoding), all in one forward pass: faster on answers that quote or rewrite their
        input; the same tokens as plain greedy on float exports (see sequence.run_sequence). `draft_model`
        (greedy only): a smaller model with the same tokenizer drafts `draft_tokens` tokens a step, checked
        likewise (speculation.py)."""
        check_speculation(self.model, prompt_lookup, draft_model, draft_tokens)
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, greedy=greedy)
        sampler = self.model.sampler(sampling, response_format)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        ids = self.model.encode(prompt, chat)
        if not ids:
            raise RequestError("the prompt is empty: at least one token is needed to start generation")
        max_new_tokens = fit_to_context(len(ids), max_new_tokens, self.model.context_length)
        sequence = SequenceState.create(
            sampler, self.model.tokenizer, len(ids), max_new_tokens, self.model.eos_token_ids, stops
        )
        self.last_stats = self.model.last_stats = sequence.stats
        return self._run(ids, sequence, prompt_lookup, draft_model, draft_tokens)

    def generate(self, prompt: Prompt, **kwargs: Any) -> str:
        return "".join(self.stream(prompt, **kwargs))

    def _run(
        self,
        ids: list[int],
        sequence: SequenceState,
        prompt_lookup: int,
        draft_model: Model | None,
        draft_tokens: int,
    ) -> Iterator[str]:
        # The conversation is claimed at the first piece asked for, not when stream() is called: a stream
        # that is never read holds nothing.
        with self._claim(self._fall_back_when_busy) as state:
            drafter: Drafter | None = PromptLookup(prompt_lookup) if prompt_lookup else None
            if draft_model is not None:
                drafter = DraftModel(draft_model, draft_tokens, self._draft_state(draft_model, state))
            yield from run_sequence(state, sequence, ids, self.reuse_generated, drafter)

    def _draft_state(self, draft_model: Model, state: CacheState) -> CacheState:
        """The draft model's cache: kept with the conversation's (a fresh one for a fallback stream)."""
        if state is not self.state:
            return new_draft_state(draft_model)
        if self._draft is None or self._draft[0] is not draft_model:
            self._draft = (draft_model, new_draft_state(draft_model))
        return self._draft[1]

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
    return [np.ascontiguousarray(a[0, :, :length]) for a in state.cache.host_arrays()]


def _fill_cache(state: CacheState, arrays: list[np.ndarray]) -> None:
    length = arrays[0].shape[1]
    if isinstance(state.cache, KVBuffers) and state.cache.arrays is not None:  # CPU buffers: write in place
        for buffer, saved in zip(state.cache.arrays, arrays, strict=True):
            buffer[0, :, :length] = saved
    elif state.capacity is None:  # a cache that grows by copying: the saved arrays are the cache
        state.cache = GrowingCache(saved[None].copy() for saved in arrays)
    else:  # a GPU buffer: rebuilt from the host, once per load
        host = GrowingCache(saved[None] for saved in arrays)
        state.cache = state.decoder.grow_cache(host, length, state.capacity)
