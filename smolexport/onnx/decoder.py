"""Builds the Llama decoder as one ONNX graph that serves both prefill and decode.

Inputs:  input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
         past_key_values.{i}.key|value [B, kv_heads, P, head_dim]
Outputs: logits [B, S, vocab] float32, present.{i}.key|value [B, kv_heads, P+S, head_dim]

Only standard ONNX ops plus ONNX Runtime's MatMulNBits for quantized weights (the embedding lookup
dequantizes its rows with standard ops, vocab.py). Layers are built one at a time: read the layer's weights,
convert/quantize them, write them to the external-data file, drop them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..errors import SmolexportError
from ..llama_config import LlamaConfig
from .calibration import Calibration, LayerInput
from .gptq import gptq_quantize
from .graph import CACHE_TYPES, FLOAT_TYPES, MS_DOMAIN, GraphBuilder
from .mixed import int8_block_size, is_ffn, wants_int8
from .quantize import LOG8_TABLE, BlockQuantized, quantize_blockwise
from .rope import rope_tables
from .vocab import VocabMatrix


@dataclass(frozen=True)
class DecoderOptions:
    """How weights and activations are stored. `weight_bits` None means float weights."""

    activation_dtype: str = "fp32"  # fp32 | fp16
    weight_bits: int | None = None  # None | 4 | 8
    lm_head_bits: int | None = None  # bits for the (tied) embedding / lm_head; None = same as weight_bits
    block_size: int = 32
    # Block size of the feed-forward matrices (gate/up/down) where they keep the export's bit width; None = as
    # block_size. Wider blocks there cut the bytes a token reads (ONNX Runtime's int4 CPU kernel keeps an fp32
    # scale and an fp32 block sum per block: ~6 bits per weight at 32, 4.5 at 128) where most weights are.
    ffn_block_size: int | None = None
    context_length: int = 2048
    fused: bool = True  # ONNX Runtime's fused contrib ops (fused.py) instead of standard ops only
    accuracy_level: int = 0  # MatMulNBits compute type: 0 = as activations, 4 = int8 (faster, less exact)
    algo: str = "rtn"  # quantization algorithm: rtn | mse | act-mse (quantize.py) | awq (awq.py) | gptq (gptq.py)
    int8_layers: tuple[str, ...] = ()  # in int4 exports, matrices kept at 8 bits (patterns, see mixed.py)
    log8_scales: bool = False  # block scales as 8-bit log codes + one fp32 scale per row (quantize.py)
    int8_vocab: int = 0  # in int4 exports, embedding/lm_head rows of token ids below this at 8 bits (vocab.py)
    kv_dtype: str | None = None  # KV cache type: fp32 | fp16 | int8; None = the activation type (fused.py, kv_cache.py)

    @property
    def cache_dtype(self) -> str:
        return self.kv_dtype or self.activation_dtype

    @property
    def calibrated(self) -> bool:
        """Whether the weights' quantization uses the calibration text."""
        return self.weight_bits is not None and self.algo in ("act-mse", "gptq", "awq", "awq-gptq")

    @property
    def needs_calibration(self) -> bool:
        """Whether the export runs the calibration text: for the weights, or for the int8 cache's scales."""
        return self.calibrated or self.cache_dtype == "int8"

    def describe(self) -> str:
        """One line a person reads in the manifest and validate's report, e.g. 'int4 awq, blocks of 32, log8
        scales; 8-bit: *.v_proj, layers.0.*, layers.-1.*, vocabulary rows < 16384; accuracy level 4'."""
        if self.weight_bits is None:
            return f"{self.activation_dtype} weights"
        ffn = f" (FFN {self.ffn_block_size})" if self.ffn_block_size not in (None, self.block_size) else ""
        parts = [f"int{self.weight_bits} {self.algo}, blocks of {self.block_size}{ffn}, "
                 f"{'log8' if self.log8_scales else 'fp16'} scales"]  # fmt: skip
        wider = [*self.int8_layers, *([f"vocabulary rows < {self.int8_vocab}"] if self.int8_vocab else [])]
        if self.lm_head_bits and self.lm_head_bits != self.weight_bits:
            wider.append(f"embedding/lm_head at {self.lm_head_bits} bits")
        if wider:
            parts.append("8-bit: " + ", ".join(wider))
        parts.append(f"accuracy level {self.accuracy_level}")
        return "; ".join(parts)


