"""Bad requests get OpenAI-shaped 4xx errors and never hurt the server; a client that disconnects stops its
generation."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import select
import socket
import threading
import time

import pytest

from sample_apps.openai_server import make_server

from .conftest import slow_model


def serving(srv):
    """Runs `srv` on a thread for a fixture's lifetime (use with `yield from`)."""
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def server(tiny_model):
    yield from serving(make_server(port=0, model=tiny_model, model_name="tiny", max_body_bytes=1_000_000))


def request(server, method, path, body=None, headers=None, raw: bytes | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else None, response


def raw_exchange(server, data: bytes) -> bytes:
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # no more to send: a server waiting for more bytes sees the end
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def assert_error(status, body, expected_status, code=None, param=None):
    assert status == expected_status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "w5 w6"}]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "nope", "messages": USER}, 404, "model_not_found", "model"),
        ({"messages": USER}, 400, "missing_required_parameter", "model"),
        ({"model": "tiny"}, 400, "missing_required_parameter", "messages"),
        ({"model": "tiny", "messages": []}, 400, "invalid_value", "messages"),
        ({"model": "tiny", "messages": "hi"}, 400, "invalid_value", "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "w5"}]}, 400, None, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, None, "messages[0].content"),
        ({"model": "tiny", "messages": ["w5"]}, 400, None, "messages[0]"),
        ({"model": "tiny", "messages": [{"role": ["user"], "content": "w5"}]}, 400, None, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": {"a": 1}, "content": "w5"}]}, 400, None, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "w5 \ud800"}]}, 400, None, "messages[0].content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": None}]}, 400, None, "messages[0].content"),
        ({"model": "tiny", "messages": USER, "temperature": float("nan")}, 400, "invalid_value", "temperature"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "w5 " * 300}]},
            400,
            "context_length_exceeded",
            None,
        ),
        ({"model": "tiny", "messages": USER, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ({"model": "tiny", "messages": USER, "max_tokens": -3}, 400, "invalid_value", "max_tokens"),
        ({"model": "tiny", "messages": USER, "max_tokens": 10**9}, 400, "invalid_value", "max_tokens"),
        ({"model": "tiny", "messages": USER, "max_tokens": "10"}, 400, "invalid_value", "max_tokens"),
        ({"model": "tiny", "messages": USER, "max_tokens": True}, 400, "invalid_value", "max_tokens"),
        ({"model": "tiny", "messages": USER, "max_completion_tokens": 0}, 400, None, "max_completion_tokens"),
        ({"model": "tiny", "messages": USER, "temperature": 5}, 400, "invalid_value", "temperature"),
        ({"model": "tiny", "messages": USER, "temperature": "hot"}, 400, "invalid_value", "temperature"),
        ({"model": "tiny", "messages": USER, "top_p": 1.5}, 400, "invalid_value", "top_p"),
        ({"model": "tiny", "messages": USER, "stop": 7}, 400, "invalid_value", "stop"),
        ({"model": "tiny", "messages": USER, "stop": [""]}, 400, "invalid_value", "stop"),
        ({"model": "tiny", "messages": USER, "stop": ["w"] * 17}, 400, "invalid_value", "stop"),
        ({"model": "tiny", "messages": USER, "seed": 1.5}, 400, "invalid_value", "seed"),
        ({"model": "tiny", "messages": USER, "n": 3}, 400, "invalid_value", "n"),
        ({"model": "tiny", "messages": USER, "stream": "yes"}, 400, "invalid_value", "stream"),
        # Not implemented: refused, never silently ignored.
        ({"model": "tiny", "messages": USER, "functions": [{"name": "f"}]}, 400, "unsupported_parameter", "functions"),
        ({"model": "tiny", "messages": USER, "tool_choice": "required"}, 400, "invalid_value", "tool_choice"),
        (
            {"model": "tiny", "messages": USER, "tools": [{"type": "function", "function": {}}]},
            400,
            "invalid_value",
            "tools",
        ),
        (
            {
                "model": "tiny",
                "messages": USER,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            400,
            "invalid_value",
            "tool_choice",
        ),
        (
            {
                "model": "tiny",
                "messages": USER,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "parallel_tool_calls": "yes",
            },
            400,
            "invalid_value",
            "parallel_tool_calls",
        ),
        (
            {
                "model": "tiny",
                "messages": USER,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": "f"},
            },
            400,
            "invalid_value",
            "tool_choice",
        ),
        (
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                    },
                    {"role": "tool", "tool_call_id": "1", "content": "3"},
                ],
            },
            400,
            "invalid_value",
            "tools",
        ),
        (
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "not json"}}
                        ],
                    }
                ],
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            400,
            "invalid_value",
            "messages",
        ),
        ({"model": "tiny", "messages": USER, "logit_bias": {"5": 3}}, 400, "unsupported_parameter", "logit_bias"),
        ({"model": "tiny", "messages": USER, "response_format": {"type": "xml"}}, 400, None, "response_format.type"),
        (
            {"model": "tiny", "messages": USER, "response_format": {"type": "json_schema"}},
            400,
            None,
            "response_format.json_schema",
        ),
        (
            {
                "model": "tiny",
                "messages": USER,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                },
            },
            400,
            "unsupported_schema",
            "response_format",
        ),
    ],
)
def test_bad_chat_requests(server, body, status, code, param):
    assert_error(*request(server, "POST", CHAT, body)[:2], status, code, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny"}, "prompt"),
        ({"model": "tiny", "prompt": 5}, "prompt"),
        ({"model": "tiny", "prompt": ""}, None),
        ({"model": "tiny", "prompt": "w5 \udfff"}, "prompt"),
    ],  # noqa: E501
)
def test_bad_completion_requests(server, body, param):
    assert_error(*request(server, "POST", "/v1/completions", body)[:2], 400, param=param)


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe\x00", b"[" * 100_000, b'{"model": "tiny", "x": NaN'], ids=str
)
def test_malformed_bodies(server, raw):
    assert_error(*request(server, "POST", CHAT, raw=raw)[:2], 400)


