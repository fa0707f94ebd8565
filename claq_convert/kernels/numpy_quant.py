"""NumPy twin of `numba_quant.py` and `numba_decode.py`: the same algorithms, plainly written, for the
tests to compare against.

Slow (a Python loop per column and per iteration); never used on the conversion or runtime path.
"""
from __future__ import annotations

import numpy as np

from ..format.spec import CHUNK_CODES, MAX_CODEWORD_BITS, U8_COUNT_MAX, unpack_codes
from .numba_quant import FP16_LEAST, GRID_TOP, GUARD_EXTRA, GUARD_GAIN, MODE_GRID, MODE_SHAPES, MODE_UNIFORM
from .shapes import FIT_ITERATIONS as SHAPE_FIT_ITERATIONS


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


def fp16_at_least(x):
    """The smallest fp16 values >= x (x >= 0), as float64 (a float for a scalar x)."""
    r = round_fp16(np.asarray(x, np.float64))
    up = np.where(r >= x, r, np.nextafter(r.astype(np.float16), np.float16(np.inf)).astype(np.float64))
    return float(up) if up.ndim == 0 else up


def strict_levels(levels: np.ndarray) -> np.ndarray:
    """Levels [..., k] (k >= 2, each row one codebook) made strictly increasing from 0 to GRID_TOP like
    the Numba kernel's loops: raised to one above the level before (a running maximum of level - index),
    then lowered to one below the level after (a running minimum from the top, which is GRID_TOP)."""
    k = levels.shape[-1]
    index = np.arange(k)
    y = levels.astype(np.int64) - index
    y[..., 0] = 0
    y = np.maximum.accumulate(y, axis=-1)
    y[..., -1] = GRID_TOP - (k - 1)
    y = np.minimum.accumulate(y[..., ::-1], axis=-1)[..., ::-1]
    return (y + index).astype(np.uint8)


def grid_codebook(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels, (offset, step), float32 entries) like the Numba kernel, for ascending centroids [..., k]:
    one codebook, or one a row of a batch (levels [..., k], grids [..., 2], entries [..., k])."""
    centroids = np.asarray(centroids, np.float64)
    offset = round_fp16(centroids[..., 0])
    span = centroids[..., -1] - offset
    step = np.where(span > 0, fp16_at_least(np.maximum(span, 0) / GRID_TOP), FP16_LEAST)
    levels = strict_levels(np.clip(np.round((centroids - offset[..., None]) / step[..., None]), 0, GRID_TOP))
    values = offset[..., None].astype(np.float32) + step[..., None].astype(np.float32) * levels.astype(np.float32)
    return levels, np.stack([offset, step], axis=-1), values.astype(np.float64)


def data_free_levels(Wt: np.ndarray, bits: int, weights: np.ndarray) -> np.ndarray:
    """u8 levels [n, 2**bits] of each column's data-free grid codebook, like the Numba kernel."""
    out = []
    for column in Wt:
        order = np.argsort(column, kind="stable")
        centroids = kmeans_optimal_sorted(column[order].astype(np.float64), 1 << bits, weights[order])
        out.append(grid_codebook(centroids)[0])
    return np.stack(out).astype(np.uint8)


def quantize_column_codebook(w, bits, n_reserve, fit_all, max_iter, grid=False, weights=None, shapes=None):
    """Returns (codebook, codes, reserved, q, levels, (offset, step)) like the Numba kernel; with
    `shapes` ([S, 2**bits]) levels[0] is the chosen shape and the pair is (offset, scale)."""
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
    if shapes is not None:
        index, offset, scale, codebook = shaped_from_sorted(xs[a:b], u, fit, shapes, SHAPE_FIT_ITERATIONS)
        levels[0], offset_step = index, np.array([offset, scale])
    elif grid:
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


def grid_rounding_share(w, weights, q, reserved, step) -> float:
    """Twin of kernels.grid_rounding_share (sums in row order, as the kernel's loop)."""
    fitted = reserved == 0
    error = _seq_sum(weights[fitted] * (w[fitted] - q[fitted]) ** 2)
    return 0.0 if error <= 0.0 else _seq_sum(weights[fitted]) * step * step / 12.0 / error


def weighted_error(w, weights, q) -> float:
    """Twin of kernels.weighted_error (summed in row order)."""
    return _seq_sum(weights * (w - q) ** 2)


