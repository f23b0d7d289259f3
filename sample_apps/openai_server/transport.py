"""The HTTP side: a Starlette app that speaks the OpenAI API for a ModelService.

Routes: POST /v1/chat/completions and /v1/completions (with `stream`: Server-Sent Events), GET /v1/models,
/v1/models/{id} and /health. All but /health need the API key when one is set. Every error, unknown routes and
wrong methods included, has OpenAI's shape.

The engine generates on its own thread. A generation's pieces cross to the event loop through a queue fed by one
small thread per generation (the runtime's iterator blocks), so the loop never waits on the model. While an
answer is produced, the request's `receive` is watched: `http.disconnect` (the client reset the connection, or
a write to it failed) cancels the generation at once. The end of a client's input is no proof that it left: it
may only have shut down its sending side and still wait for the answer. The connection layer (server.py) reports
it in the scope (ConnectionInfo.eof); from then on the answer writes something at least every PROBE_INTERVAL (a
space ahead of a JSON body, an SSE comment in a stream), which a client that closed for good answers with a
reset: seen as a disconnect at the next write.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .protocol import SSE_DONE, ApiError, ResponseBuilder, parse_json_body, server_busy, sse
from .service import Generation, ModelService

MAX_BODY_BYTES = 1_000_000  # requests over this get 413
DRAIN_FACTOR = 8  # a refused body up to 8x the limit is read and dropped, so that its client sees the answer
PROBE_INTERVAL = 0.05  # seconds between writes to a client that sent end of input, while its answer waits
CONNECTION_KEY = "smolexport.connection"  # scope["extensions"][CONNECTION_KEY]: a ConnectionInfo
logger = logging.getLogger(__name__)


@dataclass
class ConnectionInfo:
    """What the connection layer (server.py) tells the app about a request's connection."""

    deadline: float  # event-loop time by which the whole request, head and body, must have arrived
    eof: asyncio.Event  # the client sent end of input: it closed, or only shut down its sending side
    over_limit: bool = False  # more connections (or requests) are open than the server allows
    abort: Callable[[], None] | None = None  # drops the connection at once, unsent bytes and all


def check_api_key(api_key: str | None) -> None:
    """Refuses a key that would turn authentication off unnoticed (empty) or could never match (padded with
    whitespace, as from a .env file: clients' keys are compared stripped). None: no authentication."""
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        raise ValueError("the API key is empty or starts or ends with whitespace")


