"""Progress on stderr for long steps, so stdout stays clean for results.

Counted work (layers of an export, prompts of a validation) shows a tqdm bar with the time left on a terminal;
in logs, about ten lines in all, each with tqdm's own estimate of the time left.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._bar: tqdm | None = None
        self._counting: tuple[str, float] | None = None  # (label, when its count started), for log lines

    def _stamp(self) -> str:
        return f"[{time.perf_counter() - self.start:7.1f}s]"

    def step(self, message: str) -> None:
        if self.enabled:
            self._close_bar()
            print(f"{self._stamp()} {message}", file=self.stream, flush=True)

    def count(self, label: str, done: int, total: int) -> None:
        """`done` of `total` units of `label` finished: call it with 0 when the work starts (the clock of the
        time-left estimate), then as units finish, up to `total`."""
        if not self.enabled:
            return
        if self.stream.isatty():
            if self._bar is None or self._bar.desc != label or self._bar.total != total:
                self._close_bar()
                self._bar = tqdm(total=total, desc=label, file=self.stream, unit=f" {label}", leave=True)
            self._bar.update(done - self._bar.n)
            if done >= total:
                self._close_bar()
            return
        if self._counting is None or self._counting[0] != label or done == 0:
            self._counting = (label, time.perf_counter())
        if done and (done == total or done % max(1, total // 10) == 0):
            elapsed = time.perf_counter() - self._counting[1]
            meter = tqdm.format_meter(done, total, elapsed, ncols=0, unit=f" {label}")
            print(f"{self._stamp()} {label} {meter}", file=self.stream, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


SILENT = Progress(enabled=False)
