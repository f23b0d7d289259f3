"""Activation-aware channel scaling (AWQ-style), folded into the float weights before quantization.

A few input channels of each linear layer carry much larger activations than the rest, and the rounding error
of the weights in those channels dominates the layer's output error. Scaling weight column j up by s_j and
the layer's input down by 1/s_j leaves the float model unchanged, but gives those columns more of the 4-bit
grid. The 1/s goes where it costs nothing at run time:
- q/k/v (input: input RMSNorm) and gate/up (input: post-attention RMSNorm): into the norm's weight;
- down_proj (input: silu(gate) * up): into up_proj's rows;
- o_proj (input: the attention context): into v_proj's rows (with grouped-query attention, one scale per KV
  channel, shared by the query heads that read it).
Per group, s = mean|x|^alpha (normalised), with alpha picked from a grid by the group's measured output error
on the calibration inputs, each candidate quantized by round-to-nearest (alpha = 0 is "no scaling", so the
search never makes a layer worse on its calibration inputs). The calibration inputs handed to the quantizer
afterwards are divided by s too, so the clipping search (act-mse) and GPTQ see the scaled problem.
Memory: one layer's weights and calibration activations at a time, like the rest of the export.
"""

from __future__ import annotations

import numpy as np

from .calibration import LayerInput
from .quantize import dequantize_blockwise, quantize_blockwise

ALPHAS = np.linspace(0.0, 1.0, 21)
MAX_TOKENS = 512  # calibration rows used to score a candidate, evenly spaced over the calibration text


def _output_error(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, bits: int, block_size: int) -> float:
    """|| x W^T - (x / s) Q(W s)^T ||^2 for a candidate column scaling s."""
    quantized = dequantize_blockwise(quantize_blockwise(weight * scales, bits, block_size, np.float16)) / scales
    return float(np.square(x @ (quantized - weight).T).sum())


def search_scales(x: np.ndarray, weight: np.ndarray, bits: int, block_size: int, magnitude=None, expand=None):
    """The per-input-channel scale (all ones if no alpha beats plain rounding) for W [N, K], inputs x [T, K].

    `magnitude`/`expand` tie channels together: the search runs over scales the size of `magnitude` and
    `expand` maps one to the K columns (o_proj: one scale per KV channel, repeated for its query heads)."""
    x = x[:: max(1, len(x) // MAX_TOKENS)][:MAX_TOKENS]  # the search's cost grows with rows: a spread sample
    magnitude = np.abs(x).mean(axis=0) if magnitude is None else magnitude
    magnitude = np.maximum(magnitude, 1e-6).astype(np.float64)
    expand = expand or (lambda scales: scales)
    best, best_error = np.ones(len(magnitude), np.float32), None
    for alpha in ALPHAS:
        scales = magnitude**alpha
        scales = (scales / np.sqrt(scales.max() * scales.min())).astype(np.float32)
        error = _output_error(x, weight, expand(scales), bits, block_size)
        if best_error is None or error < best_error:
            best, best_error = scales, error
    return best


def scale_layer(
    attn: dict, mlp: dict, input_norm: np.ndarray, post_norm: np.ndarray, inputs: dict[str, LayerInput],
    heads: int, kv_heads: int, bits: int, block_size: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Rescales one layer's weights in place (attn/mlp dicts) and its calibration `inputs`; returns the new
    (input_norm, post_norm) weights. The layer's float function is unchanged."""
    # q/k/v share the input norm: one scale for their concatenation.
    qkv = np.concatenate([attn["q"], attn["k"], attn["v"]])
    s = search_scales(inputs["qkv"].x, qkv, bits, block_size)
    for key in "qkv":
        attn[key] = attn[key] * s
    input_norm = input_norm / s
    inputs["qkv"] = LayerInput(inputs["qkv"].x / s)

    gate_up = np.concatenate([mlp["gate"], mlp["up"]])
    s = search_scales(inputs["gate_up"].x, gate_up, bits, block_size)
    mlp["gate"], mlp["up"] = mlp["gate"] * s, mlp["up"] * s
    post_norm = post_norm / s
    inputs["gate_up"] = LayerInput(inputs["gate_up"].x / s)

    s = search_scales(inputs["down"].x, mlp["down"], bits, block_size)
    mlp["down"] = mlp["down"] * s
    mlp["up"] = mlp["up"] / s[:, None]  # down's input is silu(gate) * up: linear in up's rows
    if mlp.get("up_bias") is not None:
        mlp["up_bias"] = mlp["up_bias"] / s
    inputs["down"] = LayerInput(inputs["down"].x / s)

    # o_proj's input channel (head h, dim d) is v's channel (h // group, d): one scale per KV channel.
    head_dim = attn["v"].shape[0] // kv_heads
    group = heads // kv_heads
    context = inputs["o"].x.reshape(len(inputs["o"].x), kv_heads, group, head_dim)
    shared = np.abs(context).mean(axis=(0, 2)).reshape(-1)  # [kv_heads * head_dim]

    def expand(s_kv: np.ndarray) -> np.ndarray:
        return np.repeat(s_kv.reshape(kv_heads, 1, head_dim), group, axis=1).reshape(-1)

    s_kv = search_scales(inputs["o"].x, attn["o"], bits, block_size, magnitude=shared, expand=expand)
    s_full = expand(s_kv)
    attn["o"] = attn["o"] * s_full
    attn["v"] = attn["v"] / s_kv[:, None]
    if attn.get("v_bias") is not None:
        attn["v_bias"] = attn["v_bias"] / s_kv
    inputs["o"] = LayerInput(inputs["o"].x / s_full)
    return input_norm, post_norm
