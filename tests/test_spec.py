"""Bit packing and byte accounting of the format module."""
import numpy as np
import pytest

from claq_convert.format import spec


def test_pack_codes_worked_example():
    # The example in the docstring and in formats/claq-v1.md: 3-bit codes 5, 1, 7 -> 0b111_001_101.
    assert spec.pack_codes([5, 1, 7], 3).tolist() == [0x1CD]
    # A 3-bit code straddling a word: code 10 starts at bit 30.
    codes = [0] * 10 + [0b110]
    words = spec.pack_codes(codes, 3)
    assert words.tolist() == [0b10 << 30, 0b1]


@pytest.mark.parametrize("bits", list(spec.ALLOWED_BITS))
@pytest.mark.parametrize("n", [0, 1, 10, 11, 31, 32, 33, 997])
def test_pack_unpack_roundtrip(bits, n):
    codes = np.random.default_rng(n * 10 + bits).integers(0, 1 << bits, n).astype(np.uint8)
    words = spec.pack_codes(codes, bits)
    assert words.dtype == np.dtype("<u4") and words.size == spec.code_words(n, bits)
    assert np.array_equal(spec.unpack_codes(words, bits, n), codes)
    if n:  # unused high bits of the last word are zero
        used = n * bits - 32 * (words.size - 1)
        assert int(words[-1]) >> used == 0 if used < 32 else True


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError):
        spec.pack_codes([4], 2)


def test_section_lengths_and_stored_bytes():
    bits = np.array([2, 4, 4, 3], np.uint8)
    lengths = spec.claq_section_lengths(100, bits, n_outliers=3)
    assert lengths["bit_widths"] == 4
    assert lengths["codebooks"] == 2 * (4 + 16 + 16 + 8)
    assert lengths["codes_2"] == 4 * spec.code_words(100, 2)
    assert lengths["codes_4"] == 4 * spec.code_words(200, 4)
    assert lengths["codes_3"] == 4 * spec.code_words(100, 3)
    assert lengths["outlier_counts"] == 4 and lengths["outlier_rows"] == 6 and lengths["outlier_values"] == 6
    assert "codes_1" not in lengths
    assert spec.claq_stored_bytes(100, bits, 3) == sum(spec.align(v) for v in lengths.values())
    assert "outlier_rows" not in spec.claq_section_lengths(100, bits, 0)
    assert spec.claq_section_lengths(100, bits, 300, max_count=300)["outlier_counts"] == 8


def test_stream_section_names_take_ascii_digits_only():
    assert spec.is_code_section("codes_3") and spec.is_huffman_section("huffman_8")
    assert not spec.is_code_section("codes_²") and not spec.is_huffman_section("huffman_²")
    assert not spec.is_huffman_section("huffman_") and not spec.is_code_section("codes_x")