def kv_names(i: int) -> dict[str, str]:
    return {
        "past_key": f"past_key_values.{i}.key",
        "past_value": f"past_key_values.{i}.value",
        "present_key": f"present.{i}.key",
        "present_value": f"present.{i}.value",
    }


class DecoderBuilder:
    def __init__(self, g: GraphBuilder, config: LlamaConfig, options: DecoderOptions):
        self.g, self.c, self.o = g, config, options
        self.np_dtype, self.onnx_dtype = FLOAT_TYPES[options.activation_dtype]
        self.lm_head_bits = options.lm_head_bits or options.weight_bits
        self.int8_matrices: dict[str, int] = {}  # graph name -> block size, of matrices raised to 8 bits
        self._scale_inputs: dict[str, str] = {}  # matrix name -> its decoded scales tensor (scales_input)

    def _wants_int8(self, name: str) -> bool:
        return wants_int8(self.o.int8_layers, name, self.c.num_hidden_layers)

    def _stored_as(self, name: str, bits: int | None, k: int, int8: bool | None = None) -> tuple[int | None, int]:
        """(bits, block size) of a matrix with k inputs: 8 bits in wide blocks where --int8-layers says so, or
        where `int8` says so when the caller has decided (packed_linear's groups); else the export's bits, in
        blocks of `ffn_block_size` for the feed-forward matrices when it is set."""
        if bits == 4 and (self._wants_int8(name) if int8 is None else int8):
            return 8, int8_block_size(k)
        if self.o.ffn_block_size and is_ffn(name):
            return bits, self.o.ffn_block_size
        return bits, self.o.block_size

    def _bits(self, name: str, bits: int | None, k: int, int8: bool | None = None) -> tuple[int | None, int]:
        """`_stored_as`, recording the matrices raised to 8 bits (for the manifest)."""
        bits_stored, block_size = self._stored_as(name, bits, k, int8)
        if bits_stored != bits:
            self.int8_matrices[name] = block_size
        return bits_stored, block_size

    # --- weights ---------------------------------------------------------------------------------
    def linear(
        self,
        x: str,
        name: str,
        weight: np.ndarray,
        bias: np.ndarray | None,
        bits: int | None,
        calib: LayerInput | None = None,
        int8: bool | None = None,
    ) -> str:
        """y = x @ weight.T (+ bias), weight [out, in] as stored in the checkpoint. `calib`: the layer's
        calibration inputs, for algos act-mse and gptq."""
        n, k = weight.shape
        bits, block_size = self._bits(name, bits, k, int8)
        if bits is None:
            w = self.g.initializer(f"{name}.weight", weight.T.astype(self.np_dtype))
            y = self.g.node("MatMul", [x, w], name)
        else:
            inputs = self._quantized(name, weight, bits, block_size, calib)
            y = self.g.node(
                "MatMulNBits",
                [x, *inputs],
                name,
                domain=MS_DOMAIN,
                K=k,
                N=n,
                bits=bits,
                block_size=block_size,
                accuracy_level=self.o.accuracy_level,
            )
        if bias is not None:
            y = self.g.node("Add", [y, self.g.initializer(f"{name}.bias", bias.astype(self.np_dtype))], f"{name}/bias")
        return y

    def packed_linear(self, x: str, name: str, parts: list, calib: LayerInput | None = None) -> str:
        """Several linear layers on the same input, [(name, weight, bias)], as one matrix `name` whose output
        is their outputs concatenated. When mixed precision gives them different bit widths (a MatMulNBits
        node has one), each run of neighbours with the same width stays one matrix (v_proj at 8 bits: q+k and
        v, two nodes instead of three; every node costs time per decoded token), and their outputs are
        concatenated."""
        bits = self.o.weight_bits
        wide = [self._wants_int8(part[0]) for part in parts]
        if bits != 4 or len(set(wide)) == 1:
            return self._packed(x, name, parts, bits, calib)
        outputs, start = [], 0
        for end in range(1, len(parts) + 1):
            if end == len(parts) or wide[end] != wide[start]:
                group = parts[start:end]
                group_name = group[0][0] if len(group) == 1 else f"{name}.{start}-{end - 1}"
                outputs.append(self._packed(x, group_name, group, bits, calib, int8=wide[start]))
                start = end
        return self.g.node("Concat", outputs, f"{name}/concat", axis=-1)

    def _packed(self, x: str, name: str, parts: list, bits, calib, int8: bool | None = None) -> str:
        if len(parts) == 1:
            part, weight, bias = parts[0]
            return self.linear(x, part, weight, bias, bits, calib, int8)
        biases = [bias for _, _, bias in parts]
        bias = None if biases[0] is None else np.concatenate(biases)
        return self.linear(x, name, np.concatenate([w for _, w, _ in parts]), bias, bits, calib, int8)

    def awq_scale(self, i: int, attn: dict, mlp: dict, input_norm, post_norm, inputs: dict):
        """Folds activation-aware channel scales into layer i's float weights (see awq.py), searched for the
        matrices as they will be stored: bits and block size per matrix, int8 inputs at accuracy level 4."""
        from .awq import Storage, scale_layer

        def storage(key: str) -> Storage:
            weights, group = (attn, "attn") if key in "qkvo" else (mlp, "mlp")
            bits, block_size = self._stored_as(f"layers.{i}.{group}.{key}_proj", self.o.weight_bits,
                                               weights[key].shape[1])  # fmt: skip
            return Storage(bits, block_size, int8_inputs=self.o.accuracy_level == 4)

        c = self.c
        return scale_layer(attn, mlp, input_norm, post_norm, inputs, c.num_attention_heads, c.num_key_value_heads,
                           storage)  # fmt: skip

    def _quantized(self, name: str, weight: np.ndarray, bits: int, block_size: int, calib=None) -> list[str]:
        qw = self.quantize(name, weight, bits, block_size, calib)
        return [
            self.g.initializer(f"{name}.qweight", qw.data),
            self.scales(name, qw),
            self.g.initializer(f"{name}.zero_points", qw.zero_points),
        ]

    def scales(self, name: str, qw: BlockQuantized) -> str:
        """Stores a matrix's block scales and returns them as MatMulNBits reads them (see `scales_input`)."""
        self.write_scales(name, qw)
        return self.scales_input(name)

    def write_scales(self, name: str, qw: BlockQuantized) -> None:
        if self.o.log8_scales:
            self.g.initializer(f"{name}.scale_codes", qw.scale_codes)
            self.g.initializer(f"{name}.row_scales", qw.row_scales)
        else:
            self.g.initializer(f"{name}.scales", qw.scales.astype(np.float16))

    def scales_input(self, name: str) -> str:
        """The scales as MatMulNBits reads them, from initializers that `write_scales` adds (before or after:
        initializers are not ordered). Block scales are stored in fp16 (1 byte per 16 weights less than fp32
        at block 32: 7% of an int4 model), or as log8 codes decoded by a table lookup and a multiplication by
        the row scale, rounded to fp16 as the quantizer did. MatMulNBits wants them in the activation type:
        for fp32 graphs a Cast. ONNX Runtime folds all of this into a constant at load, before it prepacks
        the weights, so it costs nothing per token."""
        if name in self._scale_inputs:  # one decode per matrix, however many nodes read it (vocab.py: two)
            return self._scale_inputs[name]
        g, scales = self.g, f"{name}.scales"
        if self.o.log8_scales:
            table = g.const(LOG8_TABLE, np.float32)
            codes = g.node("Cast", [f"{name}.scale_codes"], f"{name}.scales/codes", to=TensorProto.INT32)
            scales = g.node("Gather", [table, codes], f"{name}.scales/decode")
            scales = g.node("Mul", [scales, f"{name}.row_scales"], f"{name}.scales/rows")
            scales = g.node("Cast", [scales], f"{name}.scales/to_fp16", to=TensorProto.FLOAT16)
        if self.np_dtype != np.float16:
            scales = g.node("Cast", [scales], f"{name}.scales/to_float", to=self.onnx_dtype)
        self._scale_inputs[name] = scales
        return scales

    def quantize(self, name: str, weight: np.ndarray, bits: int, block_size: int, calib: LayerInput | None = None):
        """Block-quantizes one matrix by the export's algo; without calibration inputs, act-mse/awq/gptq fall
        back to mse. The lm_head (tied or not) is always quantized by GPTQ when calibrated, on its inputs (the
        final-normed hidden states): on the dev set that cut the int4 lm_head's KL to about half of the
        activation-weighted clipping search's (benchmarks/sensitivity.py --dev, docs/quantization.md)."""
        if calib is not None and (self.o.algo in ("gptq", "awq-gptq") or name in ("embed_tokens", "lm_head")):
            return gptq_quantize(weight, calib.hessian(), bits, block_size, np.float16, self.o.log8_scales)
        algo = "rtn" if self.o.algo == "rtn" else "mse"  # act-mse is mse weighted by calibration activations
        # awq: the act-mse search on weights already rescaled by awq.scale_layer
        importance = calib.power if self.o.algo in ("act-mse", "awq") and calib is not None else None
        # fp16 scales: quantization rounds with exactly the scale the kernel will use (see `scales`)
        return quantize_blockwise(
            weight, bits, block_size, np.float16, algo=algo, importance=importance, log8_scales=self.o.log8_scales
        )

    # --- building blocks -------------------------------------------------------------------------
    def rms_norm(self, x: str, weight: np.ndarray, name: str) -> str:
        """RMSNorm computed in fp32 whatever the activation type: x**2 overflows fp16 on real residuals."""
        g = self.g
        if self.o.activation_dtype != "fp32":
            x = g.node("Cast", [x], f"{name}/cast_in", to=TensorProto.FLOAT)
        mean_sq = g.node("ReduceMean", [g.node("Mul", [x, x], f"{name}/sq")], f"{name}/mean", axes=[-1], keepdims=1)
        eps = g.const(self.c.rms_norm_eps, np.float32)
        inv = g.node(
            "Reciprocal",
            [g.node("Sqrt", [g.node("Add", [mean_sq, eps], f"{name}/eps")], f"{name}/sqrt")],
            f"{name}/inv",
        )
        y = g.node("Mul", [x, inv], f"{name}/norm")
        y = g.node("Mul", [y, g.initializer(f"{name}.weight", weight.astype(np.float32))], f"{name}/scale")
        if self.o.activation_dtype != "fp32":
            y = g.node("Cast", [y], f"{name}/cast_out", to=self.onnx_dtype)
        return y

    def rotary(self, x: str, cos: str, sin: str, name: str) -> str:
        """HF's rotate-half RoPE: [x1, x2] -> [x1*cos - x2*sin, x2*cos + x1*sin] on the last axis."""
        g, half = self.g, self.c.head_dim // 2
        x1 = g.node("Slice", [x, g.const([0]), g.const([half]), g.const([-1])], f"{name}/x1")
        x2 = g.node("Slice", [x, g.const([half]), g.const([2 * half]), g.const([-1])], f"{name}/x2")
        a = g.node(
            "Sub", [g.node("Mul", [x1, cos], f"{name}/x1c"), g.node("Mul", [x2, sin], f"{name}/x2s")], f"{name}/a"
        )
        b = g.node(
            "Add", [g.node("Mul", [x2, cos], f"{name}/x2c"), g.node("Mul", [x1, sin], f"{name}/x1s")], f"{name}/b"
        )
        return g.node("Concat", [a, b], f"{name}/rot", axis=-1)

    def attention(self, i: int, x: str, w: dict, cos: str, sin: str, mask_bias: str, power: dict) -> str:
        g, c, name = self.g, self.c, f"layers.{i}.attn"
        heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        rep = heads // kv
        bits = self.o.weight_bits

        def heads_first(t: str, n_heads: int, tag: str) -> str:  # [B, S, n*D] -> [B, n, S, D]
            t = g.node("Reshape", [t, g.const([0, 0, n_heads, d])], f"{name}/{tag}_split")
            return g.node("Transpose", [t], f"{name}/{tag}_bnsd", perm=[0, 2, 1, 3])

        qkv_power = power.get("qkv")
        q = heads_first(self.linear(x, f"{name}.q_proj", w["q"], w.get("q_bias"), bits, qkv_power), heads, "q")
        k = heads_first(self.linear(x, f"{name}.k_proj", w["k"], w.get("k_bias"), bits, qkv_power), kv, "k")
        v = heads_first(self.linear(x, f"{name}.v_proj", w["v"], w.get("v_bias"), bits, qkv_power), kv, "v")
        q = self.rotary(q, cos, sin, f"{name}/q_rope")
        k = self.rotary(k, cos, sin, f"{name}/k_rope")

        io = kv_names(i)
        g.node_to("Concat", [io["past_key"], k], [io["present_key"]], axis=2)
        g.node_to("Concat", [io["past_value"], v], [io["present_value"]], axis=2)

        # Grouped-query attention without repeating the cache: the `rep` query heads that share a KV head get
        # their own axis, [B, H, S, D] -> [B, KV, rep, S, D], and MatMul broadcasts K/V [B, KV, 1, ...] over it.
        scale = g.const(1.0 / np.sqrt(d), self.np_dtype)
        q = g.node("Mul", [q, scale], f"{name}/q_scaled")
        q = g.node("Reshape", [q, g.const([0, kv, rep, -1, d])], f"{name}/q_grouped")  # [B, KV, rep, S, D]
        k_t = g.node("Transpose", [io["present_key"]], f"{name}/k_t", perm=[0, 1, 3, 2])
        k_t = g.node("Unsqueeze", [k_t, g.const([2])], f"{name}/k_shared")  # [B, KV, 1, D, T]
        scores = g.node("MatMul", [q, k_t], f"{name}/scores")  # [B, KV, rep, S, T]
        if self.o.activation_dtype != "fp32":  # softmax in fp32: masked fp16 scores can overflow to -inf
            scores = g.node("Cast", [scores], f"{name}/scores_f32", to=TensorProto.FLOAT)
        probs = g.node("Softmax", [g.node("Add", [scores, mask_bias], f"{name}/masked")], f"{name}/probs", axis=-1)
        if self.o.activation_dtype != "fp32":
            probs = g.node("Cast", [probs], f"{name}/probs_cast", to=self.onnx_dtype)
        v = g.node("Unsqueeze", [io["present_value"], g.const([2])], f"{name}/v_shared")  # [B, KV, 1, T, D]
        out = g.node("MatMul", [probs, v], f"{name}/context")  # [B, KV, rep, S, D]
        out = g.node("Reshape", [out, g.const([0, heads, -1, d])], f"{name}/context_heads")
        out = g.node("Transpose", [out], f"{name}/context_bsnd", perm=[0, 2, 1, 3])
        out = g.node("Reshape", [out, g.const([0, 0, heads * d])], f"{name}/context_merged")
        return self.linear(out, f"{name}.o_proj", w["o"], w.get("o_bias"), bits, power.get("o"))

    def mlp(self, i: int, x: str, w: dict, power: dict) -> str:
        g, name, bits = self.g, f"layers.{i}.mlp", self.o.weight_bits
        gate = self.linear(x, f"{name}.gate_proj", w["gate"], w.get("gate_bias"), bits, power.get("gate_up"))
        up = self.linear(x, f"{name}.up_proj", w["up"], w.get("up_bias"), bits, power.get("gate_up"))
        act = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{name}/sigmoid")], f"{name}/silu")
        gated = g.node("Mul", [act, up], f"{name}/gated")
        return self.linear(gated, f"{name}.down_proj", w["down"], w.get("down_bias"), bits, power.get("down"))

    def attention_mask_bias(self) -> str:
        """[B, 1, 1, S, T] additive bias: 0 where query s may attend to key t, a large negative elsewhere.

        Causal by index (queries are the last S of T positions) and padding from attention_mask. The bias is
        finite, so fully masked rows (left padding) give finite values instead of NaNs that would leak into
        later layers through the cache.
        """
        g = self.g
        total = g.node("Gather", [g.node("Shape", ["attention_mask"], "mask/shape"), g.const(1)], "mask/total")
        seq = g.node("Gather", [g.node("Shape", ["input_ids"], "mask/ids_shape"), g.const(1)], "mask/seq")
        key_pos = g.node("Range", [g.const(0), total, g.const(1)], "mask/key_pos")
        query_pos = g.node("Range", [g.node("Sub", [total, seq], "mask/past"), total, g.const(1)], "mask/query_pos")
        causal = g.node(
            "LessOrEqual",
            [
                g.node("Unsqueeze", [key_pos, g.const([0])], "mask/k_row"),
                g.node("Unsqueeze", [query_pos, g.const([1])], "mask/q_col"),
            ],
            "mask/causal",
        )
        padding = g.node("Cast", ["attention_mask"], "mask/bool", to=TensorProto.BOOL)
        padding = g.node("Unsqueeze", [padding, g.const([1, 2, 3])], "mask/padding")  # [B, 1, 1, 1, T]
        allowed = g.node("And", [causal, padding], "mask/allowed")
        return g.node("Where", [allowed, g.const(0.0, np.float32), g.const(-1e9, np.float32)], "mask/bias")