def test_oversized_body_is_refused_without_reading_it(server):
    status, body, response = request(server, "POST", CHAT, raw=b"x" * 1_000_001)
    assert_error(status, body, 413, "request_too_large")
    # A client announcing a huge body gets its answer at once, without the server waiting for the bytes.
    reply = raw_exchange(server, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in reply


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing", 404),
        ("POST", "/v2/chat/completions", 404),
        ("GET", "/", 404),
        ("GET", CHAT, 405),
        ("PUT", "/v1/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("POST", "/health", 405),
        ("PATCH", "/v1/models/tiny", 405),
    ],
)
def test_wrong_method_or_path(server, method, path, status):
    status_got, body, response = request(server, method, path, body={"model": "tiny"})
    assert_error(status_got, body, status)
    if status == 405:
        assert response.getheader("Allow")


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"BREW /coffee HTCPCP/1.0\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: lots\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
    ],
)
def test_protocol_garbage_gets_an_error_not_a_crash(server, data):
    reply = raw_exchange(server, data)
    if reply.startswith(b"HTTP/"):
        assert reply.split(b"\r\n", 1)[0].split(b" ")[1].startswith(b"4")
        reply = reply.split(b"\r\n\r\n", 1)[1]
    # else: without a valid version the request counts as HTTP/0.9, whose answers have no status line
    assert json.loads(reply)["error"]["message"]


def test_server_still_serves_after_abuse(server):
    raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # body cut short
    with socket.create_connection(server.server_address[:2]):
        pass  # connect and leave
    status, body, _ = request(server, "POST", CHAT, {"model": "tiny", "messages": USER, "max_tokens": 4})
    assert status == 200 and 1 <= body["usage"]["completion_tokens"] <= 4  # eos may come first


