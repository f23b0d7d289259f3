"""Fixtures for the sample-app tests: one tiny random Llama exported once per session, and a slow decoder
wrapper for tests that need a generation to still be running when they act (stop, disconnect)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from smolexport_runtime import Model, load

REPO = Path(__file__).resolve().parents[2]
REAL_EXPORT = REPO / "exports" / "smollm2-135m-int4"


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    from tests.conftest import make_tiny_llama

    folder = tmp_path_factory.mktemp("apps") / "tiny-llama"
    # seed 2: greedy answers differ between prompts, so mixed-up answers would show.
    make_tiny_llama(folder, seed=2)
    return folder


@pytest.fixture(scope="session")
def tiny_export(tiny_source) -> Path:
    from smolexport.onnx.export import OnnxExportOptions, export_onnx

    out = tiny_source.parent / "tiny-export"
    export_onnx(str(tiny_source), out, OnnxExportOptions(quant="fp32"))
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_export) -> Model:
    return load(tiny_export)


class SlowDecoder:
    """Wraps a decoder: sleeps `delay` seconds per forward pass, counts passes, and can forbid eos so that
    a generation runs to its token limit."""

    def __init__(self, decoder, delay: float = 0.0, banned: frozenset[int] = frozenset()) -> None:
        self.inner, self.delay, self.banned = decoder, delay, sorted(banned)
        self.calls = 0
        self._lock = threading.Lock()

    def empty_cache(self, batch: int = 1, capacity: int | None = None):
        return self.inner.empty_cache(batch, capacity=capacity)

    def forward(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        logits, cache = self.inner.forward(*args, **kwargs)
        if self.banned:
            logits = np.array(logits, copy=True)
            logits[..., self.banned] = -np.inf
        return logits, cache

    def __getattr__(self, name):
        return getattr(self.inner, name)


def slow_model(export: Path, delay: float, ban_eos: bool = True) -> Model:
    model = load(export)
    model.decoder = SlowDecoder(model.decoder, delay, model.eos_token_ids if ban_eos else frozenset())
    return model
