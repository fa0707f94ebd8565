"""Numba kernels: 1-D K-Means on sorted prefix sums and the GPTQ inner block loop with codebooks.

The quantization's Numba code sits here (the decode/product kernels of the runtime are in
`numba_decode.py`); `numpy_quant.py` is the line-for-line NumPy twin of both, used by the
tests to check these kernels exactly. The kernels are unchecked: callers (`quantize/gptq.py`) validate shapes
and dtypes. Arithmetic is float64 inside; prefix sums are float64 because float32 loses the small
differences Lloyd's update needs. Every kernel releases the GIL (nogil), so independent weights can be
quantized in parallel threads (pipeline.quantize_group).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ..format.spec import CLAQ_SECTIONS, DTYPES, GRID_TOP, U8_COUNT_MAX  # GRID_TOP: a grid's top level;
# U8_COUNT_MAX: the most outliers u8 counts hold

# A kernel that reaches a parallel loop (gptq_block: kmeans_dp_parallel) segfaults when two threads call
# it for the first time at once before Numba's threading layer has started (numba 0.68, omp; measured
# 3 of 3 runs). Asking for the thread count starts the layer, here, before any caller has threads.
numba.get_num_threads()

MODE_CODEBOOK = 0  # per-column 1-D K-Means codebook, fp16 entries (CLAQ, kmeans)
MODE_UNIFORM = 1   # per-row asymmetric uniform grid (rtn, gptq baselines)
MODE_GRID = 2      # per-column K-Means codebook whose entries are 8-bit levels on the column's fp16 grid
MODE_SHAPES = 3    # per-column codebook: fp16 offset + scale * one of the weight's shared shapes (kernels_shapes)
FP16_LEAST = 2.0 ** -24  # the least positive fp16: the step of a constant column's grid (its levels stay distinct)
GUARD_EXTRA = 4    # grid guard: at most this many outliers a column reserves beyond its planned ones (and
                   # never more than U8_COUNT_MAX, as columns.MAX_RESERVE caps the planned ones)
# A guard outlier stores its row and value (32 bits). Where a column's error falls as 2^(-2 B / rows) with
# its B bits, a bit buys a share 2 ln 2 / rows of the column's error, and an allocation whose columns all
# stand at the same loss per bit (whatever their sensitivities) gains from an outlier only when it cuts the
# column's error by more than its bits buy: a share GUARD_GAIN / rows.
OUTLIER_BITS = 8 * sum(DTYPES[CLAQ_SECTIONS[s]].itemsize for s in ("outlier_rows", "outlier_values"))
GUARD_GAIN = 2.0 * math.log(2.0) * OUTLIER_BITS
WIDTHS = 9         # shape tables are indexed by width 0..8


def no_shapes() -> tuple[np.ndarray, np.ndarray]:
    """gptq_block's (shapes, shape_counts) for the modes that use no shared shapes."""
    return np.zeros((WIDTHS, 1, 1)), np.zeros(WIDTHS, np.int64)


@njit(cache=True, nogil=True)
def round_half_even(x):
    return np.round(x)  # numpy rounds half to even


@njit(cache=True, nogil=True)
def round_fp16(x):
    """x rounded to the nearest IEEE binary16 value (ties to even), returned as float64.

    Matches numpy's float64 -> float16 conversion for finite values; values past the fp16 range
    become +-inf, as there.
    """
    if x == 0.0 or not math.isfinite(x):
        return x
    ax = abs(x)
    if ax < 6.103515625e-05:  # below 2**-14: subnormal spacing 2**-24
        return round_half_even(x * 16777216.0) / 16777216.0
    m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1; fp16 keeps 11 significant bits
    r = math.ldexp(round_half_even(m * 2048.0), e - 11)
    if abs(r) > 65504.0:
        return math.copysign(math.inf, x)
    return r


@njit(cache=True, nogil=True)
def fp16_at_least(x):
    """The least binary16 value >= x (x >= 0, finite), as float64: round, then one fp16 step up if below."""
    r = round_fp16(x)
    if r >= x:
        return r
    if r < 6.103515625e-05:
        return r + 5.960464477539063e-08  # 2**-24, the subnormal spacing
    m, e = math.frexp(r)
    return r + math.ldexp(1.0, e - 11)


