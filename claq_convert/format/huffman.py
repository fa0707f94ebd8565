"""Coded code streams (format v4, sections huffman_<b>): the writer's encoder and the readers' decoder.

K-Means codes are not uniform: a column's middle entries serve more rows than its tails, so a stream of
b-bit codes holds fewer than b bits of information a code. A file may store a stream as a canonical
Huffman code instead (formats/claq-v2.md, "Coded codes"): u32 bit offsets of every CHUNK_CODES-th code,
one byte of codeword length per code value (at most MAX_CODEWORD_BITS), then the codewords back to back,
least significant bit first. Chunks decode apart (in parallel), each codeword with one table lookup.
The loader turns every coded stream back into its fixed-width words, so every kernel reads what it
always read. The decoding loop is `kernels.numba_decode.decode_huffman_chunks` (its twin in numpy_quant).
"""
from __future__ import annotations

import heapq
from typing import Optional

import numpy as np

from . import spec


ENCODE_BLOCK = 1 << 20  # codes the encoder handles at a time (a multiple of spec.CHUNK_CODES)


class CodedCodesError(ValueError):
    """A huffman_<b> section breaks `rule`; the readers raise it as their BadTensorData."""

    def __init__(self, message: str, rule: str):
        super().__init__(message)
        self.rule = rule


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Codeword lengths of an optimal prefix code for symbol counts (0 for unused symbols; 1 if one is used)."""
    used = np.flatnonzero(np.asarray(counts) > 0)
    lengths = np.zeros(np.asarray(counts).size, np.int64)
    if used.size == 1:
        lengths[used] = 1
        return lengths
    heap = [(float(counts[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def limited_lengths(counts: np.ndarray, longest: int = spec.MAX_CODEWORD_BITS) -> np.ndarray:
    """Huffman codeword lengths of at most `longest` bits: rare symbols' counts are raised (by a share of
    the total each round) until the tree is that shallow. Not optimal under the limit (package-merge is);
    with at most 2**8 symbols and 12 bits it rarely has to act. A file stores only the lengths, so any
    writer may choose them otherwise."""
    counts = np.asarray(counts, np.float64)
    raised = counts.copy()
    while True:
        lengths = huffman_lengths(raised)
        if lengths.max(initial=0) <= longest:
            return lengths
        raised = np.where(counts > 0, raised + counts.sum() / (1 << (longest - 1)), 0.0)


def canonical_codewords(lengths: np.ndarray) -> np.ndarray:
    """uint64 codewords for `lengths`, each bit-reversed, so that a reader taking stream bits least
    significant first meets the codeword's first (most significant) bit first. Canonical: symbols with a
    length, sorted by (length, symbol), take 0, then each the previous + 1, shifted left by the growth in
    length."""
    lengths = np.asarray(lengths, np.int64)
    codewords = np.zeros(lengths.size, np.uint64)
    code, previous = 0, 0
    for symbol in np.lexsort((np.arange(lengths.size), lengths)):
        length = int(lengths[symbol])
        if length == 0:
            continue
        code <<= length - previous
        previous = length
        codewords[symbol] = int(f"{code:0{length}b}"[::-1], 2)
        code += 1
    return codewords


def decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(symbol, length) uint8 for each value of the next MAX_CODEWORD_BITS stream bits; length 0 where
    those bits start with no codeword (an incomplete code)."""
    size = 1 << spec.MAX_CODEWORD_BITS
    symbol, length = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
    for s, codeword in enumerate(canonical_codewords(lengths).tolist()):
        n = int(lengths[s])
        if n:
            index = codeword | (np.arange(1 << (spec.MAX_CODEWORD_BITS - n)) << n)
            symbol[index], length[index] = s, n
    return symbol, length


def coded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    return int(np.sum(np.asarray(counts, np.int64) * np.asarray(lengths, np.int64)))


def code_counts(codes: np.ndarray, size: int) -> np.ndarray:
    """How often each of `size` values occurs in uint8 `codes`: np.bincount, ENCODE_BLOCK codes at a time
    (np.bincount casts its input to int64: 8 bytes a code for a whole stream at once)."""
    counts = np.zeros(size, np.int64)
    for first in range(0, codes.size, ENCODE_BLOCK):
        counts += np.bincount(codes[first:first + ENCODE_BLOCK], minlength=size)
    return counts


def encode_codes(codes: np.ndarray, bits: int) -> Optional[np.ndarray]:
    """Section huffman_<bits> for a stream's codes (uint8, in stream order), or None where it would not be
    shorter than the stream's fixed-width words (codes_<bits>) or its codewords reach 2**32 bits."""
    codes = np.asarray(codes, np.uint8).ravel()
    n = codes.size
    counts = code_counts(codes, 1 << bits)
    lengths = limited_lengths(counts)
    total = coded_bits(counts, lengths)
    size = spec.huffman_prefix_bytes(n, bits) + (total + 7) // 8
    if n == 0 or total >= spec.MAX_CODED_STREAM_BITS or size >= 4 * spec.code_words(n, bits):
        return None
    return coded_section(codes, lengths)


