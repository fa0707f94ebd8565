"""Coded codebook levels (format v3, section codebook_rice): the writer's encoder and the readers' decoder.

A grid codebook's u8 levels rise strictly from 0 to 255 (kernels.grid_codebook makes them so), so a file
stores only each column's inner levels, as gaps: inner level i = level i-1 + 1 + base + d, where base and the
Rice parameter k come from a small table (a row per width and inner position) and d is Rice-coded: its low
k bits in one bit stream, its high part d >> k in unary in another. At 4 bits this takes about 5 bits an
inner level instead of 8 (formats/claq-v2.md, "Coded levels"). NumPy only, vectorized over all gaps.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import spec


class CodedLevelsError(ValueError):
    """A codebook_rice section breaks `rule`; the readers raise it as their BadTensorData."""

    def __init__(self, message: str, rule: str):
        super().__init__(message)
        self.rule = rule


def _rice_costs(d: np.ndarray, row: np.ndarray, rows: int) -> np.ndarray:
    """[rows, MAX_RICE_K + 1]: bits that coding each table row's gaps d with each Rice parameter takes."""
    return np.stack([np.bincount(row, weights=(d >> k) + 1 + k, minlength=rows)
                     for k in range(spec.MAX_RICE_K + 1)], axis=1)


def encode_levels(levels: np.ndarray, bit_widths: np.ndarray) -> Optional[np.ndarray]:
    """Section codebook_rice for u8 levels [sum_j 2**b_j], or None when they cannot be coded: some
    column's levels do not rise strictly from 0 to 255, or no column has an inner level (all 1-bit).

    Each table row (a width's inner position) gets base = its least gap and the k of fewest bits."""
    bits = np.asarray(bit_widths).astype(np.int64)
    levels = np.asarray(levels).astype(np.int64)
    starts = spec.codebook_offsets(bits)
    ends = starts[1:] - 1
    steps = np.diff(levels)
    steps[ends[:-1]] = 1                      # from a column's last level to the next column's first
    if np.any(levels[starts[:-1]] != 0) or np.any(levels[ends] != spec.GRID_TOP) or np.any(steps <= 0):
        return None
    column, position, row = spec.coded_gaps(bits)
    if column.size == 0:
        return None
    entry = starts[column] + position + 1     # the inner level each gap leads to
    gap = levels[entry] - levels[entry - 1] - 1
    rows = spec.rice_table_bytes(bits) // 2
    base = np.full(rows, spec.GRID_TOP, np.int64)
    np.minimum.at(base, row, gap)
    d = gap - base[row]
    k = np.argmin(_rice_costs(d, row, rows), axis=1)
    width = k[row]
    low = np.zeros(int(width.sum()), np.uint8)
    first = np.cumsum(width) - width
    for t in range(spec.MAX_RICE_K):
        has = width > t
        low[first[has] + t] = (d[has] >> t) & 1
    terminators = np.cumsum((d >> width) + 1) - 1
    unary = np.ones(int(terminators[-1]) + 1, np.uint8)
    unary[terminators] = 0
    table = np.stack([base, k], axis=1).astype(np.uint8).ravel()
    return np.concatenate([table, np.packbits(low, bitorder="little"), np.packbits(unary, bitorder="little")])


def decode_levels(stream: np.ndarray, bit_widths: np.ndarray) -> np.ndarray:
    """u8 levels [sum_j 2**b_j] from a codebook_rice section, checking rules CLAQ-T13 to CLAQ-T18 in order
    (bit widths already valid). Every length is checked before the bits it covers are unpacked."""
    bits = np.asarray(bit_widths).astype(np.int64)
    stream = np.asarray(stream, np.uint8)
    column, position, row = spec.coded_gaps(bits)
    n = column.size
    if n == 0:
        raise CodedLevelsError("codebook_rice is present but every column has 1 bit (no inner level)", "CLAQ-T13")
    table_bytes = spec.rice_table_bytes(bits)
    if stream.size < table_bytes:
        raise CodedLevelsError(f"codebook_rice holds {stream.size} bytes, its table needs {table_bytes}", "CLAQ-T14")
    table = stream[:table_bytes].astype(np.int64).reshape(-1, 2)
    base, k = table[:, 0], table[:, 1]
    if np.any(k > spec.MAX_RICE_K):
        raise CodedLevelsError(f"codebook_rice: table row {int(np.argmax(k > spec.MAX_RICE_K))} has Rice parameter "
                               f"{int(k.max())} (at most {spec.MAX_RICE_K})", "CLAQ-T15")
    width = k[row]
    low_bits = int(width.sum())
    low_end = table_bytes + (low_bits + 7) // 8
    if stream.size < low_end:
        raise CodedLevelsError(f"codebook_rice ends inside its low bits ({stream.size} bytes, they end at {low_end})",
                               "CLAQ-T16")
    low = np.unpackbits(stream[table_bytes:low_end], bitorder="little")
    if low[low_bits:].any():
        raise CodedLevelsError("codebook_rice: the padding bits after the low bits are not zero", "CLAQ-T16")
    high = stream[low_end:]
    most = int(np.sum(1 + (np.maximum(spec.GRID_TOP - 2 - base[row], 0) >> width)))  # bits with every level < 255
    if not 0 < high.size <= (most + 7) // 8:
        raise CodedLevelsError(f"codebook_rice: its unary part has {high.size} bytes, its {n} gaps need 1 to "
                               f"{(most + 7) // 8}", "CLAQ-T17")
    unary = np.unpackbits(high, bitorder="little")
    ends = np.flatnonzero(unary == 0)[:n]
    if ends.size < n or high.size != int(ends[-1]) // 8 + 1 or unary[int(ends[-1]) + 1:].any():
        raise CodedLevelsError(f"codebook_rice: its unary part does not end with the byte of its {n}th zero bit "
                               "followed by zero bits", "CLAQ-T17")
    first = np.cumsum(width) - width
    d = (np.diff(ends, prepend=-1) - 1) << width
    for t in range(spec.MAX_RICE_K):
        has = width > t
        d[has] |= low[first[has] + t].astype(np.int64) << t
    level = np.cumsum(1 + base[row] + d)
    level -= np.concatenate([[0], level])[np.searchsorted(column, column, side="left")]  # restart at each column
    if np.any(level > spec.GRID_TOP - 1):
        bad = int(column[np.argmax(level > spec.GRID_TOP - 1)])
        raise CodedLevelsError(f"codebook_rice: column {bad}'s levels pass {spec.GRID_TOP - 1} before its last",
                               "CLAQ-T18")
    starts = spec.codebook_offsets(bits)
    levels = np.empty(int(starts[-1]), np.uint8)
    levels[starts[:-1]] = 0
    levels[starts[1:] - 1] = spec.GRID_TOP
    levels[starts[column] + position + 1] = level
    return levels


def with_levels(sections: dict) -> dict:
    """A weight's NumPy sections with coded levels replaced by their u8 levels (`codebooks`), the one layout
    the decoders and kernels take; sections without coded levels are returned as they are."""
    if spec.RICE_SECTION not in sections:
        return sections
    levels = decode_levels(sections[spec.RICE_SECTION], sections["bit_widths"])
    return {**{name: array for name, array in sections.items() if name != spec.RICE_SECTION}, "codebooks": levels}
