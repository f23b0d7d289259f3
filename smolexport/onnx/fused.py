"""The fused layer variant: ONNX Runtime contrib ops that replace dozens of small nodes per layer.

- `GroupQueryAttention` (com.microsoft) does RoPE, the KV-cache append, causal attention and GQA in one node,
  reading the packed QKV projection. It derives each sequence's length from `attention_mask`
  (seqlens_k = real tokens - 1), so rows of a batch must not be padded: the runtime generates one sequence
  at a time. The standard-ops graph (`--standard-ops`) handles left-padded batches.
- `SkipSimplifiedLayerNormalization` fuses each residual add with the following RMSNorm.
- q/k/v and gate/up projections are packed into one matrix each: one MatMulNBits instead of three or two
  (unless mixed precision gives the parts different bit widths: then one each, concatenated).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graph import FLOAT_TYPES, MS_DOMAIN


class FusedLayers:
    def __init__(self, builder, cos_table: np.ndarray, sin_table: np.ndarray):
        self.b, self.g, self.c = builder, builder.g, builder.c
        g = self.g
        total = g.node("Gather", [g.node("Shape", ["attention_mask"], "gqa/mask_shape"), g.const(1)], "gqa/total")
        self.total_length = g.node("Cast", [total], "gqa/total_i32", to=TensorProto.INT32)
        lengths = g.node("ReduceSum", ["attention_mask", g.const([1])], "gqa/lengths", keepdims=0)
        lengths = g.node("Sub", [lengths, g.const(1)], "gqa/lengths_minus_1")
        self.seqlens_k = g.node("Cast", [lengths], "gqa/seqlens_k", to=TensorProto.INT32)
        # GroupQueryAttention computes in its cache's float type: with an fp16 cache under fp32 activations
        # (--kv-cache fp16), the packed q/k/v goes in and the context comes out through a Cast. An int8 cache
        # (kv_cache.py) is dequantized inside it: it computes in the activations' type.
        self.int8_cache = builder.o.cache_dtype == "int8"
        self.cache_type = FLOAT_TYPES[builder.o.activation_dtype if self.int8_cache else builder.o.cache_dtype]
        self.cos = g.initializer("rope.cos", cos_table.astype(self.cache_type[0]))
        self.sin = g.initializer("rope.sin", sin_table.astype(self.cache_type[0]))

    def add_and_norm(self, pending: str | None, residual: str, weight: np.ndarray, name: str) -> tuple[str, str]:
        """(RMSNorm(pending + residual), pending + residual); without `pending`, just RMSNorm(residual)."""
        g, eps = self.g, self.c.rms_norm_eps
        if pending is None:  # once per model: standard ops (SimplifiedLayerNormalization is not in the ONNX spec)
            return self.b.rms_norm(residual, weight, name), residual
        gamma = g.initializer(f"{name}.weight", weight.astype(self.b.np_dtype))
        normed, _, _, summed = g.node(
            "SkipSimplifiedLayerNormalization", [pending, residual, gamma], name, n_outputs=4, domain=MS_DOMAIN,
            epsilon=eps,
        )  # fmt: skip
        return normed, summed

    def attention(self, i: int, x: str, w: dict, power: dict) -> str:
        from .decoder import kv_names

        b, g, c, name = self.b, self.g, self.c, f"layers.{i}.attn"
        parts = [(f"{name}.{k}_proj", w[k], w.get(f"{k}_bias")) for k in "qkv"]
        qkv = b.packed_linear(x, f"{name}.qkv_proj", parts, power.get("qkv"))
        converts = self.cache_type[1] != b.onnx_dtype
        if converts:
            qkv = g.node("Cast", [qkv], f"{name}/qkv_to_cache_type", to=self.cache_type[1])
        io = kv_names(i)
        inputs = [qkv, "", "", io["past_key"], io["past_value"], self.seqlens_k, self.total_length, self.cos, self.sin]
        quantized = {}
        if self.int8_cache:  # inputs 9-11 (position_ids, attention_bias, head_sink) unused, then the scales
            k_scale, v_scale = power["kv_scales"]
            inputs += ["", "", "", g.initializer(f"{name}.k_scale", k_scale), g.initializer(f"{name}.v_scale", v_scale)]
            quantized = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
        g.node_to(
            "GroupQueryAttention", inputs, [f"{name}/context", io["present_key"], io["present_value"]],
            domain=MS_DOMAIN, num_heads=c.num_attention_heads, kv_num_heads=c.num_key_value_heads,
            scale=float(1.0 / np.sqrt(c.head_dim)), do_rotary=1, rotary_interleaved=0, **quantized,
        )  # fmt: skip
        context = f"{name}/context"
        if converts:
            context = g.node("Cast", [context], f"{name}/context_to_float", to=b.onnx_dtype)
        return b.linear(context, f"{name}.o_proj", w["o"], w.get("o_bias"), b.o.weight_bits, power.get("o"))

    def mlp(self, i: int, x: str, w: dict, power: dict) -> str:
        b, g, name = self.b, self.g, f"layers.{i}.mlp"
        f = w["gate"].shape[0]
        parts = [(f"{name}.{k}_proj", w[k], w.get(f"{k}_bias")) for k in ("gate", "up")]
        gate_up = b.packed_linear(x, f"{name}.gate_up_proj", parts, power.get("gate_up"))
        gate, up = g.node("Split", [gate_up, g.const([f, f])], f"{name}/split", n_outputs=2, axis=-1)
        act = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{name}/sigmoid")], f"{name}/silu")
        gated = g.node("Mul", [act, up], f"{name}/gated")
        return b.linear(gated, f"{name}.down_proj", w["down"], w.get("down_bias"), b.o.weight_bits, power.get("down"))
