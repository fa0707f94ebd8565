"""Outlier Order, adaptive-precision bit split and outlier budget."""
import numpy as np
import pytest

from claq_convert.quantize import columns


def matrix_with_outlier_columns():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((200, 50)) * 0.01
    W[:5, 7] = 1.0    # column 7: five outliers
    W[:2, 3] = 1.0    # column 3: two
    W[0, 40] = 0.5    # column 40: one
    return W


def test_outlier_counts_use_the_whole_matrix_mean():
    W = matrix_with_outlier_columns()
    counts = columns.outlier_counts(W, 13.0)
    thr = 13 * np.abs(W).mean()
    assert np.array_equal(counts, (np.abs(W) >= thr).sum(0))
    assert counts[7] == 5 and counts[3] == 2 and counts[40] == 1


def test_outlier_order_ranks_counts_then_peak_then_index():
    W = matrix_with_outlier_columns()
    order = columns.outlier_order(W, 13.0)
    assert list(order[:3]) == [7, 3, 40]
    peak = np.abs(W).max(0)
    rest = order[3:]
    assert np.all(np.diff(peak[rest]) <= 0)  # ties at zero count fall back to the peak magnitude
    assert np.array_equal(order, columns.outlier_order(W.copy(), 13.0))


@pytest.mark.parametrize("target,low,high,fraction", [
    (2.1, 2, 4, 0.05), (2.2, 2, 4, 0.10), (3.1, 3, 4, 0.10), (3.5, 3, 4, 0.5), (3, 3, 3, 0.0), (4, 4, 4, 0.0)])
def test_split_bits_follows_the_papers_rule(target, low, high, fraction):
    got = columns.split_bits(target)
    assert got[:2] == (low, high) and got[2] == pytest.approx(fraction)


def test_split_bits_rejects_targets_outside_the_rule_and_accepts_an_explicit_pair():
    with pytest.raises(ValueError):
        columns.split_bits(8.5)
    with pytest.raises(ValueError):
        columns.split_bits(1.5)
    assert columns.split_bits(4.5) == (4, 5, 0.5)  # above the paper's range: the two widths around it
    assert columns.split_bits(2.5, 2, 3) == (2, 3, 0.5)
    with pytest.raises(ValueError):
        columns.split_bits(1.5, 2, 3)


def test_column_bits_gives_high_width_to_the_top_of_the_order():
    W = matrix_with_outlier_columns()
    order = columns.outlier_order(W, 13.0)
    bits = columns.column_bits(order, 2.2)        # 10% of 50 columns -> 5 at 4 bits
    assert sorted(np.flatnonzero(bits == 4)) == sorted(order[:5])
    assert np.all(bits[order[5:]] == 2)
    assert bits.mean() == pytest.approx(2.2)


def test_column_reserve_spends_at_most_the_budget_and_favours_top_columns():
    rows, cols = 576, 576
    order = np.random.default_rng(1).permutation(cols)
    reserve = columns.column_reserve(order, rows, 0.07)
    per_outlier, table = columns.outlier_cost_bits(rows, cols)
    spent = reserve.sum() * per_outlier + table
    assert spent <= 0.07 * rows * cols
    assert spent > 0.07 * rows * cols - per_outlier  # and leaves less than one outlier unspent
    top = order[: round(0.1 * cols)]
    assert reserve[top].min() > reserve[order[len(top):]].max()
    assert columns.column_reserve(order, rows, 0.0).sum() == 0


def test_allocation_prefers_driven_columns_and_respects_the_budget():
    from claq_convert.quantize import allocation

    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 32)).astype(np.float32)
    quiet, loud = np.full(32, 1e-3), np.full(32, 1e3)
    tables = {"quiet": allocation.candidates(W, quiet), "loud": allocation.candidates(W, loud)}
    for table in tables.values():  # more bytes never estimate more loss
        ordered = sorted(table, key=lambda c: c.nbytes)
        assert all(a.loss >= b.loss - 1e-12 for a, b in zip(ordered, ordered[1:]) if a.setting.high <= b.setting.low)
    budget = (tables["quiet"][1].nbytes + tables["quiet"][3].nbytes)  # room for 2 + 4 bits in total
    choice = allocation.allocate(tables, budget)
    assert sum(c.nbytes for c in choice.values()) <= budget
    assert choice["loud"].setting.target > choice["quiet"].setting.target
    with pytest.raises(ValueError, match="below the smallest"):
        allocation.allocate(tables, 10)


def test_column_allocation_gives_bits_to_the_columns_that_need_them_within_the_exact_budget():
    from claq_convert.quantize import allocation
    from claq_convert.format import spec

    rng = np.random.default_rng(3)
    W = rng.standard_normal((96, 40)).astype(np.float32)
    fisher = np.where(np.arange(40) < 10, 1e3, 1.0)  # the first ten columns drive the loss
    losses = allocation.column_losses(W, None, fisher=fisher)
    assert losses.shape == (40, allocation.MAX_BITS) and np.all(np.diff(losses, axis=1) <= 0)
    budget = spec.claq_stored_bytes(96, np.full(40, 3), 0, grid=True)  # 3 bits a column on average
    widths = allocation.allocate_columns({"w": losses}, {"w": 96}, budget)["w"]
    assert widths.dtype == np.int64 and widths.shape == (40,)
    assert budget - 96 * 40 // 8 // 4 < spec.claq_stored_bytes(96, widths, 0, grid=True) <= budget
    assert widths[:10].min() > widths[10:].max()  # the driven columns get the bits
    assert widths.max() <= allocation.GRID_MAX_BITS  # grid codebooks throughout
    # the matrix-level candidates sum the same per-column losses
    table = allocation.candidates(W, None, fisher=fisher)
    plain = next(c for c in table if c.setting == allocation.Setting(4, 4, 0.0))
    assert plain.loss == pytest.approx(losses[:, 3].sum())
    with pytest.raises(ValueError, match="below the smallest"):
        allocation.allocate_columns({"w": losses}, {"w": 96}, 10)
