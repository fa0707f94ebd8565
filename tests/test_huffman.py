"""Coded code streams (format v4, huffman_<b>): the spec's worked example, round trips over chunk edges,
the Numba decoder against its NumPy twin, every rule T19-T23 from a damaged section, the writer's choice
and the allocation's estimate of coded bits."""
import numpy as np
import pytest

from claq_convert.format import huffman, spec
from claq_convert.format.huffman import CodedCodesError, coded_section, decode_codes, encode_codes
from claq_convert.format.reader import BadTensorData, check_claq_contents, decode_claq
from claq_convert.format.writer import encode_claq_sections
from claq_convert.kernels import numba_decode, numba_quant, numpy_quant
from claq_convert.quantize import allocation


def bell_codes(rng, bits: int, n: int) -> np.ndarray:
    """Codes used as a K-Means column's are: the middle entries more often than the tails."""
    p = np.exp(-0.5 * np.linspace(-2.5, 2.5, 1 << bits) ** 2)
    return rng.choice(1 << bits, n, p=p / p.sum()).astype(np.uint8)


def test_worked_example_of_the_spec():
    codes = np.array([1, 1, 0, 2, 1, 1], np.uint8)
    lengths = huffman.limited_lengths(np.bincount(codes, minlength=4))
    assert lengths.tolist() == [2, 1, 2, 0]
    section = coded_section(codes, lengths)
    assert section.tobytes().hex() == "00000000" "02010200" "34"
    assert decode_codes(section, 2, 6).tolist() == codes.tolist()
    assert encode_codes(codes, 2) is None  # 9 bytes against codes_2's 4: the writer keeps the words


def test_canonical_codewords_are_a_prefix_code_in_length_then_value_order():
    lengths = np.array([3, 2, 3, 0, 2, 2])
    reversed_codes = huffman.canonical_codewords(lengths)
    words = {s: format(int(reversed_codes[s]), f"0{lengths[s]}b")[::-1] for s in np.flatnonzero(lengths)}
    assert words == {1: "00", 4: "01", 5: "10", 0: "110", 2: "111"}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_every_stream_round_trips_over_chunk_edges(bits, n):
    rng = np.random.default_rng(bits * 7 + n)
    codes = bell_codes(rng, bits, n)
    counts = np.bincount(codes, minlength=1 << bits)
    section = coded_section(codes, huffman.limited_lengths(counts))
    assert np.array_equal(decode_codes(section, bits, n), codes)
    assert section.size == spec.huffman_prefix_bytes(n, bits) + (huffman.coded_bits(counts, huffman.limited_lengths(counts)) + 7) // 8


def test_one_value_streams_take_a_bit_a_code():
    codes = np.full(10000, 5, np.uint8)
    section = encode_codes(codes, 4)
    assert section is not None and section.size == spec.huffman_prefix_bytes(10000, 4) + 10000 // 8
    assert np.array_equal(decode_codes(section, 4, 10000), codes)


def test_huffman_lengths_form_an_optimal_prefix_code():
    assert huffman.huffman_lengths(np.array([8, 4, 2, 2])).tolist() == [1, 2, 3, 3]  # dyadic: the entropy exactly
    assert huffman.huffman_lengths(np.array([0, 5, 0])).tolist() == [0, 1, 0]
    counts = np.random.default_rng(0).integers(0, 1000, 16)
    lengths = huffman.huffman_lengths(counts)
    used = counts > 0
    assert np.sum(2.0 ** -lengths[used]) == 1.0 and np.all(lengths[~used] == 0)  # Kraft: a full prefix code
    p = counts / counts.sum()
    h = -float(np.sum(counts * np.log2(np.where(p > 0, p, 1))))
    assert h <= float((counts * lengths).sum()) < h + counts.sum()  # within a bit a symbol of the entropy


