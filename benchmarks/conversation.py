"""Conversation table: a replayed 8-turn chat, single-stream decode and cold start, for smolexport and the peers.

    .venv/bin/python benchmarks/conversation.py [--model 135m 1.7b] [--runs 3] [--output benchmarks/results]

Run it on a quiet machine after benchmarks/setup_peers.sh (the peer venvs) and, for 135M,
benchmarks/make_135m_checkpoints.py; for 1.7B shapes it builds what is missing (benchmarks/speed.py's
variants_17b: smolexport int4, onnxruntime-genai int4, llama.cpp Q4_0 of the random-weight folder).

Workload (token ids from smolexport_runtime.bench_chat, handed to every runtime): a system prompt, then 8 user
messages, each answered with 16 greedy tokens while the history keeps a fixed ~60-token assistant answer, so
every runtime sees the same ids every turn. Time to first token per turn (median of `--runs` replays, each on
a new conversation object, after a two-turn warm-up):
- smolexport: `Model.stream`'s own prefix reuse (CacheState: the longest common prefix computed by a prefill),
  and, for the ratio target, the same turns re-prefilled from scratch;
- llama-cpp-python: `Llama.generate(tokens, reset=True)`, which reuses the longest common prefix on its own;
- onnxruntime-genai: one generator per conversation, `rewind_to(common prefix)` + `append_tokens(rest)`.
Then single-stream greedy decode of 128 tokens after the first turn's prompt (eos ignored), and cold start:
spawning a process that loads the model (smolexport: with every file's sha256 checked) and produces the first
token of the first turn. Two threads everywhere; each runtime in processes of its own, one after the other.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import BENCH, PEERS, VENV, WORK, WORKER, build_genai, build_gguf, cpu_model, run  # noqa: E402

ANSWER_TOKENS = 16
DECODE_TOKENS = 128
CPU = "cpu"


def variants(model: str) -> list[dict]:
    if model == "1.7b":
        from speed import variants_17b

        built = {v["name"]: v for v in variants_17b()}
        return [
            {**built["smolexport int4 (rtn)"], "name": "smolexport int4"},
            built["onnxruntime-genai int4"],
            built["llama.cpp Q4_0"],
        ]
    folder = WORK / "smollm2-135m-instruct"
    out = WORK / "conversation-135m"
    out.mkdir(parents=True, exist_ok=True)
    ours = out / "smolexport-int4"
    if not (ours / "smolexport.json").exists():
        run([VENV / "smolexport", "onnx", "--model", folder, "--quant", "int4", "--preset", "rtn", "--output", ours,
             "--force", "-q"])  # fmt: skip
    genai = build_genai(folder, out / "genai-int4", "int4", out / "genai-cache")
    q4 = build_gguf(folder, out / "llamacpp-q4_0.gguf", "Q4_0", out / "llamacpp-f32.gguf", keep_source=False)
    return [
        {"name": "smolexport int4", "kind": "ours", "path": ours},
        {"name": "onnxruntime-genai int4", "kind": "genai", "path": genai},
        {"name": "llama.cpp Q4_0", "kind": "llamacpp", "path": q4},
    ]


def workload(export: Path, runs: int, out: Path) -> Path:
    from smolexport_runtime import load
    from smolexport_runtime.bench_chat import chat_turns

    turns = chat_turns(load(export, providers=CPU, verify=False))
    data = {"turns": turns, "answer_tokens": ANSWER_TOKENS, "runs": runs, "context": 2048,
            "decode_prompt": turns[0], "decode_tokens": DECODE_TOKENS}  # fmt: skip
    out.write_text(json.dumps(data))
    return out


def ours_worker(export: str, workload_file: str, out: str) -> None:
    """smolexport's side of the workload, run in a process of its own (`--worker`)."""
    from smolexport_runtime import load
    from smolexport_runtime.bench_chat import replay_turns
    from smolexport_runtime.generate import decode_one_token, prefill
    from smolexport_runtime.sampling import greedy

    w = json.loads(Path(workload_file).read_text())
    model = load(export, providers=CPU, threads=2, verify=False)
    turns, limit = w["turns"], model.context_length
    replay_turns(model.decoder, limit, turns[:2], w["answer_tokens"], keep=True)  # warm-up
    kept = [replay_turns(model.decoder, limit, turns, w["answer_tokens"], keep=True) for _ in range(w["runs"])]
    fresh = [replay_turns(model.decoder, limit, turns, w["answer_tokens"], keep=False) for _ in range(w["runs"])]
    decode = []
    for _ in range(w["runs"]):
        ids = w["decode_prompt"]
        logits, cache, length = prefill(model.decoder, ids, capacity=len(ids) + w["decode_tokens"] + 1)
        token = greedy(logits)
        start = time.perf_counter()
        for _ in range(w["decode_tokens"]):
            logits, cache, length = decode_one_token(model.decoder, token, cache, length)
            token = greedy(logits)
        decode.append(w["decode_tokens"] / (time.perf_counter() - start))
    result = {
        "ttft_ms_reused": [round(1000 * statistics.median(t), 1) for t in zip(*kept, strict=True)],
        "ttft_ms_reprefill": [round(1000 * statistics.median(t), 1) for t in zip(*fresh, strict=True)],
        "decode_tok_s": round(statistics.median(decode), 1),
    }
    Path(out).write_text(json.dumps(result))