def test_keep_alive_connection_survives_an_error(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", CHAT, body=json.dumps({"model": "nope", "messages": USER}))
    first = conn.getresponse()
    first.read()
    conn.request("POST", CHAT, body=json.dumps({"model": "tiny", "messages": USER, "max_tokens": 2}))
    second = conn.getresponse()
    assert first.status == 404 and second.status == 200 and json.loads(second.read())["usage"]["completion_tokens"]
    conn.close()


# --- disconnects -----------------------------------------------------------------------------------


@pytest.fixture
def slow_server(tiny_export):
    """20 ms per token and no eos: a 200-token answer would take 4 s."""
    yield from serving(make_server(port=0, model=slow_model(tiny_export, 0.02), model_name="tiny"))


def wait_until(condition, timeout=30.0, what="the condition"):
    """Polls `condition`; the timeout only guards against a hang (the wait normally ends in milliseconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def wait_idle(service, timeout=30.0):
    wait_until(lambda: not service.stats.running and service.engine.running == 0, timeout, "the generation to end")


def post_and_hang_up(server, body, after_events: int | None) -> tuple[bytes, int]:
    """Sends the request, waits until its generation runs (and for a stream, until `after_events` events came),
    then closes the connection. Returns what was received and the decoder's forward passes at the hang-up."""
    service = server.service
    payload = json.dumps(body).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
    sock = socket.create_connection(server.server_address[:2], timeout=30)
    sock.sendall(head.encode() + payload)
    received = b""
    if after_events is not None:
        while received.count(b"data: ") < after_events:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    wait_until(lambda: service.stats.running, what="the generation to start")
    sock.close()
    return received, service.model.decoder.calls


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_the_generation(slow_server, stream):
    service = slow_server.service
    body = {"model": "tiny", "messages": USER, "max_tokens": 200, "temperature": 0, "stream": stream}
    received, calls_at_hang_up = post_and_hang_up(slow_server, body, after_events=4 if stream else None)
    if stream:
        assert received.startswith(b"HTTP/1.1 200") and b"text/event-stream" in received
    wait_idle(service)
    tokens = service.tokens_generated
    assert 0 < tokens < 200  # stopped early: far from the 200 asked for
    assert service.model.decoder.calls <= calls_at_hang_up + 5  # within a few tokens of the hang-up
    assert service.stats.cancelled == 1 and service.stats.finished == 1
    # The model is free: the next request is served, and nothing else ran since (the counter stopped growing).
    status, answer, _ = request(slow_server, "POST", CHAT, {"model": "tiny", "messages": USER, "max_tokens": 3})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3
    assert service.tokens_generated == tokens + 3
    assert service.stats.cancelled == 1 and service.stats.finished == service.stats.requests == 2


def read_response(sock) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock, method="POST")
    response.begin()
    return response.status, response.read()


@pytest.mark.parametrize("stream", [True, False])
def test_a_half_closed_client_gets_its_answer(server, stream):
    """A client may shut down its sending side once the request is out: that is not a disconnect."""
    body = {"model": "tiny", "messages": USER, "max_tokens": 8, "temperature": 0}
    status, expected, _ = request(server, "POST", CHAT, body)
    assert status == 200 and expected["choices"][0]["message"]["content"]
    payload = json.dumps({**body, "stream": stream}).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(head.encode() + payload)
        sock.shutdown(socket.SHUT_WR)
        status, data = read_response(sock)
    assert status == 200
    if stream:
        assert data.endswith(b"data: [DONE]\n\n")
        events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert text == expected["choices"][0]["message"]["content"]
    else:
        answer = json.loads(data)
        assert answer["choices"] == expected["choices"] and answer["usage"] == expected["usage"]


