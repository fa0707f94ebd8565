"""Bits where they matter: a bit target per weight, chosen from measured losses under an exact byte budget.

For every weight and every candidate setting (one width, or two adjacent widths split by Outlier
Order as in adaptive precision) two numbers are known before any GPTQ runs:
- its bytes in the file (spec.claq_stored_bytes: codes, codebooks, bit-width map, padding), exactly but
  for coded grid levels (format v3) and coded code streams (v4), which depend on levels and codes GPTQ
  has not fitted yet: those are estimated from the weight's data-free codebooks (coded_level_bits,
  coded_code_bits, column unit), and budget.py holds the file to the budget once they are known;
- its loss, sum_j E_j * SSE_j(b_j): the least K-Means error of column j at its width b_j (exact up to
  4 bits from one DP per column, extrapolated above) weighted by E_j = sum over calibration tokens of x_j**2, the diagonal of the
  weight's Hessian. That is the output error ||(W - Q) X||^2 the column would cause without GPTQ's
  compensation, so columns the calibration text drives hard cost more to coarsen.
The settings that minimise the summed loss with the summed bytes within the budget are found by a
Lagrangian sweep (each weight independently minimises loss + lambda * bytes) followed by greedy
upgrades with the bytes left over. Pure functions: the caller measures energies and reads weights.

Per column (`column_losses`, `allocate_columns`): every column takes its own width, the one that
minimises its loss + lambda * its bytes (codes and codebook), instead of a weight-wide setting whose
extra bits go to the top columns by Outlier Order. On SmolLM2 at 4.47 bpw this lowers the summed
loss the allocation predicts by a fifth at the same bytes (734 -> 585). With outliers (--outlier-bits)
each weight's are fixed first by the paper's rule (columns.column_reserve) and their exact bytes paid
from the budget; the widths share the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..format import spec
from ..kernels import numba_quant
from .columns import GRID_MAX_BITS, column_bits, grid_codebooks, outlier_order

EXACT_BITS = 4   # SSE from the exact DP up to 16 clusters (cheap for every column)
MAX_BITS = 6     # beyond EXACT_BITS each bit is taken to divide the SSE by 4 (the high-rate rule):
                 # a 64-cluster DP on every column of a model costs minutes, this estimate nothing
FRACTIONS = (0.25, 0.5, 0.75)
MIN_COLUMN_BITS = 1  # the narrowest width a column allocation gives (3 measured the same at 4.47 bpw)
SAMPLE_COLUMNS = 16  # columns a weight's coded-level estimate fits (about 0.03 s a weight on 2 cores)
SAMPLE_ROWS = 4096   # about as many rows of each (a K-Means codebook of 2**5 entries needs far fewer)
# GPTQ's levels code to more bits than the data-free estimate: on SmolLM2 1.12x at 4.5 bpw (q/k_proj 1.06,
# the others 1.11-1.15), 1.17x at fixed 4 bits without row weights, 1.04x tuned at 3.5. Pricing them 1.25x leaves
# a little of the budget unspent (0.007 bpw at 4.5, measured) so that budget.py's narrowing, which has no GPTQ
# compensation (2,339 columns narrowed cost 5 points of ppl at 4.5 bpw with no margin), stays a guarantee.
LEVEL_MARGIN = 1.25
# GPTQ's codes are a little more even than the data-free ones, the more so the narrower: GPTQ's coded
# streams over the unweighted estimate on SmolLM2, at 2 / 3 / 4 / 5 bits, 1.037 / 1.029 / 1.017 / 1.001x
# (3.5 bpw v3 file), 1.038 / 1.030 / 1.017 / 1.001x (3.5 bpw v4), 1.045 / 1.043 / 1.017 / 1.006x (4.6 bpw v4
# with its 5-bit head). One margin of 1.03 left 1.9% of the 4.6 budget unspent (4.511 bpw); a margin per
# width a little above each measured ratio keeps budget.py's narrowing idle without wasting bytes.
CODE_MARGIN = np.array([1.0, 1.05, 1.045, 1.02] + [1.01] * 4)  # widths 1..8


@dataclass(frozen=True)
class Setting:
    """Columns at `low` bits, the top `fraction` by Outlier Order at `high` (= low when fraction is 0)."""
    low: int
    high: int
    fraction: float

    @property
    def target(self) -> float:
        return self.low + self.fraction * (self.high - self.low)

    def as_tuple(self) -> tuple[int, int, float]:
        return (self.low, self.high, self.fraction)


SETTINGS = tuple([Setting(b, b, 0.0) for b in range(1, MAX_BITS + 1)]
                 + [Setting(b, b + 1, f) for b in range(1, MAX_BITS) for f in FRACTIONS])


@dataclass(frozen=True)
class Candidate:
    setting: Setting
    nbytes: int
    loss: float


def candidates(W: np.ndarray, energy: np.ndarray, S: float = 13.0, relative: bool = True,
               codebook: str = "auto", fisher: Optional[np.ndarray] = None,
               row_weights: Optional[np.ndarray] = None, level_bits: Optional[np.ndarray] = None,
               code_bits: Optional[np.ndarray] = None) -> list[Candidate]:
    """Every setting of one weight W[out, in] with its stored bytes and its estimated loss. The bytes are
    exact but for coded grid levels and code streams, estimated from `level_bits` (coded_level_bits) and
    `code_bits` (coded_code_bits) where given, as the column unit does (without them: u8 levels and
    fixed-width codes, upper bounds).

    `relative` divides the loss by the weight's output energy sum_j E_j ||W[:, j]||^2, so each weight's
    loss is its error relative to its signal. Absolute errors grow with the residual stream along the
    depth and starve the early layers (measured: 4.72 bpw absolute, +27% ppl on WikiText where the
    fixed rule loses 8%). With `fisher` (sensitivity.fisher_sums(...).columns) the loss is
    instead the model loss the errors are expected to add, sum_j fisher_j * SSE_j / 2 rows, one unit
    for every weight (energy and `relative` are then unused). `row_weights` (mean 1): the SSE is the
    weighted one the quantizer's K-Means minimizes (sensitivity.row_weights; then fisher_j / rows times
    the row's weight is the Fisher of entry ij under a rank-one model of it)."""
    rows = W.shape[0]
    losses = column_losses(W, energy, relative, fisher, row_weights)
    order = outlier_order(W, S)
    cols = np.arange(W.shape[1])
    out = []
    for setting in SETTINGS:
        bits = column_bits(order, setting.target, setting.low, setting.high)
        loss = float(np.sum(losses[cols, bits - 1]))
        out.append(Candidate(setting, stored_estimate(rows, bits, (0, 0), codebook, level_bits, code_bits), loss))
    return out


