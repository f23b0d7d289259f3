"""Speed against fidelity for 4- and 8-bit exports of SmolLM2-135M-Instruct, ours and the peers', in one run.

    .venv/bin/python benchmarks/frontier.py [--runs 3] [--extra "NAME=FLAGS" ...] [--output benchmarks/results]

For every variant, on the same weights (benchmarks/work/smollm2-135m-instruct, the bundled GGUF dequantized):
- fidelity on the held-out dev set (benchmarks/dev, never used by validate or for calibration): mean KL(float ||
  variant) and top-1 agreement over every position of the eight chat answers and the two texts, perplexity
  ratio over the texts, teacher-forced; the float reference is PyTorch (transformers). Logits come from the
  real artifact on its own runtime: our export through smolexport_runtime (one pass, ONNX Runtime CPU kernels
  at the export's accuracy level), onnxruntime-genai's folders and llama.cpp's GGUFs through
  benchmarks/peers/worker.py in the peers' venv;
- decode speed: every variant loaded in one process (benchmarks/peers/worker.py interleaved, the peers' venv;
  ours through smolexport_runtime from the source tree), `--rounds` rounds that each prefill the chat prompt
  and decode 64 tokens greedily on every variant in turn: a slow spell of this shared VM then hits every
  variant alike (one-process-per-variant runs swung by up to 40% here). Reported: the median over rounds,
  and the median of the per-round ratios to onnxruntime-genai int4 and to llama.cpp Q4_K_M;
- time to first token of a 512-token prompt and peak RSS: `smolexport bench`'s workload (benchmarks/speed.py),
  one variant per process;
- size: the files that hold the weights; export seconds for ours (the manifest's).
Writes results/frontier-135m.{json,md} and docs/quantization-frontier.svg (decode speed against KL).
`--extra "label=--quant int4 --block-size 16"` adds an export of ours with those flags (recipe search).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import (  # noqa: E402
    BENCH,
    PEERS,
    ROOT,
    VENV,
    WORK,
    WORKER,
    artifact_bytes,
    build_genai,
    build_gguf,
    cpu_model,
    run,
    slug,
)  # fmt: skip
from sensitivity import dev_segments  # noqa: E402
from speed import measure, workload  # noqa: E402

WEIGHTS = WORK / "smollm2-135m-instruct"
OUT = WORK / "frontier"

OURS = {
    "smolexport int4 --preset rtn": ["--quant", "int4", "--preset", "rtn"],
    "smolexport int4 (default)": ["--quant", "int4"],
    "smolexport int4 --preset quality": ["--quant", "int4", "--preset", "quality"],
    # issue 24: wider blocks for the feed-forward matrices (three quarters of the weights), fewer bytes a token
    "smolexport int4 --ffn-block-size 64": ["--quant", "int4", "--ffn-block-size", "64"],
    "smolexport int4 --ffn-block-size 128": ["--quant", "int4", "--ffn-block-size", "128"],
    "smolexport int8 --preset rtn": ["--quant", "int8", "--preset", "rtn"],
    "smolexport int8 (default)": ["--quant", "int8"],
}
GENAI = {  # name -> (precision, extra options of onnxruntime-genai's builder)
    "onnxruntime-genai int4 (rtn)": ("int4", []),
    "onnxruntime-genai int4 k_quant_mixed": ("int4", ["algo_config=k_quant_mixed"]),
    "onnxruntime-genai int8": ("int8", []),
}
GGUF = {"llama.cpp Q4_0": "Q4_0", "llama.cpp Q4_K_M": "Q4_K_M", "llama.cpp Q8_0": "Q8_0"}


def build(extra: dict[str, list[str]], ours_only: bool = False) -> list[dict]:
    OUT.mkdir(parents=True, exist_ok=True)
    variants = []
    for name, flags in {**OURS, **extra}.items():
        path = OUT / slug(name)
        if not (path / "smolexport.json").exists():
            run([VENV / "smolexport", "onnx", "--model", WEIGHTS, *flags, "--output", path, "--force", "-q"])
        variants.append({"name": name, "kind": "ours", "path": path})
    if ours_only:
        return variants
    for name, (precision, options) in GENAI.items():
        path = build_genai(WEIGHTS, OUT / slug(name), precision, OUT / "genai-cache", options)
        variants.append({"name": name, "kind": "genai", "path": path})
    for name, kind in GGUF.items():
        path = build_gguf(WEIGHTS, OUT / f"llamacpp-{kind.lower()}.gguf", kind, OUT / "llamacpp-f32.gguf")
        variants.append({"name": name, "kind": "llamacpp", "path": path})
    return variants


def interleaved_decode(variants: list[dict], work_file: Path, rounds: int, tmp: Path) -> dict[str, dict]:
    """{name: {decode_tok_s, decode_vs_genai, decode_vs_q4_k_m, decode_rounds}} from one interleaved run."""
    import statistics

    work = json.loads(work_file.read_text())
    work.update(decode_tokens=64, rounds=rounds)
    (tmp / "interleaved.json").write_text(json.dumps(work))
    specs = {v["name"]: f"{v['kind']}={v['path']}" for v in variants}
    run([PEERS, WORKER, "interleaved", tmp / "interleaved.json", tmp / "interleaved-out.json", *specs.values()])
    per_round = json.loads((tmp / "interleaved-out.json").read_text())["rounds"]
    genai = per_round[specs["onnxruntime-genai int4 (rtn)"]]
    q4km = per_round[specs["llama.cpp Q4_K_M"]]
    out = {}
    for name, spec in specs.items():
        speeds = per_round[spec]
        out[name] = {
            "decode_tok_s": statistics.median(speeds),
            "decode_vs_genai": statistics.median(a / b for a, b in zip(speeds, genai, strict=True)),
            "decode_vs_q4_k_m": statistics.median(a / b for a, b in zip(speeds, q4km, strict=True)),
            "decode_rounds": [round(x, 1) for x in speeds],
        }
    return out


def reference():
    """The dev set's segments [(ids, first scored position, is_text)] and PyTorch's float logits for each."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(WEIGHTS, dtype=torch.float32).eval()
    segments = dev_segments(model, WEIGHTS, tokens=1024)
    with torch.no_grad():
        logits = [model(ids[None]).logits[0].double() for ids, _, _ in segments]
    return segments, logits


