"""Rotary-embedding tables, computed the way transformers computes them (float32 throughout)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import SmolexportError
from ..llama_config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [head_dim/2] float32, attention_scaling) for the config's rope type."""
    dim = config.head_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(
        np.float32
    )
    params = config.rope_parameters
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return (inv_freq / np.float32(params["factor"])).astype(np.float32), 1.0
    if rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_context = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    raise SmolexportError(f"unsupported rope_type {rope_type!r}: supported are default, linear and llama3")


def rope_tables(config: LlamaConfig, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [context_length, head_dim/2] for positions 0..context_length-1."""
    inv_freq, scaling = inverse_frequencies(config)
    angles = np.arange(context_length, dtype=np.float32)[:, None] * inv_freq[None, :]
    return (np.cos(angles) * scaling).astype(np.float32), (np.sin(angles) * scaling).astype(np.float32)
