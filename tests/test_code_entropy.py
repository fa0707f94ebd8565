"""tools/bench_code_entropy.py: the coders it prices are real prefix codes, and it reads what the file stores."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

from claq_convert.format.reader import check_claq_contents
from claq_convert.quantize.convert import encode_result
from claq_convert.quantize.pipeline import QuantConfig, quantize_weight

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_code_entropy", ROOT / "tools" / "bench_code_entropy.py")
entropy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(entropy)


def test_huffman_lengths_form_an_optimal_prefix_code():
    assert entropy.huffman_lengths(np.array([8, 4, 2, 2])).tolist() == [1, 2, 3, 3]  # dyadic: the entropy exactly
    assert entropy.huffman_lengths(np.array([0, 5, 0])).tolist() == [0, 1, 0]
    counts = np.random.default_rng(0).integers(0, 1000, 16)
    lengths = entropy.huffman_lengths(counts)
    used = counts > 0
    assert np.sum(2.0 ** -lengths[used]) == 1.0 and np.all(lengths[~used] == 0)  # Kraft: a full prefix code
    p = counts / counts.sum()
    h = entropy.cross_entropy_bits(counts, p)
    assert h <= float((counts * lengths).sum()) < h + counts.sum()  # within a bit a symbol of the entropy


def test_the_report_counts_every_stored_code_by_its_entry_rank():
    torch.manual_seed(0)
    W = torch.randn(96, 40)
    result = quantize_weight(W, None, QuantConfig(method="kmeans", bits=3.5))
    sections = check_claq_contents("w", 96, {k: v for k, v in encode_result(result).items()})
    report = entropy.tensor_report(96, sections)
    for b, row in report.items():
        n = int(np.count_nonzero(result.bits == b)) * 96
        assert row["codes"] == n and row["fixed"] == n * b
        assert row["column_entropy"] <= row["pooled_entropy"] <= row["huffman"] <= row["fixed"]
        assert row["huffman_with_offsets"] == row["huffman"] + 32 * (n // 96)
        chunks = -(-n // entropy.CHUNK_CODES)
        assert row["huffman_chunked"] >= row["huffman"] + 32 * chunks + 8 * 2 ** b  # no better than unlimited
    # Gaussian weights: the middle entries are used more often, so coding saves bits at 3 and 4 bits
    assert report[3]["huffman"] < report[3]["fixed"]


def test_limited_lengths_stay_within_the_limit_and_form_a_full_prefix_code():
    fibonacci = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 0, 4181])
    assert entropy.huffman_lengths(fibonacci).max() == 18  # the deepest tree 19 symbols can make
    lengths = entropy.limited_lengths(fibonacci, longest=8)
    assert lengths.max() <= 8 and lengths[18] == 0 and np.all(lengths[fibonacci > 0] > 0)
    assert np.sum(2.0 ** -lengths[fibonacci > 0]) == 1.0
    counts = np.array([50, 30, 20])
    assert entropy.limited_lengths(counts).tolist() == entropy.huffman_lengths(counts).tolist()  # nothing to do


def test_chunked_streams_decode_to_their_symbols():
    rng = np.random.default_rng(1)
    for size, count in ((16, 3 * entropy.CHUNK_CODES + 17), (256, 5000), (2, 1), (8, entropy.CHUNK_CODES)):
        symbols = np.minimum(rng.geometric(0.3, count) - 1, size - 1).astype(np.int64)
        lengths = entropy.limited_lengths(np.bincount(symbols, minlength=size))
        words, chunk_starts, bits = entropy.encode_stream(symbols, lengths)
        assert bits == int(lengths[symbols].sum()) and chunk_starts.size == -(-count // entropy.CHUNK_CODES)
        symbol, length = entropy.decode_table(lengths)
        out = np.empty(count, np.uint8)
        entropy.decode_stream(words, chunk_starts, count, symbol, length, out)
        assert np.array_equal(out, symbols)
