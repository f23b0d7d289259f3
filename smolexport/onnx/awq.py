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
search never makes a layer worse on its calibration inputs). The error is that of the matrices as they will be
stored and multiplied (`Storage`): each part at its own bit width and block size (mixed precision), and, at
MatMulNBits accuracy_level 4, with the input rounded to int8 the way ONNX Runtime's CPU kernels do it. Scaling
a channel's input down also shrinks the activation outliers that set each int8 block's step, so at 8 bits,
where the weights' own rounding is small, the search mostly trades weight error for activation error
(SmoothQuant's idea, with the same folding). The calibration inputs handed to the quantizer
afterwards are divided by s too, so the clipping search (act-mse) and GPTQ see the scaled problem.
Memory: one layer's weights and calibration activations at a time, like the rest of the export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .calibration import LayerInput

ALPHAS = np.linspace(0.0, 1.0, 21)
# The alpha search is coarse-to-fine: every COARSE_STRIDE-th alpha, then +-2 and +-1 steps around the best
# (10 scored instead of 21). With the other searches of this export, the recommended int4 scored KL 0.082 on
# the dev set where the full grids had scored 0.083 (docs/quantization.md, "Choosing the default").
COARSE_STRIDE = 4
MAX_TOKENS = 512  # calibration rows used to score a candidate, evenly spaced over the calibration text
# Output rows of each matrix used to score a candidate, evenly spaced: the error is a sum over rows that a
# candidate scaling changes alike, so a thousand rows rank the candidates as all of them would, at a fraction of
# the cost on wide matrices (the 1.7B model's gate/up: 16,384 rows).
MAX_ROWS = 1024


@dataclass(frozen=True)
class Storage:
    """How one matrix will be stored and multiplied."""

    bits: int
    block_size: int
    # MatMulNBits accuracy_level 4 on CPU: the input is rounded to int8 per block of the weight's block size
    # (symmetric, step = the block's max |x| / 127) before the integer dot products.
    int8_inputs: bool = False


def _int8_round_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    blocks = torch.nn.functional.pad(rows, (0, -k % block_size)).reshape(len(rows), -1, block_size)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    step = torch.where(step == 0, torch.ones_like(step), step)
    return (torch.round(blocks / step) * step).reshape(len(rows), -1)[:, :k].reshape(x.shape)


def int8_round_blocks(x: np.ndarray, block_size: int) -> np.ndarray:
    """x [..., K] as ONNX Runtime's int8-compute kernels see it: each row's blocks of `block_size` rounded to
    int8 with the step max|x| / 127 of that block."""
    rounded = _int8_round_blocks(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), block_size)
    return rounded.numpy().astype(x.dtype)


