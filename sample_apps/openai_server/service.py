"""The model behind the server: one `Model` and the runtime's `BatchEngine`, no HTTP.

`ModelService` parses requests for its model (protocol.parse_request with its name and limits), refuses a prompt
that does not fit before it waits in the queue, submits generations and books them in `stats` (what /health
shows). `Generation` is a submitted generation's pieces as a plain iterator, for whatever thread reads them;
`cancel()` (from any thread) frees its engine slot at the engine's next step, `close()` waits for that.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smolexport_runtime import ContextLengthError, Model, SamplingConfig, SmolexportRuntimeError
from smolexport_runtime import tools as tool_calling
from smolexport_runtime.batching import BatchEngine, BatchRequest, EngineStoppedError, QueueFullError
from smolexport_runtime.constraints import ConstraintError

from .protocol import ApiError, GenerationRequest, invalid, model_card, parse_request, server_busy


@dataclass
class ServiceStats:
    requests: int = 0  # generations started
    finished: int = 0  # generations that ended (done, stopped, or abandoned by their client)
    cancelled: int = 0  # generations stopped because the client went away
    tokens_done: int = 0  # tokens of ended generations
    running: dict = field(default_factory=dict)  # id -> GenerationStats of the generations under way


@dataclass
class ModelService:
    """The model behind a BatchEngine: up to `max_batch` generations run together, `max_queue` may wait."""

    model: Model
    name: str
    default_max_tokens: int = 512
    default_temperature: float = 0.7
    max_batch: int = 8
    max_queue: int = 64
    context: int | None = None  # tokens per slot; None: BatchEngine's default (2,048, or the model's if shorter)
    # Speculative decoding for a greedy request decoding alone (BatchEngine, speculation.py).
    prompt_lookup: int = 0
    draft_model: Model | None = None
    draft_tokens: int = 3
    created: int = field(default_factory=lambda: int(time.time()))
    stats: ServiceStats = field(default_factory=ServiceStats)

    def __post_init__(self) -> None:
        self.engine = BatchEngine(
            self.model,
            max_batch=self.max_batch,
            max_queue=self.max_queue,
            context=self.context,
            prompt_lookup=self.prompt_lookup,
            draft_model=self.draft_model,
            draft_tokens=self.draft_tokens,
        ).start()
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        self.engine.stop()

    @property
    def context_length(self) -> int:
        """Tokens a request may use (prompt + answer): what one slot holds."""
        return self.engine.context or 1 << 30

    @property
    def tokens_generated(self) -> int:
        """Tokens generated so far, counting the running generations live."""
        with self._stats_lock:
            running = sum(s.completion_tokens for s in self.stats.running.values())
            return self.stats.tokens_done + running

    def card(self) -> dict[str, Any]:
        return model_card(self.name, self.created)

    def health(self) -> dict[str, Any]:
        running = self.engine.running
        return {
            "status": "ok",
            "model": self.name,
            "busy": running > 0,
            "running": running,
            "queued": self.engine.waiting,
            "requests": self.stats.requests,
            "tokens_generated": self.tokens_generated,
        }

    def parse(self, body: dict, chat: bool) -> GenerationRequest:
        return parse_request(
            body,
            chat,
            model=self.name,
            context_length=self.context_length,
            default_max_tokens=self.default_max_tokens,
            default_temperature=self.default_temperature,
        )

    def check_prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids; a prompt that does not fit is refused before it waits in the queue."""
        try:
            ids = self.model.encode(request.prompt, chat=request.chat)
        except SmolexportRuntimeError as exc:
            raise ApiError(400, str(exc), param="messages" if request.chat else "prompt") from None
        if not ids:
            raise invalid("prompt", "the prompt is empty")
        if len(ids) >= self.context_length:
            raise ApiError(
                400,
                f"this server's maximum context length is {self.context_length} tokens (prompt and answer), "
                f"but the prompt is {len(ids)} tokens; shorten it",
                param="messages" if request.chat else "prompt",
                code="context_length_exceeded",
            )
        return ids

    def start(self, request: GenerationRequest, ids: list[int]) -> Generation:
        """Submits a generation (503 past the queue). Always `close()` what it returns, read or not.

        Under tool_choice "auto", SmolLM2's trained answer for "no tool needed" is an empty call list; the
        client asked for text in that case, so the generation then answers the same prompt again under
        tool_choice "none" (its slot still holds the prompt's cache) and returns that text instead."""
        submitted = self._submit(request, ids, request.response_format)
        follow_up = None
        if request.tools and request.tool_choice == "auto":
            text_only = tool_calling.grammar(request.tools, "none")
            follow_up = lambda: self._submit(request, ids, text_only)  # noqa: E731
        return Generation(self, submitted, follow_up)

    def _submit(self, request: GenerationRequest, ids: list[int], response_format: Any) -> BatchRequest:
        try:
            options = request.sampling()
            sampling = SamplingConfig(temperature=options["temperature"], top_p=options["top_p"], seed=options["seed"])
            submitted = self.engine.submit(
                ids, sampling, options["max_new_tokens"], request.stop, response_format=response_format
            )
        except QueueFullError:
            raise server_busy() from None
        except EngineStoppedError:
            raise server_busy("the server is shutting down") from None
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        except ConstraintError as exc:
            param = "tools" if request.tools else "response_format"
            raise ApiError(400, str(exc), param=param, code="unsupported_schema") from None
        except (SmolexportRuntimeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.running[id(submitted)] = submitted.stats
        return submitted

    def book(self, submitted: BatchRequest, cancelled: bool) -> None:
        with self._stats_lock:
            self.stats.running.pop(id(submitted), None)
            self.stats.finished += 1
            self.stats.cancelled += cancelled
            self.stats.tokens_done += submitted.stats.completion_tokens


# The answer SmolLM2 is trained to give under tool_choice "auto" when no tool is needed.
NO_CALLS = tool_calling.call_block([])


class Generation:
    """A running generation's pieces. `cancel()` stops it (any thread, never blocks); `close()` also waits for
    the engine to let go of it and books it in the service's stats, also when it was never read. Closing twice
    is harmless; a generation stopped before its end counts as cancelled.

    With `follow_up` (tool_choice "auto"), an answer that is the empty call list is not passed on: the pieces
    that could still become it are held, and if it ends so, `follow_up()` submits the text answer that
    replaces it."""

    def __init__(
        self, service: ModelService, submitted: BatchRequest, follow_up: Callable[[], BatchRequest] | None = None
    ) -> None:
        self._service, self._submitted = service, submitted
        self._pieces = submitted.pieces()
        self._follow_up = follow_up
        self._held = ""  # the start of an answer that may be NO_CALLS
        self._earlier_tokens = 0  # tokens of a replaced answer: usage counts every token generated
        self._abandoned = False
        self._stopped = False  # cancelled or closed: no follow-up starts after this
        self._closed = False
        self._lock = threading.Lock()

    @property
    def stats(self) -> Any:
        """The runtime's GenerationStats: live while it runs, final once the pieces ended."""
        stats = self._submitted.stats
        if not self._earlier_tokens:
            return stats
        return dataclasses.replace(stats, completion_tokens=stats.completion_tokens + self._earlier_tokens)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        if self._abandoned or self._closed:
            raise StopIteration  # cancelled: stop now rather than at the engine's next step
        try:
            return self._next_piece()
        except BaseException:
            self.close()
            raise

    def _next_piece(self) -> str:
        while True:
            piece = next(self._pieces, None)
            if piece is None:  # this answer ended
                held, self._held = self._held, ""
                if held == NO_CALLS and self._follow_up is not None:
                    self._replace()
                    continue
                if held:
                    return held  # a prefix of NO_CALLS cut short: the next call ends the iteration
                raise StopIteration
            if self._follow_up is None:
                return piece
            self._held += piece
            if not NO_CALLS.startswith(self._held):
                self._follow_up = None  # text or calls: everything passes from now on
                held, self._held = self._held, ""
                return held

    def _replace(self) -> None:
        """Books the empty-call answer and submits its text replacement, unless the client left meanwhile."""
        follow_up, self._follow_up = self._follow_up, None
        with self._lock:
            if self._stopped:
                raise StopIteration
            first = self._submitted
            self._submitted = follow_up()  # type: ignore[misc]
            self._pieces = self._submitted.pieces()
        self._earlier_tokens += first.stats.completion_tokens
        self._service.book(first, cancelled=False)

    def cancel(self) -> None:
        with self._lock:
            self._stopped = True
            submitted = self._submitted
        if not submitted.done.is_set():
            self._abandoned = True
        submitted.cancel()  # a no-op for a finished generation

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.cancel()  # after it no follow-up replaces self._submitted
        self._submitted.done.wait()  # the engine frees the slot at its next step
        self._service.book(self._submitted, cancelled=self._abandoned)