def create_app(
    service: ModelService, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, timeout: float = 60.0
) -> OpenAIApp:
    """The ASGI app. `timeout`: seconds a request may take to arrive (head and body; 408 past it). `api_key`:
    required of every request but /health (see check_api_key)."""
    check_api_key(api_key)
    key = api_key.encode("utf-8") if api_key is not None else None

    def authorize(request: Request) -> None:
        # The raw header bytes: a client sends a non-ASCII key as UTF-8, compared as such in constant time.
        sent = next((value for name, value in request.scope["headers"] if name == b"authorization"), b"")
        scheme, _, token = sent.partition(b" ")
        if key is not None and (scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key)):
            raise ApiError(
                401,
                "incorrect or missing API key; send the header 'Authorization: Bearer YOUR_KEY'",
                code="invalid_api_key",
            )

    async def health(request: Request) -> Response:
        return JSONResponse(service.health())

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [service.card()]})

    async def model(request: Request) -> Response:
        authorize(request)
        model_id = request.path_params["model_id"]
        if model_id != service.name:
            raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(service.card())

    async def generate(request: Request, chat: bool) -> GenerationResponse:
        authorize(request)
        body = parse_json_body(await read_body(request, max_body_bytes, timeout))

        def submit() -> tuple[Any, Generation]:  # tokenizing and compiling a grammar take a while: off the loop
            parsed = service.parse(body, chat)
            return parsed, service.start(parsed, service.check_prompt(parsed))

        parsed, generation = await run_in_threadpool(submit)
        builder = ResponseBuilder(
            service.name, chat, parsed.tools, parsed.tool_choice, parsed.include_usage, created=int(time.time())
        )
        return GenerationResponse(generation, builder, parsed.stream, _connection(request.scope), timeout)

    async def chat_completions(request: Request) -> GenerationResponse:
        return await generate(request, chat=True)

    async def completions(request: Request) -> GenerationResponse:
        return await generate(request, chat=False)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        headers = {"Connection": "close"} if _must_close(request, max_body_bytes) else None
        return JSONResponse(exc.body(), exc.status, headers=headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own: no route (404), or a route that takes another method (405)."""
        assert isinstance(exc, HTTPException)
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            error = ApiError(404, f"unknown request URL: {method} {path}", code="unknown_url")
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{method} is not allowed on {path}; use {allowed}"
            error = ApiError(405, message, code="method_not_allowed")
        else:
            error = ApiError(exc.status_code, exc.detail)
        response = await api_error(request, error)
        response.headers.update(exc.headers or {})
        return response

    async def internal_error(request: Request, exc: Exception) -> Response:
        return JSONResponse(ApiError(500, "internal server error", type="server_error").body(), 500)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: internal_error}
    return OpenAIApp(Starlette(routes=routes, exception_handlers=handlers))  # type: ignore[arg-type]


class OpenAIApp:
    """The Starlette app behind two checks of its own: a connection past the server's bound gets 503 (in
    OpenAI's shape, and the connection closes), and a trailing slash is dropped (/v1/models/ is /v1/models)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            info = _connection(scope)
            if info is not None and info.over_limit:
                error = server_busy("too many connections are open; retry later")
                await JSONResponse(error.body(), 503, headers={"Connection": "close"})(scope, receive, send)
                return
            if scope["path"] != "/" and scope["path"].endswith("/"):
                scope = {**scope, "path": scope["path"].rstrip("/") or "/"}
        await self.app(scope, receive, send)


def _connection(scope: Scope) -> ConnectionInfo | None:
    return scope.get("extensions", {}).get(CONNECTION_KEY)


# --- request bodies ---------------------------------------------------------------------------------


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, whole: 413 past `limit` bytes, 408 if it has not arrived by the request's deadline (a client
    trickling it in a byte at a time holds the connection no longer than that), 400 if it ended early."""
    length = request.headers.get("content-length")  # h11 checked that it is a number
    if length is not None and int(length) > limit:
        raise ApiError(413, f"the request body is {length} bytes; the limit is {limit}", code="request_too_large")
    info = _connection(request.scope)
    loop = asyncio.get_running_loop()
    deadline = info.deadline if info is not None else loop.time() + timeout
    try:
        body = await asyncio.wait_for(_receive_body(request, limit, info), max(0.0, deadline - loop.time()))
    except asyncio.TimeoutError:
        request.state.close_connection = True
        raise ApiError(408, f"the request did not arrive within {timeout:g} s", code="request_timeout") from None
    request.state.body_read = True
    return body


async def _receive_body(request: Request, limit: int, info: ConnectionInfo | None) -> bytes:
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":  # nobody reads the answer; it is dropped
            raise ApiError(400, "the client went away while sending the request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # chunked: its length shows only as it comes
            request.state.close_connection = True
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        if info is not None and info.eof.is_set():  # the rest will not come
            request.state.close_connection = True
            raise ApiError(400, "the request body ended early")


def _must_close(request: Request, limit: int) -> bool:
    """Whether an error answer closes the connection. uvicorn reads and drops a body the app did not read, so
    that the client, still sending it, gets the answer; past DRAIN_FACTOR x the limit (or of unknown length) that
    is not worth it."""
    state = request.scope.get("state", {})
    if state.get("close_connection"):
        return True
    if state.get("body_read") or request.method in ("GET", "HEAD"):
        return False
    if "chunked" in request.headers.get("transfer-encoding", "").lower():
        return True
    return int(request.headers.get("content-length") or 0) > DRAIN_FACTOR * limit


# --- answers ----------------------------------------------------------------------------------------

_END, _GONE, _TICK, _EOF = object(), object(), object(), object()


class _Pump:
    """Carries a generation's pieces from a thread of its own to the event loop's queue, then _END (or the
    generation's error). The thread closes the generation (which waits for the engine to let go of it)."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, name="smolexport-generation", daemon=True).start()

    def put(self, item: object) -> None:
        """From any thread."""
        with suppress(RuntimeError):  # the loop is closed: the server stopped, nobody is reading
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _run(self) -> None:
        end: object = _END
        try:
            for piece in self.generation:
                self.put(piece)
        except Exception as exc:  # the engine failed the generation
            end = exc
        finally:
            self.generation.close()
        self.put(end)


class _Stalled(Exception):
    """The client stopped reading: a write did not go out within the timeout."""


class GenerationResponse:
    """An ASGI response: streams a generation as Server-Sent Events or answers it whole, and cancels the
    generation if the client leaves. A client that stops reading is dropped once a write has waited `timeout`
    seconds (uvicorn waits for a full send buffer to drain for as long as it takes)."""

    def __init__(
        self,
        generation: Generation,
        builder: ResponseBuilder,
        stream: bool,
        info: ConnectionInfo | None,
        timeout: float = 60.0,
    ) -> None:
        self.pump = _Pump(generation)  # generating already: start reading
        self.builder, self.stream, self.info, self.timeout = builder, stream, info, timeout
        self.eof = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watchers = [asyncio.create_task(self._watch_disconnect(receive))]
        if self.info is not None:
            watchers.append(asyncio.create_task(self._watch_eof(self.info)))

        async def bounded_send(message: dict[str, Any]) -> None:
            try:
                await asyncio.wait_for(send(message), self.timeout)
            except asyncio.TimeoutError:
                if self.info is not None and self.info.abort is not None:
                    self.info.abort()
                raise _Stalled from None

        try:
            await (self._stream(bounded_send) if self.stream else self._whole(bounded_send))
        except _Stalled:
            if self.info is None or self.info.abort is None:
                raise  # uvicorn closes the connection
        finally:
            self.pump.generation.cancel()  # a no-op once it ended; else the client left: free its slot
            for watcher in watchers:
                watcher.cancel()

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # an end-of-input wake-up (see server.py), or a body the app did not read
        self.pump.generation.cancel()
        self.pump.queue.put_nowait(_GONE)

    async def _watch_eof(self, info: ConnectionInfo) -> None:
        await info.eof.wait()
        self.eof = True
        self.pump.queue.put_nowait(_EOF)  # wakes _next: from now on it ticks

    async def _next(self) -> object:
        """The next piece, _END, an error, _GONE, or _TICK after PROBE_INTERVAL without one once the client
        sent end of input."""
        while True:
            if not self.eof:
                item = await self.pump.queue.get()
            else:
                try:
                    item = await asyncio.wait_for(self.pump.queue.get(), PROBE_INTERVAL)
                except asyncio.TimeoutError:
                    return _TICK
            if item is not _EOF:
                return item

    async def _stream(self, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        builder = self.builder
        for chunk in builder.start():
            await _write(send, sse(chunk))
        while (item := await self._next()) is not _END:
            if item is _GONE:
                return
            if item is _TICK:
                await _write(send, b": \n\n")  # an SSE comment: clients skip it
            elif isinstance(item, BaseException):  # the status is sent already: an error event ends the stream
                logger.error("generation failed while streaming: %r", item)
                await _write(send, sse(builder.error()), more=False)
                return
            else:
                for chunk in builder.piece(item):  # type: ignore[arg-type]
                    await _write(send, sse(chunk))
        for chunk in builder.finish(self.pump.generation.stats):
            await _write(send, sse(chunk))
        await _write(send, SSE_DONE, more=False)

    async def _whole(self, send: Send) -> None:
        pieces: list[str] = []
        probing = False  # the head went out early (chunked, no length); spaces lead the JSON body
        while (item := await self._next()) is not _END:
            if item is _GONE:
                return
            if isinstance(item, BaseException):
                logger.error("generation failed: %r", item)
                if probing:
                    return  # mid-body: uvicorn closes the connection
                await _send_json(send, 500, self.builder.error())
                return
            if item is not _TICK:
                pieces.append(item)  # type: ignore[arg-type]
            if self.eof:
                if not probing:
                    headers = [(b"content-type", b"application/json")]
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    probing = True
                await _write(send, b" ")
        answer = self.builder.completion("".join(pieces), self.pump.generation.stats)
        if probing:
            await _write(send, json.dumps(answer, ensure_ascii=False).encode(), more=False)
        else:
            await _send_json(send, 200, answer)


async def _write(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await _write(send, data, more=False)
