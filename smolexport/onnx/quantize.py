"""Block-wise weight quantization in the layout of ONNX Runtime's `MatMulNBits`.

A weight W [N, K] (out_features, in_features) is split along K into blocks of `block_size`. Each block has
a float scale and an unsigned zero point, so `W ~= (q - zero_point) * scale` with q in [0, 2**bits - 1]
(round-to-nearest over the block's range, extended to include 0 so the zero point is representable).

Storage, as MatMulNBits reads it (and the embedding lookup, vocab.py):
- data  [N, n_blocks, block_size * bits / 8] uint8; 4-bit values two per byte, the even element in the low nibble
- scales [N, n_blocks] float
- zero_points uint8: 4 bits -> [N, ceil(n_blocks / 2)] two per byte; 8 bits -> [N, n_blocks]

Scales are fp16, or with `log8_scales` one byte per block: a code c with scale = row_scale * 2**(-c / 24)
(LOG8_TABLE), row_scale being one fp32 number per row, rounded to fp16 as the fp16 scales are. That halves
the scales' cost (1/4 bit per weight less at blocks of 32, 1/2 at 16) for steps of 2.9% between
representable scales: the clipping search then picks among representable scales, so it loses little.
MatMulNBits reads float scales: the graph decodes them (decoder.DecoderBuilder.scales_input) with ops that
ONNX Runtime folds into a constant when it loads the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOG8_STEPS = 24  # log8 scale codes per octave
LOG8_TABLE = (2.0 ** (-np.arange(256, dtype=np.float64) / LOG8_STEPS)).astype(np.float32)


@dataclass
class BlockQuantized:
    data: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # [N, n_blocks], the scales the kernel computes with
    zero_points: np.ndarray  # uint8, packed for 4 bits
    bits: int
    block_size: int
    k: int  # unpadded in_features
    scale_codes: np.ndarray | None = None  # log8 scales: uint8 [N, n_blocks] ...
    row_scales: np.ndarray | None = None  # ... and float32 [N, 1]; stored instead of `scales`

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        scales = self.scales.nbytes if self.scale_codes is None else self.scale_codes.nbytes + self.row_scales.nbytes
        return self.data.nbytes + scales + self.zero_points.nbytes


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
    log8_scales: bool = False,
) -> BlockQuantized:
    """Quantizes W [N, K] block-wise along K into MatMulNBits' packed layout (see `block_codes`)."""
    found = block_codes(weight, bits, block_size, scale_dtype, algo, importance, log8_scales)
    return pack_blocks(*found[:3], bits, block_size, weight.shape[1], *found[3:])


def row_scales(blocks: np.ndarray, bits: int) -> np.ndarray:
    """log8 scales' per-row scale [N, 1] of blocks [N, n_blocks, block_size]: the row's largest
    round-to-nearest block scale."""
    ranges = np.maximum(blocks.max(axis=2), 0.0) - np.minimum(blocks.min(axis=2), 0.0)
    largest = ranges.max(axis=1, keepdims=True) / ((1 << bits) - 1)
    return np.where(largest == 0, 1.0, largest).astype(np.float32)


def _blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    return padded.reshape(n, n_blocks, block_size)