def test_limited_lengths_stay_within_the_limit_and_form_a_full_prefix_code():
    fibonacci = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 0, 4181])
    assert huffman.huffman_lengths(fibonacci).max() == 18  # the deepest tree 19 symbols can make
    lengths = huffman.limited_lengths(fibonacci, longest=8)
    assert lengths.max() <= 8 and lengths[18] == 0 and np.all(lengths[fibonacci > 0] > 0)
    assert np.sum(2.0 ** -lengths[fibonacci > 0]) == 1.0
    counts = np.array([50, 30, 20])
    assert huffman.limited_lengths(counts).tolist() == huffman.huffman_lengths(counts).tolist()  # nothing to do


def test_lengths_stay_within_twelve_bits_and_keep_krafts_inequality():
    counts = np.array([1 << 40] + [1] * 255, np.float64)  # an unlimited code would need 255-bit codewords
    lengths = huffman.limited_lengths(counts)
    assert lengths.max() <= spec.MAX_CODEWORD_BITS and (lengths > 0).all()
    assert np.sum(2.0 ** -lengths) <= 1.0


def test_writer_codes_a_stream_only_where_that_is_shorter():
    rng = np.random.default_rng(0)
    rows, bits = 512, np.array([4] * 6 + [1] * 3 + [8] * 2, np.uint8)
    codes = np.stack([bell_codes(rng, int(b), rows) for b in bits], axis=1)
    codes[:, -2:] = rng.integers(0, 256, (rows, 2))  # uniform 8-bit codes: nothing to gain
    books = np.sort(rng.normal(size=(bits.size, 256)), axis=1).astype(np.float16)
    sections = encode_claq_sections(rows, bits, codes, books, np.zeros(bits.size, np.uint8),
                                    np.zeros(0, np.uint16), np.zeros(0, np.float16))
    assert "huffman_4" in sections and "codes_4" not in sections
    assert "codes_1" in sections and "codes_8" in sections  # a 1-bit code cannot shrink; uniform codes do not
    assert sections["huffman_4"].size < 4 * spec.code_words(6 * rows, 4)
    checked = check_claq_contents("w", rows, sections)
    assert "huffman_4" not in checked and np.array_equal(checked["codes_4"], spec.pack_codes(codes[:, :6].T.ravel(), 4))
    expected = books.astype(np.float32)[np.arange(bits.size)[None, :], codes]
    assert np.array_equal(decode_claq(rows, sections), expected)


def two_chunk_section():
    """6000 3-bit codes (two chunks) and their valid section."""
    rng = np.random.default_rng(3)
    codes = bell_codes(rng, 3, 6000)
    section = coded_section(codes, huffman.limited_lengths(np.bincount(codes, minlength=8)))
    return codes, section


