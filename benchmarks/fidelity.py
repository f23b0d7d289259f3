"""Fidelity table: smolexport's variants and the peers a user would pick instead, on the same 135M weights.

    .venv/bin/python benchmarks/fidelity.py [--weights orig degrid] [--output benchmarks/results]

Run with the project's .venv; the peers run in their own venvs (benchmarks/setup_peers.sh builds them under
benchmarks/work/) through benchmarks/peers/worker.py, and logits travel through .npz files.

For each weight set (`orig`: benchmarks/work/smollm2-135m-instruct, the bundled GGUF dequantized; `degrid`:
the de-gridded copy, see make_135m_checkpoints.py) the reference is transformers fp32 on that same folder, and
every variant is built from that folder:
- smolexport's variants (`OURS` below: int8 and --preset quality-int8, int4 rtn / act-mse / awq and the
  presets): `smolexport onnx`, then
  scored with `smolexport validate`'s own code (smolexport.validate.report: cached decode for the prompts,
  one pass for the text) against the shared reference, i.e. the overall top1_agreement, mean_kl and
  ppl_ratio that `smolexport validate EXPORT --reference FOLDER --json` reports, with the reference computed
  once per weight set instead of once per export;
- onnxruntime-genai 0.18 model builder int4 and int8 (`-e cpu`), logits from its generate API
  (`Generator.get_output("logits")` after `append_tokens`);
- llama.cpp through llama-cpp-python: F32 GGUF of the folder (make_ggufs.py) quantized by llama.cpp to Q4_0,
  Q4_K_M, Q8_0, logits with `logits_all=True`;
- optimum's ONNX export (`optimum-cli export onnx --task text-generation-with-past`) fp32, and int4 with
  onnxruntime's MatMulNBitsQuantizer (block 32), logits from ORTModelForCausalLM.
The peers get the same token ids as `smolexport validate` (the export's tokenizer and chat template, the
reference's greedy 32-token continuation of each built-in prompt, the built-in text) and the same metrics
(smolexport.validate.metrics.compare_logits, pooled over all positions as in the validate report). Peers
score each sequence in one uncached pass; smolexport's validate runs its export through the KV cache.

Artifact MB counts the files that hold the model (.onnx, .onnx.data / .data, .gguf), not tokenizer or config
files; bits per weight = artifact bits / the checkpoint's parameter count (134.5M, tied embedding once).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
WORK = BENCH / "work"
VENV = ROOT / ".venv" / "bin"
PEERS = WORK / "venv-peers" / "bin" / "python"
OPTIMUM = WORK / "venv-optimum" / "bin"
WORKER = BENCH / "peers" / "worker.py"
FOLDERS = {"orig": WORK / "smollm2-135m-instruct", "degrid": WORK / "smollm2-135m-instruct-degrid"}

# Defaults apply unless named: MatMulNBits accuracy level 4 (int8 activations), block 32.
OURS = {
    "smolexport int8": ["--quant", "int8", "--preset", "rtn"],
    "smolexport int8 --preset quality-int8": ["--preset", "quality-int8"],
    "smolexport int4 rtn": ["--quant", "int4", "--preset", "rtn"],
    "smolexport int4 act-mse": ["--quant", "int4", "--preset", "rtn", "--algo", "act-mse"],
    "smolexport int4 awq": ["--quant", "int4", "--preset", "rtn", "--algo", "awq"],
    "smolexport int4 awq, blocks of 16, log8 scales": [
        "--preset",
        "rtn",
        "--algo",
        "awq",
        "--block-size",
        "16",
        "--scales",
        "log8",
    ],  # fmt: skip
    "smolexport int4 --preset quality": ["--preset", "quality"],
    "smolexport int4 --preset quality-plus": ["--preset", "quality-plus"],
}
GGUF_TYPES = ["Q8_0", "Q4_K_M", "Q4_0"]


def run(cmd: list, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def cpu_model() -> str:
    """`lscpu`'s model name: every figure is recorded with it."""
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def build_genai(folder: Path, out: Path, precision: str, cache: Path, options: list[str] = ()) -> Path:
    """onnxruntime-genai's model builder (CPU, `--extra_options` `options`) from `folder` into `out`, unless
    `out` holds its export already."""
    if not (out / "genai_config.json").exists():
        extra = ["--extra_options", *options] if options else []
        run([PEERS, "-m", "onnxruntime_genai.models.builder", "-i", folder, "-o", out, "-p", precision, "-e", "cpu",
             "-c", cache, *extra])  # fmt: skip
    return out


