"""Weight matrices as Core ML constants: fp16, int4 block-wise or int8 per channel, quantized by our own code.

int4 uses the same asymmetric round-to-nearest (or clip search, `algo="mse"`) as the ONNX export, stored as
`constexpr_blockwise_shift_scale(data=uint4 [N, K], scale=fp16 [N, K/block], offset=uint4 [N, K/block])`,
which Core ML (iOS 18 / macOS 15) decompresses at load or run time: W = scale * (data - offset).
int8 is symmetric per output channel: W = scale[N, 1] * data (int8).
The exporter refuses a block size that does not divide the model's matrix widths (SmolLM2-135M's 576 takes
16, 32 or 64); a matrix that still does not fit stays fp16.
"""

from __future__ import annotations

import numpy as np

from ..onnx.quantize import block_codes
from . import import_coremltools

WEIGHT_MODES = ("int4", "int8", "fp16")


class WeightCodec:
    """Turns a float matrix [N, K] into the program's constant (call inside a MIL program being built)."""

    def __init__(self, mode: str, block_size: int = 32, algo: str = "rtn"):
        if mode not in WEIGHT_MODES:
            raise ValueError(f"mode must be one of {WEIGHT_MODES}, got {mode!r}")
        self.mode, self.block_size, self.algo = mode, block_size, algo
        import_coremltools()
        from coremltools.converters.mil import Builder
        from coremltools.converters.mil.mil import types

        self.mb, self.types = Builder, types

    def matrix(self, name: str, weight: np.ndarray):
        mb, types = self.mb, self.types
        weight = np.asarray(weight, dtype=np.float32)
        n, k = weight.shape
        if self.mode == "int4" and k % self.block_size == 0:
            q, scales, offsets, *_ = block_codes(weight, 4, self.block_size, np.float16, self.algo)
            return mb.constexpr_blockwise_shift_scale(
                data=q.reshape(n, k).astype(types.np_uint4_dtype), scale=scales,
                offset=offsets.astype(types.np_uint4_dtype), name=_const_name(name),
            )  # fmt: skip
        if self.mode == "int8":
            scales = (np.abs(weight).max(axis=1, keepdims=True) / 127.0).astype(np.float16)
            safe = np.where(scales == 0, 1.0, scales.astype(np.float32))
            data = np.clip(np.round(weight / safe), -127, 127).astype(np.int8)
            return mb.constexpr_blockwise_shift_scale(data=data, scale=scales, name=_const_name(name))
        return mb.const(val=weight.astype(np.float16), name=_const_name(name))


def _const_name(tensor_name: str) -> str:
    return tensor_name.removeprefix("model.").removesuffix(".weight").replace(".", "_")
