"""The Numba kernels against their NumPy twin (exact), and K-Means quality against k-means++ Lloyd."""
import numpy as np
import pytest

from claq_convert.quantize import gptq
from claq_convert.kernels import numba_quant as kernels, numpy_quant as kernels_numpy


def heavy_tailed_column(rng, n):
    return (rng.standard_t(3, n) * 0.02).astype(np.float32)


def test_round_fp16_matches_numpy_including_edges():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20000) * rng.choice([1e-7, 1e-4, 1.0, 1e3, 1e5], 20000)
    x = np.concatenate([x, [0.0, -0.0, 65504.0, 65519.99, 65520.0, -1e9, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26]])
    ours = np.array([kernels.round_fp16(v) for v in x])
    assert np.array_equal(ours, kernels_numpy.round_fp16(x))


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_kmeans_numba_equals_numpy_twin(k):
    rng = np.random.default_rng(k)
    for n in (1, 3, k, 100, 1536):
        xs = np.sort(heavy_tailed_column(rng, n).astype(np.float64))
        prefix = np.concatenate([[0.0], np.cumsum(xs)])
        ours = kernels.kmeans_sorted(xs, prefix, k, 100)
        assert np.array_equal(ours, kernels_numpy.kmeans_sorted(xs, k, 100))
        assert np.all(np.diff(ours) >= 0)


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_optimal_kmeans_numba_equals_the_plain_dynamic_programme(k):
    rng = np.random.default_rng(50 + k)
    for n in (1, k, k + 1, 57, 300):
        xs = np.sort(heavy_tailed_column(rng, n).astype(np.float64))
        prefix = np.concatenate([[0.0], np.cumsum(xs)])
        prefix_sq = np.concatenate([[0.0], np.cumsum(xs * xs)])
        ours = kernels.kmeans_optimal_sorted(xs, prefix, prefix_sq, k)
        twin = kernels_numpy.kmeans_optimal_sorted(xs, k)
        assert np.allclose(ours, twin, rtol=0, atol=1e-12)
        assert sse(xs, ours) <= sse(xs, kernels.kmeans_sorted(xs, prefix, k, 100)) * (1 + 1e-12)


@pytest.mark.parametrize("k", [2, 4, 16])
def test_weighted_kmeans_is_the_weighted_optimum(k):
    """Weights pull the centroids: the DP's weighted SSE is the least over all contiguous splits (the
    plain DP twin), beats the unweighted fit's weighted SSE, and unit weights give the unweighted fit."""
    rng = np.random.default_rng(70 + k)
    for n in (k + 1, 57, 300):
        xs = np.sort(heavy_tailed_column(rng, n).astype(np.float64))
        u = rng.lognormal(0.0, 1.5, n)
        pw, p, psq = (np.concatenate([[0.0], np.cumsum(v)]) for v in (u, u * xs, u * xs * xs))
        ours = kernels.kmeans_optimal_weighted(xs, pw, p, psq, k)
        assert np.allclose(ours, kernels_numpy.kmeans_optimal_sorted(xs, k, u), rtol=0, atol=1e-12)
        plain = kernels.kmeans_optimal_sorted(xs, np.cumsum(np.r_[0.0, xs]), np.cumsum(np.r_[0.0, xs * xs]), k)
        assert wsse(xs, u, ours) <= wsse(xs, u, plain) * (1 + 1e-12)
        ones = np.arange(n + 1.0)
        assert np.array_equal(kernels.kmeans_optimal_weighted(xs, ones, np.cumsum(np.r_[0.0, xs]),
                                                              np.cumsum(np.r_[0.0, xs * xs]), k), plain)
        lloyd = kernels.kmeans_sorted_weighted(xs, pw, p, k, 100)
        assert np.array_equal(lloyd, kernels_numpy.kmeans_sorted(xs, k, 100, u))
        assert wsse(xs, u, ours) <= wsse(xs, u, lloyd) * (1 + 1e-12)


def wsse(x, u, centroids):
    return float(np.sum(u * np.min((x[:, None] - centroids[None, :]) ** 2, axis=1)))


def test_column_sse_table_equals_the_plain_fits():
    rng = np.random.default_rng(9)
    for n in (3, 9, 17, 200):
        Wt = heavy_tailed_column(rng, 5 * n).reshape(5, n).astype(np.float32)
        for weights in (np.ones(n), rng.lognormal(0.0, 1.5, n)):
            ours = kernels.column_sse_by_width(Wt, 4, weights)
            twin = kernels_numpy.column_sse_by_width(Wt, 4, weights)
            assert ours.shape == (5, 4) and np.allclose(ours, twin, rtol=1e-9, atol=1e-12)
            assert np.all(np.diff(ours, axis=1) <= 1e-12)  # more bits never cost more error


