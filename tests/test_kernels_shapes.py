"""Shared codebook shapes (kernels_shapes) against their NumPy twins, and what the fits promise."""
import numpy as np
import pytest

from claq_convert.kernels import numba_quant as kernels, numpy_quant as kernels_numpy, shapes as kernels_shapes


def columns(seed: int, cols: int = 24, rows: int = 48) -> np.ndarray:
    """Heavy-tailed columns of different location and spread, like a weight's (a column per row)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, size=(cols, rows)) * rng.uniform(0.2, 3.0, size=(cols, 1))
            + rng.normal(0.0, 0.5, size=(cols, 1)))


def sorted_sums(column: np.ndarray, weights: np.ndarray):
    order = np.argsort(column, kind="mergesort")
    xs = column[order].astype(np.float64)
    prefix_w, prefix, prefix_sq = kernels.weighted_prefix_sums(xs, weights[order])
    return xs, prefix_w, prefix, prefix_sq


def is_fp16(values: np.ndarray) -> bool:
    return bool(np.array_equal(values, values.astype(np.float16).astype(np.float64)))


@pytest.mark.parametrize("bits, count", [(1, 3), (2, 4), (3, 5)])
def test_learn_shapes_matches_twin(bits, count):
    Wt = columns(bits)
    weights = np.random.default_rng(7).uniform(0.5, 2.0, Wt.shape[1])
    shapes = kernels_shapes.learn_shapes(Wt, weights, bits, count, rounds=2)
    twin = kernels_numpy.learn_shapes(Wt, weights, bits, count, 2, kernels_shapes.FIT_ITERATIONS)
    assert shapes.shape == (min(count, Wt.shape[0]), 1 << bits)
    assert np.allclose(shapes, twin, rtol=0, atol=1e-3)  # fp16 values: equal, or one fp16 step apart on a tie
    assert is_fp16(shapes)
    assert np.all(np.diff(shapes, axis=1) >= 0)
    assert np.allclose(shapes.mean(1), 0.0, atol=2e-3) and np.allclose(shapes.std(1), 1.0, atol=2e-3)


@pytest.mark.parametrize("seed", range(4))
def test_shaped_codebook_matches_twin(seed):
    Wt = columns(10 + seed)
    weights = np.random.default_rng(seed).uniform(0.5, 2.0, Wt.shape[1])
    shapes = kernels_shapes.learn_shapes(Wt, weights, 2, 3)
    for column in Wt:
        xs, prefix_w, prefix, prefix_sq = sorted_sums(column, weights)
        centroids = kernels.kmeans_optimal_weighted(xs, prefix_w, prefix, prefix_sq, 4)
        entries = np.empty(4)
        index, offset, scale = kernels_shapes.shaped_codebook(xs, prefix_w, prefix, prefix_sq, shapes, centroids,
                                                              kernels_shapes.FIT_ITERATIONS, entries)
        t_index, t_offset, t_scale, t_entries = kernels_numpy.shaped_codebook(
            column, shapes, kernels_shapes.FIT_ITERATIONS, weights)
        if index != t_index:  # a tie (an outlier alone in one entry, the rest in another): same error both ways
            u = weights[np.argsort(column, kind="mergesort")]
            fits = [kernels_numpy.fit_shape(xs, s, *kernels_numpy.initial_affine(centroids, s), 12, u)[0]
                    for s in shapes]
            assert fits[index] == pytest.approx(fits[t_index], rel=1e-9)
        else:
            assert (offset, scale) == (t_offset, t_scale)
            assert np.array_equal(entries, t_entries)
        assert scale >= 0 and is_fp16(np.array([offset, scale]))
        assert np.all(np.diff(entries) >= 0)  # ascending, as the codes' order needs
        # what a decoder computes: binary32(offset + scale * shape), one rounding
        decoded = (np.float32(offset) + np.float32(scale) * shapes[index].astype(np.float32)).astype(np.float64)
        assert np.array_equal(entries, decoded)


def test_fit_recovers_an_affine_shape_exactly():
    shape = np.array([-1.5, -0.25, 0.5, 1.25])
    rng = np.random.default_rng(3)
    column = 0.75 + 0.125 * shape[rng.integers(0, 4, 40)]
    xs, prefix_w, prefix, prefix_sq = sorted_sums(column, np.ones(column.size))
    centroids = kernels.kmeans_optimal_weighted(xs, prefix_w, prefix, prefix_sq, 4)
    start = kernels_shapes.initial_affine(centroids, shape)
    bounds = np.zeros(5, np.int64)
    sse, offset, scale = kernels_shapes.fit_shape(xs, prefix_w, prefix, prefix_sq, shape, *start, 20, bounds)
    assert sse == pytest.approx(0.0, abs=1e-20)
    assert (offset, scale) == pytest.approx((0.75, 0.125))


@pytest.mark.parametrize("seed", range(3))
def test_fit_never_worse_than_its_start(seed):
    """Lloyd's steps only lower the weighted SSE: the fit beats the least-squares line through the centroids."""
    column = columns(20 + seed, cols=1, rows=200)[0]
    weights = np.random.default_rng(seed).uniform(0.5, 2.0, column.size)
    xs, prefix_w, prefix, prefix_sq = sorted_sums(column, weights)
    shape = np.array([-1.7, -0.6, 0.1, 0.5, 0.9, 1.2, 1.6, 2.0])
    centroids = kernels.kmeans_optimal_weighted(xs, prefix_w, prefix, prefix_sq, 8)
    offset0, scale0 = kernels_shapes.initial_affine(centroids, shape)
    start = offset0 + scale0 * shape
    u = weights[np.argsort(column, kind="mergesort")]
    start_sse = float(np.sum(u * np.min((xs[:, None] - start[None, :]) ** 2, axis=1)))
    bounds = np.zeros(9, np.int64)
    sse, offset, scale = kernels_shapes.fit_shape(xs, prefix_w, prefix, prefix_sq, shape, offset0, scale0, 30, bounds)
    fitted = offset + scale * shape
    direct = float(np.sum(u * np.min((xs[:, None] - fitted[None, :]) ** 2, axis=1)))
    assert sse == pytest.approx(direct, rel=1e-9)
    assert sse <= start_sse * (1 + 1e-12)
    twin = kernels_numpy.fit_shape(xs, shape, offset0, scale0, 30, u)
    assert twin[0] == pytest.approx(sse, rel=1e-9) and twin[1:3] == pytest.approx((offset, scale), rel=1e-9)