def gptq_block(W1, Hinv1, weights, mode, bits, n_reserve, fit_all, max_iter, scale, zero,
               codebooks, codes, reserved, Q1, Err1, levels, grids, shapes, shape_counts, parallel=False, guard=0.0):
    """Twin of kernels.gptq_block (`parallel` changes nothing there either: the twin has no threads)."""
    cnt, rows = W1.shape
    u = np.ones(rows) if weights is None else np.asarray(weights, np.float64)
    loss = 0.0
    for i in range(cnt):
        w = W1[i].astype(np.float64)
        d = float(Hinv1[i, i])
        if mode != MODE_UNIFORM:
            b = int(bits[i])
            table = shapes[b, :shape_counts[b], :1 << b] if mode == MODE_SHAPES else None
            n_keep = int(n_reserve[i])
            most = (min(n_keep + GUARD_EXTRA, U8_COUNT_MAX, rows - 1) if mode == MODE_GRID and guard > 0
                    else n_keep)
            fit = quantize_column_codebook(w, b, n_keep, fit_all, max_iter, mode == MODE_GRID, weights, table)
            error = weighted_error(w, u, fit[3]) if n_keep < most else 0.0
            while n_keep < most and grid_rounding_share(w, u, fit[3], fit[2], float(fit[5][1])) > guard:
                trial = quantize_column_codebook(w, b, n_keep + 1, fit_all, max_iter, mode == MODE_GRID, weights,
                                                 table)
                trial_error = weighted_error(w, u, trial[3])
                if trial_error > error * (1.0 - GUARD_GAIN / rows):
                    break
                fit, error, n_keep = trial, trial_error, n_keep + 1
            cb, codes[i], reserved[i], q, lv, grids[i] = fit
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


# ---- twins of shapes.py -------------------------------------------------------------------

def _seq_sum(values) -> float:
    """Left-to-right float64 sum (NumPy's pairwise sum rounds differently from the kernels' loops)."""
    total = 0.0
    for v in values:
        total += float(v)
    return total


def fit_shape(xs, shape, offset, scale, max_iter, weights=None):
    """Twin of kernels_shapes.fit_shape: returns (weighted SSE, offset, scale, codes of xs). The sums go
    through the same prefix sums in the same order, so the results are equal bit for bit."""
    u = np.ones(xs.shape[0]) if weights is None else np.asarray(weights, np.float64)
    P0 = np.concatenate([[0.0], np.cumsum(u)])
    P1 = np.concatenate([[0.0], np.cumsum(u * xs)])
    P2 = np.concatenate([[0.0], np.cumsum(u * xs * xs)])
    k, n = shape.shape[0], xs.shape[0]

    def bounds_of(o, a):
        return np.concatenate([[0], np.searchsorted(xs, o + a * 0.5 * (shape[:-1] + shape[1:]), side="right"), [n]])

    bounds = None
    for _ in range(max_iter):
        new = bounds_of(offset, scale)
        if bounds is not None and np.array_equal(new, bounds):
            break
        bounds = new
        w = P0[bounds[1:]] - P0[bounds[:-1]]
        x = P1[bounds[1:]] - P1[bounds[:-1]]
        t0, t1, t2 = _seq_sum(w), _seq_sum(w * shape), _seq_sum(w * shape * shape)
        x1, xt = _seq_sum(x), _seq_sum(x * shape)
        if t0 <= 0.0:
            break
        var = t2 - t1 * t1 / t0
        if var > 1e-12 * t2:
            scale = max((xt - t1 * x1 / t0) / var, 0.0)
        offset = (x1 - scale * t1) / t0
    bounds = bounds_of(offset, scale)
    e = offset + scale * shape
    seg = [(P2[hi] - P2[lo]) - 2.0 * e[c] * (P1[hi] - P1[lo]) + e[c] * e[c] * (P0[hi] - P0[lo])
           for c, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]
    codes = np.repeat(np.arange(k), np.diff(bounds))
    return max(_seq_sum(seg), 0.0), offset, scale, codes


def initial_affine(centroids, shape):
    k = shape.shape[0]
    ms, mc = _seq_sum(shape) / k, _seq_sum(centroids) / k
    cov, var = _seq_sum((shape - ms) * (centroids - mc)), _seq_sum((shape - ms) * (shape - ms))
    scale = max(cov / var, 0.0) if var > 0 else 0.0
    return mc - scale * ms, scale


