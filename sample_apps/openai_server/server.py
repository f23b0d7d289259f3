"""An OpenAI-compatible HTTP server for a smolexport export, on the standard library and the runtime only.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream`), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`. One model serves many clients at once: the runtime's BatchEngine decodes
every running request in one batched step (continuous batching: a request joins when its prefill is done and
leaves when it stops or its client goes away), and a conversation's follow-up request reuses its cached prefix.
Past `max_batch` running requests the rest wait in a bounded queue; past `max_queue` they get 503.

    server = make_server("exports/smollm2-135m-int4", port=8000)
    server.serve_forever()          # or serve("exports/smollm2-135m-int4") with a log line and Ctrl-C handling

Copy this file into your project: it needs `smolexport_runtime` and nothing else.
"""

from __future__ import annotations

import hmac
import json
import math
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from smolexport_runtime import ContextLengthError, Model, SamplingConfig, SmolexportRuntimeError, load
from smolexport_runtime import tools as tool_calling
from smolexport_runtime.batching import BatchEngine, BatchRequest, EngineStoppedError, QueueFullError
from smolexport_runtime.constraints import ConstraintError
from smolexport_runtime.tools import Tool

MAX_BODY_BYTES = 1_000_000  # requests over this get 413
DRAIN_FACTOR = 8  # a refused body up to 8x the limit is read and dropped, so that its client sees the 413
MAX_STOP_STRINGS = 16
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # not on Windows, where the poll before it suffices
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class ApiError(Exception):
    """An error answered with OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- requests -------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    prompt: str | list[dict[str, str]]
    chat: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    response_format: dict[str, Any] | None = None  # validated OpenAI shape, compiled at submit
    tools: list[Tool] | None = None  # with tools, `prompt` holds them and response_format is their grammar
    tool_choice: Any = None

    def sampling(self) -> dict[str, Any]:
        # top_p -> 0 narrows the nucleus to the single most likely token: greedy.
        greedy = self.temperature == 0 or self.top_p == 0
        return {
            "max_new_tokens": self.max_tokens,
            "temperature": 0.0 if greedy else self.temperature,
            "top_p": 1.0 if greedy else self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "chat": self.chat,
        }


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(key, f"{key} must be a number")
    if not low <= value <= high:
        raise _invalid(key, f"{key} must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(key, f"{key} must be an integer")
    if not low <= value <= high:
        raise _invalid(key, f"{key} must be between {low} and {high}, got {value}")
    return value


def _seed(body: dict) -> int | None:
    seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
    return None if seed is None else seed % 2**64  # numpy wants a non-negative seed


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("stop", "stop must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise _invalid("stop", f"stop takes at most {MAX_STOP_STRINGS} strings")
    return stops


def _text(value: str, param: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which is no text a tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(param, f"{param} holds an unpaired surrogate (\\ud800-\\udfff): not valid text") from None
    return value


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return _text(content, f"messages[{index}].content")
    if isinstance(content, list):  # content parts: only text is supported
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid(f"messages[{index}].content", "only text content parts are supported")
            texts.append(part["text"])
        return _text("".join(texts), f"messages[{index}].content")
    raise _invalid(f"messages[{index}].content", "content must be a string or a list of text parts")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(
            400, "you must provide a messages parameter", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "messages must be a non-empty list")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{i}]", "each message must be an object with role and content")
        role = message.get("role")
        role = ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise _invalid(f"messages[{i}].role", f"role must be one of {', '.join(ROLES)}")
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls:  # an earlier answer that called tools: its content may be null
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise _invalid(f"messages[{i}].tool_calls", "tool_calls must be a list of objects")
            content = message.get("content")
            text = "" if content is None else _message_text(content, i)
            result.append({"role": role, "content": text, "tool_calls": calls})
            continue
        result.append({"role": role, "content": _message_text(message.get("content"), i)})
    return result


# Request fields this server does not implement, refused with a 400 instead of being silently ignored (a client
# that relies on them would otherwise get free text and no signal).
UNSUPPORTED = ("functions", "function_call", "logit_bias")


def _tools(body: dict) -> tuple[list[Tool] | None, Any, bool]:
    """tools (SmolLM2's trained format, runtime tools.py), tool_choice and parallel_tool_calls."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _invalid("parallel_tool_calls", "parallel_tool_calls must be a boolean")
    if tools in (None, []):
        if choice not in (None, "none"):
            raise _invalid("tool_choice", "tool_choice needs tools")
        return None, None, parallel
    try:
        parsed = tool_calling.parse_tools(tools)
        tool_calling.grammar(parsed, "auto" if choice is None else choice, parallel)  # checks tool_choice
    except ConstraintError as exc:
        raise _invalid("tool_choice" if "tool_choice" in str(exc) else "tools", str(exc)) from None
    return parsed, "auto" if choice is None else choice, parallel


def _response_format(body: dict) -> dict[str, Any] | None:
    """OpenAI's response_format: text, json_object, or json_schema {name, schema, strict}."""
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise _invalid("response_format.json_schema", "json_schema must be an object with a 'schema' object")
        if not isinstance(spec.get("strict", False), bool):
            raise _invalid("response_format.json_schema.strict", "strict must be a boolean")
        # Enforced by the grammar whether or not strict is set: the answer always matches the schema.
        return {"type": "json_schema", "json_schema": {"schema": spec.get("schema", {})}}
    raise _invalid("response_format.type", "response_format.type must be 'text', 'json_object' or 'json_schema'")


def _refuse_unsupported(body: dict) -> None:
    for key in UNSUPPORTED:
        if body.get(key) not in (None, [], {}, "none"):
            raise ApiError(400, f"{key} is not supported by this server", param=key, code="unsupported_parameter")


def _completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if prompt is None:
        raise ApiError(400, "you must provide a prompt parameter", param="prompt", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise _invalid("prompt", "prompt must be a string (or a list of one string)")
    return _text(prompt, "prompt")


# --- the model behind the batching engine -------------------------------------------------------------


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
    created: int = field(default_factory=lambda: int(time.time()))
    stats: ServiceStats = field(default_factory=ServiceStats)

    def __post_init__(self) -> None:
        self.engine = BatchEngine(
            self.model, max_batch=self.max_batch, max_queue=self.max_queue, context=self.context
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

    def parse(self, body: dict, chat: bool) -> GenerationRequest:
        model = body.get("model")
        if model is None:
            raise ApiError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
        if model != self.name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )
        if body.get("n") not in (None, 1):
            raise _invalid("n", "only n=1 is supported")
        _refuse_unsupported(body)
        prompt = _messages(body) if chat else _completion_prompt(body)
        tools, tool_choice, parallel = _tools(body) if chat else (None, None, True)
        response_format = _response_format(body)
        if tools is not None:
            if response_format is not None:
                raise _invalid("response_format", "response_format and tools cannot be used together")
            try:
                prompt = tool_calling.render_messages(prompt, tools)
            except ConstraintError as exc:  # e.g. an earlier call whose arguments are not JSON
                raise _invalid("messages", str(exc)) from None
            response_format = tool_calling.grammar(tools, tool_choice, parallel)
        elif chat and any(m["role"] == "tool" or m.get("tool_calls") for m in prompt):
            raise _invalid("tools", "a history with tool calls or tool results needs the tools that made them")
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise _invalid("stream", "stream must be a boolean")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise _invalid("stream_options", "stream_options must be an object")
        return GenerationRequest(
            prompt=prompt,
            chat=chat,
            max_tokens=_integer(body, max_key, self.default_max_tokens, 1, self.context_length),  # type: ignore[arg-type]
            temperature=_number(body, "temperature", self.default_temperature, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
            seed=_seed(body),
            stop=_stop(body),
            stream=stream,
            include_usage=bool(options.get("include_usage")),
            response_format=response_format,
            tools=tools,
            tool_choice=tool_choice,
        )

    def check_prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids; a prompt that does not fit is refused before it waits in the queue."""
        try:
            ids = self.model.encode(request.prompt, chat=request.chat)
        except SmolexportRuntimeError as exc:
            raise ApiError(400, str(exc), param="messages" if request.chat else "prompt") from None
        if not ids:
            raise _invalid("prompt", "the prompt is empty")
        if len(ids) >= self.context_length:
            raise ApiError(
                400,
                f"this server's maximum context length is {self.context_length} tokens (prompt and answer), "
                f"but the prompt is {len(ids)} tokens; shorten it",
                param="messages" if request.chat else "prompt",
                code="context_length_exceeded",
            )
        return ids

    def start(
        self, request: GenerationRequest, ids: list[int], client_gone: Callable[[], bool]
    ) -> tuple[Generation, Any]:
        """Submits a generation: returns its pieces and its live GenerationStats. Always `close()` the pieces,
        read or not. They stop early, and free the slot, once `client_gone()` says the client has left."""
        try:
            options = request.sampling()
            sampling = SamplingConfig(temperature=options["temperature"], top_p=options["top_p"], seed=options["seed"])
            submitted = self.engine.submit(
                ids, sampling, options["max_new_tokens"], request.stop, response_format=request.response_format
            )
        except QueueFullError:
            raise ApiError(503, "the server is busy; retry later", type="server_error", code="server_busy") from None
        except EngineStoppedError:
            raise ApiError(503, "the server is shutting down", type="server_error", code="server_busy") from None
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
        return Generation(self, submitted, client_gone), submitted.stats

    def book(self, submitted: BatchRequest, cancelled: bool) -> None:
        with self._stats_lock:
            self.stats.running.pop(id(submitted), None)
            self.stats.finished += 1
            self.stats.cancelled += cancelled
            self.stats.tokens_done += submitted.stats.completion_tokens


class Generation:
    """A running generation's pieces. `close()` cancels it if it is still running, waits for the engine to let
    go of it, and books it in the service's stats, also when it was never read; closing twice is harmless."""

    def __init__(self, service: ModelService, submitted: BatchRequest, client_gone: Callable[[], bool]) -> None:
        self._service, self._submitted = service, submitted
        self._pieces = submitted.pieces(poll=client_gone)
        self._client_gone = client_gone
        self._closed = False

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        if self._closed:
            raise StopIteration
        try:
            piece = next(self._pieces)
            if self._client_gone():
                self._submitted.cancel()
                raise StopIteration
        except BaseException:
            self.close()
            raise
        return piece

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        submitted = self._submitted
        running = not submitted.done.is_set()
        submitted.cancel()  # a no-op for a finished generation
        submitted.done.wait()  # the engine frees the slot at its next step
        self._service.book(submitted, cancelled=running)


# --- HTTP -----------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = "smolexport-openai"
    timeout = 60  # seconds a client may idle on an open connection, or stall mid-request
    server: OpenAIServer

    ROUTES = {
        "/v1/chat/completions": "POST",
        "/v1/completions": "POST",
        "/v1/models": "GET",
        "/health": "GET",
    }

    # -- dispatch

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        self._response_started = False
        self._streaming = False  # the answer is a stream: its events show whether the client is still there
        self._peer_eof = False  # the client sent end of input: closed, or only half-closed
        self._probing = False  # a non-streamed answer's head is out, and its body is being sent as chunks
        self._gone = False
        # A body we do not read would be parsed as the next request: such connections are closed after answering.
        self._body_pending = self.headers.get("Content-Length", "0").strip() not in ("", "0") or bool(
            self.headers.get("Transfer-Encoding")
        )
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            route = path if path in self.ROUTES else None
            if route is None and path.startswith("/v1/models/"):
                route = "/v1/models/{id}"
            if route is None:
                raise ApiError(404, f"unknown request URL: {method} {path}", code="unknown_url")
            allowed = self.ROUTES.get(route, "GET")
            if method != allowed:
                raise ApiError(405, f"{method} is not allowed on {path}; use {allowed}", code="method_not_allowed")
            if route != "/health":
                self._authorize()
            if route == "/health":
                self._send_json(200, self._health())
            elif route == "/v1/models":
                self._send_json(200, {"object": "list", "data": [self._model_card()]})
            elif route == "/v1/models/{id}":
                model_id = path[len("/v1/models/") :]
                if model_id != self.server.service.name:
                    raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
                self._send_json(200, self._model_card())
            else:
                self._generate(chat=route == "/v1/chat/completions")
        except ApiError as exc:
            if self._response_started:
                self.close_connection = True
            else:
                self._send_json(exc.status, exc.body(), close=self._body_pending)
                if self._body_pending:
                    self._drain_body()
        except OSError:  # the client went away or stalled
            self.close_connection = True
        except Exception as exc:  # never let one request take the server down
            self.log_error("internal error: %r", exc)
            self.close_connection = True
            if not self._response_started:
                error = ApiError(500, "internal server error", type="server_error")
                with suppress(OSError):
                    self._send_json(500, error.body(), close=True)

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        # http.server decodes header bytes as latin-1: encoding back gives the bytes the client sent, which a
        # client writes as UTF-8 (so a non-ASCII key matches; it never did when compared as UTF-8 twice).
        sent = token.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, key.encode("utf-8")):
            raise ApiError(
                401,
                "incorrect or missing API key; send the header 'Authorization: Bearer YOUR_KEY'",
                code="invalid_api_key",
            )

    def _read_json(self) -> dict[str, Any]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the request body with a Content-Length header", code="length_required")
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else 0
        except ValueError:
            raise ApiError(400, "the Content-Length header is not a number") from None
        if length < 0:
            raise ApiError(400, "the Content-Length header is negative")
        if length > self.server.max_body_bytes:
            raise ApiError(
                413,
                f"the request body is {length} bytes; the limit is {self.server.max_body_bytes}",
                code="request_too_large",
            )
        raw = self.rfile.read(length)
        self._body_pending = False
        if len(raw) < length:
            self.close_connection = True
            raise ApiError(400, "the request body ended early")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def _drain_body(self) -> None:
        """Reads and drops a body we answered without reading (e.g. with 413), up to a limit, so that a client
        still sending it can finish and read the answer instead of getting a broken pipe."""
        try:
            remaining = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if not 0 < remaining <= DRAIN_FACTOR * self.server.max_body_bytes:
            return
        try:
            self.connection.settimeout(5)
            while remaining > 0 and (chunk := self.rfile.read(min(remaining, 1 << 16))):
                remaining -= len(chunk)
        except OSError:
            pass

    # -- generation

    def _generate(self, chat: bool) -> None:
        service = self.server.service
        body = self._read_json()
        request = service.parse(body, chat)
        self._streaming = request.stream
        prompt_ids = service.check_prompt(request)
        created = int(time.time())
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if self._client_gone():
            self.close_connection = True
            return
        pieces, stats = service.start(request, prompt_ids, self._client_gone)
        try:
            if request.stream:
                self._stream(request, pieces, stats, ident, created, chat)
                return
            try:
                text = "".join(pieces)
            finally:
                pieces.close()
            if self._gone:
                self.close_connection = True
                return
            usage = _usage(stats)
            calls = _tool_calls(text, request.tools) if request.tools and request.tool_choice != "none" else None
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                choice, obj = {"index": 0, "message": message}, "chat.completion"
                stats.finish_reason = "tool_calls"
            elif chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text}
                obj = "text_completion"
            choice.update(logprobs=None, finish_reason=stats.finish_reason or "stop")
            response = {
                "id": ident,
                "object": obj,
                "created": created,
                "model": service.name,
                "choices": [choice],
                "usage": usage,
            }
            if self._probing:  # the head went out already, as a probe: the body follows as chunks
                self._write_chunk(json.dumps(response, ensure_ascii=False).encode())
                self._write_chunk(b"")
            else:
                self._send_json(200, response)
        finally:
            pieces.close()  # whatever happened above, the generation ends and is booked

    def _stream(
        self, request: GenerationRequest, pieces: Generation, stats: Any, ident: str, created: int, chat: bool
    ) -> None:
        service = self.server.service
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
            if chat:
                choice: dict[str, Any] = {"index": 0, "delta": {}}
                if first:
                    choice["delta"]["role"] = "assistant"
                if delta is not None:
                    choice["delta"]["content"] = delta
            else:
                choice = {"index": 0, "text": delta or ""}
            choice.update(logprobs=None, finish_reason=finish_reason)
            return {"id": ident, "object": obj, "created": created, "model": service.name, "choices": [choice]}

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self._response_started = True
            if chat:
                self._event(chunk("", first=True))
            finish = stats.finish_reason
            if request.tools:
                finish = self._stream_tool_answer(request, pieces, chunk)
            else:
                for piece in pieces:
                    self._event(chunk(piece))
            self._event(chunk(None if chat else "", finish_reason=finish or stats.finish_reason or "stop"))
            if request.include_usage:
                usage = _usage(stats)
                final = {"id": ident, "object": obj, "created": created, "model": service.name, "choices": []}
                self._event({**final, "usage": usage})
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")
        except OSError:  # the client went away mid-stream: stop generating
            self.close_connection = True
        except Exception as exc:  # the status is sent already: report it as an error event, then hang up
            self.close_connection = True
            if not self._response_started:
                raise  # nothing sent yet: _dispatch answers 500
            self.log_error("error while streaming: %r", exc)
            error = ApiError(500, "internal server error while generating", type="server_error")
            with suppress(OSError):
                self._event(error.body())
        finally:
            pieces.close()

    def _stream_tool_answer(
        self, request: GenerationRequest, pieces: Generation, chunk: Callable[..., dict[str, Any]]
    ) -> str | None:
        """Streams a text answer as it comes; an answer that opens a tool-call block is held to its end and
        sent as delta.tool_calls, one per call, keyed by index. Returns "tool_calls" for calls."""
        held, is_text = "", False
        for piece in pieces:
            if is_text:
                self._event(chunk(piece))
                continue
            held += piece
            if not held.startswith(tool_calling.CALL_OPEN) and not tool_calling.CALL_OPEN.startswith(held):
                is_text = True
                self._event(chunk(held))
        calls = None if is_text or request.tool_choice == "none" else _tool_calls(held, request.tools)
        if not calls:
            if held and not is_text:
                self._event(chunk(held))
            return None
        for index, call in enumerate(calls):
            event = chunk(None)
            event["choices"][0]["delta"]["tool_calls"] = [{"index": index, **call}]
            self._event(event)
        return "tool_calls"

    def _event(self, payload: dict[str, Any]) -> None:
        self._write_chunk(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """True once the client has gone away. A connection reset (or one that errors) is gone. End of input
        is not proof: a client may shut down its sending side after a complete request (a half-close) and still
        wait for the answer. So after end of input, a non-streamed answer sends its head early and then one
        space of its JSON body per token: to a client that closed for good, these bytes draw a reset, seen
        at the next check. (A stream's own events do the same.)"""
        if self._gone:
            return True
        try:
            if not self._peer_eof and self._readable_or_broken():
                # A connection reset raises here; b"" is end of input; bytes are a next (pipelined) request.
                self._peer_eof = self.connection.recv(1, socket.MSG_PEEK | _MSG_DONTWAIT) == b""
            if self._peer_eof:
                if self._readable_or_broken(broken_only=True):
                    self._gone = True
                elif not self._streaming and self.request_version == "HTTP/1.1":  # HTTP/1.0 reads no chunks
                    self._probe()
        except BlockingIOError:
            pass
        except OSError:
            self._gone = True
        return self._gone

    def _readable_or_broken(self, broken_only: bool = False) -> bool:
        """Polls the connection without waiting. poll(), unlike select(), works for descriptors >= 1024."""
        if not hasattr(select, "poll"):  # Windows: its select() has no descriptor limit; a reset shows on write
            readable, _, broken = select.select([self.connection], [], [self.connection], 0)
            return bool(broken) if broken_only else bool(readable or broken)
        poller = select.poll()
        broken_mask = select.POLLERR | select.POLLHUP | select.POLLNVAL
        poller.register(self.connection, broken_mask if broken_only else broken_mask | select.POLLIN)
        return bool(poller.poll(0))

    def _probe(self) -> None:
        """Writes a byte the client will read as part of its answer: the head of a chunked JSON response
        first, then one leading space of the body (JSON allows leading whitespace)."""
        if not self._probing:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._response_started = self._probing = True
        self._write_chunk(b" ")

    # -- small responses

    def _health(self) -> dict[str, Any]:
        service = self.server.service
        return {
            "status": "ok",
            "model": service.name,
            "busy": service.engine.running > 0,
            "running": service.engine.running,
            "queued": service.engine.waiting,
            "requests": service.stats.requests,
            "tokens_generated": service.tokens_generated,
        }

    def _model_card(self) -> dict[str, Any]:
        service = self.server.service
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "smolexport"}

    def _send_json(self, status: int, payload: dict[str, Any], close: bool | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            path = self.path.split("?", 1)[0].rstrip("/")
            self.send_header("Allow", self.ROUTES.get(path, "GET"))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._response_started = True
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request line, oversized headers, unknown method) as JSON."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        error = ApiError(code, message or phrase)
        data = json.dumps(error.body()).encode()
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)


