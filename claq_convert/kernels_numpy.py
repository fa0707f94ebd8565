"""NumPy twin of `kernels.py` and `kernels_decode.py`: the same algorithms, plainly written, for the
tests to compare against.

Slow (a Python loop per column and per iteration); never used on the conversion or runtime path.
"""
from __future__ import annotations

import numpy as np

from .kernels import GRID_TOP, MODE_GRID, MODE_UNIFORM
from .spec import unpack_codes


def round_fp16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def kmeans_sorted(xs: np.ndarray, k: int, max_iter: int, weights=None) -> np.ndarray:
    n = xs.shape[0]
    if n == 0:
        return np.zeros(k)
    u = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(u * xs, dtype=np.float64)])
    prefix_w = np.concatenate([[0.0], np.cumsum(u)])
    centroids = xs[np.minimum(n - 1, ((2 * np.arange(k) + 1) * n) // (2 * k))].astype(np.float64)
    bounds = np.zeros(k + 1, np.int64)
    bounds[k] = n
    for _ in range(max_iter):
        new = bounds.copy()
        new[1:k] = np.searchsorted(xs, 0.5 * (centroids[:-1] + centroids[1:]), side="right")
        changed = not np.array_equal(new, bounds)
        bounds = new
        sizes = prefix_w[bounds[1:]] - prefix_w[bounds[:-1]]
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        nonempty = bounds[1:] > bounds[:-1]
        centroids[nonempty] = sums[nonempty] / sizes[nonempty]
        if not changed:
            break
    return centroids


def kmeans_optimal_sorted(xs: np.ndarray, k: int, weights=None) -> np.ndarray:
    """The exact (weighted) optimum by the plain O(k n^2) dynamic programme (no divide and conquer)."""
    n = xs.shape[0]
    if n == 0:
        return np.zeros(k)
    if n <= k:
        return xs[np.minimum(np.arange(k), n - 1)].astype(np.float64)
    u = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    x = xs.astype(np.float64)
    N = np.concatenate([[0.0], np.cumsum(u)])
    P = np.concatenate([[0.0], np.cumsum(u * x)])
    S = np.concatenate([[0.0], np.cumsum(u * x * x)])

    def cost(i, j):  # i: array of starts, j: one end
        s = P[j] - P[i]
        return np.maximum(S[j] - S[i] - s * s / (N[j] - N[i]), 0.0)

    D = np.array([cost(np.array([0]), j)[0] if j else 0.0 for j in range(n + 1)])
    split = np.zeros((k, n + 1), np.int64)
    for m in range(1, k):
        new = D.copy()
        for j in range(m + 1, n + 1):
            i = np.arange(m, j)
            v = D[i] + cost(i, j)
            split[m, j] = i[np.argmin(v)]  # first minimum: ties to the smaller split
            new[j] = v.min()
        D = new
    centroids = np.empty(k)
    j = n
    for m in range(k - 1, 0, -1):
        i = split[m, j]
        centroids[m] = (P[j] - P[i]) / (N[j] - N[i])
        j = i
    centroids[0] = P[j] / N[j]
    return centroids


def column_sse_by_width(Wt: np.ndarray, max_bits: int, weights=None) -> np.ndarray:
    """Least (weighted) SSE of every column (a row of Wt) at widths 1..max_bits, one plain DP per column and width."""
    u = np.ones(Wt.shape[1]) if weights is None else np.asarray(weights, np.float64)
    out = np.zeros((Wt.shape[0], max_bits))
    for j, column in enumerate(Wt):
        order = np.argsort(column, kind="stable")
        xs, us = column[order].astype(np.float64), u[order]
        for b in range(1, max_bits + 1):
            if xs.size > (1 << b):
                c = kmeans_optimal_sorted(xs, 1 << b, us)
                out[j, b - 1] = np.sum(us * np.min((xs[:, None] - c[None, :]) ** 2, axis=1))
    return out


def nearest_code(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    mids = 0.5 * (codebook[:-1] + codebook[1:])
    return np.searchsorted(mids, x, side="left")


def fp16_at_least(x: float) -> float:
    r = float(np.float16(x))
    return r if r >= x else float(np.nextafter(np.float16(r), np.float16(np.inf)))


def grid_codebook(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels, (offset, step), float32 entries) like the Numba kernel."""
    offset = float(round_fp16(np.float64(centroids[0])))
    span = float(centroids[-1]) - offset
    step = fp16_at_least(span / GRID_TOP) if span > 0 else 0.0
    levels = np.clip(np.round((centroids - offset) / step), 0, GRID_TOP) if step > 0 else np.zeros(centroids.size)
    values = np.float32(offset) + np.float32(step) * levels.astype(np.float32)
    return levels.astype(np.uint8), np.array([offset, step]), values.astype(np.float64)


def quantize_column_codebook(w, bits, n_reserve, fit_all, max_iter, grid=False, weights=None):
    """Returns (codebook, codes, reserved, q, levels, (offset, step)) like the Numba kernel."""
    n = w.shape[0]
    order = np.argsort(w, kind="stable")
    xs = w[order].astype(np.float64)
    lo, hi = 0, n
    for _ in range(min(n_reserve, n)):
        if abs(xs[lo]) > abs(xs[hi - 1]):
            lo += 1
        else:
            hi -= 1
    a, b = (0, n) if fit_all else (lo, hi)
    u = None if weights is None else np.asarray(weights, np.float64)[order[a:b]]
    fit = (kmeans_sorted(xs[a:b], 1 << bits, max_iter, u) if max_iter > 0
           else kmeans_optimal_sorted(xs[a:b], 1 << bits, u))
    levels, offset_step = np.zeros(1 << bits, np.uint8), np.zeros(2)
    if grid:
        levels, offset_step, codebook = grid_codebook(fit)
    else:
        codebook = np.sort(round_fp16(fit))
    codes = nearest_code(w, codebook)
    q = codebook[codes]
    reserved = np.zeros(n, np.uint8)
    tails = order[np.r_[0:lo, hi:n]]
    reserved[tails] = 1
    q[tails] = round_fp16(w[tails])
    return codebook, codes.astype(np.uint8), reserved, q, levels, offset_step


def gptq_block(W1, Hinv1, weights, mode, bits, n_reserve, fit_all, max_iter, scale, zero,
               codebooks, codes, reserved, Q1, Err1, levels, grids, parallel=False):
    """Twin of kernels.gptq_block (`parallel` changes nothing there either: the twin has no threads)."""
    cnt, rows = W1.shape
    loss = 0.0
    for i in range(cnt):
        w = W1[i].astype(np.float64)
        d = float(Hinv1[i, i])
        if mode != MODE_UNIFORM:
            cb, codes[i], reserved[i], q, lv, grids[i] = quantize_column_codebook(
                w, int(bits[i]), int(n_reserve[i]), fit_all, max_iter, mode == MODE_GRID, weights)
            codebooks[i, : cb.shape[0]] = cb
            levels[i, : lv.shape[0]] = lv
        else:
            maxq = float((1 << int(bits[i])) - 1)
            level = np.clip(np.round(w / scale) + zero, 0.0, maxq)
            codes[i] = level.astype(np.uint8)
            q = scale * (level - zero)
            reserved[i] = 0
        Q1[i] = q
        Err1[i] = (w - q) / d
        loss += float(np.sum((w - q) ** 2 / d ** 2 / 2.0))
        for j in range(i + 1, cnt):
            h = Hinv1[i, j]
            if h != 0.0:
                W1[j] -= Err1[i] * h
    return loss


def decode_stream(words: np.ndarray, bits: int, tables: np.ndarray, columns: np.ndarray, rows: int,
                  out_t: np.ndarray, first: int = 0) -> None:
    """Twin of kernels_decode.decode_stream: unpack every code of the stream, look each column's up."""
    n = columns.size
    codes = unpack_codes(np.asarray(words).view(np.uint32), bits, (first + n) * rows)[first * rows:]
    out_t[columns] = np.take_along_axis(tables, codes.reshape(n, rows).astype(np.int64), axis=1)


def product_stream(words: np.ndarray, bits: int, tables: np.ndarray, columns: np.ndarray, rows: int,
                   x: np.ndarray, y: np.ndarray, parts: int = 1) -> None:
    """Twin of kernels_decode.product_stream: the decoded stream as a matrix, times x (float64 sums)."""
    values = np.empty((columns.size, rows), np.float32)
    decode_stream(words, bits, tables, np.arange(columns.size), rows, values)
    y += (x[:, columns].astype(np.float64) @ values.astype(np.float64)).astype(np.float32)