def variant_logits(v: dict, segments, tmp: Path) -> list[np.ndarray]:
    if v["kind"] == "ours":
        from smolexport_runtime import load

        from smolexport.validate.report import _export_logits_uncached

        decoder = load(v["path"], providers="cpu", verify=False).decoder
        return [_export_logits_uncached(decoder, ids.tolist()) for ids, _, _ in segments]
    tokens, out = tmp / "tokens.json", tmp / f"logits-{slug(v['name'])}.npz"
    tokens.write_text(json.dumps([ids.tolist() for ids, _, _ in segments]))
    run([PEERS, WORKER, "logits", v["kind"], v["path"], tokens, out])
    data = np.load(out)
    return [data[f"seq{i}"] for i in range(len(segments))]


def score(segments, references, logits) -> dict:
    """Pooled as benchmarks/sensitivity.py's `compare`: KL and top-1 over every scored position, perplexity
    ratio over the text segments."""
    kl = top1 = positions = 0.0
    nll_ref = nll_out = 0.0
    text_positions = 0
    for (ids, start, is_text), reference, rows in zip(segments, references, logits, strict=True):
        ref = reference[start:-1].log_softmax(-1)
        out = torch.from_numpy(np.asarray(rows, dtype=np.float64))[start:-1].log_softmax(-1)
        targets = ids[start + 1 :]
        kl += (ref.exp() * (ref - out)).sum().item()
        top1 += (ref.argmax(-1) == out.argmax(-1)).sum().item()
        positions += len(targets)
        if is_text:
            index = torch.arange(len(targets))
            nll_ref -= ref[index, targets].sum().item()
            nll_out -= out[index, targets].sum().item()
            text_positions += len(targets)
    ppl_ratio = float(np.exp((nll_out - nll_ref) / text_positions))
    return {"kl": kl / positions, "top1": top1 / positions, "ppl_ratio": ppl_ratio, "positions": int(positions)}


def answers_paris(v: dict) -> str:
    """The README's question, greedy, on the artifact's own runtime (ours only; the peers' answers are not
    part of their targets)."""
    if v["kind"] != "ours":
        return ""
    result = subprocess.run([VENV / "smolexport", "run", v["path"], "What is the capital of France?", "--greedy",
                             "--max-new-tokens", "24"], capture_output=True, text=True, check=True)  # fmt: skip
    return result.stdout.strip()


