"""Triton kernels over one code stream of a CLAQ weight: decode it, or multiply by it without decoding.

A quantized weight W[rows, C] keeps its columns grouped by bit width. One stream (`codes_<b>`) holds the
n columns of width b, `columns[c]` being the input column of stream column c (ascending). The code of
stream column c at row r sits at stream position p = c * rows + r and occupies bits [p*b, p*b + b) of
the u32 words, LSB first (spec.pack_codes); `tables[c]` is that column's codebook in float32.

- `decode_stream` writes W^T[columns[c], r] = tables[c, code(c, r)] into a [C, rows] tensor.
- `lut_matmul_stream` adds x[:, columns] @ W_stream^T to an fp32 accumulator: each code picks an entry
  of its column's codebook, scaled by the input value of that column; the codes are read once and no
  decoded weight is written anywhere. A batch of one row (a GEMV, token-by-token generation) on a
  word-aligned stream takes `_gemv_kernel`, which reads each code word once; other batches `_lut_kernel`.
- `GemvPlan` is that GEMV over all of a weight's streams in one launch, each program taking the slice
  of one stream that a schedule built once per weight names (`gemv_schedule`); the plan checks the
  streams and builds the launch once, so a call checks only x and y (`lut_gemv_streams`: plan and call).

Outliers are not handled here: they are a sparse correction the caller applies (a scatter into the
decoded W^T, or outlier_values times x added to y). Neither kernel checks `columns` against C (that
would cost a device synchronisation per call): the caller's layout guarantees it. Both run on CUDA, or
on the CPU under TRITON_INTERPRET=1 (set before this module is imported: @triton.jit reads it then).
"""
from __future__ import annotations

import functools
import math
import operator

import torch
import triton
import triton.language as tl

from ..format import spec

# The GEMV's partial sums meet in y by atomic adds that need no ordering: "relaxed" spares the memory
# fence Triton puts before each one by default ("acq_rel")
ATOMIC_SEM = tl.constexpr("relaxed")
MAX_BATCH = 16        # rows of x one LUT launch takes; a larger batch is split into chunks of this many
PROGRAMS_PER_SM = 4   # LUT launch: aim for a few resident programs per SM (132 on H100/H200)
# GEMV launch (batch 1, word-aligned streams): rows and columns of a program's tile, its warps, and the
# programs per SM the columns are split for: the 4-bit best of an H100 sweep (bench/decode-cuda.json at
# commit b013805)
GEMV_BLOCK_ROWS = 128
GEMV_BLOCK_C = 8
GEMV_WARPS = 4
GEMV_PROGRAMS_PER_SM = 16
GEMV_PREFETCH = 0     # tiles whose words are loaded ahead (_gemv_tile); not swept for this launch


