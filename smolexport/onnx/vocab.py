"""The vocabulary matrices: the token embedding (a lookup by id) and the lm_head (a projection to logits).

A tied model stores one [vocab, hidden] table for both. Float tables are read by Gather and by Gemm with
transB (no transposed copy). Quantized tables are MatMulNBits' packed blocks: the lm_head is a MatMulNBits
node, and the lookup gathers the ids' rows of the same data, zero points and scales and dequantizes them with
standard ops. ONNX Runtime's GatherBlockQuantized would need the 4-bit zero points unpacked, a second copy of
them: 1.8 MB at blocks of 16 on SmolLM2-135M, 2% of its int4 model.

`int8_vocab` (`--int8-vocab N`) keeps the rows of the token ids below N at 8 bits and the rest at 4: two
tables, whose lm_head outputs are concatenated in id order and whose lookups are chosen per id. Byte-level BPE
numbers its tokens in merge order, the most frequent merges first, so low ids are the common tokens. On the
held-out dev set (benchmarks/sensitivity.py --dev, docs/quantization.md), SmolLM2's first 8,192 rows at 8 bits
brought nearly three quarters of the gain of the whole table at 8 bits (KL), for a sixth of its cost. The same number of
rows picked by weight norm or by their quantization error brought almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .calibration import LayerInput
from .graph import MS_DOMAIN
from .mixed import int8_block_size


@dataclass(frozen=True)
class TablePart:
    """Rows [start, stop) of a vocabulary matrix, stored under initializer names `name.*`."""

    name: str
    start: int
    stop: int
    bits: int | None  # None: float
    block_size: int


class VocabMatrix:
    """A [vocab, hidden] matrix of the graph (`name` embed_tokens or lm_head), as one or two row ranges."""

    def __init__(self, builder, name: str, weight: np.ndarray, bits: int | None):
        self.b, self.g, self.name, self.weight = builder, builder.g, name, weight
        self.vocab, self.hidden = vocab, hidden = weight.shape
        bits, block_size = builder._bits(name, bits, hidden)
        common = min(builder.o.int8_vocab, vocab) if bits == 4 else 0
        if common == vocab:  # every row at 8 bits: the same as naming the matrix in --int8-layers
            bits, block_size = 8, int8_block_size(hidden)
            builder.int8_matrices[name] = block_size
            common = 0
        self.parts = [TablePart(name, common, vocab, bits, block_size)]
        if common:
            int8_rows = TablePart(f"{name}.int8_rows", 0, common, 8, int8_block_size(hidden))
            builder.int8_matrices[int8_rows.name] = int8_rows.block_size
            self.parts.insert(0, int8_rows)

    # --- graph ---------------------------------------------------------------------------------------
    def lookup(self, ids: str) -> str:
        """The rows of `ids` [B, S] as [B, S, hidden] activations."""
        if len(self.parts) == 1:
            return self._lookup_part(self.parts[0], ids)
        g, common = self.g, self.parts[0]
        rows = []
        for part in self.parts:  # each table looks up every id, clamped into its range; Where picks
            local = g.node("Sub", [ids, g.const(part.start)], f"{part.name}/ids") if part.start else ids
            local = g.node("Clip", [local, g.const(0), g.const(part.stop - part.start - 1)], f"{part.name}/clip")
            rows.append(self._lookup_part(part, local))
        is_common = g.node("Less", [ids, g.const(common.stop)], f"{self.name}/is_int8_row")
        is_common = g.node("Unsqueeze", [is_common, g.const([-1])], f"{self.name}/is_int8_row_3d")
        return g.node("Where", [is_common, *rows], f"{self.name}/lookup")

    def project(self, x: str) -> str:
        """x [B, S, hidden] @ matrix.T: logits [B, S, vocab]."""
        outputs = [self._project_part(part, x) for part in self.parts]
        if len(outputs) == 1:
            return outputs[0]
        return self.g.node("Concat", outputs, f"{self.name}/logits", axis=-1)

    def write(self, calib: LayerInput | None) -> None:
        """Stores the matrix, quantized with the lm_head's calibration inputs if given. Rows are independent
        for every algorithm here (GPTQ included), so the row ranges are quantized apart."""
        for part in self.parts:
            rows = self.weight[part.start : part.stop]
            if part.bits is None:
                self.g.initializer(f"{part.name}.weight", rows.astype(self.b.np_dtype))
                continue
            qw = self.b.quantize(self.name, rows, part.bits, part.block_size, calib)
            self.g.initializer(f"{part.name}.qweight", qw.data)
            self.b.write_scales(part.name, qw)
            self.g.initializer(f"{part.name}.zero_points", qw.zero_points)
        self.weight = None  # written: the float copy can go

    # --- one row range -------------------------------------------------------------------------------
    def _lookup_part(self, part: TablePart, ids: str) -> str:
        g, name = self.g, part.name
        hidden = self.hidden
        if part.bits is None:
            return g.node("Gather", [f"{name}.weight", ids], f"{name}/lookup")
        # data [rows, n_blocks, blob] uint8 -> gathered [B, S, n_blocks, blob] -> codes [B, S, n_blocks, block]
        codes = g.node("Gather", [f"{name}.qweight", ids], f"{name}/lookup_codes")
        zero_points = g.node("Gather", [f"{name}.zero_points", ids], f"{name}/lookup_zero_points")
        n_blocks = -(-hidden // part.block_size)
        if part.bits == 4:
            codes = self._unpack_nibbles(codes, [0, 0, n_blocks, part.block_size], f"{name}/lookup_codes")
            zero_points = self._unpack_nibbles(zero_points, [0, 0, -1], f"{name}/lookup_zero_points")
            zero_points = g.node(
                "Slice", [zero_points, g.const([0]), g.const([n_blocks]), g.const([-1])], f"{name}/zp_unpad"
            )
        scales = g.node("Gather", [self.b.scales_input(name), ids], f"{name}/lookup_scales")  # [B, S, n_blocks]
        dtype = self.b.onnx_dtype
        codes = g.node("Cast", [codes], f"{name}/codes_float", to=dtype)
        zero_points = g.node("Cast", [zero_points], f"{name}/zp_float", to=dtype)
        zero_points = g.node("Unsqueeze", [zero_points, g.const([-1])], f"{name}/zp_4d")
        scales = g.node("Unsqueeze", [scales, g.const([-1])], f"{name}/scales_4d")
        rows = g.node("Mul", [g.node("Sub", [codes, zero_points], f"{name}/centered"), scales], f"{name}/rows")
        rows = g.node("Reshape", [rows, g.const([0, 0, -1])], f"{name}/rows_3d")
        if n_blocks * part.block_size != hidden:  # the last block was padded
            rows = g.node("Slice", [rows, g.const([0]), g.const([hidden]), g.const([-1])], f"{name}/unpad")
        return rows

    def _unpack_nibbles(self, packed: str, shape: list[int], name: str) -> str:
        """uint8 [..., n] holding two 4-bit values each (low nibble first) -> int32 [..., 2n], reshaped."""
        g = self.g
        wide = g.node("Cast", [packed], f"{name}/int32", to=TensorProto.INT32)
        low = g.node("Mod", [wide, g.const(16, np.int32)], f"{name}/low")
        high = g.node("Div", [wide, g.const(16, np.int32)], f"{name}/high")
        low = g.node("Unsqueeze", [low, g.const([-1])], f"{name}/low_last")
        high = g.node("Unsqueeze", [high, g.const([-1])], f"{name}/high_last")
        pairs = g.node("Concat", [low, high], f"{name}/pairs", axis=-1)
        return g.node("Reshape", [pairs, g.const(shape)], f"{name}/unpacked")

    def _project_part(self, part: TablePart, x: str) -> str:
        g, name = self.g, part.name
        vocab, hidden = part.stop - part.start, self.hidden
        if part.bits is None:  # Gemm with transB reads the [V, H] table in place: no transposed copy
            flat = g.node("Reshape", [x, g.const([-1, hidden])], f"{name}/flat")
            y = g.node("Gemm", [flat, f"{name}.weight"], f"{name}/project", transB=1)
            batch_seq = g.node("Shape", [x], f"{name}/x_shape", start=0, end=2)  # [B, kept]
            shape = g.node("Concat", [batch_seq, g.const([vocab])], f"{name}/shape", axis=0)
            return g.node("Reshape", [y, shape], f"{name}/logits_3d")
        return g.node(
            "MatMulNBits",
            [x, f"{name}.qweight", self.b.scales_input(name), f"{name}.zero_points"],
            "lm_head" if len(self.parts) == 1 else f"lm_head/{name}",
            domain=MS_DOMAIN,
            K=hidden,
            N=vocab,
            bits=part.bits,
            block_size=part.block_size,
            accuracy_level=self.b.o.accuracy_level,
        )
