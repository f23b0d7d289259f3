"""Progress on stderr for long steps, so stdout stays clean for results."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def step(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=self.stream, flush=True)

    def count(self, label: str, done: int, total: int) -> None:
        """A counter redrawn in place on a terminal; in logs, about ten lines in all."""
        if not self.enabled:
            return
        line = f"[{time.perf_counter() - self.start:7.1f}s] {label} {done}/{total}"
        if self.stream.isatty():
            print("\r" + line, end="\n" if done == total else "", file=self.stream, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(line, file=self.stream, flush=True)


SILENT = Progress(enabled=False)