def column_losses(W: np.ndarray, energy: Optional[np.ndarray], relative: bool = True,
                  fisher: Optional[np.ndarray] = None, row_weights: Optional[np.ndarray] = None) -> np.ndarray:
    """[in, MAX_BITS]: the loss of each column of W at widths 1..MAX_BITS, as `candidates` sums it."""
    rows = W.shape[0]
    weights = np.ones(rows) if row_weights is None else np.ascontiguousarray(row_weights, np.float64)
    exact = numba_quant.column_sse_by_width(np.ascontiguousarray(W.T, np.float32), EXACT_BITS, weights)
    sse = np.concatenate([exact, exact[:, -1:] * 4.0 ** -np.arange(1, MAX_BITS - EXACT_BITS + 1)], axis=1)
    losses = (energy if fisher is None else fisher / (2 * rows))[:, None] * sse
    if relative and fisher is None:
        losses /= max(float(np.sum(energy * np.sum(W.astype(np.float64) ** 2, axis=0))), 1e-300)
    return losses


def column_bytes(rows: int, max_bits: int, grid: bool, level_bits: Optional[np.ndarray] = None,
                 code_bits: Optional[np.ndarray] = None) -> np.ndarray:
    """[max_bits]: bytes a column adds at widths 1..max_bits: its codes (fixed-width, or with `code_bits`
    ([max_bits], coded_code_bits) their estimated coded bits) and its codebook (grid: its fp16
    offset and step, and a u8 level per entry, or with `level_bits` ([max_bits], coded_level_bits) the
    estimated coded levels; else fp16 entries). Padding, chunk offsets, length tables and the width map,
    a byte a column whatever its width, are left to the exact count."""
    widths = np.arange(1, max_bits + 1)
    codes = rows * (widths if code_bits is None else CODE_MARGIN[:max_bits] * np.asarray(code_bits[:max_bits], np.float64)) / 8
    if not grid:
        return codes + 2 * 2.0 ** widths
    levels = 2.0 ** widths if level_bits is None else LEVEL_MARGIN * np.asarray(level_bits[:max_bits], np.float64) / 8
    return codes + 4 + levels


