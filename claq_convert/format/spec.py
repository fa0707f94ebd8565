"""The .claq format: every constant and layout rule, in one place (formats/claq-v2.md; v1 in claq-v1.md).

The writer, the NumPy reference decoder, the Torch decoder, claq-inspect, the spec tests and the
conformance vectors all take their constants from here. NumPy and stdlib only: importable without torch.
"""
from __future__ import annotations

import struct

import numpy as np

MAGIC = b"CLAQ"
# Format versions this package reads -> the per-column widths each allows. v2 is v1 with widths up to 8
# (codebooks of up to 256 entries), so every v1 file is a valid v2 file but for its version number.
# v3 is v2 with coded u8 levels (section codebook_rice): every v2 file is a valid v3 file but for its number.
# v4 is v3 with Huffman-coded code streams (sections huffman_<b>): every v3 file is a valid v4 file but for its number.
WIDTHS_BY_VERSION = {1: (1, 2, 3, 4), 2: (1, 2, 3, 4, 5, 6, 7, 8), 3: (1, 2, 3, 4, 5, 6, 7, 8),
                     4: (1, 2, 3, 4, 5, 6, 7, 8)}
VERSION = 4                                # the version the writer writes
PREAMBLE = struct.Struct("<4sIQ")          # magic, version (u32), header length (u64)
ALIGNMENT = 64                             # header end and every section start
MAX_HEADER_BYTES = 64 * 1024 * 1024        # a header is metadata, never bulk data
MAX_JSON_DEPTH = 64                        # header JSON (and GGUF claq.* JSON): arrays/objects nested at most this deep
MAX_INT_DIGITS = 20                        # 2**64 - 1 has 20 digits; the value range is checked after
WORD_BITS = 32                             # code streams are u32 little-endian words
ALLOWED_BITS = WIDTHS_BY_VERSION[VERSION]  # per-column widths the writer may use
MAX_CODEBOOK = 1 << max(ALLOWED_BITS)

# dtype name in the header -> (numpy dtype, item size). One table serves writer and readers.
DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),  # BF16 kept as raw u16
    "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U8": np.dtype("u1"), "U16": np.dtype("<u2"), "U32": np.dtype("<u4"),
}

KIND_RAW = "raw"      # a tensor stored as is: one section "data"
KIND_CLAQ = "claq"    # a quantized weight W[out, in] made of the sections below
KINDS = (KIND_RAW, KIND_CLAQ)
SECTION_FIELDS = ("dtype", "shape", "offset", "length", "crc32")  # every section entry has exactly these
FILE_DTYPE = "U8"     # embedded files (tokenizer, chat template) are byte sections
# Version 2: a file's entry also says how its bytes are stored ("zlib": RFC 1950 stream, as zlib.compress)
# and its decoded size, checked (and capped) before anything is decompressed.
FILE_ENCODINGS = ("none", "zlib")
FILE_FIELDS_BY_VERSION = {1: SECTION_FIELDS, **{v: SECTION_FIELDS + ("encoding", "size") for v in (2, 3, 4)}}
MAX_FILE_BYTES = 1 << 28  # 256 MiB: embedded files are tokenizers and templates, never weights
MAX_DIMS = 8              # a tensor's and a section's shape list at most this many sizes (CLAQ-H08, CLAQ-H12)

# Sections of a quantized weight: name -> dtype. codes_<b> exist for each width b in use;
# the outlier sections exist only when the weight has outliers.
CLAQ_SECTIONS = {
    "bit_widths": "U8",        # [in]: bits of column j
    "codebook_grid": "F16",    # [2 * in]: (offset, step) of column j's grid; present exactly when codebooks is U8
    "codebooks": "F16",        # [sum_j 2**bits_j]: column j's ascending codebook, columns in order; or U8: the
                               # entries' levels on that column's grid (v2 only, see codebook_entries)
    "outlier_counts": "U8",    # [in]: outliers of column j (U16 when one exceeds 255); offsets are their cumsum
    "outlier_rows": "U16",     # [n_outliers]: ascending within a column (U32 when out > 65536)
    "outlier_values": "F16",   # [n_outliers]: replaces the decoded value at (row, j)
}
CODES_PREFIX = "codes_"        # codes_<b>: U32 words, the packed codes of the columns of width b
CODEBOOK_DTYPES = {1: ("F16",), 2: ("F16", "U8"), 3: ("F16", "U8"), 4: ("F16", "U8")}  # fp16 entries, or u8 levels on a grid (v2+)

# Version 3: coded u8 levels. A grid codebook's levels rise strictly from 0 to GRID_TOP, so only the inner
# ones are stored, as gaps: level i = level i-1 + 1 + base + d, with d Rice-coded (parameter k) and base, k
# per width and inner position from a table (formats/claq-v2.md, "Coded levels").
RICE_SECTION = "codebook_rice"   # U8 [n]: the table, then the low bits of every d, then their high parts
RICE_VERSIONS = (3, 4)
GRID_TOP = 255                   # the highest level of a grid codebook
U8_COUNT_MAX = 255               # outlier counts up to this are stored as U8
MAX_RICE_K = 7                   # a gap's low part has at most 7 bits (a level difference is below 256)

