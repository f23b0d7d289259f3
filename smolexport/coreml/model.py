"""A conversion-friendly Llama in PyTorch for Core ML: one short file, static KV cache in registered buffers.

Inputs `input_ids` [1, S] and `causal_mask` [1, 1, S, P+S] (0 where allowed, -inf elsewhere); the number of
cached tokens P is read from the mask's shape, so one traced graph does prefill (S = prompt) and decode
(S = 1). The caches are buffers that coremltools turns into Core ML states (`ct.StateType`): each step writes
its keys/values at [P, P+S) in place and attends over [0, P+S). Output: logits of the last position.

Choices forced by Core ML (measured with coremltools 9 on SmolLM2):
- RMSNorm divides by max|x| first: the residual stream reaches ~2.5e4 and x**2 overflows fp16.
- Attention calls scaled_dot_product_attention without `scale=` (the default 1/sqrt(d) is Llama's), so
  coremltools emits the fused op instead of decomposing it.
- RoPE uses precomputed cos/sin tables (fp16 angles lose precision at long positions); they are buffers,
  which the weight quantizer leaves alone (it only touches linear/embedding weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..llama_config import LlamaConfig
from ..onnx.rope import rope_tables


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact rescaling: RMSNorm(x) == RMSNorm(x / m) for any m > 0 (up to eps), and x / max|x| cannot overflow.
        m = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)
        x = x / m
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps / (m * m)) * self.weight


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


class Layer(nn.Module):
    def __init__(self, c: LlamaConfig, w: dict[str, torch.Tensor]):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.input_norm = RMSNorm(w["input_norm"], c.rms_norm_eps)
        self.post_norm = RMSNorm(w["post_norm"], c.rms_norm_eps)
        self.q, self.k, self.v, self.o = (_linear(w[n], w.get(f"{n}_bias")) for n in "qkvo")
        self.gate, self.up, self.down = (_linear(w[n], w.get(f"{n}_bias")) for n in ("gate", "up", "down"))

    def forward(self, x, cos, sin, mask, key_cache, value_cache, index: int, past: int):
        b, s, _ = x.shape
        h = self.input_norm(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        key_cache[index : index + 1, :, past : past + s] = k
        value_cache[index : index + 1, :, past : past + s] = v
        keys = key_cache[index : index + 1, :, : past + s]
        values = value_cache[index : index + 1, :, : past + s]
        if self.heads != self.kv_heads:
            keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
            values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
        h = self.post_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CoreMLLlama(nn.Module):
    def __init__(self, config: LlamaConfig, get_weight, context_length: int, dtype=torch.float16):
        super().__init__()
        c = self.config = config

        def weight(name: str) -> torch.Tensor | None:
            array = get_weight(name)
            return None if array is None else torch.from_numpy(array).to(dtype)

        self.embed = nn.Embedding.from_pretrained(weight("model.embed_tokens.weight"), freeze=True)
        layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            w = {n: weight(f"{p}self_attn.{n}_proj.weight") for n in "qkvo"}
            w |= {f"{n}_bias": weight(f"{p}self_attn.{n}_proj.bias") for n in "qkvo"}
            w |= {n: weight(f"{p}mlp.{n}_proj.weight") for n in ("gate", "up", "down")}
            w |= {f"{n}_bias": weight(f"{p}mlp.{n}_proj.bias") for n in ("gate", "up", "down")}
            w["input_norm"] = weight(f"{p}input_layernorm.weight")
            w["post_norm"] = weight(f"{p}post_attention_layernorm.weight")
            w = {k: v for k, v in w.items() if v is not None}
            layers.append(Layer(c, w))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(weight("model.norm.weight"), c.rms_norm_eps)
        # Tied: the lm_head reuses the embedding's Parameter, so the weight is stored once.
        lm_head = self.embed.weight if c.tie_word_embeddings else weight("lm_head.weight")
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.lm_head.weight = lm_head if isinstance(lm_head, nn.Parameter) else nn.Parameter(lm_head, False)
        cos, sin = rope_tables(c, context_length)
        self.register_buffer("cos", torch.from_numpy(cos).to(dtype), persistent=False)
        self.register_buffer("sin", torch.from_numpy(sin).to(dtype), persistent=False)
        shape = (c.num_hidden_layers, c.num_key_value_heads, context_length, c.head_dim)
        # [layers, kv_heads, context, head_dim]; layer i's slice [i:i+1] is its [batch=1, kv, ctx, d] cache.
        self.register_buffer("key_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=dtype))
        self.all_logits = False

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        past = causal_mask.shape[-1] - s
        cos = self.cos[past : past + s]  # [S, D/2], broadcast over batch and heads
        sin = self.sin[past : past + s]
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, causal_mask, self.key_cache, self.value_cache, i, past)
        x = self.norm(x if self.all_logits else x[:, -1:])
        return self.lm_head(x)