def coded_level_bits(W: np.ndarray, max_bits: int, sample: int = SAMPLE_COLUMNS,
                     widths: Optional[list[int]] = None, row_weights: Optional[np.ndarray] = None) -> np.ndarray:
    """[max_bits]: the estimated bits of one column's coded levels (format v3) at widths 1..max_bits (or
    only at `widths`, the others left 0): the data-free grid codebooks of `sample` evenly spread columns of W
    (every SAMPLE_ROWS-th row or so of a tall one, as an embedding), coded as the writer codes a weight of
    such columns (rice.encode_levels), less the table. 1-bit columns store no level. GPTQ's levels code to
    more (LEVEL_MARGIN); the budget's final count (budget.py) makes up any difference."""
    from ..format.rice import encode_levels

    picked = np.unique(np.linspace(0, W.shape[1] - 1, min(sample, W.shape[1])).round().astype(np.int64))
    stride = -(-W.shape[0] // SAMPLE_ROWS)
    Wt = np.ascontiguousarray(W[::stride, picked].T, np.float32)
    weights = np.ones(W.shape[0]) if row_weights is None else np.asarray(row_weights, np.float64)
    weights = np.ascontiguousarray(weights[::stride])
    out = np.zeros(max_bits)
    for b in (range(2, max_bits + 1) if widths is None else [w for w in widths if 2 <= w <= max_bits]):
        levels = np.empty((picked.size, 1 << b), np.uint8)
        numba_quant.data_free_levels(Wt, b, weights, levels)
        same = np.full(picked.size, b, np.int64)
        stream = encode_levels(levels.ravel(), same)
        out[b - 1] = 8.0 * (stream.size - spec.rice_table_bytes(same)) / picked.size
    return out


def coded_code_bits(W: np.ndarray, max_bits: int, sample: int = SAMPLE_COLUMNS) -> np.ndarray:
    """[max_bits]: the estimated bits a code of W takes at widths 1..max_bits once its stream is coded
    (format v4): the codes of `sample` evenly spread columns under their data-free grid codebooks, pooled
    per width, under the 12-bit-limited Huffman code the writer would build (huffman.limited_lengths), and
    at most the width (the writer keeps a stream fixed-width where coding it is not shorter). Unweighted
    K-Means, though the quantizer weighs rows: the row-weighted estimate came out above what GPTQ's codes
    took (a 3.5 bpw file spent 3.434), the unweighted one below it by 0.1 to 4.5% a width (CODE_MARGIN)."""
    from ..format.huffman import coded_bits, limited_lengths

    picked = np.unique(np.linspace(0, W.shape[1] - 1, min(sample, W.shape[1])).round().astype(np.int64))
    stride = -(-W.shape[0] // SAMPLE_ROWS)
    Wt = np.ascontiguousarray(W[::stride, picked].T, np.float32)
    weights = np.ones(Wt.shape[1])
    out = np.arange(1, max_bits + 1, dtype=np.float64)
    for b in range(2, max_bits + 1):
        counts = np.empty((picked.size, 1 << b), np.int64)
        numba_quant.data_free_code_counts(Wt, b, weights, counts)
        pooled = counts.sum(axis=0)
        out[b - 1] = min(b, coded_bits(pooled, limited_lengths(pooled)) / pooled.sum())
    return out


def coded_codes_bytes(rows: int, bit_widths: np.ndarray, code_bits: Optional[np.ndarray],
                      margin: np.ndarray = CODE_MARGIN) -> Optional[dict[int, int]]:
    """width -> the priced length of its huffman_<b> section (chunk offsets, lengths, the estimated bits a
    code times the width's `margin`) where that is shorter than codes_<b>, as the writer chooses; None: no estimate."""
    if code_bits is None:
        return None
    bits = np.asarray(bit_widths, np.int64)
    out = {}
    for b in np.unique(bits).tolist():
        n = rows * int(np.count_nonzero(bits == b))
        coded = spec.huffman_prefix_bytes(n, b) + int(np.ceil(margin[b - 1] * code_bits[b - 1] * n / 8))
        if coded < 4 * spec.code_words(n, b):
            out[b] = coded
    return out


def coded_levels_bytes(bit_widths: np.ndarray, level_bits: Optional[np.ndarray],
                       margin: float = LEVEL_MARGIN) -> Optional[int]:
    """The priced length of a grid weight's codebook_rice section (its table, its two bit streams) for
    these widths, the estimated bits times `margin`, or None where the writer would keep u8 levels (no
    estimate, or not shorter)."""
    if level_bits is None:
        return None
    bits = np.asarray(bit_widths, np.int64)
    coded = spec.rice_table_bytes(bits) + int(np.ceil(margin * np.sum(level_bits[bits - 1]) / 8)) + 2
    return coded if coded < int(spec.codebook_offsets(bits)[-1]) and np.any(bits >= 2) else None


def allocate_columns(tables: dict[str, np.ndarray], rows: dict[str, int], budget_bytes: int,
                     codebook: str = "auto", outliers: Optional[dict[str, tuple[int, int]]] = None,
                     level_bits: Optional[dict[str, np.ndarray]] = None,
                     code_bits: Optional[dict[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
    """Widths per column (name -> int64 [in]) minimising the summed loss with the stored bytes
    (spec.claq_stored_bytes) within budget_bytes. tables: name -> column_losses. Widths stop where grid
    codebooks do (GRID_MAX_BITS) unless codebook is "f16", so every weight keeps its cheap codebooks.
    outliers: name -> (outliers kept, the most in one column), fixed beforehand and paid from the budget.
    level_bits: name -> coded_level_bits; grid levels are then priced as coded (an estimate: budget.py
    holds the file to the budget), else as u8 bytes (an upper bound). code_bits: name -> coded_code_bits;
    code streams are then priced as coded (format v4; an estimate too), else as fixed-width words."""
    outliers = outliers or {}
    level_bits = level_bits or {}
    code_bits = code_bits or {}
    grid = codebook != "f16"
    max_bits = GRID_MAX_BITS if grid else MAX_BITS
    prices = {name: column_bytes(rows[name], max_bits, grid, level_bits.get(name), code_bits.get(name))
              for name in tables}
    low = MIN_COLUMN_BITS

    def pick(lam: float) -> dict[str, np.ndarray]:
        return {name: np.argmin(L[:, low - 1:max_bits] + lam * prices[name][None, low - 1:], axis=1).astype(np.int64)
                + low for name, L in tables.items()}

    def total(choice) -> int:
        return sum(stored_estimate(rows[name], bits, outliers.get(name, (0, 0)), codebook, level_bits.get(name),
                                   code_bits.get(name)) for name, bits in choice.items())

    floor = total({name: np.full(L.shape[0], low, np.int64) for name, L in tables.items()})
    if floor > budget_bytes:
        raise ValueError(f"the budget ({budget_bytes} bytes) is below the smallest setting ({floor} bytes); "
                         "raise --bpw")
    return pick(_least_price(lambda lam: total(pick(lam)), budget_bytes, 60))


def stored_estimate(rows: int, bits: np.ndarray, outliers: tuple[int, int], codebook: str,
                    level_bits: Optional[np.ndarray] = None, code_bits: Optional[np.ndarray] = None) -> int:
    """A weight's bytes in the file at these column widths: exact but for coded levels and codes (estimates)."""
    grid = grid_codebooks(codebook, bits)
    return spec.claq_stored_bytes(rows, bits, *outliers, grid=grid,
                                  coded_levels=coded_levels_bytes(bits, level_bits) if grid else None,
                                  coded_codes=coded_codes_bytes(rows, bits, code_bits))


def _least_price(bytes_at, budget_bytes: int, steps: int) -> float:
    """The least price per byte (to `steps` bisections) at which bytes_at(price), which does not grow with
    the price, fits the budget."""
    lo, hi = 0.0, 1.0
    while bytes_at(hi) > budget_bytes:  # find a price at which the budget holds
        lo, hi = hi, hi * 16
    if bytes_at(lo) <= budget_bytes:
        return lo
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if bytes_at(mid) <= budget_bytes:
            hi = mid
        else:
            lo = mid
    return hi


def allocate(tables: dict[str, list[Candidate]], budget_bytes: int) -> dict[str, Candidate]:
    """The candidate per weight minimising the total loss with total bytes <= budget_bytes."""
    floor = sum(min(c.nbytes for c in table) for table in tables.values())
    if floor > budget_bytes:
        raise ValueError(f"the budget ({budget_bytes} bytes) is below the smallest setting ({floor} bytes); "
                         "raise --bpw")

    def pick(lam: float) -> dict[str, Candidate]:
        return {name: min(table, key=lambda c: (c.loss + lam * c.nbytes, c.nbytes)) for name, table in tables.items()}

    def total(choice) -> int:
        return sum(c.nbytes for c in choice.values())

    choice = pick(_least_price(lambda lam: total(pick(lam)), budget_bytes, 100))
    left = budget_bytes - total(choice)
    while True:  # spend what is left on the upgrades with the most loss saved per byte
        best, best_gain = None, 0.0
        for name, table in tables.items():
            current = choice[name]
            for c in table:
                extra = c.nbytes - current.nbytes
                if 0 < extra <= left and c.loss < current.loss:
                    gain = (current.loss - c.loss) / extra
                    if gain > best_gain:
                        best, best_gain = (name, c), gain
        if best is None:
            return choice
        left -= best[1].nbytes - choice[best[0]].nbytes
        choice[best[0]] = best[1]
