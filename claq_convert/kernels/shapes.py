"""Shared codebook shapes: a column's 2**b entries as offset + scale * one of a weight's few shapes.

A per-column K-Means codebook costs 2**b entries a column (format v2: u8 levels plus an fp16 offset and
step, 160 bits at 4 bits, 0.23 bpw of SmolLM2's block linears). A weight's columns differ mostly in
location and spread, so they can share a few normalized codebooks ("shapes"): a column then needs a
shape index and an fp16 offset and scale (40 bits), and the weight a table of S x 2**b fp16 values.
tools/bench_codebook.py measures what that costs in K-Means error. These are the fitting kernels
(Numba; plain twins in kernels_numpy, compared by the tests):

- fit_shape: weighted Lloyd's iterations with the entries held to offset + scale * shape (scale >= 0):
  each step finds the segment boundaries of the ascending column by binary search, then solves the two
  parameters by weighted least squares from prefix sums, O(k log n) a step, as kernels.kmeans_sorted.
- shaped_codebook: a column's best shape, its offset and scale rounded to fp16, the entries as a
  decoder computes them (the product of two fp16 values is exact in binary32, so one rounding).
- learn_shapes: a weight's shapes from its columns: K-Means over their exact K-Means codebooks,
  normalized, then rounds of least-squares refits of every shape on the columns that chose it.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .numba_quant import kmeans_optimal_weighted, round_fp16, weighted_prefix_sums

FIT_ITERATIONS = 12   # Lloyd's steps of one fit (most columns settle in 3 to 6)
SHAPE_ROUNDS = 3      # least-squares refits of the shapes on the columns (learn_shapes)
CLUSTER_ITERATIONS = 25  # K-Means steps over the normalized codebooks that start the shapes


@njit(cache=True, nogil=True)
def _assign(xs, shape, offset, scale, bounds):
    """Segment boundaries of ascending xs for the entries offset + scale * shape; True when they moved."""
    k = shape.shape[0]
    moved = False
    for c in range(1, k):
        b = np.searchsorted(xs, offset + scale * 0.5 * (shape[c - 1] + shape[c]), side="right")
        if b != bounds[c]:
            moved = True
            bounds[c] = b
    return moved


@njit(cache=True, nogil=True)
def _segment_sse(prefix_w, prefix, prefix_sq, shape, offset, scale, bounds):
    sse = 0.0
    for c in range(shape.shape[0]):
        lo, hi = bounds[c], bounds[c + 1]
        e = offset + scale * shape[c]
        sse += (prefix_sq[hi] - prefix_sq[lo]) - 2.0 * e * (prefix[hi] - prefix[lo]) + e * e * (prefix_w[hi] - prefix_w[lo])
    return max(sse, 0.0)


@njit(cache=True, nogil=True)
def initial_affine(centroids, shape):
    """(offset, scale >= 0) of the least-squares line from the shape's entries to the column's centroids."""
    k = shape.shape[0]
    ms, mc = 0.0, 0.0
    for c in range(k):
        ms += shape[c]
        mc += centroids[c]
    ms /= k
    mc /= k
    cov, var = 0.0, 0.0
    for c in range(k):
        cov += (shape[c] - ms) * (centroids[c] - mc)
        var += (shape[c] - ms) * (shape[c] - ms)
    scale = max(cov / var, 0.0) if var > 0.0 else 0.0
    return mc - scale * ms, scale


@njit(cache=True, nogil=True)
def fit_shape(xs, prefix_w, prefix, prefix_sq, shape, offset, scale, max_iter, bounds):
    """Weighted Lloyd's for entries offset + scale * shape on ascending xs (prefix sums of the weights,
    weight * x, weight * x**2, float64, length n + 1). Starts from (offset, scale); stops when no
    boundary moves. Returns (weighted SSE, offset, scale); bounds [k + 1] ends as the final segments."""
    k = shape.shape[0]
    n = xs.shape[0]
    bounds[0], bounds[k] = 0, n
    for c in range(1, k):
        bounds[c] = -1
    for _ in range(max_iter):
        if not _assign(xs, shape, offset, scale, bounds):
            break
        t0, t1, t2, x1, xt = 0.0, 0.0, 0.0, 0.0, 0.0
        for c in range(k):
            w = prefix_w[bounds[c + 1]] - prefix_w[bounds[c]]
            x = prefix[bounds[c + 1]] - prefix[bounds[c]]
            t0 += w
            t1 += w * shape[c]
            t2 += w * shape[c] * shape[c]
            x1 += x
            xt += x * shape[c]
        if t0 <= 0.0:
            break
        var = t2 - t1 * t1 / t0
        if var > 1e-12 * t2:  # the entries in use span more than one shape value: both parameters are determined
            scale = max((xt - t1 * x1 / t0) / var, 0.0)
        offset = (x1 - scale * t1) / t0
    _assign(xs, shape, offset, scale, bounds)
    return _segment_sse(prefix_w, prefix, prefix_sq, shape, offset, scale, bounds), offset, scale


@njit(cache=True, nogil=True)
def best_shape(xs, prefix_w, prefix, prefix_sq, shapes, centroids, max_iter, bounds):
    """(shape index, weighted SSE, offset, scale) of the shape that fits the column best (the first on a tie)."""
    best, best_sse, best_offset, best_scale = 0, np.inf, 0.0, 0.0
    for s in range(shapes.shape[0]):
        offset, scale = initial_affine(centroids, shapes[s])
        sse, offset, scale = fit_shape(xs, prefix_w, prefix, prefix_sq, shapes[s], offset, scale, max_iter, bounds)
        if sse < best_sse:
            best, best_sse, best_offset, best_scale = s, sse, offset, scale
    return best, best_sse, best_offset, best_scale


@njit(cache=True, nogil=True)
def shaped_codebook(xs, prefix_w, prefix, prefix_sq, shapes, centroids, max_iter, entries_out):
    """A column's codebook from shared shapes (fp16 values, each ascending): returns (shape index,
    offset, scale), both rounded to fp16 (scale >= 0), and writes the entries as decoded:
    binary32(offset + scale * shape[e]) (the product of two fp16 values is exact in binary32)."""
    bounds = np.zeros(shapes.shape[1] + 1, np.int64)
    s, _, offset, scale = best_shape(xs, prefix_w, prefix, prefix_sq, shapes, centroids, max_iter, bounds)
    offset, scale = round_fp16(offset), round_fp16(scale)
    for c in range(shapes.shape[1]):
        entries_out[c] = np.float32(offset) + np.float32(scale) * np.float32(shapes[s, c])
    return s, offset, scale


@njit(cache=True, nogil=True)
def _sorted_sums(column, weights):
    """(sorted column, prefix sums of the weights, weight * x and weight * x**2) of one column."""
    order = np.argsort(column, kind="mergesort")
    xs = column[order].astype(np.float64)
    prefix_w, prefix, prefix_sq = weighted_prefix_sums(xs, weights[order])
    return xs, prefix_w, prefix, prefix_sq


@njit(cache=True, nogil=True, parallel=True)
def exact_codebooks(Wt, weights, out):
    """Every column's exact weighted K-Means codebook (Wt: a column per row): out [cols, 2**bits]."""
    for j in prange(Wt.shape[0]):
        xs, prefix_w, prefix, prefix_sq = _sorted_sums(Wt[j], weights)
        out[j] = kmeans_optimal_weighted(xs, prefix_w, prefix, prefix_sq, out.shape[1])


