"""Column-level decisions of CLAQ for one weight W[out, in]: Outlier Order, bit widths, outlier budget.

Column j is W[:, j]. Everything here is computed from the original weight, before GPTQ touches it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..format import spec


MAX_RESERVE = spec.U8_COUNT_MAX  # outliers per column, so the per-column counts fit in one byte
CODEBOOKS = ("auto", "grid", "f16")
# u8 levels on a per-column fp16 grid cost 2**b + 4 bytes a column instead of 2 * 2**b, and add to a
# column's K-Means SSE 0.1% at 3 bits, 0.5-0.7% at 4, 3% at 5, 14-18% at 6 (SmolLM2 q/k/down_proj): up to 5
# bits the bytes saved are worth far more; 6 bits and up keep fp16 entries.
GRID_MAX_BITS = 5


def grid_codebooks(codebook: str, bits: np.ndarray) -> bool:
    """Whether a weight with these column widths stores grid codebooks (u8 levels) under --codebook."""
    if codebook not in CODEBOOKS:
        raise ValueError(f"unknown codebook storage {codebook!r}; choose one of {', '.join(CODEBOOKS)}")
    return codebook == "grid" or (codebook == "auto" and int(np.max(bits)) <= GRID_MAX_BITS)


def outlier_cost_bits(rows: int, cols: int) -> tuple[int, int]:
    """(bits per reserved outlier, fixed bits of the weight's per-column outlier counts), as stored."""
    per_outlier = 8 * (spec.DTYPES[spec.outlier_row_dtype(rows)].itemsize + spec.DTYPES["F16"].itemsize)
    return per_outlier, 8 * spec.DTYPES[spec.outlier_count_dtype(MAX_RESERVE)].itemsize * cols


def outlier_counts(W: np.ndarray, S: float) -> np.ndarray:
    """N_j = #{i : |W_ij| >= S * mean|W|}, the mean over the whole matrix."""
    A = np.abs(W)
    return (A >= S * A.mean()).sum(axis=0).astype(np.int64)


def outlier_order(W: np.ndarray, S: float) -> np.ndarray:
    """Column indices, most outlier-heavy first.

    Ties (with S = 13 most columns have N_j = 0) are broken by the column's largest |W_ij|, larger
    first, then by the lower column index, so the ranking is reproducible and still meaningful.
    """
    counts = outlier_counts(W, S)
    peak = np.abs(W).max(axis=0)
    return np.lexsort((np.arange(W.shape[1]), -peak, -counts))


def split_bits(target: float, low: Optional[int] = None, high: Optional[int] = None) -> tuple[int, int, float]:
    """(low, high, fraction of columns at high) for a fractional bit target.

    Without an explicit pair, the paper's rule: T < 3 mixes 2 and 4 bits (top (T-2)/2 of columns at 4),
    3 <= T < 4 mixes 3 and 4 (top T-3 at 4); above 4 (not in the paper), the two widths around T.
    An integer target gives one width.
    """
    if low is None or high is None:
        if float(target).is_integer():
            return int(target), int(target), 0.0
        if not 2.0 < target < 8.0:
            raise ValueError(f"fractional bit target {target} must lie in (2, 8); or give --ap-bits LOW,HIGH")
        low, high = (2, 4) if target < 3 else (3, 4) if target < 4 else (int(target), int(target) + 1)
    if not (1 <= low <= high <= 8):
        raise ValueError(f"bit widths {low},{high} must satisfy 1 <= low <= high <= 8")
    if not low <= target <= high:
        raise ValueError(f"bit target {target} must lie between {low} and {high}")
    fraction = 0.0 if high == low else (target - low) / (high - low)
    return low, high, fraction


def column_bits(order: np.ndarray, target: float, low: Optional[int] = None, high: Optional[int] = None) -> np.ndarray:
    """Per-column bit widths: the top-ranked round(fraction * in) columns get `high`, the rest `low`."""
    low, high, fraction = split_bits(target, low, high)
    bits = np.full(order.shape[0], low, np.int64)
    bits[order[: int(round(fraction * order.shape[0]))]] = high
    return bits


def column_reserve(order: np.ndarray, rows: int, extra_bits: float, top_fraction: float = 0.1,
                   top_share: float = 0.5) -> np.ndarray:
    """Outliers kept in fp16 per column, spending `extra_bits` per weight by Outlier Order.

    The budget pays first for the per-column counts, then for outliers at their stored cost (fp16 value and
    row index), so the extra bits are what the file really spends. The top-ranked
    `top_fraction` of columns share `top_share` of it, the other columns the rest; within each tier
    the count is even, the remainder going to the higher-ranked columns. No column keeps more than
    half its rows, nor more than MAX_RESERVE.
    """
    cols = order.shape[0]
    reserve = np.zeros(cols, np.int64)
    per_outlier, table = outlier_cost_bits(rows, cols)
    total = int(math.floor((extra_bits * rows * cols - table) / per_outlier))
    if total <= 0:
        return reserve
    n_top = min(cols, max(1, int(round(top_fraction * cols))))
    tiers = [(order[:n_top], int(round(top_share * total)))]
    tiers.append((order[n_top:], total - tiers[0][1]))
    cap = min(rows // 2, MAX_RESERVE)
    for members, budget in tiers:
        if members.shape[0] == 0:
            continue
        each, extra = divmod(budget, members.shape[0])
        counts = np.full(members.shape[0], each, np.int64)
        counts[:extra] += 1
        reserve[members] = np.minimum(counts, cap)
    return reserve


def column_ranking(W: np.ndarray, S: float = 13.0, ranking: str = "outlier", seed: int = 0) -> np.ndarray:
    """Columns most deserving first: CLAQ's Outlier Order, or ("random", seeded) the ablation that spends
    the same bits on arbitrary columns, to measure what the ordering itself is worth."""
    if ranking == "outlier":
        return outlier_order(W, S)
    if ranking == "random":
        return np.random.default_rng(seed).permutation(W.shape[1])
    raise ValueError(f"unknown column ranking {ranking!r}; use outlier or random")


@dataclass(frozen=True)
class ColumnPlan:
    """What the quantizer does with each column (indexed by original column)."""
    bits: np.ndarray        # int64 [in]
    reserve: np.ndarray     # int64 [in], outliers kept in fp16
    order: np.ndarray       # Outlier Order ranking, most outlier-heavy first
    counts: np.ndarray      # N_j


def plan_columns(W: np.ndarray, target: float, extra_bits: float = 0.0, S: float = 13.0,
                 ap_bits: Optional[tuple[int, int]] = None, top_fraction: float = 0.1,
                 top_share: float = 0.5, ranking: str = "outlier", seed: int = 0) -> ColumnPlan:
    """The paper's fixed rule for one weight: widths and outliers by column_ranking."""
    order = column_ranking(W, S, ranking, seed)
    low, high = ap_bits if ap_bits else (None, None)
    return ColumnPlan(bits=column_bits(order, target, low, high),
                      reserve=column_reserve(order, W.shape[0], extra_bits, top_fraction, top_share),
                      order=order, counts=outlier_counts(W, S))
