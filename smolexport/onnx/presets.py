"""Named quantization recipes (`smolexport onnx --preset NAME`), chosen by measurement: see docs/quantization.md.

A preset fills the options it names; options given explicitly on the command line win.
"""

from __future__ import annotations

from ..errors import UsageError

PRESETS: dict[str, dict] = {
    # int4 in blocks of 16 with log8 scales (about the size of fp16-scaled blocks of 32), activation-aware
    # channel scaling and the activation-weighted clipping search (algo awq; the lm_head by GPTQ); kept at 8
    # bits: every v_proj (per weight the most sensitive matrix: grouped-query attention's few KV heads feed
    # every query head), the first and the last layer, and the embedding/lm_head rows of the 16,384 lowest
    # token ids (a BPE vocabulary's common tokens, vocab.py). Chosen on the held-out dev set
    # (benchmarks/sensitivity.py --dev), see docs/quantization.md. SmolLM2-135M-Instruct: 1.15x plain int4.
    "quality": {
        "quant": "int4",
        "algo": "awq",
        "block_size": 16,
        "scales": "log8",
        "int8_layers": "*.v_proj,layers.0.*,layers.-1.*",
        "int8_vocab": 16384,
    },
    # The whole embedding/lm_head at 8 bits, and the first two and last two layers: 1.29x plain int4 on
    # SmolLM2-135M-Instruct, smaller than llama.cpp's Q4_K_M of the same weights and closer to the original on
    # KL (docs/quantization.md).
    "quality-plus": {
        "quant": "int4",
        "algo": "awq",
        "block_size": 16,
        "scales": "log8",
        "int8_layers": "embed_tokens,*.v_proj,layers.0.*,layers.1.*,layers.-2.*,layers.-1.*",
    },
    # int8 with activation-aware channel scaling: at ONNX Runtime's default CPU kernels (accuracy level 4) the
    # activations are rounded to int8 too, and awq's search, which models that rounding, moves their outlier
    # channels into the weights; the lm_head by GPTQ. SmolLM2-135M-Instruct, de-gridded: top-1 0.96 -> 0.98
    # against plain int8, same size (docs/quantization.md).
    "quality-int8": {
        "quant": "int8",
        "algo": "awq",
    },
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
