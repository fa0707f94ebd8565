"""The --bpw budget: coded levels estimated before GPTQ, and the file held to the budget after it."""
import weakref
from collections.abc import MutableMapping
from dataclasses import replace

import numpy as np
import pytest
import torch

from claq_convert.kernels import numba_quant as kernels, numpy_quant as kernels_numpy
from claq_convert.format import spec
from claq_convert.quantize.allocation import LEVEL_MARGIN, coded_level_bits, coded_levels_bytes
from claq_convert.quantize.budget import narrowed, narrowing_costs, within_budget
from claq_convert.quantize.convert import encode_result, stored_bytes
from claq_convert.quantize.pipeline import QuantConfig, quantize_weight
from claq_convert.format.reader import decode_claq
from claq_convert.format.rice import encode_levels


def _weight(seed: int, rows: int = 64, cols: int = 24, bits: float = 3, outlier_bits: float = 0.0, codebook="auto"):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.linspace(0.2, 2.0, cols)
    return quantize_weight(W, None, QuantConfig(method="claq", bits=bits, ap_bits=(3, 4), outlier_bits=outlier_bits,
                                                codebook=codebook))


def test_data_free_levels_numba_equals_numpy_and_rise_strictly():
    rng = np.random.default_rng(0)
    Wt = (rng.standard_t(3, size=(9, 97)) * 0.02).astype(np.float32)
    Wt[3] = 0.5  # a constant column
    for bits in (2, 3, 5):
        levels = np.empty((9, 1 << bits), np.uint8)
        weights = rng.uniform(0.1, 3.0, Wt.shape[1]) if bits == 3 else np.ones(Wt.shape[1])
        kernels.data_free_levels(Wt, bits, weights, levels)
        assert np.array_equal(levels, kernels_numpy.data_free_levels(Wt, bits, weights))
        assert np.all(levels[:, 0] == 0) and np.all(levels[:, -1] == spec.GRID_TOP)
        assert np.all(np.diff(levels.astype(int), axis=1) > 0)


def test_coded_level_estimate_over_every_column_is_the_coded_length_up_to_padding():
    rng = np.random.default_rng(1)
    W = (rng.standard_t(4, size=(200, 40)) * 0.03).astype(np.float32)
    for bits in (2, 4, 5):
        estimate = coded_level_bits(W, 5, sample=W.shape[1])
        assert estimate[0] == 0.0 and np.all(estimate[1:] > 0) and np.all(estimate[1:] < 8 * (2 ** np.arange(2, 6) - 2))
        levels = kernels_numpy.data_free_levels(np.ascontiguousarray(W.T), bits, np.ones(W.shape[0]))
        widths = np.full(W.shape[1], bits)
        actual = encode_levels(levels.ravel(), widths).size
        exact = coded_levels_bytes(widths, estimate, margin=1.0)
        assert exact is not None and actual <= exact <= actual + 2  # two bit streams, each padded to a byte
        table = spec.rice_table_bytes(widths)  # priced: the streams with the margin GPTQ's levels need
        assert coded_levels_bytes(widths, estimate) - table == pytest.approx(LEVEL_MARGIN * (exact - table), abs=3)
    assert coded_levels_bytes(np.full(5, 1), estimate) is None  # 1-bit columns store no coded levels
    assert coded_levels_bytes(np.full(5, 3), None) is None      # no estimate: u8 levels, as before


