"""Constrained decoding's cost on an export (`smolexport bench --scenario structured`), in one process:

- schema compile time: parse + compile + a fresh matcher (`Model.sampler` with the schema), median of 5;
- mask time per token, p50 / p99: the grammar's allowed set over the whole vocabulary (49,152 tokens for
  SmolLM2), timed at every sampled token of the constrained answers below, where a real answer computes it
  (right after the step's forward pass; onnxruntime's threads and the model's memory traffic share the CPU
  with it). Tokens the grammar forces (fixed keys, punctuation) need no mask;
- tokens/s, constrained JSON against free text on the same prompt, greedy; rounds alternate (the CPU's speed
  drifts between runs). Constrained answers run the tokens the grammar forces as one multi-token step, so
  they can decode faster than free text.

The schema is a realistic "order" (nested objects, a bounded array, an enum, patterns, many fixed keys).

    python -m smolexport_runtime.bench_structured EXPORT_DIR [--threads 2] [--runs 3]

prints one JSON line. Needs llguidance (`pip install 'smolexport-runtime[structured]'`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .constraints import ConstrainedSampler, parse_response_format
from .generate import GenerationStats
from .model import Model, load
from .sampling import Sampler, SamplingConfig, greedy
from .sequence import stream_generate

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                    "price": {"type": "number", "minimum": 0, "maximum": 1000},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "status": {"enum": ["new", "paid", "shipped"]},
        "note": {"type": "string", "maxLength": 30},
    },
    "required": ["items", "status"],
    "additionalProperties": False,
}
PROMPT = "Turn this into an order: two ABC-123 at 9.50 each and one XYZ-777 at 120, already paid."
FREE_TOKENS = 96
JSON_TOKENS = 160
COMPILES = 5


def compile_ms(model: Model, schema: Any, repeats: int = COMPILES) -> list[float]:
    """Milliseconds to turn `schema` into a ready constrained sampler (parse, compile, matcher), each time."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.sampler(SamplingConfig(greedy=True), schema)
        times.append((time.perf_counter() - started) * 1e3)
    return times


class TimedMasks(ConstrainedSampler):
    """A constrained sampler that appends the microseconds of each mask it computes to `times`: the masks a
    real answer pays for, each right after the forward pass that produced the step's logits (the tokens the
    grammar forces need none)."""

    def __init__(self, model: Model, schema: Any, times: list[float]) -> None:
        grammar = model.grammar_tokenizer()
        super().__init__(greedy, grammar, grammar.compile(parse_response_format(schema)))
        self.times = times

    def allowed(self) -> np.ndarray:
        started = time.perf_counter()
        mask = super().allowed()
        self.times.append((time.perf_counter() - started) * 1e6)
        return mask


def answer(model: Model, prompt: str, sampler: Sampler, max_new_tokens: int) -> tuple[str, GenerationStats]:
    """One greedy answer on a fresh cache, through the runtime's own token loop."""
    stats = GenerationStats()
    pieces = stream_generate(
        model.decoder, model.tokenizer, model.encode(prompt), sampler, max_new_tokens=max_new_tokens,
        eos_token_ids=model.eos_token_ids, context_length=model.context_length, stats=stats,
    )  # fmt: skip
    return "".join(pieces), stats


def run(model: Model, runs: int = 3, schema: Any = None, prompt: str = PROMPT) -> dict[str, Any]:
    """The report: see the module doc. `runs` rounds of free text then constrained JSON, alternating."""
    schema = SCHEMA if schema is None else schema
    started = time.perf_counter()
    grammar = model.grammar_tokenizer()
    tokenizer_s = time.perf_counter() - started
    compiles = compile_ms(model, schema)
    free_tps, json_tps, masks, json_tokens = [], [], [], []
    valid = True
    for _ in range(runs):
        _, stats = answer(model, prompt, greedy, FREE_TOKENS)
        free_tps.append(stats.decode_tok_s)
        text, stats = answer(model, prompt, TimedMasks(model, schema, masks), JSON_TOKENS)
        json_tps.append(stats.decode_tok_s)
        json_tokens.append(stats.completion_tokens)
        try:
            json.loads(text)
        except ValueError:  # cut by max_new_tokens: still a fair timing, but say so
            valid = False
    if not masks:
        raise RuntimeError("no mask was timed: the grammar forced every token")
    free, constrained = statistics.median(free_tps), statistics.median(json_tps)
    step_ms = 1e3 / free if free > 0 else None
    p50, p99 = (float(np.percentile(masks, q)) for q in (50, 99))
    return {
        "cpu": cpu_model(),
        "runs": runs,
        "vocab_size": grammar.vocab_size,
        "grammar_tokenizer_s": round(tokenizer_s, 3),
        "compile_ms": round(statistics.median(compiles), 3),
        "mask_us_p50": round(p50, 1),
        "mask_us_p99": round(p99, 1),
        "masked_tokens": len(masks),  # sampled under a mask; the rest of json_tokens were forced
        "decode_step_ms_free": None if step_ms is None else round(step_ms, 2),
        "mask_p99_share_of_step": None if step_ms is None else round(p99 / 1e3 / step_ms, 3),
        "free_tok_s": round(free, 1),
        "json_tok_s": round(constrained, 1),
        "json_over_free": round(constrained / free, 2) if free > 0 else None,
        "json_tokens": sum(json_tokens),
        "json_complete": valid,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smolexport_runtime.bench_structured", description=__doc__.splitlines()[0]
    )
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="rounds of free text and constrained JSON")
    parser.add_argument("--providers", default="cpu")
    args = parser.parse_args(argv)
    model = load(args.export_dir, providers=args.providers, threads=args.threads, verify=False)
    result = {"threads": args.threads, **run(model, runs=max(1, args.runs))}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