def test_constant_columns():
    Wt = np.full((5, 16), 0.375)
    shapes = kernels_shapes.learn_shapes(Wt, np.ones(16), 2, 4)
    assert shapes.shape == (1, 4) and np.all(np.diff(shapes[0]) > 0)  # one evenly spaced shape
    xs, prefix_w, prefix, prefix_sq = sorted_sums(Wt[0], np.ones(16))
    entries = np.empty(4)
    centroids = kernels.kmeans_optimal_weighted(xs, prefix_w, prefix, prefix_sq, 4)
    index, offset, scale = kernels_shapes.shaped_codebook(xs, prefix_w, prefix, prefix_sq, shapes, centroids,
                                                          kernels_shapes.FIT_ITERATIONS, entries)
    assert (index, offset, scale) == (0, 0.375, 0.0) and np.all(entries == 0.375)


def test_more_shapes_fit_better():
    """The point of a table: with a shape per column's kind the fit is closer to the per-column optimum."""
    Wt = columns(30, cols=60, rows=96)
    ones = np.ones(Wt.shape[1])
    optimum = sum(kernels.column_sse_by_width(Wt[j:j + 1], 3, ones)[0, 2] for j in range(Wt.shape[0]))
    sse = {S: kernels_shapes.fit_columns(Wt, ones, kernels_shapes.learn_shapes(Wt, ones, 3, S))["sse"].sum()
           for S in (1, 8)}
    assert optimum <= sse[8] < sse[1]
