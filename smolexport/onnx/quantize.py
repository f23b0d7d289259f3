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


ALGOS = ("rtn", "mse")
# Range shrink factors the "mse" search tries: 1.0 is plain round-to-nearest over the block's range.
SHRINK_GRID = np.linspace(1.0, 0.55, 19, dtype=np.float32)
ROWS_PER_CHUNK = 512  # bounds the search's temporaries to a few hundred MB on the largest matrices


def quantize_blockwise(
    weight: np.ndarray,
    bits: int,
    block_size: int,
    scale_dtype=np.float32,
    algo: str = "rtn",
    importance: np.ndarray | None = None,
) -> BlockQuantized:
    """Quantizes W [N, K] block-wise along K into MatMulNBits' packed layout (see `block_codes`)."""
    q, scales, zero_points = block_codes(weight, bits, block_size, scale_dtype, algo, importance)
    return pack_blocks(q, scales, zero_points, bits, block_size, weight.shape[1])


def block_codes(
    weight: np.ndarray,
    bits: int,
    block_size: int,
    scale_dtype=np.float32,
    algo: str = "rtn",
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantizes W [N, K] block-wise along K: (q [N, n_blocks, block_size], scales, zero points [N, n_blocks]),
    unpacked uint8, K zero-padded to whole blocks.

    algo "rtn": round to nearest over each block's range (widened to include 0).
    algo "mse": per block, the range shrink factor (from SHRINK_GRID) that minimizes the block's squared
    reconstruction error, weighted per input channel by `importance` [K] when given (e.g. the mean squared
    activation of that channel, which makes the error track the layer's output error). Clipping a few outliers
    buys a finer step for all the other weights.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n, n_blocks, block_size)
    weights = None
    if importance is not None:
        weights = np.zeros(n_blocks * block_size, dtype=np.float32)
        weights[:k] = importance
        weights = weights.reshape(1, n_blocks, block_size)

    qmax = (1 << bits) - 1
    q = np.empty(blocks.shape, np.uint8)
    scales = np.empty((n, n_blocks), scale_dtype)
    zero_points = np.empty((n, n_blocks), np.uint8)
    shrinks = SHRINK_GRID if algo == "mse" else SHRINK_GRID[:1]
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        q[rows], scales[rows], zero_points[rows] = search_grid(blocks[rows], qmax, scale_dtype, shrinks, weights)
    return q, scales, zero_points


def pack_blocks(q, scales, zero_points, bits: int, block_size: int, k: int) -> BlockQuantized:
    """Packs q [N, n_blocks, block_size] and zero points [N, n_blocks] (unpacked uint8) into the stored layout."""
    n, n_blocks = scales.shape
    q = q.astype(np.uint8)
    zp = zero_points.astype(np.uint8)
    if bits == 4:
        data = q[:, :, 0::2] | (q[:, :, 1::2] << 4)
        if n_blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        zp = zp[:, 0::2] | (zp[:, 1::2] << 4)
    else:
        data = q
    return BlockQuantized(np.ascontiguousarray(data), scales, np.ascontiguousarray(zp), bits, block_size, k)


def search_grid(blocks: np.ndarray, qmax: int, scale_dtype, shrinks: np.ndarray, weights: np.ndarray | None):
    """The best (q, scale, zero point) per block over the candidate range shrinks."""
    lo0 = np.minimum(blocks.min(axis=2), 0.0)
    hi0 = np.maximum(blocks.max(axis=2), 0.0)
    best = None
    for shrink in shrinks:
        q, scales, zero_points = _round_to_grid(blocks, lo0 * shrink, hi0 * shrink, qmax, scale_dtype)
        if len(shrinks) == 1:
            return q, scales, zero_points
        deq = (q.astype(np.float32) - zero_points[:, :, None]) * scales.astype(np.float32)[:, :, None]
        err = (deq - blocks) ** 2
        err = (err if weights is None else err * weights).sum(axis=2)
        if best is None:
            best = [q, scales, zero_points, err]
            continue
        better = err < best[3]
        best[0] = np.where(better[:, :, None], q, best[0])
        best[1] = np.where(better, scales, best[1])
        best[2] = np.where(better, zero_points, best[2])
        best[3] = np.where(better, err, best[3])
    return best[0], best[1], best[2]


def _round_to_grid(blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray, qmax: int, scale_dtype):
    scales = ((hi - lo) / qmax).astype(scale_dtype)
    # Scales are rounded to their storage type first so that quantization uses the scale the kernel sees.
    safe = np.where(scales == 0, 1.0, scales.astype(np.float32))
    zero_points = np.clip(np.round(-lo / safe), 0, qmax)
    q = np.clip(np.round(blocks / safe[:, :, None]) + zero_points[:, :, None], 0, qmax).astype(np.uint8)
    return q, scales, zero_points.astype(np.uint8)


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
