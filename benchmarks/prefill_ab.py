"""Our runtime's 512-token prefill on several export folders, taking turns: does a graph change cost prefill time?

    .venv/bin/python benchmarks/prefill_ab.py OLD_EXPORT NEW_EXPORT [nokeep:NEW_EXPORT] [--rounds 6]

Each folder is loaded once (2 threads); every round prefills the same 512 random token ids (chunks of 128, the
CPU default, logits_to_keep=1, a cache preallocated for 520) once per folder, in turn, after one warm-up each.
Prints the median and the best time per folder. `nokeep:DIR` runs DIR without feeding logits_to_keep, so the
graph's default (0, every position's logits) applies: what a runtime that does not know the input gets.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from smolexport_runtime import load
from smolexport_runtime.generate import prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    decoders = {}
    for name in args.folders:
        decoders[name] = load(name.removeprefix("nokeep:"), threads=2).decoder
        if name.startswith("nokeep:"):
            decoders[name].keeps_logits = False
    ids = [int(i) for i in np.random.default_rng(0).integers(100, 40000, args.tokens)]
    capacity = args.tokens + 8
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for decoder in decoders.values():
        prefill(decoder, ids, capacity=capacity)
    for _ in range(args.rounds):
        for name, decoder in decoders.items():
            start = time.perf_counter()
            prefill(decoder, ids, capacity=capacity)
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        print(f"{name}: keeps_logits={decoders[name].keeps_logits} median {1000 * statistics.median(t):.0f} ms, "
              f"best {1000 * min(t):.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