def test_every_rule_of_a_damaged_section():
    codes, good = two_chunk_section()
    n, chunks, prefix = codes.size, 2, spec.huffman_prefix_bytes(codes.size, 3)
    lengths = good[4 * chunks:prefix].astype(np.int64)

    def fails(section, rule):
        with pytest.raises(CodedCodesError) as info:
            decode_codes(np.asarray(section, np.uint8), 3, n)
        assert info.value.rule == rule, str(info.value)

    fails(good[:prefix + n // 8 - 1], "CLAQ-T19")
    fails(np.concatenate([good, np.zeros(12 * n // 8, np.uint8)]), "CLAQ-T19")
    for bad_lengths in ([13] + [3] * 7, [0] * 8, [1, 1, 1] + [3] * 5):
        changed = good.copy()
        changed[4 * chunks:prefix] = bad_lengths
        fails(changed, "CLAQ-T20")
    first = good.copy()
    first[:4] = [1, 0, 0, 0]
    fails(first, "CLAQ-T21")
    past = good.copy()
    past[4:8] = np.frombuffer(np.uint32(8 * (good.size - prefix) + 1).tobytes(), np.uint8)
    fails(past, "CLAQ-T21")
    shifted = good.copy()  # chunk 1 said to start one bit later: chunk 0 no longer ends there
    shifted[4:8] = np.frombuffer((good[4:8].view("<u4") + 1).tobytes(), np.uint8)
    fails(shifted, "CLAQ-T23")
    fails(np.concatenate([good, [0]]), "CLAQ-T23")
    end_bits = int(np.sum(lengths[codes]))
    assert end_bits % 8  # the last byte has padding bits to spoil
    padded = good.copy()
    padded[-1] |= 0x80
    fails(padded, "CLAQ-T23")
    # an incomplete code: give the longest codeword's value a length one more, so its old codeword's
    # sibling starts no codeword; a stream that meets one breaks T22
    incomplete = lengths.copy()
    one = int(np.argmax(incomplete))
    incomplete[one] += 1
    assert np.sum(2.0 ** -incomplete[incomplete > 0]) < 1
    section = coded_section(codes, incomplete)
    assert np.array_equal(decode_codes(section, 3, n), codes)
    ones = section.copy()
    ones[prefix:] = 0xFF  # all-ones bits: the longest codeword, then the one no value has
    fails(ones, "CLAQ-T22")
    cut = section[:-1]  # the last codeword runs past the end; the section is still long enough for T19
    assert cut.size >= prefix + (n + 7) // 8
    fails(cut, "CLAQ-T22")


def test_the_reader_reports_a_damaged_stream_as_bad_tensor_data():
    codes, good = two_chunk_section()
    rows = 6000
    sections = {"bit_widths": np.array([3], np.uint8), "codebooks": np.arange(8, dtype=np.float16),
                "huffman_3": np.concatenate([good, [0]]).astype(np.uint8)}
    with pytest.raises(BadTensorData) as info:
        check_claq_contents("w", rows, sections)
    assert info.value.rule == "CLAQ-T23" and "huffman_3" in str(info.value)
    sections["huffman_3"] = good
    assert np.array_equal(decode_claq(rows, sections)[:, 0], codes.astype(np.float32))


@pytest.mark.parametrize("damage", ["none", "bytes", "offset", "lengths"])
def test_numba_decoder_agrees_with_its_numpy_twin(damage):
    rng = np.random.default_rng({"none": 0, "bytes": 1, "offset": 2, "lengths": 3}[damage])
    codes = bell_codes(rng, 4, 9000)
    lengths = huffman.limited_lengths(np.bincount(codes, minlength=16))
    if damage == "lengths":
        lengths[int(np.argmax(lengths))] += 1  # incomplete: some bits start no codeword
    section = coded_section(codes, lengths)
    prefix = spec.huffman_prefix_bytes(codes.size, 4)
    starts = section[:12].view("<u4").astype(np.int64)
    stream = section[prefix:].copy()
    if damage == "bytes":
        stream[rng.integers(0, stream.size, 40)] ^= rng.integers(1, 256, 40).astype(np.uint8)
    if damage == "offset":
        starts[1] += 3
    n_bits = 8 * stream.size
    padded = np.concatenate([stream, np.zeros(2, np.uint8)])
    symbol, length = huffman.decode_table(lengths)
    out = []
    for kernel in (numba_decode.decode_huffman_chunks, numpy_quant.decode_huffman_chunks):
        got, ends = np.zeros(codes.size, np.uint8), np.zeros(starts.size, np.int64)
        kernel(padded, n_bits, starts, symbol, length, got, ends)
        out.append((got, ends))
    assert np.array_equal(out[0][1], out[1][1])
    for c, end in enumerate(out[0][1]):  # codes agree wherever a chunk decoded
        if end >= 0:
            chunk = slice(c * spec.CHUNK_CODES, (c + 1) * spec.CHUNK_CODES)
            assert np.array_equal(out[0][0][chunk], out[1][0][chunk])
    if damage == "none":
        assert np.array_equal(out[0][0], codes)


def test_data_free_code_counts_are_the_nearest_entries_of_the_grid_codebook():
    rng = np.random.default_rng(5)
    Wt = rng.standard_t(4, size=(3, 700)).astype(np.float32)
    weights = np.ones(700)
    counts = np.zeros((3, 8), np.int64)
    numba_quant.data_free_code_counts(Wt, 3, weights, counts)
    for j in range(3):
        xs = np.sort(Wt[j]).astype(np.float64)
        prefix_w, prefix, prefix_sq = numba_quant.weighted_prefix_sums(xs, weights)
        centroids = numba_quant.kmeans_optimal_weighted(xs, prefix_w, prefix, prefix_sq, 8)
        book = np.empty(8)
        numba_quant.grid_codebook(centroids, np.empty(8, np.uint8), np.empty(2), book)
        nearest = np.argmin(np.abs(xs[:, None] - book[None, :]), axis=1)  # ties: the lower entry, as nearest_code
        assert np.array_equal(counts[j], np.bincount(nearest, minlength=8))


def test_coded_code_bits_estimate_is_below_the_width_as_for_gaussian_lloyd_max_codes():
    rng = np.random.default_rng(6)
    W = rng.normal(size=(2048, 64)).astype(np.float32)
    bits = allocation.coded_code_bits(W, 5)
    assert bits[0] == 1.0 and np.all(bits <= np.arange(1, 6))
    # a Gaussian's Lloyd-Max codes have entropy 1.91, 2.83, 3.77 bits at 2, 3, 4 bits; Huffman adds a little
    assert np.all(np.abs(bits[1:4] - [1.95, 2.86, 3.80]) < 0.08), bits


def test_priced_coded_codes_enter_the_stored_bytes():
    bits = np.array([3] * 50 + [4] * 10)
    fixed = spec.claq_stored_bytes(1000, bits, 0, grid=True)
    priced = allocation.coded_codes_bytes(1000, bits, np.array([1.0, 1.9, 2.8, 3.7, 4.6, 5.5]))
    assert set(priced) == {3, 4} and priced[3] == spec.huffman_prefix_bytes(50000, 3) + int(np.ceil(allocation.CODE_MARGIN[2] * 2.8 * 50000 / 8))
    coded = spec.claq_stored_bytes(1000, bits, 0, grid=True, coded_codes=priced)
    assert coded < fixed
    lengths = spec.claq_section_lengths(1000, bits, 0, grid=True, coded_codes=priced)
    assert "huffman_3" in lengths and "codes_3" not in lengths


def test_inspect_counts_the_coded_streams_and_their_bytes(tmp_path):
    from claq_convert.format.inspection import render, summarize
    from claq_convert.format.reader import open_claq
    from claq_convert.format.writer import ClaqWriter

    rng = np.random.default_rng(8)
    rows, bits = 1024, np.array([3] * 4 + [1] * 2, np.uint8)
    codes = np.stack([bell_codes(rng, int(b), rows) for b in bits], axis=1)
    books = np.sort(rng.normal(size=(bits.size, 8)), axis=1).astype(np.float16)
    sections = encode_claq_sections(rows, bits, codes, books, np.zeros(bits.size, np.uint8),
                                    np.zeros(0, np.uint16), np.zeros(0, np.float16))
    with ClaqWriter(tmp_path / "w.claq") as writer:
        writer.add_quantized("w", rows, sections)
    with open_claq(tmp_path / "w.claq") as cf:
        cf.validate()
        summary = summarize(cf)
        assert np.array_equal(cf.decode("w"), books.astype(np.float32)[np.arange(bits.size)[None, :], codes])
    q = summary["quantized"]
    assert (q["code_streams"], q["coded_streams"]) == (2, 1)
    assert q["code_bytes"] == spec.align(sections["huffman_3"].size) + spec.align(sections["codes_1"].nbytes)
    assert "1 of 2 streams Huffman-coded" in render(summary)


def test_the_encoder_writes_the_same_bytes_block_by_block(monkeypatch):
    codes = bell_codes(np.random.default_rng(9), 5, 5 * spec.CHUNK_CODES + 123)
    lengths = huffman.limited_lengths(np.bincount(codes, minlength=32))
    whole = coded_section(codes, lengths)
    monkeypatch.setattr(huffman, "ENCODE_BLOCK", 2 * spec.CHUNK_CODES)
    assert np.array_equal(coded_section(codes, lengths), whole)