def shaped_codebook(column, shapes, max_iter, weights=None):
    """Twin of kernels_shapes.shaped_codebook on an unsorted column: (index, offset, scale, float32 entries)."""
    order = np.argsort(column, kind="stable")
    xs = column[order].astype(np.float64)
    u = None if weights is None else np.asarray(weights, np.float64)[order]
    return shaped_from_sorted(xs, u, kmeans_optimal_sorted(xs, shapes.shape[1], u), shapes, max_iter)


def shaped_from_sorted(xs, u, centroids, shapes, max_iter):
    fits = [fit_shape(xs, s, *initial_affine(centroids, s), max_iter, u) for s in shapes]
    best = int(np.argmin([f[0] for f in fits]))
    offset, scale = float(round_fp16(fits[best][1])), float(round_fp16(fits[best][2]))
    entries = np.float32(offset) + np.float32(scale) * shapes[best].astype(np.float32)
    return best, offset, scale, entries.astype(np.float64)


def normalize_shape(shape):
    v = np.sort(shape)
    sd = np.sqrt(((v - v.mean()) ** 2).mean())
    return np.sort(round_fp16((v - v.mean()) / sd)) if sd > 0 else np.zeros_like(v)


def learn_shapes(Wt, weights, bits, count, rounds, max_iter):
    """Twin of kernels_shapes.learn_shapes (same start, same K-Means, same refits)."""
    k = 1 << bits
    sorted_cols = []
    U = []
    for column in Wt:
        order = np.argsort(column, kind="stable")
        xs, u = column[order].astype(np.float64), np.asarray(weights, np.float64)[order]
        c = kmeans_optimal_sorted(xs, k, u)
        sorted_cols.append((xs, u, c))
        sd = np.sqrt(((c - c.mean()) ** 2).mean())
        if sd > 0:
            U.append((c - c.mean()) / sd)
    if not U:
        return normalize_shape(np.linspace(-1.0, 1.0, k))[None, :]
    U = np.array(U)
    m, S = U.shape[0], min(count, U.shape[0])
    order = np.argsort(U[:, -1] - U[:, 0], kind="stable")
    centres = U[order[((2 * np.arange(S) + 1) * m) // (2 * S)]].copy()
    for _ in range(25):
        label = np.array([int(np.argmin([((row - c) ** 2).sum() for c in centres])) for row in U])
        for s in range(S):
            if (label == s).any():
                centres[s] = U[label == s].mean(0)
    shapes = np.stack([normalize_shape(c) for c in centres])
    for _ in range(rounds):
        num, den = np.zeros_like(shapes), np.zeros_like(shapes)
        for xs, u, c in sorted_cols:
            fits = [fit_shape(xs, s, *initial_affine(c, s), max_iter, u) for s in shapes]
            best = int(np.argmin([f[0] for f in fits]))
            _, offset, scale, codes = fits[best]
            bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=k))])
            P0, P1 = np.concatenate([[0.0], np.cumsum(u)]), np.concatenate([[0.0], np.cumsum(u * xs)])
            seg_w, seg_x = P0[bounds[1:]] - P0[bounds[:-1]], P1[bounds[1:]] - P1[bounds[:-1]]
            num[best] += scale * (seg_x - offset * seg_w)
            den[best] += scale * scale * seg_w
        shapes = np.stack([normalize_shape(np.where(den[s] > 0, num[s] / np.where(den[s] > 0, den[s], 1), shapes[s]))
                           for s in range(len(shapes))])
    return shapes


def decode_huffman_chunks(stream, n_bits, starts, symbol, length, codes, ends) -> None:
    """numba_decode.decode_huffman_chunks, one codeword at a time: each codeword is the table entry of the
    next 12 stream bits (least significant first), as long as its length says."""
    for c, bit in enumerate(int(s) for s in starts):
        for i in range(c * CHUNK_CODES, min(codes.size, (c + 1) * CHUNK_CODES)):
            if bit >= n_bits:
                bit = -1
                break
            window = int.from_bytes(bytes(stream[bit // 8:bit // 8 + 3]), "little") >> (bit % 8)
            index = window % (1 << MAX_CODEWORD_BITS)
            if length[index] == 0 or bit + int(length[index]) > n_bits:
                bit = -1
                break
            codes[i] = symbol[index]
            bit += int(length[index])
        ends[c] = bit
