"""Activation statistics for activation-aware quantization, gathered one layer at a time.

A calibration text is run through the float model in numpy as the exporter streams the layers: for each
layer, the hidden states of the calibration tokens go through that layer's RMSNorm/attention/MLP using the
weights just read, and the mean squared input of every linear layer is recorded per input channel. The
quantizer then weights each weight's rounding error by how large its input channel's activations are
(`quantize_blockwise(..., importance=...)`), so clipping goes where it hurts the layer's output least.
Memory: one layer's weights plus [tokens, hidden] activations; no second copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..llama_config import LlamaConfig
from .rope import rope_tables

DEFAULT_TOKENS = 2048  # more tokens mostly help the lm_head's GPTQ (its Hessian is [hidden, hidden])


def default_calibration_text() -> str:
    return resources.files("smolexport").joinpath("data/calibration.txt").read_text()


def load_calibration_ids(tokenizer_json: Path, text_file: Path | None, max_tokens: int = DEFAULT_TOKENS) -> list[int]:
    from tokenizers import Tokenizer

    if text_file is None:
        text = default_calibration_text()
    else:
        try:
            text = Path(text_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the calibration text {text_file}: {exc}") from None
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids[:max_tokens]
    if len(ids) < 16:
        raise UsageError(f"the calibration text has {len(ids)} tokens; give at least a paragraph")
    return ids


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def _channel_power(x: np.ndarray) -> np.ndarray:
    return (x * x).mean(axis=0).astype(np.float32)


@dataclass
class LayerInput:
    """The calibration inputs of one linear layer (or of several sharing the input), x [tokens, in_features]."""

    x: np.ndarray

    @property
    def power(self) -> np.ndarray:
        """Mean squared input per channel [in_features] (the diagonal of the Hessian)."""
        return _channel_power(self.x)

    def hessian(self) -> np.ndarray:
        """X.T X / tokens [in, in] in float64: the output error of a weight error E is trace(E H E.T)."""
        x = self.x.astype(np.float64)
        return x.T @ x / len(x)


class Calibration:
    """Hidden states of the calibration tokens, advanced one decoder layer per `layer()` call."""

    def __init__(self, config: LlamaConfig, embed_weight: np.ndarray, ids: list[int]):
        self.c = config
        self.hidden = embed_weight[np.asarray(ids)].astype(np.float32)  # [T, hidden]
        cos, sin = rope_tables(config, len(ids))
        self.cos, self.sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]
        t = len(ids)
        self.causal = np.triu(np.full((t, t), -np.inf, dtype=np.float32), k=1)
        self.tokens = t

    def _rotate(self, x: np.ndarray) -> np.ndarray:  # [T, heads, D]
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], axis=-1)

    def layer(self, attn: dict, mlp: dict, input_norm: np.ndarray, post_norm: np.ndarray) -> dict[str, LayerInput]:
        """Advances the hidden states through one layer; returns the inputs of its linear layers by role:
        "qkv", "o", "gate_up", "down"."""
        c = self.c
        heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def linear(x, w, b):
            y = x @ w.T
            return y if b is None else y + b

        x = _rms_norm(self.hidden, input_norm, c.rms_norm_eps)
        inputs = {"qkv": LayerInput(x)}
        q = self._rotate(linear(x, attn["q"], attn.get("q_bias")).reshape(self.tokens, heads, d))
        k = self._rotate(linear(x, attn["k"], attn.get("k_bias")).reshape(self.tokens, kv, d))
        v = linear(x, attn["v"], attn.get("v_bias")).reshape(self.tokens, kv, d)
        group = heads // kv
        context = np.empty((self.tokens, heads, d), np.float32)
        for h in range(heads):
            scores = q[:, h] @ k[:, h // group].T / np.sqrt(d) + self.causal
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            context[:, h] = (scores / scores.sum(axis=-1, keepdims=True)) @ v[:, h // group]
        context = context.reshape(self.tokens, heads * d)
        inputs["o"] = LayerInput(context)
        self.hidden = self.hidden + linear(context, attn["o"], attn.get("o_bias"))

        x = _rms_norm(self.hidden, post_norm, c.rms_norm_eps)
        inputs["gate_up"] = LayerInput(x)
        gate = linear(x, mlp["gate"], mlp.get("gate_bias"))
        act = gate / (1.0 + np.exp(-gate)) * linear(x, mlp["up"], mlp.get("up_bias"))
        inputs["down"] = LayerInput(act)
        self.hidden = self.hidden + linear(act, mlp["down"], mlp.get("down_bias"))
        return inputs

    def final(self, norm_weight: np.ndarray) -> LayerInput:
        """The lm_head's inputs: the last layer's hidden states through the final RMSNorm."""
        return LayerInput(_rms_norm(self.hidden, norm_weight, self.c.rms_norm_eps))