# Version 4: a stream of codes may be stored Huffman-coded (section huffman_<b>, U8) instead of codes_<b>:
# u32 bit offsets of every CHUNK_CODES-th code (chunks decode in parallel), a byte of codeword length per
# code value, then the canonical codewords back to back, least significant bit first (claq-v2.md, "Coded codes").
HUFFMAN_PREFIX = "huffman_"
HUFFMAN_VERSIONS = (4,)
CHUNK_CODES = 4096               # codes between two chunk offsets
MAX_CODEWORD_BITS = 12           # a decoder finds each codeword with one lookup in a table of 2**12 entries
MAX_CODED_STREAM_BITS = 1 << 32  # chunk offsets are u32: a longer stream is stored as codes_<b>


def huffman_section(bits: int) -> str:
    return f"{HUFFMAN_PREFIX}{bits}"


def is_huffman_section(name: str) -> bool:
    digits = name[len(HUFFMAN_PREFIX):]
    return name.startswith(HUFFMAN_PREFIX) and digits.isascii() and digits.isdigit()  # not "huffman_²"


def chunk_count(n_codes: int) -> int:
    """Chunks of a coded stream of n_codes codes: chunk c holds codes [c * CHUNK_CODES, (c + 1) * CHUNK_CODES)."""
    return (n_codes + CHUNK_CODES - 1) // CHUNK_CODES


def huffman_prefix_bytes(n_codes: int, bits: int) -> int:
    """Bytes before a coded stream's codewords: its u32 chunk offsets and a length byte per code value."""
    return 4 * chunk_count(n_codes) + (1 << bits)


def inner_levels(bits: int) -> int:
    """Levels of a codebook of `bits` bits that version 3 codes: all but the first (0) and last (255)."""
    return (1 << bits) - 2


def rice_table_widths(bit_widths: np.ndarray) -> list[int]:
    """Widths with a row in the table, ascending: those of 2 bits or more that some column has."""
    return [b for b in range(2, 9) if np.any(bit_widths == b)]


def rice_table_bytes(bit_widths: np.ndarray) -> int:
    """Bytes of the table: a (base, k) byte pair per inner position of each width in it."""
    return 2 * sum(inner_levels(b) for b in rice_table_widths(bit_widths))


