"""The Llama decoder as a stateful Core ML ML Program, built op by op with coremltools' MIL builder.

Why not trace a torch module and convert it: that path holds the weights three times (torch, the traced
graph's constants, the converter's copies) and peaked at 17.7 GB for the 1.7B shapes. Here each weight is read
from the checkpoint, quantized by our own code and handed to the program as a compressed constant, so the
process holds the compressed model plus one fp32 matrix at a time.

Program I/O (the contract `smolexport_runtime.coreml` and docs/swift rely on):
- `input_ids` int32 [1, S] and `causal_mask` fp16 [1, 1, S, P+S] (0 where allowed, -inf elsewhere). The
  number of cached tokens P is read from the mask's width, so one program does prefill (S = prompt) and decode.
- states `key_cache`, `value_cache` fp16 [layers, kv_heads, context, head_dim]: each layer writes its new
  keys/values at [P, P+S) in place and attends over [0, P+S).
- `logits` fp16 [1, 1, vocab] for the last position ([1, S, vocab] with all_logits).

Choices forced by Core ML's fp16 compute (measured on SmolLM2):
- RMSNorm divides by max|x| first: the residual stream reaches ~2.5e4 and x**2 overflows fp16.
- Attention is the fused `scaled_dot_product_attention` op (its default scale 1/sqrt(d) is Llama's).
- RoPE uses precomputed cos/sin tables (fp16 angles lose precision at long positions), left uncompressed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import SmolexportError
from ..llama_config import LlamaConfig
from ..onnx.rope import rope_tables
from ..progress import SILENT, Progress
from . import import_coremltools
from .weights import WeightCodec


@dataclass(frozen=True)
class ProgramOptions:
    context_length: int
    all_logits: bool = False


def _mil():
    ct = import_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol, types

    return ct, mb, types, get_new_symbol


def build_program(
    config: LlamaConfig,
    get_weight: Callable[[str], np.ndarray | None],
    codec: WeightCodec,
    options: ProgramOptions,
    progress: Progress = SILENT,
):
    """Returns a MIL Program `main(input_ids, causal_mask, key_cache, value_cache) -> logits`."""
    ct, mb, types, get_new_symbol = _mil()
    c = config
    cache_shape = (c.num_hidden_layers, c.num_key_value_heads, options.context_length, c.head_dim)
    new, total = get_new_symbol(), get_new_symbol()
    specs = [
        mb.TensorSpec(shape=(1, new), dtype=types.int32),
        mb.TensorSpec(shape=(1, 1, new, total), dtype=types.fp16),
        mb.StateTensorSpec(shape=cache_shape, dtype=types.fp16),
        mb.StateTensorSpec(shape=cache_shape, dtype=types.fp16),
    ]

    from ..onnx.decoder import _requiring

    get_weight = _requiring(get_weight)  # a missing tensor (other than biases) is a clear error, not a traceback

    def required(name: str) -> np.ndarray:
        array = get_weight(name)
        if array is None:  # _requiring lets lm_head.weight through: tied checkpoints have none
            raise SmolexportError(f"the checkpoint has no tensor {name!r}")
        return array

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def main(input_ids, causal_mask, key_cache, value_cache):
        b = _Builder(mb, c)
        s = mb.slice_by_index(x=mb.shape(x=input_ids), begin=[1], end=[2])  # [1] int32
        t = mb.slice_by_index(x=mb.shape(x=causal_mask), begin=[3], end=[4])
        past = mb.sub(x=t, y=s)
        cos, sin = rope_tables(c, options.context_length)
        half = c.head_dim // 2
        rope = [
            mb.slice_by_index(x=table.astype(np.float16), begin=mb.concat(values=[past, [0]], axis=0),
                              end=mb.concat(values=[t, [half]], axis=0))
            for table in (cos, sin)
        ]  # fmt: skip
        embed = codec.matrix("model.embed_tokens.weight", required("model.embed_tokens.weight"))
        x = mb.gather(x=embed, indices=input_ids, axis=0)  # [1, S, H]
        keys, values = mb.read_state(input=key_cache), mb.read_state(input=value_cache)
        for i in range(c.num_hidden_layers):
            progress.step(f"layer {i + 1}/{c.num_hidden_layers}")
            x, keys, values = b.layer(i, x, rope, causal_mask, (key_cache, keys), (value_cache, values), past, t,
                                      codec, get_weight)  # fmt: skip
        if not options.all_logits:
            x = mb.slice_by_index(x=x, begin=[0, -1, 0], end=[1, 0, 0], begin_mask=[True, False, True],
                                  end_mask=[True, True, True])  # fmt: skip
        x = b.rms_norm(x, required("model.norm.weight"))
        lm_head = embed if c.tie_word_embeddings else codec.matrix("lm_head.weight", required("lm_head.weight"))
        return mb.linear(x=x, weight=lm_head, name="logits")

    return main


class _Builder:
    """The ops of one decoder layer, in fp16."""

    def __init__(self, mb, config: LlamaConfig):
        self.mb, self.c = mb, config

    def rms_norm(self, x, weight: np.ndarray):
        mb = self.mb
        # Exact rescaling: RMSNorm(x) == RMSNorm(x / m) for m > 0 (eps scaled by 1/m^2), and x / max|x| cannot
        # overflow fp16 when squared.
        m = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True), y=np.float16(1e-3))
        x = mb.real_div(x=x, y=m)
        mean_square = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
        eps = mb.real_div(x=np.float16(self.c.rms_norm_eps), y=mb.mul(x=m, y=m))
        x = mb.mul(x=x, y=mb.rsqrt(x=mb.add(x=mean_square, y=eps)))
        return mb.mul(x=x, y=weight.astype(np.float16))

    def linear(self, x, codec: WeightCodec, get_weight, name: str):
        weight = codec.matrix(name + ".weight", get_weight(name + ".weight"))
        bias = get_weight(name + ".bias")
        if bias is None:
            return self.mb.linear(x=x, weight=weight)
        return self.mb.linear(x=x, weight=weight, bias=bias.astype(np.float16))

    def rotate(self, x, rope):
        mb, half = self.mb, self.c.head_dim // 2
        cos, sin = rope
        x1 = mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[0, 0, 0, half], end_mask=[True, True, True, False])
        x2 = mb.slice_by_index(x=x, begin=[0, 0, 0, half], end=[0, 0, 0, 0], end_mask=[True, True, True, True])
        first = mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin))
        second = mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin))
        return mb.concat(values=[first, second], axis=-1)

    def heads(self, x, n: int):  # [1, S, n*D] -> [1, n, S, D]
        mb = self.mb
        return mb.transpose(x=mb.reshape(x=x, shape=[1, -1, n, self.c.head_dim]), perm=[0, 2, 1, 3])

    def cache_write(self, state, cache, new, i: int, past, t):
        """Writes `new` [1, KV, S, D] at layer i, positions [past, t); returns (cache, this layer's [0, t))."""
        mb, c = self.mb, self.c
        begin = mb.concat(values=[[i, 0], past, [0]], axis=0)
        end = mb.concat(values=[[i + 1, c.num_key_value_heads], t, [c.head_dim]], axis=0)
        cache = mb.slice_update(x=cache, update=new, begin=begin, end=end)
        mb.coreml_update_state(state=state, value=cache)
        begin = [i, 0, 0, 0]
        window = mb.slice_by_index(x=cache, begin=begin, end=end, begin_mask=[False, False, True, False])
        groups = c.num_attention_heads // c.num_key_value_heads
        if groups > 1:  # repeat each KV head for its query heads (repeat_interleave)
            window = mb.reshape(x=window, shape=[1, c.num_key_value_heads, 1, -1, c.head_dim])
            window = mb.tile(x=window, reps=[1, 1, groups, 1, 1])
            window = mb.reshape(x=window, shape=[1, c.num_attention_heads, -1, c.head_dim])
        return cache, window

    def layer(self, i: int, x, rope, mask, key_state, value_state, past, t, codec: WeightCodec, get_weight):
        mb, c = self.mb, self.c
        p = f"model.layers.{i}."
        h = self.rms_norm(x, get_weight(p + "input_layernorm.weight"))
        q = self.rotate(self.heads(self.linear(h, codec, get_weight, p + "self_attn.q_proj"), c.num_attention_heads),
                        rope)  # fmt: skip
        k = self.rotate(self.heads(self.linear(h, codec, get_weight, p + "self_attn.k_proj"), c.num_key_value_heads),
                        rope)  # fmt: skip
        v = self.heads(self.linear(h, codec, get_weight, p + "self_attn.v_proj"), c.num_key_value_heads)
        keys, key_window = self.cache_write(key_state[0], key_state[1], k, i, past, t)
        values, value_window = self.cache_write(value_state[0], value_state[1], v, i, past, t)
        attn = mb.scaled_dot_product_attention(query=q, key=key_window, value=value_window, attn_mask=mask)
        attn = mb.reshape(x=mb.transpose(x=attn, perm=[0, 2, 1, 3]), shape=[1, -1, c.num_attention_heads * c.head_dim])
        x = mb.add(x=x, y=self.linear(attn, codec, get_weight, p + "self_attn.o_proj"))
        h = self.rms_norm(x, get_weight(p + "post_attention_layernorm.weight"))
        gate = mb.silu(x=self.linear(h, codec, get_weight, p + "mlp.gate_proj"))
        up = self.linear(h, codec, get_weight, p + "mlp.up_proj")
        x = mb.add(x=x, y=self.linear(mb.mul(x=gate, y=up), codec, get_weight, p + "mlp.down_proj"))
        return x, keys, values
