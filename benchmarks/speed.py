"""Speed table: the `smolexport bench` workload for smolexport's exports and for the peers, on the same weights.

    .venv/bin/python benchmarks/speed.py [--model 135m 1.7b] [--runs 3] [--output benchmarks/results]

Run it on a quiet machine, with the project's .venv, after benchmarks/fidelity.py has built the 135M variants
(benchmarks/work/fidelity/orig/) and benchmarks/setup_peers.sh the peer venvs. For 1.7B it builds (when
missing) the variants of the random-weight 1.7B-shaped folder under benchmarks/work/speed-1.7b/.

Workload (runtimes/python/smolexport_runtime/bench.py; the token ids come from the export's tokenizer and are
handed to every runtime): time to first token of the chat prompt (CHAT_PROMPT, chat template) and of a
512-token prompt (FILLER), greedy decode of 128 tokens after the chat prompt with eos ignored (genai: eos
masked through min_length), peak RSS after a 2,048-token context; medians of `--runs` after a warm-up; 2
threads everywhere. Each variant runs in a process of its own, one after the other.

The bandwidth limit: a two-thread numpy copy of a 1 GiB array gives the copy bandwidth (bytes read + written
per second); the limit on decode tokens/s is that bandwidth / the weight bytes a token streams (the model file
size: every weight is read once per token).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import BENCH, OPTIMUM, PEERS, VENV, WORK, WORKER, artifact_bytes, build_genai, build_gguf, run  # noqa: E402

ORIG = WORK / "fidelity" / "orig"
SPEED17 = WORK / "speed-1.7b"
RANDOM17 = WORK / "smollm2-1.7b-random"


def variants_135m() -> list[dict]:
    return [
        # built by benchmarks/fidelity.py, at the default MatMulNBits accuracy level 4
        {"name": "smolexport int4 (rtn)", "kind": "ours", "path": ORIG / "smolexport-int4-rtn"},
        {"name": "smolexport int4 --preset quality", "kind": "ours", "path": ORIG / "smolexport-int4--preset-quality"},
        {"name": "smolexport int8", "kind": "ours", "path": ORIG / "smolexport-int8"},
        {"name": "smolexport int4 --kv-cache fp16", "kind": "ours", "path": WORK / "exports" / "135m-int4-kv16",
         "flags": ["--quant", "int4", "--preset", "rtn", "--kv-cache", "fp16"]},
        {"name": "onnxruntime-genai int4", "kind": "genai", "path": ORIG / "genai-int4"},
        {"name": "onnxruntime-genai int8", "kind": "genai", "path": ORIG / "genai-int8"},
        {"name": "llama.cpp Q4_0", "kind": "llamacpp", "path": ORIG / "llamacpp-q4_0.gguf"},
        {"name": "llama.cpp Q4_K_M", "kind": "llamacpp", "path": ORIG / "llamacpp-q4_k_m.gguf"},
        {"name": "llama.cpp Q8_0", "kind": "llamacpp", "path": ORIG / "llamacpp-q8_0.gguf"},
        {"name": "optimum int4 (MatMulNBits)", "kind": "optimum", "path": ORIG / "optimum-int4"},
        {"name": "optimum fp32", "kind": "optimum", "path": ORIG / "optimum-fp32"},
        {"name": "PyTorch eager fp32", "kind": "torch", "path": WORK / "smollm2-135m-instruct"},
    ]  # fmt: skip


def variants_17b() -> list[dict]:
    """Builds (when missing) the 1.7B-shaped variants: ours int4, genai int4, llama.cpp Q4_0."""
    SPEED17.mkdir(parents=True, exist_ok=True)
    ours = WORK / "exports" / "smollm2-1.7b-random-int4"
    if not (ours / "smolexport.json").exists():
        run([VENV / "smolexport", "onnx", "--model", RANDOM17, "--quant", "int4", "--preset", "rtn", "--output", ours,
             "--force", "-q"])  # fmt: skip
    kv16 = WORK / "exports" / "smollm2-1.7b-random-int4-kv16"
    if not (kv16 / "smolexport.json").exists():
        run([VENV / "smolexport", "onnx", "--model", RANDOM17, "--quant", "int4", "--preset", "rtn", "--kv-cache",
             "fp16", "--output", kv16, "--force", "-q"])  # fmt: skip
    genai = build_genai(RANDOM17, SPEED17 / "genai-int4", "int4", SPEED17 / "genai-cache")
    f16 = SPEED17 / "llamacpp-f16.gguf"
    q4 = build_gguf(RANDOM17, SPEED17 / "llamacpp-q4_0.gguf", "Q4_0", f16, keep_source=False)
    return [
        {"name": "smolexport int4 (rtn)", "kind": "ours", "path": ours},
        {"name": "smolexport int4 --kv-cache fp16", "kind": "ours", "path": kv16},
        {"name": "onnxruntime-genai int4", "kind": "genai", "path": genai},
        {"name": "llama.cpp Q4_0", "kind": "llamacpp", "path": q4},
    ]


def copy_bandwidth(gib: float = 1.0, threads: int = 2, repeats: int = 5) -> float:
    """Bytes read + written per second by `threads` threads copying halves of a `gib` GiB array (best of repeats)."""
    src = np.ones(int(gib * 2**30) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(len(src)), threads)
    bounds = [(p[0], p[-1] + 1) for p in parts]

    def copy(lo, hi):
        np.copyto(dst[lo:hi], src[lo:hi])  # numpy releases the GIL for the copy

    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=copy, args=b) for b in bounds]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def workload(tokenizer_export: Path, runs: int, out: Path) -> Path:
    from smolexport_runtime import load
    from smolexport_runtime.bench import CHAT_PROMPT, prompt_of_length

    model = load(tokenizer_export, providers="cpu", verify=False)
    data = {
        "chat_ids": model.encode(CHAT_PROMPT),
        "long_ids": prompt_of_length(model, 512),
        "context_ids": prompt_of_length(model, 2048 - 16),
        "context": 2048,
        "decode_tokens": 128,
        "runs": runs,
    }
    out.write_text(json.dumps(data))
    return out


def measure(v: dict, work_file: Path, runs: int, tmp: Path, reuse: bool = False) -> dict:
    if "flags" in v and not (v["path"] / "smolexport.json").exists():
        run([VENV / "smolexport", "onnx", "--model", WORK / "smollm2-135m-instruct", *v["flags"], "--output", v["path"],
             "--force", "-q"])  # fmt: skip
    out = tmp / f"{v['kind']}-{Path(v['path']).name}.json"
    if reuse and out.exists():
        pass
    elif v["kind"] == "ours":
        run([VENV / "smolexport", "bench", v["path"], "--threads", "2", "--runs", runs, "--json", out],
            stdout=subprocess.DEVNULL)  # fmt: skip
    else:
        python = OPTIMUM / "python" if v["kind"] == "optimum" else VENV / "python" if v["kind"] == "torch" else PEERS
        run([python, WORKER, "speed", v["kind"], v["path"], work_file, out], stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    weights = artifact_bytes(Path(v["path"])) if v["kind"] != "torch" else fp32_bytes(Path(v["path"]))
    return {"variant": v["name"], "weights_mb": weights / 1e6, **{k: result[k] for k in
            ("ttft_ms_chat", "ttft_ms_long", "decode_tok_s", "peak_rss_mb")}}  # fmt: skip


def fp32_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def markdown(rows: list[dict], bandwidth: float, title: str) -> str:
    base = {r["variant"]: r for r in rows}
    genai, llama = base.get("onnxruntime-genai int4"), base.get("llama.cpp Q4_0")

    def ratio(r, b, key):
        return f"{r[key] / b[key]:.2f}" if b else "n/a"

    lines = [
        f"**{title}** (copy bandwidth {bandwidth / 1e9:.1f} GB/s, 2 threads)",
        "",
        "| variant | weights MB | TTFT chat ms | TTFT 512 ms | decode tok/s | bandwidth limit tok/s | "
        "decode / genai int4 | decode / llama.cpp Q4_0 | TTFT 512 / genai int4 | TTFT 512 / llama.cpp Q4_0 | "
        "peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        limit = bandwidth / (r["weights_mb"] * 1e6)
        lines.append(
            f"| {r['variant']} | {r['weights_mb']:.0f} | {r['ttft_ms_chat']:.0f} | {r['ttft_ms_long']:.0f} | "
            f"{r['decode_tok_s']:.1f} | {limit:.0f} | {ratio(r, genai, 'decode_tok_s')} | "
            f"{ratio(r, llama, 'decode_tok_s')} | {ratio(r, genai, 'ttft_ms_long')} | "
            f"{ratio(r, llama, 'ttft_ms_long')} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=["135m", "1.7b"], default=["135m"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=None, help="run only variants whose name contains this")
    parser.add_argument("--reuse", action="store_true", help="keep results already in benchmarks/work/speed/")
    parser.add_argument("--output", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    tmp = WORK / "speed"
    tmp.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    bandwidth = copy_bandwidth()
    results, text = {"bandwidth_bytes_s": bandwidth, "load_before": load_before}, []
    for model in args.model:
        variants = variants_135m() if model == "135m" else variants_17b()
        if args.only:
            variants = [v for v in variants if args.only in v["name"]]
        work_file = workload(variants[0]["path"], args.runs, tmp / f"workload-{model}.json")
        rows = []
        for v in variants:
            try:
                rows.append(measure(v, work_file, args.runs, tmp, args.reuse))
            except subprocess.CalledProcessError as exc:
                print(f"FAILED {v['name']}: {exc}", flush=True)
                continue
            print(json.dumps(rows[-1]), flush=True)
        results[model] = rows
        text.append(
            markdown(rows, bandwidth, f"SmolLM2-{model.upper()}" + (" (random weights)" if model == "1.7b" else ""))
        )
    results["load_after"] = os.getloadavg()
    after = results["load_after"][0]
    stamp = (f"{datetime.date.today()}, load average before {load_before[0]:.2f} / after {after:.2f}, "
             f"`benchmarks/speed.py {' '.join(sys.argv[1:])}`")  # fmt: skip
    (args.output / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output / "speed.md").write_text(f"<!-- {stamp} -->\n" + "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