def _tool_calls(text: str, tools: list[Tool]) -> list[dict[str, Any]] | None:
    """An answer's tool calls in OpenAI's shape, or None for a text answer (or a block cut short)."""
    try:
        calls = tool_calling.parse_calls(text, tools)
    except (ConstraintError, ValueError, KeyError, TypeError):
        return None
    return [
        {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        for c in calls or ()
    ] or None  # fmt: skip


def _usage(stats: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        # OpenAI's field for the prompt tokens served from the cache (a conversation's earlier turns).
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process alive
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        service: ModelService,
        api_key: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        log_requests: bool = False,
    ) -> None:
        self.service = service
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.log_requests = log_requests
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def server_close(self) -> None:
        super().server_close()
        self.service.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Errors outside a request's own handling (e.g. the client vanished during the request line).
        if self.log_requests:
            print(f"connection error from {client_address}: {sys.exc_info()[1]!r}", file=sys.stderr)


def make_server(
    model_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    model: Model | None = None,
    model_name: str | None = None,
    default_max_tokens: int = 512,
    default_temperature: float = 0.7,
    max_batch: int = 8,
    max_queue: int = 64,
    context: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    providers: str = "auto",
    threads: int | None = None,
    log_requests: bool = False,
) -> OpenAIServer:
    """Loads the export (or takes a loaded `model`) and binds the server; port 0 picks a free port.
    Run it with `server.serve_forever()`, stop it with `server.shutdown()` then `server.server_close()`."""
    if model is None:
        if model_dir is None:
            raise ValueError("pass model_dir or model")
        model = load(model_dir, providers=providers, threads=threads)
    name = model_name or (Path(model_dir).resolve().name if model_dir is not None else "model")
    service = ModelService(
        model,
        name,
        default_max_tokens=default_max_tokens,
        default_temperature=default_temperature,
        max_batch=max_batch,
        max_queue=max_queue,
        context=context,
    )
    return OpenAIServer((host, port), service, api_key, max_body_bytes, log_requests)


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    **options: Any,
) -> None:
    """Serves until Ctrl-C."""
    server = make_server(model_dir, host, port, api_key, **options)
    print(f"serving {server.service.name} at {server.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    serve(args.model_dir, args.host, args.port, args.api_key, log_requests=True)
