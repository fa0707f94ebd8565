"""tools/bench_code_entropy.py: it reads what the file stores and prices each coder as its report says."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

from claq_convert.format import spec
from claq_convert.format.reader import check_claq_contents
from claq_convert.quantize.convert import encode_result
from claq_convert.quantize.pipeline import QuantConfig, quantize_weight

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_code_entropy", ROOT / "tools" / "bench_code_entropy.py")
entropy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(entropy)


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
        chunks = spec.chunk_count(n)
        assert row["huffman_chunked"] >= row["huffman"] + 32 * chunks + 8 * 2 ** b  # no better than unlimited
    # Gaussian weights: the middle entries are used more often, so coding saves bits at 3 and 4 bits
    assert report[3]["huffman"] < report[3]["fixed"]
