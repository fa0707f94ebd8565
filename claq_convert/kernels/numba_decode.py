"""Numba kernels that read a quantized weight straight from its packed code streams (CPU).

A weight W[rows, C] keeps one stream per bit width b: stream column c (input column `columns[c]`)
holds the codes of rows 0..rows-1 at stream positions c*rows + r, packed LSB first into u32 words
(formats/claq-v2.md). `tables[c]` is stream column c's codebook as float32 values. Two kernels:

- decode: out_t[columns[c], r] = tables[c, code(c, r)], W transposed (bit for bit the NumPy decoder);
- product: y[m, r] += sum_c x[m, columns[c]] * tables[c, code(c, r)], for a few rows of x: per
  column, the codebook scaled by the input value is the table (LUT), and each code adds its entry; no
  weight is ever materialised and the codes are read once. Batch 1 sums each group of 32 rows over
  all columns in registers; a larger batch keeps per-thread accumulators, a tile of rows at a time.

When rows is a multiple of 32, every column starts at a group of 32 codes that fills exactly b words,
and each code's word and shift are constants of its lane: the kernels for that case are compiled once
per width with b fixed, so LLVM unrolls and vectorises the lanes (measured on 2 cores of this machine,
1536 x 576 at 4 bits: 8.5 G codes/s against 2 G for the generic per-code form). Any other row count
takes the generic kernels. For the batch-1 product, the scaled table measured 2.4x faster on one thread than
decoding each column into a buffer and adding x_c times it (1536 x 576 at 4 bits: 0.32 against 0.77 ms),
and summing a group of 32 rows over all columns in registers 12% faster again than keeping per-thread
accumulators of whole columns (2.7 G codes/s a thread).

That kernel is bound by its lookups (scalar loads: LLVM does not vectorise them). Where Numba compiles
for AVX-512F (`simd.available()`), batch 1 takes `_lookup_product1` instead: a codebook of 16 floats
is one zmm register and `vpermps` looks 16 codes up at once (simd.py). Measured on one thread of this
machine (AMD EPYC Zen 5), data in cache, against the kernel above: 1536 x 576 at 4 bits 20.7 against
297 us (43 against 3.0 G codes/s), the 6-bit 49152 x 576 head 2.1 against 17.3 ms; widths 1 to 6
bits 8x to 17x faster, 7 and 8 bits 6x and 2.2x. In generation the codes come from memory (74 MB a
token for SmolLM2-135M at 4 bits, over the 32 MiB L3): 576 x 576 took 28 us after a cache flush
against 10 all cached, so memory, not the lookups, now bounds those products. Generation from that
model's 4-bit file on 2 cores: 58.0 tokens/s against the fp32 model's 25.0 in the same run (2.3x;
the kernel above: 0.95x), bench/decode.json. Elsewhere, and for batches above 1, the kernels above.
Decoding takes the same lookups there (`_lookup_decode`): a store instead of a sum.

The kernels are unchecked (the caller, `modules.ClaqLinear`, builds consistent arrays); their
NumPy twins are `kernels_numpy.decode_stream` / `product_stream`. `decode_huffman_chunks` expands a coded
stream (format v4) to its codes for `format.huffman`, which checks its offsets and table first; its twin is
`numpy_quant.decode_huffman_chunks`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np
from numba import njit, prange

from . import simd
from ..format.spec import CHUNK_CODES, MAX_CODEWORD_BITS

GROUP = 32          # codes per group: 32 codes of b bits fill exactly b words
TILE_FLOATS = 8192  # product: the accumulator of one row tile (all batch rows), 32 KiB, stays in L1/L2
# lookup product: packed bytes from which its row tiles are split over threads; below, one thread, as
# starting a parallel region costs about what it saves (SmolLM2-135M 4-bit generation on 2 cores, median
# tokens/s of 3: always parallel 57.0, from 256 KiB 57.0, from 4 MiB 53.8, never 50.6), and each region
# stalls for milliseconds while another process holds the cores (there: never parallel did best)
PARALLEL_BYTES = 1 << 18
WINDOW_MASK = (1 << MAX_CODEWORD_BITS) - 1  # coded streams: the next 12 bits index the decode table
HUFFMAN_PARALLEL_CHUNKS = 64  # coded streams of fewer chunks (262144 codes) decode on one thread


@lru_cache(maxsize=None)
def _aligned(bits: int):
    """(decode, batch-1 product, batch-M product) kernels for streams whose columns start on group
    boundaries, b fixed."""
    B = bits
    K = 1 << bits
    mask = np.uint32(K - 1)

    @njit(inline="always", fastmath=True, nogil=True)
    def code(words, wb, lane):
        k = (lane * B) >> 5  # constants once the lane loop is unrolled
        s = (lane * B) & 31
        if s + B > 32:  # this lane straddles two words
            pair = np.uint64(np.uint32(words[wb + k])) | (np.uint64(np.uint32(words[wb + k + 1])) << np.uint64(32))
            return np.uint32(pair >> np.uint64(s)) & mask
        return (np.uint32(words[wb + k]) >> np.uint32(s)) & mask

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def decode(words, tables, columns, first, rows, out_t):
        groups = rows // GROUP
        for c in prange(columns.size):
            table, out = tables[c], out_t[columns[c]]
            for g in range(groups):
                wb = ((first + c) * groups + g) * B
                for lane in range(GROUP):
                    out[g * GROUP + lane] = table[code(words, wb, lane)]

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def product1(words, tables, columns, rows, x, y):
        """Batch 1 (x, y 1-D). Every column's table first (its codebook times its input value), then per
        group of 32 rows, in parallel, the sum over all columns in 32 accumulators that stay in
        registers; the order of the sums does not depend on the thread count."""
        groups = rows // GROUP
        n = columns.size
        scaled = np.empty((n, K), np.float32)
        for c in range(n):
            for e in range(K):
                scaled[c, e] = x[columns[c]] * tables[c, e]
        for g in prange(groups):
            acc = np.zeros(GROUP, np.float32)
            for c in range(n):
                wb = (c * groups + g) * B
                table = scaled[c]
                for lane in range(GROUP):
                    acc[lane] += table[code(words, wb, lane)]
            for lane in range(GROUP):
                y[g * GROUP + lane] += acc[lane]

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def product(words, tables, columns, rows, x, y, parts, tile):
        """Batch M: each code is extracted once and adds its entry of every row's table."""
        groups = rows // GROUP
        n, M = columns.size, x.shape[0]
        acc = np.zeros((parts, M, rows), np.float32)
        for p in prange(parts):
            scaled = np.empty((M, K), np.float32)
            for r0 in range(0, rows, tile):
                g0, g1 = r0 // GROUP, min(groups, (r0 + tile) // GROUP)
                for c in range(n * p // parts, n * (p + 1) // parts):
                    for m in range(M):
                        for e in range(K):
                            scaled[m, e] = x[m, columns[c]] * tables[c, e]
                    for g in range(g0, g1):
                        wb = (c * groups + g) * B
                        for lane in range(GROUP):
                            i = code(words, wb, lane)
                            for m in range(M):
                                acc[p, m, g * GROUP + lane] += scaled[m, i]
        for p in range(parts):
            y += acc[p]

    return decode, product1, product


@lru_cache(maxsize=None)
def _lookup_product1(bits: int, tile: int):
    """Batch-1 product by AVX-512 table lookups (simd.py), rows % tile == 0: (parallel, serial) kernels.

    Per tile of rows, the sum over all columns in registers, 16 codes at a time unpacked and looked
    up by one vpermps (32-entry codebooks: vpermi2ps; more: several of them and selects). Codebooks
    narrower than 16 entries are repeated to 16, so a code's unmasked high bits pick the same value.
    Tiles of 64 rows: 32 measured 1.4x slower at 4 bits (1536 x 576, one thread: 28.4 against 20.7
    us) and 1.5x at 6 bits. No fastmath: each row sums its columns in order, whichever thread runs
    its tile, so both kernels (one code, inlined) give the same bits on any thread count."""
    B, K, T = bits, 1 << bits, tile
    E = max(16, K)

    @njit(inline="always", nogil=True)
    def scale(tables, columns, x):
        scaled = np.empty((columns.size, E), np.float32)
        for c in range(columns.size):
            for e in range(E):
                scaled[c, e] = x[columns[c]] * tables[c, e % K]
        return scaled

    @njit(inline="always", nogil=True)
    def add_tile(words, scaled, rows, t, y):
        acc = simd.zeros(T)
        for c in range(scaled.shape[0]):
            codes = simd.unpack(words, ((c * rows + t * T) * B) >> 3, B, T)
            acc = simd.add(acc, simd.lookup(scaled, c, codes, E))
        simd.add_to(y, t * T, acc, B)

    @njit(parallel=True, nogil=True, cache=True)
    def product1(words, tables, columns, rows, x, y):
        scaled = scale(tables, columns, x)
        for t in prange(rows // T):
            add_tile(words, scaled, rows, t, y)

    @njit(nogil=True, cache=True)
    def product1_serial(words, tables, columns, rows, x, y):
        scaled = scale(tables, columns, x)
        for t in range(rows // T):
            add_tile(words, scaled, rows, t, y)

    return product1, product1_serial


@lru_cache(maxsize=None)
def _lookup_decode(bits: int, tile: int):
    """Decode by AVX-512 table lookups (simd.py), rows % tile == 0: each column's codebook repeated to
    16 entries (as the product's tables), then per tile of rows one unpack, one lookup and a store
    back in row order; columns in parallel. The values are the codebook's own: bit for bit the
    decoders. Measured at 3 and 5 bits, where codes straddle words and the kernel above slows most."""
    B, K, T = bits, 1 << bits, tile
    E = max(16, K)

    @njit(parallel=True, nogil=True, cache=True)
    def decode(words, tables, columns, first, rows, out_t):
        n = columns.size
        padded = np.empty((n, E), np.float32)
        for c in range(n):
            for e in range(E):
                padded[c, e] = tables[c, e % K]
        for c in prange(n):
            out = out_t[columns[c]]
            for t in range(rows // T):
                codes = simd.unpack(words, (((first + c) * rows + t * T) * B) >> 3, B, T)
                simd.store_to(out, t * T, simd.lookup(padded, c, codes, E), B)

    return decode


@njit(inline="always", nogil=True)
def _code_at(words, bits, position):
    start = position * bits
    k = start >> 5
    pair = np.uint64(np.uint32(words[k]))
    if k + 1 < words.size:  # a code never straddles past the stream's last word
        pair |= np.uint64(np.uint32(words[k + 1])) << np.uint64(32)
    return np.uint32(pair >> np.uint64(start & 31)) & np.uint32((1 << bits) - 1)


@njit(parallel=True, nogil=True, cache=True)
def _decode_any(words, bits, tables, columns, first, rows, out_t):
    for c in prange(columns.size):
        table, out = tables[c], out_t[columns[c]]
        base = (first + c) * rows
        for r in range(rows):
            out[r] = table[_code_at(words, bits, base + r)]


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _product_any(words, bits, tables, columns, rows, x, y, parts):
    n, M = columns.size, x.shape[0]
    acc = np.zeros((parts, M, rows), np.float32)
    for p in prange(parts):
        values = np.empty(rows, np.float32)
        for c in range(n * p // parts, n * (p + 1) // parts):
            table = tables[c]
            for r in range(rows):
                values[r] = table[_code_at(words, bits, c * rows + r)]
            for m in range(M):
                xv = x[m, columns[c]]
                a = acc[p, m]
                for r in range(rows):
                    a[r] += xv * values[r]
    for p in range(parts):
        y += acc[p]


@njit(inline="always", nogil=True)
def _huffman_chunk(stream, n_bits, starts, symbol, length, codes, ends, c):
    n = codes.size
    bit = starts[c]
    end = min(n, (c + 1) * CHUNK_CODES)
    for i in range(c * CHUNK_CODES, end):
        if bit >= n_bits:
            bit = -1
            break
        at = bit >> 3
        window = (np.uint32(stream[at]) | (np.uint32(stream[at + 1]) << 8)
                  | (np.uint32(stream[at + 2]) << 16)) >> np.uint32(bit & 7)
        index = window & np.uint32(WINDOW_MASK)
        size = length[index]
        if size == 0 or bit + size > n_bits:
            bit = -1
            break
        codes[i] = symbol[index]
        bit += size
    ends[c] = bit


@njit(parallel=True, nogil=True, cache=True)
def _huffman_parallel(stream, n_bits, starts, symbol, length, codes, ends):
    for c in prange(starts.size):
        _huffman_chunk(stream, n_bits, starts, symbol, length, codes, ends, c)


@njit(nogil=True, cache=True)
def _huffman_serial(stream, n_bits, starts, symbol, length, codes, ends):
    for c in range(starts.size):
        _huffman_chunk(stream, n_bits, starts, symbol, length, codes, ends, c)


def decode_huffman_chunks(stream, n_bits, starts, symbol, length, codes, ends, parallel=None):
    """Every chunk of a coded stream (format v4): chunk c's codes from bit starts[c] on.

    stream uint8 (n_bits / 8 bytes and 2 zero bytes more), starts int64 (each <= n_bits), symbol/length the
    12-bit decode table (length 0: no codeword starts so). ends[c] = the bit after chunk c's last codeword,
    or -1 where the chunk meets bits that start no codeword or a codeword runs past n_bits.

    Chunks decode in parallel from HUFFMAN_PARALLEL_CHUNKS on (`parallel`: True or False to choose): a
    parallel region costs more than a short stream takes to decode. Measured on this machine's 2 cores,
    with decode_codes: 1000 codes 0.38 ms in parallel against 0.06 serially, 8192 codes 0.75 against 0.09;
    while other processes held the cores (load 6), 6 ms a stream of a few thousand codes in parallel,
    131072 codes 10.4 against 1.0 ms, and 2**20 codes 11.7 against 7.2. The readers' fuzzer decodes
    thousands of small streams: its short run in the tests (1500 cases, half of them with coded streams)
    took 48 s with every stream in parallel, 16 s so."""
    if parallel is None:
        parallel = starts.size >= HUFFMAN_PARALLEL_CHUNKS
    (_huffman_parallel if parallel else _huffman_serial)(stream, n_bits, starts, symbol, length, codes, ends)


def _lookups(avx512: Optional[bool]) -> bool:
    """Whether the AVX-512 table-lookup kernels run: `avx512`, or None for where `simd.available()`."""
    if avx512 is None:
        return simd.available()
    if avx512 and not simd.available():
        raise RuntimeError("avx512=True, but Numba does not compile for a CPU with AVX-512F")
    return avx512


def decode_stream(words: np.ndarray, bits: int, tables: np.ndarray, columns: np.ndarray, rows: int,
                  out_t: np.ndarray, first: int = 0, avx512: Optional[bool] = None) -> None:
    """out_t[columns[c], r] = tables[c, code(first + c, r)]: stream columns first.. of a stream, decoded.

    words int32 (the u32 bits), tables float32 [n, 2**bits], columns int64 [n], out_t float32 [*, rows]
    (rows contiguous). `avx512`: whether the table-lookup kernel decodes (None: where `simd.available()`).
    """
    if columns.size == 0:
        return
    if _lookups(avx512) and rows % GROUP == 0:
        _lookup_decode(bits, 64 if rows % 64 == 0 else GROUP)(words, tables, columns, first, rows, out_t)
    elif rows % GROUP == 0:
        _aligned(bits)[0](words, tables, columns, first, rows, out_t)
    else:
        _decode_any(words, bits, tables, columns, first, rows, out_t)


def product1_kernel(bits: int, rows: int, n_columns: int, avx512: Optional[bool] = None):
    """The batch-1 kernel product_stream takes for a stream of `n_columns` columns, called as
    kernel(words, tables, columns, rows, x[0], y[0]); None where rows are not whole groups (the general
    kernel then). A caller that multiplies one weight many times (generation) chooses once."""
    if rows % GROUP:
        return None
    if _lookups(avx512):
        parallel, serial = _lookup_product1(bits, 64 if rows % 64 == 0 else GROUP)
        return parallel if rows * n_columns * bits >= 8 * PARALLEL_BYTES else serial
    return _aligned(bits)[1]


def product_stream(words: np.ndarray, bits: int, tables: np.ndarray, columns: np.ndarray, rows: int,
                   x: np.ndarray, y: np.ndarray, parts: int, avx512: Optional[bool] = None) -> None:
    """y[m, r] += sum_c x[m, columns[c]] * tables[c, code(c, r)] (x float32 [M, C], y float32 [M, rows]).

    `parts` splits the columns into that many independent accumulators (one per thread). `avx512`:
    whether batch 1 takes the table-lookup kernel (None: where `simd.available()`; False: never).
    """
    if columns.size == 0:
        return
    parts = max(1, min(parts, columns.size))
    kernel = product1_kernel(bits, rows, columns.size, avx512) if x.shape[0] == 1 else None
    if kernel is not None:
        kernel(words, tables, columns, rows, x[0], y[0])
    elif rows % GROUP == 0:
        tile = max(GROUP, TILE_FLOATS // x.shape[0] // GROUP * GROUP)
        _aligned(bits)[2](words, tables, columns, rows, x, y, parts, tile)
    else:
        _product_any(words, bits, tables, columns, rows, x, y, parts)
