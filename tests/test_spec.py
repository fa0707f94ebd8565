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


def bit_by_bit_words(codes, bits):
    """The stream of pack_codes' docstring, one bit at a time: stream bit t is bit t % 32 of word t // 32."""
    words = [0] * spec.code_words(len(codes), bits)
    for i, code in enumerate(codes):
        for k in range(bits):
            t = i * bits + k
            words[t // 32] |= ((int(code) >> k) & 1) << (t % 32)
    return words


@pytest.mark.parametrize("bits", list(spec.ALLOWED_BITS))
def test_pack_codes_matches_the_bit_by_bit_stream(bits):
    for n in (1, 31, 33, 95):
        codes = np.random.default_rng(100 * bits + n).integers(0, 1 << bits, n)
        reference = bit_by_bit_words(codes, bits)
        assert spec.pack_codes(codes, bits).tolist() == reference
        # unpack takes the words in any integer dtype of 32 bits (the kernels hold them as int32)
        as_int32 = np.array(reference, np.uint32).view(np.int32)
        assert np.array_equal(spec.unpack_codes(as_int32, bits, n), codes)


def test_pack_and_unpack_need_no_per_code_index_arrays():
    # a tied embedding's stream is tens of millions of codes: index arrays of int64 per code took 40
    # bytes a code (1.2 GB in load() for SmolLM2's 28M codes); lane by lane stays near the arrays' own size
    import tracemalloc

    n, bits = 1 << 22, 3
    codes = np.random.default_rng(0).integers(0, 1 << bits, n).astype(np.uint8)
    tracemalloc.start()
    try:
        words = spec.pack_codes(codes, bits)
        _, packing = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        back = spec.unpack_codes(words, bits, n)
        _, unpacking = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(back, codes)
    assert packing < 2.5 * n and unpacking < 2.5 * n, (packing / n, unpacking / n)


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