def test_connections_with_high_descriptors_are_served(server):
    """select() fails for descriptors >= 1024 (a busy server has them): the disconnect check must not."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"the open-files limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = []
    try:
        while not fillers or fillers[-1] < 1030:  # takes every free descriptor below 1030
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        status, body, _ = request(server, "POST", CHAT, {"model": "tiny", "messages": USER, "max_tokens": 4})
    finally:
        for fd in fillers:
            os.close(fd)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert status == 200 and 1 <= body["usage"]["completion_tokens"] <= 4  # eos may come first


@pytest.mark.parametrize("stream", [True, False])
def test_a_failed_response_head_still_ends_the_generation(tiny_model, monkeypatch, stream):
    """If writing the status line and headers fails (the client's connection ends just then), the generation is
    still closed and booked (/health)."""
    from uvicorn.protocols.http.h11_impl import RequestResponseCycle

    srv = make_server(port=0, model=tiny_model, model_name="tiny")
    content_type = b"text/event-stream" if stream else b"application/json"
    send = RequestResponseCycle.send

    async def failing_send(self, message):
        head = message["type"] == "http.response.start" and self.scope["path"] == CHAT
        if head and dict(message["headers"]).get(b"content-type", b"").startswith(content_type):
            self.transport.close()  # the client's connection ends as the head goes out
            raise ConnectionResetError("the client went away")
        await send(self, message)

    monkeypatch.setattr(RequestResponseCycle, "send", failing_send)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        body = {"model": "tiny", "messages": USER, "max_tokens": 4, "stream": stream, "temperature": 0}  # greedy: 4
        with pytest.raises(http.client.RemoteDisconnected):
            request(srv, "POST", CHAT, body)
        service = srv.service
        wait_idle(service)
        assert service.stats.requests == service.stats.finished == 1 and service.tokens_generated >= 0
        status, health, _ = request(srv, "GET", "/health")
        assert status == 200 and not health["busy"] and health["requests"] == 1
        monkeypatch.undo()
        status, answer, _ = request(srv, "POST", CHAT, {**body, "stream": False})
        assert status == 200 and answer["usage"]["completion_tokens"] == 4
        assert service.stats.requests == service.stats.finished == 2
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def one_at_a_time_server(tiny_export):
    """The slow server with a batch of one: a second request must wait in the queue."""
    model = slow_model(tiny_export, 0.02)
    yield from serving(make_server(port=0, model=model, model_name="tiny", max_batch=1, max_queue=1))


def test_past_the_batch_requests_queue_and_past_the_queue_get_503(one_at_a_time_server):
    """With max_batch=1, one request runs, one waits (the health endpoint shows it), a third is refused with
    OpenAI's error shape; the two accepted ones finish with the same greedy answer."""
    srv = one_at_a_time_server
    body = {"model": "tiny", "messages": USER, "max_tokens": 20, "temperature": 0}
    results = []

    def ask():
        results.append(request(srv, "POST", CHAT, body))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    threads[0].start()
    wait_until(lambda: srv.service.engine.running == 1, what="the first request to run")
    threads[1].start()
    wait_until(lambda: srv.service.engine.waiting == 1, what="the second request to queue")
    health = request(srv, "GET", "/health")[1]
    assert health["running"] == 1 and health["queued"] == 1 and health["busy"]
    status, refused, _ = request(srv, "POST", CHAT, body)
    assert status == 503 and refused["error"]["code"] == "server_busy"
    for thread in threads:
        thread.join(30)
    assert [r[0] for r in results] == [200, 200]
    assert results[0][1]["choices"] == results[1][1]["choices"]


def test_concurrent_requests_decode_together(slow_server):
    """Three requests at once run in the same batched steps: the engine takes fewer decode steps than the
    tokens it generates, and every answer equals the one the request gets alone."""
    bodies = [{"model": "tiny", "messages": [{"role": "user", "content": f"w{10 + i} w{40 + i}"}],
               "max_tokens": 12, "temperature": 0} for i in range(3)]  # fmt: skip
    alone = [request(slow_server, "POST", CHAT, body)[1]["choices"] for body in bodies]
    engine = slow_server.service.engine
    steps_before = engine.steps
    results = [None] * 3

    def ask(i):
        results[i] = request(slow_server, "POST", CHAT, bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [r[1]["choices"] for r in results] == alone
    generated = sum(r[1]["usage"]["completion_tokens"] for r in results)
    assert generated == 36  # eos is banned: every request runs to its limit
    assert engine.steps - steps_before < generated * 2 / 3  # shared steps (the three alone would take 33)


# --- time and connection bounds ----------------------------------------------------------------------

TIMEOUT = 2.0  # the request timeout of the servers below: a request's head and body must arrive within it


@pytest.fixture(scope="module")
def quick_server(tiny_model):
    yield from serving(make_server(port=0, model=tiny_model, model_name="tiny", timeout=TIMEOUT))


def trickle(sock, data: bytes, interval: float = 0.5) -> tuple[int, float]:
    """Sends `data` one byte every `interval` seconds until the server answers or hangs up. Returns the bytes
    sent and the seconds until then."""
    start, sent = time.monotonic(), 0
    for byte in data:
        try:
            sock.send(bytes([byte]))
        except OSError:  # the server closed the connection
            break
        sent += 1
        if select.select([sock], [], [], interval)[0]:  # an answer, or the end of the connection
            break
    return sent, time.monotonic() - start


def read_all(sock) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_a_trickled_body_is_cut_off_at_the_timeout(quick_server):
    """The probe: a body sent a byte a second was answered after 75 s although the timeout was 60 s."""
    body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 2}).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection(quick_server.server_address[:2], timeout=30) as sock:
        sock.sendall(head)
        sent, seconds = trickle(sock, body)
        reply = read_all(sock)
    assert sent < len(body) and seconds < TIMEOUT + 1.5, (sent, seconds)
    assert reply.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in reply
    assert b"connection: close" in reply.lower()


