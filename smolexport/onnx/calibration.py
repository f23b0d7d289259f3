"""Activation statistics for activation-aware quantization, gathered one layer at a time.

A calibration text is run through the float model (in torch) as the exporter streams the layers: for each
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
import torch

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
    _hessian: np.ndarray | None = None

    @property
    def power(self) -> np.ndarray:
        """Mean squared input per channel [in_features] (the diagonal of the Hessian)."""
        return _channel_power(self.x)

    def hessian(self) -> np.ndarray:
        """X.T X / tokens [in, in] in float64: the output error of a weight error E is trace(E H E.T). Computed
        once: the matrices that share an input (q/k/v, gate/up) share it."""
        if self._hessian is None:
            x = self.x.astype(np.float64)
            self._hessian = x.T @ x / len(x)
        return self._hessian


class Calibration:
    """Hidden states of the calibration tokens, advanced one decoder layer per `layer()` call.

    In torch: the linear layers' products in bfloat16 with float32 accumulation (several times float32's
    speed on CPUs with bf16 dot products: 2,048 tokens through the 1.7B model are ~7 TFLOP), everything else
    (norms, rotary, attention, the residual stream) in float32. The statistics taken from these activations
    (channel powers, Hessians, the awq search's inputs) do not need more precision than that; `exact=True`
    computes the products in float32 (tests of exact identities)."""

    def __init__(self, config: LlamaConfig, embed_weight: np.ndarray, ids: list[int], exact: bool = False):
        self.c = config
        self.product_dtype = torch.float32 if exact else torch.bfloat16
        self.hidden = embed_weight[np.asarray(ids)].astype(np.float32)  # [T, hidden]
        cos, sin = rope_tables(config, len(ids))
        self.cos, self.sin = torch.from_numpy(cos[:, None, :]), torch.from_numpy(sin[:, None, :])  # [T, 1, D/2]
        self.tokens = len(ids)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:  # [T, heads, D]
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], dim=-1)

    def layer(self, attn: dict, mlp: dict, input_norm: np.ndarray, post_norm: np.ndarray) -> dict[str, LayerInput]:
        """Advances the hidden states through one layer; returns the inputs of its linear layers by role:
        "qkv", "o", "gate_up", "down"."""
        c = self.c
        heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def linear(x: torch.Tensor, w: np.ndarray, b: np.ndarray | None) -> torch.Tensor:
            y = (x.to(self.product_dtype) @ torch.from_numpy(w).to(self.product_dtype).T).float()
            return y if b is None else y + torch.from_numpy(b)

        hidden = torch.from_numpy(self.hidden)
        x = torch.from_numpy(_rms_norm(self.hidden, input_norm, c.rms_norm_eps))
        inputs = {"qkv": LayerInput(x.numpy())}
        q = self._rotate(linear(x, attn["q"], attn.get("q_bias")).reshape(self.tokens, heads, d))
        k = self._rotate(linear(x, attn["k"], attn.get("k_bias")).reshape(self.tokens, kv, d))
        v = linear(x, attn["v"], attn.get("v_bias")).reshape(self.tokens, kv, d)
        group = heads // kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # grouped-query attention
        qkv = [t.transpose(0, 1) for t in (q, k, v)]  # [heads, T, D]
        context = torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True)
        context = context.transpose(0, 1).reshape(self.tokens, heads * d).contiguous()
        inputs["o"] = LayerInput(context.numpy())
        hidden = hidden + linear(context, attn["o"], attn.get("o_bias"))

        x = torch.from_numpy(_rms_norm(hidden.numpy(), post_norm, c.rms_norm_eps))
        inputs["gate_up"] = LayerInput(x.numpy())
        act = torch.nn.functional.silu(linear(x, mlp["gate"], mlp.get("gate_bias"))) * linear(
            x, mlp["up"], mlp.get("up_bias")
        )
        inputs["down"] = LayerInput(act.numpy())
        self.hidden = (hidden + linear(act, mlp["down"], mlp.get("down_bias"))).numpy()
        return inputs

    def final(self, norm_weight: np.ndarray) -> LayerInput:
        """The lm_head's inputs: the last layer's hidden states through the final RMSNorm."""
        return LayerInput(_rms_norm(self.hidden, norm_weight, self.c.rms_norm_eps))
