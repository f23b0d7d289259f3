"""GPTQ: block-wise quantization that compensates each column's rounding error in the columns not yet quantized.

For a linear layer y = x @ W.T with calibration inputs X [T, K], the output error of a quantized W' is
sum over rows of (W - W') H (W - W').T with H = X.T X / T. GPTQ (Frantar et al., 2022) quantizes the columns of W
left to right; after rounding column j it spreads that column's error over the columns j+1.. using the inverse
Hessian (an optimal update for the quadratic loss), so the next roundings absorb it. Each quantization block's
scale and zero point are chosen when the sweep reaches it, on the already updated weights, by the same weighted
range-shrink search as algo "mse" (weights: diag(H)).

Works on one matrix at a time: memory is one [K, K] float64 Hessian plus a float32 copy of W.
"""

from __future__ import annotations

import numpy as np
import torch

from .quantize import SHRINK_GRID, BlockQuantized, pack_blocks, row_scales, search_grid

DAMPING = 0.01  # fraction of mean(diag(H)) added to the diagonal: H from a few hundred tokens is often singular
LAZY_COLUMNS = 128  # columns updated together (a multiple of every block size we use)


def inverse_hessian_factor(hessian: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U.T U) after damping; rows of U drive GPTQ's updates."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damping * np.mean(np.diag(h))
    inv = np.linalg.inv(np.linalg.cholesky(h))  # L^-1, with H = L L.T
    h_inv = inv.T @ inv
    return np.linalg.cholesky(h_inv).T


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int,
    scale_dtype=np.float32,
    log8_scales: bool = False,
) -> BlockQuantized:
    """Quantizes W [N, K] block-wise along K (layout as `quantize_blockwise`), minimizing the output error
    under the input second moments `hessian` [K, K] (X.T X / T). log8 scales are relative to the row scales
    of W as given (updated columns that outgrow them are clipped)."""
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    padded_k = n_blocks * block_size
    w = np.zeros((n, padded_k), dtype=np.float32)
    w[:, :k] = weight
    h = np.zeros((padded_k, padded_k), dtype=np.float64)
    h[:k, :k] = hessian
    w[:, np.diag(h) == 0] = 0.0  # inputs that are always 0: any value works, 0 quantizes exactly
    u = inverse_hessian_factor(h).astype(np.float32)
    importance = np.diag(h).astype(np.float32)

    qmax = (1 << bits) - 1
    scales = np.empty((n, n_blocks), scale_dtype)
    zero_points = np.empty((n, n_blocks), np.uint8)
    rows = row_scales(w.reshape(n, n_blocks, block_size), bits) if log8_scales else None
    codes = np.empty((n, n_blocks), np.uint8) if log8_scales else None
    lazy = max(LAZY_COLUMNS, block_size)
    # Torch, on W transposed [K, N]: a column of W is then a contiguous row, and each step's update of the
    # columns to its right touches contiguous memory (3x faster on the 1.7B lm_head than strided columns).
    wt, ut = torch.from_numpy(np.ascontiguousarray(w.T)), torch.from_numpy(u)
    qt = torch.empty((padded_k, n), dtype=torch.uint8)
    for start in range(0, padded_k, lazy):
        end = min(start + lazy, padded_k)
        w1 = wt[start:end].clone()
        errors = torch.zeros_like(w1)
        u1 = ut[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % block_size == 0:
                b = col // block_size
                block = w1[i : i + block_size].T.contiguous().numpy()[:, None, :]
                weights = importance[col : col + block_size].reshape(1, 1, -1)
                _, s, z, c = search_grid(block, qmax, scale_dtype, SHRINK_GRID, weights, rows)
                scales[:, b], zero_points[:, b] = s[:, 0], z[:, 0]
                if codes is not None:
                    codes[:, b] = c[:, 0]
                step = torch.from_numpy(np.where(s[:, 0] == 0, 1.0, s[:, 0].astype(np.float32)).astype(np.float32))
                zero = torch.from_numpy(z[:, 0].astype(np.float32))
            column = w1[i]
            qc = torch.clamp(torch.round(column / step) + zero, 0, qmax)
            qt[col] = qc.to(torch.uint8)
            err = (column - (qc - zero) * step) / u1[i, i]
            w1[i:].sub_(u1[i, i:, None] * err[None, :])
            errors[i] = err
        wt[end:].sub_(ut[start:end, end:].T @ errors)
    q = qt.T.contiguous().numpy()
    return pack_blocks(q.reshape(n, n_blocks, block_size), scales, zero_points, bits, block_size, k, codes, rows)
