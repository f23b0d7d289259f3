"""Mixed precision: which weight matrices of an int4 export are stored with 8 bits instead.

Matrices are named as in the checkpoint, without the "model." prefix and "self_attn."/"mlp." parts:
`embed_tokens` (also the lm_head when tied), `lm_head` (untied), `layers.N.q_proj`, `k_proj`, `v_proj`,
`o_proj`, `gate_proj`, `up_proj`, `down_proj`. Patterns are shell-style (fnmatch), e.g. `embed_tokens`,
`layers.0.*`, `*.down_proj`; negative layer numbers count from the end (`layers.-1.*` is the last layer), so
one recipe fits models of any depth. The fused graph packs q/k/v and gate/up into one MatMulNBits each (one bit width
per node): a packed matrix gets 8 bits when any of its parts matches.

8-bit matrices use wide blocks (`int8_block_size`): at 8 bits a block's range costs little precision, and the
fp16 scales and zero points of 32-wide blocks would add ~9% to the matrix. The wider of 64/32 that divides the
input width is taken, so that no padding is stored (576 = 9 x 64 for SmolLM2-135M). Not 128: ONNX Runtime
1.32's 8-bit CPU kernel at accuracy level 4 computes a row differently (by ~3e-5) depending on how many rows
come with it in blocks of 128, which breaks the runtime's bit-identical reuse of a conversation's cache.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from ..errors import UsageError

INT8_BLOCK_SIZES = (64, 32)
PACKED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
KNOWN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
CANDIDATES = ("embed_tokens", "lm_head", *(f"layers.{i}.{name}" for i in range(-1000, 1000) for name in KNOWN))


def parse_patterns(text: str | None) -> tuple[str, ...]:
    """`--int8-layers` value: comma-separated patterns."""
    patterns = tuple(p.strip() for p in (text or "").split(",") if p.strip())
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in CANDIDATES):
            raise UsageError(
                f"--int8-layers pattern {pattern!r} matches no weight matrix; names look like embed_tokens, "
                "lm_head, layers.N.q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
            )
    return patterns


def matrix_parts(graph_name: str, num_layers: int | None = None) -> list[str]:
    """Checkpoint-style names of the matrices in a graph weight, e.g. 'layers.3.attn.qkv_proj' ->
    ['layers.3.q_proj', 'layers.3.k_proj', 'layers.3.v_proj']; with `num_layers`, also each name with its
    layer counted from the end ('layers.-1.q_proj' for the last layer)."""
    parts = graph_name.split(".")
    if parts[0] != "layers":
        return [graph_name]
    last = parts[-1]
    layers = [parts[1]] if num_layers is None else [parts[1], str(int(parts[1]) - num_layers)]
    return [f"layers.{i}.{p}" for i in layers for p in PACKED_PARTS.get(last, (last,))]


def wants_int8(patterns: tuple[str, ...], graph_name: str, num_layers: int | None = None) -> bool:
    """Whether any pattern matches a part of the graph weight. Only patterns that name a negative layer see the
    counted-from-the-end names, so that e.g. `layers.*1.*` keeps meaning layers 1, 11, 21..."""
    positive = matrix_parts(graph_name)
    both = matrix_parts(graph_name, num_layers)
    return any(fnmatchcase(part, p) for p in patterns for part in (both if "layers.-" in p else positive))


def is_ffn(graph_name: str) -> bool:
    """Whether a graph weight is one of the feed-forward matrices (gate/up/down, or the packed gate_up), the
    ones `--ffn-block-size` applies to; checkpoint-style names ('layers.3.down_proj') are recognised too."""
    return any(part.rsplit(".", 1)[-1] in FFN for part in matrix_parts(graph_name))


def int8_block_size(k: int) -> int:
    """Block size of an 8-bit matrix with `k` inputs: the widest that divides k, else the widest."""
    return next((size for size in INT8_BLOCK_SIZES if k % size == 0), INT8_BLOCK_SIZES[0])
