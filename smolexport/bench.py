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


def run_bench(export_dir: Path, threads: int = 2, runs: int = 3, context: int = 2048, provider: str = "cpu") -> dict:
    load_manifest(export_dir)  # a damaged or missing export fails here with a clear message
    command = [sys.executable, "-m", "smolexport_runtime.bench", str(export_dir), "--threads", str(threads),
               "--runs", str(runs), "--context", str(context), "--providers", provider]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0:
        last = (process.stderr.strip().splitlines() or ["no output"])[-1]
        raise SmolexportError(f"the benchmark process failed: {last}")
    return json.loads(process.stdout)