@pytest.mark.parametrize("after_a_request", [False, True])
def test_a_trickled_head_is_closed_at_the_timeout(quick_server, after_a_request):
    """Slowloris: a head sent a byte at a time, on a new connection or on one kept alive after an answer."""
    body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 2})
    data = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
    with socket.create_connection(quick_server.server_address[:2], timeout=30) as sock:
        if after_a_request:
            sock.sendall(data)
            status, answer = read_response(sock)
            assert status == 200 and json.loads(answer)["usage"]["completion_tokens"]
        sent, seconds = trickle(sock, data)
        assert read_all(sock) == b""  # closed, unanswered
    assert sent < data.index(b"\r\n\r\n") and seconds < TIMEOUT + 1.5, (sent, seconds)


@pytest.fixture
def slow_quick_server(tiny_export):
    """20 ms per token and no eos, a 1 s request timeout."""
    yield from serving(make_server(port=0, model=slow_model(tiny_export, 0.02), model_name="tiny", timeout=1.0))


def test_a_pipelined_request_gets_its_own_deadline(slow_quick_server):
    """The review: a request sent right behind a 2-second answer on the same connection waited in the buffer
    and then got 408, its deadline counted from the first request's start."""

    def post(body: dict, close: bool = False) -> bytes:
        raw = json.dumps(body)
        extra = "Connection: close\r\n" if close else ""
        return f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {len(raw)}\r\n\r\n{raw}".encode()

    long = post({"model": "tiny", "messages": USER, "max_tokens": 100})  # 2 s at 20 ms a token
    short = post({"model": "tiny", "messages": USER, "max_tokens": 2}, close=True)
    with socket.create_connection(slow_quick_server.server_address[:2], timeout=30) as sock:
        sock.sendall(long + short)
        replies = read_all(sock)
    assert replies.count(b"HTTP/1.1 200") == 2, replies[:300]
    assert b"408" not in replies.split(b"\r\n", 1)[0]