def cold_start(v: dict, ids_file: Path, runs: int) -> float:
    """Median seconds from spawning a process to its first token."""
    if v["kind"] == "ours":
        from smolexport_runtime.bench_chat import COLD_START_CHILD

        command = [VENV / "python", "-c", COLD_START_CHILD, v["path"], CPU, "2"]
    else:
        command = [PEERS, WORKER, "cold", v["kind"], v["path"], ids_file]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        child = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, text=True)
        line = child.stdout.readline()
        times.append(time.perf_counter() - start)
        child.wait()
        if "first-token" not in line:
            raise RuntimeError(f"cold start of {v['name']} failed")
    return statistics.median(times)


def measure(v: dict, work_file: Path, ids_file: Path, runs: int, tmp: Path) -> dict:
    out = tmp / f"{v['kind']}-{Path(v['path']).name}.json"
    if v["kind"] == "ours":
        run([VENV / "python", __file__, "--worker", v["path"], work_file, out])
    else:
        run([PEERS, WORKER, "chat", v["kind"], v["path"], work_file, out], stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["cold_start_s"] = round(cold_start(v, ids_file, runs), 2)
    return {"variant": v["name"], **result}


def markdown(rows: list[dict], turn_tokens: list[int], title: str) -> str:
    ours = rows[0]
    peers = [r for r in rows[1:]]
    fastest_peer_last = min((r["ttft_ms_reused"][-1] for r in peers), default=None)
    lines = [f"**{title}**: time to first token per turn, ms (prompt tokens: {', '.join(map(str, turn_tokens))})", ""]
    header = "| runtime | " + " | ".join(f"turn {i + 1}" for i in range(len(turn_tokens))) + " |"
    lines += [header, "|---" * (len(turn_tokens) + 1) + "|"]
    lines.append(f"| {ours['variant']}, re-prefilling the history | " + " | ".join(
        f"{t:.0f}" for t in ours["ttft_ms_reprefill"]) + " |")  # fmt: skip
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{t:.0f}" for t in r["ttft_ms_reused"]) + " |")
    lines += ["", "| runtime | last turn / re-prefill | last turn / fastest peer | decode tok/s | decode / genai | "
              "cold start s |", "|---|---|---|---|---|---|"]  # fmt: skip
    genai = next((r for r in rows if "genai" in r["variant"]), None)
    for r in rows:
        vs_prefill = f"{r['ttft_ms_reused'][-1] / ours['ttft_ms_reprefill'][-1]:.2f}" if r is ours else "-"
        vs_peer = f"{r['ttft_ms_reused'][-1] / fastest_peer_last:.2f}" if fastest_peer_last else "-"
        vs_genai = f"{r['decode_tok_s'] / genai['decode_tok_s']:.2f}" if genai else "-"
        lines.append(f"| {r['variant']} | {vs_prefill} | {vs_peer} | {r['decode_tok_s']:.1f} | {vs_genai} | "
                     f"{r['cold_start_s']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        ours_worker(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=["135m", "1.7b"], default=["135m"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    tmp = WORK / "conversation"
    tmp.mkdir(parents=True, exist_ok=True)
    results, text = {"cpu": cpu_model(), "load_before": os.getloadavg()}, []
    for model in args.model:
        chosen = variants(model)
        work_file = workload(chosen[0]["path"], args.runs, tmp / f"workload-{model}.json")
        w = json.loads(work_file.read_text())
        ids_file = tmp / f"cold-ids-{model}.json"
        ids_file.write_text(json.dumps(w["turns"][0]))
        rows = []
        for v in chosen:
            rows.append(measure(v, work_file, ids_file, args.runs, tmp))
            print(json.dumps(rows[-1]), flush=True)
        results[model] = rows
        title = f"SmolLM2-{model.upper()}" + (" shapes (random weights)" if model == "1.7b" else "")
        text.append(markdown(rows, [len(t) for t in w["turns"]], title))
    results["load_after"] = os.getloadavg()
    stamp = (f"{datetime.date.today()}, {cpu_model}, load average before {results['load_before'][0]:.2f} / after "
             f"{results['load_after'][0]:.2f}, `benchmarks/conversation.py {' '.join(sys.argv[1:])}`")  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "conversation.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output / "conversation.md").write_text(f"<!-- {stamp} -->\n" + "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