def sse(x, centroids):
    return float(np.sum(np.min((x[:, None] - centroids[None, :]) ** 2, axis=1)))


def kmeanspp_lloyd(x, k, seed, iters=300):
    """Textbook k-means++ seeding + Lloyd, the baseline our deterministic kernel must match."""
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min((x[:, None] - np.array(centroids)[None, :]) ** 2, axis=1)
        centroids.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[0])
    c = np.array(centroids)
    for _ in range(iters):
        assign = np.argmin((x[:, None] - c[None, :]) ** 2, axis=1)
        new = np.array([x[assign == j].mean() if np.any(assign == j) else c[j] for j in range(k)])
        if np.array_equal(new, c):
            break
        c = new
    return c


@pytest.mark.parametrize("k", [4, 8, 16])
def test_optimal_kmeans_sse_no_worse_than_best_of_kmeanspp(k):
    rng = np.random.default_rng(100 + k)
    for _ in range(10):
        x = heavy_tailed_column(rng, 576).astype(np.float64)
        xs = np.sort(x)
        prefix = np.concatenate([[0.0], np.cumsum(xs)])
        ours = sse(x, kernels.kmeans_optimal_sorted(xs, prefix, np.concatenate([[0.0], np.cumsum(xs * xs)]), k))
        best = min(sse(x, kmeanspp_lloyd(x, k, seed)) for seed in range(5))
        assert ours <= best * (1 + 1e-9)


def test_nearest_code_picks_the_closest_entry_and_the_lower_on_ties():
    codebook = np.array([-1.0, 0.0, 0.5, 2.0])
    for x, want in [(-5, 0), (-0.5, 0), (-0.49, 1), (0.25, 1), (0.26, 2), (1.25, 2), (1.3, 3), (9, 3)]:
        assert kernels.nearest_code(float(x), codebook) == want
    xs = np.linspace(-3, 3, 601)
    assert np.array_equal([kernels.nearest_code(v, codebook) for v in xs], kernels_numpy.nearest_code(xs, codebook))


def block_inputs(rng, rows=96, cnt=40):
    W1 = (rng.standard_t(4, (cnt, rows)) * 0.05).astype(np.float32)
    A = rng.standard_normal((cnt, cnt))
    Hinv = np.linalg.cholesky(np.linalg.inv(A @ A.T + cnt * np.eye(cnt))).T.astype(np.float32)
    bits = rng.choice([1, 2, 3, 4], cnt).astype(np.int64)
    reserve = rng.integers(0, 6, cnt).astype(np.int64)
    return W1, Hinv, bits, reserve


def example_shapes():
    """Two shared shapes for each of the widths 1 to 4 (fp16 values, ascending), as gptq.shape_tables packs them."""
    rng = np.random.default_rng(5)
    return gptq.shape_tables({b: np.sort(rng.standard_normal((2, 1 << b)), axis=1).astype(np.float16)
                              for b in range(1, 5)})


def run_block(module, W1, Hinv, bits, reserve, mode, fit_all=False, max_iter=0, weights=None, guard=0.0):
    cnt, rows = W1.shape
    weights = np.ones(rows) if weights is None else weights
    W = W1.copy()
    out = dict(codebooks=np.zeros((cnt, 16), np.float32), codes=np.zeros((cnt, rows), np.uint8),
               reserved=np.zeros((cnt, rows), np.uint8), Q=np.zeros((cnt, rows), np.float32),
               Err=np.zeros((cnt, rows), np.float32), levels=np.zeros((cnt, 16), np.uint8),
               grids=np.zeros((cnt, 2), np.float64))
    scale, zero = np.full(rows, 0.03), np.full(rows, 7.0)
    shapes = example_shapes() if mode == kernels.MODE_SHAPES else kernels.no_shapes()
    loss = module.gptq_block(W, Hinv, weights, mode, bits, reserve, fit_all, max_iter, scale, zero, out["codebooks"],
                             out["codes"], out["reserved"], out["Q"], out["Err"], out["levels"], out["grids"], *shapes,
                             False, guard)
    return loss, W, out


