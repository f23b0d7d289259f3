"""Named quantization recipes (`smolexport onnx --preset NAME`), chosen by measurement: see docs/quantization.md.

`--quant int4` and `--quant int8` without a preset get `recommended`: for each, the recipe that sat on the
frontier of decode speed and fidelity on the held-out dev set (benchmarks/dev). `rtn` is the quick
round-to-nearest export (no calibration: seconds instead of minutes). A preset fills the options it names;
options given explicitly on the command line win.
"""

from __future__ import annotations

from ..errors import UsageError

DEFAULT = "recommended"

# The recommended recipe per weight type.
RECOMMENDED: dict[str, dict] = {
    # int4 in blocks of 32 (MatMulNBits' fast block size: the same recipe in blocks of 16 decodes at 0.75x on
    # CPU) with log8 scales (one byte per block), activation-aware channel scaling and the activation-weighted
    # clipping search (algo awq; the lm_head by GPTQ); kept at 8 bits: every v_proj, the first and the last
    # layer, and the embedding/lm_head rows of the 16,384 lowest token ids (a BPE vocabulary's common tokens,
    # vocab.py). Chosen on the dev set against decode speed: docs/quantization.md, "Choosing the default".
    "int4": {
        "algo": "awq",
        "block_size": 32,
        "scales": "log8",
        "int8_layers": "*.v_proj,layers.0.*,layers.-1.*",
        "int8_vocab": 16384,
    },
    # int8 with activation-aware channel scaling: at ONNX Runtime's default CPU kernels (accuracy level 4) the
    # activations are rounded to int8 too, and awq's search, which models that rounding, moves their outlier
    # channels into the weights (plain int8 there answers "What is the capital of France?" wrongly); the
    # lm_head by GPTQ. Accuracy level 0 would avoid the rounding but has no fast 8-bit CPU kernel.
    "int8": {"algo": "awq"},
}

PRESETS: dict[str, dict] = {
    DEFAULT: {},  # per weight type: RECOMMENDED
    # The quick export: round-to-nearest, every matrix at the chosen bits, blocks of 32, fp16 scales. Accepted
    # (and meaningless) with float weights too, so that a script can pass it for every --quant.
    "rtn": {"algo": "rtn"},
    # int4 in blocks of 16: closer to the original than `recommended`, but it decodes at 0.75x its speed (135M, CPU).
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
    # The name earlier releases gave the recommended int8 recipe.
    "quality-int8": {"quant": "int8", **RECOMMENDED["int8"]},
}


def recipe(name: str, quant: str) -> dict:
    """The options preset `name` fills for weights `quant` (int4 | int8)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    if quant not in ("int4", "int8"):
        raise UsageError(f"presets are int4/int8 recipes; --quant {quant} takes none")
    fixed = PRESETS[name].get("quant")
    if fixed and fixed != quant:
        fitting = [n for n, r in PRESETS.items() if r.get("quant", quant) == quant]
        raise UsageError(f"preset {name} is an {fixed} recipe: for {quant}, use --preset {' or '.join(fitting)}")
    return RECOMMENDED[quant] if name == DEFAULT else PRESETS[name]


def preset_quant(name: str | None) -> str | None:
    """The weight type a preset implies (quality: int4), or None when it fits both."""
    if name is not None and name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name].get("quant") if name else None