def markdown(rows: list[dict], header: str) -> str:
    plain = next((r for r in rows if r["name"] == "smolexport int4 --preset rtn"), rows[0])
    lines = [header, "",
             "| variant | MB | / rtn int4 | KL | top-1 | ppl ratio | decode tok/s | / genai int4 | / Q4_K_M | "
             "TTFT 512 ms | peak RSS MB | export s | answer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['mb']:.1f} | {r['mb'] / plain['mb']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | "
            f"{r['ppl_ratio']:.3f} | {r['decode_tok_s']:.1f} | {r['decode_vs_genai']:.2f} | "
            f"{r['decode_vs_q4_k_m']:.2f} | {r['ttft_ms_long']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r.get('export_seconds', '')} | {r['answer'][:40]} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"ours": "tab:blue", "genai": "tab:orange", "llamacpp": "tab:green"}
    for kind, label in (("ours", "smolexport"), ("genai", "onnxruntime-genai"), ("llamacpp", "llama.cpp")):
        mine = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["decode_tok_s"] for r in mine], [r["kl"] for r in mine], color=colors[kind], label=label)
        for r in mine:  # ours labelled below the point, the peers above, so that close points stay readable
            name = r["name"].replace("smolexport ", "").replace("onnxruntime-genai ", "").replace("llama.cpp ", "")
            ax.annotate(name, (r["decode_tok_s"], r["kl"]), fontsize=7, textcoords="offset points",
                        xytext=(4, -9 if kind == "ours" else 4))  # fmt: skip
    ax.legend(fontsize=8, loc="upper left")
    ax.set_yscale("log")
    ax.set_xlabel("decode tokens/s (2 threads; higher is better)")
    ax.set_ylabel("mean KL from the float model, dev set (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of the TTFT/RSS workload per variant")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the interleaved decode measurement")
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=FLAGS")
    parser.add_argument("--only-fidelity", action="store_true", help="skip the speed runs")
    parser.add_argument("--ours-only", action="store_true", help="only our variants, fidelity only (no peers)")
    parser.add_argument("--output", type=Path, default=BENCH / "results")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from results/frontier-135m.json")
    args = parser.parse_args()
    if args.replot:
        data = json.loads((args.output / "frontier-135m.json").read_text())
        title = f"SmolLM2-135M-Instruct, {data['cpu']}, {data['date']}"
        plot(data["rows"], ROOT / "docs" / "quantization-frontier.svg", title)
        return
    extra = {name: shlex.split(flags) for name, flags in (e.split("=", 1) for e in args.extra)}
    args.only_fidelity = args.only_fidelity or args.ours_only  # the decode ratios need the peers
    variants = build(extra, args.ours_only)
    tmp = OUT / "runs"
    tmp.mkdir(exist_ok=True)
    segments, references = reference()
    cpu = cpu_model()
    work_file = workload(next(v["path"] for v in variants if v["kind"] == "ours"), args.runs, tmp / "workload.json")
    decode = {} if args.only_fidelity else interleaved_decode(variants, work_file, args.rounds, tmp)
    rows = []
    for v in variants:
        started = time.perf_counter()
        row = {"name": v["name"], "kind": v["kind"], "mb": artifact_bytes(Path(v["path"])) / 1e6}
        row.update(score(segments, references, variant_logits(v, segments, tmp)))
        row["answer"] = answers_paris(v)
        if v["kind"] == "ours":
            row["export_seconds"] = json.loads((Path(v["path"]) / "smolexport.json").read_text())["export_seconds"]
            row["recipe"] = json.loads((Path(v["path"]) / "smolexport.json").read_text())["quant"].get("recipe")
        if not args.only_fidelity:
            speed = measure(v, work_file, args.runs, tmp)
            row.update({k: speed[k] for k in ("ttft_ms_long", "peak_rss_mb")})
            row.update(decode[v["name"]])
        else:
            row.update({"decode_tok_s": float("nan"), "ttft_ms_long": float("nan"), "peak_rss_mb": float("nan"),
                        "decode_vs_genai": float("nan"), "decode_vs_q4_k_m": float("nan")})  # fmt: skip
        print(json.dumps(row), f"({time.perf_counter() - started:.0f} s)", flush=True)
        rows.append(row)
    stamp = datetime.date.today().isoformat()
    command = f"benchmarks/frontier.py --runs {args.runs} --rounds {args.rounds}{' --extra ...' if extra else ''}"
    command += " --ours-only" if args.ours_only else ""
    header = f"<!-- {stamp}, {cpu}, `{command}` -->\n**SmolLM2-135M-Instruct, dev set, 2 threads** ({cpu})"
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "frontier-135m.json").write_text(json.dumps({"cpu": cpu, "date": stamp, "rows": rows}, indent=1))
    (args.output / "frontier-135m.md").write_text(markdown(rows, header))
    if not args.only_fidelity:
        plot(rows, ROOT / "docs" / "quantization-frontier.svg", f"SmolLM2-135M-Instruct, {cpu}, {stamp}")
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
