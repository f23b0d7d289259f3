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
import torch

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
CHUNK_ELEMENTS = 1 << 21  # weights per chunk of the search: its temporaries stay in cache (2.4x faster than 8M)
COARSE_STRIDE = 3  # the clipping search's coarse step, in candidates (search_grid)


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
    b = torch.from_numpy(blocks)
    ranges = b.amax(dim=2).clamp(min=0.0) - b.amin(dim=2).clamp(max=0.0)
    largest = ranges.amax(dim=1, keepdim=True).numpy() / ((1 << bits) - 1)
    return np.where(largest == 0, 1.0, largest).astype(np.float32)


def _blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    n, k = weight.shape
    if k % block_size == 0:  # no padding: a view
        return np.ascontiguousarray(weight, dtype=np.float32).reshape(n, k // block_size, block_size)
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
    rows_per_chunk = max(1, CHUNK_ELEMENTS // blocks.shape[1] // block_size)
    for start in range(0, n, rows_per_chunk):
        chunk = slice(start, start + rows_per_chunk)
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
    block's range down to the smallest shrink.

    Computed in torch (all cores, in-place temporaries). A candidate's error needs only its scale and zero
    point, so the loop keeps those per block and rounds the weights once at the end. With more than
    COARSE_STRIDE * 2 candidates the search is coarse-to-fine: every COARSE_STRIDE-th candidate (always the
    first, plain rounding), then the neighbours of each block's best: on a 1536x576 test matrix with uneven
    channel scales its weighted error was within 0.04% of the exhaustive search's (which, with COARSE_STRIDE
    raised, gives the previous NumPy search's codes exactly)."""
    b = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.float32))
    w = None if weights is None else torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    lo0 = b.amin(dim=2).clamp(max=0.0)
    hi0 = b.amax(dim=2).clamp(min=0.0)
    span = torch.where(hi0 > lo0, hi0 - lo0, torch.ones_like(hi0))
    to_storage = (lambda t: t.half().float()) if np.dtype(scale_dtype) == np.float16 else (lambda t: t)
    if rows is None:
        grid = torch.from_numpy(np.asarray(shrinks, dtype=np.float32))

        def candidate(index: torch.Tensor):  # -> (scale as stored, lowest value, log8 code or None)
            shrink = grid[index]
            lo = lo0 * shrink
            return to_storage((hi0 * shrink - lo) / qmax), lo, None

        count = len(grid)
    else:
        r = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        table = torch.from_numpy(LOG8_TABLE)
        first = torch.floor(-LOG8_STEPS * torch.log2((hi0 - lo0) / qmax / r))
        first = torch.nan_to_num(first, posinf=255.0).clamp(0, 255).long()

        def candidate(index: torch.Tensor):  # a representable scale; its shrink of the range only places the zero
            codes = (first + index).clamp(max=255)
            scales = to_storage(r * table[codes])
            return scales, lo0 * (scales * qmax / span), codes

        count = int(np.ceil(-np.log2(shrinks[-1]) * LOG8_STEPS)) + 1 if len(shrinks) > 1 else 1

    def error(scales: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        zero = torch.clamp(torch.round(-lo / safe), 0, qmax)
        t = torch.div(b, safe[:, :, None]).round_().add_(zero[:, :, None]).clamp_(0, qmax)
        t.sub_(zero[:, :, None]).mul_(safe[:, :, None]).sub_(b).square_()
        return (t if w is None else t.mul_(w)).sum(dim=2), zero

    best = None  # [index, scales, zero points, codes, error] per block

    def consider(index: torch.Tensor) -> None:
        nonlocal best
        scales, lo, codes = candidate(index)
        err, zero = error(scales, lo)
        if best is None:
            best = [index.expand_as(err).clone(), scales, zero, codes, err]
            return
        better = err < best[4]
        for i, value in enumerate((index.expand_as(err), scales, zero, codes, err)):
            if value is not None:
                best[i] = torch.where(better, value, best[i])

    zero_index = torch.zeros((), dtype=torch.long)
    if count == 1:
        scales, lo, codes = candidate(zero_index)
        best = [None, scales, error(scales, lo)[1], codes, None]
    elif count <= 2 * COARSE_STRIDE:
        for i in range(count):
            consider(zero_index + i)
    else:
        for i in range(0, count, COARSE_STRIDE):
            consider(zero_index + i)
        coarse = best[0]
        for step in range(1, COARSE_STRIDE):
            for neighbour in (coarse - step, coarse + step):
                consider(neighbour.clamp(0, count - 1))
    scales, zero = best[1], best[2]
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.div(b, safe[:, :, None]).round_().add_(zero[:, :, None]).clamp_(0, qmax).to(torch.uint8)
    codes = None if best[3] is None else best[3].to(torch.uint8).numpy()
    return q.numpy(), scales.numpy().astype(scale_dtype), zero.to(torch.uint8).numpy(), codes


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
