"""Core ML exports (`smolexport coreml`) behind the same generation API as ONNX exports.

    from smolexport_runtime.coreml import load_coreml
    model = load_coreml("exports/smollm2-135m-coreml-int4")      # macOS 15+ / iOS 18+, needs coremltools
    print(model.generate("What is the capital of France?", max_new_tokens=32))

The ML Program keeps its KV cache in Core ML states, updated in place; each call passes the new tokens and
a causal mask [1, 1, S, P+S] whose width tells the model how many tokens are cached. It returns the last
position's logits. `CoreMLDecoder` adapts that to the runtime's decoder contract, so streaming, sampling, stop
strings and chat templates are shared with ONNX. A `runner` other than Core ML can be plugged in: smolexport's
NumPy reference interpreter runs the same package on Linux for validation.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .chat import load_chat_template
from .errors import SmolexportRuntimeError
from .manifest import MANIFEST_NAME, verify_files
from .model import Model
from .tokenizer import eos_token_ids, load_tokenizer, read_json

FORMAT = "smolexport-coreml"
FORMAT_VERSION = 2  # 2 = version 1 plus exports with logits for every position (io.logits_positions "all")


class Runner(Protocol):
    def new_state(self) -> Any: ...

    def predict(self, inputs: dict[str, np.ndarray], state: Any) -> dict[str, np.ndarray]: ...


class CoreMLRunner:
    """Apple's Core ML: `MLModel.predict` with a state from `make_state()` (macOS 15+)."""

    def __init__(self, package: Path, compute_units: str = "ALL"):
        if sys.platform != "darwin":
            raise SmolexportRuntimeError(
                "Core ML runs on macOS/iOS only; on Linux use smolexport's reference interpreter"
            )
        try:
            import coremltools as ct
        except ImportError:
            raise SmolexportRuntimeError(
                "running Core ML exports needs coremltools: pip install coremltools"
            ) from None
        if not hasattr(ct.ComputeUnit, compute_units):
            raise SmolexportRuntimeError(
                f"unknown compute_units {compute_units!r}: use ALL, CPU_AND_GPU, CPU_AND_NE or CPU_ONLY"
            )
        self.model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, compute_units))

    def new_state(self):
        return self.model.make_state()

    def predict(self, inputs, state):
        return self.model.predict(inputs, state=state)


def causal_mask(new_tokens: int, total: int) -> np.ndarray:
    """[1, 1, new, total] fp16: 0 where a new token may attend, -inf elsewhere."""
    past = total - new_tokens
    columns = np.arange(total)[None, :]
    rows = past + np.arange(new_tokens)[:, None]
    return np.where(columns <= rows, 0.0, -np.inf).astype(np.float16)[None, None]


class CoreMLCache(list):
    """A kv_cache.KVCache over [handle]: the program's state (updated in place) and how many tokens it holds.
    The state has room for the whole context, so it never grows (capacity None: nothing to reserve)."""

    @property
    def capacity(self) -> None:
        return None

    def truncated(self, length: int) -> CoreMLCache:
        """Forgets the positions from `length` on (prefix reuse): the program writes each step at the cached
        length and attends through the causal mask, so the state needs no change."""
        self[0]["length"] = min(self[0]["length"], length)
        return self

    def host_arrays(self) -> list[np.ndarray]:
        raise SmolexportRuntimeError("a Core ML program's state cannot be read out: no prompt cache files")


class CoreMLDecoder:
    """The runtime's decoder contract over a stateful Core ML program; its cache is a `CoreMLCache`."""

    def __init__(self, runner: Runner, vocab_size: int, all_logits: bool = False):
        self.runner = runner
        self.providers = [type(runner).__name__]
        self.vocab_size = vocab_size
        self.all_logits = all_logits  # exported with --all-logits: [1, S, vocab] instead of [1, 1, vocab]

    def empty_cache(self, batch: int = 1, capacity: int | None = None) -> CoreMLCache:
        if batch != 1:
            raise SmolexportRuntimeError("Core ML exports generate one sequence at a time (batch 1)")
        return CoreMLCache([{"state": self.runner.new_state(), "length": 0}])

    def _run(self, ids: np.ndarray, handle: dict) -> np.ndarray:
        total = handle["length"] + ids.shape[1]
        inputs = {"input_ids": ids.astype(np.int32), "causal_mask": causal_mask(ids.shape[1], total)}
        out = self.runner.predict(inputs, handle["state"])
        handle["length"] = total
        return np.asarray(out["logits"], dtype=np.float32).reshape(1, -1, self.vocab_size)

    def forward(self, input_ids, attention_mask, position_ids, past: Sequence[dict], logits_to_keep: int = 0):
        handle = past[0]
        cache = CoreMLCache([handle])
        if attention_mask.shape[1] != handle["length"] + input_ids.shape[1]:
            raise SmolexportRuntimeError(
                "attention_mask does not match the cached length (Core ML: no padding)"
            )
        if logits_to_keep == 1 or input_ids.shape[1] == 1:
            return self._run(input_ids, handle)[:, -1:], cache
        if self.all_logits:
            return self._run(input_ids, handle), cache
        # The program returns the last position only: all positions means one token at a time.
        rows = [self._run(input_ids[:, i : i + 1], handle) for i in range(input_ids.shape[1])]
        return np.concatenate(rows, axis=1), cache


def load_coreml(
    path: str | Path, runner: Runner | None = None, verify: bool = True, compute_units: str = "ALL"
) -> Model:
    """An export folder as a Model. `compute_units`: ALL, CPU_AND_GPU, CPU_AND_NE or CPU_ONLY (Core ML's
    choice of hardware); `runner` replaces Core ML, e.g. with smolexport's reference interpreter."""
    folder = Path(path)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SmolexportRuntimeError(
            f"{folder} is not a smolexport export folder: {MANIFEST_NAME} is missing"
        )
    raw = json.loads(manifest_path.read_text())
    if raw.get("format") != FORMAT:
        raise SmolexportRuntimeError(f"{folder} holds format {raw.get('format')!r}, not {FORMAT!r}")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise SmolexportRuntimeError(
            f"{folder} was written by a newer smolexport (format version {raw['format_version']}); "
            "upgrade smolexport-runtime"
        )
    if verify:
        verify_files(folder, raw["files"])
    spec = raw["model"]
    all_logits = raw.get("io", {}).get("logits_positions", "last") == "all"
    decoder = CoreMLDecoder(
        runner or CoreMLRunner(folder / raw["package"], compute_units), spec["vocab_size"], all_logits
    )
    tokenizer = load_tokenizer(folder)
    tokenizer_config = read_json(folder / "tokenizer_config.json")
    model = Model(
        decoder,
        tokenizer,
        context_length=raw["model"]["context_length"],
        eos_token_ids=eos_token_ids(
            read_json(folder / "generation_config.json"), tokenizer_config, tokenizer
        ),
        chat_template=load_chat_template(folder, tokenizer_config),
    )
    model.raw_manifest = raw
    return model
