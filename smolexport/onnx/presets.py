"""Named quantization recipes (`smolexport onnx --preset NAME`), chosen by measurement: see docs/quantization.md.

A preset fills the options it names; options given explicitly on the command line win.
"""

from __future__ import annotations

from ..errors import UsageError

PRESETS: dict[str, dict] = {
    # int4 with activation-aware channel scaling and the activation-weighted clipping search (algo awq); kept
    # at 8 bits: the embedding/lm_head and v_proj, the matrices whose int4 error costs most
    # (benchmarks/sensitivity.py; v_proj per parameter by far). SmolLM2-135M-Instruct: 1.14x plain int4's size.
    "quality": {"quant": "int4", "algo": "awq", "int8_layers": "embed_tokens,lm_head,*.v_proj"},
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