def build_gguf(folder: Path, out: Path, kind: str, source: Path, keep_source: bool = True) -> Path:
    """llama.cpp's `kind` (Q4_0, Q4_K_M, ...) of `folder` into `out`, quantized from the GGUF `source` (made
    from `folder` when missing, F16 if its name says so, else F32), unless `out` exists already."""
    if not out.exists():
        if not source.exists():
            dtype = "f16" if "f16" in source.name else "f32"
            run([VENV / "python", BENCH / "make_ggufs.py", folder, source, "--dtype", dtype])
        run([PEERS, WORKER, "quantize", source, out, kind])
        if not keep_source:
            source.unlink()
    return out


# --- building every variant -------------------------------------------------------------------------------


def build(weights: str, only: list[str] | None = None) -> list[dict]:
    """Builds (when missing) every variant of one weight set, or with `only` (name substrings) rebuilds just
    smolexport's variants whose name contains one; returns [{name, kind, path, backend}]."""
    folder = FOLDERS[weights]
    out = WORK / "fidelity" / weights
    out.mkdir(parents=True, exist_ok=True)
    variants = []
    for name, flags in OURS.items():
        path = out / slug(name)
        if only and not any(part in name for part in only):
            continue
        if only or not (path / "smolexport.json").exists():
            run([VENV / "smolexport", "onnx", "--model", folder, *flags, "--output", path, "--force", "-q"])
        variants.append({"name": name, "kind": "ours", "path": path})
    if only:
        return variants
    for precision in ["int4", "int8"]:
        path = build_genai(folder, out / f"genai-{precision}", precision, out / "genai-cache")
        variants.append({"name": f"onnxruntime-genai {precision}", "kind": "genai", "path": path})
    f32 = out / "llamacpp-f32.gguf"
    if not f32.exists():
        run([VENV / "python", BENCH / "make_ggufs.py", folder, f32, "--dtype", "f32"])
    variants.append({"name": "llama.cpp F32", "kind": "llamacpp", "path": f32})
    for kind in GGUF_TYPES:
        path = build_gguf(folder, out / f"llamacpp-{kind.lower()}.gguf", kind, f32)
        variants.append({"name": f"llama.cpp {kind}", "kind": "llamacpp", "path": path})
    fp32 = out / "optimum-fp32"
    if not (fp32 / "model.onnx").exists():
        run([OPTIMUM / "optimum-cli", "export", "onnx", "--model", folder, "--task", "text-generation-with-past", fp32])
    variants.append({"name": "optimum fp32", "kind": "optimum", "path": fp32})
    int4 = out / "optimum-int4"
    if not (int4 / "model_int4.onnx").exists():
        run([OPTIMUM / "python", BENCH / "peers" / "optimum_int4.py", fp32, int4])
    variants.append({"name": "optimum + MatMulNBitsQuantizer int4", "kind": "optimum", "path": int4})
    return variants


def artifact_bytes(path: Path) -> int:
    files = [path] if path.is_file() else list(path.rglob("*"))  # exports keep the graph in onnx/
    model_file = lambda f: f.suffix in (".onnx", ".gguf", ".data") or f.name.endswith((".onnx.data", ".onnx_data"))  # noqa: E731
    return sum(f.stat().st_size for f in files if f.is_file() and model_file(f))


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="np") as f:
            total += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    return total


# --- reference tokens and logits, as `smolexport validate` makes them -------------------------------------