def coded_gaps(bit_widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every coded gap in stream order (columns ascending, each column's inner levels 1..2**b - 2):
    (its column, its inner level's index minus 1, its row in the table of (base, k) pairs)."""
    bits = np.asarray(bit_widths).astype(np.int64)
    counts = np.where(bits >= 2, np.left_shift(1, bits) - 2, 0)
    column = np.repeat(np.arange(bits.size), counts)
    first = np.cumsum(counts) - counts                               # first gap of each column
    position = np.arange(column.size) - first[column]               # 0 .. 2**b - 3
    row_of_width = np.zeros(9, np.int64)
    start = 0
    for b in rice_table_widths(bits):
        row_of_width[b] = start
        start += inner_levels(b)
    return column, position, row_of_width[bits[column]] + position


def codebook_entries(codebooks: np.ndarray, bit_widths: np.ndarray, grid: "np.ndarray | None" = None) -> np.ndarray:
    """Every codebook entry as float32: the F16 entries, or for U8 levels l of column j on its grid
    (offset_j, step_j) = grid[2j], grid[2j+1]: float32(offset_j) + float32(step_j) * float32(l), computed
    in binary32 with the product rounded before the sum (no fused multiply-add)."""
    if grid is None:
        return np.asarray(codebooks).astype(np.float32)
    column = np.repeat(np.arange(bit_widths.size), np.left_shift(1, bit_widths.astype(np.int64)))
    pairs = np.asarray(grid).astype(np.float32).reshape(-1, 2)
    product = pairs[column, 1] * np.asarray(codebooks).astype(np.float32)
    return (pairs[column, 0] + product).astype(np.float32)


def align(n: int, to: int = ALIGNMENT) -> int:
    return (n + to - 1) // to * to


def code_words(n_codes: int, bits: int) -> int:
    """u32 words holding n_codes codes of `bits` bits, packed back to back."""
    return (n_codes * bits + WORD_BITS - 1) // WORD_BITS


def columns_of_width(bit_widths: np.ndarray, bits: int) -> np.ndarray:
    """Columns stored in stream codes_<bits>, in stream order (ascending column index)."""
    return np.flatnonzero(bit_widths == bits)


def codebook_offsets(bit_widths: np.ndarray) -> np.ndarray:
    """offsets[j] = first codebook entry of column j; offsets[in] = total entries."""
    sizes = np.left_shift(1, bit_widths.astype(np.int64))
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative codes < 2**bits into u32 words, LSB first, back to back.

    Code i occupies bits [i*bits, (i+1)*bits) of the stream, where stream bit t is bit (t % 32) of
    word t // 32. A 3-bit code may straddle two words. Unused high bits of the last word are zero.
    Example (bits=3, codes 5, 1, 7): stream 101 | 001<<3 | 111<<6 = 0b111_001_101 = 0x1CD.
    Any 32 codes fill exactly `bits` words, so the work goes a lane of 32 at a time, each lane at its
    own fixed word and shift: no per-code index array (an embedding's 28M codes took 1.2 GB that way).
    """
    codes = np.asarray(codes).ravel()
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"a code does not fit in {bits} bits")
    groups = -(-codes.size // WORD_BITS)
    lanes = np.zeros((groups, WORD_BITS), np.uint8 if bits <= 8 else np.uint32)
    lanes.ravel()[:codes.size] = codes
    words = np.zeros((groups, bits), np.uint32)
    for lane in range(WORD_BITS):
        word, shift = divmod(lane * bits, WORD_BITS)
        code = lanes[:, lane].astype(np.uint32)
        words[:, word] |= code << np.uint32(shift)  # uint32: bits past the word fall off
        if shift + bits > WORD_BITS:
            words[:, word + 1] |= code >> np.uint32(WORD_BITS - shift)
    return words.ravel()[:code_words(codes.size, bits)].astype("<u4")


def unpack_codes(words: np.ndarray, bits: int, n_codes: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 codes, a lane of 32 codes (`bits` words) at a time."""
    groups = -(-n_codes // WORD_BITS)
    words = np.asarray(words).ravel()
    grouped = np.zeros((groups, bits), np.uint32)
    used = min(words.size, grouped.size)
    grouped.ravel()[:used] = words[:used]
    codes = np.empty((groups, WORD_BITS), np.uint8)
    mask = np.uint32((1 << bits) - 1)
    for lane in range(WORD_BITS):
        word, shift = divmod(lane * bits, WORD_BITS)
        value = grouped[:, word] >> np.uint32(shift)
        if shift + bits > WORD_BITS:
            value |= grouped[:, word + 1] << np.uint32(WORD_BITS - shift)
        codes[:, lane] = value & mask
    return codes.ravel()[:n_codes]


def outlier_row_dtype(rows: int) -> str:
    return "U16" if rows <= 65536 else "U32"


def outlier_count_dtype(max_count: int) -> str:
    return "U8" if max_count <= U8_COUNT_MAX else "U16"


def claq_section_lengths(rows: int, bit_widths: np.ndarray, n_outliers: int, max_count: int = 0,
                         grid: bool = False, coded_levels: "int | None" = None,
                         coded_codes: "dict[int, int] | None" = None) -> dict[str, int]:
    """Byte length of every section of a quantized weight (before alignment padding); `grid`: u8 codebooks.
    Coded levels (v3) depend on the levels: `coded_levels` is the codebook_rice section's length; without
    it a grid weight is priced as u8 levels, an upper bound (the writer codes them only when that is shorter).
    Coded codes (v4) likewise: `coded_codes` maps a width to its huffman_<b> section's length; the widths
    it leaves out are priced as fixed-width words (codes_<b>), an upper bound."""
    lengths = {"bit_widths": bit_widths.size}
    if grid:
        lengths["codebook_grid"] = 4 * bit_widths.size
    if coded_levels is not None:
        lengths[RICE_SECTION] = int(coded_levels)
    else:
        lengths["codebooks"] = (1 if grid else 2) * int(codebook_offsets(bit_widths)[-1])
    for b in ALLOWED_BITS:
        n_cols = int(np.count_nonzero(bit_widths == b))
        if n_cols and coded_codes and b in coded_codes:
            lengths[huffman_section(b)] = int(coded_codes[b])
        elif n_cols:
            lengths[code_section(b)] = 4 * code_words(n_cols * rows, b)
    if n_outliers:
        lengths["outlier_counts"] = DTYPES[outlier_count_dtype(max_count)].itemsize * bit_widths.size
        lengths["outlier_rows"] = DTYPES[outlier_row_dtype(rows)].itemsize * n_outliers
        lengths["outlier_values"] = 2 * n_outliers
    return lengths


def claq_stored_bytes(rows: int, bit_widths: np.ndarray, n_outliers: int, max_count: int = 0,
                      grid: bool = False, coded_levels: "int | None" = None,
                      coded_codes: "dict[int, int] | None" = None) -> int:
    """Bytes the weight occupies in the file: its sections with their alignment padding."""
    return sum(align(n) for n in claq_section_lengths(rows, bit_widths, n_outliers, max_count, grid,
                                                      coded_levels, coded_codes).values())


def is_code_section(name: str) -> bool:
    digits = name[len(CODES_PREFIX):]
    return name.startswith(CODES_PREFIX) and digits.isascii() and digits.isdigit()  # not "codes_²"


def code_section(bits: int) -> str:
    return f"{CODES_PREFIX}{bits}"


def codes_padding_ok(words: np.ndarray, bits: int, n_codes: int) -> bool:
    """The bits past the last code in the last word must be zero."""
    used = n_codes * bits - WORD_BITS * (words.size - 1)
    return words.size == 0 or used >= WORD_BITS or int(words[-1]) >> used == 0
