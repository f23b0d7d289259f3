"""Block-wise weight quantization in the layout of ONNX Runtime's `MatMulNBits`.

A weight W [N, K] (out_features, in_features) is split along K into blocks of `block_size`. Each block has
a float scale and an unsigned zero point, so `W ~= (q - zero_point) * scale` with q in [0, 2**bits - 1]
(round-to-nearest over the block's range, extended to include 0 so the zero point is representable).

Storage, as MatMulNBits and GatherBlockQuantized (uint8 data) read it:
- data  [N, n_blocks, block_size * bits / 8] uint8; 4-bit values two per byte, the even element in the low nibble
- scales [N, n_blocks] float
- zero_points uint8: 4 bits -> [N, ceil(n_blocks / 2)] two per byte; 8 bits -> [N, n_blocks]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlockQuantized:
    data: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # [N, n_blocks]
    zero_points: np.ndarray  # uint8, packed for 4 bits
    bits: int
    block_size: int
    k: int  # unpadded in_features

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + self.zero_points.nbytes


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int, scale_dtype=np.float32) -> BlockQuantized:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n, n_blocks, block_size)

    qmax = (1 << bits) - 1
    lo = np.minimum(blocks.min(axis=2), 0.0)
    hi = np.maximum(blocks.max(axis=2), 0.0)
    scales = ((hi - lo) / qmax).astype(scale_dtype)
    # Scales are rounded to their storage type first so that quantization uses the scale the kernel sees.
    safe = np.where(scales == 0, 1.0, scales.astype(np.float32))
    zero_points = np.clip(np.round(-lo / safe), 0, qmax)
    q = np.clip(np.round(blocks / safe[:, :, None]) + zero_points[:, :, None], 0, qmax).astype(np.uint8)

    zp = zero_points.astype(np.uint8)
    if bits == 4:
        data = q[:, :, 0::2] | (q[:, :, 1::2] << 4)
        if n_blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        zp = zp[:, 0::2] | (zp[:, 1::2] << 4)
    else:
        data = q
    return BlockQuantized(np.ascontiguousarray(data), scales, np.ascontiguousarray(zp), bits, block_size, k)


def dequantize_blockwise(qw: BlockQuantized) -> np.ndarray:
    """The float weight [N, K] that the kernels compute with (for tests and error measurements)."""
    n, n_blocks, _ = qw.data.shape
    if qw.bits == 4:
        q = np.empty((n, n_blocks, qw.block_size), np.uint8)
        q[:, :, 0::2] = qw.data & 0x0F
        q[:, :, 1::2] = qw.data >> 4
        zp = np.stack([qw.zero_points & 0x0F, qw.zero_points >> 4], axis=2).reshape(n, -1)[:, :n_blocks]
    else:
        q, zp = qw.data, qw.zero_points
    scales = qw.scales.astype(np.float32)
    w = (q.astype(np.float32) - zp[:, :, None].astype(np.float32)) * scales[:, :, None]
    return w.reshape(n, -1)[:, : qw.k]
