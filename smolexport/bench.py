"""`smolexport bench`: runs the runtime's benchmark workload in a fresh process.

A process of its own, importing only the runtime, so that peak memory is what an app would see (the CLI
process has click, and possibly torch, loaded).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from smolexport_runtime.manifest import load_manifest

from .errors import SmolexportError

SCENARIOS = ("speed", "chat", "cold", "structured", "serve")


def run_bench(
    export_dir: Path,
    threads: int = 2,
    runs: int = 3,
    context: int = 2048,
    provider: str = "cpu",
    scenarios: tuple[str, ...] = ("speed",),
    clients: int = 8,
    serve_tokens: int = 128,
    serve_constrained: bool = False,
) -> dict:
    """The chosen workloads, each in processes of its own: `speed` (time to first token, decode, memory),
    `chat` (a replayed 8-turn chat, time to first token per turn with and without prefix reuse), `cold`
    (process start to first token), `structured` (constrained decoding: schema compile time, mask time per
    token, tokens/s of JSON against free text), `serve` (N concurrent streaming clients against
    `smolexport serve`)."""
    load_manifest(export_dir)  # a damaged or missing export fails here with a clear message
    result: dict = {}
    common = ["--threads", str(threads), "--runs", str(runs), "--providers", provider]
    if "speed" in scenarios:
        result.update(_runtime_process("bench", export_dir, [*common, "--context", str(context)]))
    if "chat" in scenarios:
        result["chat"] = _runtime_process("bench_chat", export_dir, common)
    if "cold" in scenarios:
        result.update(_runtime_process("bench_chat", export_dir, [*common, "--cold"]))
    if "structured" in scenarios:
        result["structured"] = _runtime_process("bench_structured", export_dir, common)
    if "serve" in scenarios:
        from .bench_serve import run_serve_bench

        result["serve"] = run_serve_bench(
            export_dir, clients=clients, tokens=serve_tokens, threads=threads, provider=provider,
            constrained=serve_constrained,
        )  # fmt: skip
    return result


def _runtime_process(module: str, export_dir: Path, args: list[str]) -> dict:
    command = [sys.executable, "-m", f"smolexport_runtime.{module}", str(export_dir), *args]
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0:
        last = (process.stderr.strip().splitlines() or ["no output"])[-1]
        raise SmolexportError(f"the benchmark process failed: {last}")
    return json.loads(process.stdout.strip().splitlines()[-1] if module == "bench_chat" else process.stdout)