def far_outlier_block(rng, rows=384, cnt=24):
    """Gaussian columns; every third one has one weight 40 sigma out, which alone spans its grid."""
    W1 = (rng.standard_normal((cnt, rows)) * 0.02).astype(np.float32)
    W1[::3, 5] = 0.8
    return W1, np.eye(cnt, dtype=np.float32), np.full(cnt, 4, np.int64), np.zeros(cnt, np.int64)


@pytest.mark.parametrize("weighted", [False, True])
def test_grid_guard_numba_equals_numpy_twin(weighted):
    rng = np.random.default_rng(7)
    W1, _, _, _ = far_outlier_block(rng)
    _, Hinv, bits, reserve = block_inputs(rng, rows=W1.shape[1], cnt=W1.shape[0])  # GPTQ's updates between columns
    bits, reserve = np.maximum(bits, 3), np.minimum(reserve, 1)
    reserve[::3] = 0  # the far-outlier columns plan none: the guard's to find
    weights = np.random.default_rng(8).lognormal(0.0, 1.5, W1.shape[1]) if weighted else None
    # 1e-9: every column tries a reserve, and most tries are undone (the twins must agree on both)
    loss_a, W_a, a = run_block(kernels, W1, Hinv, bits, reserve, kernels.MODE_GRID, weights=weights, guard=1e-9)
    loss_b, W_b, b = run_block(kernels_numpy, W1, Hinv, bits, reserve, kernels.MODE_GRID, weights=weights, guard=1e-9)
    assert np.array_equal(W_a, W_b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    extra = a["reserved"].sum(axis=1) - reserve
    assert extra.min() >= 0 and extra.max() <= kernels.GUARD_EXTRA and extra.sum() > 0, extra
    assert np.count_nonzero(extra[1::3]) + np.count_nonzero(extra[2::3]) < extra.size // 3, extra  # most undone


def test_grid_guard_keeps_a_reserve_only_when_it_pays_for_its_bits():
    """The guard looking at every column (1e-9; no GPTQ updates, so columns stand alone): each reserve it
    keeps cut its column's error by the share GUARD_GAIN / rows, and the one more it tried did not."""
    W1, Hinv, bits, reserve = far_outlier_block(np.random.default_rng(3))
    rows = W1.shape[1]
    keep = 1.0 - kernels.GUARD_GAIN / rows
    error = lambda out: ((W1.astype(np.float64) - out["Q"]) ** 2).sum(axis=1)  # noqa: E731
    _, _, guarded = run_block(kernels, W1, Hinv, bits, reserve, kernels.MODE_GRID, guard=1e-9)
    extra = guarded["reserved"].sum(axis=1).astype(np.int64)
    assert np.all(extra[::3] >= 1) and 0 < np.count_nonzero(extra) < extra.size  # kept some, undid others
    fixed = {k: error(run_block(kernels, W1, Hinv, bits, np.full(W1.shape[0], k), kernels.MODE_GRID)[2])
             for k in range(extra.max() + 2)}
    for c in range(W1.shape[0]):
        e = extra[c]
        assert error(guarded)[c] == pytest.approx(fixed[e][c], rel=1e-6)
        for k in range(e):  # every kept step paid ...
            assert fixed[k + 1][c] <= fixed[k][c] * keep * (1 + 1e-6), (c, k)
        if e < kernels.GUARD_EXTRA:  # ... and the next would not have
            assert fixed[e + 1][c] > fixed[e][c] * keep * (1 - 1e-6), (c, e)


def test_grid_guard_reserves_the_far_outlier_and_nothing_else():
    W1, Hinv, bits, reserve = far_outlier_block(np.random.default_rng(3))
    _, _, plain = run_block(kernels, W1, Hinv, bits, reserve, kernels.MODE_GRID)
    _, _, guarded = run_block(kernels, W1, Hinv, bits, reserve, kernels.MODE_GRID, guard=0.02)
    far = np.arange(W1.shape[0]) % 3 == 0
    assert plain["reserved"].sum() == 0
    assert np.array_equal(guarded["reserved"][far].sum(axis=1), np.ones(far.sum()))  # the outlier, in fp16
    assert np.all(guarded["reserved"][far][:, 5] == 1) and guarded["reserved"][~far].sum() == 0
    error = lambda out: ((W1 - out["Q"]) ** 2).sum(axis=1)  # noqa: E731
    assert np.all(error(guarded)[far] < 0.8 * error(plain)[far])  # the grid now spans the bulk alone
    assert np.array_equal(error(guarded)[~far], error(plain)[~far])
    # the share the guard reads: far above 2% on a far-outlier column's grid, small once it is reserved
    shares = [kernels.grid_rounding_share(W1[i].astype(np.float64), np.ones(W1.shape[1]), out["Q"][i].astype(np.float64),
                                          out["reserved"][i], out["grids"][i, 1]) for out in (plain, guarded) for i in (0,)]
    assert shares[0] > 0.2 and shares[1] < 0.02, shares


@pytest.mark.parametrize("mode,max_iter", [(kernels.MODE_CODEBOOK, 0), (kernels.MODE_CODEBOOK, 100),
                                           (kernels.MODE_GRID, 0), (kernels.MODE_UNIFORM, 0),
                                           (kernels.MODE_SHAPES, 0)])
@pytest.mark.parametrize("fit_all", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_gptq_block_numba_equals_numpy_twin(mode, max_iter, fit_all, weighted):
    W1, Hinv, bits, reserve = block_inputs(np.random.default_rng(7))
    weights = np.random.default_rng(8).lognormal(0.0, 1.5, W1.shape[1]) if weighted else None
    if mode == kernels.MODE_UNIFORM:
        bits[:] = 4
    loss_a, W_a, a = run_block(kernels, W1, Hinv, bits, reserve, mode, fit_all, max_iter, weights)
    loss_b, W_b, b = run_block(kernels_numpy, W1, Hinv, bits, reserve, mode, fit_all, max_iter, weights)
    assert np.array_equal(W_a, W_b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert loss_a == pytest.approx(loss_b, rel=1e-6)  # summation order differs


def test_gptq_block_reserves_the_largest_magnitudes_exactly():
    W1, Hinv, bits, reserve = block_inputs(np.random.default_rng(3))
    Hinv = np.eye(W1.shape[0], dtype=np.float32)  # no propagation: columns stay as given
    _, _, out = run_block(kernels, W1, Hinv, bits, reserve, kernels.MODE_CODEBOOK)
    for i in range(W1.shape[0]):
        kept = np.flatnonzero(out["reserved"][i])
        assert kept.size == reserve[i]
        top = np.argsort(-np.abs(W1[i]), kind="stable")[: reserve[i]]
        assert set(kept) == set(top)
        assert np.array_equal(out["Q"][i, kept], W1[i, kept].astype(np.float16).astype(np.float32))
        k = 1 << bits[i]
        cb = out["codebooks"][i, :k]
        assert np.all(np.diff(cb) >= 0) and np.all(cb == cb.astype(np.float16))
        rest = np.setdiff1d(np.arange(W1.shape[1]), kept)
        assert np.array_equal(out["Q"][i, rest], cb[out["codes"][i, rest]])


def test_shapes_codebook_entries_follow_the_decoders_rule():
    """Shared shapes: each column's entries are binary32(offset + scale * shape[index]), fp16 offset and
    scale >= 0, ascending; every non-reserved entry decodes through them."""
    W1, Hinv, bits, reserve = block_inputs(np.random.default_rng(4))
    table, counts = example_shapes()
    _, _, out = run_block(kernels, W1, Hinv, bits, reserve, kernels.MODE_SHAPES)
    for i, b in enumerate(bits):
        k, index = 1 << int(b), int(out["levels"][i, 0])
        offset, scale = out["grids"][i]
        assert index < counts[b] and np.float16(offset) == offset and np.float16(scale) == scale and scale >= 0
        entries = np.float32(offset) + np.float32(scale) * table[b, index, :k].astype(np.float32)
        assert np.array_equal(entries, out["codebooks"][i, :k]) and np.all(np.diff(entries) >= 0)
        rest = out["reserved"][i] == 0
        assert np.array_equal(out["Q"][i, rest], out["codebooks"][i, out["codes"][i, rest]])


def test_grid_codebook_entries_follow_the_decoders_rule():
    """Grid codebooks: entries are float32(offset) + float32(step) * level, ascending, near the centroids."""
    W1, Hinv, bits, reserve = block_inputs(np.random.default_rng(3))
    _, _, out = run_block(kernels, W1, Hinv, bits, reserve, kernels.MODE_GRID)
    _, _, fp16 = run_block(kernels, W1, Hinv, bits, reserve, kernels.MODE_CODEBOOK)
    for i, b in enumerate(bits):
        k = 1 << int(b)
        offset, step = out["grids"][i]
        assert np.float16(offset) == offset and np.float16(step) == step and step >= 0
        entries = np.float32(offset) + np.float32(step) * out["levels"][i, :k].astype(np.float32)
        assert np.array_equal(entries, out["codebooks"][i, :k])
        assert np.all(np.diff(entries) >= 0) and out["levels"][i, :k].max() <= kernels.GRID_TOP
        if k > 1 and np.all(np.diff(fp16["codebooks"][i, :k]) > 0):  # the grid reaches the top centroid
            assert entries[-1] >= fp16["codebooks"][i, k - 1] - step


@pytest.mark.parametrize("x", [0.0, 1e-9, 3e-5, 6.103515625e-05, 0.1, 0.30004, 1.0, 1000.3])
def test_fp16_at_least_is_the_least_fp16_not_below(x):
    r = kernels.fp16_at_least(x)
    assert r >= x and np.float16(r) == r and kernels_numpy.fp16_at_least(x) == r
    below = np.nextafter(np.float16(r), np.float16(-np.inf))
    assert r == 0 or float(below) < x


@pytest.mark.parametrize("n,k", [(9, 8), (40, 4), (700, 16), (5000, 64)])
def test_parallel_dp_equals_serial_dp(n, k):
    """kmeans_dp_parallel hands each DP row's subproblems to threads: every split and SSE as kmeans_dp."""
    rng = np.random.default_rng(n)
    xs = np.sort(rng.standard_t(3, n) * 0.1)
    xs[n // 3: n // 3 + n // 10] = xs[n // 3]  # a run of equal entries: ties between splits
    prefix_w, prefix, prefix_sq = kernels.weighted_prefix_sums(xs, rng.lognormal(0.0, 1.0, n))
    k = min(k, n - 1)
    serial, parallel = np.zeros((k, n + 1), np.int64), np.zeros((k, n + 1), np.int64)
    sse_serial, sse_parallel = np.zeros(k), np.zeros(k)
    kernels.kmeans_dp(prefix_w, prefix, prefix_sq, n, k, serial, sse_serial)
    kernels.kmeans_dp_parallel(prefix_w, prefix, prefix_sq, n, k, parallel, sse_parallel)
    assert np.array_equal(serial, parallel)
    assert np.array_equal(sse_serial, sse_parallel)
    assert np.all(np.diff(sse_serial) <= 0) and sse_serial[-1] < sse_serial[0]


@pytest.mark.parametrize("mode", [kernels.MODE_CODEBOOK, kernels.MODE_GRID])
def test_gptq_block_parallel_dp_is_the_serial_result(mode):
    W1, Hinv, bits, reserve = block_inputs(np.random.default_rng(11), rows=300, cnt=12)
    weights = np.random.default_rng(12).lognormal(0.0, 1.0, W1.shape[1])
    results = []
    for parallel in (False, True):
        cnt, rows = W1.shape
        W = W1.copy()
        out = [np.zeros((cnt, 16), np.float32), np.zeros((cnt, rows), np.uint8), np.zeros((cnt, rows), np.uint8),
               np.zeros((cnt, rows), np.float32), np.zeros((cnt, rows), np.float32), np.zeros((cnt, 16), np.uint8),
               np.zeros((cnt, 2), np.float64)]
        loss = kernels.gptq_block(W, Hinv, weights, mode, bits, reserve, False, 0, np.zeros(1), np.zeros(1), *out,
                                  *kernels.no_shapes(), parallel)
        results.append((loss, W, out))
    (loss_a, W_a, a), (loss_b, W_b, b) = results
    assert loss_a == loss_b and np.array_equal(W_a, W_b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.any(a[1])  # codes were written


def test_first_calls_from_two_threads_at_once_do_not_crash():
    """gptq_block reaches a parallel loop; its first calls from two threads at once crashed the process
    before the threading layer was started at import (kernels/numba_quant.py). A fresh process, so the calls
    are first."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import threading
        import numpy as np
        from claq_convert import kernels

        def run(seed):
            rng = np.random.default_rng(seed)
            cnt, rows = 32, 300
            out = [np.zeros((cnt, 256), np.float32), np.zeros((cnt, rows), np.uint8), np.zeros((cnt, rows), np.uint8),
                   np.zeros((cnt, rows), np.float32), np.zeros((cnt, rows), np.float32),
                   np.zeros((cnt, 256), np.uint8), np.zeros((cnt, 2))]
            kernels.gptq_block(rng.standard_normal((cnt, rows)).astype(np.float32), np.eye(cnt, dtype=np.float32),
                               np.ones(rows), kernels.MODE_GRID, np.full(cnt, 4, np.int64), np.zeros(cnt, np.int64),
                               False, 0, np.zeros(1), np.zeros(1), *out, *kernels.no_shapes(), False)

        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("done")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]