@pytest.mark.parametrize("codebook", ["auto", "f16"])
def test_a_narrowed_column_loses_a_bit_and_the_rest_stays(codebook):
    result = _weight(2, outlier_bits=0.2, codebook=codebook)
    columns = np.flatnonzero(result.bits >= 2)[::3]
    narrow = narrowed(result, columns)
    assert np.array_equal(narrow.bits[columns], result.bits[columns] - 1)
    others = np.setdiff1d(np.arange(result.shape[1]), columns)
    before, after = result.dequantize(), narrow.dequantize()
    assert np.array_equal(before[:, others], after[:, others])
    assert np.array_equal(narrow.outlier_values, result.outlier_values)  # outliers are kept as they were
    for j in columns:  # at most half the values, each pair replaced by about its mean
        kept = np.ones(result.shape[0], bool)  # the rows of the column's outliers, kept as fp16, aside
        kept[narrow.outlier_rows[np.repeat(np.arange(result.shape[1]), narrow.outlier_counts) == j]] = False
        assert np.unique(after[kept, j]).size <= 1 << int(narrow.bits[j])
        spread = float(np.ptp(before[kept, j]))
        assert abs(float(np.mean(after[kept, j] - before[kept, j]))) <= 0.01 * spread + 1e-6
    assert np.array_equal(decode_claq(result.shape[0], encode_result(narrow)), after)
    assert stored_bytes(narrow) < stored_bytes(result)
    assert narrow.info["narrowed_columns"] == columns.size


def test_narrowing_costs_rank_a_column_with_close_entries_first():
    result = _weight(3)
    columns, cost, saved = narrowing_costs(result)
    assert np.array_equal(columns, np.flatnonzero(result.bits >= 2)) and np.all(cost >= 0) and np.all(saved > 0)
    squeezed = result.column_codebooks.copy()
    j = int(columns[5])
    squeezed[j] = squeezed[j, 0]  # every entry the same: merging them costs nothing
    _, cost2, _ = narrowing_costs(type(result)(**{**result.__dict__, "column_codebooks": squeezed}))
    assert cost2[5] == 0.0 and np.argmin(cost2) == 5


def test_within_budget_fits_the_budget_and_leaves_a_fitting_set_alone():
    results = {f"w{i}": _weight(10 + i, outlier_bits=0.1 * i) for i in range(3)}
    total = sum(stored_bytes(r) for r in results.values())
    same, record = within_budget(dict(results), total, stored_bytes)
    assert all(same[n] is results[n] for n in results) and record["narrowed_columns"] == 0
    assert record["quantized_bytes"] == record["quantized_bytes_before"] == total
    fitted, record = within_budget(dict(results), total - 150, stored_bytes)
    assert sum(stored_bytes(r) for r in fitted.values()) == record["quantized_bytes"] <= total - 150
    assert record["narrowed_columns"] > 0 and record["quantized_bytes_before"] == total
    assert sum(int(r.bits.sum()) for r in fitted.values()) < sum(int(r.bits.sum()) for r in results.values())
    with pytest.raises(ValueError, match="raise --bpw"):
        within_budget(dict(results), 10, stored_bytes)


class ReadWhenAsked(MutableMapping):
    """Results as checkpoint.SavedResults hands them out: a fresh copy at each read. Counts the reads and
    the most results alive at once (weak references: a copy is alive while anything holds it)."""

    def __init__(self, results: dict):
        self.results, self.reads, self.writes, self.alive, self.most_alive = dict(results), 0, 0, [], 0

    def __getitem__(self, name):
        self.reads += 1
        self.alive = [ref for ref in self.alive if ref() is not None]
        copy = replace(self.results[name], codes=self.results[name].codes.copy())
        self.alive.append(weakref.ref(copy))
        self.most_alive = max(self.most_alive, len(self.alive))
        return copy

    def __setitem__(self, name, result):
        self.writes += 1
        self.results[name] = result

    def __delitem__(self, name):
        del self.results[name]

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)


def test_within_budget_reads_a_weight_at_a_time_and_narrows_as_in_memory():
    results = {f"w{i}": _weight(40 + i, outlier_bits=0.1 * (i % 2)) for i in range(6)}
    total = sum(stored_bytes(r) for r in results.values())
    budget = total - 600
    expected, expected_record = within_budget(dict(results), budget, stored_bytes)
    lazily = ReadWhenAsked(results)
    fitted, record = within_budget(lazily, budget, stored_bytes)
    assert fitted is lazily and record == expected_record and record["narrowed_columns"] > 0
    for name in results:
        assert np.array_equal(lazily.results[name].dequantize(), expected[name].dequantize())
        assert np.array_equal(lazily.results[name].bits, expected[name].bits)
    # read once to be counted, and once more before each narrowing of it
    assert lazily.writes > 0 and lazily.reads == len(results) + lazily.writes
    assert lazily.most_alive == 1  # each weight let go before the next is read


