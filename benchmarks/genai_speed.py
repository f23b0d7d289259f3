"""onnxruntime-genai's own generate loop on our int4 export against genai on its model builder's int4 export of
the same weights, in one run: decode tokens/s and time to first token.

    .venv/bin/python benchmarks/genai_speed.py --model 135m [--rounds 3] [--runs 3]
    .venv/bin/python benchmarks/genai_speed.py --model 1.7b

Needs the project's .venv (smolexport and onnxruntime-genai 0.18 from the dev extra) and a venv with genai's
model builder, benchmarks/work/venv-genai:

    python3 -m venv benchmarks/work/venv-genai && cd benchmarks/work && venv-genai/bin/pip install torch==2.13.0 &&
    venv-genai/bin/pip install onnxruntime-genai==0.18.0 onnx-ir onnx transformers safetensors

(CPU torch first, as in setup_peers.sh). The Hugging Face folders come from benchmarks/make_135m_checkpoints.py
(135M, the bundled GGUF dequantized) and benchmarks/make_random_checkpoint.py (1.7B shapes, random weights).

Builds, when missing, under benchmarks/work/genai-speed/MODEL/:
- `smolexport-int4`: `smolexport onnx --quant int4` (and for 135M `smolexport-int4-quality`, `--preset quality`);
- `builder-int4`: `python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu` (block 32, accuracy
  level 4 by default on CPU, like ours).
Checks that the builder baked the checkpoint's rope_theta into its cos/sin cache (its genai_config has no rope
setting).

Workload, the `smolexport bench` one through genai's API (og.Model, GeneratorParams, Generator; greedy; eos
masked with min_length so every run decodes the same number of tokens; 2 intra-op threads for both, set by
og.Config.overlay, so no file in the folders changes): time to first token of the chat prompt and of a
512-token prompt (append_tokens + the first generate_next_token), decode tokens/s over 128 tokens after the
chat prompt. Each variant runs `--runs` runs in a process of its own (two models in one process slow each
other: an idle session's threads spin for a while after each run); the variants take turns for `--rounds`
rounds, the order rotating, so that load from elsewhere on the machine falls on each alike. Figures are
medians over all runs (and the best run, the least disturbed), ratios the median of the ratios of runs paired
by round and index to the builder's export.
Results: benchmarks/results/genai-speed-MODEL.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"
VENV = ROOT / ".venv" / "bin" / "python"
BUILDER_VENV = WORK / "venv-genai" / "bin" / "python"
SOURCES = {"135m": WORK / "smollm2-135m-instruct", "1.7b": WORK / "smollm2-1.7b-random"}
THREADS = 2


def build(model: str) -> list[dict]:
    source = SOURCES[model]
    if not (source / "config.json").is_file():
        raise SystemExit(f"{source} is missing: run benchmarks/make_135m_checkpoints.py / make_random_checkpoint.py")
    out = WORK / "genai-speed" / model
    variants = [
        {
            "name": "genai on smolexport int4",
            "path": out / "smolexport-int4",
            "flags": ["--quant", "int4", "--preset", "rtn"],
        }
    ]
    if model == "135m":
        variants.append({"name": "genai on smolexport int4 --preset quality", "path": out / "smolexport-int4-quality",
                         "flags": ["--preset", "quality"]})  # fmt: skip
    for v in variants:
        if not (v["path"] / "genai_config.json").is_file():
            cmd = [str(ROOT / ".venv/bin/smolexport"), "onnx", "--model", str(source), *v["flags"],
                   "--output", str(v["path"]), "--force", "-q"]  # fmt: skip
            print("building:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    builder = out / "builder-int4"
    if not (builder / "genai_config.json").is_file():
        cmd = [str(BUILDER_VENV), "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(builder),
               "-p", "int4", "-e", "cpu", "-c", str(out / "builder-cache")]  # fmt: skip
        print("building:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    check_builder_rope(source, builder)
    return [*variants, {"name": "genai on its builder's int4", "path": builder}]


def check_builder_rope(source: Path, builder: Path) -> None:
    """The builder writes RoPE as cos/sin caches in the graph; they must use the checkpoint's rope_theta
    (transformers 5 keeps it under rope_parameters)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    config = json.loads((source / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or config["rope_theta"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    graph = onnx.load(str(builder / "model.onnx"), load_external_data=False)
    caches = [t for t in graph.graph.initializer if "cos_cache" in t.name]
    if not caches:
        print("note: no cos_cache initializer found in the builder's graph; rope_theta not checked")
        return
    tensor = caches[0]
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str(builder))
    cos = numpy_helper.to_array(tensor).astype(np.float64)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    expected = np.cos(np.arange(cos.shape[0])[:, None] * inv_freq[None, :])
    error = float(np.abs(cos - expected[:, : cos.shape[1]]).max())
    print(f"builder cos_cache vs rope_theta {theta}: max abs diff {error:.2e}")
    if error > 1e-2:
        raise SystemExit(f"the builder's cos_cache does not match rope_theta {theta} (max diff {error})")


def workload(export: Path) -> dict:
    from smolexport_runtime import load
    from smolexport_runtime.bench import CHAT_PROMPT, prompt_of_length

    model = load(export, verify=False)
    return {"chat_ids": model.encode(CHAT_PROMPT), "long_ids": prompt_of_length(model, 512)}


def worker(folders: list[str], workload_file: str, runs: int, decode_tokens: int) -> None:
    """The variants in `folders` (the harness passes one) in this process, taking turns run by run. Prints
    {folder: {"ttft_ms_chat": [...], "ttft_ms_long": [...], "decode_tok_s": [...]}}."""
    import numpy as np
    import onnxruntime_genai as og

    w = json.loads(Path(workload_file).read_text())
    models = {}
    for folder in folders:
        config = og.Config(folder)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}}))
        models[folder] = og.Model(config)

    def first_token(model, ids: list[int], decode: int = 0) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        length = len(ids) + decode + 1
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.array(ids, dtype=np.int32))
        generator.generate_next_token()
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode):
            generator.generate_next_token()
        return ttft, (decode / (time.perf_counter() - start)) if decode else 0.0

    for model in models.values():  # warm-up
        first_token(model, w["chat_ids"], 8)
        first_token(model, w["long_ids"])
    result = {folder: {"ttft_ms_chat": [], "ttft_ms_long": [], "decode_tok_s": []} for folder in folders}
    for run in range(runs):
        order = folders[run % len(folders) :] + folders[: run % len(folders)]
        for folder in order:
            ttft, rate = first_token(models[folder], w["chat_ids"], decode_tokens)
            result[folder]["ttft_ms_chat"].append(1000 * ttft)
            result[folder]["decode_tok_s"].append(rate)
        for folder in order:
            result[folder]["ttft_ms_long"].append(1000 * first_token(models[folder], w["long_ids"])[0])
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SOURCES), default="135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs="+", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.workload, args.runs, args.decode_tokens)
        return

    variants = build(args.model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    workload_file = WORK / "genai-speed" / args.model / "workload.json"
    workload_file.write_text(json.dumps(workload(variants[0]["path"])))
    samples = {v["name"]: {"ttft_ms_chat": [], "ttft_ms_long": [], "decode_tok_s": []} for v in variants}
    for round_ in range(args.rounds):
        order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
        for v in order:  # one process per variant: two models' thread pools in one process disturb each other
            cmd = [str(VENV), __file__, "--workload", str(workload_file), "--runs", str(args.runs),
                   "--decode-tokens", str(args.decode_tokens), "--worker", str(v["path"])]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            for key, values in json.loads(out)[str(v["path"])].items():
                samples[v["name"]][key] += values
            print(f"round {round_ + 1}: {v['name']}: {out}", flush=True)
    rows = []
    for v in variants:
        s = samples[v["name"]]
        size = sum(p.stat().st_size for p in v["path"].rglob("model*.onnx*"))  # ours in onnx/, genai's at the root
        rows.append({"name": v["name"], "path": str(v["path"].relative_to(ROOT)), "model_mb": round(size / 1e6, 1),
                     **{k: round(statistics.median(x), 1) for k, x in s.items()}})  # fmt: skip
    # Ratios of runs paired by round and index (adjacent in time), then their median.
    reference = samples[variants[-1]["name"]]
    for row in rows:
        s = samples[row["name"]]
        row["decode_ratio"] = round(statistics.median(
            a / b for a, b in zip(s["decode_tok_s"], reference["decode_tok_s"], strict=True)), 3)  # fmt: skip
        row["ttft_512_ratio"] = round(statistics.median(
            a / b for a, b in zip(s["ttft_ms_long"], reference["ttft_ms_long"], strict=True)), 3)  # fmt: skip
        row["decode_tok_s_best"] = round(max(s["decode_tok_s"]), 1)
    report = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "threads": THREADS,
        "command": "benchmarks/genai_speed.py " + " ".join(sys.argv[1:]),
        "rounds": args.rounds,
        "runs": args.runs,
        "decode_tokens": args.decode_tokens,
        "rows": rows,
        "samples": samples,  # every run, in order: round by round
    }
    (RESULTS / f"genai-speed-{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"genai 0.18 loop, {args.model}, {report['cpu']}, {THREADS} threads, {report['date']}: medians of "
        f"{args.rounds} rounds x {args.runs} runs",
        "",
        "| variant | model MB | decode tok/s (best) | decode / builder's | TTFT chat ms | TTFT 512 ms | TTFT 512 / "
        "builder's |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        decode = f"{r['decode_tok_s']} ({r['decode_tok_s_best']})"
        lines.append(f"| {r['name']} | {r['model_mb']} | {decode} | {r['decode_ratio']} | {r['ttft_ms_chat']} | "
                     f"{r['ttft_ms_long']} | {r['ttft_512_ratio']} |")  # fmt: skip
    (RESULTS / f"genai-speed-{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
