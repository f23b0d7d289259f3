"""The `smolexport` command line: a thin layer over the library functions."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .cli_errors import user_errors
from .cli_options import speculation_options
from .errors import UsageError
from .onnx.export import ALGOS, QUANT_MODES, SCALE_FORMATS, OnnxExportOptions, export_onnx
from .onnx.presets import PRESETS
from .progress import Progress
from .sources import DEFAULT_MODEL

# transformers' GGUF loader draws an unconditional tqdm bar; we report progress ourselves. tqdm reads this
# variable when it is first imported, so it is set before anything imports it.
os.environ.setdefault("TQDM_DISABLE", "1")


def writable(path: Path | None) -> Path | None:
    """Checks an output file's folder before hours of work, not after."""
    if path is not None and not path.absolute().parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {path.absolute().parent} does not exist")
    return path


def text_argument(name: str, value: str) -> str:
    """Python decodes a command line that is not UTF-8 into lone surrogates, which no tokenizer encodes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{name} is not valid UTF-8 text (check the terminal's encoding)") from None
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="smolexport")
def main():
    """Export small Llama-architecture LLMs (SmolLM2) for on-device use, run them, and validate them."""


@main.command("onnx")
@click.option(
    "--model",
    "model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Hub id, local Hugging Face folder, .gguf file, or the bundled 'smollm2-135m-instruct'.",
)
@click.option("--quant", type=click.Choice(QUANT_MODES), default=None, help="Weights  [default: int4]")
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default=None,
    help="A measured recipe  [default: recommended]. 'recommended': int4 --algo awq in blocks of 32 with log8 "
    "scales, v_proj, the first and last layer and the embedding/lm_head rows of the 16,384 lowest token ids at "
    "8 bits; int8 --algo awq. 'rtn': the quick export, plain round-to-nearest (seconds, no calibration; less "
    "faithful). 'quality': int4 in blocks of 16, closer to the original, slower to decode. 'quality-plus': "
    "also the whole embedding/lm_head and the first and last two layers at 8 bits (docs/quantization.md). "
    "Flags given explicitly override it.",
)
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Export folder to create.")
@click.option(
    "--block-size",
    type=click.Choice(["16", "32", "64", "128", "256"]),
    default=None,
    help="Block size of int4/int8 weight quantization  [default: the preset's, else 32]",
)
@click.option(
    "--ffn-block-size",
    type=click.Choice(["16", "32", "64", "128", "256"]),
    default=None,
    help="Block size of the feed-forward matrices (gate/up/down, three quarters of the weights) where they keep "
    "the export's bits: wider blocks read fewer bytes per token (docs/quantization.md)  [default: the preset's, "
    "else --block-size]",
)
@click.option(
    "--scales",
    type=click.Choice(list(SCALE_FORMATS)),
    default=None,
    help="Block scales: fp16, or log8 (one byte per block and one fp32 number per row: blocks of 16 for about "
    "the size of fp16-scaled blocks of 32)  [default: the preset's (recommended int4: log8), else fp16]",
)
@click.option(
    "--lm-head-bits",
    type=click.Choice(["4", "8"]),
    default=None,
    help="Bits of the embedding/lm_head matrix (default: as the other weights).",
)
@click.option(
    "--context",
    "context_length",
    type=int,
    default=None,
    help="Longest prompt + answer, in tokens (default: the model's maximum).",
)
@click.option(
    "--algo",
    type=click.Choice(list(ALGOS)),
    default=None,
    help="int4/int8 rounding  [default: the preset's]: round-to-nearest (rtn); a per-block clipping search "
    "(mse); that search weighted by calibration activations (act-mse); act-mse after activation-aware channel "
    "scaling folded into the norms (awq); GPTQ error compensation on calibration inputs (gptq); or GPTQ after "
    "awq's scaling (awq-gptq).",
)
@click.option(
    "--int8-layers",
    default=None,
    metavar="PATTERNS",
    help="int4 only: comma-separated matrices kept at 8 bits, e.g. 'embed_tokens,lm_head,layers.0.*,*.down_proj'.",
)
@click.option(
    "--int8-vocab",
    type=click.IntRange(0),
    default=None,
    metavar="N",
    help="int4 only: keep the embedding/lm_head rows of the first N token ids (a BPE vocabulary's common tokens) "
    "at 8 bits  [default: the preset's, else 0]",
)
@click.option(
    "--kv-cache",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default=None,
    help="KV cache type: fp16 halves the cache's memory (attention then computes in fp16); int8 quarters it "
    "(fixed per-channel scales set from the calibration text; ONNX Runtime CPU)  [default: as the "
    "activations: fp32, or fp16 for --quant fp16]",
)
@click.option(
    "--calibration",
    "calibration_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Calibration text for --algo act-mse/awq/gptq and --kv-cache int8, first 2,048 tokens (default: a "
    "built-in text).",
)
@click.option(
    "--standard-ops",
    is_flag=True,
    help="Standard ONNX ops only (no GroupQueryAttention etc.): slower, but portable and batch-padding safe.",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=4,
    show_default=True,
    help="MatMulNBits compute type for int4/int8 on CPU: 4 = int8 activations (fast), 0 = fp32 (slightly more "
    "exact, much slower for 8-bit weights).",
)
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@user_errors
def onnx_command(
    model,
    quant,
    preset,
    output,
    block_size,
    ffn_block_size,
    scales,
    lm_head_bits,
    context_length,
    algo,
    int8_layers,
    int8_vocab,
    kv_cache,
    calibration_file,
    standard_ops,
    accuracy_level,
    force,
    quiet,
):
    """Export MODEL to an ONNX folder with a KV-cache decoder."""  # noqa: D401
    options = OnnxExportOptions(
        quant=quant,
        block_size=int(block_size) if block_size else None,
        ffn_block_size=int(ffn_block_size) if ffn_block_size else None,
        scales=scales,
        lm_head_bits=int(lm_head_bits) if lm_head_bits else None,
        context_length=context_length,
        fused=not standard_ops,
        accuracy_level=accuracy_level,
        algo=algo,
        int8_layers=int8_layers,
        int8_vocab=int8_vocab,
        kv_cache=kv_cache,
        preset=preset,
        calibration_file=calibration_file,
        force=force,
    )
    manifest = export_onnx(model, output, options, Progress(enabled=not quiet))
    size = sum(f["bytes"] for f in manifest["files"].values())
    quant = manifest["quant"]
    mode = quant["mode"] + (f", preset {quant['preset']}" if quant.get("preset") else "")
    click.echo(f"exported {model} ({mode}) to {output}: {size / 1e6:.1f} MB in {manifest['export_seconds']} s")


@main.command("run")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--greedy", is_flag=True, help="Always pick the most likely token.")
@click.option("--temperature", type=click.FloatRange(0), default=None, help="Sampling temperature (default: greedy).")
@click.option("--top-k", type=click.IntRange(0), default=None)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--system", default=None, help="System prompt.")
@click.option("--raw", is_flag=True, help="Feed PROMPT as plain text, without the chat template.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option(
    "--json-schema",
    "schema_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Constrain the answer to this JSON Schema (a .json file).",
)
@speculation_options("Greedy only")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@user_errors
def run_command(
    export_dir, prompt, max_new_tokens, greedy, temperature, top_k, top_p, seed, system, raw, stop, schema_file,
    prompt_lookup, draft_model, draft_tokens, provider, threads,
):  # fmt: skip
    """Generate an answer to PROMPT with an export; prints only the generated text on stdout."""
    from smolexport_runtime import load

    if any(not s for s in stop):
        raise UsageError("--stop takes a non-empty string")
    if not prompt.strip():
        raise UsageError("PROMPT is empty: give the text to answer")
    for name, value in (("PROMPT", prompt), ("--system", system or ""), *(("--stop", s) for s in stop)):
        text_argument(name, value)
    schema = None
    if schema_file is not None:
        try:
            schema = json.loads(schema_file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise UsageError(f"--json-schema {schema_file} is not a JSON file: {exc}") from None
    sampled = not greedy and (temperature or 0) > 0
    if (prompt_lookup or draft_model is not None) and (sampled or schema_file is not None):
        # The runtime would quietly decode without speculation: say so before loading anything.
        raise UsageError("--prompt-lookup and --draft-model speed up greedy, unconstrained answers only: "
                         "drop --temperature or --json-schema")  # fmt: skip
    model = load(export_dir, providers=provider, threads=threads)
    drafter = load(draft_model, providers=provider, threads=threads) if draft_model is not None else None
    if raw:
        request = prompt
    else:
        request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    sampling = {key: value for key, value in sampling.items() if value is not None}
    for piece in model.stream(
        request, max_new_tokens=max_new_tokens, greedy=greedy, seed=seed, stop=list(stop), chat=not raw,
        response_format=schema, prompt_lookup=prompt_lookup, draft_model=drafter, draft_tokens=draft_tokens,
        **sampling,
    ):  # fmt: skip
        click.echo(piece, nl=False)
    click.echo()


@main.command("validate")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--reference", default=None, help="PyTorch original (default: the source in the manifest).")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    default=None,
    help="JSON list of prompt strings (default: a built-in set).",
)
@click.option(
    "--text",
    "text_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Text file for perplexity (default: a built-in text).",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Length of each reference greedy continuation.",
)
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    metavar="METRIC=VALUE",
    help="Override a bound, e.g. top1_agreement=0.9 (repeatable).",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report here.")
@click.option(
    "--markdown", "markdown_out", type=click.Path(path_type=Path), default=None, help="Write a Markdown report here."
)
@click.option(
    "--baseline",
    "baseline_file",
    type=click.Path(path_type=Path),
    default=None,
    help="A previous --json report: also fail if fidelity or latency regressed past it.",
)
@click.option(
    "--max-top1-drop", type=click.FloatRange(0), default=0.01, show_default=True, help="With --baseline: absolute."
)
@click.option(
    "--max-kl-increase",
    type=click.FloatRange(0),
    default=0.25,
    show_default=True,
    help="With --baseline: relative (0.25 = +25%, plus 1e-4).",
)
@click.option(
    "--max-ppl-increase",
    type=click.FloatRange(0),
    default=0.01,
    show_default=True,
    help="With --baseline: absolute, on the perplexity ratio.",
)
@click.option(
    "--max-latency-increase",
    type=click.FloatRange(0),
    default=0.5,
    show_default=True,
    help="With --baseline: relative, on prefill and per-token decode time; 'inf' ignores latency.",
)
@click.option("--quiet", "-q", is_flag=True)
@user_errors
def validate_command(
    export_dir, reference, prompts_file, text_file, max_new_tokens, thresholds, json_out, markdown_out, baseline_file,
    max_top1_drop, max_kl_increase, max_ppl_increase, max_latency_increase, quiet,
):  # fmt: skip
    """Compare an export with its PyTorch original; exit 0 if it passes, 1 if not, 2 on usage errors."""
    from .validate import validate_export
    from .validate.baseline import Tolerances, baseline_summary, compare, load_baseline
    from .validate.thresholds import parse_overrides

    writable(json_out), writable(markdown_out)
    tolerances = Tolerances(max_top1_drop, max_kl_increase, max_ppl_increase, max_latency_increase)
    baseline = load_baseline(baseline_file) if baseline_file else None  # a bad baseline fails before the work
    report = validate_export(
        export_dir,
        reference=reference,
        prompts_file=prompts_file,
        text_file=text_file,
        max_new_tokens=max_new_tokens,
        thresholds=parse_overrides(thresholds),
        progress=Progress(not quiet),
    )
    if baseline is not None:
        report.baseline = {"file": str(baseline_file), **compare(report.to_dict(), baseline, tolerances)}
    if json_out:
        report.write_json(json_out)
    if markdown_out:
        report.write_markdown(markdown_out)
    click.echo(report.summary())
    if report.baseline is not None:
        click.echo(baseline_summary(report.baseline, baseline_file))
    regressed = report.baseline is not None and not report.baseline["passed"]
    sys.exit(0 if report.passed and not regressed else 1)


@main.command("coreml")
@click.option(
    "--model",
    "model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Hub id, local Hugging Face folder, .gguf file, or the bundled 'smollm2-135m-instruct'.",
)
@click.option("--quant", type=click.Choice(["int4", "int8", "fp16"]), default="int4", show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Export folder to create.")
@click.option(
    "--context",
    "context_length",
    type=click.IntRange(3),
    default=2048,
    show_default=True,
    help="KV-cache length (Core ML states are allocated at this size).",
)
@click.option(
    "--algo",
    type=click.Choice(["rtn", "mse"]),
    default="rtn",
    show_default=True,
    help="int4 rounding: round-to-nearest, or a per-block clip search minimizing the weight error.",
)
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128"]), default="32", show_default=True)
@click.option("--all-logits", is_flag=True, help="Output logits for every new position, not only the last.")
@click.option("--force", is_flag=True, help="Replace the output folder if it is an earlier export.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@user_errors
def coreml_command(model, quant, output, context_length, algo, block_size, all_logits, force, quiet):
    """Export MODEL to a Core ML ML Program with a stateful KV cache (iOS 18 / macOS 15)."""
    from .coreml.export import CoreMLExportOptions, export_coreml

    options = CoreMLExportOptions(
        quant=quant, context_length=context_length, block_size=int(block_size), algo=algo,
        all_logits=all_logits, force=force,
    )  # fmt: skip
    manifest = export_coreml(model, output, options, Progress(enabled=not quiet))
    size = sum(f["bytes"] for f in manifest["files"].values())
    click.echo(
        f"exported {model} ({quant}, Core ML) to {output}: {size / 1e6:.1f} MB in {manifest['export_seconds']} s"
    )


@main.command("bench")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Medians over this many runs.")
@click.option(
    "--context",
    type=click.IntRange(64),
    default=2048,
    show_default=True,
    help="KV-cache length filled for the peak-memory measurement.",
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--scenario",
    "scenarios",
    type=click.Choice(["speed", "chat", "cold", "structured", "serve", "all"]),
    multiple=True,
    default=["speed"],
    show_default=True,
    help="speed: TTFT, decode, memory; chat: a replayed 8-turn chat (TTFT per turn, with and without prefix "
    "reuse); cold: process start to first token; structured: JSON-schema constrained decoding (compile time, "
    "mask time per token, tokens/s against free text); serve: concurrent streaming clients. Repeat or use 'all'.",
)
@click.option("--clients", type=click.IntRange(1, 64), default=8, show_default=True, help="Clients for 'serve'.")
@click.option("--serve-tokens", type=click.IntRange(1), default=128, show_default=True, help="Tokens per client.")
@click.option(
    "--constrained",
    is_flag=True,
    help="'serve': every client asks for JSON held to a schema (response_format json_schema, streamed).",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the results here.")
@user_errors
def bench_command(
    export_dir, threads, runs, context, provider, scenarios, clients, serve_tokens, constrained, json_out
):  # fmt: skip
    """Time to first token, decode speed, peak memory, size; multi-turn chat, cold start and concurrent
    clients with --scenario. Each workload runs in processes of its own."""
    from .bench import SCENARIOS, run_bench

    writable(json_out)
    chosen = SCENARIOS if "all" in scenarios else tuple(scenarios)
    result = run_bench(export_dir, threads=threads, runs=runs, context=context, provider=provider,
                       scenarios=chosen, clients=clients, serve_tokens=serve_tokens,
                       serve_constrained=constrained)  # fmt: skip
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        click.echo(f"{key:>20}: {value}")


from .apps_cli import chat_command, serve_command  # noqa: E402  # the sample apps (smolexport serve / chat)

main.add_command(serve_command)
main.add_command(chat_command)

if __name__ == "__main__":
    main()
