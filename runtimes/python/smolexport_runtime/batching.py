"""Continuous batching: every running generation advances by one token in one forward pass.

The unit of concurrency is a slot (as in llama.cpp's server): one row of a batched KV cache, holding one
sequence and the token ids it has cached. A request waits in a bounded queue until a slot is free, is
prefilled into its slot (one chunk of prompt tokens per engine step, shared by short prompts, so a long
prompt never stalls the others for long), then joins the batch; it leaves when it stops (eos, a stop string,
its token limit) or is cancelled, and its slot keeps the cache: a follow-up request of the same conversation
goes to the slot holding the longest common prefix of its prompt and prefills only the rest. Idle slots are
reused least recently used first.

Rows of the batch are right-padded: GroupQueryAttention reads each row's length from its attention mask,
writes the new key and value at that position, and rotates by it, so rows of different lengths decode
together and give the same logits as each alone (tests/runtime/test_batching.py). A row with nothing to decode
inside the batch's range is fed a filler token at its own length: the write lands past what the row holds
and is overwritten later, and its cached prefix stays intact.

Decoders without a CPU shared buffer (the standard-ops graph, a CUDA session, test stubs) still get slots,
queueing and prefix reuse; their slots decode one after another.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constraints import precompute_masks
from .errors import RequestError, SmolexportRuntimeError
from .generate import GenerationStats, fit_to_context, prefill_chunks
from .kv_state import CacheState, common_prefix
from .sampling import SamplingConfig
from .sequence import SequenceState, verify_draft
from .session import KVBuffers
from .speculation import Drafter, DraftModel, PromptLookup, check_speculation

_DONE = object()  # the end of a request's pieces
DEFAULT_CONTEXT = 2048  # tokens per slot unless asked otherwise (at most the model's context length)


class QueueFullError(SmolexportRuntimeError):
    """The engine's queue is full: retry later."""


class EngineStoppedError(SmolexportRuntimeError):
    """The engine was stopped: it takes no more requests."""


@dataclass
class BatchRequest:
    """A submitted generation. Iterate `pieces()` for its text; `stats` fills in as it runs."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.stats.prompt_tokens = len(self.prompt_ids)
        self.sequence: SequenceState | None = None  # sampler, stops, budget: set by BatchEngine.submit

    def cancel(self) -> None:
        """Stops the generation at the engine's next step and frees its slot; safe to call at any time."""
        self.cancelled = True

    def pieces(self, poll: Callable[[], bool] | None = None, interval: float = 0.05) -> Iterator[str]:
        """Yields the text as it is generated. `poll`, if given, is called while waiting; when it returns True
        (the client went away) the request is cancelled and the iteration ends. Raises the engine's error if
        the generation failed."""
        while True:
            try:
                item = self._events.get(timeout=interval if poll else None)
            except queue.Empty:
                if poll is not None and poll():
                    self.cancel()
                    return
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, item: object) -> None:
        self._events.put(item)


@dataclass(eq=False)
class Slot:
    row: int
    state: CacheState
    request: BatchRequest | None = None
    pending: list[int] = field(default_factory=list)  # prompt ids still to prefill
    # Tokens to feed: the one just sampled, and any its grammar forced after it (fed one a step while other
    # rows decode too, in one multi-token step when the row decodes alone).
    feed: list[int] = field(default_factory=list)
    last_used: float = 0.0
    drafter: Drafter | None = None  # speculation: made at the slot's first draft, kept with its cache