def build_decoder(
    g: GraphBuilder,
    config: LlamaConfig,
    options: DecoderOptions,
    get_weight: Callable[[str], np.ndarray | None],
    on_layer: Callable[[int], None] = lambda i: None,
    calibration_ids: list[int] | None = None,
) -> dict:
    """Adds the whole decoder to `g`. `get_weight(hf_name)` returns a float32 array or None if absent.
    `on_layer(i)` is called as layer i is done, and with i = num_hidden_layers once the lm_head is (with
    calibration, GPTQ on the lm_head takes a few layers' time).
    `calibration_ids` (token ids of a calibration text) are needed for algos act-mse, awq and gptq and for an
    int8 KV cache.
    Returns what mixed precision did: {"int8_matrices": {graph name: block size}}."""
    get_weight = _requiring(get_weight)
    c, b = config, DecoderBuilder(g, config, options)
    if options.cache_dtype != options.activation_dtype and not options.fused:
        raise SmolexportError("a KV cache type other than the activations' needs the fused graph")
    cache_type = CACHE_TYPES[options.cache_dtype][1]
    g.input("input_ids", TensorProto.INT64, ["batch_size", "seq"])
    g.input("attention_mask", TensorProto.INT64, ["batch_size", "total_seq"])
    g.input("position_ids", TensorProto.INT64, ["batch_size", "seq"])
    for i in range(c.num_hidden_layers):
        io = kv_names(i)
        for key in ("past_key", "past_value"):
            g.input(io[key], cache_type, ["batch_size", c.num_key_value_heads, "past_seq", c.head_dim])

    embed = get_weight("model.embed_tokens.weight")
    embedding = VocabMatrix(b, "embed_tokens", embed, b.lm_head_bits)
    x = embedding.lookup("input_ids")
    calibration = None
    if options.needs_calibration:
        if not calibration_ids:
            raise ValueError(f"algo {options.algo} / KV cache {options.cache_dtype} needs calibration_ids")
        calibration = Calibration(c, embed, calibration_ids)
    lm_head_weight = None if c.tie_word_embeddings else get_weight("lm_head.weight")
    if lm_head_weight is not None or not options.calibrated:
        embedding.write(None)  # only the tied lm_head waits for the calibration to reach its inputs
    del embed

    cos_table, sin_table = rope_tables(c, options.context_length)
    if options.fused:
        x = _fused_layers(b, x, cos_table, sin_table, get_weight, on_layer, calibration)
    else:
        x = _standard_layers(b, x, cos_table, sin_table, get_weight, on_layer, calibration)

    # Prefill only needs the last position's logits: `logits_to_keep` [1] (0 = all) keeps the last k. An input
    # with an initializer of the same name, [0], so it is optional: runtimes that do not know it (onnxruntime-genai
    # feeds only the inputs its genai_config names) get every position's logits; ours feeds 1 in prefill.
    # onnxruntime lists it under get_overridable_initializers(), not get_inputs(), and binds it like an input.
    keep = g.input("logits_to_keep", TensorProto.INT64, [1])
    g.initializer("logits_to_keep", np.array([0], dtype=np.int64))
    start = g.node("Neg", [keep], "logits_to_keep/start")
    x = g.node("Slice", [x, start, g.const([2**62]), g.const([1])], "logits_to_keep/slice")
    final_norm = calibration.final(get_weight("model.norm.weight")) if options.calibrated else None
    if lm_head_weight is None:
        logits = embedding.project(x)
        if options.calibrated:
            embedding.write(final_norm)
    else:  # untied: a separate [vocab, hidden] matrix
        lm_head = VocabMatrix(b, "lm_head", lm_head_weight, b.lm_head_bits)
        logits = lm_head.project(x)
        lm_head.write(final_norm)
    on_layer(c.num_hidden_layers)
    if b.np_dtype != np.float32:
        logits = g.node("Cast", [logits], "logits/f32", to=TensorProto.FLOAT)
    g.node_to("Identity", [logits], ["logits"])
    g.output("logits", TensorProto.FLOAT, ["batch_size", "kept_seq", c.vocab_size])
    for i in range(c.num_hidden_layers):
        io = kv_names(i)
        for key in ("present_key", "present_value"):
            g.output(io[key], cache_type, ["batch_size", c.num_key_value_heads, "total_seq", c.head_dim])
    return {"int8_matrices": b.int8_matrices}


