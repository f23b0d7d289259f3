"""An OpenAI-compatible HTTP server for a smolexport export: the runtime, Starlette and uvicorn.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream`), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`. One model serves many clients at once: the runtime's BatchEngine decodes
every running request in one batched step (continuous batching: a request joins when its prefill is done and
leaves when it stops or its client goes away), and a conversation's follow-up request reuses its cached prefix.
Past `max_batch` running requests the rest wait in a bounded queue; past `max_queue` they get 503.

    server = make_server("exports/smollm2-135m-int4", port=8000)
    server.serve_forever()          # or serve("exports/smollm2-135m-int4") with a log line and Ctrl-C handling

The package's files: protocol.py (the OpenAI request and response shapes, pure functions), service.py (the
model and its BatchEngine), transport.py (the Starlette app), and this one: running it on uvicorn, with the
connection handling a public server needs and uvicorn leaves out (see `Connection`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import h11
import uvicorn
from smolexport_runtime import Model, load
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import ApiError
from .service import ModelService
from .transport import CONNECTION_KEY, MAX_BODY_BYTES, ConnectionInfo, create_app

REQUEST_TIMEOUT = 60.0  # seconds a request may take to arrive, head and body
MAX_CONNECTIONS = 512  # open connections; past them a request gets 503 and its connection closes
HARD_LIMIT_FACTOR = 2  # past this many times MAX_CONNECTIONS a new connection is closed at once, unanswered
KEEP_ALIVE = 5  # seconds an idle kept-alive connection stays open
GRACEFUL_SHUTDOWN = 5  # seconds running generations get to finish at shutdown, then the engine stops


class Connection(H11Protocol):
    """uvicorn's h11 protocol, plus three things it leaves out:

    - A deadline for the request head. uvicorn closes an idle kept-alive connection, but not one that never
      sends a byte, nor one that sends its head a byte at a time (slowloris): a timer starts when the
      connection opens (or when the first byte of a next request comes) and closes the connection unless the
      head is complete within `request_timeout`. The app gets the same deadline for the body (408 past it).
    - Half-closed clients. At end of input uvicorn closes the connection, so a client that shuts down its
      sending side once its request is out never gets the answer. While a request is under way the sending
      side stays open here, and the app is told (ConnectionInfo.eof: it probes whether the client is gone).
    - The connection bound in OpenAI's shape: uvicorn's `limit_concurrency` answers plain text; here the
      count is made as uvicorn makes it, and the app answers 503 with an OpenAI error. Past twice the bound
      a new connection is closed at once (idle sockets send no head to answer).

    The app also gets `transport.abort` (ConnectionInfo.abort), to drop a client that stopped reading.
    """

    def __init__(self, *args: Any, request_timeout: float, log_requests: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_timeout = request_timeout
        self.access_log = log_requests  # per server, not per process (the logger's handlers are global)
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None  # counted in handle_events, answered by the app
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0  # when the current request's first byte came (or the connection opened)
        self._eof: asyncio.Event | None = None  # the current request's ConnectionInfo.eof
        self._peer_eof = False  # the client sent end of input on this connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.max_connections
        if limit is not None and len(self.connections) > HARD_LIMIT_FACTOR * limit:
            # Idle sockets past the bound get no 503 (that needs a request head): without this cut, thousands
            # of them would each hold a file descriptor for the head timeout, until accept() fails for all.
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of a next request on a kept-alive connection
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a head is complete; its app task is created, and runs after this returns
            self._disarm()
            self._eof = asyncio.Event()
            if self._peer_eof:
                self._eof.set()
            limit = self.max_connections
            over = limit is not None and (len(self.connections) > limit or len(self.tasks) > limit)
            deadline = self._started + self.request_timeout
            info = ConnectionInfo(deadline, self._eof, over_limit=over, abort=self.transport.abort)
            self.cycle.scope.setdefault("extensions", {})[CONNECTION_KEY] = info  # type: ignore[typeddict-unknown-key]

    def eof_received(self) -> bool | None:  # type: ignore[override]
        self._peer_eof = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self._eof is None:
            return None  # between requests: nothing more will come, close (uvicorn's way)
        self._eof.set()
        cycle.message_event.set()  # wakes a body read waiting for bytes that will not come
        return True  # keep the sending side open for the answer

    def on_response_complete(self) -> None:
        # A pipelined request, sent while this one was answered, waited in the buffer: its time starts now
        # (uvicorn's super() starts it at once if its head is complete).
        self._started = self.loop.time()
        super().on_response_complete()
        idle = self.cycle is None or self.cycle.response_complete
        if self._peer_eof and idle and not self.transport.is_closing():
            self.transport.close()  # the client has sent all it will
        elif idle and self._timer is None and self.conn.trailing_data[0]:
            self._arm()  # part of a pipelined head is here: the same deadline as one that starts now

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (garbage, a bad header, a head over h11's size limit): OpenAI's shape."""
        body = json.dumps(ApiError(400, msg).body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body)):
                self.transport.write(self.conn.send(event))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            pass  # an answer is under way already: just hang up
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._started = self.loop.time()
        self._timer = self.loop.call_later(self.request_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown stops the engine after GRACEFUL_SHUTDOWN seconds: running
    generations then end as on any engine failure (a stream with an error event, a whole answer with 500) and
    their connections close, where uvicorn would cancel their tasks mid-answer (it still does, 5 s later, to
    whatever is left)."""

    def __init__(self, config: uvicorn.Config, service: ModelService) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stop_engine = asyncio.get_running_loop().call_later(
            GRACEFUL_SHUTDOWN, lambda: threading.Thread(target=self.service.close, daemon=True).start()
        )
        try:
            await super().shutdown(sockets)
        finally:
            stop_engine.cancel()


class OpenAIServer:
    """The app on uvicorn, bound when made (a port in use raises OSError here; port 0 picks a free one).
    `serve_forever()` runs it (on any thread); `shutdown()` stops it, then `server_close()` frees the socket
    and the engine, as with the standard library's socketserver."""

    def __init__(
        self,
        address: tuple[str, int],
        service: ModelService,
        api_key: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        log_requests: bool = False,
        *,
        timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.service = service
        self.app = create_app(service, api_key, max_body_bytes, timeout)
        host, port = address
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self.socket = socket.create_server((host, port), family=family, backlog=2048)
        self.server_address = self.socket.getsockname()
        if log_requests:
            _log_to_stderr()
        config = uvicorn.Config(
            self.app,
            http=functools.partial(Connection, request_timeout=timeout, log_requests=log_requests),  # type: ignore[arg-type]
            ws="none",
            lifespan="off",
            loop="asyncio",
            log_config=None,  # leave the process's logging alone
            proxy_headers=False,
            server_header=False,
            headers=[("server", "smolexport-openai")],
            limit_concurrency=max_connections,
            timeout_keep_alive=max(1, round(min(KEEP_ALIVE, timeout))),
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN + 5,
            backlog=2048,
        )
        self._server = _Uvicorn(config, service)
        self._serving = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def serve_forever(self) -> None:
        """Serves until shutdown() (or, on the main thread, Ctrl-C: then KeyboardInterrupt comes out of here)."""
        self._serving.set()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stops serve_forever and waits for it: running generations get GRACEFUL_SHUTDOWN seconds to finish."""
        self._server.should_exit = True
        if self._serving.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()
        self.service.close()


def _log_to_stderr() -> None:
    """uvicorn's access log (one line a request) on stderr, as http.server logged."""
    access = logging.getLogger("uvicorn.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


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
    timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    prompt_lookup: int = 0,
    draft_model: Model | None = None,
    draft_tokens: int = 3,
) -> OpenAIServer:
    """Loads the export (or takes a loaded `model`) and binds the server; port 0 picks a free port.
    Run it with `server.serve_forever()`, stop it with `server.shutdown()` then `server.server_close()`.
    `timeout`: seconds a request may take to arrive; `max_connections`: open connections served at once.
    `prompt_lookup` / `draft_model`: speculative decoding for a greedy request decoding alone."""
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
        prompt_lookup=prompt_lookup,
        draft_model=draft_model,
        draft_tokens=draft_tokens,
    )
    try:
        address = (host, port)
        options = {"timeout": timeout, "max_connections": max_connections}
        return OpenAIServer(address, service, api_key, max_body_bytes, log_requests, **options)
    except BaseException:
        service.close()  # the engine's thread, when the port is taken
        raise


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
