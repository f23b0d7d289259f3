"""Which weight matrices of a model suffer most from int4? A fake-quantization scan in PyTorch.

For each variant, the model's matrices are quantized and dequantized with the exporter's own code (the same
calibration pass, algorithms and mixed-precision rules as `smolexport onnx`), written back into the float
PyTorch model, and compared with the float model on a held-out text: mean KL(float || quantized) of the
next-token distributions and top-1 agreement. No ONNX export, so a variant takes seconds.

  --scan GROUPS: quantize one group of matrices at a time (the rest stay float) and rank the groups by KL.
  --scan-layers KIND: the same, one layer's KIND matrix (e.g. down_proj) at a time.
  --variants: whole-model variants (algo + --int8-layers patterns), e.g. to choose a preset.

The default text is benchmarks/dev/export-folder-text.txt (a frozen copy of an early docs/export-folder.md):
neither the calibration text nor validation's inputs. `--dev` scores on the held-out dev set instead
(benchmarks/dev: chat prompts with the float model's answers, and two texts), pooled like `smolexport validate`;
variants may end in `:option=value,...` (DecoderOptions fields): `accuracy_level=4` also rounds each quantized
matrix's input to int8 per block, as the export's default MatMulNBits kernels on CPU do (and the awq search then
models it); `weight_bits=8,lm_head_bits=8` for int8.

  .venv/bin/python benchmarks/sensitivity.py --model benchmarks/work/smollm2-135m-instruct-degrid --scan
  .venv/bin/python benchmarks/sensitivity.py --model DIR --variants "rtn:" "gptq:embed_tokens,lm_head"
  .venv/bin/python benchmarks/sensitivity.py --model DIR --dev --variants "awq:*.v_proj:block_size=16,log8_scales=1"
  .venv/bin/python benchmarks/sensitivity.py --model DIR --dev --gguf DIR/llamacpp-q4_k_m.gguf  # a peer's weights
  .venv/bin/python benchmarks/sensitivity.py --model DIR --dev --scan-layers down_proj

`--gguf` scores a GGUF's weights as transformers dequantizes them (float activations: llama.cpp's own
rounding of the activations is not modelled; compare with variants scored without `accuracy_level=4`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from smolexport.llama_config import LlamaConfig
from smolexport.onnx.calibration import Calibration, load_calibration_ids
from smolexport.onnx.decoder import DecoderBuilder, DecoderOptions, _calibrate, _layer_weights
from smolexport.onnx.mixed import parse_patterns

ROOT = Path(__file__).resolve().parent.parent
MATRICES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
# A frozen copy of docs/export-folder.md as it was when the dev set was chosen: the doc may change, the dev set not.
DEFAULT_TEXT = ROOT / "benchmarks" / "dev" / "export-folder-text.txt"
ROLES = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}


def fake_quantize(model, state: dict, config: LlamaConfig, options: DecoderOptions, ids, only=None) -> None:
    """Writes dequantized int4 (or mixed) weights into `model`; `only(name)` limits which matrices change.
    With algo awq the rescaled norms are written too, so the float function is the same and only rounding
    differs."""
    b = DecoderBuilder(None, config, options)
    calibration = Calibration(config, state["model.embed_tokens.weight"], ids) if options.calibrated else None
    params = dict(model.named_parameters())
    for i in range(config.num_hidden_layers):
        attn, mlp, input_norm, post_norm = _layer_weights(state.get, i)
        inputs, input_norm, post_norm = _calibrate(b, calibration, i, attn, mlp, input_norm, post_norm)
        params[f"model.layers.{i}.input_layernorm.weight"].data = torch.from_numpy(np.asarray(input_norm))
        params[f"model.layers.{i}.post_attention_layernorm.weight"].data = torch.from_numpy(np.asarray(post_norm))
        for key, path in MATRICES.items():
            name = f"layers.{i}.{path.split('.')[1]}"
            weight = (attn if key in ("q", "k", "v", "o") else mlp)[key]
            param = params[f"model.layers.{i}.{path}.weight"]
            if only is None or only(name):
                _replace(b, param, weight, name, inputs.get(ROLES[key]))
            else:
                param.data = torch.from_numpy(np.ascontiguousarray(weight))
    # As the exporter: the lm_head (tied or not) is quantized with the final-normed calibration hidden states.
    final = calibration.final(state["model.norm.weight"]) if calibration else None
    tied = config.tie_word_embeddings
    for name in ("embed_tokens", "lm_head"):
        full = "model.embed_tokens.weight" if name == "embed_tokens" else "lm_head.weight"
        if full in params and (only is None or only(name)) and not (name == "lm_head" and tied):
            _replace(b, params[full], state[full], name, final if (name == "lm_head" or tied) else None)


def _replace(b: DecoderBuilder, param, weight: np.ndarray, name: str, calib) -> None:
    from smolexport.onnx.quantize import dequantize_blockwise
    from smolexport.onnx.vocab import VocabMatrix

    if name in ("embed_tokens", "lm_head"):  # row ranges as the exporter splits them (int8_vocab)
        parts = VocabMatrix(b, name, weight, b.lm_head_bits).parts
        rows = [b.quantize(name, weight[p.start : p.stop], p.bits, p.block_size, calib) for p in parts]
        param.data = torch.from_numpy(np.concatenate([dequantize_blockwise(qw) for qw in rows]))
        return
    bits, block = b._bits(name, b.o.weight_bits, weight.shape[1])
    param.data = torch.from_numpy(dequantize_blockwise(b.quantize(name, weight, bits, block, calib)))


def simulate_int8_inputs(model, b: DecoderBuilder, config: LlamaConfig) -> list:
    """Hooks that round every quantized matrix's input to int8 per block, as MatMulNBits does at accuracy_level
    4 on CPU (the export's default), so that a variant's score includes that rounding. Returns the handles."""
    from smolexport.onnx.awq import int8_round_blocks
    from smolexport.onnx.vocab import VocabMatrix

    def rounded(x: torch.Tensor, block_size: int) -> torch.Tensor:
        return torch.from_numpy(int8_round_blocks(x.numpy(), block_size))

    def rounding(block_size: int):
        return lambda module, args: (rounded(args[0], block_size),)

    handles = []
    for i, layer in enumerate(model.model.layers):
        for path in MATRICES.values():
            linear = layer.get_submodule(path)
            _, block = b._stored_as(f"layers.{i}.{path.split('.')[1]}", b.o.weight_bits, linear.in_features)
            handles.append(linear.register_forward_pre_hook(rounding(block)))
    name = "embed_tokens" if config.tie_word_embeddings else "lm_head"
    weight = model.lm_head.weight
    parts = VocabMatrix(b, name, weight.detach().numpy(), b.lm_head_bits).parts

    def lm_head(module, args, out):  # each row range is its own MatMulNBits with its own block size
        x = args[0]
        return torch.cat([rounded(x, p.block_size) @ weight[p.start : p.stop].T for p in parts], -1)

    handles.append(model.lm_head.register_forward_hook(lm_head))
    return handles


def compare(references: list[torch.Tensor], model, segments: list) -> dict:
    """Mean KL(float || quantized) and top-1 agreement over every scored position of every segment, and the
    perplexity ratio over the text segments (teacher-forced, as `smolexport validate` scores)."""
    kl_sum = top1_sum = positions = 0.0
    nll = {"ref": 0.0, "out": 0.0, "n": 0}
    for reference, (ids, start, is_text) in zip(references, segments, strict=True):
        with torch.no_grad():
            logits = model(ids[None]).logits[0, start:-1].double()
        targets = ids[start + 1 :]
        ref, out = reference.log_softmax(-1), logits.log_softmax(-1)
        kl_sum += (ref.exp() * (ref - out)).sum(-1).sum().item()
        top1_sum += (ref.argmax(-1) == out.argmax(-1)).double().sum().item()
        positions += len(targets)
        if is_text:
            rows = torch.arange(len(targets))
            nll["ref"] -= ref[rows, targets].sum().item()
            nll["out"] -= out[rows, targets].sum().item()
            nll["n"] += len(targets)
    row = {"kl": round(kl_sum / positions, 4), "top1": round(top1_sum / positions, 4)}
    if nll["n"]:
        row["ppl_ratio"] = round(float(np.exp((nll["out"] - nll["ref"]) / nll["n"])), 4)
    return row


def dev_segments(model, folder: Path, tokens: int) -> list:
    """The held-out dev set (benchmarks/dev): each prompt in the chat template followed by the float model's
    greedy answer (48 tokens, scored from the answer's first token), then the dev text and the default text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    segments = []
    for prompt in json.loads((ROOT / "benchmarks" / "dev" / "prompts.json").read_text()):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        answer = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0]
        segments.append((answer, len(ids) - 1, False))
    for text in (ROOT / "benchmarks" / "dev" / "text.txt", DEFAULT_TEXT):
        segments.append((torch.tensor(tokenizer(text.read_text()).input_ids[:tokens]), 0, True))
    return segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face folder")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--algo", default="rtn", help="algorithm for --scan")
    parser.add_argument("--scan", action="store_true", help="quantize one group at a time")
    parser.add_argument("--scan-layers", metavar="KIND", help="quantize one layer's KIND (e.g. down_proj) at a time")
    parser.add_argument("--variants", nargs="*", default=[], metavar="ALGO:PATTERNS")
    parser.add_argument("--calibration", type=Path, default=None, help="calibration text (default: built-in)")
    parser.add_argument("--calibration-tokens", type=int, default=None)
    parser.add_argument("--dev", action="store_true", help="score on benchmarks/dev (chat answers + texts)")
    parser.add_argument("--gguf", type=Path, nargs="*", default=[], help="also score these GGUF files' weights")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    folder = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    config = LlamaConfig.from_dict(model.config.to_dict())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if args.dev:
        segments = dev_segments(model, folder, args.tokens)
    else:
        segments = [(torch.tensor(tokenizer.encode(args.text.read_text()).ids[: args.tokens]), 0, True)]
    calib_ids = load_calibration_ids(folder / "tokenizer.json", args.calibration, args.calibration_tokens)
    references = [model(ids[None]).logits[0, start:-1].double() for ids, start, _ in segments]
    results = []

    def run(label: str, options: DecoderOptions, only=None) -> None:
        started = time.perf_counter()
        fake_quantize(model, state, config, options, calib_ids, only)
        # accuracy_level=4 in a variant's options: score with the CPU kernels' int8 inputs too
        builder = DecoderBuilder(None, config, options)
        hooks = simulate_int8_inputs(model, builder, config) if options.accuracy_level == 4 else []
        row = {
            "variant": label,
            **compare(references, model, segments),
            "seconds": round(time.perf_counter() - started),
        }
        for hook in hooks:
            hook.remove()
        print(json.dumps(row), flush=True)
        results.append(row)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})

    if args.scan:
        n = config.num_hidden_layers
        groups = {"embed_tokens/lm_head": lambda m: m in ("embed_tokens", "lm_head")}
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            groups[f"all {kind}"] = lambda m, kind=kind: m.endswith(kind)
        for i in sorted({0, 1, n // 2, n - 2, n - 1}):
            groups[f"layer {i}"] = lambda m, i=i: m.startswith(f"layers.{i}.")
        options = DecoderOptions(weight_bits=4, lm_head_bits=4, algo=args.algo)
        for label, only in groups.items():
            run(f"int4 {args.algo}: only {label}", options, only)
    if args.scan_layers:
        options = DecoderOptions(weight_bits=4, lm_head_bits=4, algo=args.algo)
        for i in range(config.num_hidden_layers):
            name = f"layers.{i}.{args.scan_layers}"
            run(f"int4 {args.algo}: only {name}", options, name.__eq__)
    for variant in args.variants:
        algo, _, rest = variant.partition(":")
        patterns, _, extra = rest.partition(":")  # extra: DecoderOptions overrides, e.g. "block_size=16"
        overrides = {key: int(value) for key, value in (item.split("=") for item in extra.split(",") if item)}
        overrides = {"weight_bits": 4, "lm_head_bits": 4, **overrides}  # e.g. weight_bits=8,lm_head_bits=8
        options = DecoderOptions(algo=algo, int8_layers=parse_patterns(patterns), **overrides)
        run(variant, options)
    for gguf in args.gguf:  # e.g. llama.cpp's quantizations of the same weights, dequantized by transformers
        started = time.perf_counter()
        other = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
        row = {"variant": f"gguf {gguf}", **compare(references, other.eval(), segments)}
        print(json.dumps({**row, "seconds": round(time.perf_counter() - started)}), flush=True)
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
