"""Decode speed of several models in alternation, one process per model and round: A, B, C, A, B, C, ...

    .venv/bin/python benchmarks/decode_ab.py LABEL=KIND:PATH ... [--rounds 6] [--tokens 64] [--bursts 2]

KIND is `ours` (an export folder, smolexport_runtime from the source tree, the project's .venv) or `llamacpp`
(a .gguf, llama-cpp-python in benchmarks/work/venv-peers, AMX refused as in benchmarks/peers/worker.py). Each
round starts every model once, in a process of its own (`worker.py decode`: load, a warm-up burst, then
`--bursts` bursts that each prefill the chat prompt and decode `--tokens` greedy tokens; the round's figure is
the best burst), the order rotating from round to round. One model per process: an idle onnxruntime session's
threads spin after each run and slow whatever runs next in the same process (benchmarks/README.md). Reported:
each model's median and best tokens/s over the rounds (other jobs on a shared machine only ever slow a run),
and the median of its per-round ratios to the first model's (or to `--base LABEL`'s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import PEERS, VENV, WORKER, cpu_model  # noqa: E402


def parse(spec: str) -> tuple[str, str, str]:
    label, _, rest = spec.rpartition("=")
    kind, _, path = rest.partition(":")
    if kind not in ("ours", "llamacpp") or not path:
        raise SystemExit(f"expected LABEL=ours:PATH or LABEL=llamacpp:PATH, got {spec!r}")
    return label or path, kind, path


def workload(first_ours: str, tokens: int, bursts: int, out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes" / "python"))
    from smolexport_runtime import load
    from smolexport_runtime.bench import CHAT_PROMPT

    model = load(first_ours, providers="cpu", verify=False)
    out.write_text(json.dumps({"chat_ids": model.encode(CHAT_PROMPT), "context": 512, "decode_tokens": tokens,
                               "bursts": bursts}))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="LABEL=KIND:PATH")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--base", default=None, metavar="LABEL", help="ratios to this model (default: the first)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    models = [parse(spec) for spec in args.models]
    base_label = args.base or models[0][0]
    tmp = Path(tempfile.mkdtemp(prefix="decode-ab-"))
    ours = next(path for _, kind, path in models if kind == "ours")
    work = workload(ours, args.tokens, args.bursts, tmp / "workload.json")
    load_before = os.getloadavg()[0]
    speeds: dict[str, list[float]] = {label: [] for label, _, _ in models}
    rss: dict[str, float] = {}
    for r in range(args.rounds):
        order = models[r % len(models) :] + models[: r % len(models)]
        for label, kind, path in order:
            python = VENV / "python" if kind == "ours" else PEERS
            out = tmp / "out.json"
            subprocess.run([str(python), str(WORKER), "decode", kind, path, str(work), str(out)], check=True)
            result = json.loads(out.read_text())
            speeds[label].append(max(result["decode_tok_s"]))
            rss[label] = result["peak_rss_mb"]
        print(f"round {r + 1}: " + ", ".join(f"{label} {s[-1]:.1f}" for label, s in speeds.items()), flush=True)
    base = speeds[base_label]
    rows = []
    for label, _, path in models:
        ratio = statistics.median(a / b for a, b in zip(speeds[label], base, strict=True))
        rows.append({"label": label, "path": path, "decode_tok_s": round(statistics.median(speeds[label]), 2),
                     "best_tok_s": round(max(speeds[label]), 2),
                     "ratio_to_base": round(ratio, 3), "rounds": [round(s, 2) for s in speeds[label]],
                     "peak_rss_mb_512": rss[label]})  # fmt: skip
    result = {"cpu": cpu_model(), "load_before": load_before, "load_after": os.getloadavg()[0], "base": base_label,
              "tokens": args.tokens, "bursts": args.bursts, "rounds": args.rounds, "rows": rows}  # fmt: skip
    print(f"\n{result['cpu']}, 2 threads, {args.rounds} rounds, load average {load_before:.2f} -> "
          f"{result['load_after']:.2f}")  # fmt: skip
    print(f"| model | decode tok/s (median of rounds) | best round | / {base_label} (median of per-round ratios) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {row['decode_tok_s']:.1f} | {row['best_tok_s']:.1f} | {row['ratio_to_base']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
