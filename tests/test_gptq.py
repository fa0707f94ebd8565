"""GPTQ with codebook and uniform quantizers: codes decode to the kernel's values, compensation helps."""
import numpy as np
import pytest
import torch

from claq_convert.quantize.gptq import GPTQ


def layer_problem(rows=64, cols=96, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix            # correlated inputs, as in real layers
    W = torch.randn(rows, cols, generator=g) * 0.05
    H = 2.0 / n * X.T @ X
    return W, H, X


def output_error(W, Wq, X):
    return float(torch.linalg.norm(X @ (W - Wq).T) / torch.linalg.norm(X @ W.T))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_compensation_beats_plain_kmeans_on_the_layer_output(bits):
    W, H, X = layer_problem()
    b = np.full(W.shape[1], bits)
    with_h = GPTQ(W, H, blocksize=32).quantize(b)
    without = GPTQ(W, None).quantize(b)
    assert output_error(W, torch.from_numpy(with_h.dequantize()), X) < output_error(W, torch.from_numpy(without.dequantize()), X)


def test_result_decodes_from_stored_data_and_reserves_outliers():
    W, H, _ = layer_problem(seed=1)
    bits = np.random.default_rng(0).choice([2, 3, 4], W.shape[1])
    reserve = np.random.default_rng(1).integers(0, 4, W.shape[1])
    r = GPTQ(W, H, blocksize=32).quantize(bits, reserve)
    assert r.codes.shape == tuple(W.shape) and r.codes.dtype == np.uint8
    assert np.array_equal(r.outlier_counts, reserve)
    assert np.all(r.codes < (1 << r.bits.astype(int))[None, :])
    # outlier rows are sorted within each column
    starts = np.concatenate([[0], np.cumsum(r.outlier_counts)])
    for j in range(W.shape[1]):
        assert np.all(np.diff(r.outlier_rows[starts[j]:starts[j + 1]]) > 0)
    deq = r.dequantize()
    assert deq.dtype == np.float32
    assert 0 < r.relative_error < 0.5


def test_without_hessian_each_column_is_quantized_independently():
    W, _, _ = layer_problem(seed=2)
    r = GPTQ(W, None).quantize(np.full(W.shape[1], 3))
    col = GPTQ(W[:, 5:6], None).quantize(np.array([3]))
    assert np.array_equal(r.codes[:, 5], col.codes[:, 0])
    assert np.array_equal(r.column_codebooks[5], col.column_codebooks[0])


def test_dead_columns_and_determinism():
    W, H, _ = layer_problem(seed=3)
    H[:, 10] = 0
    H[10, :] = 0
    a = GPTQ(W, H).quantize(np.full(W.shape[1], 2))
    b = GPTQ(W, H).quantize(np.full(W.shape[1], 2))
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.column_codebooks, b.column_codebooks)
    assert np.all(a.dequantize()[:, 10] == 0)


def test_uniform_baseline_uses_a_per_row_grid():
    W, H, X = layer_problem(seed=4)
    r = GPTQ(W, H).quantize(np.full(W.shape[1], 3), uniform=True)
    assert r.method == "uniform" and r.codes.max() <= 7
    assert len(np.unique(r.dequantize()[0])) <= 8
    rtn = GPTQ(W, None).quantize(np.full(W.shape[1], 3), uniform=True)
    assert output_error(W, torch.from_numpy(r.dequantize()), X) < output_error(W, torch.from_numpy(rtn.dequantize()), X)


def test_grouped_uniform_baseline_fits_a_grid_per_group_of_columns():
    W, H, X = layer_problem(seed=5)
    cols = W.shape[1]
    whole = GPTQ(W, H).quantize(np.full(cols, 3), uniform=True)
    grouped = GPTQ(W, H).quantize(np.full(cols, 3), uniform=True, group_size=16)
    assert grouped.scale.shape == (-(-cols // 16), W.shape[0]) and np.bincount(grouped.group).max() == 16
    Q = grouped.dequantize()
    for g in range(grouped.scale.shape[0]):  # each group's columns lie on that group's grid, row by row
        members = grouped.group == g
        levels = (Q[:, members] / grouped.scale[g][:, None]) + grouped.zero[g][:, None]
        assert np.allclose(levels, np.round(levels), atol=1e-3)
    assert output_error(W, torch.from_numpy(Q), X) < output_error(W, torch.from_numpy(whole.dequantize()), X)


@pytest.mark.parametrize("kind", ["codebook", "grid", "uniform"])
def test_without_hessian_threads_share_the_columns_with_the_one_thread_result(kind):
    # 300 columns in blocks of 32: ten blocks, the last one short, shared by three threads
    W, _, _ = layer_problem(rows=80, cols=300, seed=3)
    bits = np.full(300, 3) if kind == "uniform" else np.arange(300) % 4 + 2
    reserve = None if kind == "uniform" else np.arange(300) % 3
    options = dict(uniform=kind == "uniform", grid=kind == "grid")
    one = GPTQ(W, None, blocksize=32).quantize(bits, reserve, **options)
    shared = GPTQ(W, None, blocksize=32).quantize(bits, reserve, workers=3, **options)
    assert shared.loss == one.loss > 0
    assert shared.relative_error == one.relative_error
    for field in ("bits", "codes", "column_codebooks", "outlier_counts", "outlier_rows", "outlier_values",
                  "scale", "zero", "codebook_levels", "codebook_grid"):
        a, b = getattr(one, field), getattr(shared, field)
        assert (a is None and b is None) or np.array_equal(a, b), field
    assert np.array_equal(shared.dequantize(), one.dequantize())
    if kind != "uniform":
        assert one.outlier_counts.sum() == reserve.sum()


def test_shared_shapes_decode_from_the_table_and_stay_close_to_free_codebooks():
    """MODE_SHAPES through GPTQ: every column's entries are offset + scale * its width's chosen shape,
    the outputs are what those entries give, and the layer-output error stays near the free codebooks'."""
    from claq_convert.kernels import shapes as kernels_shapes

    W, H, X = layer_problem(rows=128, cols=96, seed=2)
    bits = np.random.default_rng(2).choice([2, 3], W.shape[1])
    Wt = W.T.double().numpy()
    shapes = {b: kernels_shapes.learn_shapes(np.ascontiguousarray(Wt[bits == b]), np.ones(W.shape[0]), b, 4)
              for b in (2, 3)}
    r = GPTQ(W, H, blocksize=32).quantize(bits, shapes=shapes)
    free = GPTQ(W, H, blocksize=32).quantize(bits)
    assert r.codebook_levels is None and r.codebook_grid is None and set(r.codebook_shapes) == {2, 3}
    for j, b in enumerate(bits):
        offset, scale = r.shape_affine[j].astype(np.float32)
        table = r.codebook_shapes[b][r.shape_index[j]].astype(np.float32)
        assert r.shape_index[j] < len(shapes[b]) and scale >= 0
        assert np.array_equal(r.column_codebooks[j, :1 << b], offset + scale * table)
    assert np.array_equal(r.dequantize(), r.column_codebooks[np.arange(W.shape[1])[None, :], r.codes])
    shaped, unconstrained = (output_error(W, torch.from_numpy(q.dequantize()), X) for q in (r, free))
    assert unconstrained < shaped < 1.25 * unconstrained
    with pytest.raises(ValueError, match="widths"):
        GPTQ(W, H).quantize(bits, shapes={2: shapes[2]})