def reference(weights: str, export_dir: Path, tmp: Path) -> dict:
    from smolexport_runtime import load

    from smolexport.sources import load_torch_model, resolve_path
    from smolexport.validate.inputs import DEFAULT_PROMPTS, DEFAULT_TEXT
    from smolexport.validate.report import _reference_greedy, _torch_logits

    export = load(export_dir, providers="cpu")
    model = load_torch_model(resolve_path(str(FOLDERS[weights]))[1])
    eos = sorted(export.eos_token_ids)
    prompts = []
    for prompt in DEFAULT_PROMPTS:
        ids = export.encode(prompt, chat=True)
        continuation = _reference_greedy(model, ids, 32, eos)
        seq = np.array(ids + continuation)
        prompts.append(
            {"ids": ids, "continuation": continuation, "logits": _torch_logits(model, seq)[len(ids) - 1 : -1]}
        )
    text_ids = export.encode(DEFAULT_TEXT, chat=False)[: export.manifest.model.context_length]
    text = {"ids": text_ids, "logits": _torch_logits(model, np.array(text_ids))[:-1]}
    sequences = [p["ids"] + p["continuation"] for p in prompts] + [text_ids]
    (tmp / "tokens.json").write_text(json.dumps(sequences))
    return {"prompts": prompts, "text": text}


def _pooled(comparisons: list, prompt_results: list[dict], text_cmp) -> dict:
    """validate's overall metrics of the prompts' and the text's comparisons, with the ratio's interval."""
    from smolexport.validate.report import _overall, text_perplexity

    text = text_perplexity(text_cmp)
    return {
        **_overall(comparisons + [text_cmp], prompt_results, text),
        "ppl_ratio_interval": text["ppl_ratio_interval"],
    }


def peer_metrics(ref: dict, logits_file: Path) -> dict:
    from smolexport.validate.metrics import compare_logits

    data = np.load(logits_file)
    comparisons, prompt_results = [], []
    for i, p in enumerate(ref["prompts"]):
        rows = data[f"seq{i}"][len(p["ids"]) - 1 : -1]
        c = compare_logits(p["logits"], rows, np.array(p["continuation"]))
        comparisons.append(c)
        prompt_results.append(
            {"greedy_identical": c.greedy_match == len(p["continuation"]), "divergence_margin": c.divergence_margin}
        )
    text_rows = data[f"seq{len(ref['prompts'])}"][:-1]
    t = compare_logits(ref["text"]["logits"], text_rows, np.array(ref["text"]["ids"][1:]))
    return _pooled(comparisons, prompt_results, t)


def ours_metrics(ref: dict, export_dir: Path) -> dict:
    """smolexport validate's own computation (report.py) against the shared reference: the export runs through
    its KV cache for the prompts and in one pass for the text, as `smolexport validate` runs it."""
    from smolexport_runtime import load

    from smolexport.validate.metrics import compare_logits
    from smolexport.validate.report import _export_logits_cached, _export_logits_uncached

    decoder = load(export_dir, providers="cpu").decoder
    comparisons, prompt_results = [], []
    for p in ref["prompts"]:
        rows = _export_logits_cached(decoder, p["ids"], p["continuation"])
        c = compare_logits(p["logits"], rows, np.array(p["continuation"]))
        comparisons.append(c)
        prompt_results.append(
            {"greedy_identical": c.greedy_match == len(p["continuation"]), "divergence_margin": c.divergence_margin}
        )
    rows = _export_logits_uncached(decoder, ref["text"]["ids"])[:-1]
    t = compare_logits(ref["text"]["logits"], rows, np.array(ref["text"]["ids"][1:]))
    return _pooled(comparisons, prompt_results, t)