OPTIONAL_SUFFIXES = (".bias",)


def _requiring(get_weight: Callable[[str], np.ndarray | None]) -> Callable[[str], np.ndarray | None]:
    """Absent biases are fine; any other missing tensor is a checkpoint we cannot export, said clearly."""

    def get(name: str) -> np.ndarray | None:
        weight = get_weight(name)
        if weight is None and not name.endswith(OPTIONAL_SUFFIXES) and name != "lm_head.weight":
            raise SmolexportError(f"the checkpoint has no tensor {name!r}: not a plain (unquantized) Llama checkpoint")
        return weight

    return get


def _layer_weights(get_weight, i: int) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    prefix = f"model.layers.{i}."
    attn = {key: get_weight(f"{prefix}self_attn.{key}_proj.weight") for key in "qkvo"}
    attn |= {f"{key}_bias": get_weight(f"{prefix}self_attn.{key}_proj.bias") for key in "qkvo"}
    mlp = {key: get_weight(f"{prefix}mlp.{key}_proj.weight") for key in ("gate", "up", "down")}
    mlp |= {f"{key}_bias": get_weight(f"{prefix}mlp.{key}_proj.bias") for key in ("gate", "up", "down")}
    norms = get_weight(f"{prefix}input_layernorm.weight"), get_weight(f"{prefix}post_attention_layernorm.weight")
    return attn, mlp, *norms


