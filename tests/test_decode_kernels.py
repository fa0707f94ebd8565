"""The Numba decode/product kernels against their NumPy twins, and ClaqLinear's kernel paths against the
portable Torch decoder: decoding bit for bit, products to fp32 rounding."""
import itertools

import numpy as np
import pytest
import torch

from claq_convert.kernels import numba_decode as kernels_decode, numpy_quant as kernels_numpy, simd
from claq_convert.runtime import modules
from claq_convert.format import reader, spec
from claq_convert.quantize.convert import encode_result
from claq_convert.quantize.gptq import GPTQ


def random_stream(rng, bits, n, rows):
    codes = rng.integers(0, 1 << bits, n * rows)
    tables = np.sort(rng.standard_normal((n, 1 << bits)), axis=1).astype(np.float32)
    return spec.pack_codes(codes, bits).view(np.int32), tables, codes.reshape(n, rows)


AVX512 = [False, pytest.param(True, marks=pytest.mark.skipif(
    not simd.available(), reason="the table-lookup kernels need a CPU with AVX-512F; the fallback runs here"))]


@pytest.mark.parametrize("avx512", AVX512)
@pytest.mark.parametrize("bits", list(spec.ALLOWED_BITS))
@pytest.mark.parametrize("rows", [64, 29, 33, 96])  # 96: the lookup decode's tiles of 32 rows, 64: of 64
def test_decode_stream_equals_the_twin_bit_for_bit(bits, rows, avx512):
    rng = np.random.default_rng(bits * 100 + rows)
    n, C = 7, 12
    words, tables, codes = random_stream(rng, bits, n, rows)
    columns = np.sort(rng.choice(C, n, replace=False)).astype(np.int64)  # a width's subset of the columns
    ours, twin = np.full((C, rows), np.nan, np.float32), np.full((C, rows), np.nan, np.float32)
    kernels_decode.decode_stream(words, bits, tables, columns, rows, ours, avx512=avx512)
    kernels_numpy.decode_stream(words, bits, tables, columns, rows, twin)
    expected = np.take_along_axis(tables, codes, axis=1)
    assert np.array_equal(ours[columns], expected) and np.array_equal(twin[columns], expected)
    untouched = np.setdiff1d(np.arange(C), columns)
    assert np.all(np.isnan(ours[untouched]))
    # a chunk of stream columns (first = 3) decoded on its own, as the CPU matmul path does
    chunk = np.empty((4, rows), np.float32)
    kernels_decode.decode_stream(words, bits, tables[3:7], np.arange(4), rows, chunk, first=3, avx512=avx512)
    assert np.array_equal(chunk, expected[3:7])


@pytest.mark.parametrize("avx512", AVX512)
@pytest.mark.parametrize("bits", [1, 3, 4, 6, 8])
@pytest.mark.parametrize("rows", [64, 33, 96])  # 96: tiles of 32 rows in the lookup kernel, 64: of 64
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("tile_floats", [kernels_decode.TILE_FLOATS, 64])  # 64: two row tiles of 32
def test_product_stream_agrees_with_the_twin(bits, rows, M, tile_floats, avx512, monkeypatch):
    """To fp32 rounding: each product within 1e-6 of sum |x| |w| (+ |y| it adds to) of the float64 sum,
    a few ulps of float32 accumulation over n = 9 columns."""
    monkeypatch.setattr(kernels_decode, "TILE_FLOATS", tile_floats)
    rng = np.random.default_rng(bits * 1000 + rows + M)
    n, C = 9, 11
    words, tables, codes = random_stream(rng, bits, n, rows)
    columns = np.sort(rng.choice(C, n, replace=False)).astype(np.int64)
    x = rng.standard_normal((M, C)).astype(np.float32)
    start = rng.standard_normal((M, rows)).astype(np.float32)  # products accumulate into y
    twin = start.copy()
    kernels_numpy.product_stream(words, bits, tables, columns, rows, x, twin)
    exact = start + x[:, columns].astype(np.float64) @ np.take_along_axis(tables, codes, axis=1).astype(np.float64)
    scale = np.abs(x[:, columns]).astype(np.float64) @ np.abs(np.take_along_axis(tables, codes, axis=1))
    for parts in (1, 2, 3):
        ours = start.copy()
        kernels_decode.product_stream(words, bits, tables, columns, rows, x, ours, parts, avx512=avx512)
        assert np.all(np.abs(ours - exact) <= 1e-6 * (scale + np.abs(start)) + 1e-7)
    assert np.all(np.abs(twin - exact) <= 1e-6 * (scale + np.abs(start)) + 1e-7)