@njit(cache=True, nogil=True)
def normalized_codebooks(C, out):
    """The codebooks C [cols, k] shifted to mean 0 and scaled to unit standard deviation: out [cols, k].
    Returns a mask of the columns whose codebook has any spread (constant columns say nothing about shape)."""
    k = C.shape[1]
    spread = np.zeros(C.shape[0], np.bool_)
    for j in range(C.shape[0]):
        centroids = C[j]
        m = centroids.mean()
        sd = np.sqrt(((centroids - m) ** 2).mean())
        if sd > 0.0:
            spread[j] = True
            for c in range(k):
                out[j, c] = (centroids[c] - m) / sd
    return spread


@njit(cache=True, nogil=True)
def normalize_shape(shape):
    """Sorted ascending, mean 0, unit standard deviation, rounded to fp16 (what the table stores)."""
    v = np.sort(shape)
    m = v.mean()
    sd = np.sqrt(((v - m) ** 2).mean())
    out = np.empty_like(v)
    for c in range(v.shape[0]):
        out[c] = round_fp16((v[c] - m) / sd) if sd > 0.0 else 0.0
    return np.sort(out)


@njit(cache=True, nogil=True)
def cluster_codebooks(U, count, iterations):
    """K-Means over the rows of U (normalized codebooks) into min(count, rows) centres, started at the
    rows of evenly spaced ranks of their spread (last minus first entry): deterministic."""
    m, k = U.shape
    S = min(count, m)
    order = np.argsort(U[:, k - 1] - U[:, 0], kind="mergesort")
    centres = np.empty((S, k), np.float64)
    for s in range(S):
        centres[s] = U[order[((2 * s + 1) * m) // (2 * S)]]
    label = np.zeros(m, np.int64)
    for _ in range(iterations):
        for j in range(m):
            best, best_d = 0, np.inf
            for s in range(S):
                d = 0.0
                for c in range(k):
                    d += (U[j, c] - centres[s, c]) ** 2
                if d < best_d:
                    best, best_d = s, d
            label[j] = best
        sums = np.zeros((S, k), np.float64)
        counts = np.zeros(S, np.int64)
        for j in range(m):
            counts[label[j]] += 1
            for c in range(k):
                sums[label[j], c] += U[j, c]
        for s in range(S):
            if counts[s] > 0:
                for c in range(k):
                    centres[s, c] = sums[s, c] / counts[s]
    return centres


@njit(cache=True, nogil=True, parallel=True)
def column_fits(Wt, weights, C, shapes, max_iter, index_out, offset_out, scale_out, seg_w_out, seg_x_out, sse_out):
    """Every column's best shape (unrounded offset and scale; C [cols, k]: the columns' exact codebooks,
    where each fit starts) and, for the refit, its segments' weight and weighted sum: seg_w_out/seg_x_out
    [cols, k]."""
    k = shapes.shape[1]
    for j in prange(Wt.shape[0]):
        xs, prefix_w, prefix, prefix_sq = _sorted_sums(Wt[j], weights)
        bounds = np.zeros(k + 1, np.int64)
        s, sse, offset, scale = best_shape(xs, prefix_w, prefix, prefix_sq, shapes, C[j], max_iter, bounds)
        # best_shape's bounds belong to the last shape tried: assign again for the chosen one
        _assign(xs, shapes[s], offset, scale, bounds)
        index_out[j], offset_out[j], scale_out[j], sse_out[j] = s, offset, scale, sse
        for c in range(k):
            seg_w_out[j, c] = prefix_w[bounds[c + 1]] - prefix_w[bounds[c]]
            seg_x_out[j, c] = prefix[bounds[c + 1]] - prefix[bounds[c]]


@njit(cache=True, nogil=True)
def refit_shapes(shapes, index, offset, scale, seg_w, seg_x):
    """Least-squares shape values given every column's choice, offset, scale and segments: entry c of
    shape s minimizes sum over its columns' points of w * (x - offset - scale * v)^2. A value no
    column uses keeps its old value. Returns the new table, normalized (normalize_shape)."""
    S, k = shapes.shape
    num = np.zeros((S, k), np.float64)
    den = np.zeros((S, k), np.float64)
    for j in range(index.shape[0]):
        s, a = index[j], scale[j]
        for c in range(k):
            num[s, c] += a * (seg_x[j, c] - offset[j] * seg_w[j, c])
            den[s, c] += a * a * seg_w[j, c]
    out = np.empty((S, k), np.float64)
    for s in range(S):
        row = shapes[s].copy()
        for c in range(k):
            if den[s, c] > 0.0:
                row[c] = num[s, c] / den[s, c]
        out[s] = normalize_shape(row)
    return out


def learn_shapes(Wt: np.ndarray, weights: np.ndarray, bits: int, count: int,
                 rounds: int = SHAPE_ROUNDS, max_iter: int = FIT_ITERATIONS) -> np.ndarray:
    """A weight's table of at most `count` shapes of 2**bits fp16 values (float64 [S, 2**bits], each
    row ascending, mean 0, unit deviation) learned from its columns (Wt: a column per row, weights
    float64 [rows] > 0 weigh each row's squared error)."""
    k = 1 << bits
    Wt, weights = np.ascontiguousarray(Wt), np.ascontiguousarray(weights, np.float64)
    C = np.zeros((Wt.shape[0], k))
    exact_codebooks(Wt, weights, C)  # once: every refit round starts its fits from them
    U = np.zeros((Wt.shape[0], k))
    spread = normalized_codebooks(C, U)
    if not spread.any():
        return normalize_shape(np.linspace(-1.0, 1.0, k))[None, :]
    centres = cluster_codebooks(U[spread], count, CLUSTER_ITERATIONS)
    shapes = np.stack([normalize_shape(c) for c in centres])
    for _ in range(rounds):
        fits = fit_columns(Wt, weights, shapes, max_iter, C)
        shapes = refit_shapes(shapes, fits["index"], fits["offset"], fits["scale"], fits["seg_w"], fits["seg_x"])
    return shapes


def fit_columns(Wt: np.ndarray, weights: np.ndarray, shapes: np.ndarray, max_iter: int = FIT_ITERATIONS,
                codebooks: np.ndarray = None) -> dict:
    """column_fits into fresh arrays: index, offset, scale (unrounded), seg_w, seg_x, sse (weighted).
    `codebooks`: the columns' exact K-Means codebooks when already known (else computed here)."""
    cols, k = Wt.shape[0], shapes.shape[1]
    Wt, weights = np.ascontiguousarray(Wt), np.ascontiguousarray(weights, np.float64)
    if codebooks is None:
        codebooks = np.zeros((cols, k))
        exact_codebooks(Wt, weights, codebooks)
    out = dict(index=np.zeros(cols, np.int64), offset=np.zeros(cols), scale=np.zeros(cols),
               seg_w=np.zeros((cols, k)), seg_x=np.zeros((cols, k)), sse=np.zeros(cols))
    column_fits(Wt, weights, codebooks, shapes, max_iter, out["index"], out["offset"], out["scale"],
                out["seg_w"], out["seg_x"], out["sse"])
    return out
