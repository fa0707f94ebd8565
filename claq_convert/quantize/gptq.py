"""GPTQ (Frantar et al. 2022) with a pluggable column quantizer, returning codes rather than floats.

The structure follows the reference `gptq.py`: dead columns, act-order, dampening, the upper Cholesky
factor of H^-1, 128-column blocks with lazy batch updates. The inner loop over a block's columns
runs in one Numba kernel (`numba_quant.gptq_block`) on the CPU; the Hessian, the Cholesky and the lazy
updates stay on the weight's device (CUDA when present).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..format.spec import MAX_CODEBOOK  # 2**8 entries: the widest codebook the format holds
from ..kernels import numba_quant
from ..timing import NO_TIMER, Timer


@dataclass
class QuantizedWeight:
    """One quantized linear weight W[out, in]: what the file stores, plus diagnostics."""
    shape: tuple[int, int]
    method: str                       # "codebook" or "uniform"
    bits: np.ndarray                  # uint8 [in]
    codes: np.ndarray                 # uint8 [out, in]
    column_codebooks: np.ndarray      # float16, or float32 on grids, [in, 256]; column j uses its first 2**bits[j]
    outlier_counts: np.ndarray        # int64 [in]
    outlier_rows: np.ndarray          # int64, sorted within each column, columns in order
    outlier_values: np.ndarray        # float16, aligned with outlier_rows
    scale: Optional[np.ndarray] = None   # float32 [groups, out] (uniform only; one group without --group-size)
    zero: Optional[np.ndarray] = None    # float32 [groups, out] (uniform only)
    group: Optional[np.ndarray] = None   # int64 [in]: the group of each column (uniform only)
    codebook_levels: Optional[np.ndarray] = None  # uint8 [in, 256]: grid codebooks' levels (MODE_GRID only)
    codebook_grid: Optional[np.ndarray] = None    # float16 [in, 2]: each column's (offset, step) (MODE_GRID only)
    codebook_shapes: Optional[dict] = None        # width -> float16 [S, 2**width]: shared shapes (MODE_SHAPES only)
    shape_index: Optional[np.ndarray] = None      # uint8 [in]: each column's shape (MODE_SHAPES only)
    shape_affine: Optional[np.ndarray] = None     # float16 [in, 2]: each column's (offset, scale) (MODE_SHAPES only)
    loss: float = 0.0
    relative_error: float = 0.0
    info: dict = field(default_factory=dict)

    def dequantize(self) -> np.ndarray:
        """float32 [out, in] from the stored data alone (the same rule the file decoders follow)."""
        if self.method == "uniform":
            scale, zero = self.scale[self.group].T, self.zero[self.group].T  # [out, in]
            return (scale * (self.codes.astype(np.float32) - zero)).astype(np.float32)
        cols = np.arange(self.shape[1])
        W = self.column_codebooks.astype(np.float32)[cols[None, :], self.codes]
        out_cols = np.repeat(cols, self.outlier_counts)
        W[self.outlier_rows, out_cols] = self.outlier_values.astype(np.float32)
        return W


class GPTQ:
    """Quantize W[out, in] against the Hessian H = 2/n X X^T of its inputs (None: no compensation)."""

    def __init__(self, W: torch.Tensor, H: Optional[torch.Tensor], blocksize: int = 128,
                 percdamp: float = 0.01, actorder: bool = True):
        self.W = W.detach().float().clone()
        self.H = None if H is None else H.detach().float().clone()
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.actorder = actorder

    def _inverse_factor(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(perm, upper Cholesky of H^-1) after dead-column handling, act-order and dampening."""
        cols = W.shape[1]
        if self.H is None:
            return torch.arange(cols, device=W.device), torch.eye(cols, device=W.device)
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        perm = (torch.argsort(torch.diag(H), descending=True, stable=True) if self.actorder
                else torch.arange(cols, device=W.device))
        H = H[perm][:, perm]
        H += self.percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        return perm, Hinv

    def _independent_columns(self, W: torch.Tensor, workers: int, weights: np.ndarray, settings: tuple,
                             outputs: tuple):
        """Every column through gptq_block with no Hessian (an identity factor), in `workers` contiguous
        runs of blocks at once; the block losses summed in column order. (loss, kernel seconds)."""
        mode, bits, reserve, fit_all, max_iter, scale, zero, guard = settings
        cols = W.shape[1]
        blocks = [(i1, min(i1 + self.blocksize, cols)) for i1 in range(0, cols, self.blocksize)]

        def run(i1: int, i2: int) -> float:
            W1 = np.ascontiguousarray(W[:, i1:i2].T.cpu().numpy())
            Err1 = np.zeros_like(W1)
            return numba_quant.gptq_block(W1, np.eye(i2 - i1, dtype=np.float32), weights, mode, bits[i1:i2],
                                          reserve[i1:i2], fit_all, max_iter, scale, zero,
                                          *(o[i1:i2] for o in outputs[:4]), Err1, *(o[i1:i2] for o in outputs[4:6]),
                                          *outputs[6:], False, guard)

        tick = time.perf_counter()
        with ThreadPoolExecutor(workers, thread_name_prefix="claq-columns") as pool:
            losses = list(pool.map(lambda block: run(*block), blocks))
        return float(sum(losses)), time.perf_counter() - tick

    def quantize(self, bits: np.ndarray, reserve: Optional[np.ndarray] = None, uniform: bool = False,
                 fit_all: bool = False, max_iter: int = 0, group_size: int = 0, grid: bool = False,
                 timer: Timer = NO_TIMER, workers: int = 1,
                 row_weights: Optional[np.ndarray] = None, shapes: Optional[dict] = None,
                 grid_guard: float = 0.0) -> QuantizedWeight:
        """bits/reserve are per original column. `uniform`: per-row min-max grid of bits[0] levels, over
        the whole row, or (group_size > 0) fitted anew for every `group_size` columns in quantization
        order from the already-updated weights, as the reference does with act-order groups. `grid`:
        codebook entries as 8-bit levels on each column's fp16 (offset, step) grid (numba_quant.MODE_GRID).
        `timer` gets the phases cholesky, kmeans, gptq_update and finish (timing.py). Without a Hessian no
        column's error moves another, so `workers` threads take contiguous runs of blocks at once (the
        kernel releases the GIL); with one, columns go in order and workers > 1 lets each column's
        K-Means share its DP among Numba's threads. Either way the result is the one-thread result bit
        for bit. `row_weights` [out] (> 0):
        how much each output row's error counts in the codebooks' K-Means (None: equally). `shapes`
        (width -> fp16 values [S <= 256, 2**width], rows ascending, for every width in `bits`): each
        column's codebook is offset + scale * one of its width's shapes (numba_quant.MODE_SHAPES).
        `grid_guard` > 0 (grid only): a column whose grid rounding would make more than this share of its
        error keeps its largest weights in fp16 while each cuts its error by more than its 32 bits would
        buy spread over the column (numba_quant.gptq_block, GUARD_GAIN)."""
        start = time.perf_counter()
        kernel_seconds = 0.0
        with timer.phase("cholesky"):
            W = self.W.clone()
            rows, cols = W.shape
            reserve = np.zeros(cols, np.int64) if reserve is None else reserve
            scale = zero = np.zeros(1)
            scales, zeros = [], []
            blocksize = group_size if uniform and group_size else self.blocksize  # one grid per block
            if uniform and not group_size:
                scale, zero = uniform_grid(W, int(bits[0]))
            perm, Hinv = self._inverse_factor(W)
            W = W[:, perm]
        p = perm.cpu().numpy()
        weights = np.ones(rows) if row_weights is None else np.ascontiguousarray(row_weights, np.float64)
        bits_p, reserve_p = np.ascontiguousarray(bits[p], np.int64), np.ascontiguousarray(reserve[p], np.int64)

        codes = np.zeros((cols, rows), np.uint8)
        reserved = np.zeros((cols, rows), np.uint8)
        codebooks = np.zeros((cols, MAX_CODEBOOK), np.float32)
        levels = np.zeros((cols, MAX_CODEBOOK), np.uint8)
        grids = np.zeros((cols, 2), np.float64)
        Q = np.zeros((cols, rows), np.float32)
        loss = 0.0
        mode = (numba_quant.MODE_UNIFORM if uniform else numba_quant.MODE_SHAPES if shapes else
                numba_quant.MODE_GRID if grid else numba_quant.MODE_CODEBOOK)
        if mode == numba_quant.MODE_SHAPES and not set(np.unique(bits).tolist()) <= set(shapes):
            raise ValueError(f"shapes for widths {sorted(shapes)}, but the columns have {np.unique(bits).tolist()}")
        shape_table = shape_tables(shapes) if mode == numba_quant.MODE_SHAPES else numba_quant.no_shapes()
        guard = float(grid_guard)  # the kernel acts on it in MODE_GRID only
        independent = self.H is None and not group_size and workers > 1
        if independent:
            scales, zeros = [scale], [zero]  # uniform: the one per-row grid (unused otherwise)
            with timer.phase("kmeans"):
                loss, kernel_seconds = self._independent_columns(
                    W, workers, weights, (mode, bits_p, reserve_p, fit_all, max_iter, scale, zero, guard),
                    (codebooks, codes, reserved, Q, levels, grids, *shape_table))
        for i1 in [] if independent else range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            with timer.phase("gptq_update"):
                if uniform and group_size:
                    scale, zero = uniform_grid(W[:, i1:i2], int(bits[0]))
                if uniform:
                    scales.append(scale)
                    zeros.append(zero)
                W1 = np.ascontiguousarray(W[:, i1:i2].T.cpu().numpy())
                Hinv1 = np.ascontiguousarray(Hinv[i1:i2, i1:i2].cpu().numpy())
                Err1 = np.zeros((i2 - i1, rows), np.float32)
            with timer.phase("kmeans"):
                tick = time.perf_counter()
                loss += numba_quant.gptq_block(W1, Hinv1, weights, mode, bits_p[i1:i2], reserve_p[i1:i2], fit_all,
                                               max_iter, scale, zero, codebooks[i1:i2], codes[i1:i2], reserved[i1:i2],
                                               Q[i1:i2], Err1, levels[i1:i2], grids[i1:i2], *shape_table,
                                               workers > 1, guard)
                kernel_seconds += time.perf_counter() - tick
            if self.H is not None and i2 < cols:
                with timer.phase("gptq_update"):
                    W[:, i2:] -= torch.from_numpy(Err1).to(W.device).T @ Hinv[i1:i2, i2:]

        del W, Hinv  # the working copies: memory for the result
        with timer.phase("finish"):
            inv = np.argsort(p)
            group = (np.arange(cols) // blocksize if group_size else np.zeros(cols, np.int64))[inv]
            codes, reserved, codebooks = codes[inv], reserved[inv], codebooks[inv]
            levels, grids = levels[inv], grids[inv]
            col_idx, row_idx = np.nonzero(reserved)  # column-major order: columns ascending, rows sorted
            del reserved
            result = QuantizedWeight(
                shape=(rows, cols), method="uniform" if uniform else "codebook",
                bits=bits.astype(np.uint8), codes=np.ascontiguousarray(codes.T),
                column_codebooks=codebooks if grid else codebooks.astype(np.float16),
                codebook_levels=levels if grid else None, codebook_grid=grids.astype(np.float16) if grid else None,
                outlier_counts=np.bincount(col_idx, minlength=cols).astype(np.int64),
                outlier_rows=row_idx.astype(np.int64), outlier_values=Q[inv[col_idx], row_idx].astype(np.float16),
                scale=np.stack(scales[:1] if not group_size else scales).astype(np.float32) if uniform else None,
                zero=np.stack(zeros[:1] if not group_size else zeros).astype(np.float32) if uniform else None,
                group=group if uniform else None, loss=loss)
            if mode == numba_quant.MODE_SHAPES:
                result.column_codebooks = codebooks  # the entries as decoded (binary32)
                result.codebook_shapes = {b: np.asarray(v, np.float16) for b, v in shapes.items()}
                result.shape_index, result.shape_affine = levels[:, 0].copy(), grids.astype(np.float16)
                result.codebook_levels = result.codebook_grid = None
            original = self.W.cpu().numpy()
            difference = result.dequantize()
            difference -= original  # in place: one weight-sized temporary, not two
            result.relative_error = float(np.linalg.norm(difference) / max(np.linalg.norm(original), 1e-30))
        result.info = {"seconds": time.perf_counter() - start, "kernel_seconds": kernel_seconds}
        return result


def shape_tables(shapes: dict) -> tuple[np.ndarray, np.ndarray]:
    """gptq_block's (shapes [WIDTHS, S, 256] float64, shape_counts [WIDTHS]) from width -> [S, 2**width]."""
    most = max(len(v) for v in shapes.values())
    if most > 256 or any(np.asarray(v).shape[1:] != (1 << b,) for b, v in shapes.items()):
        raise ValueError("shapes: at most 256 of 2**width values each, for every width")
    table = np.zeros((numba_quant.WIDTHS, most, MAX_CODEBOOK))
    counts = np.zeros(numba_quant.WIDTHS, np.int64)
    for b, v in shapes.items():
        table[b, :len(v), :1 << b] = np.asarray(v, np.float16).astype(np.float64)
        counts[b] = len(v)
    return table, counts


def uniform_grid(W: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row asymmetric min-max grid (the reference GPTQ quantizer, perchannel, no groups)."""
    maxq = (1 << bits) - 1
    xmin = torch.clamp(W.min(dim=1).values, max=0)
    xmax = torch.clamp(W.max(dim=1).values, min=0)
    same = (xmin == 0) & (xmax == 0)
    xmin[same], xmax[same] = -1, 1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale.double().cpu().numpy(), zero.double().cpu().numpy()
