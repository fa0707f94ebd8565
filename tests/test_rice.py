"""Coded codebook levels (format v3, claq_convert/format/rice.py): the encoder, the decoder, and the strictly rising
levels that the quantizer makes so that they can be coded."""
import numpy as np
import pytest

from claq_convert.kernels import numba_quant as kernels, numpy_quant as kernels_numpy
from claq_convert.format import rice, spec


def strict_random_levels(rng, bits) -> np.ndarray:
    books = [kernels_numpy.strict_levels(np.sort(rng.integers(0, 256, 1 << int(b)))[None])[0] for b in bits]
    return np.concatenate(books)


def test_coded_levels_decode_to_what_was_coded():
    rng = np.random.default_rng(0)
    for _ in range(300):
        bits = rng.integers(1, 9, rng.integers(1, 40))
        bits[0] = rng.integers(2, 9)  # at least one inner level
        levels = strict_random_levels(rng, bits)
        stream = rice.encode_levels(levels, bits)
        assert stream is not None and stream.dtype == np.uint8
        assert np.array_equal(rice.decode_levels(stream, bits), levels)


def test_the_spec_worked_example_is_what_the_writer_writes():
    """claq-v2.md, "Worked example (coded)": per row the least gap as base, the k of fewest bits."""
    stream = rice.encode_levels(np.array([0, 9, 200, 255, 0, 255], np.uint8), np.array([2, 1]))
    assert stream.tobytes() == bytes([0x08, 0x00, 0xBE, 0x00, 0x00])


def test_levels_that_cannot_be_coded_are_refused():
    bits = np.array([2, 2])
    assert rice.encode_levels(np.array([0, 5, 5, 255, 0, 1, 2, 255]), bits) is None      # not strictly rising
    assert rice.encode_levels(np.array([0, 5, 9, 254, 0, 1, 2, 255]), bits) is None      # top is not 255
    assert rice.encode_levels(np.array([1, 5, 9, 255, 0, 1, 2, 255]), bits) is None      # first is not 0
    assert rice.encode_levels(np.array([0, 255, 0, 255]), np.array([1, 1])) is None      # nothing to code


def test_coded_levels_take_fewer_bytes_than_u8_levels_on_k_means_like_codebooks():
    """Normal-like columns at 4 bits: about 5 bits an inner level instead of 8 (README, format v3)."""
    rng = np.random.default_rng(1)
    bits = np.full(300, 4)
    books = []
    for _ in bits:
        w = np.sort(rng.standard_normal(576))
        prefix_w, prefix, prefix_sq = kernels.weighted_prefix_sums(w, np.ones(w.size))
        centroids = kernels.kmeans_optimal_weighted(w, prefix_w, prefix, prefix_sq, 16)
        books.append(kernels_numpy.grid_codebook(centroids)[0])
    levels = np.concatenate(books)
    stream = rice.encode_levels(levels, bits)
    assert stream.size < 0.75 * levels.size and np.array_equal(rice.decode_levels(stream, bits), levels)


def test_every_damaged_stream_is_refused_with_a_rule_or_decodes_to_rising_levels():
    rng = np.random.default_rng(2)
    bits = np.array([2, 3, 1, 4, 4, 5])
    good = rice.encode_levels(strict_random_levels(rng, bits), bits)
    rules = set()
    for case in range(3000):
        stream = good.copy()
        kind = case % 3
        if kind == 0:
            stream[rng.integers(stream.size)] ^= np.uint8(1 << rng.integers(8))
        elif kind == 1:
            stream = stream[:rng.integers(stream.size)]
        else:
            stream = np.concatenate([stream, rng.integers(0, 256, rng.integers(1, 4)).astype(np.uint8)])
        try:
            levels = rice.decode_levels(stream, bits)
        except rice.CodedLevelsError as exc:
            rules.add(exc.rule)
            continue
        starts = spec.codebook_offsets(bits)
        for j in range(bits.size):  # whatever decodes is a valid codebook
            column = levels[starts[j]:starts[j + 1]].astype(int)
            assert column[0] == 0 and column[-1] == 255 and np.all(np.diff(column) > 0)
    assert rules >= {"CLAQ-T14", "CLAQ-T15", "CLAQ-T16", "CLAQ-T17"}
    with pytest.raises(rice.CodedLevelsError, match="1 bit") as info:
        rice.decode_levels(np.zeros(1, np.uint8), np.array([1, 1]))
    assert info.value.rule == "CLAQ-T13"


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_grid_codebooks_rise_strictly_from_0_to_255_in_both_kernels(bits):
    """Close centroids, ties and a constant column: the Numba kernel and its NumPy twin (one codebook, or a
    batch of them) give the same strictly rising levels from 0 to 255 (what coded levels need) and entries
    by the decoders' rule."""
    rng = np.random.default_rng(bits)
    k = 1 << bits
    cases = [np.sort(rng.standard_normal(k)), np.full(k, 0.3),
             np.sort(np.concatenate([np.full(k // 2, -0.5), rng.standard_normal(k - k // 2) * 1e-4])),
             np.linspace(-1.0, 1.0, k) ** 3, np.sort(rng.standard_normal(k)) * 1e-6]
    batch_levels, batch_grids, batch_values = kernels_numpy.grid_codebook(np.stack(cases))  # one a row
    for row, centroids in enumerate(cases):
        levels, grid, values = np.zeros(k, np.uint8), np.zeros(2), np.zeros(k)
        kernels.grid_codebook(centroids, levels, grid, values)
        twin_levels, twin_grid, twin_values = kernels_numpy.grid_codebook(centroids)
        assert np.array_equal(levels, twin_levels) and np.array_equal(grid, twin_grid)
        assert np.array_equal(values, twin_values)
        assert np.array_equal(levels, batch_levels[row]) and np.array_equal(grid, batch_grids[row])
        assert np.array_equal(values, batch_values[row])
        assert levels[0] == 0 and levels[-1] == 255 and np.all(np.diff(levels.astype(int)) > 0)
        assert grid[1] > 0 and np.float16(grid[1]) == grid[1]
        expected = np.float32(grid[0]) + np.float32(grid[1]) * levels.astype(np.float32)
        assert np.array_equal(values.astype(np.float32), expected)


def test_strict_levels_is_the_kernels_two_passes():
    rng = np.random.default_rng(3)
    for k in (2, 4, 16, 256):
        raw = np.sort(rng.integers(0, 256, (50, k)), axis=1)
        out = kernels_numpy.strict_levels(raw).astype(int)
        for row, got in zip(raw, out):
            level = row.astype(int).copy()
            level[0] = 0
            for c in range(1, k):
                level[c] = max(level[c], level[c - 1] + 1)
            level[-1] = 255
            for c in range(k - 2, 0, -1):
                level[c] = min(level[c], level[c + 1] - 1)
            assert np.array_equal(got, level)