def _calibrate(b: DecoderBuilder, calibration, i: int, attn: dict, mlp: dict, input_norm, post_norm):
    """Advances the calibration through layer i: (what the layer's graph needs from it, input_norm, post_norm).
    For calibrated weights: its linear layers' inputs by role ("qkv", "o", "gate_up", "down"); with algo awq,
    the layer's weights (attn/mlp, in place) and norms come back rescaled (awq.py). For an int8 KV cache:
    "kv_scales", computed after any rescaling (kv_cache.py)."""
    if calibration is None:
        return {}, input_norm, post_norm
    inputs = calibration.layer(attn, mlp, input_norm, post_norm)
    if b.o.calibrated and b.o.algo in ("awq", "awq-gptq"):
        input_norm, post_norm = b.awq_scale(i, attn, mlp, input_norm, post_norm, inputs)
    found = inputs if b.o.calibrated else {}
    if b.o.cache_dtype == "int8":
        from .kv_cache import kv_cache_scales

        found = {**found, "kv_scales": kv_cache_scales(inputs["qkv"].x, attn, b.c.num_key_value_heads)}
    return found, input_norm, post_norm


def _standard_layers(b: DecoderBuilder, x: str, cos_table, sin_table, get_weight, on_layer, calibration) -> str:
    """Standard ONNX ops only (plus MatMulNBits for quantized weights); returns the final-normed hidden state."""
    g = b.g
    cos = g.node("Gather", [g.initializer("rope.cos", cos_table.astype(b.np_dtype)), "position_ids"], "rope/cos")
    sin = g.node("Gather", [g.initializer("rope.sin", sin_table.astype(b.np_dtype)), "position_ids"], "rope/sin")
    cos = g.node("Unsqueeze", [cos, g.const([1])], "rope/cos_heads")  # [B, 1, S, D/2]
    sin = g.node("Unsqueeze", [sin, g.const([1])], "rope/sin_heads")
    mask_bias = b.attention_mask_bias()
    for i in range(b.c.num_hidden_layers):
        attn, mlp, input_norm, post_attn_norm = _layer_weights(get_weight, i)
        power, input_norm, post_attn_norm = _calibrate(b, calibration, i, attn, mlp, input_norm, post_attn_norm)
        h = b.rms_norm(x, input_norm, f"layers.{i}.input_norm")
        x = g.node("Add", [x, b.attention(i, h, attn, cos, sin, mask_bias, power)], f"layers.{i}.attn_residual")
        h = b.rms_norm(x, post_attn_norm, f"layers.{i}.post_attn_norm")
        x = g.node("Add", [x, b.mlp(i, h, mlp, power)], f"layers.{i}.mlp_residual")
        del attn, mlp
        on_layer(i)
    return b.rms_norm(x, get_weight("model.norm.weight"), "final_norm")


def _fused_layers(b: DecoderBuilder, x: str, cos_table, sin_table, get_weight, on_layer, calibration) -> str:
    """ONNX Runtime's fused contrib ops (see fused.py); returns the final-normed hidden state."""
    from .fused import FusedLayers

    fused = FusedLayers(b, cos_table, sin_table)
    pending, residual = None, x
    for i in range(b.c.num_hidden_layers):
        attn, mlp, input_norm, post_attn_norm = _layer_weights(get_weight, i)
        power, input_norm, post_attn_norm = _calibrate(b, calibration, i, attn, mlp, input_norm, post_attn_norm)
        h, residual = fused.add_and_norm(pending, residual, input_norm, f"layers.{i}.input_norm")
        pending = fused.attention(i, h, attn, power)
        h, residual = fused.add_and_norm(pending, residual, post_attn_norm, f"layers.{i}.post_attn_norm")
        pending = fused.mlp(i, h, mlp, power)
        del attn, mlp
        on_layer(i)
    return fused.add_and_norm(pending, residual, get_weight("model.norm.weight"), "final_norm")[0]
