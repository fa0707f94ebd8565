"""The --bpw budget held exactly: the quantized tensors' bytes in the file, counted after quantization.

The allocation prices coded levels (format v3) by an estimate made before GPTQ fits them
(allocation.coded_level_bits), and tuning moves levels after GPTQ, so the quantized tensors can come out a
little over the budget. Then the columns whose narrowing adds the least relative error per byte saved lose
one bit: each pair of adjacent codebook entries merges into its count-weighted mean and the codes halve
(tuning.retuned stores the merged entries as the weight stores its codebooks). The count is repeated on the
encoded bytes until they fit, so `--bpw` stays "at most".
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, MutableMapping, Optional

import numpy as np

from ..progress import Progress, no_progress
from .gptq import QuantizedWeight
from .tuning import MAX_ENTRIES, retuned

APPROX_LEVEL_BYTES = 0.6  # coded bytes per level, only to rank columns: every count that decides is exact


def narrowable(result: QuantizedWeight) -> bool:
    """Codebook weights with per-column entries (fp16 or grid) can lose a bit a column; shared shapes and
    uniform baselines cannot."""
    return result.method == "codebook" and result.codebook_shapes is None


COUNT_BLOCK = 1 << 20  # codes counted at a time: the (column, code) indices are int64, 8 bytes a code


def code_counts(codes: np.ndarray) -> np.ndarray:
    """float64 [cols, MAX_ENTRIES]: how many rows of each column use each code (codes [rows, cols]),
    counted COUNT_BLOCK codes at a time (a whole head at once took 16 bytes a code)."""
    rows, cols = codes.shape
    counts = np.empty((cols, MAX_ENTRIES), np.float64)
    step = max(1, COUNT_BLOCK // max(rows, 1))
    for first in range(0, cols, step):
        part = codes[:, first:first + step]
        n = part.shape[1]
        flat = (np.arange(n)[None, :] * MAX_ENTRIES + part.astype(np.int64)).ravel()
        counts[first:first + n] = np.bincount(flat, minlength=n * MAX_ENTRIES).reshape(n, MAX_ENTRIES)
    return counts


def narrowing_costs(result: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(columns of 2 bits or more, the relative squared error narrowing each adds, the bytes it saves about).

    Merging entries a and b, used by n_a and n_b rows, into their mean adds n_a n_b / (n_a + n_b) (a - b)^2;
    the sum over a column's pairs is divided by the weight's decoded energy sum_c n_c e_c^2."""
    rows = result.shape[0]
    bits = result.bits.astype(np.int64)
    counts = code_counts(result.codes)
    entries = result.column_codebooks.astype(np.float64)
    energy = max(float(np.sum(counts * entries ** 2)), 1e-300)
    na, nb = counts[:, 0::2], counts[:, 1::2]
    pair_cost = np.where(na + nb > 0, na * nb / np.maximum(na + nb, 1) * (entries[:, 0::2] - entries[:, 1::2]) ** 2, 0)
    pairs_used = np.arange(MAX_ENTRIES // 2)[None, :] < (1 << np.maximum(bits - 1, 0))[:, None]
    cost = np.sum(np.where(pairs_used, pair_cost, 0.0), axis=1) / energy
    columns = np.flatnonzero(bits >= 2)
    saved = rows / 8 + APPROX_LEVEL_BYTES * 2.0 ** (bits[columns] - 1)
    return columns, cost[columns], saved


def narrowed(result: QuantizedWeight, columns: np.ndarray) -> QuantizedWeight:
    """`result` with each of `columns` (2 bits or more) one bit narrower: adjacent entry pairs merged."""
    columns = np.asarray(columns, np.int64)
    bits = result.bits.copy()
    bits[columns] -= 1
    codes = result.codes.copy()
    old = codes[:, columns]  # uint8: no int64 array per code
    k = MAX_ENTRIES
    counts = code_counts(old)
    entries = result.column_codebooks.astype(np.float64).copy()
    a, b = entries[columns, 0::2], entries[columns, 1::2]
    na, nb = counts[:, 0::2], counts[:, 1::2]
    merged = np.where(na + nb > 0, (na * a + nb * b) / np.maximum(na + nb, 1), 0.5 * (a + b))
    entries[columns, :k // 2] = merged
    entries[columns, k // 2:] = 0.0
    codes[:, columns] = old >> 1
    info = {**result.info, "narrowed_columns": result.info.get("narrowed_columns", 0) + int(columns.size)}
    return retuned(replace(result, bits=bits, codes=codes, info=info), entries)


def within_budget(results: MutableMapping[str, QuantizedWeight], budget_bytes: int, stored_bytes: Callable,
                  log: Optional[Callable[[str], None]] = None, progress: Progress = no_progress,
                  ) -> tuple[MutableMapping[str, QuantizedWeight], dict]:
    """(`results`, narrowed in place until their stored bytes, summed, are at most budget_bytes; a record).
    stored_bytes: result -> its exact bytes in the file (convert.stored_bytes).

    Each weight is read once to count and rank it, and again only if it is narrowed; between reads only
    its byte count and its columns' ranks (24 bytes a column) are kept. So `results` may read each weight
    from disk when asked (checkpoint.SavedResults): a whole model's results are never in memory at once.
    """
    sizes, ranks = {}, {}
    for name in progress(list(results), "count the budget", len(results)):
        result = results[name]
        sizes[name] = stored_bytes(result)
        if narrowable(result):
            ranks[name] = narrowing_costs(result)
        del result  # before the next one is read
    first, narrowed_total = sum(sizes.values()), 0
    while sum(sizes.values()) > budget_bytes:
        excess = sum(sizes.values()) - budget_bytes
        found = list(ranks.items())
        names = np.concatenate([np.full(c.size, i) for i, (_, (c, _, _)) in enumerate(found)] or [np.zeros(0, int)])
        columns = np.concatenate([c for _, (c, _, _) in found] or [np.zeros(0, int)]).astype(np.int64)
        cost = np.concatenate([x for _, (_, x, _) in found] or [np.zeros(0)])
        saved = np.concatenate([s for _, (_, _, s) in found] or [np.zeros(0)])
        if columns.size == 0:
            raise ValueError(f"the quantized tensors take {excess} bytes more than the budget and no column can "
                             "be narrowed; raise --bpw")
        order = np.argsort(cost / saved, kind="stable")
        take = order[:int(np.searchsorted(np.cumsum(saved[order]), excess)) + 1]
        for i in np.unique(names[take]):
            name = found[i][0]
            result = narrowed(results[name], columns[take[names[take] == i]])
            results[name] = result
            sizes[name], ranks[name] = stored_bytes(result), narrowing_costs(result)
            del result
        narrowed_total += int(take.size)
    record = {"budget_bytes": int(budget_bytes), "quantized_bytes_before": int(first),
              "quantized_bytes": int(sum(sizes.values())), "narrowed_columns": narrowed_total}
    if log is not None and narrowed_total:
        log(f"budget: {first - budget_bytes} bytes over after quantization; {narrowed_total} columns narrowed "
            f"by a bit to fit")
    return results, record