def block_codes(
    weight: np.ndarray,
    bits: int,
    block_size: int,
    scale_dtype=np.float32,
    algo: str = "rtn",
    importance: np.ndarray | None = None,
    log8_scales: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Quantizes W [N, K] block-wise along K: (q [N, n_blocks, block_size], scales, zero points [N, n_blocks],
    and for log8 scales their codes [N, n_blocks] and row scales [N, 1], else None, None), unpacked uint8,
    K zero-padded to whole blocks.

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
    blocks = _blocks(weight, block_size)
    n_blocks = blocks.shape[1]
    weights = None
    if importance is not None:
        weights = np.zeros(n_blocks * block_size, dtype=np.float32)
        weights[:k] = importance
        weights = weights.reshape(1, n_blocks, block_size)

    qmax = (1 << bits) - 1
    q = np.empty(blocks.shape, np.uint8)
    scales = np.empty((n, n_blocks), scale_dtype)
    zero_points = np.empty((n, n_blocks), np.uint8)
    rows = row_scales(blocks, bits) if log8_scales else None
    codes = None if rows is None else np.empty((n, n_blocks), np.uint8)
    shrinks = SHRINK_GRID if algo == "mse" else SHRINK_GRID[:1]
    for start in range(0, n, ROWS_PER_CHUNK):
        chunk = slice(start, start + ROWS_PER_CHUNK)
        found = search_grid(blocks[chunk], qmax, scale_dtype, shrinks, weights, None if rows is None else rows[chunk])
        q[chunk], scales[chunk], zero_points[chunk] = found[:3]
        if codes is not None:
            codes[chunk] = found[3]
    return q, scales, zero_points, codes, rows


def pack_blocks(q, scales, zero_points, bits: int, block_size: int, k: int, codes=None, rows=None) -> BlockQuantized:
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
    data, zp = np.ascontiguousarray(data), np.ascontiguousarray(zp)
    return BlockQuantized(data, scales, zp, bits, block_size, k, codes, rows)


def search_grid(
    blocks: np.ndarray,
    qmax: int,
    scale_dtype,
    shrinks: np.ndarray,
    weights: np.ndarray | None,
    rows: np.ndarray | None = None,
):
    """The best (q, scale, zero point, log8 code or None) per block over the candidate range shrinks. With log8
    scales (`rows` [N, 1] given), the candidates are the representable scales from the first that covers the
    block's range down to the smallest shrink."""
    lo0 = np.minimum(blocks.min(axis=2), 0.0)
    hi0 = np.maximum(blocks.max(axis=2), 0.0)
    span = np.where(hi0 > lo0, hi0 - lo0, 1.0)
    if rows is None:
        candidates = [(shrink, None, None) for shrink in shrinks]
    else:
        with np.errstate(divide="ignore"):
            first = np.floor(-LOG8_STEPS * np.log2((hi0 - lo0) / qmax / rows))
        first = np.clip(np.nan_to_num(first, posinf=255), 0, 255).astype(np.int64)
        offsets = range(int(np.ceil(-np.log2(shrinks[-1]) * LOG8_STEPS)) + 1 if len(shrinks) > 1 else 1)
        candidates = []
        for offset in offsets:
            codes = np.minimum(first + offset, 255)
            scales = (rows * LOG8_TABLE[codes]).astype(scale_dtype)
            candidates.append((scales.astype(np.float32) * qmax / span, codes, scales))
    best = None
    for shrink, codes, scales in candidates:
        if codes is None:
            q, scales, zero_points = _round_to_grid(blocks, lo0 * shrink, hi0 * shrink, qmax, scale_dtype)
        else:  # a representable scale; its shrink of the block's range only places the zero point
            q, zero_points = _codes_for(blocks, scales, lo0 * shrink, qmax)
        if len(candidates) == 1:
            return q, scales, zero_points, codes
        deq = (q.astype(np.float32) - zero_points[:, :, None]) * scales.astype(np.float32)[:, :, None]
        err = (deq - blocks) ** 2
        err = (err if weights is None else err * weights).sum(axis=2)
        if best is None:
            best = [q, scales, zero_points, codes, err]
            continue
        better = err < best[4]
        best[0] = np.where(better[:, :, None], q, best[0])
        best[1] = np.where(better, scales, best[1])
        best[2] = np.where(better, zero_points, best[2])
        if codes is not None:
            best[3] = np.where(better, codes, best[3])
        best[4] = np.where(better, err, best[4])
    return best[0], best[1], best[2], best[3]


def _round_to_grid(blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray, qmax: int, scale_dtype):
    scales = ((hi - lo) / qmax).astype(scale_dtype)
    q, zero_points = _codes_for(blocks, scales, lo, qmax)
    return q, scales, zero_points


def _codes_for(blocks: np.ndarray, scales: np.ndarray, lo: np.ndarray, qmax: int):
    # Scales are rounded to their storage type first so that quantization uses the scale the kernel sees.
    safe = np.where(scales == 0, 1.0, scales.astype(np.float32))
    zero_points = np.clip(np.round(-lo / safe), 0, qmax)
    q = np.clip(np.round(blocks / safe[:, :, None]) + zero_points[:, :, None], 0, qmax).astype(np.uint8)
    return q, zero_points.astype(np.uint8)


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