def test_a_conversion_whose_estimate_is_short_is_still_held_to_its_budget(tiny_model_dir, text_file, tmp_path,
                                                                          monkeypatch):
    from claq_convert.quantize import allocation
    from claq_convert.quantize.convert import ConvertOptions, run_conversion
    from claq_convert.format.reader import ClaqFile

    # every level priced as free: the allocation overspends, and the count after GPTQ must take it back
    monkeypatch.setattr(allocation, "coded_level_bits", lambda W, max_bits, **_: np.zeros(max_bits))
    out = tmp_path / "short.claq"
    record = run_conversion(ConvertOptions(model_dir=tiny_model_dir, out=out, quant=QuantConfig(bpw=3.4, head_bits=3),
                                           calib=(text_file,), nsamples=4, seqlen=32))
    budget = record["budget"]
    assert budget["quantized_bytes_before"] > budget["budget_bytes"] and budget["narrowed_columns"] > 0
    assert record["summary"]["stored_bytes"] == budget["quantized_bytes"] <= budget["budget_bytes"]
    assert record["summary"]["honest_bpw"] <= 3.4
    with ClaqFile(out) as cf:  # the file holds the narrowed weights, and they decode
        narrowed_widths = sum(int(cf.sections(n)["bit_widths"].astype(int).sum()) for n in record["tensors"])
        assert narrowed_widths == sum(sum(int(b) * n for b, n in t["bits_histogram"].items())
                                      for t in record["tensors"].values())
        for name in record["tensors"]:
            assert list(cf.decode(name).shape) == record["tensors"][name]["shape"]


def test_encoded_results_hold_one_weights_sections_and_encode_it_once(monkeypatch):
    from claq_convert.quantize import convert

    results = [_weight(20 + i) for i in range(4)]
    sizes, encodings_of = [stored_bytes(r) for r in results], [encode_result(r) for r in results]
    encodings = []
    monkeypatch.setattr(convert, "encode_result", lambda r: encodings.append(r) or encode_result(r))
    encoded = convert.EncodedResults()
    assert [encoded.stored_bytes(r) for r in results] == sizes
    assert len(encodings) == 4
    # the budget pass counted all four; only the last one's sections are still held
    assert encoded._latest[0] is results[-1]
    for r, size, expected in zip(results, sizes, encodings_of):  # then each is written: counted and
        assert encoded.stored_bytes(r) == size                   # written on one encoding
        sections = encoded.sections(r)
        assert sections.keys() == expected.keys() and all(np.array_equal(sections[k], expected[k]) for k in sections)
    assert len(encodings) == 4 + 4
    fresh = _weight(30)  # without a budget pass: counted, then written, on one encoding
    encoded.stored_bytes(fresh), encoded.sections(fresh)
    assert len(encodings) == 9


def test_code_counts_go_a_block_of_codes_at_a_time(monkeypatch):
    # the budget pass ranks every weight, the head too: counting a whole weight at once took an int64
    # index per code and np.bincount's int64 copy of it (16 bytes a code: 2 GB for a 7B's head)
    import tracemalloc

    from claq_convert.quantize import budget

    monkeypatch.setattr(budget, "COUNT_BLOCK", 1 << 16)
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 16, (4096, 500)).astype(np.uint8)  # 2M codes; blocks of 16 columns, the last of 4
    expected = np.stack([np.bincount(codes[:, j], minlength=budget.MAX_ENTRIES) for j in range(codes.shape[1])])
    tracemalloc.start()
    try:
        counts = budget.code_counts(codes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts.dtype == np.float64 and np.array_equal(counts, expected.astype(np.float64))
    assert peak < 2 * codes.size, peak / codes.size
