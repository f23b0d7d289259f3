"""`smolexport bench --scenario serve`: N streaming clients against `smolexport serve`, each alone, then together.

The server runs in a process of its own (the clients' HTTP and JSON work would otherwise share its GIL); the
clients are threads here. Each client asks a different question for `tokens` greedy tokens. First every request
is sent alone, one after another: that gives one client's tokens/s and each answer's reference text. Then all
at once: aggregate tokens/s (tokens / wall time), time to first token per client (p50, p95), and whether every
answer equals its alone answer and none was lost.

With `constrained`, every request asks for JSON held to a small schema (OpenAI's response_format json_schema,
streamed, as an extraction or summary endpoint would), so each token is sampled under a grammar mask: this
measures what batching gains when each client also pays the mask's CPU time per token.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SmolexportError

QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle gear system works, step by step.",
    "Describe a walk through a busy market in the morning.",
    "What should I pack for a week of hiking in the mountains? Explain each item.",
    "Tell me about the history of tea and how it spread around the world.",
    "Write a letter to a friend about learning to bake bread.",
    "Explain why the seasons change during the year.",
    "Describe how to plan a small vegetable garden.",
]
# A summary card of the answer: short strings, an enum, a bounded list and a number.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "topic": {"type": "string", "enum": ["story", "science", "travel", "food", "history", "howto"]},
        "key_points": {"type": "array", "items": {"type": "string", "maxLength": 80}, "minItems": 1, "maxItems": 4},
        "difficulty": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["title", "topic", "key_points", "difficulty"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "summary", "schema": SCHEMA, "strict": True}}
JSON_INSTRUCTION = " Answer as JSON: a title, the topic, up to four key points and a difficulty from 1 to 5."


@dataclass
class ClientResult:
    text: str = ""
    tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_chat(
    port: int, model: str, question: str, max_tokens: int, response_format: dict | None = None
) -> ClientResult:
    """One streaming chat completion: its text, token count (from usage), time to first content, total time."""
    result = ClientResult()
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if response_format is not None:
        body["response_format"] = response_format
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:200]!r}"
            return result
        pieces = []
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                result.tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    if not pieces:
                        result.ttft_s = time.perf_counter() - start
                    pieces.append(content)
        result.text = "".join(pieces)
        conn.close()
    except (OSError, ValueError) as exc:  # a broken connection, or an event that is not JSON
        result.error = repr(exc)
    result.total_s = time.perf_counter() - start
    return result


def start_server(export_dir: Path, threads: int, clients: int, provider: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "smolexport.cli", "serve", str(export_dir), "--port", str(port), "--quiet",
               "--threads", str(threads), "--max-batch", str(clients), "--model-name", "bench",
               "--provider", provider]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SmolexportError(f"the server did not start: {server.stderr.read().strip()[-300:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SmolexportError("the server did not answer /health within 300 s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_serve_bench(
    export_dir: Path,
    clients: int = 8,
    tokens: int = 128,
    threads: int = 2,
    provider: str = "cpu",
    constrained: bool = False,
) -> dict:
    questions = [QUESTIONS[i % len(QUESTIONS)] + (JSON_INSTRUCTION if constrained else "") for i in range(clients)]
    response_format = RESPONSE_FORMAT if constrained else None
    server, port = start_server(export_dir, threads, clients, provider)
    try:
        stream_chat(port, "bench", questions[0], 8, response_format)  # warm-up
        alone = [stream_chat(port, "bench", q, tokens, response_format) for q in questions]
        results: list[ClientResult] = [ClientResult()] * clients

        def client(i: int) -> None:
            results[i] = stream_chat(port, "bench", questions[i], tokens, response_format)

        workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)
    errors = [r.error for r in alone + results if r.error]
    if errors:
        raise SmolexportError(f"{len(errors)} requests failed during the serve benchmark: {errors[0]}")
    one_client = sum(r.tokens for r in alone) / sum(r.total_s for r in alone)
    aggregate = sum(r.tokens for r in results) / wall
    ttfts = [r.ttft_s for r in results]
    summary = {
        "clients": clients,
        "constrained": constrained,
        "max_tokens": tokens,
        "tokens_generated": sum(r.tokens for r in results),
        "one_client_tok_s": round(one_client, 1),
        "aggregate_tok_s": round(aggregate, 1),
        "aggregate_speedup": round(aggregate / one_client, 2),
        "ttft_ms_alone_p50": round(1000 * statistics.median(r.ttft_s for r in alone), 1),
        "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1),
        "ttft_ms_p95": round(1000 * percentile(ttfts, 0.95), 1),
        "identical_to_alone": sum(a.text == r.text for a, r in zip(alone, results, strict=True)),
        "lost": sum(1 for r in results if r.tokens == 0),
    }
    if constrained:  # answers cut at max_tokens are not complete JSON; the others must match the schema
        summary["complete_json"] = sum(1 for r in results if _summary_card(r.text))
    return summary


def _summary_card(text: str) -> bool:
    try:
        card = json.loads(text)
    except ValueError:
        return False
    return isinstance(card, dict) and set(card) == set(SCHEMA["required"]) and 1 <= card["difficulty"] <= 5