@njit(cache=True, nogil=True)
def grid_codebook(centroids, levels_out, grid_out, codebook_out):
    """Ascending centroids -> the codebook's 8-bit levels on the grid offset + step * level.

    offset = fp16(first centroid), step = the least fp16 >= (last - offset) / 255 (FP16_LEAST for a
    constant column), level = the nearest grid point; then the levels are made strictly increasing from 0
    to 255 (format v3 codes only the inner levels' gaps): each is raised to one above the one before it,
    then lowered to one below the one after it, the last being 255. Each entry is float32(offset) +
    float32(step) * float32(level) in binary32, product rounded before the sum (the decoders' rule);
    codebook_out gets those values.
    """
    k = centroids.shape[0]
    offset = round_fp16(centroids[0])
    span = centroids[k - 1] - offset
    step = fp16_at_least(span / GRID_TOP) if span > 0.0 else FP16_LEAST
    grid_out[0], grid_out[1] = offset, step
    levels = np.empty(k, np.int64)
    for c in range(k):
        levels[c] = int(min(max(round_half_even((centroids[c] - offset) / step), 0.0), float(GRID_TOP)))
    levels[0] = 0
    for c in range(1, k):
        levels[c] = max(levels[c], levels[c - 1] + 1)
    levels[k - 1] = GRID_TOP
    for c in range(k - 2, 0, -1):
        levels[c] = min(levels[c], levels[c + 1] - 1)
    for c in range(k):
        levels_out[c] = np.uint8(levels[c])
        codebook_out[c] = np.float32(offset) + np.float32(step) * np.float32(levels[c])


@njit(cache=True, nogil=True)
def kmeans_sorted(xs, prefix, k, max_iter):
    """Lloyd's 1-D K-Means on ascending `xs` with prefix[i] = sum(xs[:i]) (float64, len n + 1): every
    entry weighs 1 (kmeans_sorted_weighted)."""
    return kmeans_sorted_weighted(xs, np.arange(xs.shape[0] + 1).astype(np.float64), prefix, k, max_iter)


