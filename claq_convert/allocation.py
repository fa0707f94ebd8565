"""Bits where they matter: a bit target per weight, chosen from measured losses under an exact byte budget.

For every weight and every candidate setting (one width, or two adjacent widths split by Outlier
Order as in adaptive precision) two numbers are known before any GPTQ runs:
- its bytes in the file, exactly (spec.claq_stored_bytes: codes, codebooks, bit-width map, padding);
- its loss, sum_j E_j * SSE_j(b_j): the least K-Means error of column j at its width b_j (exact up to
  4 bits from one DP per column, extrapolated above) weighted by E_j = sum over calibration tokens of x_j**2, the diagonal of the
  weight's Hessian. That is the output error ||(W - Q) X||^2 the column would cause without GPTQ's
  compensation, so columns the calibration text drives hard cost more to coarsen.
The settings that minimise the summed loss with the summed bytes within the budget are found by a
Lagrangian sweep (each weight independently minimises loss + lambda * bytes) followed by greedy
upgrades with the bytes left over. Pure functions: the caller measures energies and reads weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import kernels, spec
from .columns import column_bits, grid_codebooks, outlier_order

EXACT_BITS = 4   # SSE from the exact DP up to 16 clusters (cheap for every column)
MAX_BITS = 6     # beyond EXACT_BITS each bit is taken to divide the SSE by 4 (the high-rate rule):
                 # a 64-cluster DP on every column of a model costs minutes, this estimate nothing
FRACTIONS = (0.25, 0.5, 0.75)


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
               row_weights: Optional[np.ndarray] = None) -> list[Candidate]:
    """Every setting of one weight W[out, in] with its exact stored bytes and its estimated loss.

    `relative` divides the loss by the weight's output energy sum_j E_j ||W[:, j]||^2, so each weight's
    loss is its error relative to its signal. Absolute errors grow with the residual stream along the
    depth and starve the early layers (measured: 4.72 bpw absolute, +27% ppl on WikiText where the
    fixed rule loses 8%). With `fisher` (sensitivity.fisher_sums(...).columns) the loss is
    instead the model loss the errors are expected to add, sum_j fisher_j * SSE_j / 2 rows, one unit
    for every weight (energy and `relative` are then unused). `row_weights` (mean 1): the SSE is the
    weighted one the quantizer's K-Means minimizes (sensitivity.row_weights; then fisher_j / rows times
    the row's weight is the Fisher of entry ij under a rank-one model of it)."""
    rows = W.shape[0]
    weights = np.ones(rows) if row_weights is None else np.ascontiguousarray(row_weights, np.float64)
    exact = kernels.column_sse_by_width(np.ascontiguousarray(W.T, np.float32), EXACT_BITS, weights)
    sse = np.concatenate([exact, exact[:, -1:] * 4.0 ** -np.arange(1, MAX_BITS - EXACT_BITS + 1)], axis=1)
    order = outlier_order(W, S)
    cols = np.arange(W.shape[1])
    out = []
    for setting in SETTINGS:
        bits = column_bits(order, setting.target, setting.low, setting.high)
        loss = float(np.sum((energy if fisher is None else fisher / (2 * rows)) * sse[cols, bits - 1]))
        out.append(Candidate(setting, spec.claq_stored_bytes(rows, bits, 0, grid=grid_codebooks(codebook, bits)), loss))
    if relative and fisher is None:
        signal = float(np.sum(energy * np.sum(W.astype(np.float64) ** 2, axis=0)))
        out = [Candidate(c.setting, c.nbytes, c.loss / max(signal, 1e-300)) for c in out]
    return out


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

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget_bytes:  # find a price at which the budget holds
        lo, hi = hi, hi * 16
    if total(pick(lo)) <= budget_bytes:
        hi = lo
    for _ in range(100):  # the least price that keeps within the budget
        mid = 0.5 * (lo + hi)
        if total(pick(mid)) <= budget_bytes:
            hi = mid
        else:
            lo = mid
    choice = pick(hi)
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
