"""What a speculative-decoding verification step costs: one forward pass over k new tokens after a cached context.

    .venv/bin/python benchmarks/verify_cost.py TARGET_EXPORT [--draft DRAFT_EXPORT] [--context 512] [--rounds 9]

For each export, in a process of its own (`--measure`): load with 2 threads, prefill `--context` tokens of the
bench filler into a CacheState (the runtime's kv_state, as speculation uses it), then time
`CacheState.verify(ids)` for k = 1 to 9, 12 and 16 new tokens (every row's logits come back, as a
verifier needs them), truncating back to the context after each. The k values take turns within each round
(one warm-up round first); reported per k: the median over rounds and its ratio to k = 1. A plain one-token
decode step (`CacheState.decode`) is timed in the same rounds.

With `--draft` (e.g. the 135M int4 export as the draft for the 1.7B target) it also writes, for draft lengths
k = 2..8, the per-token acceptance rate a at which draft-model speculation starts to beat plain decoding: a
round costs k * t_draft(1) + t_verify(k + 1) and yields (1 - a^(k+1)) / (1 - a) tokens on average (every
accepted draft token plus the target's own next token), against t_target(1) per token without speculation.
(The draft's own verification-free catch-up after a rejection is ignored: with a KV-cached draft it is a
truncation.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16)  # 5, 7, 9: the verify steps of draft lengths 4, 6, 8


def measure(export: Path, context: int, rounds: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT / "runtimes" / "python"))
    from smolexport_runtime import load
    from smolexport_runtime.bench import prompt_of_length
    from smolexport_runtime.kv_state import CacheState

    model = load(export, providers="cpu", threads=threads, verify=False)
    ids = prompt_of_length(model, context + max(KS))
    state = CacheState(model.decoder, model.context_length)
    state.reserve(context + max(KS))
    state.extend(ids[:context])
    times: dict[str, list[float]] = {str(k): [] for k in KS} | {"decode": []}
    for r in range(rounds + 1):  # round 0 warms up
        for k in KS:
            start = time.perf_counter()
            logits = state.verify(ids[context : context + k])
            elapsed = time.perf_counter() - start
            assert logits.shape[0] == k
            state.truncate(context)
            if r:
                times[str(k)].append(elapsed)
        start = time.perf_counter()
        state.decode(ids[context])
        elapsed = time.perf_counter() - start
        state.truncate(context)
        if r:
            times["decode"].append(elapsed)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "export": str(export),
        "recipe": model.manifest.quant.get("recipe"),
        "context": context,
        "rounds": rounds,
        "threads": threads,
        "ms": {k: round(v, 2) for k, v in ms.items()},
        "ratio_to_k1": {k: round(ms[k] / ms["1"], 3) for k in ms},
        "all_ms": {k: [round(1000 * t, 2) for t in v] for k, v in times.items()},
    }


def tokens_per_round(a: float, k: int) -> float:
    return float(k + 1) if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)


def break_even(t_target: float, t_draft: float, t_verify: float, k: int) -> float | None:
    """The per-token acceptance rate above which speculation with draft length k is faster; None if even
    a = 1 does not pay."""
    cost = k * t_draft + t_verify
    if tokens_per_round(1.0, k) * t_target <= cost:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_round(mid, k) * t_target <= cost else (lo, mid)
    return hi


def child(export: Path, args) -> dict:
    out = subprocess.run([sys.executable, __file__, str(export), "--measure", "--context", str(args.context),
                          "--rounds", str(args.rounds), "--threads", str(args.threads)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--draft", type=Path, default=None)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.export, args.context, args.rounds, args.threads)))
        return
    load_before = os.getloadavg()[0]
    results = {"cpu": cpu_model(), "load_before": load_before, "target": child(args.export, args)}
    if args.draft:
        results["draft"] = child(args.draft, args)
    results["load_after"] = os.getloadavg()[0]
    print(f"{results['cpu']}, {args.threads} threads, {args.context} cached tokens, median of {args.rounds} rounds, "
          f"load average {load_before:.2f} -> {results['load_after']:.2f}")  # fmt: skip
    which = ["target"] + (["draft"] if args.draft else [])
    print("| k | " + " | ".join(f"{w} ms | {w} / k=1" for w in which) + " |")
    print("|---|" + "---|---|" * len(which))
    for k in [*map(str, KS), "decode"]:
        cells = [f"{results[w]['ms'][k]:.1f} | {results[w]['ratio_to_k1'][k]:.2f}" for w in which]
        print(f"| {k} | " + " | ".join(cells) + " |")
    if args.draft:
        t_target, t_draft = results["target"]["ms"]["1"], results["draft"]["ms"]["1"]
        rows = []
        for k in range(2, 9):
            verify = results["target"]["ms"][str(k + 1)]
            a = break_even(t_target, t_draft, verify, k)
            round_ms = k * t_draft + verify
            rows.append({"k": k, "verify_ms": round(verify, 2), "round_ms": round(round_ms, 2),
                         "break_even_acceptance": None if a is None else round(a, 3),
                         "speedup_at": {str(p): round(tokens_per_round(p, k) * t_target / round_ms, 2)
                                        for p in (0.6, 0.7, 0.8, 0.9)}})  # fmt: skip
        results["speculation"] = rows
        print(f"\ndraft k=1 {t_draft:.1f} ms, target k=1 {t_target:.1f} ms")
        print(
            "| draft length k | round ms (k drafts + verify k+1) | acceptance needed to win | "
            "speedup at a = 0.6 / 0.7 / 0.8 / 0.9 |"
        )
        print("|---|---|---|---|")
        for row in rows:
            a = row["break_even_acceptance"]
            s = row["speedup_at"]
            print(
                f"| {row['k']} | {row['round_ms']:.1f} | {'never' if a is None else f'{a:.3f}'} | "
                f"{s['0.6']:.2f} / {s['0.7']:.2f} / {s['0.8']:.2f} / {s['0.9']:.2f} |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
