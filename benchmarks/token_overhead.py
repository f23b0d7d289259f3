"""Per-token overhead of the runtime's decode loop: time outside `session.run` per token.

    .venv/bin/python benchmarks/token_overhead.py EXPORT_DIR [--tokens 256] [--rounds 3]

Decodes greedily after a chat prompt, timing each `run_with_iobinding` call, and reports per token: the whole
step (`decode_one_token` + argmax), the part inside onnxruntime, and the rest (binding inputs, reading logits,
Python). Two loops in alternating rounds: the runtime's (one IO binding kept for the cache buffer, logits
written into a buffer bound once) and the loop it replaced (a new IO binding per step, every cache buffer bound
as input and output, outputs read back with `get_outputs`), rebuilt here for the comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from smolexport_runtime import load
from smolexport_runtime.generate import decode_one_token, ones_mask, prefill

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import cpu_model  # noqa: E402


def old_forward(decoder, token: int, cache, length: int):
    """The decode step before the kept binding: rebinds all 2 x layers buffers and reads every output back."""
    binding = decoder.session.io_binding()
    binding.bind_cpu_input("input_ids", np.array([[token]], dtype=np.int64))
    binding.bind_cpu_input("attention_mask", np.ones((1, length + 1), dtype=np.int64))
    binding.bind_cpu_input("position_ids", np.array([[length]], dtype=np.int64))
    if decoder.keeps_logits:
        keep = ort.OrtValue.ortvalue_from_numpy(np.array([0], dtype=np.int64))  # an overridable initializer
        binding.bind_ortvalue_input("logits_to_keep", keep)
    for name, value in zip(decoder.past_names, cache, strict=True):
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("logits", "cpu")
    for name, value in zip(decoder.output_names[1:], cache, strict=True):
        binding.bind_ortvalue_output(name, value)
    decoder.session.run_with_iobinding(binding)
    logits, *_ = binding.get_outputs()
    return logits.numpy()[0, -1], cache, length + 1


def measure(model, ids: list[int], tokens: int, step) -> dict:
    decoder = model.decoder
    inside = [0.0]
    run = decoder.session.run_with_iobinding

    def timed_run(binding, *args):
        start = time.perf_counter()
        result = run(binding, *args)
        inside[0] += time.perf_counter() - start
        return result

    logits, cache, length = prefill(decoder, ids, capacity=len(ids) + tokens + 1)
    token = int(np.argmax(logits))
    decoder.session.run_with_iobinding = timed_run
    try:
        start = time.perf_counter()
        for _ in range(tokens):
            logits, cache, length = step(decoder, token, cache, length)
            token = int(np.argmax(logits))
        total = time.perf_counter() - start
    finally:
        del decoder.session.run_with_iobinding
    return {"ms_per_token": 1000 * total / tokens, "outside_us": 1e6 * (total - inside[0]) / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = load(args.export_dir, providers="cpu", threads=2, verify=False)
    ids = model.encode("What is the capital of France?")
    ones_mask(len(ids) + args.tokens + 1)
    loops = {"runtime (kept binding)": decode_one_token, "per-step binding (before)": old_forward}
    results: dict[str, list[dict]] = {name: [] for name in loops}
    measure(model, ids, 16, decode_one_token)  # warm-up
    for _ in range(args.rounds):
        for name, step in loops.items():
            results[name].append(measure(model, ids, args.tokens, step))
    summary = {
        "cpu": cpu_model(),
        "export": args.export_dir,
        **{
            name: {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}
            for name, rounds in results.items()
        },
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
