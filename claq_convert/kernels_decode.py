"""Numba kernels that read a quantized weight straight from its packed code streams (CPU).

A weight W[rows, C] keeps one stream per bit width b: stream column c (input column `columns[c]`)
holds the codes of rows 0..rows-1 at stream positions c*rows + r, packed LSB first into u32 words
(formats/claq-v2.md). `tables[c]` is stream column c's codebook as float32 values. Two kernels:

- decode: out_t[columns[c], r] = tables[c, code(c, r)], W transposed (bit for bit the NumPy decoder);
- product: y[m, r] += sum_c x[m, columns[c]] * tables[c, code(c, r)], for a few rows of x (batch 1
  to 16): each column's codes are decoded into a row buffer that stays in L1 and added into a
  per-thread accumulator, so no weight is ever materialised and the codes are read once.

When rows is a multiple of 32, every column starts at a group of 32 codes that fills exactly b words,
and each code's word and shift are constants of its lane: the kernels for that case are compiled once
per width with b fixed, so LLVM unrolls and vectorises the lanes (measured on 2 cores of this machine,
1536 x 576 at 4 bits: 8.5 G codes/s against 2 G for the generic per-code form). Any other row count
takes the generic kernels. A scaled-table variant of the product (T_c = x_c * codebook_c, then
y[r] += T_c[code]) measured 2-3x slower here than decode-then-axpy: the gather-add does not vectorise.

The kernels are unchecked (the caller, `torch_decoder.PackedWeight`, builds consistent arrays); their
NumPy twins are `kernels_numpy.decode_stream` / `product_stream`.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit, prange

GROUP = 32          # codes per group: 32 codes of b bits fill exactly b words
TILE_FLOATS = 8192  # product: accumulator + decoded values of one row tile, 32 KiB, fit in L1


@lru_cache(maxsize=None)
def _aligned(bits: int):
    """(decode, product) kernels for streams whose columns start on group boundaries, b fixed."""
    B = bits
    mask = np.uint32((1 << bits) - 1)

    @njit(inline="always", fastmath=True, nogil=True)
    def decode_group(words, wb, table, out, at):
        for lane in range(GROUP):  # constant trip count and constant word/shift per lane: unrolled
            k = (lane * B) >> 5
            s = (lane * B) & 31
            if s + B > 32:  # this lane straddles two words
                pair = np.uint64(np.uint32(words[wb + k])) | (np.uint64(np.uint32(words[wb + k + 1])) << np.uint64(32))
                out[at + lane] = table[np.uint32(pair >> np.uint64(s)) & mask]
            else:
                out[at + lane] = table[(np.uint32(words[wb + k]) >> np.uint32(s)) & mask]

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def decode(words, tables, columns, first, rows, out_t):
        groups = rows // GROUP
        for c in prange(columns.size):
            table, out = tables[c], out_t[columns[c]]
            for g in range(groups):
                decode_group(words, ((first + c) * groups + g) * B, table, out, g * GROUP)

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def product(words, tables, columns, rows, x, y, parts, tile):
        groups = rows // GROUP
        n, M = columns.size, x.shape[0]
        acc = np.zeros((parts, M, rows), np.float32)
        for p in prange(parts):  # each part owns a range of columns and its own accumulator
            values = np.empty(tile, np.float32)
            for r0 in range(0, rows, tile):  # a tile of rows: its accumulator and values stay in L1
                g0, g1 = r0 // GROUP, min(groups, (r0 + tile) // GROUP)
                width = (g1 - g0) * GROUP
                for c in range(n * p // parts, n * (p + 1) // parts):
                    table = tables[c]
                    for g in range(g0, g1):
                        decode_group(words, (c * groups + g) * B, table, values, (g - g0) * GROUP)
                    for m in range(M):
                        xv = x[m, columns[c]]
                        a = acc[p, m]
                        for i in range(width):
                            a[r0 + i] += xv * values[i]
        for p in range(parts):
            y += acc[p]

    return decode, product


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


def decode_stream(words: np.ndarray, bits: int, tables: np.ndarray, columns: np.ndarray, rows: int,
                  out_t: np.ndarray, first: int = 0) -> None:
    """out_t[columns[c], r] = tables[c, code(first + c, r)]: stream columns first.. of a stream, decoded.

    words int32 (the u32 bits), tables float32 [n, 2**bits], columns int64 [n], out_t float32 [*, rows].
    """
    if columns.size == 0:
        return
    if rows % GROUP == 0:
        _aligned(bits)[0](words, tables, columns, first, rows, out_t)
    else:
        _decode_any(words, bits, tables, columns, first, rows, out_t)


def product_stream(words: np.ndarray, bits: int, tables: np.ndarray, columns: np.ndarray, rows: int,
                   x: np.ndarray, y: np.ndarray, parts: int) -> None:
    """y[m, r] += sum_c x[m, columns[c]] * tables[c, code(c, r)] (x float32 [M, C], y float32 [M, rows]).

    `parts` splits the columns into that many independent accumulators (one per thread).
    """
    if columns.size == 0:
        return
    parts = max(1, min(parts, columns.size))
    if rows % GROUP == 0:
        tile = max(GROUP, (TILE_FLOATS // (x.shape[0] + 1)) // GROUP * GROUP)
        _aligned(bits)[1](words, tables, columns, rows, x, y, parts, tile)
    else:
        _product_any(words, bits, tables, columns, rows, x, y, parts)
