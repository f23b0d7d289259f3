"""Constrained decoding's cost on an export: schema compile time, mask time per token (p50/p99) against a
decode step, and tokens/s constrained vs free text, in one process.

    .venv/bin/python benchmarks/structured.py exports/smollm2-135m-int4 [--threads 2] [--rounds 3]

Free text and constrained answers alternate round by round (the CPU's speed drifts between runs); the JSON is
the realistic "order" schema of tests/runtime/test_constraints.py, with many fixed keys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import numpy as np
from smolexport_runtime import load
from smolexport_runtime.constraints import ConstrainedSampler, parse_response_format
from smolexport_runtime.sampling import greedy

from tests.runtime.test_constraints import PROMPTS, REALISTIC


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = load(args.export, providers="cpu", threads=args.threads)
    started = time.perf_counter()
    grammar = model.grammar_tokenizer()
    tokenizer_s = time.perf_counter() - started
    schema = REALISTIC["order"]
    compile_ms = []
    for _ in range(5):
        started = time.perf_counter()
        compiled = grammar.compile(parse_response_format(schema))
        ConstrainedSampler(greedy, grammar, compiled)
        compile_ms.append((time.perf_counter() - started) * 1e3)

    # Mask time per token: the grammar's allowed set at every step of a real constrained answer.
    mask_us, sampler = [], ConstrainedSampler(greedy, grammar, compiled)
    original = sampler.allowed

    def timed_allowed():
        started = time.perf_counter()
        allowed = original()
        mask_us.append((time.perf_counter() - started) * 1e6)
        return allowed

    sampler.allowed = timed_allowed
    free_tps, json_tps, decode_ms = [], [], []
    for _ in range(args.rounds):
        model.reset()
        model.generate(PROMPTS["order"], max_new_tokens=96, greedy=True)
        free_tps.append(model.last_stats.decode_tok_s)
        decode_ms.append(1e3 / model.last_stats.decode_tok_s)
        model.reset()
        model.generate(PROMPTS["order"], max_new_tokens=160, response_format=schema)
        json_tps.append(model.last_stats.decode_tok_s)
    ids = model.encode(PROMPTS["order"])
    model.reset()
    from smolexport_runtime.kv_state import CacheState

    state = CacheState(model.decoder, limit=model.context_length)
    state.reserve(len(ids) + 200)
    logits = state.extend(ids)
    for _ in range(160):
        token = sampler(logits)
        if token in model.eos_token_ids:
            break
        logits = state.decode(token)
    step_ms = statistics.median(decode_ms)
    print(json.dumps({
        "cpu": cpu_model(), "threads": args.threads, "export": args.export,
        "llguidance_tokenizer_s": round(tokenizer_s, 3),
        "schema_compile_ms_median": round(statistics.median(compile_ms), 2),
        "mask_us_p50": round(float(np.percentile(mask_us, 50)), 1),
        "mask_us_p99": round(float(np.percentile(mask_us, 99)), 1),
        "mask_tokens": len(mask_us),
        "decode_step_ms_free": round(step_ms, 2),
        "mask_p99_share_of_step": round(float(np.percentile(mask_us, 99)) / 1e3 / step_ms, 3),
        "free_tok_s": [round(x, 1) for x in free_tps],
        "json_tok_s": [round(x, 1) for x in json_tps],
        "json_over_free": round(statistics.median(json_tps) / statistics.median(free_tps), 2),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