@pytest.mark.skipif(not simd.available(), reason="the table-lookup kernel needs a CPU with AVX-512F")
@pytest.mark.parametrize("bits", list(spec.ALLOWED_BITS))
def test_lookup_product_matches_the_twin_and_ignores_threads(bits, monkeypatch):
    """Batch 1 by AVX-512 lookups, every width, rows of a real model's shapes (tiles of 64), many
    columns: within 1e-6 * sum |x| |w| of the NumPy twin (float64 sums, so to fp32 rounding), and bit
    for bit the same on 1 and 2 threads and by the serial kernel (each row sums its columns in one order)."""
    import numba

    monkeypatch.setattr(kernels_decode, "PARALLEL_BYTES", 0)  # the parallel kernel, whatever the size
    rng = np.random.default_rng(bits)
    n, rows = 200, 192
    words, tables, codes = random_stream(rng, bits, n, rows)
    columns = np.arange(n, dtype=np.int64)
    x = rng.standard_normal((1, n)).astype(np.float32)
    twin = np.zeros((1, rows), np.float32)
    kernels_numpy.product_stream(words, bits, tables, columns, rows, x, twin)
    scale = np.abs(x).astype(np.float64) @ np.abs(np.take_along_axis(tables, codes, axis=1))
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            ours = np.zeros((1, rows), np.float32)
            kernels_decode.product_stream(words, bits, tables, columns, rows, x, ours, threads, avx512=True)
            results.append(ours)
    finally:
        numba.set_num_threads(before)
    monkeypatch.setattr(kernels_decode, "PARALLEL_BYTES", 1 << 60)
    results.append(np.zeros((1, rows), np.float32))
    kernels_decode.product_stream(words, bits, tables, columns, rows, x, results[-1], 1, avx512=True)
    assert np.all(np.abs(results[0] - twin) <= 1e-6 * scale)
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_lookup_product_refused_without_avx512(monkeypatch):
    monkeypatch.setattr(simd, "available", lambda: False)
    words, tables, _ = random_stream(np.random.default_rng(0), 4, 2, 32)
    x, y = np.ones((1, 2), np.float32), np.zeros((1, 32), np.float32)
    with pytest.raises(RuntimeError, match="AVX-512F"):
        kernels_decode.product_stream(words, 4, tables, np.arange(2), 32, x, y, 1, avx512=True)
    kernels_decode.product_stream(words, 4, tables, np.arange(2), 32, x, y, 1)  # the default falls back
    twin = np.zeros_like(y)
    kernels_numpy.product_stream(words, 4, tables, np.arange(2), 32, x, twin)
    np.testing.assert_allclose(y, twin, rtol=1e-6, atol=1e-6)


def quantized_sections(rows, cols, seed, grid, widths=(2, 3, 4, 5)):
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    rng = np.random.default_rng(seed)
    r = GPTQ(W, None).quantize(rng.choice(list(widths), cols), rng.integers(0, 3, cols), grid=grid)
    return encode_result(r)


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("rows", [64, 29])
def test_claq_linear_kernels_match_the_reference_decoder(rows, grid, monkeypatch):
    cols = 40
    sections = quantized_sections(rows, cols, rows + grid, grid)
    expected = torch.from_numpy(reader.decode_claq(rows, sections))
    fast = modules.ClaqLinear(rows, sections, bias=torch.arange(rows, dtype=torch.float32))
    portable = modules.ClaqLinear(rows, sections, bias=torch.arange(rows, dtype=torch.float32), kernels="torch")
    assert torch.equal(fast.decode(), expected) and torch.equal(portable.decode(), expected)
    assert torch.equal(fast.weight, expected)
    buffer = torch.full((cols, rows), float("nan"))
    assert torch.equal(fast.decode(buffer), expected) and torch.equal(buffer.T, expected)  # decoded in place
    with pytest.raises(ValueError, match="out_t must be"):
        fast.decode(torch.empty(rows, cols))
    with torch.no_grad():
        # batch 1: the product kernel; more rows: decoded whole and one matmul, then (a chunk limit below
        # the weight's size) several column chunks per stream
        for batch, chunk in itertools.product(((1, cols), (2, 3, cols), (16, cols), (2, 20, cols)),
                                              (modules.CHUNK_PARAMS, rows * 7)):
            monkeypatch.setattr(modules, "CHUNK_PARAMS", chunk)
            x = torch.randn(*batch)
            reference = x.double() @ expected.double().T + torch.arange(rows, dtype=torch.float64)
            scale = x.abs().double() @ expected.abs().double().T + rows
            for layer in (fast, portable):
                y = layer(x)
                assert y.shape == (*batch[:-1], rows) and y.dtype == torch.float32
                assert torch.all((y.double() - reference).abs() <= 1e-6 * scale), layer.kernels
            assert fast(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_claq_linear_product_follows_torch_threads():
    import numba

    rows, cols = 96, 64
    sections = quantized_sections(rows, cols, 5, True, widths=(3, 4))
    layer = modules.ClaqLinear(rows, sections)
    x = torch.randn(1, cols)
    before = torch.get_num_threads()
    numba_threads = []
    try:
        torch.set_num_threads(1)
        one = layer(x)
        numba_threads.append(numba.get_num_threads())
        torch.set_num_threads(2)
        two = layer(x)
        numba_threads.append(numba.get_num_threads())
    finally:
        torch.set_num_threads(before)
    assert numba_threads == [1, min(2, numba.config.NUMBA_NUM_THREADS)]
    assert torch.equal(one, two)  # batch 1 sums each group of rows in one fixed order, whatever the threads


def test_tied_head_multiplies_from_the_codes_without_decoding_the_table():
    rows, cols = 320, 32
    sections = quantized_sections(rows, cols, 9, True)
    embedding = modules.ClaqEmbedding(rows, sections)
    head = modules.ClaqTiedHead(embedding)
    x = torch.randn(2, cols)
    expected = x.double() @ torch.from_numpy(reader.decode_claq(rows, sections)).double().T
    calls = []
    embedding.decode = lambda: calls.append(1)  # the generation path must not decode the whole table
    torch.testing.assert_close(head(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert calls == []


def test_unknown_kernels_choice_is_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        modules.ClaqLinear(29, quantized_sections(29, 8, 1, False), kernels="fast")