@triton.jit
def _codes(words_ptr, c, r, rows, valid, BITS: tl.constexpr, ALIGNED: tl.constexpr):
    """The int32 codes of stream columns c (a [BLOCK_C] vector) at rows r ([BLOCK_R]): a [BLOCK_C, BLOCK_R] tile.

    A code is the low BITS bits of its word shifted right, plus, when it straddles into the next word,
    that word's low bits shifted left. All in u32: a shift is never by 32, and only widths that do not
    divide 32 can straddle, so the others never load a second word. A straddling code's second word is
    inside the stream (the callers checked the stream's length), so it needs no bound.
    """
    row_bit = r * BITS  # int32: a column of codes is far below 2**31 bits
    if ALIGNED:
        # each column starts on a word boundary: word and shift depend on the row only, one vector for the tile
        column_word = c.to(tl.int64) * ((rows * BITS) // 32)
        word = column_word[:, None] + (row_bit >> 5)[None, :]
        shift = (row_bit & 31)[None, :]
    else:
        bit = c.to(tl.int64)[:, None] * (rows * BITS) + row_bit[None, :]  # int64: whole streams pass 2**31 bits
        word = bit >> 5
        shift = (bit & 31).to(tl.int32)
    low = tl.load(words_ptr + word, mask=valid, other=0).to(tl.uint32, bitcast=True)
    code = low >> shift.to(tl.uint32)
    if 32 % BITS != 0:
        straddles = valid & (shift + BITS > 32)
        high = tl.load(words_ptr + word + 1, mask=straddles, other=0).to(tl.uint32, bitcast=True)
        code = code | (high << ((32 - shift) & 31).to(tl.uint32))  # high is 0 wherever the shift would be 32
    return (code & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _to_bf16(value):
    """float32 -> bfloat16 rounded to nearest, ties to even, by integer arithmetic on the bits: the same
    result as the GPU's cvt.rn, and as torch, where Triton's interpreter would truncate. Finite inputs."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _decode_kernel(words_ptr, tables_ptr, columns_ptr, out_ptr, n, rows, BITS: tl.constexpr,
                   ALIGNED: tl.constexpr, BF16: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """One [BLOCK_C, BLOCK_R] tile of W^T: stream columns on axis 0 of the grid, rows on axis 1."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = (c < n)[:, None] & (r < rows)[None, :]
    code = _codes(words_ptr, c, r, rows, valid, BITS, ALIGNED)
    value = tl.load(tables_ptr + c[:, None] * (1 << BITS) + code, mask=valid, other=0.0)
    column = tl.load(columns_ptr + c, mask=c < n, other=0)
    if BF16:
        value = _to_bf16(value)
    tl.store(out_ptr + column[:, None] * rows + r[None, :], value.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _lut_kernel(words_ptr, tables_ptr, columns_ptr, x_ptr, stride_xm, stride_xc, y_ptr, n, rows, M,
                columns_per_program, BITS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[:M, rows block] += x[:M, columns] @ W^T over one slice of the stream's columns (grid axis 1).

    BLOCK_M == 1 (a GEMV): products accumulate elementwise in a [BLOCK_C, BLOCK_R] tile and are summed
    over columns once at the end. BLOCK_M == 16: the gathered entries are one operand of an fp32 dot
    (IEEE, no TF32), the batch padded to 16. The slices' partial sums meet in y by atomic adds.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    first = tl.program_id(1) * columns_per_program
    m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        partial = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for start in range(0, columns_per_program, BLOCK_C):
        c = first + start + tl.arange(0, BLOCK_C)
        in_stream = c < n
        valid = in_stream[:, None] & (r < rows)[None, :]
        code = _codes(words_ptr, c, r, rows, valid, BITS, ALIGNED)
        entry = tl.load(tables_ptr + c[:, None] * (1 << BITS) + code, mask=valid, other=0.0)
        column = tl.load(columns_ptr + c, mask=in_stream, other=0)
        if BLOCK_M == 1:
            xc = tl.load(x_ptr + column * stride_xc, mask=in_stream, other=0.0).to(tl.float32)
            partial += entry * xc[:, None]
        else:
            xt = tl.load(x_ptr + m[:, None] * stride_xm + column[None, :] * stride_xc,
                         mask=(m < M)[:, None] & in_stream[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(xt, entry, input_precision="ieee")
    if BLOCK_M == 1:
        acc = tl.sum(partial, axis=0)[None, :]
    tl.atomic_add(y_ptr + m[:, None] * rows + r[None, :], acc, mask=(m < M)[:, None] & (r < rows)[None, :],
                  sem=ATOMIC_SEM)


@triton.jit
def _tile_words(words_ptr, first, count, start, u, words_per_column, UNIT_WORDS: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """The UNIT_WORDS words of each unit u of stream columns [first + start, + BLOCK_C): w0..w6, [BLOCK_C,
    BLOCK_U] each (those past UNIT_WORDS repeat w0 and are never read). Columns past the slice read its
    last column again (their x is 0), so a tile ahead of the slice's end stays inside the stream."""
    c_safe = first + tl.minimum(start + tl.arange(0, BLOCK_C), count - 1)
    unit_word = c_safe[:, None] * words_per_column + u[None, :] * UNIT_WORDS
    w0 = tl.load(words_ptr + unit_word, mask=(u * UNIT_WORDS < words_per_column)[None, :], other=0)
    w1, w2, w3, w4, w5, w6 = w0, w0, w0, w0, w0, w0
    if UNIT_WORDS > 1:
        w1 = tl.load(words_ptr + unit_word + 1, mask=(u * UNIT_WORDS + 1 < words_per_column)[None, :], other=0)
        w2 = tl.load(words_ptr + unit_word + 2, mask=(u * UNIT_WORDS + 2 < words_per_column)[None, :], other=0)
    if UNIT_WORDS > 3:
        w3 = tl.load(words_ptr + unit_word + 3, mask=(u * UNIT_WORDS + 3 < words_per_column)[None, :], other=0)
        w4 = tl.load(words_ptr + unit_word + 4, mask=(u * UNIT_WORDS + 4 < words_per_column)[None, :], other=0)
    if UNIT_WORDS > 5:
        w5 = tl.load(words_ptr + unit_word + 5, mask=(u * UNIT_WORDS + 5 < words_per_column)[None, :], other=0)
        w6 = tl.load(words_ptr + unit_word + 6, mask=(u * UNIT_WORDS + 6 < words_per_column)[None, :], other=0)
    return w0, w1, w2, w3, w4, w5, w6


@triton.jit
def _tile_products(words, tables_ptr, columns_ptr, x_ptr, stride_xc, first, count, start, BITS: tl.constexpr,
                   UNIT_WORDS: tl.constexpr, BLOCK_C: tl.constexpr):
    """x[column] * tables[column, code] for the tile of stream columns [first + start, + BLOCK_C) whose
    unit words are `words` (_tile_words): a [BLOCK_C, BLOCK_U, K] tile, 0 past the slice.

    Code k of a unit is word (k * BITS) // 32 shifted by a constant, plus the next word's low bits where
    it straddles: shifts and selects on words already loaded (Triton keeps a unit's K codes in one
    thread), and each code picks its column's table entry.
    """
    w0 = words[0]
    K: tl.constexpr = 32 * UNIT_WORDS // BITS
    c = start + tl.arange(0, BLOCK_C)
    c_safe = first + tl.minimum(c, count - 1)
    column = tl.load(columns_ptr + c_safe)
    xc = tl.load(x_ptr + column * stride_xc, mask=c < count, other=0.0).to(tl.float32)
    bit = tl.arange(0, K) * BITS
    shift = (bit & 31).to(tl.uint32)[None, None, :]
    if UNIT_WORDS == 1:
        code = w0.to(tl.uint32, bitcast=True)[:, :, None] >> shift
    else:
        word_of_code = (bit >> 5)[None, None, :]
        straddles = ((bit & 31) + BITS > 32)[None, None, :]
        low = tl.zeros([w0.shape[0], w0.shape[1], K], tl.uint32)
        high = tl.zeros([w0.shape[0], w0.shape[1], K], tl.uint32)
        for j in tl.static_range(UNIT_WORDS):
            word = words[j].to(tl.uint32, bitcast=True)[:, :, None]
            low = tl.where(word_of_code == j, word, low)
            high = tl.where(straddles & (word_of_code == j - 1), word, high)
        code = (low >> shift) | (high << ((32 - shift) & 31))  # high is 0 wherever the shift would be 32
    code = (code & ((1 << BITS) - 1)).to(tl.int32)
    entry = tl.load(tables_ptr + c_safe[:, None, None] * (1 << BITS) + code)
    return entry * xc[:, None, None]


@triton.jit
def _gemv_tile(words_ptr, tables_ptr, columns_ptr, x_ptr, stride_xc, y_ptr, rows, unit_block, first, count,
               BITS: tl.constexpr, UNIT_WORDS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_U: tl.constexpr,
               PREFETCH: tl.constexpr):
    """y[rows of units block `unit_block`] += x[columns] . W^T over stream columns [first, first + count).

    Every column starts on a word boundary, so it is a run of units: UNIT_WORDS words (BITS / gcd(BITS,
    32)) holding K = 32 * UNIT_WORDS / BITS codes, the same bit pattern in every unit. Each word of a
    [BLOCK_C, BLOCK_U] tile of units is loaded once (_tile_words) and split into codes by constant shifts
    (_tile_products). Products accumulate elementwise and are summed over columns once at the end; slices
    meet in y by atomic adds. (Units leading the tile's axes, a warp's lanes along one column, measured
    slower: 1.96x fp16's time at 4096 x 4096 on an H200, where this layout took 0.94x on an H100.)

    A slice is several tiles, and a tile's products wait on its words from HBM: PREFETCH tiles ahead
    (0, 1 or 2) have their words loaded before this tile's products, so that many more loads are in
    flight for a few registers a thread (a word holds up to 32 codes).
    """
    K: tl.constexpr = 32 * UNIT_WORDS // BITS
    words_per_column = rows * BITS // 32
    u = unit_block * BLOCK_U + tl.arange(0, BLOCK_U)
    partial = tl.zeros([BLOCK_C, BLOCK_U, K], tl.float32)
    if PREFETCH == 0:
        for start in range(0, count, BLOCK_C):
            words = _tile_words(words_ptr, first, count, start, u, words_per_column, UNIT_WORDS, BLOCK_C)
            partial += _tile_products(words, tables_ptr, columns_ptr, x_ptr, stride_xc, first, count, start,
                                      BITS, UNIT_WORDS, BLOCK_C)
    elif PREFETCH == 1:
        words = _tile_words(words_ptr, first, count, 0, u, words_per_column, UNIT_WORDS, BLOCK_C)
        for start in range(0, count, BLOCK_C):
            ahead = _tile_words(words_ptr, first, count, start + BLOCK_C, u, words_per_column, UNIT_WORDS, BLOCK_C)
            partial += _tile_products(words, tables_ptr, columns_ptr, x_ptr, stride_xc, first, count, start,
                                      BITS, UNIT_WORDS, BLOCK_C)
            words = ahead
    else:
        words = _tile_words(words_ptr, first, count, 0, u, words_per_column, UNIT_WORDS, BLOCK_C)
        ahead = _tile_words(words_ptr, first, count, BLOCK_C, u, words_per_column, UNIT_WORDS, BLOCK_C)
        for start in range(0, count, BLOCK_C):
            further = _tile_words(words_ptr, first, count, start + 2 * BLOCK_C, u, words_per_column, UNIT_WORDS,
                                  BLOCK_C)
            partial += _tile_products(words, tables_ptr, columns_ptr, x_ptr, stride_xc, first, count, start,
                                      BITS, UNIT_WORDS, BLOCK_C)
            words = ahead
            ahead = further
    r = u[:, None] * K + tl.arange(0, K)[None, :]
    tl.atomic_add(y_ptr + r, tl.sum(partial, axis=0), mask=r < rows, sem=ATOMIC_SEM)


@triton.jit
def _gemv_kernel(words_ptr, tables_ptr, columns_ptr, x_ptr, stride_xc, y_ptr, n, rows, columns_per_program,
                 BITS: tl.constexpr, UNIT_WORDS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_U: tl.constexpr,
                 PREFETCH: tl.constexpr):
    """One stream, batch 1: a block of units on grid axis 0, a slice of columns on axis 1."""
    first = tl.program_id(1) * columns_per_program
    _gemv_tile(words_ptr, tables_ptr, columns_ptr, x_ptr, stride_xc, y_ptr, rows, tl.program_id(0), first,
               tl.minimum(columns_per_program, n - first), BITS, UNIT_WORDS, BLOCK_C, BLOCK_U, PREFETCH)


@triton.jit
def _gemv_widths_kernel(schedule_ptr, x_ptr, stride_xc, y_ptr, rows,
                        w1, t1, c1, w2, t2, c2, w3, t3, c3, w4, t4, c4,
                        w5, t5, c5, w6, t6, c6, w7, t7, c7, w8, t8, c8,
                        WIDTHS: tl.constexpr, ROWS_ONE_WORD: tl.constexpr, C_ONE_WORD: tl.constexpr,
                        ROWS_MULTI_WORD: tl.constexpr, C_MULTI_WORD: tl.constexpr, PREFETCH: tl.constexpr):
    """Every stream of a weight in one launch, batch 1: program p takes the slice that row p of the
    schedule names (width, block of units, first stream column, column count). WIDTHS has bit b set for
    each width b present: only those widths' code is compiled. A tile spans ROWS_ONE_WORD rows and
    C_ONE_WORD columns at the widths whose unit is one word (1, 2, 4, 8 bits), ROWS_MULTI_WORD and
    C_MULTI_WORD at the others (3, 5, 6, 7); PREFETCH as _gemv_tile's."""
    entry = schedule_ptr + tl.program_id(0) * 4
    bits = tl.load(entry)
    unit_block = tl.load(entry + 1)
    first = tl.load(entry + 2)
    count = tl.load(entry + 3)
    if (WIDTHS >> 1) & 1 == 1:
        if bits == 1:
            _gemv_tile(w1, t1, c1, x_ptr, stride_xc, y_ptr, rows, unit_block, first, count, 1, 1, C_ONE_WORD,
                       ROWS_ONE_WORD // 32, PREFETCH)
    if (WIDTHS >> 2) & 1 == 1:
        if bits == 2:
            _gemv_tile(w2, t2, c2, x_ptr, stride_xc, y_ptr, rows, unit_block, first, count, 2, 1, C_ONE_WORD,
                       ROWS_ONE_WORD // 16, PREFETCH)
    if (WIDTHS >> 3) & 1 == 1:
        if bits == 3:
            _gemv_tile(w3, t3, c3, x_ptr, stride_xc, y_ptr, rows, unit_block, first, count, 3, 3, C_MULTI_WORD,
                       ROWS_MULTI_WORD // 32, PREFETCH)
    if (WIDTHS >> 4) & 1 == 1:
        if bits == 4:
            _gemv_tile(w4, t4, c4, x_ptr, stride_xc, y_ptr, rows, unit_block, first, count, 4, 1, C_ONE_WORD,
                       ROWS_ONE_WORD // 8, PREFETCH)
    if (WIDTHS >> 5) & 1 == 1:
        if bits == 5:
            _gemv_tile(w5, t5, c5, x_ptr, stride_xc, y_ptr, rows, unit_block, first, count, 5, 5, C_MULTI_WORD,
                       ROWS_MULTI_WORD // 32, PREFETCH)
    if (WIDTHS >> 6) & 1 == 1:
        if bits == 6:
            _gemv_tile(w6, t6, c6, x_ptr, stride_xc, y_ptr, rows, unit_block, first, count, 6, 3, C_MULTI_WORD,
                       ROWS_MULTI_WORD // 16, PREFETCH)
    if (WIDTHS >> 7) & 1 == 1:
        if bits == 7:
            _gemv_tile(w7, t7, c7, x_ptr, stride_xc, y_ptr, rows, unit_block, first, count, 7, 7, C_MULTI_WORD,
                       ROWS_MULTI_WORD // 32, PREFETCH)
    if (WIDTHS >> 8) & 1 == 1:
        if bits == 8:
            _gemv_tile(w8, t8, c8, x_ptr, stride_xc, y_ptr, rows, unit_block, first, count, 8, 1, C_ONE_WORD,
                       ROWS_ONE_WORD // 4, PREFETCH)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: few programs, each a NumPy step


def _check_stream(words, bits, tables, columns, rows) -> int:
    """Shape, dtype and device checks that need no synchronisation; returns n, the stream's columns."""
    if bits not in spec.ALLOWED_BITS:
        raise ValueError(f"bits must be one of {spec.ALLOWED_BITS}, got {bits}")
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    if columns.dim() != 1 or columns.dtype != torch.int64:
        raise ValueError("columns must be a 1-D int64 tensor")
    n = columns.numel()
    if tables.dtype != torch.float32 or tuple(tables.shape) != (n, 1 << bits) or not tables.is_contiguous():
        raise ValueError(f"tables must be a contiguous float32 [{n}, {1 << bits}] tensor, got "
                         f"{tables.dtype} {tuple(tables.shape)}")
    if words.dtype != torch.int32 or not words.is_contiguous():
        raise ValueError("words must be a contiguous int32 tensor (the u32 words' bits; see torch_decoder.to_torch)")
    if words.numel() < spec.code_words(n * rows, bits):
        raise ValueError(f"{words.numel()} words cannot hold {n} columns of {rows} {bits}-bit codes")
    if not columns.is_contiguous():
        raise ValueError("columns must be contiguous")
    devices = {t.device for t in (words, tables, columns)}
    if len(devices) != 1:
        raise ValueError(f"words, tables and columns must be on one device, got {sorted(map(str, devices))}")
    return n


def _block(value, default: int, least: int = 1) -> int:
    value = default if value is None else value
    if value < least or value & (value - 1):
        raise ValueError(f"a block size must be a power of two >= {least}, got {value}")
    return value


def decode_stream(words: torch.Tensor, bits: int, tables: torch.Tensor, columns: torch.Tensor, rows: int,
                  out_t: torch.Tensor, *, block_c: int | None = None, block_r: int | None = None) -> None:
    """Write out_t[columns[c], r] = tables[c, code(c, r)] for every stream column c and row r.

    out_t: contiguous W^T [C, rows], float32 (then bit-exact) or float16/bfloat16 (the fp32 entry rounded
    to nearest even). Rows of out_t (input columns) not in `columns` are left as they are: other
    streams fill them.
    """
    bits, rows = operator.index(bits), operator.index(rows)
    n = _check_stream(words, bits, tables, columns, rows)
    if out_t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out_t must be float32, float16 or bfloat16, got {out_t.dtype}")
    if out_t.dim() != 2 or out_t.shape[1] != rows or not out_t.is_contiguous() or out_t.device != words.device:
        raise ValueError(f"out_t must be a contiguous [C, {rows}] tensor on {words.device}")
    if n == 0:
        return
    block_c, block_r = _block(block_c, 16), _block(block_r, 128)
    grid = (triton.cdiv(n, block_c), triton.cdiv(rows, block_r))
    _decode_kernel[grid](words, tables, columns, out_t, n, rows, BITS=bits, ALIGNED=rows * bits % 32 == 0,
                         BF16=out_t.dtype == torch.bfloat16, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4)


def lut_matmul_stream(words: torch.Tensor, bits: int, tables: torch.Tensor, columns: torch.Tensor, rows: int,
                      x: torch.Tensor, y: torch.Tensor, *, split: int | None = None, block_c: int | None = None,
                      block_r: int | None = None) -> None:
    """y[m, r] += sum_c x[m, columns[c]] * tables[c, code(c, r)], in float32, without decoding W.

    x: [M, C] float32/float16/bfloat16 (any strides); y: contiguous float32 [M, rows], accumulated into
    (zero it for a plain product; call once per stream for a whole weight). `split`: how many programs
    share a block of rows (default: enough for PROGRAMS_PER_SM programs per SM); their partial sums are
    added atomically, so the last bits of y may vary from run to run when split > 1. One row on a
    word-aligned stream takes the GEMV kernel, unless `block_r` (a tile kernel setting) is given.
    """
    bits, rows = operator.index(bits), operator.index(rows)
    n = _check_stream(words, bits, tables, columns, rows)
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.device != words.device:
        raise ValueError(f"x must be a 2-D float32/float16/bfloat16 tensor on {words.device}")
    if y.dtype != torch.float32 or tuple(y.shape) != (x.shape[0], rows) or not y.is_contiguous() \
            or y.device != words.device:
        raise ValueError(f"y must be a contiguous float32 [{x.shape[0]}, {rows}] tensor on {words.device}")
    if n == 0 or x.shape[0] == 0:
        return
    if x.shape[0] == 1 and rows * bits % spec.WORD_BITS == 0 and block_r is None:
        _gemv_launch(words, bits, tables, columns, rows, x, y, n, split, gemv_config(bits, block_c=block_c))
        return
    for m0 in range(0, x.shape[0], MAX_BATCH):
        _lut_launch(words, bits, tables, columns, rows, x[m0:m0 + MAX_BATCH], y[m0:m0 + MAX_BATCH], n,
                    split, block_c, block_r)


def _lut_launch(words, bits, tables, columns, rows, x, y, n, split, block_c, block_r) -> None:
    M = x.shape[0]
    gemv = M == 1
    # tl.dot needs every side >= 16. Defaults: 32 x 128 (GEMV) and 32 x 64 (dot) tiles on 8 warps stay
    # under ~110 registers a thread on sm_90 with no spills, so 2-3 programs share an SM.
    block_c = _block(block_c, 32, 1 if gemv else 16)
    block_r = _block(block_r, 128 if gemv else 64, 1 if gemv else 16)
    row_blocks = triton.cdiv(rows, block_r)
    column_blocks = triton.cdiv(n, block_c)
    if split is None:
        split = triton.cdiv(PROGRAMS_PER_SM * _sm_count(x.device), row_blocks)
    split = max(1, min(split, column_blocks))
    per_program = triton.cdiv(column_blocks, split) * block_c  # whole column blocks per program
    grid = (row_blocks, triton.cdiv(n, per_program))
    _lut_kernel[grid](words, tables, columns, x, x.stride(0), x.stride(1), y, n, rows, M,
                      per_program, BITS=bits, ALIGNED=rows * bits % 32 == 0, BLOCK_M=1 if gemv else MAX_BATCH,
                      BLOCK_C=block_c, BLOCK_R=block_r, num_warps=8)


def lut_gemv_stream(words: torch.Tensor, bits: int, tables: torch.Tensor, columns: torch.Tensor, rows: int,
                    x: torch.Tensor, y: torch.Tensor, *, split: int | None = None, **tuning) -> None:
    """lut_matmul_stream for one row of x on a word-aligned stream (rows * bits a multiple of 32) by the
    GEMV kernel, with its tile settings open (`tuning`: gemv_config's keywords), for benchmarks."""
    bits, rows = operator.index(bits), operator.index(rows)
    n = _check_stream(words, bits, tables, columns, rows)
    if rows * bits % spec.WORD_BITS:
        raise ValueError(f"the GEMV kernel needs word-aligned columns: rows * bits = {rows * bits} is not a "
                         f"multiple of {spec.WORD_BITS}")
    if x.dim() != 2 or x.shape[0] != 1 or x.device != words.device:
        raise ValueError(f"x must be a [1, C] tensor on {words.device}")
    if y.dtype != torch.float32 or tuple(y.shape) != (1, rows) or not y.is_contiguous():
        raise ValueError(f"y must be a contiguous float32 [1, {rows}] tensor")
    if n:
        _gemv_launch(words, bits, tables, columns, rows, x, y, n, split, gemv_config(bits, **tuning))


def gemv_config(bits: int, block_rows=None, block_c=None, warps=None, programs_per_sm=None, prefetch=None) -> dict:
    """The GEMV launch's settings, defaults filled in. A unit is the fewest whole words that hold whole
    codes: bits / gcd(bits, 32) words, 32 / gcd(bits, 32) rows (one word of 8 rows at 4 bits, three
    words of 32 rows at 3); a tile spans whole units, at least one."""
    unit_words = bits // math.gcd(bits, spec.WORD_BITS)
    unit_rows = spec.WORD_BITS * unit_words // bits
    block_rows = _block(block_rows, GEMV_BLOCK_ROWS)
    return {"unit_words": unit_words, "block_u": max(1, block_rows // unit_rows),
            "block_c": _block(block_c, GEMV_BLOCK_C), "warps": _block(warps, GEMV_WARPS),
            "programs_per_sm": programs_per_sm or GEMV_PROGRAMS_PER_SM,
            "prefetch": _prefetch(prefetch, GEMV_PREFETCH)}


def _prefetch(value, default: int) -> int:
    value = default if value is None else value
    if value not in (0, 1, 2):
        raise ValueError(f"prefetch must be 0, 1 or 2 tiles ahead, got {value}")
    return value


def _gemv_launch(words, bits, tables, columns, rows, x, y, n, split, config: dict) -> None:
    words_per_column = rows * bits // spec.WORD_BITS
    unit_blocks = triton.cdiv(triton.cdiv(words_per_column, config["unit_words"]), config["block_u"])
    column_blocks = triton.cdiv(n, config["block_c"])
    if split is None:
        split = triton.cdiv(config["programs_per_sm"] * _sm_count(x.device), unit_blocks)
    split = max(1, min(split, column_blocks))
    per_program = triton.cdiv(column_blocks, split) * config["block_c"]
    grid = (unit_blocks, triton.cdiv(n, per_program))
    _gemv_kernel[grid](words, tables, columns, x, x.stride(1), y, n, rows, per_program,
                       BITS=bits, UNIT_WORDS=config["unit_words"], BLOCK_C=config["block_c"],
                       BLOCK_U=config["block_u"], PREFETCH=config["prefetch"], num_warps=config["warps"])


# One launch for all of a weight's streams (batch 1): tile rows and columns at widths whose unit is one
# word (1, 2, 4, 8 bits) and at the others (3, 5, 6, 7), warps, programs per SM the slices are sized for,
# tiles whose words are loaded ahead. The best geometric mean over 7B-class weights, 4-bit and 3/4-bit, of
# the sweep in bench/decode-cuda-sweep.json (H200, Triton 3.6, CUDA graphs over weights read from HBM).
# With Triton 3.6 on sm_90 this takes 48 registers a thread on 4-bit weights (10 programs of 4 warps fit
# on an SM) and 64 on 3 and 4-bit ones (8 fit), so the 8 programs an SM run in one wave
GEMV_WIDTHS_ROWS_ONE_WORD = 256
GEMV_WIDTHS_C_ONE_WORD = 8
GEMV_WIDTHS_ROWS_MULTI_WORD = 512
GEMV_WIDTHS_C_MULTI_WORD = 8
GEMV_WIDTHS_WARPS = 4
GEMV_WIDTHS_PROGRAMS_PER_SM = 8
GEMV_WIDTHS_PREFETCH = 1


def gemv_widths_config(rows_one_word=None, c_one_word=None, rows_multi_word=None, c_multi_word=None, warps=None,
                       programs_per_sm=None, prefetch=None) -> dict:
    """The one-launch GEMV's settings, defaults filled in (tile rows are powers of two >= 32: whole units)."""
    return {"rows_one_word": _block(rows_one_word, GEMV_WIDTHS_ROWS_ONE_WORD, 32),
            "c_one_word": _block(c_one_word, GEMV_WIDTHS_C_ONE_WORD),
            "rows_multi_word": _block(rows_multi_word, GEMV_WIDTHS_ROWS_MULTI_WORD, 32),
            "c_multi_word": _block(c_multi_word, GEMV_WIDTHS_C_MULTI_WORD),
            "warps": _block(warps, GEMV_WIDTHS_WARPS),
            "programs_per_sm": programs_per_sm or GEMV_WIDTHS_PROGRAMS_PER_SM,
            "prefetch": _prefetch(prefetch, GEMV_WIDTHS_PREFETCH)}


def gemv_schedule(counts: dict[int, int], rows: int, device, config: dict) -> torch.Tensor:
    """The one-launch GEMV's work list for a weight whose stream of width b has counts[b] columns: an
    int32 [programs, 4] tensor of (width, block of units, first stream column, columns). Slices hold
    about the same number of codes whatever their width (a code costs one table lookup at any width),
    sized so that the launch has about programs_per_sm programs per SM. Build it once per weight."""
    rows = operator.index(rows)
    for b in counts:
        if b not in spec.ALLOWED_BITS or rows * b % spec.WORD_BITS:
            raise ValueError(f"the one-launch GEMV needs word-aligned {b}-bit columns of {rows} rows")
    total = rows * sum(counts.values())
    codes_per_program = max(1, triton.cdiv(total, config["programs_per_sm"] * _sm_count(torch.device(device))))
    entries = []
    for b, n in sorted(counts.items()):
        unit_words = b // math.gcd(b, spec.WORD_BITS)
        unit_rows = spec.WORD_BITS * unit_words // b
        tile_rows, tile_c = ((config["rows_one_word"], config["c_one_word"]) if unit_words == 1
                             else (config["rows_multi_word"], config["c_multi_word"]))
        unit_blocks = triton.cdiv(rows // unit_rows, tile_rows // unit_rows)
        per_program = tile_c * min(triton.cdiv(n, tile_c), triton.cdiv(codes_per_program, tile_rows * tile_c))
        entries += [(b, block, first, min(per_program, n - first))
                    for first in range(0, n, per_program) for block in range(unit_blocks)]
    return torch.tensor(entries, dtype=torch.int32).reshape(-1, 4).to(device)


_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GemvPlan:
    """y += x . W^T for one row of x, every stream of a weight in one launch, its streams checked and its
    launch arguments built once: a call checks only x and y. A generation step makes a product per weight
    (211 for SmolLM2), and the checks and argument list took 8-10 us a call in Python, 1.6 us with a plan
    (bench/launch-host.json: 2-core CPU, kernel stubbed); the kernel takes 13-28 us on a 7B-class weight.

    streams: (words, bits, tables, columns) per width, at most one each, every one word-aligned (rows *
    bits a multiple of 32), on one device; `schedule`: gemv_schedule's list for these streams and `tuning`
    (made here when None). The plan holds the tensors it was given: make a new one when they change.
    """

    def __init__(self, streams, rows: int, schedule: torch.Tensor | None = None, **tuning):
        rows = operator.index(rows)
        streams = [(w, operator.index(b), t, c) for w, b, t, c in streams]
        counts = {b: _check_stream(w, b, t, c, rows) for w, b, t, c in streams}
        if len(counts) != len(streams):
            raise ValueError("at most one stream a width")
        devices = {w.device for w, *_ in streams}
        if len(devices) > 1:
            raise ValueError(f"the streams must be on one device, got {sorted(map(str, devices))}")
        config = gemv_widths_config(**tuning)
        counts = {b: n for b, n in counts.items() if n}
        self.rows, self.device = rows, next(iter(devices), None)
        if schedule is None and counts:
            schedule = gemv_schedule(counts, rows, self.device, config)
        self.schedule = schedule
        self._args = []
        for b in range(1, 9):
            stream = next((s for s in streams if s[1] == b and counts.get(b)), None)
            self._args += [schedule] * 3 if stream is None else [stream[0], stream[2], stream[3]]  # absent: never read
        self._grid = (schedule.shape[0],) if counts else None
        self._settings = dict(WIDTHS=sum(1 << b for b in counts), ROWS_ONE_WORD=config["rows_one_word"],
                              C_ONE_WORD=config["c_one_word"], ROWS_MULTI_WORD=config["rows_multi_word"],
                              C_MULTI_WORD=config["c_multi_word"], PREFETCH=config["prefetch"],
                              num_warps=config["warps"])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (contiguous float32 [1, rows]) += x (float32/float16/bfloat16 [1, C], any stride) . W^T."""
        if x.dim() != 2 or x.shape[0] != 1 or x.dtype not in _X_DTYPES \
                or (self.device is not None and x.device != self.device):
            raise ValueError("x must be a float32/float16/bfloat16 [1, C] tensor on the streams' device")
        if y.dtype != torch.float32 or tuple(y.shape) != (1, self.rows) or not y.is_contiguous():
            raise ValueError(f"y must be a contiguous float32 [1, {self.rows}] tensor")
        if self._grid is not None:
            _gemv_widths_kernel[self._grid](self.schedule, x, x.stride(1), y, self.rows, *self._args,
                                            **self._settings)


def lut_gemv_streams(streams, rows: int, x: torch.Tensor, y: torch.Tensor, schedule: torch.Tensor | None = None,
                     **tuning) -> None:
    """y += x . W^T for one row of x, every stream of the weight in one launch: GemvPlan(streams, rows,
    schedule, **tuning)(x, y). Calling a weight again, keep its GemvPlan instead."""
    GemvPlan(streams, rows, schedule, **tuning)(x, y)