def test_idle_connections_take_no_threads_and_are_closed(quick_server):
    """The probe: 200 idle connections made 206 threads. Here they cost no thread, the server answers while
    they are open, and it closes them once the timeout passes."""
    request(quick_server, "GET", "/health")  # whatever threads a request starts exist now
    before = threading.active_count()
    address = quick_server.server_address[:2]
    idle = [socket.create_connection(address, timeout=30) for _ in range(100)]
    try:
        for sock in idle[::2]:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")  # half a head
        time.sleep(0.5)
        assert threading.active_count() <= before + 2
        status, body, _ = request(quick_server, "POST", CHAT, {"model": "tiny", "messages": USER, "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"]
        start = time.monotonic()
        for sock in idle:
            assert read_all(sock) == b""  # the server hung up
        assert time.monotonic() - start < TIMEOUT + 1.5
    finally:
        for sock in idle:
            sock.close()


@pytest.fixture
def bounded_server(tiny_model, request):
    """A server with `max_connections` from the test's parametrization."""
    yield from serving(make_server(port=0, model=tiny_model, model_name="tiny", max_connections=request.param))


@pytest.mark.parametrize("bounded_server", [8], indirect=True)
def test_past_max_connections_requests_get_503(bounded_server):
    srv = bounded_server
    idle = [socket.create_connection(srv.server_address[:2], timeout=30) for _ in range(8)]
    try:
        wait_until(lambda: len(srv._server.server_state.connections) == 8, what="the connections to be accepted")
        status, body, response = request(srv, "GET", "/v1/models")
        assert_error(status, body, 503, "server_busy")
        assert response.getheader("Connection") == "close"
        for sock in idle:
            sock.close()
        wait_until(lambda: not srv._server.server_state.connections, what="the connections to close")
        assert request(srv, "GET", "/v1/models")[0] == 200
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize("bounded_server", [4], indirect=True)
def test_idle_connections_past_twice_the_bound_are_closed_at_once(bounded_server):
    """The review: the bound applied only once a request head was complete, so idle sockets could pile up
    until the process ran out of file descriptors."""
    srv = bounded_server
    idle = []
    try:
        for _ in range(8):  # twice the bound: kept open, waiting for their heads
            idle.append(socket.create_connection(srv.server_address[:2], timeout=30))
        wait_until(lambda: len(srv._server.server_state.connections) == 8, what="the connections to be accepted")
        extra = [socket.create_connection(srv.server_address[:2], timeout=5) for _ in range(3)]
        idle += extra
        for sock in extra:
            assert read_all(sock) == b""  # closed at once (the head timeout is 60 s)
        assert len(srv._server.server_state.connections) == 8
    finally:
        for sock in idle:
            sock.close()


def test_a_body_cut_short_gets_400(server):
    reply = raw_exchange(server, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
    assert reply.startswith(b"HTTP/1.1 400") and b"ended early" in reply


def test_a_client_that_stops_reading_is_dropped(tiny_export):
    """uvicorn waits for a full send buffer to drain for as long as it takes: a write of an answer that waits past
    the timeout drops the connection, and the generation's slot is freed."""
    from sample_apps.openai_server.protocol import ResponseBuilder
    from sample_apps.openai_server.service import ModelService
    from sample_apps.openai_server.transport import ConnectionInfo, GenerationResponse

    service = ModelService(slow_model(tiny_export, 0.02), "tiny")

    async def answer_a_client_that_reads_nothing() -> tuple[bool, float]:
        request = service.parse({"model": "tiny", "messages": USER, "max_tokens": 200, "stream": True}, chat=True)
        generation = service.start(request, service.check_prompt(request))
        aborted = asyncio.Event()
        info = ConnectionInfo(deadline=0.0, eof=asyncio.Event(), abort=aborted.set)
        response = GenerationResponse(generation, ResponseBuilder("tiny", True), True, info, timeout=0.3)

        async def send(message):
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()  # the client's buffers are full: this write never goes out

        async def receive():
            await asyncio.Event().wait()

        start = time.monotonic()
        await asyncio.wait_for(response({"type": "http"}, receive, send), 10)
        return aborted.is_set(), time.monotonic() - start

    try:
        aborted, seconds = asyncio.run(answer_a_client_that_reads_nothing())
        assert aborted and seconds < 2
        wait_idle(service)
        assert service.stats.cancelled == service.stats.finished == 1 and service.tokens_generated < 200
    finally:
        service.close()