@njit(cache=True, nogil=True)
def kmeans_sorted_weighted(xs, prefix_w, prefix, k, max_iter):
    """Lloyd's weighted 1-D K-Means on ascending `xs`: prefix_w[i] = sum(weights[:i]), prefix[i] =
    sum(weights[:i] * xs[:i]) (float64, len n + 1; weights > 0).

    Deterministic quantile initialisation (by count); each iteration finds the cluster boundaries
    (midpoints between neighbouring centroids) by binary search and the weighted means from the prefix
    sums, so an iteration costs O(k log n). Stops when no boundary moves. Returns k ascending
    centroids (duplicates when n < k or clusters coincide).
    """
    n = xs.shape[0]
    centroids = np.empty(k, np.float64)
    if n == 0:
        centroids[:] = 0.0
        return centroids
    for c in range(k):
        centroids[c] = xs[min(n - 1, ((2 * c + 1) * n) // (2 * k))]
    bounds = np.zeros(k + 1, np.int64)
    new_bounds = np.zeros(k + 1, np.int64)
    bounds[k] = n
    new_bounds[k] = n
    for _ in range(max_iter):
        for c in range(1, k):
            mid = 0.5 * (centroids[c - 1] + centroids[c])
            new_bounds[c] = np.searchsorted(xs, mid, side="right")
        changed = False
        for c in range(k + 1):
            if new_bounds[c] != bounds[c]:
                changed = True
            bounds[c] = new_bounds[c]
        for c in range(k):
            lo, hi = bounds[c], bounds[c + 1]
            if hi > lo:
                centroids[c] = (prefix[hi] - prefix[lo]) / (prefix_w[hi] - prefix_w[lo])
        if not changed:
            break
    return centroids


@njit(cache=True, nogil=True)
def segment_cost(prefix_w, prefix, prefix_sq, i, j):
    """Weighted sum of squared deviations from their weighted mean of sorted entries i..j-1 (prefix
    sums of the weights, weight * x and weight * x**2)."""
    n = prefix_w[j] - prefix_w[i]
    if n <= 0.0:
        return 0.0
    s = prefix[j] - prefix[i]
    return max(prefix_sq[j] - prefix_sq[i] - s * s / n, 0.0)


@njit(cache=True, nogil=True)
def _dp_node(prev, cur, split_row, prefix_w, prefix, prefix_sq, m, jlo, jhi, ilo, ihi):
    """One node of a DP row's divide and conquer: the best split of the middle entry of jlo..jhi among
    ilo..ihi (ties to the smaller split). Writes cur/split_row there and returns (mid, best split)."""
    mid = (jlo + jhi) // 2
    best, best_i = np.inf, ilo
    for i in range(max(ilo, m), min(ihi, mid - 1) + 1):
        v = prev[i] + segment_cost(prefix_w, prefix, prefix_sq, i, mid)
        if v < best:
            best, best_i = v, i
    cur[mid] = best
    split_row[mid] = best_i
    return mid, best_i


@njit(cache=True, nogil=True)
def _dp_range(prev, cur, split_row, prefix_w, prefix, prefix_sq, m, jlo, jhi, ilo, ihi):
    """Row m of the DP for entries jlo..jhi, whose splits lie in ilo..ihi (explicit stack)."""
    stack = np.empty((64, 4), np.int64)
    top = 0
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = jlo, jhi, ilo, ihi
    while top >= 0:
        jlo, jhi, ilo, ihi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
        top -= 1
        if jlo > jhi:
            continue
        mid, best_i = _dp_node(prev, cur, split_row, prefix_w, prefix, prefix_sq, m, jlo, jhi, ilo, ihi)
        top += 1
        stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = jlo, mid - 1, ilo, best_i
        top += 1
        stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = mid + 1, jhi, best_i, ihi


@njit(cache=True, nogil=True)
def _dp_first_row(prev, prefix_w, prefix, prefix_sq, n):
    for j in range(n + 1):
        prev[j] = segment_cost(prefix_w, prefix, prefix_sq, 0, j)


@njit(cache=True, nogil=True)
def kmeans_dp(prefix_w, prefix, prefix_sq, n, k, split, sse_out):
    """The dynamic programme of exact weighted 1-D K-Means over n sorted entries (prefix sums of the
    weights, weight * x and weight * x**2, length n + 1).

    D[m][j] = min_i D[m-1][i] + cost(i, j) is the least SSE of the first j entries in m+1 clusters;
    the optimal split point is monotone in j, so each row is solved by divide and conquer in
    O(n log n) (explicit stack, ties to the smaller split). Fills split[m, j] (needs n > k) and
    sse_out[m] = least SSE of all n entries in m+1 clusters, for m < k.
    """
    prev = np.empty(n + 1, np.float64)
    cur = np.empty(n + 1, np.float64)
    _dp_first_row(prev, prefix_w, prefix, prefix_sq, n)
    sse_out[0] = prev[n]
    for m in range(1, k):
        _dp_range(prev, cur, split[m], prefix_w, prefix, prefix_sq, m, m + 1, n, m, n - 1)
        for j in range(m + 1, n + 1):
            prev[j] = cur[j]
        sse_out[m] = prev[n]


DP_SERIAL_LEVELS = 2  # nodes solved in order before a row's subproblems go to threads: 2**2 = 4 of them


@njit(cache=True, nogil=True, parallel=True)
def kmeans_dp_parallel(prefix_w, prefix, prefix_sq, n, k, split, sse_out):
    """kmeans_dp with each row's divide and conquer shared by threads, the same numbers: the top
    DP_SERIAL_LEVELS levels of a row's recursion are solved in order, then the independent
    subproblems below them (disjoint entries, each with its split range) in parallel. For long
    columns (a vocabulary's rows): a short one costs more to hand out than to solve."""
    prev = np.empty(n + 1, np.float64)
    cur = np.empty(n + 1, np.float64)
    _dp_first_row(prev, prefix_w, prefix, prefix_sq, n)
    sse_out[0] = prev[n]
    width = 1 << DP_SERIAL_LEVELS
    for m in range(1, k):
        nodes = np.empty((width, 4), np.int64)
        nodes[0, 0], nodes[0, 1], nodes[0, 2], nodes[0, 3] = m + 1, n, m, n - 1
        count = 1
        for _ in range(DP_SERIAL_LEVELS):
            children = np.empty((width, 4), np.int64)
            made = 0
            for t in range(count):
                jlo, jhi, ilo, ihi = nodes[t, 0], nodes[t, 1], nodes[t, 2], nodes[t, 3]
                if jlo > jhi:
                    continue
                mid, best_i = _dp_node(prev, cur, split[m], prefix_w, prefix, prefix_sq, m, jlo, jhi, ilo, ihi)
                children[made, 0], children[made, 1], children[made, 2], children[made, 3] = jlo, mid - 1, ilo, best_i
                children[made + 1, 0], children[made + 1, 1] = mid + 1, jhi
                children[made + 1, 2], children[made + 1, 3] = best_i, ihi
                made += 2
            nodes, count = children, made
        for t in prange(count):
            _dp_range(prev, cur, split[m], prefix_w, prefix, prefix_sq, m, nodes[t, 0], nodes[t, 1], nodes[t, 2],
                      nodes[t, 3])
        for j in range(m + 1, n + 1):
            prev[j] = cur[j]
        sse_out[m] = prev[n]


@njit(cache=True, nogil=True)
def kmeans_optimal_sorted(xs, prefix, prefix_sq, k):
    """Exact 1-D K-Means: the k contiguous segments of ascending `xs` with least total SSE (kmeans_dp).

    prefix/prefix_sq are float64 prefix sums of xs and xs**2 (length n + 1). Returns k ascending
    centroids (the segment means; when n < k the last entry repeats). Every entry weighs 1.
    """
    return kmeans_optimal_weighted(xs, np.arange(xs.shape[0] + 1).astype(np.float64), prefix, prefix_sq, k)


@njit(cache=True, nogil=True)
def kmeans_optimal_weighted(xs, prefix_w, prefix, prefix_sq, k, parallel=False):
    """Exact weighted 1-D K-Means: the k contiguous segments of ascending `xs` with least total
    weighted SSE. prefix_w/prefix/prefix_sq: float64 prefix sums of the weights (> 0), weight * xs and
    weight * xs**2. Returns the k ascending weighted segment means (n < k: the last entry repeats).
    `parallel`: the DP's rows shared by threads (kmeans_dp_parallel; the same result).
    """
    n = xs.shape[0]
    centroids = np.empty(k, np.float64)
    if n == 0:
        centroids[:] = 0.0
        return centroids
    if n <= k:
        for c in range(k):
            centroids[c] = xs[min(c, n - 1)]
        return centroids
    split = np.zeros((k, n + 1), np.int64)
    if parallel:
        kmeans_dp_parallel(prefix_w, prefix, prefix_sq, n, k, split, np.empty(k, np.float64))
    else:
        kmeans_dp(prefix_w, prefix, prefix_sq, n, k, split, np.empty(k, np.float64))
    j = n
    for m in range(k - 1, 0, -1):
        i = split[m, j]
        centroids[m] = (prefix[j] - prefix[i]) / (prefix_w[j] - prefix_w[i])
        j = i
    centroids[0] = prefix[j] / prefix_w[j]
    return centroids


@njit(cache=True, nogil=True)
def weighted_prefix_sums(xs, u):
    """Prefix sums (length n + 1, float64) of the weights u, u * xs and u * xs**2 for ascending xs."""
    n = xs.shape[0]
    prefix_w = np.zeros(n + 1, np.float64)
    prefix = np.zeros(n + 1, np.float64)
    prefix_sq = np.zeros(n + 1, np.float64)
    for i in range(n):
        prefix_w[i + 1] = prefix_w[i] + u[i]
        prefix[i + 1] = prefix[i] + u[i] * xs[i]
        prefix_sq[i + 1] = prefix_sq[i] + u[i] * xs[i] * xs[i]
    return prefix_w, prefix, prefix_sq


@njit(cache=True, nogil=True, parallel=True)
def column_sse_by_width(Wt, max_bits, weights):
    """Least weighted K-Means SSE of every column at every width: out[j, b-1] for b = 1..max_bits.

    Wt is W transposed ([in, out], a column per row); weights (float64 [out], > 0) weigh each row's
    squared error (ones: the plain SSE). One DP with 2**max_bits clusters yields all smaller counts on
    the way, so every width costs no more than the widest. A column with no more entries than
    clusters has SSE 0.
    """
    cols, n = Wt.shape
    k = 1 << max_bits
    out = np.zeros((cols, max_bits), np.float64)
    for j in prange(cols):
        order = np.argsort(Wt[j], kind="mergesort")
        prefix_w, prefix, prefix_sq = weighted_prefix_sums(Wt[j][order].astype(np.float64), weights[order])
        kdp = min(k, n - 1)  # the DP needs more entries than clusters; n clusters or more fit exactly
        sse = np.zeros(k, np.float64)
        if kdp >= 1:
            kmeans_dp(prefix_w, prefix, prefix_sq, n, kdp, np.zeros((kdp, n + 1), np.int64), sse)
        for b in range(1, max_bits + 1):
            clusters = 1 << b
            out[j, b - 1] = sse[clusters - 1] if clusters <= kdp else 0.0
    return out


@njit(cache=True, nogil=True)
def data_free_grid(w, weights, k, levels_out, codebook_out):
    """Column w's values ascending, with its data-free grid codebook of k entries (exact K-Means weighted
    by `weights`, float64 [out] > 0, as the quantizer weighs rows; then grid_codebook) in levels_out and
    codebook_out."""
    order = np.argsort(w, kind="mergesort")
    xs = w[order].astype(np.float64)
    prefix_w, prefix, prefix_sq = weighted_prefix_sums(xs, weights[order])
    centroids = kmeans_optimal_weighted(xs, prefix_w, prefix, prefix_sq, k)
    grid_codebook(centroids, levels_out, np.empty(2, np.float64), codebook_out)
    return xs


@njit(cache=True, nogil=True, parallel=True)
def data_free_levels(Wt, bits, weights, levels_out):
    """The u8 levels [n, 2**bits] of each column's data-free grid codebook (data_free_grid): Wt is W
    transposed ([n, out], a column per row). The allocation codes them to estimate what a width's levels
    will cost in a file before GPTQ has fitted the real ones."""
    k = 1 << bits
    for j in prange(Wt.shape[0]):
        data_free_grid(Wt[j], weights, k, levels_out[j], np.empty(k, np.float64))


@njit(cache=True, nogil=True, parallel=True)
def data_free_code_counts(Wt, bits, weights, counts_out):
    """counts_out[j, c]: the rows of column j (Wt is W transposed, [n, out]) whose nearest entry of the
    column's data-free grid codebook (data_free_grid) is c. The allocation codes these counts to estimate
    what a width's code stream will cost in a file (format v4) before GPTQ has run."""
    k = 1 << bits
    for j in prange(Wt.shape[0]):
        codebook = np.empty(k, np.float64)
        xs = data_free_grid(Wt[j], weights, k, np.empty(k, np.uint8), codebook)
        counts_out[j] = 0
        for x in xs:
            counts_out[j, nearest_code(x, codebook)] += 1


@njit(cache=True, nogil=True)
def nearest_code(x, codebook):
    """Index of the nearest entry of an ascending codebook (the lower index on a tie)."""
    k = codebook.shape[0]
    lo, hi = 0, k - 1
    while lo < hi:  # first c with x <= midpoint(c, c+1)
        mid = (lo + hi) // 2
        if x <= 0.5 * (codebook[mid] + codebook[mid + 1]):
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit(cache=True, nogil=True)
def quantize_column_codebook(w, weights, bits, n_reserve, fit_all, max_iter, codebook_out, codes_out, reserved_out,
                             q_out, mode, levels_out, grid_out, shapes, shape_counts, parallel=False):
    """Fit a 2**bits codebook to column `w`, keep its `n_reserve` largest-|w| entries exact (fp16).

    `weights` (float64 [rows], > 0) weigh each row's squared error in the K-Means (ones: plain K-Means).

    The codebook is the exact K-Means optimum when max_iter == 0, else Lloyd's (at most max_iter).
    Writes the ascending codebook into codebook_out[:2**bits]: the centroids rounded to fp16 (MODE_CODEBOOK),
    8-bit levels on the column's grid (MODE_GRID: levels_out[:2**bits], grid_out = offset, step; see
    grid_codebook), or the best of the width's shared shapes (MODE_SHAPES: shapes[bits, :shape_counts[bits],
    :2**bits], the fp16 shape values; levels_out[0] = the shape's index, grid_out = offset, scale; see
    kernels_shapes.shaped_codebook); then each entry's code, a 0/1
    reserved mask and the decoded value q (reserved entries keep fp16(w)). The reserved entries are
    the two tails of the sorted column, so the K-Means fits the contiguous middle (or everything
    when `fit_all`). `parallel`: the exact K-Means's DP shared by threads (the same result).
    """
    n = w.shape[0]
    k = 1 << bits
    order = np.argsort(w, kind="mergesort")
    xs = w[order].astype(np.float64)
    lo, hi = 0, n
    for _ in range(min(n_reserve, n)):
        if abs(xs[lo]) > abs(xs[hi - 1]):
            lo += 1
        else:
            hi -= 1
    a, b = (0, n) if fit_all else (lo, hi)
    prefix_w, prefix, prefix_sq = weighted_prefix_sums(xs[a:b], weights[order[a:b]])
    if max_iter > 0:
        centroids = kmeans_sorted_weighted(xs[a:b], prefix_w, prefix, k, max_iter)
    else:
        centroids = kmeans_optimal_weighted(xs[a:b], prefix_w, prefix, prefix_sq, k, parallel)
    cb = np.empty(k, np.float64)
    if mode == MODE_GRID:
        grid_codebook(centroids, levels_out, grid_out, cb)  # ascending: levels follow the centroids' order
    elif mode == MODE_SHAPES:
        index, offset, scale = kernels_shapes.shaped_codebook(xs[a:b], prefix_w, prefix, prefix_sq,
                                                              shapes[bits, :shape_counts[bits], :k], centroids,
                                                              kernels_shapes.FIT_ITERATIONS, cb)
        levels_out[0] = np.uint8(index)
        grid_out[0], grid_out[1] = offset, scale
    else:
        for c in range(k):
            cb[c] = round_fp16(centroids[c])
        cb.sort()  # rounding keeps the order; sorting makes it a guarantee
    for c in range(k):
        codebook_out[c] = cb[c]
    for r in range(n):
        code = nearest_code(w[r], cb)
        codes_out[r] = code
        q_out[r] = cb[code]
        reserved_out[r] = 0
    for s in range(n):
        if s < lo or s >= hi:
            r = order[s]
            reserved_out[r] = 1
            q_out[r] = round_fp16(w[r])


@njit(cache=True, nogil=True)
def grid_rounding_share(w, weights, q, reserved, step):
    """How much of a grid column's weighted squared error its grid's rounding makes, by expectation: a
    codebook entry rounded to the nearest level moves by step^2/12 in mean square, so the fitted rows add
    sum(weights) * step^2 / 12 to what their K-Means alone would leave. 0 for a column fitted exactly."""
    error, added = 0.0, 0.0
    for r in range(w.shape[0]):
        if reserved[r] == 0:
            e = w[r] - q[r]
            error += weights[r] * e * e
            added += weights[r]
    if error <= 0.0:
        return 0.0
    return added * step * step / 12.0 / error


@njit(cache=True, nogil=True)
def weighted_error(w, weights, q):
    """sum(weights * (w - q)^2) over every row of a column (its reserved rows' fp16 rounding included)."""
    error = 0.0
    for r in range(w.shape[0]):
        e = w[r] - q[r]
        error += weights[r] * e * e
    return error


@njit(cache=True, nogil=True)
def gptq_block(W1, Hinv1, weights, mode, bits, n_reserve, fit_all, max_iter, scale, zero,
               codebooks, codes, reserved, Q1, Err1, levels, grids, shapes, shape_counts, parallel=False, guard=0.0):
    """GPTQ's inner loop over one block of columns, all in Numba (no Python per column).

    W1 [cnt, rows] holds the block's columns as contiguous rows (W transposed); it is updated in
    place with each column's error, as in GPTQ. Hinv1 [cnt, cnt] is the block of the upper Cholesky
    factor of H^-1. `weights` (float64 [rows], > 0) weigh the rows in the codebooks' K-Means: GPTQ's
    compensation is the same for every row, so a per-row weight changes only the codebooks. Mode
    MODE_CODEBOOK fits per-column codebooks (MODE_GRID: on 8-bit grids, their
    levels [cnt, 256] and (offset, step) [cnt, 2] written to levels/grids; MODE_SHAPES: from the shared
    shapes [WIDTHS, S, 256] (shape_counts [WIDTHS] of them a width), each column's shape index written
    to levels[:, 0] and (offset, scale) to grids; no_shapes() for the other modes); MODE_UNIFORM rounds to the
    per-row grid (scale, zero) with 2**bits[0] levels. Outputs: codebooks [cnt, 256], codes/reserved/Q1/
    Err1 [cnt, rows]. Returns the block's summed loss sum((w - q)^2 / d^2) / 2. `parallel`: each
    column's exact K-Means shares its DP among Numba's threads (for long columns, when no other thread
    is quantizing; the same result). `guard` > 0 (MODE_GRID): a column whose grid rounding makes more than
    this share of its error (grid_rounding_share) tries its next largest |w| in fp16, fitted again, and keeps
    the refit when it cuts the column's weighted error by a share GUARD_GAIN / rows (the outlier pays for its
    bits), at most GUARD_EXTRA times: a column with a far outlier has a coarse grid over its bulk.
    """
    cnt, rows = W1.shape
    loss = 0.0
    for i in range(cnt):
        w = W1[i].astype(np.float64)
        d = Hinv1[i, i]
        q = np.empty(rows, np.float64)
        if mode != MODE_UNIFORM:
            n_keep = n_reserve[i]
            most = min(n_keep + GUARD_EXTRA, U8_COUNT_MAX, rows - 1) if mode == MODE_GRID and guard > 0.0 \
                else n_keep
            quantize_column_codebook(w, weights, bits[i], n_keep, fit_all, max_iter, codebooks[i], codes[i],
                                     reserved[i], q, mode, levels[i], grids[i], shapes, shape_counts, parallel)
            error = weighted_error(w, weights, q) if n_keep < most else 0.0
            while n_keep < most and grid_rounding_share(w, weights, q, reserved[i], grids[i, 1]) > guard:
                kept_codebook, kept_codes, kept_reserved = codebooks[i].copy(), codes[i].copy(), reserved[i].copy()
                kept_q, kept_levels, kept_grid = q.copy(), levels[i].copy(), grids[i].copy()
                quantize_column_codebook(w, weights, bits[i], n_keep + 1, fit_all, max_iter, codebooks[i], codes[i],
                                         reserved[i], q, mode, levels[i], grids[i], shapes, shape_counts, parallel)
                trial = weighted_error(w, weights, q)
                if trial > error * (1.0 - GUARD_GAIN / rows):  # not worth its 32 bits: the fit before stands
                    codebooks[i, :], codes[i, :], reserved[i, :] = kept_codebook, kept_codes, kept_reserved
                    q[:], levels[i, :], grids[i, :] = kept_q, kept_levels, kept_grid
                    break
                n_keep, error = n_keep + 1, trial
        else:
            maxq = (1 << bits[i]) - 1
            for r in range(rows):
                level = min(max(round_half_even(w[r] / scale[r]) + zero[r], 0.0), float(maxq))
                codes[i, r] = np.uint8(level)
                q[r] = scale[r] * (level - zero[r])
                reserved[i, r] = 0
        for r in range(rows):
            Q1[i, r] = q[r]
            e = (w[r] - q[r]) / d
            Err1[i, r] = e
            loss += (w[r] - q[r]) ** 2 / d ** 2 / 2.0
        for j in range(i + 1, cnt):
            h = Hinv1[i, j]
            if h != 0.0:
                for r in range(rows):
                    W1[j, r] -= Err1[i, r] * h
    return loss


# Last: kernels_shapes builds on the helpers above (round_fp16, the K-Means), and quantize_column_codebook
# calls into it; Numba resolves the names when the kernel first compiles.
# A module, not its names: importing kernels_shapes first imports this module before its own names exist.
from . import shapes as kernels_shapes  # noqa: E402
