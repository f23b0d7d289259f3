"""The int8 KV cache (`--kv-cache int8`): the fixed scales GroupQueryAttention stores it with.

ONNX Runtime's GroupQueryAttention (CPU, 1.32) keeps the cache as int8 with one scale per KV head and channel
(`k_quant_type` = `v_quant_type` = PER_CHANNEL, scales [1, kv_heads, 1, head_dim]): it rounds each new key
and value to int8 with that scale as it writes them and dequantizes the past as it reads it. The scales are
graph constants, so the exporter sets them here from the largest value each channel takes on the calibration
text, after any awq rescaling of v_proj (the cache holds what the exported graph computes):
- keys are cached after RoPE, which rotates each channel pair (d, d + head_dim/2) by a position-dependent
  angle. A rotated value never exceeds the pair's norm sqrt(k_d**2 + k_(d+half)**2), so the largest norm over
  the calibration tokens bounds both channels at every position, also positions past the text's length;
- values are cached as projected: their largest absolute value per channel.
MARGIN leaves room for tokens that reach further than the calibration text's; beyond it a value saturates.
"""

from __future__ import annotations

import numpy as np

# Head room over the calibration text's largest values (a value past it saturates at +-127 steps). 1.25
# makes every cached value's step 25% coarser; saturating an outlier would cost more. Chosen a priori, not
# tuned on any evaluation text.
MARGIN = 1.25


def kv_cache_scales(x: np.ndarray, attn: dict, kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(k_scale, v_scale) [1, kv_heads, 1, head_dim] float32 for one layer. `x` [tokens, hidden]: the layer's
    normed calibration inputs of q/k/v; `attn`: its weights as exported ("k", "v", optional biases)."""

    def project(key: str) -> np.ndarray:
        y = x @ attn[key].T
        bias = attn.get(f"{key}_bias")
        y = y if bias is None else y + bias
        return y.reshape(len(x), kv_heads, -1)  # [tokens, kv_heads, head_dim]

    k, v = project("k"), project("v")
    half = k.shape[-1] // 2
    pair_norm = np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2)
    k_bound = np.concatenate([pair_norm, pair_norm], axis=-1).max(axis=0)
    v_bound = np.abs(v).max(axis=0)

    def scale(bound: np.ndarray) -> np.ndarray:
        # A channel that was always zero still needs a positive scale.
        return (np.maximum(bound, 1e-6) * MARGIN / 127).astype(np.float32)[None, :, None, :]

    return scale(k_bound), scale(v_bound)