class BatchEngine:
    """Runs generations for many clients at once on one model. `start()` launches its thread; `submit()` from
    any thread. `max_batch` bounds the generations running together, `max_queue` those waiting for a slot;
    `slots` (at least max_batch) rows of cache are kept, so idle conversations keep their prefix a while;
    `context` bounds each slot's tokens; `reuse_generated` also reuses answers' keys and values (see
    CacheState.reuse). `prompt_lookup=N` or a `draft_model` (speculation.py): a greedy request decoding alone
    checks drafts in its steps (with several rows decoding, batching already shares the weight reads)."""

    def __init__(
        self,
        model,
        max_batch: int = 8,
        max_queue: int = 64,
        slots: int | None = None,
        context: int | None = None,
        reuse_generated: bool = False,
        prompt_lookup: int = 0,
        draft_model=None,
        draft_tokens: int = 3,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        check_speculation(model, prompt_lookup, draft_model, draft_tokens)
        self._new_drafter: Callable[[], Drafter] | None = None
        if prompt_lookup:
            self._new_drafter = lambda: PromptLookup(prompt_lookup)
        elif draft_model is not None:
            self._new_drafter = lambda: DraftModel(draft_model, draft_tokens)
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.reuse_generated = reuse_generated  # see CacheState.reuse
        decoder = model.decoder
        rows = max(slots or max_batch, max_batch)
        # Tokens a slot holds (prompt + answer): every slot gets a buffer this long, so it bounds the memory
        # (slots x context x the model's bytes per cached token; RSS grows only with what is written).
        # The model's full 8,192 would also slow every prefill: GroupQueryAttention's prompt path costs grow
        # with the buffer's length, and alternating with batched decode steps made each prefill take ~1.5 s
        # at 8,193 positions on the 135M model, against ~0.1 s at 2,049 (benchmarks/README.md).
        limit = model.context_length
        self.context = min(context or DEFAULT_CONTEXT, limit) if limit else context
        # One position past the context: a filler write at a full row's length still lands inside its row.
        capacity = self.context + 1 if self.context else None
        shared_cpu = getattr(decoder, "cache_device", None) == "cpu" and getattr(
            decoder, "shares_buffer", False
        )
        batch = decoder.empty_cache(rows, capacity=capacity) if capacity and shared_cpu else None
        self.batched = isinstance(batch, KVBuffers) and batch.arrays is not None
        self.cache = batch if self.batched else None
        self.slots = [
            Slot(row, CacheState(decoder, self.context, batch.rows(row, row + 1) if self.batched else None))
            for row in range(rows)
        ]
        self.eos = frozenset(model.eos_token_ids)
        self._waiting: deque[BatchRequest] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode forward passes, for tests and stats

    # --- the public side ------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(1 for s in self.slots if s.request is not None)

    def start(self) -> BatchEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="smolexport-batch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def submit(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig | None = None,
        max_new_tokens: int = 256,
        stop: str | Sequence[str] = (),
        response_format: Any = None,
    ) -> BatchRequest:
        """Queues a generation; raises QueueFullError past `max_queue` waiting requests, ContextLengthError
        for a prompt that does not fit (max_new_tokens is clamped to the context), ConstraintError for a
        `response_format` (see Model.sampler) that cannot be enforced."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise RequestError("the prompt is empty: at least one token is needed to start generation")
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        max_new_tokens = fit_to_context(len(prompt_ids), max_new_tokens, self.context)
        stops = [stop] if isinstance(stop, str) else list(stop)
        request = BatchRequest(prompt_ids, sampling or SamplingConfig(), max_new_tokens, stops)
        # Built here, so that a bad seed, stop string or format fails the caller, not the engine's thread.
        sampler = self.model.sampler(request.sampling, response_format)  # a grammar matcher each
        request.sequence = SequenceState.create(
            sampler, self.model.tokenizer, len(prompt_ids), max_new_tokens, self.eos, stops, request.stats
        )
        request.sequence.started = request.submitted
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the engine is stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting already; retry later")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    # --- the engine's thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._waiting or self.running, timeout=0.05)
                if self._stopping:
                    break
            try:
                with self._cond:
                    self._admit()
                self._step()
            except Exception as exc:  # a failed forward pass fails the requests in it, not the engine
                for slot in self.slots:
                    if slot.request is not None:
                        self._finish(slot, error=SmolexportRuntimeError(f"generation failed: {exc}"))
        for slot in self.slots:
            if slot.request is not None:
                self._finish(slot, error=SmolexportRuntimeError("the engine was stopped"))
        with self._cond:
            while self._waiting:
                request = self._waiting.popleft()
                request._put(SmolexportRuntimeError("the engine was stopped"))
                self._close(request)

    def _admit(self) -> None:
        """Moves waiting requests into free slots (called with the lock held)."""
        for request in [r for r in self._waiting if r.cancelled]:  # clients that left while queued
            self._waiting.remove(request)
            self._close(request)
        while self._waiting and self.running < self.max_batch:
            request = self._waiting.popleft()
            free = [s for s in self.slots if s.request is None]
            # The slot that holds most of this prompt; among equals, the least recently used.
            slot = max(free, key=lambda s: (common_prefix(s.state.tokens, request.prompt_ids), -s.last_used))
            try:
                request.stats.cached_tokens = slot.state.reuse(request.prompt_ids, self.reuse_generated)
                if not self.batched:  # e.g. a GPU buffer that cannot be allocated
                    slot.state.reserve(len(request.prompt_ids) + request.max_new_tokens)
            except Exception as exc:
                request._put(SmolexportRuntimeError(f"generation failed: {exc}"))
                self._close(request)
                continue
            slot.request = request
            slot.pending = request.prompt_ids[slot.state.length :]
            slot.feed = []

    def _step(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._finish(slot)
        # Prefill up to one chunk of prompt tokens per step, oldest request first, so that the running ones
        # keep decoding meanwhile; several short (or mostly cached) prompts share the step's chunk.
        prefilling = sorted((s for s in self.slots if s.request is not None and s.pending),
                            key=lambda s: s.request.submitted)  # fmt: skip
        budget = getattr(self.model.decoder, "prefill_chunk", 512)
        for slot in prefilling:
            if budget < 2:
                break
            chunk, *rest = prefill_chunks(slot.pending, budget)  # never one token unless the prompt is
            slot.pending = [t for part in rest for t in part]
            logits = slot.state.extend(chunk)
            budget -= len(chunk)
            if not slot.pending:
                self._emit(slot, logits)
        decoding = [s for s in self.slots if s.request is not None and s.feed]
        if not decoding:
            return
        self.steps += 1
        if len(decoding) == 1 and self._speculate(decoding[0]):
            return
        if len(decoding) == 1 or not self.batched:
            # Alone, a row runs all it has to feed (its forced tokens) as one step: the step reads the weights
            # once either way.
            for slot in decoding:
                feed, slot.feed = slot.feed, []
                self._emit(slot, slot.state.feed(feed))
            return
        # Together, every row feeds one token a step: forced tokens ride along in steps the batch runs anyway.
        # A multi-token step of its own for each row with forced tokens was no faster (8 constrained clients
        # on the 135M int4: 217 against 272 tokens/s, benchmarks/README.md). A row samples again only once
        # its feed is empty.
        rows = self._decode_batch(decoding)
        ready = [(slot, logits) for slot, logits in zip(decoding, rows, strict=True) if not slot.feed]
        # Every constrained row's grammar mask in one call, spread over the cores.
        precompute_masks([s.request.sequence.sampler for s, _ in ready if s.request.sequence.constrained])
        for slot, logits in ready:
            self._emit(slot, logits)

    def _decode_batch(self, decoding: list[Slot]) -> list[np.ndarray]:
        """One forward pass over rows 0..R (R: the highest decoding row); other rows in range get a filler."""
        rows = self.slots[: max(s.row for s in decoding) + 1]
        lengths = np.array([s.state.length for s in rows], dtype=np.int64)
        feeding = {id(s): s.feed.pop(0) for s in decoding}
        tokens = np.array([feeding.get(id(s), 0) for s in rows], dtype=np.int64)
        mask = (np.arange(lengths.max() + 1)[None, :] <= lengths[:, None]).astype(np.int64)
        logits, _ = self.model.decoder.forward(
            tokens[:, None], mask, lengths[:, None], self.cache.rows(0, len(rows))
        )
        for slot in decoding:
            slot.state.tokens.append(feeding[id(slot)])
        return [logits[s.row, -1] for s in decoding]

    def _speculate(self, slot: Slot) -> bool:
        """Feeds the slot's token with a draft after it in one step and keeps the draft up to its first token
        greedy would not have chosen (verify_draft, as run_sequence does). False when there is nothing to
        check."""
        sequence = slot.request.sequence
        if self._new_drafter is None or not sequence.drafts_allowed or len(slot.feed) != 1:
            return False
        if slot.drafter is None:
            slot.drafter = self._new_drafter()
        draft = slot.drafter.propose([*slot.state.tokens, *slot.feed], sequence.remaining)
        if not draft:
            return False
        piece, logits = verify_draft(slot.state, sequence, slot.feed, draft)
        slot.feed = []
        if piece:
            slot.request._put(piece)
        if sequence.finished:
            self._finish(slot)
        else:
            self._emit(slot, logits)
        return True

    def _emit(self, slot: Slot, logits: np.ndarray) -> None:
        """Samples the slot's next token (and any its grammar forces after it), hands their text to the
        client, and queues them to be fed at the next steps."""
        request = slot.request
        try:
            step = request.sequence.next_tokens(logits)
            piece = request.sequence.accept(step)
        except Exception as exc:  # e.g. a grammar that refuses its own forced tokens: this request only
            error = (
                exc
                if isinstance(exc, SmolexportRuntimeError)
                else SmolexportRuntimeError(f"generation failed: {exc}")
            )
            return self._finish(slot, error=error)
        if piece:
            request._put(piece)
        if request.sequence.finished:
            return self._finish(slot)
        slot.feed = step

    def _finish(self, slot: Slot, error: BaseException | None = None) -> None:
        """Frees the slot: the sequence finished (its text was handed over by _emit), was cancelled (its
        finish_reason stays None) or failed."""
        request = slot.request
        slot.request, slot.feed, slot.pending = None, [], []
        slot.last_used = time.perf_counter()
        if error is not None:
            request._put(error)
        self._close(request)

    def _close(self, request: BatchRequest) -> None:
        request.sequence.close()
        request.done.set()  # before the end marker: a reader that saw the end finds the request done
        request._put(_DONE)