def gguf_tensor_types(path: Path) -> dict[str, float]:
    """Share of the weights stored in each GGUF tensor type. llama.cpp's K-quants need inputs in multiples of 256
    and fall back to other types elsewhere: on SmolLM2-135M (hidden 576) most of "Q4_K_M" is Q5_0 and Q8_0."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        if len(tensor.shape) > 1:  # matrices; the norms' vectors stay F32 in every type
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    total = sum(counts.values())
    return {kind: round(n / total, 3) for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def measure(weights: str, variants: list[dict], params: int) -> list[dict]:
    tmp = WORK / "fidelity" / weights / "logits"
    tmp.mkdir(parents=True, exist_ok=True)
    ref = reference(weights, variants[0]["path"], tmp)
    rows = []
    for v in variants:
        started = time.perf_counter()
        if v["kind"] == "ours":
            overall = ours_metrics(ref, v["path"])
        else:
            python = OPTIMUM / "python" if v["kind"] == "optimum" else PEERS
            out = tmp / f"{slug(v['name'])}.npz"
            run([python, WORKER, "logits", v["kind"], v["path"], tmp / "tokens.json", out])
            overall = peer_metrics(ref, out)
            out.unlink()
        size = artifact_bytes(Path(v["path"]))
        rows.append({
            "weights": weights, "variant": v["name"], "artifact_mb": size / 1e6, "bits_per_weight": 8 * size / params,
            "top1_agreement": overall["top1_agreement"], "mean_kl": overall["mean_kl"],
            "ppl_ratio": overall["ppl_ratio"], "ppl_ratio_interval": overall["ppl_ratio_interval"],
            "greedy_identical_fraction": overall["greedy_identical_fraction"],
            "positions": overall["positions"], "seconds": round(time.perf_counter() - started, 1),
        })  # fmt: skip
        if v["kind"] == "llamacpp":
            rows[-1]["tensor_types"] = gguf_tensor_types(Path(v["path"]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], weights: str) -> str:
    title = {"orig": "original weights (the bundled GGUF, dequantized)", "degrid": "de-gridded weights"}[weights]
    lines = [
        f"**{title}**: reference transformers fp32 on `benchmarks/work/{FOLDERS[weights].name}`",
        "",
        "| variant | artifact MB | bits/weight | top-1 agreement | mean KL | ppl ratio (95% int.) | greedy identical |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        if r["weights"] == weights:
            low, high = r.get("ppl_ratio_interval") or (float("nan"), float("nan"))
            lines.append(
                f"| {r['variant']} | {r['artifact_mb']:.0f} | {r['bits_per_weight']:.2f} | {r['top1_agreement']:.3f} | "
                f"{r['mean_kl']:.3g} | {r['ppl_ratio']:.3f} ({low:.2f}-{high:.2f}) | "
                f"{r['greedy_identical_fraction'] * 8:.0f}/8 |"
            )
            if r.get("tensor_types"):
                shares = ", ".join(f"{kind} {share:.0%}" for kind, share in r["tensor_types"].items())
                notes.append(f"- {r['variant']}: weights stored as {shares}")
    if notes:
        lines += ["", "What llama.cpp stored (share of the matrices' weights per GGUF type):", *notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", choices=list(FOLDERS), default=list(FOLDERS))
    parser.add_argument("--output", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--only", nargs="+", default=None,
        help="rebuild and measure only smolexport's variants whose name contains one of these; keep the other "
        "rows of the JSON",
    )  # fmt: skip
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    results = args.output / "fidelity-135m.json"
    kept = json.loads(results.read_text()) if args.only and results.exists() else []
    rows = []
    for weights in args.weights:
        variants = build(weights, args.only)
        params = parameter_count(FOLDERS[weights])
        rows += measure(weights, variants, params)
        new = {(r["weights"], r["variant"]) for r in rows}
        merged = [r for r in kept if (r["weights"], r["variant"]) not in new] + rows
        order = {name: i for i, name in enumerate(OURS)}  # ours first, as listed; then the earlier table's order
        for i, r in enumerate(kept + rows):
            order.setdefault(r["variant"], len(OURS) + i)
        merged.sort(key=lambda r: (r["weights"] != "orig", order.get(r["variant"], 0)))
        results.write_text(json.dumps(merged, indent=2) + "\n")
    rows = merged
    stamp = (
        f"{datetime.date.today()}, {platform.node() or 'host'}, `{' '.join(['benchmarks/fidelity.py', *sys.argv[1:]])}`"
    )
    text = "\n".join(markdown(rows, w) for w in args.weights)
    (args.output / "fidelity-135m.md").write_text(f"<!-- {stamp} -->\n{text}")
    print(text)


if __name__ == "__main__":
    main()