def coded_section(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The bytes of a huffman_<b> section: codes (uint8) under the canonical code of `lengths` [2**b]
    (each code's length above 0; Kraft's inequality holds), with its chunk offsets and length bytes.
    Written ENCODE_BLOCK codes at a time, so a 7B-class weight needs no int64 array per code."""
    codes = np.asarray(codes, np.uint8).ravel()
    lengths = np.asarray(lengths, np.int64)
    codewords = canonical_codewords(lengths)
    total = coded_bits(code_counts(codes, lengths.size), lengths)
    words = np.zeros(total // 64 + 2, np.uint64)
    offsets = np.empty(spec.chunk_count(codes.size), "<u4")
    at = 0  # the bit where the block's first codeword starts
    for first in range(0, codes.size, ENCODE_BLOCK):  # a multiple of CHUNK_CODES: chunks start inside blocks
        block = codes[first:first + ENCODE_BLOCK]
        length = lengths[block]
        start = at + np.cumsum(length) - length
        offsets[first // spec.CHUNK_CODES:][:spec.chunk_count(block.size)] = start[::spec.CHUNK_CODES]
        word, shift = start >> 6, (start & 63).astype(np.uint64)
        codeword = codewords[block]
        np.bitwise_or.at(words, word, codeword << shift)
        spill = (start & 63) + length > 64
        np.bitwise_or.at(words, word[spill] + 1, codeword[spill] >> (np.uint64(64) - shift[spill]))
        at += int(length.sum())
    stream = words.astype("<u8").view(np.uint8)[:(total + 7) // 8]
    return np.concatenate([offsets.view(np.uint8), lengths.astype(np.uint8), stream])


def decode_codes(section: np.ndarray, bits: int, n_codes: int) -> np.ndarray:
    """uint8 codes [n_codes] of a huffman_<bits> section, checking rules CLAQ-T19 to CLAQ-T23 in order
    (the bit widths already valid). Every length and offset is checked before a codeword is read."""
    from ..kernels.numba_decode import decode_huffman_chunks  # Numba: loaded when a coded stream is read

    section = np.asarray(section, np.uint8)
    chunks = spec.chunk_count(n_codes)
    prefix = spec.huffman_prefix_bytes(n_codes, bits)
    least, most = prefix + (n_codes + 7) // 8, prefix + (spec.MAX_CODEWORD_BITS * n_codes + 7) // 8
    if not least <= section.size <= most:
        raise CodedCodesError(f"holds {section.size} bytes; {n_codes} codes of 1 to {spec.MAX_CODEWORD_BITS} bits "
                              f"with their chunk offsets and lengths take {least} to {most}", "CLAQ-T19")
    starts = section[:4 * chunks].view("<u4").astype(np.int64)
    lengths = section[4 * chunks:prefix].astype(np.int64)
    if lengths.max() > spec.MAX_CODEWORD_BITS or not lengths.any():
        raise CodedCodesError(f"its codeword lengths must be 0 to {spec.MAX_CODEWORD_BITS}, one at least above 0",
                              "CLAQ-T20")
    if np.sum(np.where(lengths > 0, 1 << (spec.MAX_CODEWORD_BITS - lengths), 0)) > 1 << spec.MAX_CODEWORD_BITS:
        raise CodedCodesError("its codeword lengths break Kraft's inequality (no prefix code has them)", "CLAQ-T20")
    n_bits = 8 * (section.size - prefix)
    if starts[0] != 0 or starts.max() > n_bits:
        raise CodedCodesError(f"its chunk offsets must start at 0 and lie within its {n_bits} bits", "CLAQ-T21")
    stream = np.concatenate([section[prefix:], np.zeros(2, np.uint8)])  # a window reads up to 2 bytes past a bit
    symbol, length = decode_table(lengths)
    codes = np.empty(n_codes, np.uint8)
    ends = np.empty(chunks, np.int64)
    decode_huffman_chunks(stream, n_bits, starts, symbol, length, codes, ends)
    follows = np.append(starts[1:], -1)
    for c in np.flatnonzero((ends < 0) | ((ends != follows) & (np.arange(chunks) < chunks - 1))):
        if ends[c] < 0:
            raise CodedCodesError(f"chunk {c} meets bits that start no codeword, or a codeword past the end",
                                  "CLAQ-T22")
        raise CodedCodesError(f"chunk {c} ends at bit {ends[c]}, not where chunk {c + 1} starts ({starts[c + 1]})",
                              "CLAQ-T23")
    end = int(ends[-1])
    if (end + 7) // 8 != n_bits // 8 or (end % 8 and int(section[-1]) >> (end % 8)):
        raise CodedCodesError(f"its codewords end at bit {end}: the section must end with that byte, "
                              "padded with zero bits", "CLAQ-T23")
    return codes


def fixed_words(section: np.ndarray, bits: int, n_codes: int) -> np.ndarray:
    """The codes_<bits> words of a huffman_<bits> section (checked as decode_codes checks it)."""
    return spec.pack_codes(decode_codes(section, bits, n_codes), bits)


def with_fixed_codes(sections: dict, rows: int) -> dict:
    """A weight's NumPy sections with every coded stream (huffman_<b>) replaced by its fixed-width words
    (codes_<b>), the one layout the decoders and kernels take; others are returned as they are."""
    coded = [name for name in sections if spec.is_huffman_section(name)]
    if not coded:
        return sections
    bit_widths = sections["bit_widths"]
    out = {name: array for name, array in sections.items() if name not in coded}
    for name in coded:
        b = int(name[len(spec.HUFFMAN_PREFIX):])
        n_codes = int(np.count_nonzero(bit_widths == b)) * rows
        out[spec.code_section(b)] = fixed_words(sections[name], b, n_codes)
    return out