def _rtn_dequantized(weight: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """W [N, K] after round-to-nearest block quantization with fp16 scales, as `quantize_blockwise(weight,
    bits, block_size, np.float16)` followed by `dequantize_blockwise` computes it (without the packing)."""
    n, k = weight.shape
    blocks = torch.nn.functional.pad(weight, (0, -k % block_size)).reshape(n, -1, block_size)
    qmax = (1 << bits) - 1
    lo = blocks.amin(dim=2, keepdim=True).clamp(max=0.0)
    scales = ((blocks.amax(dim=2, keepdim=True).clamp(min=0.0) - lo) / qmax).half().float()
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    zero = torch.clamp(torch.round(-lo / safe), 0, qmax)
    q = torch.div(blocks, safe).round_().add_(zero).clamp_(0, qmax)
    return q.sub_(zero).mul_(scales).reshape(n, -1)[:, :k]


def _errors(x: torch.Tensor, parts: list[tuple[torch.Tensor, Storage]], scales: torch.Tensor) -> float:
    """sum over parts of || x W^T - q(x / s) Q(W s)^T ||^2 for a candidate column scaling s, where Q rounds the
    weight as stored and q is int8 rounding of the input where the kernel does it (else identity).

    The products run in bfloat16 (several times fp32's speed on CPUs with bf16 dot products), on differences
    only, so that bf16's rounding is relative to the error being measured, not to the layer's output:
    x W^T - q(x/s) Q^T = (x/s) (W s - Q)^T - (q(x/s) - x/s) Q^T, one product over the two stacked."""
    error = 0.0
    xs = x / scales
    for weight, storage in parts:
        scaled = weight * scales
        quantized = _rtn_dequantized(scaled, storage.bits, storage.block_size)
        if storage.int8_inputs:
            lhs = torch.cat([xs, _int8_round_blocks(xs, storage.block_size) - xs], dim=1)
            rhs = torch.cat([scaled - quantized, -quantized], dim=1)
        else:
            lhs, rhs = xs, scaled.sub_(quantized)
        error += float((lhs.to(torch.bfloat16) @ rhs.to(torch.bfloat16).T).float().square_().sum())
    return error


def _torch_parts(x: np.ndarray, parts: list[tuple[np.ndarray, Storage]], max_rows: int | None = None):
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    rows = (lambda w: w) if max_rows is None else (lambda w: w[:: -(-len(w) // max_rows)])
    return xt, [(torch.from_numpy(np.ascontiguousarray(rows(w), dtype=np.float32)), s) for w, s in parts]


def _output_error(x: np.ndarray, parts: list[tuple[np.ndarray, Storage]], scales: np.ndarray) -> float:
    """`_errors` for NumPy inputs (tests, benchmarks)."""
    xt, tparts = _torch_parts(x, parts)
    return _errors(xt, tparts, torch.from_numpy(np.asarray(scales, dtype=np.float32)))


def search_scales(x: np.ndarray, parts: list[tuple[np.ndarray, Storage]], magnitude=None, expand=None):
    """The per-input-channel scale (all ones if no alpha beats plain rounding) for the matrices `parts`
    [(W [N, K], storage)] that read the inputs x [T, K].

    `magnitude`/`expand` tie channels together: the search runs over scales the size of `magnitude` and
    `expand` maps one to the K columns (o_proj: one scale per KV channel, repeated for its query heads)."""
    x = x[:: max(1, len(x) // MAX_TOKENS)][:MAX_TOKENS]  # the search's cost grows with rows: a spread sample
    magnitude = np.abs(x).mean(axis=0) if magnitude is None else magnitude
    magnitude = np.maximum(magnitude, 1e-6).astype(np.float64)
    expand = expand or (lambda scales: scales)
    xt, tparts = _torch_parts(x, parts, MAX_ROWS)
    found: dict[int, tuple[float, np.ndarray]] = {}  # alpha index -> (error, scales)

    def score(i: int) -> None:
        if 0 <= i < len(ALPHAS) and i not in found:
            scales = magnitude ** ALPHAS[i]
            scales = (scales / np.sqrt(scales.max() * scales.min())).astype(np.float32)
            columns = torch.from_numpy(np.ascontiguousarray(expand(scales), dtype=np.float32))
            found[i] = (_errors(xt, tparts, columns), scales)

    def best() -> int:
        return min(found, key=lambda i: (found[i][0], i))

    for i in range(0, len(ALPHAS), COARSE_STRIDE):
        score(i)
    score(len(ALPHAS) - 1)
    step = COARSE_STRIDE // 2
    while step >= 1:
        center = best()
        score(center - step)
        score(center + step)
        step //= 2
    return found[best()][1]  # alpha 0 gives exact ones: "no scaling"


def scale_layer(
    attn: dict, mlp: dict, input_norm: np.ndarray, post_norm: np.ndarray, inputs: dict[str, LayerInput],
    heads: int, kv_heads: int, storage: Callable[[str], Storage],
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Rescales one layer's weights in place (attn/mlp dicts) and its calibration `inputs`; returns the new
    (input_norm, post_norm) weights. The layer's float function is unchanged. `storage(key)`: how the matrix
    attn[key] or mlp[key] ("q", ..., "down") will be stored."""

    def parts(weights: dict, *keys: str) -> list[tuple[np.ndarray, Storage]]:
        return [(weights[key], storage(key)) for key in keys]

    # q/k/v share the input norm: one scale for all three.
    s = search_scales(inputs["qkv"].x, parts(attn, "q", "k", "v"))
    for key in "qkv":
        attn[key] = attn[key] * s
    input_norm = input_norm / s
    inputs["qkv"] = LayerInput(inputs["qkv"].x / s)

    s = search_scales(inputs["gate_up"].x, parts(mlp, "gate", "up"))
    mlp["gate"], mlp["up"] = mlp["gate"] * s, mlp["up"] * s
    post_norm = post_norm / s
    inputs["gate_up"] = LayerInput(inputs["gate_up"].x / s)

    s = search_scales(inputs["down"].x, parts(mlp, "down"))
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

    s_kv = search_scales(inputs["o"].x, parts(attn, "o"), magnitude=shared, expand=expand)
    s_full = expand(s_kv)
    attn["o"] = attn["o"] * s_full
    attn["v"] = attn["v"] / s_kv[:, None]
    if attn.get("v_bias") is not None:
        attn["v_bias"] = attn["v_bias"] / s_kv
    inputs["o"] = LayerInput(inputs["o"].x / s_full)
    return input_norm, post_norm
