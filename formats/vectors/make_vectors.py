#!/usr/bin/env python
"""Writes the conformance vectors of formats/claq-v1.md, claq-v2.md and gguf-claq.md by hand (struct + zlib,
not the writer).

Valid files: <name>.claq with <name>.json holding the expected decoded tensors (float32 values as nested
lists) and embedded files; gguf/<name>.gguf the same for the GGUF extension. Invalid files: bad/<name>.claq
and gguf/bad/<name>.gguf, each with an expected.json naming, per file, the error category, the id of the
first rule it breaks (claq-v2.md section 7, gguf-claq.md section 5), the rules it also breaks where a file
cannot break that rule alone, and a note. Files that break a size cap (64 MiB and more) are not
committed: `write_large` writes them (sparse where it can) for the tests, and expected.json lists them
with "large": true. `python formats/vectors/make_vectors.py [DIR]` rewrites the committed ones;
tests/test_vectors.py regenerates them and checks the committed bytes are identical.
"""
from __future__ import annotations

import copy
import json
import struct
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from claq_convert.format.spec import ALIGNMENT, MAGIC, WIDTHS_BY_VERSION  # noqa: E402  (the constants' one source)

VERSION = 1  # most vectors are claq-v1.md's (every later reader reads them); GRID and its kin are version 2

F16 = {0.0: 0x0000, 0.5: 0x3800, -0.5: 0xB800, 1.0: 0x3C00, -1.0: 0xBC00, 2.0: 0x4000, -2.0: 0xC000,
       0.25: 0x3400, -0.25: 0xB400, 0.125: 0x3000, -0.125: 0xB000, 1.5: 0x3E00, -1.5: 0xBE00, 3.0: 0x4200,
       -3.0: 0xC200, 0.75: 0x3A00, -0.75: 0xBA00}


def pad(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def f16(values):
    return b"".join(struct.pack("<H", F16[v]) for v in values)


def u32(words):
    return b"".join(struct.pack("<I", w) for w in words)


class Stored(NamedTuple):
    """An embedded file's section given as stored: its bytes, `encoding` and `size` as the entry says."""
    stored: bytes
    encoding: str
    size: int


def assemble(tensors: dict, files: dict, metadata: dict, version: int = VERSION, corrupt=None, retext=None,
             pad_byte: bytes = b" ") -> bytes:
    """tensors: name -> (kind, shape, [(section, dtype, count, payload bytes)]); files: name -> bytes
    (version 2: stored zlib-compressed, with the encoding and decoded size in the entry) or Stored.
    corrupt(header, data) -> (header, data) edits the result; retext(json bytes) -> bytes edits the text."""
    data = b""
    header_tensors, header_files = {}, {}

    def place(dtype, count, payload):
        nonlocal data
        entry = {"dtype": dtype, "shape": count, "offset": len(data), "length": len(payload),
                 "crc32": zlib.crc32(payload)}
        data += payload + b"\0" * (pad(len(payload)) - len(payload))
        return entry

    for name, (kind, shape, sections) in tensors.items():
        header_tensors[name] = {"kind": kind, "shape": shape,
                                "sections": {s: place(d, c, p) for s, d, c, p in sections}}
    for name, payload in files.items():
        if isinstance(payload, Stored):
            header_files[name] = {**place("U8", [len(payload.stored)], payload.stored), "encoding": payload.encoding,
                                  "size": payload.size}
        elif version == 1:
            header_files[name] = place("U8", [len(payload)], payload)
        else:
            packed = zlib.compress(payload, 9)
            header_files[name] = {**place("U8", [len(packed)], packed), "encoding": "zlib", "size": len(payload)}
    header = {"format": "claq", "version": version, "metadata": copy.deepcopy(metadata), "tensors": header_tensors,
              "files": header_files}
    if corrupt:
        header, data = corrupt(header, data)
    text = json.dumps(header, separators=(",", ":")).encode()
    if retext:
        text = retext(text)
    text += pad_byte * (pad(16 + len(text)) - 16 - len(text))
    return struct.pack("<4sIQ", MAGIC, version, len(text)) + text + data


# The worked example of the spec: out 2, in 3, widths [3, 2, 3], one outlier.
WORKED = ("claq", [2, 3], [
    ("bit_widths", "U8", [3], bytes([3, 2, 3])),
    ("codebooks", "F16", [20], f16([-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0,      # column 0
                                    -1.0, 0.0, 0.5, 1.0,                              # column 1
                                    -2.0, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 3.0])),  # column 2
    ("codes_2", "U32", [1], u32([0x3])),         # column 1: codes 3, 0
    ("codes_3", "U32", [1], u32([0x5CD])),       # columns 0, 2: codes 5, 1 | 7, 2
    ("outlier_counts", "U8", [3], bytes([0, 0, 1])),
    ("outlier_rows", "U16", [1], struct.pack("<H", 1)),
    ("outlier_values", "F16", [1], f16([0.5])),
])
WORKED_VALUES = [[0.5, 1.0, 3.0],    # row 0: col0 code 5 -> 0.5; col1 code 3 -> 1.0; col2 code 7 -> 3.0
                 [-1.5, -1.0, 0.5]]  # row 1: col0 code 1 -> -1.5; col1 code 0 -> -1.0; col2 outlier 0.5

# 11 rows of 3-bit codes 0..7,0..2 in one column: 33 bits, code 10 straddles words 0 and 1.
STRADDLE_CODES = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]
STRADDLE_WORD0 = sum(c << (3 * i) for i, c in enumerate(STRADDLE_CODES)) & 0xFFFFFFFF
STRADDLE_WORD1 = sum(c << (3 * i) for i, c in enumerate(STRADDLE_CODES)) >> 32
STRADDLE_BOOK = [-2.0, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 2.0]
STRADDLE = ("claq", [11, 1], [
    ("bit_widths", "U8", [1], bytes([3])),
    ("codebooks", "F16", [8], f16(STRADDLE_BOOK)),
    ("codes_3", "U32", [2], u32([STRADDLE_WORD0, STRADDLE_WORD1])),
])

# 1-bit and 4-bit columns side by side: out 4, in 2; column 1 keeps two outliers.
BOOK4 = [-3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.125, 0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
ONE_FOUR = ("claq", [4, 2], [
    ("bit_widths", "U8", [2], bytes([1, 4])),
    ("codebooks", "F16", [18], f16([-0.5, 0.5] + BOOK4)),
    ("codes_1", "U32", [1], u32([0b1010])),                 # column 0, rows 0..3: codes 0, 1, 0, 1
    ("codes_4", "U32", [1], u32([0 | 10 << 4 | 0 << 8 | 15 << 12])),  # column 1: codes 0, 10, 0, 15
    ("outlier_counts", "U8", [2], bytes([0, 2])),
    ("outlier_rows", "U16", [2], struct.pack("<HH", 0, 3)),
    ("outlier_values", "F16", [2], f16([1.5, -2.0])),
])
ONE_FOUR_VALUES = [[-0.5, 1.5],        # row 0: column 1 is an outlier
                   [0.5, BOOK4[10]],
                   [-0.5, BOOK4[0]],
                   [0.5, -2.0]]        # row 3: column 1 is an outlier (its code 15 says 2.0)

# Version 2: u8 codebook levels on per-column fp16 grids, widths 1, 2, 3 and 5; out 4, in 4.
GRID_BOOKS = [(-1.0, 0.25, [0, 3, 5, 8]),                             # column 0, 2 bits: -1, -0.25, 0.25, 1
              (-0.5, 0.125, [0, 1, 2, 4, 6, 8, 12, 16]),              # column 1, 3 bits: -0.5 .. 1.5
              (0.0, 0.5, list(range(32))),                            # column 2, 5 bits: 0, 0.5 .. 15.5
              (1024.0, 2.0 ** -14, [1, 3])]                           # column 3, 1 bit: sums that round
GRID_CODES = [[3, 0, 1, 2], [7, 0, 3, 5], [31, 0, 1, 30], [0, 1, 1, 0]]  # per column, rows 0..3


def f16_any(values):
    return b"".join(struct.pack("<e", v) for v in values)


def _grid_entry(offset, step, level):
    """float32 nearest to offset + step * level: the product is exact, the sum rounds to even."""
    return struct.unpack("<f", struct.pack("<f", offset + step * level))[0]  # float64 sum is exact here


GRID = ("claq", [4, 4], [
    ("bit_widths", "U8", [4], bytes([2, 3, 5, 1])),
    ("codebook_grid", "F16", [8], f16_any([v for o, st, _ in GRID_BOOKS for v in (o, st)])),
    ("codebooks", "U8", [46], bytes([lv for _, _, levels in GRID_BOOKS for lv in levels])),
    ("codes_1", "U32", [1], u32([sum(c << i for i, c in enumerate(GRID_CODES[3]))])),
    ("codes_2", "U32", [1], u32([sum(c << (2 * i) for i, c in enumerate(GRID_CODES[0]))])),
    ("codes_3", "U32", [1], u32([sum(c << (3 * i) for i, c in enumerate(GRID_CODES[1]))])),
    ("codes_5", "U32", [1], u32([sum(c << (5 * i) for i, c in enumerate(GRID_CODES[2]))])),
])
GRID_VALUES = [[_grid_entry(o, st, levels[GRID_CODES[j][i]]) for j, (o, st, levels) in enumerate(GRID_BOOKS)]
               for i in range(4)]  # column 3: 1024 + 2**-14 rounds to 1024, 1024 + 3 * 2**-14 to 1024 + 2**-12

# Version 3: grid codebooks whose levels rise strictly from 0 to 255, coded (section codebook_rice). out 4,
# in 4, widths 2, 3, 1, 4. The section is written here bit by bit from claq-v2.md's text ("Coded levels").
CODED_BOOKS = [(-1.0, 2.0 ** -7, [0, 9, 200, 255]),
               (0.5, 0.25, [0, 1, 2, 4, 8, 16, 100, 255]),
               (2.0, 2.0 ** -6, [0, 255]),
               (-8.0, 0.0625, [0, 5, 10, 20, 30, 45, 60, 80, 100, 120, 140, 170, 200, 230, 250, 255])]
CODED_CODES = [[3, 0, 1, 2], [7, 0, 3, 5], [1, 0, 0, 1], [15, 0, 9, 4]]  # per column, rows 0..3


def coded_table(books) -> dict:
    """width -> [(base, k)] per inner position: base = half the gap, k = 2, but 3 for the last of width 2
    (any table decodes; this one gives long unary runs, low bits across bytes, and padding bits in both parts)."""
    table = {len(levels).bit_length() - 1: [((levels[i] - levels[i - 1] - 1) // 2, 2) for i in range(1, len(levels) - 1)]
             for _, _, levels in books if len(levels) > 2}
    table[2][-1] = (table[2][-1][0], 3)
    return table


def bits_to_bytes(bits: str) -> bytes:
    """'0'/'1' characters, bit t of the stream being bit t mod 8 of byte t div 8, zero-padded."""
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8][::-1], 2) for i in range(0, len(bits), 8))


def rice_section(books, table) -> tuple[bytes, bytes, bytes]:
    """(table, low part, unary part) of codebook_rice for these columns' levels."""
    low = unary = ""
    for _, _, levels in books:
        rows = table.get(len(levels).bit_length() - 1, [])
        for i in range(1, len(levels) - 1):
            base, k = rows[i - 1]
            d = levels[i] - levels[i - 1] - 1 - base
            low += "".join(str((d >> t) & 1) for t in range(k))
            unary += "1" * (d >> k) + "0"
    head = bytes(v for b in sorted(table) for row in table[b] for v in row)
    return head, bits_to_bytes(low), bits_to_bytes(unary)


CODED_RICE = rice_section(CODED_BOOKS, coded_table(CODED_BOOKS))


def coded(parts=CODED_RICE, **changes) -> tuple:
    rice = b"".join(parts)
    tensor = ("claq", [4, 4], [
        ("bit_widths", "U8", [4], bytes([2, 3, 1, 4])),
        ("codebook_grid", "F16", [8], f16_any([v for o, st, _ in CODED_BOOKS for v in (o, st)])),
        ("codebook_rice", "U8", [len(rice)], rice),
        ("codes_1", "U32", [1], u32([sum(c << i for i, c in enumerate(CODED_CODES[2]))])),
        ("codes_2", "U32", [1], u32([sum(c << (2 * i) for i, c in enumerate(CODED_CODES[0]))])),
        ("codes_3", "U32", [1], u32([sum(c << (3 * i) for i, c in enumerate(CODED_CODES[1]))])),
        ("codes_4", "U32", [1], u32([sum(c << (4 * i) for i, c in enumerate(CODED_CODES[3]))])),
    ])
    return edit(tensor, **changes) if changes else tensor


CODED_VALUES = [[_grid_entry(o, st, levels[CODED_CODES[j][i]]) for j, (o, st, levels) in enumerate(CODED_BOOKS)]
                for i in range(4)]

NOTE2 = {"note.txt": b"conformance vector, version 2\n" * 3}  # zlib-compressed in a version-2 file
RAW = ("raw", [3], [("data", "F32", [3], struct.pack("<3f", 1.0, -2.5, 0.25))])
METADATA = {"config": {"model_type": "example"}, "generation_config": None, "conversion": {"tool": "hand-written"}}

VALID = {
    "worked_example": ({"w": WORKED, "norm": RAW}, {"note.txt": b"conformance vector\n"},
                       {"w": WORKED_VALUES, "norm": [1.0, -2.5, 0.25]}),
    "three_bit_straddle": ({"w": STRADDLE}, {}, {"w": [[STRADDLE_BOOK[c]] for c in STRADDLE_CODES]}),
    "one_and_four_bit_outliers": ({"w": ONE_FOUR}, {}, {"w": ONE_FOUR_VALUES}),
    "v2_grid_codebooks": ({"w": GRID}, NOTE2, {"w": GRID_VALUES}, 2),
}


def _overlap(header, data):
    s = header["tensors"]["w"]["sections"]
    s["codebooks"]["offset"] = s["bit_widths"]["offset"]  # two sections at one place
    return header, data


def _flip_byte(header, data):
    return header, data[:70] + bytes([data[70] ^ 0xFF]) + data[71:]


def _hole(header, data):
    for entry in header["tensors"]["w"]["sections"].values():
        entry["offset"] += 64
    return header, b"\0" * 64 + data


def _bad_width(header, data):
    return header, bytes([5]) + data[1:]


def _bad_width_crc(header, data):
    header, data = _bad_width(header, data)
    header["tensors"]["w"]["sections"]["bit_widths"]["crc32"] = zlib.crc32(data[:3])
    return header, data


def _drop_grid(header, data):
    del header["tensors"]["w"]["sections"]["codebook_grid"]  # its bytes stay: a hole at offset 64
    return header, data


def _negative_step(header, data):
    entry = header["tensors"]["w"]["sections"]["codebook_grid"]
    start = entry["offset"]
    payload = data[start:start + 2] + f16_any([-0.25]) + data[start + 4:start + entry["length"]]
    entry["crc32"] = zlib.crc32(payload)
    return header, data[:start] + payload + data[start + entry["length"]:]


def _file_size(header, data):
    header["files"]["note.txt"]["size"] += 1  # inflates to one byte less than declared
    return header, data


def _file_not_zlib(header, data):
    entry = header["files"]["note.txt"]
    start, end = entry["offset"], entry["offset"] + entry["length"]
    payload = bytes([data[start] ^ 0xFF]) + data[start + 1:end]  # a broken zlib header, checksum updated
    entry["crc32"] = zlib.crc32(payload)
    return header, data[:start] + payload + data[end:]


def _file_no_encoding(header, data):
    del header["files"]["note.txt"]["encoding"]
    return header, data


# ------------------------------------------------------------------------------------------ more valid files

def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Each rule's boundary, on the valid side (claq-v2.md section 7): JSON at its limits (the "limits" object is at
# depth 4, so 60 brackets reach depth 64), names and sizes at theirs, an 8-bit column, grid steps of -0 and 0,
# a column whose every row is an outlier, U16 counts and U32 rows, a stored and a compressed file, odd tensor names.
LIMITS = (b'{"int_max":18446744073709551615,"int_min":-9223372036854775808,"float_max":1.7976931348623157e308,'
          b'"underflow":1e-400,"pair":"\\ud83d\\ude00","del":"\x7f","deep":' + _nested(60) + b'}')
BOUNDARY_METADATA = {"config": {"model_type": "example"}, "conversion": {"tool": "hand-written", "limits": "@@L@@"},
                     "extra": True}  # no generation_config: the three keys are checked where present
EIGHT_BOOK = [(i - 128) / 8 for i in range(256)]     # exact in fp16
EIGHT = ("claq", [3, 2], [
    ("bit_widths", "U8", [2], bytes([8, 1])),
    ("codebooks", "F16", [258], f16_any(EIGHT_BOOK + [-1.0, 1.0])),
    ("codes_1", "U32", [1], u32([1 | 0 << 1 | 1 << 2])),              # column 1: codes 1, 0, 1
    ("codes_8", "U32", [1], u32([0 | 255 << 8 | 128 << 16])),         # column 0: codes 0, 255, 128 (top byte zero)
    ("outlier_counts", "U16", [2], struct.pack("<2H", 3, 0)),         # every row of column 0 is an outlier
    ("outlier_rows", "U32", [3], struct.pack("<3I", 0, 1, 2)),
    ("outlier_values", "F16", [3], f16_any([0.5, -0.5, 2.0])),
])
EIGHT_VALUES = [[0.5, 1.0], [-0.5, -1.0], [2.0, 1.0]]
ZERO_STEPS = ("claq", [2, 2], [
    ("bit_widths", "U8", [2], bytes([1, 1])),
    ("codebook_grid", "F16", [4], f16_any([1.0, -0.0, -2.0, 0.0])),   # steps -0 and 0: every entry is the offset
    ("codebooks", "U8", [4], bytes([0, 255, 0, 255])),
    ("codes_1", "U32", [1], u32([0b0110])),                           # column 0: 0, 1; column 1: 1, 0
])
ZERO_STEPS_VALUES = [[1.0, -2.0], [1.0, -2.0]]
BOUNDARY_FILES = {"x" * 255: Stored(b"longest name\n", "none", 13),   # 255 bytes
                  "\u00e9" * 127: b"two-byte name, 254 bytes\n",      # zlib
                  "x\u0378": Stored(b"unassigned code point\n", "none", 22),
                  " ": Stored(b"a space\n", "none", 8)}
TALL_BASE = [("bit_widths", "U8", [1], b"\1"), ("codebooks", "F16", [2], f16([-1.0, 1.0]))]
TALL_OUTLIER = [("outlier_counts", "U8", [1], b"\1"), ("outlier_values", "F16", [1], f16([0.5]))]


def _tall(rows: int, row_dtype: str) -> tuple:
    """A rows x 1 weight of 1-bit codes 0 (-1.0) with one outlier, 0.5, in row 5."""
    row = struct.pack("<H" if row_dtype == "U16" else "<I", 5)
    return ("claq", [rows, 1], TALL_BASE + [("codes_1", "U32", [(rows + 31) // 32], bytes(4 * ((rows + 31) // 32)))]
            + TALL_OUTLIER[:1] + [("outlier_rows", row_dtype, [1], row)] + TALL_OUTLIER[1:])


VALID.update({
    "v2_boundaries": ({"": EIGHT, "ctl\n\u0001": ZERO_STEPS}, BOUNDARY_FILES,
                      {"": EIGHT_VALUES, "ctl\n\u0001": ZERO_STEPS_VALUES}, 2, BOUNDARY_METADATA,
                      lambda t: t.replace(b'"@@L@@"', LIMITS) + b"\n\t\r"),
    "v2_empty": ({}, {}, {}, 2),
})


# ------------------------------------------------------------------------------------------ invalid files

B2 = {"w": WORKED, "g": GRID, "norm": RAW}  # the base of most version-2 vectors; its file is NOTE2 (zlib)


def v2(tensors=None, files=None, **kw) -> bytes:
    return assemble(B2 if tensors is None else tensors, NOTE2 if files is None else files, METADATA, 2, **kw)


def v3(tensors=None, files=None, **kw) -> bytes:
    return assemble({**B2, "c": coded()} if tensors is None else tensors, NOTE2 if files is None else files,
                    METADATA, 3, **kw)


VALID["v3_coded_levels"] = ({"c": coded(), "g": GRID}, NOTE2, {"c": CODED_VALUES, "g": GRID_VALUES}, 3)
B3 = {**B2, "c": coded()}  # the base of the version-3 vectors


def _rice_flip(part: int, index: int, mask: int) -> tuple:
    """CODED_RICE with byte `index` of part `part` (0 table, 1 low bits, 2 unary) xor `mask`."""
    parts = [bytearray(p) for p in CODED_RICE]
    parts[part][index] ^= mask
    return tuple(bytes(p) for p in parts)


def v1(tensors=None, files=None, **kw) -> bytes:
    return assemble({"w": WORKED, "norm": RAW} if tensors is None else tensors,
                    {"note.txt": b"conformance vector\n"} if files is None else files, METADATA, 1, **kw)


def edit(tensor: tuple, **changes) -> tuple:
    """The tensor with sections replaced (name=(dtype, shape, payload)), dropped (name=None) or added at the end."""
    kind, shape, sections = tensor
    names = [s[0] for s in sections]
    out = [(n, *changes[n]) if n in changes else (n, *rest) for n, *rest in sections if changes.get(n, 0) is not None]
    return kind, shape, out + [(n, *v) for n, v in changes.items() if v is not None and n not in names]


def section(t: tuple, name: str) -> tuple:
    return next(tuple(rest) for n, *rest in t[2] if n == name)


def hdr(fn):
    """A corrupt hook that edits the header in place and keeps the data."""
    def corrupt(header, data):
        fn(header)
        return header, data
    return corrupt


def conv(raw: bytes):
    """retext hook: raw JSON text in place of metadata.conversion.tool's value."""
    return lambda text: text.replace(b'"hand-written"', raw)


def sec(h, tensor, name):
    return h["tensors"][tensor]["sections"][name]


def _overlap_exact():
    """a (100 bytes) covers b's place: b overlaps it, and no byte of the data region is left out."""
    a = struct.pack("<25f", *([1.0] * 16 + [1.0] + [0.0] * 8))  # bytes 64..68 are b's; a's bytes after them zero
    b = struct.pack("<f", 1.0)

    def corrupt(header, data):
        sec(header, "b", "data")["offset"] = 64
        return header, data[:128]
    return v2({"a": ("raw", [25], [("data", "F32", [25], a)]), "b": ("raw", [4], [("data", "U8", [4], b)])}, {},
              corrupt=corrupt)


def _unaligned_header():
    blob = v2()
    n = struct.unpack_from("<Q", blob, 8)[0]
    return blob[:8] + struct.pack("<Q", n - 1) + blob[16:16 + n - 1] + blob[16 + n:]


def _zlib_edit(fn, size_change=0):
    packed = fn(zlib.compress(NOTE2["note.txt"], 9))
    return v2(files={"note.txt": Stored(packed, "zlib", len(NOTE2["note.txt"]) + size_change)})


def _data_edit(offset, value):
    def corrupt(header, data):
        return header, data[:offset] + bytes([value]) + data[offset + 1:]
    return corrupt


WORKED_W0 = edit(WORKED, bit_widths=("U8", [3], bytes([3, 0, 3])), codes_2=None,
                 codebooks=("F16", [17], section(WORKED, "codebooks")[2][:16] + f16([0.0]) +
                            section(WORKED, "codebooks")[2][24:]))
WORKED_V1_W5 = edit(WORKED, bit_widths=("U8", [3], bytes([5, 2, 3])),
                    codebooks=("F16", [44], f16_any([v / 8 for v in range(32)]) + section(WORKED, "codebooks")[2][16:]),
                    codes_3=("U32", [1], u32([7 | 2 << 3])))
OUTLIERS = dict(outlier_counts=("U8", [3], bytes([0, 0, 2])), outlier_rows=("U16", [2], struct.pack("<2H", 1, 0)),
                outlier_values=("F16", [2], f16([0.5, 0.5])))
FILE_NAMES = {"h28_name_slash": "a/b", "h28_name_backslash": "a\\b", "h28_name_dotdot": "..", "h28_name_empty": "",
              "h28_name_256_bytes": "x" * 256, "h28_name_256_bytes_utf8": "\u00e9" * 128,
              "h28_name_control": "x\u0001", "h28_name_no_break_space": "x\u00a0", "h28_name_private_use": "x\ue000"}

# ------------------------------------------------------------------------------------------ version 4: coded codes
# Sections huffman_<b>, written here bit by bit from claq-v2.md's text ("Coded codes"), not by the package's
# encoder: the canonical code of the lengths, each codeword most significant bit first from the lowest bit
# position, a u32 bit offset of every CHUNK-th code's codeword, the length bytes in between.
CHUNK = 4096  # codes between two chunk offsets


def canonical(lengths) -> dict:
    """value -> its codeword as '0'/'1' characters, first bit first: the values with a length, sorted by
    (length, value); the first gets 0, each next (previous + 1) << (its length - the previous one's)."""
    order = sorted((n, s) for s, n in enumerate(lengths) if n)
    words, code = {}, 0
    for i, (n, s) in enumerate(order):
        if i:
            code = (code + 1) << (n - order[i - 1][0])
        assert code < 1 << n, "the lengths break Kraft's inequality"
        words[s] = format(code, f"0{n}b")
    return words


def huffman_parts(codes, lengths, replace=None) -> tuple[bytes, bytes, bytes]:
    """(chunk offsets, length bytes, codewords) of huffman_<b> for `codes` (in stream order) under the canonical
    code of `lengths` [2**b]; `replace` maps a code's index to the bits written in place of its codeword (the
    offsets follow what is written)."""
    words = canonical(lengths)
    stream, starts = "", []
    for e, c in enumerate(codes):
        if e % CHUNK == 0:
            starts.append(len(stream))
        stream += (replace or {}).get(e) or words[c]
    return u32(starts), bytes(lengths), bits_to_bytes(stream)


def hsec(parts) -> tuple:
    """A huffman_<b> section entry (dtype, shape, payload) from its three parts."""
    payload = b"".join(parts)
    return "U8", [len(payload)], payload


def stream_of(columns) -> list:
    """The codes of a stream: its columns' codes (each in row order), column after column."""
    return [c for column in columns for c in column]


# The spec's worked example: one column of 6 rows at 2 bits, codes 1, 1, 0, 2, 1, 1; lengths [2, 1, 2, 0].
HWORKED_CODES, HWORKED_LENGTHS = [1, 1, 0, 2, 1, 1], [2, 1, 2, 0]
HWORKED_PARTS = huffman_parts(HWORKED_CODES, HWORKED_LENGTHS)
assert b"".join(HWORKED_PARTS) == bytes.fromhex("000000000201020034"), b"".join(HWORKED_PARTS).hex()
HWORKED_BOOK = [-1.0, -0.25, 0.25, 1.0]
HWORKED = ("claq", [6, 1], [
    ("bit_widths", "U8", [1], bytes([2])),
    ("codebooks", "F16", [4], f16(HWORKED_BOOK)),
    ("huffman_2", *hsec(HWORKED_PARTS)),          # 9 bytes where codes_2 takes 4: valid, if not the writer's choice
])
HWORKED_VALUES = [[HWORKED_BOOK[c]] for c in HWORKED_CODES]

# codes_<b> and huffman_<b> in one weight: out 5, in 4, widths [2, 3, 1, 3], one outlier. codes_2 holds column 0;
# huffman_1 column 2, every code 1: an incomplete code of one codeword, "0" (the section at T19's least length);
# huffman_3 columns 1 and 3 under an incomplete code with two 12-bit codewords (3 and 4) and one for a value the
# stream does not use (5): 1 -> 0, 0 -> 10, 2 -> 110, 7 -> 1110, 5 -> 11110, 3 -> 111110000000, 4 -> 111110000001.
MIX_CODES = [[3, 0, 1, 2, 1], [1, 0, 2, 7, 3], [1, 1, 1, 1, 1], [4, 1, 1, 0, 2]]  # per column, rows 0..4
MIX_BOOKS = [[-1.0, -0.25, 0.25, 1.0], [-2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0], [-0.5, 0.5],
             [-3.0, -2.0, -1.0, -0.25, 0.25, 1.0, 2.0, 3.0]]
MIX_LENGTHS = {1: [0, 1], 3: [2, 1, 3, 12, 12, 5, 0, 4]}
MIX_STREAMS = {1: stream_of([MIX_CODES[2]]), 3: stream_of([MIX_CODES[1], MIX_CODES[3]])}
MIX_PARTS = {b: huffman_parts(MIX_STREAMS[b], MIX_LENGTHS[b]) for b in (1, 3)}
assert canonical(MIX_LENGTHS[3])[4] == "111110000001" and len(MIX_PARTS[3][2]) == 6  # 41 bits


def mix(**changes) -> tuple:
    tensor = ("claq", [5, 4], [
        ("bit_widths", "U8", [4], bytes([2, 3, 1, 3])),
        ("codebooks", "F16", [22], f16([v for book in MIX_BOOKS for v in book])),
        ("codes_2", "U32", [1], u32([sum(c << (2 * i) for i, c in enumerate(MIX_CODES[0]))])),
        ("huffman_1", *hsec(MIX_PARTS[1])),
        ("huffman_3", *hsec(MIX_PARTS[3])),
        ("outlier_counts", "U8", [4], bytes([0, 0, 0, 1])),
        ("outlier_rows", "U16", [1], struct.pack("<H", 2)),
        ("outlier_values", "F16", [1], f16([0.75])),
    ])
    return edit(tensor, **changes) if changes else tensor


def _mix3(parts) -> tuple:
    """MIX with its huffman_3 section made of these three parts."""
    return mix(huffman_3=hsec(parts))


MIX_VALUES = [[MIX_BOOKS[j][MIX_CODES[j][i]] for j in range(4)] for i in range(5)]
MIX_VALUES[2][3] = 0.75  # the outlier

# The longest codewords, and a section at T19's greatest length: 2 rows of 1 bit, lengths [12, 12] (incomplete).
LONGEST = ("claq", [2, 1], [
    ("bit_widths", "U8", [1], bytes([1])),
    ("codebooks", "F16", [2], f16([-0.5, 0.5])),
    ("huffman_1", *hsec(huffman_parts([1, 0], [12, 12]))),  # 000000000001 000000000000: 3 bytes, 12 bits a code
])
LONGEST_VALUES = [[0.5], [-0.5]]

# Coded levels and coded codes in one weight: version 3's coded() with codes_3 stored as huffman_3.
RICE_HUFFMAN = coded(codes_3=None, huffman_3=hsec(huffman_parts(CODED_CODES[1], [2, 0, 0, 2, 0, 2, 0, 2])))

# Several chunks: 3000 rows x 2 columns at 2 bits, 6000 codes in 2 chunks (chunk 1 starts at row 1096 of column
# 1, inside a byte); lengths [2, 1, 3, 3]: 1 -> 0, 0 -> 10, 2 -> 110, 3 -> 111, about 1.75 bits a code.
CHUNKS_ROWS = 3000


def _chunk_codes() -> list:
    """6000 codes from a linear congruential generator, about half of them 1."""
    codes, x = [], 12345
    for _ in range(2 * CHUNKS_ROWS):
        x = (x * 1103515245 + 12345) % (1 << 31)
        r = (x >> 16) % 16
        codes.append(1 if r < 8 else 0 if r < 12 else 2 if r < 14 else 3)
    return codes


CHUNKS_CODES = _chunk_codes()
CHUNKS_LENGTHS = [2, 1, 3, 3]
CHUNKS_PARTS = huffman_parts(CHUNKS_CODES, CHUNKS_LENGTHS)
assert len(CHUNKS_PARTS[0]) == 8 and struct.unpack("<I", CHUNKS_PARTS[0][4:])[0] % 8
CHUNKS_BOOKS = [[-1.0, -0.25, 0.25, 1.0], [-2.0, -0.5, 0.5, 2.0]]


def chunks(parts=CHUNKS_PARTS) -> tuple:
    return ("claq", [CHUNKS_ROWS, 2], [
        ("bit_widths", "U8", [2], bytes([2, 2])),
        ("codebooks", "F16", [8], f16([v for book in CHUNKS_BOOKS for v in book])),
        ("huffman_2", *hsec(parts)),
    ])


CHUNKS_VALUES = [[CHUNKS_BOOKS[j][CHUNKS_CODES[j * CHUNKS_ROWS + i]] for j in range(2)] for i in range(CHUNKS_ROWS)]
COMPACT_JSON = {"v4_chunks"}  # expected values written without indentation (6000 of them)

VALID["v4_coded_codes"] = ({"worked": HWORKED, "mix": mix(), "longest": LONGEST, "rice": RICE_HUFFMAN}, NOTE2,
                           {"worked": HWORKED_VALUES, "mix": MIX_VALUES, "longest": LONGEST_VALUES,
                            "rice": CODED_VALUES}, 4)
VALID["v4_chunks"] = ({"k": chunks()}, {}, {"k": CHUNKS_VALUES}, 4)
B4 = {"w": WORKED, "norm": RAW, "h": mix(), "k": chunks()}  # the base of the version-4 vectors


def v4(tensors=None, files=None, **kw) -> bytes:
    return assemble(B4 if tensors is None else tensors, NOTE2 if files is None else files, METADATA, 4, **kw)


def _mix3_replace(replace: dict, cut: "int | None" = None) -> tuple:
    """MIX's huffman_3 with some codes' bits replaced, the codewords part cut to `cut` bytes."""
    offsets, lengths, stream = huffman_parts(MIX_STREAMS[3], MIX_LENGTHS[3], replace)
    return _mix3((offsets, lengths, stream[:cut]))


def _mix3_lengths(lengths) -> tuple:
    """MIX's huffman_3 with other length bytes (its offsets and codewords as they were)."""
    return _mix3((MIX_PARTS[3][0], bytes(lengths), MIX_PARTS[3][2]))


def _chunks_gap() -> tuple:
    """CHUNKS with a zero bit after chunk 0's last codeword: chunk 1's offset one bit on, its codewords valid."""
    last = CHUNKS_CODES[CHUNK - 1]
    return chunks(huffman_parts(CHUNKS_CODES, CHUNKS_LENGTHS, {CHUNK - 1: canonical(CHUNKS_LENGTHS)[last] + "0"}))


# name -> (make, category, rule, note[, also]): every rule of claq-v2.md section 7 has a file that breaks it and,
# where a file can, no other rule ("also" lists the later rules a file of that rule cannot help breaking).
BAD = {
    # existing vectors, with their rules
    "wrong_magic": (lambda: b"GGUF" + assemble({"w": WORKED}, {}, METADATA)[4:], "BadMagic", "CLAQ-P02",
                    "magic GGUF"),
    "future_version": (lambda: assemble({"w": WORKED}, {}, METADATA, version=max(WIDTHS_BY_VERSION) + 1),
                       "UnsupportedVersion", "CLAQ-P03", f"version {max(WIDTHS_BY_VERSION) + 1}"),
    "truncated": (lambda: assemble({"w": WORKED}, {}, METADATA)[:-70], "BadLayout", "CLAQ-L04",
                  "the last 70 bytes cut off"),
    "short_preamble": (lambda: b"CLAQ\x01\x00", "TruncatedFile", "CLAQ-P01", "6 bytes"),
    "header_past_end": (lambda: struct.pack("<4sIQ", MAGIC, VERSION, 1 << 40) + b"{}", "BadHeader", "CLAQ-P04",
                        "N = 2^40 in an 18-byte file", ["CLAQ-P05", "CLAQ-P06"]),
    "overlap": (lambda: assemble({"w": WORKED}, {}, METADATA, corrupt=_overlap), "BadLayout", "CLAQ-L02",
                "codebooks at bit_widths' offset", ["CLAQ-L03"]),
    "hole": (lambda: assemble({"w": WORKED}, {}, METADATA, corrupt=_hole), "BadLayout", "CLAQ-L03",
             "the first section at 64"),
    "checksum": (lambda: assemble({"w": WORKED}, {}, METADATA, corrupt=_flip_byte), "ChecksumMismatch", "CLAQ-C01",
                 "a byte of codebooks flipped"),
    "bit_width_5": (lambda: assemble({"w": WORKED}, {}, METADATA, corrupt=_bad_width_crc), "BadTensorData", "CLAQ-T01",
                    "version 1, a 5-bit column, its codebook and codes left as for 3 bits", ["CLAQ-T02", "CLAQ-T08"]),
    "not_json": (lambda: struct.pack("<4sIQ", MAGIC, VERSION, 48) + b"{not json" + b" " * 39, "BadHeader", "CLAQ-J03",
                 "{not json"),
    "v1_grid_codebooks": (lambda: assemble({"w": GRID}, {}, METADATA, version=1), "BadHeader", "CLAQ-H19",
                          "version 1 with codebook_grid, U8 codebooks and codes_5", ["CLAQ-H22"]),
    "v2_grid_missing": (lambda: assemble({"w": GRID}, {}, METADATA, version=2, corrupt=_drop_grid), "BadHeader",
                        "CLAQ-H26", "U8 codebooks, codebook_grid's entry removed (its bytes left)", ["CLAQ-L03"]),
    "v2_grid_negative_step": (lambda: assemble({"w": GRID}, {}, METADATA, version=2, corrupt=_negative_step),
                              "BadTensorData", "CLAQ-T04", "column 0's step is -0.25"),
    "v2_file_size": (lambda: assemble({"w": GRID}, NOTE2, METADATA, version=2, corrupt=_file_size), "BadFileData",
                     "CLAQ-F02", "size one more than the stream inflates to"),
    "v2_file_not_zlib": (lambda: assemble({"w": GRID}, NOTE2, METADATA, version=2, corrupt=_file_not_zlib),
                         "BadFileData", "CLAQ-F01", "the zlib header's first byte flipped"),
    "v2_file_no_encoding": (lambda: assemble({"w": GRID}, NOTE2, METADATA, version=2, corrupt=_file_no_encoding),
                            "BadHeader", "CLAQ-H10", "a version-2 file entry without encoding"),
    # preamble
    "p03_version_0": (lambda: v2()[:4] + struct.pack("<I", 0) + v2()[8:], "UnsupportedVersion", "CLAQ-P03",
                      "version 0"),
    "p05_header_past_end": (lambda: v2()[:40], "TruncatedFile", "CLAQ-P05", "the file cut inside its header"),
    "p06_header_unaligned": (_unaligned_header, "BadHeader", "CLAQ-P06", "N one less: 16 + N = 63 mod 64"),
    # the header's JSON (in metadata.conversion)
    "j01_invalid_byte": (lambda: v2(retext=conv(b'"hand\xffwritten"')), "BadHeader", "CLAQ-J01", "a 0xFF byte"),
    "j01_overlong": (lambda: v2(retext=conv(b'"\xc0\xaf"')), "BadHeader", "CLAQ-J01", "an overlong '/'"),
    "j01_encoded_surrogate": (lambda: v2(retext=conv(b'"\xed\xa0\x80"')), "BadHeader", "CLAQ-J01",
                              "U+D800 encoded in UTF-8"),
    "j02_leading_space": (lambda: v2(retext=lambda t: b" " + t), "BadHeader", "CLAQ-J02", "a space before {"),
    "j02_byte_order_mark": (lambda: v2(retext=lambda t: b"\xef\xbb\xbf" + t), "BadHeader", "CLAQ-J02", "a BOM"),
    "j03_two_values": (lambda: v2(retext=lambda t: t + b"{}"), "BadHeader", "CLAQ-J03", "{} after the object"),
    "j03_nul_padding": (lambda: v2(pad_byte=b"\0"), "BadHeader", "CLAQ-J03", "padded with NUL, not spaces"),
    "j03_trailing_comma": (lambda: v2(retext=conv(b"[1,]")), "BadHeader", "CLAQ-J03", "[1,]"),
    "j03_raw_tab": (lambda: v2(retext=conv(b'"tab\there"')), "BadHeader", "CLAQ-J03", "a raw tab in a string"),
    "j03_single_quotes": (lambda: v2(retext=conv(b"'x'")), "BadHeader", "CLAQ-J03", "'x'"),
    "j04_duplicate_key": (lambda: v2(retext=conv(b'{"a":1,"a":2}')), "BadHeader", "CLAQ-J04", '{"a":1,"a":2}'),
    "j04_duplicate_escaped_key": (lambda: v2(retext=conv(b'{"a":1,"\\u0061":2}')), "BadHeader", "CLAQ-J04",
                                  '"a" and "\\u0061"'),
    "j05_nan": (lambda: v2(retext=conv(b"NaN")), "BadHeader", "CLAQ-J05", "NaN"),
    "j05_minus_infinity": (lambda: v2(retext=conv(b"-Infinity")), "BadHeader", "CLAQ-J05", "-Infinity"),
    "j06_int_2_64": (lambda: v2(retext=conv(b"18446744073709551616")), "BadHeader", "CLAQ-J06", "2^64"),
    "j06_int_below_min": (lambda: v2(retext=conv(b"-9223372036854775809")), "BadHeader", "CLAQ-J06", "-2^63 - 1"),
    "j06_int_21_digits": (lambda: v2(retext=conv(b"1" * 21)), "BadHeader", "CLAQ-J06", "21 digits"),
    "j07_float_rounds_to_infinity": (lambda: v2(retext=conv(b"1.7976931348623159e308")), "BadHeader", "CLAQ-J07",
                                     "rounds to infinity"),
    "j07_float_1e309": (lambda: v2(retext=conv(b"-1e309")), "BadHeader", "CLAQ-J07", "-1e309"),
    "j08_lone_high_surrogate": (lambda: v2(retext=conv(b'"\\ud800"')), "BadHeader", "CLAQ-J08", '"\\ud800"'),
    "j08_lone_low_surrogate": (lambda: v2(retext=conv(b'"x\\udc00"')), "BadHeader", "CLAQ-J08", '"x\\udc00"'),
    "j09_depth_65": (lambda: v2(retext=conv(_nested(62))), "BadHeader", "CLAQ-J09", "arrays 65 deep"),
    # the header's schema
    "h01_extra_key": (lambda: v2(corrupt=hdr(lambda h: h.update(extra=1))), "BadHeader", "CLAQ-H01", "a sixth key"),
    "h01_no_metadata": (lambda: v2(corrupt=hdr(lambda h: h.pop("metadata"))), "BadHeader", "CLAQ-H01",
                        "no metadata"),
    "h02_format": (lambda: v2(corrupt=hdr(lambda h: h.update(format="CLAQ"))), "BadHeader", "CLAQ-H02",
                   'format "CLAQ"'),
    "h03_version_mismatch": (lambda: v2(corrupt=hdr(lambda h: h.update(version=1))), "BadHeader", "CLAQ-H03",
                             "header 1, preamble 2"),
    "h03_version_float": (lambda: v2(corrupt=hdr(lambda h: h.update(version=2.0))), "BadHeader", "CLAQ-H03",
                          "version 2.0"),
    "h04_metadata_list": (lambda: v2(corrupt=hdr(lambda h: h.update(metadata=[]))), "BadHeader", "CLAQ-H04",
                          "metadata []"),
    "h05_config_list": (lambda: v2(corrupt=hdr(lambda h: h["metadata"].update(config=[]))), "BadHeader", "CLAQ-H05",
                        "config []"),
    "h05_generation_config_string": (lambda: v2(corrupt=hdr(lambda h: h["metadata"].update(generation_config="x"))),
                                     "BadHeader", "CLAQ-H05", 'generation_config "x"'),
    "h06_tensor_extra_key": (lambda: v2(corrupt=hdr(lambda h: h["tensors"]["norm"].update(extra=1))), "BadHeader",
                             "CLAQ-H06", "a tensor with a fourth key"),
    "h06_tensor_number": (lambda: v2(corrupt=hdr(lambda h: h["tensors"].update(x=1))), "BadHeader", "CLAQ-H06",
                          "a tensor that is 1"),
    "h07_kind": (lambda: v2(corrupt=hdr(lambda h: h["tensors"]["norm"].update(kind="gguf"))), "BadHeader",
                 "CLAQ-H07", 'kind "gguf"'),
    "h08_shape_empty": (lambda: v2(corrupt=hdr(lambda h: h["tensors"]["norm"].update(shape=[]))), "BadHeader",
                        "CLAQ-H08", "shape []"),
    "h08_shape_zero": (lambda: v2(corrupt=hdr(lambda h: h["tensors"]["w"].update(shape=[2, 0]))), "BadHeader",
                       "CLAQ-H08", "shape [2, 0]"),
    "h08_shape_float": (lambda: v2(corrupt=hdr(lambda h: h["tensors"]["norm"].update(shape=[3.0]))), "BadHeader",
                        "CLAQ-H08", "shape [3.0]"),
    "h08_shape_true": (lambda: v2(corrupt=hdr(lambda h: h["tensors"]["w"].update(shape=[True, 3]))), "BadHeader",
                       "CLAQ-H08", "shape [true, 3]"),
    "h08_shape_9_dims": (lambda: v2(corrupt=hdr(lambda h: h["tensors"]["norm"].update(shape=[1] * 8 + [3]))),
                         "BadHeader", "CLAQ-H08", "9 dimensions"),
    "h09_sections_list": (lambda: v2(corrupt=hdr(lambda h: h["tensors"].update(
        x={"kind": "raw", "shape": [1], "sections": []}))), "BadHeader", "CLAQ-H09", "sections []"),
    "h10_entry_extra_key": (lambda: v2(corrupt=hdr(lambda h: sec(h, "norm", "data").update(extra=0))), "BadHeader",
                            "CLAQ-H10", "a section entry with a sixth key"),
    "h10_v1_file_encoding": (lambda: v1(corrupt=hdr(lambda h: h["files"]["note.txt"].update(encoding="none",
                                                                                              size=19))),
                             "BadHeader", "CLAQ-H10", "a version-1 file entry with encoding and size"),
    "h11_dtype": (lambda: v2(corrupt=hdr(lambda h: sec(h, "norm", "data").update(dtype="Q4"))), "BadHeader",
                  "CLAQ-H11", 'dtype "Q4"'),
    "h12_shape_negative": (lambda: v2(corrupt=hdr(lambda h: sec(h, "norm", "data").update(shape=[-3]))),
                           "BadHeader", "CLAQ-H12", "section shape [-3]"),
    "h12_shape_float": (lambda: v2(corrupt=hdr(lambda h: sec(h, "w", "bit_widths").update(shape=[3.0]))),
                        "BadHeader", "CLAQ-H12", "section shape [3.0]"),
    "h13_offset_negative": (lambda: v2(corrupt=hdr(lambda h: sec(h, "g", "bit_widths").update(offset=-64))),
                            "BadHeader", "CLAQ-H13", "offset -64"),
    "h13_length_string": (lambda: v2(corrupt=hdr(lambda h: sec(h, "norm", "data").update(length="12"))),
                          "BadHeader", "CLAQ-H13", 'length "12"'),
    "h13_crc_true": (lambda: v2(corrupt=hdr(lambda h: sec(h, "norm", "data").update(crc32=True))), "BadHeader",
                     "CLAQ-H13", "crc32 true"),
    "h14_crc_2_32": (lambda: v2(corrupt=hdr(lambda h: sec(h, "norm", "data").update(
        crc32=sec(h, "norm", "data")["crc32"] + (1 << 32)))), "BadHeader", "CLAQ-H14", "crc32 + 2^32"),
    "h15_length_zero": (lambda: v2({**B2, "w": edit(WORKED, outlier_counts=("U8", [3], bytes(3)),
                                                     outlier_rows=("U16", [0], b""), outlier_values=("F16", [0], b""))}),
                        "BadHeader", "CLAQ-H15", "outlier rows and values of 0 bytes (their counts all 0)"),
    "l01_offset_unaligned": (lambda: v2(corrupt=hdr(lambda h: sec(h, "norm", "data").update(
        offset=sec(h, "norm", "data")["offset"] + 1))), "BadLayout", "CLAQ-L01", "offset 897",
        ["CLAQ-L03"]),
    "h16_length": (lambda: v2(corrupt=hdr(lambda h: sec(h, "norm", "data").update(
        length=16, crc32=zlib.crc32(RAW[2][0][3] + bytes(4))))), "BadHeader", "CLAQ-H16",
        "16 bytes for F32 [3] (the CRC-32 of those 16)"),
    "h17_raw_extra_section": (lambda: v2({**B2, "norm": edit(RAW, extra=("U8", [1], b"\1"))}), "BadHeader",
                              "CLAQ-H17", "a raw tensor with two sections"),
    "h17_raw_shape": (lambda: v2({**B2, "norm": edit(RAW, data=("F32", [1, 3], RAW[2][0][3]))}), "BadHeader",
                      "CLAQ-H17", "data [1, 3] of a tensor [3]"),
    "h18_claq_3d": (lambda: v2(corrupt=hdr(lambda h: h["tensors"]["w"].update(shape=[2, 3, 1]))), "BadHeader",
                    "CLAQ-H18", "a quantized weight [2, 3, 1]"),
    "h19_codes_9": (lambda: v2({**B2, "w": edit(WORKED, codes_9=("U32", [1], bytes(4)))}), "BadHeader", "CLAQ-H19",
                    "a section codes_9"),
    "h19_v1_codes_5": (lambda: v1({"w": edit(WORKED, codes_5=("U32", [1], bytes(4))), "norm": RAW}), "BadHeader",
                       "CLAQ-H19", "codes_5 in a version-1 file"),
    "h20_no_bit_widths": (lambda: v2({**B2, "w": edit(WORKED, bit_widths=None)}), "BadHeader", "CLAQ-H20",
                          "no bit_widths"),
    "h21_outliers_partial": (lambda: v2({**B2, "w": edit(WORKED, outlier_values=None)}), "BadHeader", "CLAQ-H21",
                             "outlier counts and rows without values"),
    "h22_bit_widths_i8": (lambda: v2({**B2, "w": edit(WORKED, bit_widths=("I8", [3], bytes([3, 2, 3])))}),
                          "BadHeader", "CLAQ-H22", "bit_widths I8"),
    "h22_v1_u8_codebooks": (lambda: v1({"w": edit(WORKED, codebooks=("U8", [40], section(WORKED, "codebooks")[2])),
                                        "norm": RAW}), "BadHeader", "CLAQ-H22", "U8 codebooks in a version-1 file"),
    "h23_section_2d": (lambda: v2({**B2, "w": edit(WORKED, codes_2=("U32", [1, 1], u32([0x3])))}), "BadHeader",
                       "CLAQ-H23", "codes_2 of shape [1, 1]"),
    "h24_u16_rows_65537": (lambda: v2({"tall": _tall(65537, "U16")}, {}), "BadHeader", "CLAQ-H24",
                           "U16 outlier rows in a weight of 65537 rows"),
    "h25_bit_widths_length": (lambda: v2({**B2, "w": edit(WORKED, bit_widths=("U8", [2], bytes([3, 2])))}),
                              "BadHeader", "CLAQ-H25", "2 bit widths for 3 columns"),
    "h26_grid_missing": (lambda: v2({**B2, "g": edit(GRID, codebook_grid=None)}), "BadHeader", "CLAQ-H26",
                         "U8 codebooks without codebook_grid"),
    "h26_grid_with_f16": (lambda: v2({**B2, "w": edit(WORKED, codebook_grid=("F16", [6], bytes(12)))}), "BadHeader",
                          "CLAQ-H26", "codebook_grid beside F16 codebooks"),
    "h27_grid_length": (lambda: v2({**B2, "g": edit(GRID, codebook_grid=("F16", [6],
                                                                        section(GRID, "codebook_grid")[2][:12]))}),
                        "BadHeader", "CLAQ-H27", "6 grid values for 4 columns"),
    **{name: ((lambda n=file_name: v2(files={n: NOTE2["note.txt"]})), "BadHeader", "CLAQ-H28",
              f"a file named {file_name[:12].encode('unicode_escape').decode()!r}"
              + (f" ({len(file_name.encode())} bytes)" if len(file_name) > 12 else ""))
       for name, file_name in FILE_NAMES.items()},
    "h29_file_dtype": (lambda: v2(corrupt=hdr(lambda h: h["files"]["note.txt"].update(dtype="I8"))), "BadHeader",
                       "CLAQ-H29", "a file of dtype I8"),
    "h30_file_shape": (lambda: v2(corrupt=hdr(lambda h: h["files"]["note.txt"].update(
        shape=[h["files"]["note.txt"]["length"], 1]))), "BadHeader", "CLAQ-H30", "a file of shape [n, 1]"),
    "h31_encoding": (lambda: v2(corrupt=hdr(lambda h: h["files"]["note.txt"].update(encoding="gzip"))), "BadHeader",
                     "CLAQ-H31", 'encoding "gzip"'),
    "h32_size_zero": (lambda: v2(files={"note.txt": Stored(zlib.compress(b"", 9), "zlib", 0)}), "BadHeader",
                      "CLAQ-H32", "size 0"),
    "h32_size_over_cap": (lambda: v2(corrupt=hdr(lambda h: h["files"]["note.txt"].update(size=(1 << 28) + 1))),
                          "BadHeader", "CLAQ-H32", "size 2^28 + 1"),
    "h33_stored_size": (lambda: v2(files={"note.txt": Stored(b"abc", "none", 4)}), "BadHeader", "CLAQ-H33",
                        "encoding none, length 3, size 4"),
    # placement
    "l02_overlap_alone": (_overlap_exact, "BadLayout", "CLAQ-L02",
                          "b (4 bytes at 64) inside a (100 bytes at 0); nothing else wrong"),
    "l04_trailing_bytes": (lambda: v2() + bytes(64), "BadLayout", "CLAQ-L04", "64 bytes after the last section"),
    "l04_no_sections_but_data": (lambda: v2({}, {}) + bytes(64), "BadLayout", "CLAQ-L04",
                                 "no sections, 64 bytes of data"),
    # version 3: coded levels
    "h19_v2_codebook_rice": (lambda: v2({**B2, "c": coded()}), "BadHeader", "CLAQ-H19", "codebook_rice in a version-2 file"),
    "h20_v3_no_codebooks": (lambda: v3({**B3, "c": coded(codebook_rice=None)}), "BadHeader", "CLAQ-H20",
                            "neither codebooks nor codebook_rice"),
    "h22_rice_i8": (lambda: v3({**B3, "c": coded(codebook_rice=("I8", [len(b"".join(CODED_RICE))], b"".join(CODED_RICE)))}),
                    "BadHeader", "CLAQ-H22", "codebook_rice of dtype I8"),
    "h26_rice_without_grid": (lambda: v3({**B3, "c": coded(codebook_grid=None)}), "BadHeader", "CLAQ-H26",
                              "codebook_rice without codebook_grid"),
    "h34_codebooks_and_rice": (lambda: v3({**B3, "c": coded(codebooks=("U8", [30], bytes(
        lv for _, _, levels in CODED_BOOKS for lv in levels)))}), "BadHeader", "CLAQ-H34",
        "codebook_rice and U8 codebooks side by side"),
    "t13_rice_one_bit_only": (lambda: v3({**B3, "c": ("claq", [4, 1], [
        ("bit_widths", "U8", [1], bytes([1])), ("codebook_grid", "F16", [2], f16_any([2.0, 2.0 ** -6])),
        ("codebook_rice", "U8", [1], bytes(1)), ("codes_1", "U32", [1], u32([0b1001]))])}), "BadTensorData",
        "CLAQ-T13", "codebook_rice of a weight whose only column has 1 bit"),
    "t14_rice_short_table": (lambda: v3({**B3, "c": coded((CODED_RICE[0][:43], b"", b""))}), "BadTensorData",
                             "CLAQ-T14", "43 bytes for a 44-byte table"),
    "t15_rice_k_8": (lambda: v3({**B3, "c": coded(_rice_flip(0, 1, 0x0A))}), "BadTensorData", "CLAQ-T15",
                     "the first table row's k is 8"),
    "t16_rice_low_cut": (lambda: v3({**B3, "c": coded((CODED_RICE[0], CODED_RICE[1][:-1], b""))}), "BadTensorData",
                         "CLAQ-T16", "the section ends one byte into the low part's last byte"),
    "t16_rice_low_padding": (lambda: v3({**B3, "c": coded(_rice_flip(1, 5, 0x80))}), "BadTensorData", "CLAQ-T16",
                             "the low part's last padding bit is one"),
    "t17_rice_extra_byte": (lambda: v3({**B3, "c": coded((*CODED_RICE[:2], CODED_RICE[2] + bytes(1)))}),
                            "BadTensorData", "CLAQ-T17", "a zero byte after the unary part's last byte"),
    "t17_rice_over_bound": (lambda: v3({**B3, "c": coded((*CODED_RICE[:2], CODED_RICE[2] + bytes(200)))}),
                            "BadTensorData", "CLAQ-T17", "the unary part longer than its gaps can need"),
    "t17_rice_unary_cut": (lambda: v3({**B3, "c": coded((*CODED_RICE[:2], CODED_RICE[2][:-1]))}), "BadTensorData",
                           "CLAQ-T17", "the unary part without its last byte (too few zero-bits)"),
    "t17_rice_trailing_one": (lambda: v3({**B3, "c": coded(_rice_flip(2, len(CODED_RICE[2]) - 1, 0x80))}),
                              "BadTensorData", "CLAQ-T17", "a one-bit after the last gap's zero-bit"),
    "t18_rice_level_255": (lambda: v3({**B3, "c": coded(_rice_flip(0, 2, 95 ^ 150))}), "BadTensorData", "CLAQ-T18",
                           "column 0's second inner level decodes to 255 (its row's base 150 for 95)"),
    # version 4: coded codes
    "h19_v3_huffman": (lambda: v3({**B3, "h": mix()}), "BadHeader", "CLAQ-H19",
                       "huffman_1 and huffman_3 in a version-3 file"),
    "h22_huffman_i8": (lambda: v4({**B4, "h": mix(huffman_3=("I8", *hsec(MIX_PARTS[3])[1:]))}), "BadHeader",
                       "CLAQ-H22", "huffman_3 of dtype I8"),
    "h35_codes_and_huffman": (lambda: v4({**B4, "h": mix(codes_3=("U32", [1], u32([sum(
        c << (3 * i) for i, c in enumerate(MIX_STREAMS[3]))])))}), "BadHeader", "CLAQ-H35",
        "codes_3 (valid words) beside huffman_3"),
    "t06_huffman_unused": (lambda: v4({**B4, "h": mix(huffman_4=hsec(huffman_parts([1] * 5, [0, 1] + [0] * 14)))}),
                           "BadTensorData", "CLAQ-T06", "huffman_4 with no 4-bit column"),
    "t06_huffman_missing": (lambda: v4({**B4, "h": mix(huffman_3=None)}), "BadTensorData", "CLAQ-T06",
                            "3-bit columns with neither codes_3 nor huffman_3"),
    "t19_huffman_short": (lambda: v4({**B4, "h": _mix3((*MIX_PARTS[3][:2], MIX_PARTS[3][2][:1]))}), "BadTensorData",
                          "CLAQ-T19", "huffman_3 of 13 bytes: 10 codes of 1 bit or more need 14"),
    "t19_huffman_long": (lambda: v4({**B4, "h": _mix3((*MIX_PARTS[3][:2], MIX_PARTS[3][2] + bytes(10)))}),
                         "BadTensorData", "CLAQ-T19", "huffman_3 of 28 bytes: 10 codes of 12 bits or less need 27"),
    "t20_length_13": (lambda: v4({**B4, "h": _mix3_lengths([2, 1, 3, 12, 12, 5, 13, 4])}), "BadTensorData",
                      "CLAQ-T20", "value 6 (unused) has a codeword of 13 bits"),
    "t20_kraft": (lambda: v4({**B4, "h": _mix3_lengths([2, 1, 3, 12, 12, 5, 5, 4])}), "BadTensorData", "CLAQ-T20",
                  "value 6 (unused) has a codeword of 5 bits: Kraft's sum 4098"),
    "t20_all_zero": (lambda: v4({**B4, "h": _mix3_lengths([0] * 8)}), "BadTensorData", "CLAQ-T20",
                     "every codeword length of huffman_3 is 0"),
    "t21_first_offset": (lambda: v4({**B4, "h": _mix3((u32([1]), MIX_PARTS[3][1], bits_to_bytes(
        "0" + "".join(canonical(MIX_LENGTHS[3])[c] for c in MIX_STREAMS[3]))))}), "BadTensorData", "CLAQ-T21",
        "huffman_3's codewords from bit 1, its only offset 1"),
    "t21_offset_past_end": (lambda: v4({**B4, "k": chunks((u32([0, 8 * len(CHUNKS_PARTS[2]) + 1]),
                                                           *CHUNKS_PARTS[1:]))}), "BadTensorData", "CLAQ-T21",
                            "chunk 1's offset one bit past the end of the codewords"),
    "t22_no_codeword": (lambda: v4({**B4, "h": mix(huffman_1=hsec(huffman_parts(MIX_STREAMS[1], MIX_LENGTHS[1],
                                                                                {2: "1"})))}),
                        "BadTensorData", "CLAQ-T22", "huffman_1 (one codeword, 0): its third bit is 1"),
    "t22_no_codeword_12_bits": (lambda: v4({**B4, "h": _mix3_replace({4: "111111000000"})}), "BadTensorData",
                                "CLAQ-T22", "huffman_3: 111111000000 in place of the codeword 111110000000"),
    "t22_past_end": (lambda: v4({**B4, "h": _mix3_replace({9: "111110000000"}, 6)}), "BadTensorData", "CLAQ-T22",
                     "huffman_3's last codeword (12 bits from bit 38) runs past its 48 bits"),
    "t23_chunk_gap": (lambda: v4({**B4, "k": _chunks_gap()}), "BadTensorData", "CLAQ-T23",
                      "a zero bit between chunk 0's last codeword and chunk 1's offset"),
    "t23_trailing_byte": (lambda: v4({**B4, "h": _mix3((*MIX_PARTS[3][:2], MIX_PARTS[3][2] + bytes(1)))}),
                          "BadTensorData", "CLAQ-T23", "a zero byte after huffman_3's last codeword's byte"),
    "t23_padding_bits": (lambda: v4({**B4, "h": _mix3((*MIX_PARTS[3][:2], MIX_PARTS[3][2][:-1]
                                                       + bytes([MIX_PARTS[3][2][-1] | 0x80])))}),
                         "BadTensorData", "CLAQ-T23", "huffman_3's last padding bit (bit 47) is one"),
    # checksums
    "c01_crc": (lambda: v2(corrupt=hdr(lambda h: sec(h, "g", "codes_5").update(
        crc32=sec(h, "g", "codes_5")["crc32"] ^ 1))), "ChecksumMismatch", "CLAQ-C01", "g's codes_5, crc32 ^ 1"),
    "c02_file_crc": (lambda: v2(corrupt=hdr(lambda h: h["files"]["note.txt"].update(
        crc32=h["files"]["note.txt"]["crc32"] ^ 1))), "ChecksumMismatch", "CLAQ-C02", "note.txt, crc32 ^ 1"),
    # contents of a quantized weight
    "t01_width_0": (lambda: v2({**B2, "w": WORKED_W0}), "BadTensorData", "CLAQ-T01",
                    "a 0-bit column with a 1-entry codebook, no codes_2"),
    "t01_v1_width_5": (lambda: v1({"w": WORKED_V1_W5, "norm": RAW}), "BadTensorData", "CLAQ-T01",
                       "version 1, a 5-bit column with its 32-entry codebook"),
    "t02_codebook_count": (lambda: v2({**B2, "w": edit(WORKED, codebooks=("F16", [21], section(WORKED, "codebooks")[2]
                                                                          + f16([0.0])))}),
                           "BadTensorData", "CLAQ-T02", "21 codebook entries for 20"),
    "t03_grid_nan": (lambda: v2({**B2, "g": edit(GRID, codebook_grid=("F16", [8], struct.pack("<H", 0x7E00)
                                                                      + section(GRID, "codebook_grid")[2][2:]))}),
                     "BadTensorData", "CLAQ-T03", "column 0's offset is NaN", ["CLAQ-T05"]),
    "t05_codebook_infinity": (lambda: v2({**B2, "w": edit(WORKED, codebooks=("F16", [20], struct.pack("<H", 0x7C00)
                                                                             + section(WORKED, "codebooks")[2][2:]))}),
                              "BadTensorData", "CLAQ-T05", "codebook entry 0 is +inf (unused by any code)"),
    "t06_codes_missing": (lambda: v2({**B2, "w": edit(WORKED, codes_2=None)}), "BadTensorData", "CLAQ-T06",
                          "a 2-bit column, no codes_2"),
    "t06_codes_unused": (lambda: v2({**B2, "w": edit(WORKED, codes_4=("U32", [1], bytes(4)))}), "BadTensorData",
                         "CLAQ-T06", "codes_4 with no 4-bit column"),
    "t07_codes_length": (lambda: v2({**B2, "w": edit(WORKED, codes_2=("U32", [2], u32([0x3, 0])))}),
                         "BadTensorData", "CLAQ-T07", "codes_2 of 2 words for 4 bits"),
    "t08_padding_bits": (lambda: v2({**B2, "w": edit(WORKED, codes_2=("U32", [1], u32([0x3 | 1 << 31])))}),
                         "BadTensorData", "CLAQ-T08", "bit 31 of codes_2 set"),
    "t09_outlier_values": (lambda: v2({**B2, "w": edit(WORKED, outlier_values=("F16", [2], f16([0.5, 0.5])))}),
                           "BadTensorData", "CLAQ-T09", "1 outlier counted, 2 values"),
    "t09_outlier_counts_length": (lambda: v2({**B2, "w": edit(WORKED, outlier_counts=("U8", [2], bytes([0, 1])))}),
                                  "BadTensorData", "CLAQ-T09", "2 outlier counts for 3 columns"),
    "t10_outlier_row": (lambda: v2({**B2, "w": edit(WORKED, outlier_rows=("U16", [1], struct.pack("<H", 2)))}),
                        "BadTensorData", "CLAQ-T10", "outlier row 2 of 2 rows"),
    "t11_outlier_infinity": (lambda: v2({**B2, "w": edit(WORKED, outlier_values=("F16", [1],
                                                                                 struct.pack("<H", 0xFC00)))}),
                             "BadTensorData", "CLAQ-T11", "outlier value -inf"),
    "t12_outliers_descending": (lambda: v2({**B2, "w": edit(WORKED, **OUTLIERS)}), "BadTensorData", "CLAQ-T12",
                                "column 2's outlier rows 1, 0"),
    "t12_more_outliers_than_rows": (lambda: v2({**B2, "w": edit(WORKED, outlier_counts=("U8", [3], bytes([0, 0, 3])),
                                                                outlier_rows=("U16", [3], struct.pack("<3H", 0, 1, 1)),
                                                                outlier_values=("F16", [3], f16([0.5] * 3)))}),
                                    "BadTensorData", "CLAQ-T12", "3 outliers in a column of 2 rows (rows 0, 1, 1)"),
    # contents of an embedded file
    "f01_adler": (lambda: _zlib_edit(lambda z: z[:-1] + bytes([z[-1] ^ 1])), "BadFileData", "CLAQ-F01",
                  "the Adler-32's last byte flipped"),
    "f02_stream_longer": (lambda: _zlib_edit(lambda z: z, -1), "BadFileData", "CLAQ-F02",
                          "size one less than the stream inflates to"),
    "f02_stream_cut": (lambda: _zlib_edit(lambda z: z[:-4]), "BadFileData", "CLAQ-F02", "the Adler-32 cut off"),
    "f03_trailing_byte": (lambda: _zlib_edit(lambda z: z + b"\0"), "BadFileData", "CLAQ-F03",
                          "a byte after the stream's end"),
    # full validation
    "l05_padding": (lambda: v2(corrupt=_data_edit(3, 1)), "BadLayout", "CLAQ-L05",
                    "a padding byte after w's bit_widths is 1"),
}

# Size caps: a file that breaks one alone is at least as large as the cap. Written by write_large, not committed.
LARGE_BAD = {
    "p04_header_over_cap": (lambda path: path.write_bytes(v2(retext=lambda t: t + b" " * (1 << 26))), "BadHeader",
                            "CLAQ-P04", "a valid header of 64 MiB and 64 bytes (spaces)"),
}


# ------------------------------------------------------------------------------------------ GGUF (gguf-claq.md)

GV = {"UINT8": 0, "INT8": 1, "UINT16": 2, "INT16": 3, "UINT32": 4, "INT32": 5, "FLOAT32": 6, "BOOL": 7,
      "STRING": 8, "ARRAY": 9, "UINT64": 10, "INT64": 11, "FLOAT64": 12}           # GGUF value types
GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "I8": 24, "I16": 25, "I32": 26, "I64": 27, "F64": 28, "BF16": 30}
GGML_OF = {"U8": "I8", "U16": "I16", "U32": "I32"}                                  # others: the same name


class Zeros(NamedTuple):
    """A run of zero bytes, written as a hole (large vectors only)."""
    n: int


def gstr(text) -> bytes:
    data = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(data)) + data


def kv_str(value) -> tuple:
    return GV["STRING"], gstr(value)


def kv_u32(value: int) -> tuple:
    return GV["UINT32"], struct.pack("<I", value)


def kv_array(item_type: str, items: list) -> tuple:
    if item_type == "STRING":
        body = b"".join(gstr(i) for i in items)
    else:
        body = b"".join(struct.pack({"UINT8": "<B", "UINT32": "<I", "FLOAT32": "<f"}[item_type], i) for i in items)
    return GV["ARRAY"], struct.pack("<IQ", GV[item_type], len(items)) + body


def gguf_parts(kvs: list, tensors: list, version: int = 3, alignment: int = 32, counts=None) -> list:
    """The file as parts (bytes, or Zeros). kvs: (key, value type, value: bytes or parts); tensors: (name, dims
    fastest first, GGML type id, data, offset or None: the next aligned place)."""
    parts = [b"GGUF" + struct.pack("<IQQ", version, *(counts or (len(tensors), len(kvs))))]
    for key, vtype, value in kvs:
        parts.append(gstr(key) + struct.pack("<I", vtype))
        parts += value if isinstance(value, list) else [value]
    blobs, offsets = b"", []
    for name, dims, ggml, data, offset in tensors:
        offsets.append(len(blobs) if offset is None else offset)
        parts.append(gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", ggml, offsets[-1]))
        blobs += data + b"\0" * ((-len(data)) % alignment)
    size = sum(p.n if isinstance(p, Zeros) else len(p) for p in parts)
    return parts + [b"\0" * ((-size) % alignment) + blobs]


def join(parts: list) -> bytes:
    return b"".join(bytes(p.n) if isinstance(p, Zeros) else p for p in parts)


def write_parts(path: Path, parts: list) -> None:
    with open(path, "wb") as f:
        for p in parts:
            if isinstance(p, Zeros):
                f.seek(p.n, 1)
            else:
                f.write(p)
        f.truncate()


def claq_tensors(stem: str, tensor: tuple) -> list:
    """The GGUF tensors of a .claq tensor (gguf-claq.md section 3), as gguf_parts takes them."""
    kind, shape, sections = tensor
    if kind == "raw":
        (_, dtype, _, payload), = sections
        return [(stem, shape[::-1], GGML[GGML_OF.get(dtype, dtype)], payload, None)]
    return [(f"{stem}.{s}", count, GGML[GGML_OF.get(dtype, dtype)], payload, None)
            for s, dtype, count, payload in sections]


def table_entry(name: str, tensor: tuple, stem=None) -> dict:
    kind, shape, sections = tensor
    return {"name": name, "gguf": stem or name, "kind": kind, "shape": shape,
            "dtypes": {s: dtype for s, dtype, _, _ in sections}}


G_TENSORS = {"norm": RAW, "w": WORKED, "g": GRID}
G_FILES = {"note.txt": b"conformance vector, gguf\n", "blob.bin": bytes([0, 255, 128, 1])}  # a STRING, a UINT8 array


def g_kvs(tensors=None, table=None, files=None, ext_version: int = 2) -> dict:
    tensors = G_TENSORS if tensors is None else tensors
    kvs = {"general.architecture": kv_str("claq"), "claq.version": kv_u32(ext_version),
           "claq.base_architecture": kv_str("llama"), "claq.config": kv_str('{"model_type": "llama"}'),
           "claq.generation_config": kv_str("null"), "claq.conversion": kv_str('{"tool": "hand-written"}'),
           "claq.tensors": kv_str(json.dumps([table_entry(n, t) for n, t in tensors.items()] if table is None
                                             else table))}
    for name, data in (G_FILES if files is None else files).items():
        try:
            kvs["claq.file." + name] = kv_str(data.decode())
        except UnicodeDecodeError:
            kvs["claq.file." + name] = kv_array("UINT8", list(data))
    return kvs


def gguf(kvs=None, tensors=None, extra=(), drop=(), table=None, gguf_tensors=None, **kw) -> list:
    """The base CLAQ GGUF file (norm, the worked example w, the grid weight g, two files) with changes: kvs
    replaced or added (key -> (type, value)), extra (key, type, value) appended, keys dropped, another table."""
    base = g_kvs(tensors, table)
    base.update(kvs or {})
    items = [(k, t, v) for k, (t, v) in base.items() if k not in drop] + list(extra)
    if gguf_tensors is None:
        gguf_tensors = [g for n, t in (G_TENSORS if tensors is None else tensors).items() for g in claq_tensors(n, t)]
    return gguf_parts(items, gguf_tensors, **kw)


def g_edit(fn):
    """The base's GGUF tensors, edited by fn(list) in place."""
    tensors = [list(t) for n, t in G_TENSORS.items() for t in claq_tensors(n, t)]
    fn(tensors)
    return [tuple(t) for t in tensors]


def g_find(tensors: list, name: str) -> list:
    return next(t for t in tensors if t[0] == name)


TOKENIZER_REST = '{"version":"1.0","model":{"type":"BPE","vocab":null,"merges":"pairs"}}'
TOKENIZER_JSON = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                                                         "merges": [["a", "b"]]}}, indent=2, ensure_ascii=False)
TOKENIZER_KVS = {"tokenizer.ggml.tokens": kv_array("STRING", ["a", "b", "ab"]),
                 "tokenizer.ggml.merges": kv_array("STRING", ["a b"]), "claq.tokenizer_json": kv_str(TOKENIZER_REST)}
NAME_63 = "n" * 63
MINIMAL_RAW = ("raw", [1, 1, 1, 3], [("data", "F32", [1, 1, 1, 3], struct.pack("<3f", 0.5, -1.0, 4.0))])

GGUF_VALID = {  # name -> (parts, expected tensors, expected files (text), expected files (hex))
    "worked": (gguf(kvs=TOKENIZER_KVS), {"norm": [1.0, -2.5, 0.25], "w": WORKED_VALUES, "g": GRID_VALUES},
               {"note.txt": G_FILES["note.txt"].decode(), "tokenizer.json": TOKENIZER_JSON},
               {"blob.bin": G_FILES["blob.bin"].hex()}),
    "v3_coded_levels": (gguf(tensors={**G_TENSORS, "c": coded()}, kvs={"claq.version": kv_u32(3)}),
                        {"norm": [1.0, -2.5, 0.25], "w": WORKED_VALUES, "g": GRID_VALUES, "c": CODED_VALUES},
                        {"note.txt": G_FILES["note.txt"].decode()}, {"blob.bin": G_FILES["blob.bin"].hex()}),
    "v4_coded_codes": (gguf(tensors={**G_TENSORS, "c": coded(), "h": mix(), "k": HWORKED, "r": RICE_HUFFMAN},
                            kvs={"claq.version": kv_u32(4)}),
                       {"norm": [1.0, -2.5, 0.25], "w": WORKED_VALUES, "g": GRID_VALUES, "c": CODED_VALUES,
                        "h": MIX_VALUES, "k": HWORKED_VALUES, "r": CODED_VALUES},
                       {"note.txt": G_FILES["note.txt"].decode()}, {"blob.bin": G_FILES["blob.bin"].hex()}),
    # GGUF version 2, alignment 64, extension version 1, a 4-D tensor, a 63-byte name, only the required keys
    "minimal_v2_aligned_64": (gguf_parts(
        [("general.architecture", *kv_str("claq")), ("general.alignment", *kv_u32(64)),
         ("claq.version", *kv_u32(1)), ("claq.config", *kv_str("{}")),
         ("claq.tensors", *kv_str(json.dumps([table_entry("x", MINIMAL_RAW, NAME_63)]))),
         ("tokenizer.huggingface.json", *kv_str('{"model": {}}'))],
        claq_tensors(NAME_63, MINIMAL_RAW), version=2, alignment=64),
        {"x": [[[[0.5, -1.0, 4.0]]]]}, {"tokenizer.json": '{"model": {}}'}, {}),
}


def _drop_section(stem: str, section_name: str, tensor: tuple):
    tensors = {**G_TENSORS, stem: edit(tensor, **{section_name: None})}
    return gguf(tensors=tensors)


T_ENTRY = table_entry("norm", RAW)

GGUF_BAD = {
    # the walk of the header
    "s01_short": (lambda: b"GGUF" + struct.pack("<IQ", 3, 0), "TruncatedFile", "GGUF-S01", "16 bytes"),
    "s02_magic": (lambda: b"GGUX" + join(gguf())[4:], "BadMagic", "GGUF-S02", "magic GGUX"),
    "s03_version_4": (lambda: join(gguf(version=4)), "UnsupportedVersion", "GGUF-S03", "version 4"),
    "s03_big_endian": (lambda: join(gguf())[:4] + struct.pack(">I", 3) + join(gguf())[8:], "UnsupportedVersion",
                       "GGUF-S03", "version 3, big-endian"),
    "s04_tensor_count": (lambda: join(gguf(counts=(1 << 40, 10))), "TruncatedFile", "GGUF-S04", "2^40 tensors"),
    "s04_string_length": (lambda: join(gguf(extra=[("claq.x", GV["STRING"], struct.pack("<Q", 1 << 62) + b"x")])),
                          "TruncatedFile", "GGUF-S04", "a string of 2^62 bytes"),
    "s04_array_count": (lambda: join(gguf(extra=[("claq.x", GV["ARRAY"], struct.pack("<IQ", GV["UINT8"], 1 << 62))])),
                        "TruncatedFile", "GGUF-S04", "an array of 2^62 bytes"),
    "s04_cut": (lambda: join(gguf())[:300], "TruncatedFile", "GGUF-S04", "the file cut inside its keys"),
    "s05_key_not_utf8": (lambda: join(gguf(extra=[(b"claq.\xff", *kv_str("x"))])), "BadHeader", "GGUF-S05",
                         "a key with a 0xFF byte"),
    "s05_value_not_utf8": (lambda: join(gguf(extra=[("claq.x", *kv_str(b"\xc0\xaf"))])), "BadHeader", "GGUF-S05",
                           "an overlong UTF-8 value"),
    "s07_value_type": (lambda: join(gguf(extra=[("claq.x", 13, bytes(8))])), "BadHeader", "GGUF-S07",
                       "value type 13"),
    "s07_item_type": (lambda: join(gguf(extra=[("claq.x", GV["ARRAY"], struct.pack("<IQ", 99, 0))])), "BadHeader",
                      "GGUF-S07", "item type 99"),
    "s08_nested_array": (lambda: join(gguf(extra=[("claq.x", GV["ARRAY"], struct.pack("<IQ", GV["ARRAY"], 1)
                                                   + struct.pack("<IQ", GV["UINT8"], 1) + b"\1")])),
                         "GgufLimitError", "GGUF-S08", "an array of arrays"),
    "s10_duplicate_key": (lambda: join(gguf(extra=[("claq.base_architecture", *kv_str("llama"))])), "BadHeader",
                          "GGUF-S10", "claq.base_architecture twice"),
    "s11_alignment_48": (lambda: join(gguf(kvs={"general.alignment": kv_u32(48)})), "BadHeader", "GGUF-S11",
                         "general.alignment 48"),
    "s11_alignment_u64": (lambda: join(gguf(kvs={"general.alignment": (GV["UINT64"], struct.pack("<Q", 32))})),
                          "BadHeader", "GGUF-S11", "general.alignment a UINT64"),
    "s12_duplicate_tensor": (lambda: join(gguf(gguf_tensors=g_edit(lambda t: t.append(["norm", [3], GGML["F32"],
                                                                                         bytes(12), None])))),
                             "BadHeader", "GGUF-S12", "two tensors named norm"),
    "s13_five_dims": (lambda: join(gguf(tensors={**G_TENSORS, "norm": ("raw", [1, 1, 1, 1, 3], [
        ("data", "F32", [1, 1, 1, 1, 3], RAW[2][0][3])])})), "GgufLimitError", "GGUF-S13", "a 5-D tensor"),
    "s14_q4_0": (lambda: join(gguf(gguf_tensors=g_edit(lambda t: t.append(["q", [32], GGML["Q4_0"], bytes(18),
                                                                             None])))),
                 "BadHeader", "GGUF-S14", "a Q4_0 tensor"),
    "s15_data_past_end": (lambda: join(gguf(gguf_tensors=g_edit(lambda t: t[-1].__setitem__(4, 1 << 20)))),
                          "BadLayout", "GGUF-S15", "the last tensor's data at 1 MiB"),
    "s15_product_wraps": (lambda: join(gguf(gguf_tensors=g_edit(lambda t: g_find(t, "norm").__setitem__(
        1, [1 << 32, 1 << 32])))), "BadLayout", "GGUF-S15", "2^64 elements (wraps to 0 in 64 bits)"),
    # the claq.* keys
    "k01_architecture_llama": (lambda: join(gguf(kvs={"general.architecture": kv_str("llama")})), "BadHeader",
                               "GGUF-K01", 'general.architecture "llama"'),
    "k01_architecture_missing": (lambda: join(gguf(drop=["general.architecture"])), "BadHeader", "GGUF-K01",
                                 "no general.architecture"),
    "k01_architecture_number": (lambda: join(gguf(kvs={"general.architecture": kv_u32(0)})), "BadHeader",
                                "GGUF-K01", "general.architecture a UINT32"),
    "k02_version_5": (lambda: join(gguf(kvs={"claq.version": kv_u32(5)})), "BadHeader", "GGUF-K02",
                      "claq.version 5"),
    "h19_v2_codebook_rice": (lambda: join(gguf(tensors={**G_TENSORS, "c": coded()})), "BadHeader", "CLAQ-H19",
                             "codebook_rice in an extension-version-2 file"),
    "h19_v3_huffman": (lambda: join(gguf(tensors={**G_TENSORS, "h": mix()}, kvs={"claq.version": kv_u32(3)})),
                       "BadHeader", "CLAQ-H19", "huffman_1 and huffman_3 in an extension-version-3 file"),
    "h35_codes_and_huffman": (lambda: join(gguf(tensors={**G_TENSORS, "h": mix(codes_3=("U32", [1], u32([sum(
        c << (3 * i) for i, c in enumerate(MIX_STREAMS[3]))])))}, kvs={"claq.version": kv_u32(4)})), "BadHeader",
        "CLAQ-H35", "codes_3 beside huffman_3"),
    "k02_version_string": (lambda: join(gguf(kvs={"claq.version": kv_str("2")})), "BadHeader", "GGUF-K02",
                           'claq.version "2"'),
    "k03_config_list": (lambda: join(gguf(kvs={"claq.config": kv_str("[]")})), "BadHeader", "GGUF-K03",
                        "claq.config []"),
    "k03_config_missing": (lambda: join(gguf(drop=["claq.config"])), "BadHeader", "GGUF-K03", "no claq.config"),
    "k04_generation_list": (lambda: join(gguf(kvs={"claq.generation_config": kv_str("[1]")})), "BadHeader",
                            "GGUF-K04", "claq.generation_config [1]"),
    "k05_conversion_string": (lambda: join(gguf(kvs={"claq.conversion": kv_str('"x"')})), "BadHeader", "GGUF-K05",
                              'claq.conversion "x"'),
    "k06_tensors_object": (lambda: join(gguf(kvs={"claq.tensors": kv_str("{}")})), "BadHeader", "GGUF-K06",
                           "claq.tensors {}"),
    "k06_tensors_missing": (lambda: join(gguf(drop=["claq.tensors"])), "BadHeader", "GGUF-K06", "no claq.tensors"),
    "j03_config_not_json": (lambda: join(gguf(kvs={"claq.config": kv_str("{bad")})), "BadHeader", "CLAQ-J03",
                            "claq.config {bad"),
    "j04_config_duplicate_key": (lambda: join(gguf(kvs={"claq.config": kv_str('{"a": 1, "a": 2}')})), "BadHeader",
                                 "CLAQ-J04", "claq.config with a key twice"),
    "j05_conversion_nan": (lambda: join(gguf(kvs={"claq.conversion": kv_str('{"a": NaN}')})), "BadHeader",
                           "CLAQ-J05", "NaN in claq.conversion"),
    "j09_config_deep": (lambda: join(gguf(kvs={"claq.config": kv_str('{"a": ' + "[" * 64 + "]" * 64 + "}")})),
                        "BadHeader", "CLAQ-J09", "claq.config 65 deep"),
    # the tensor table
    "t01_entry_keys": (lambda: join(gguf(table=[{k: v for k, v in T_ENTRY.items() if k != "gguf"}],
                                         tensors={"norm": RAW})), "BadHeader", "GGUF-T01", "an entry without gguf"),
    "t02_name_number": (lambda: join(gguf(table=[{**T_ENTRY, "name": 3}], tensors={"norm": RAW})), "BadHeader",
                        "GGUF-T02", "name 3"),
    "t03_listed_twice": (lambda: join(gguf(table=[T_ENTRY, {**T_ENTRY, "gguf": "other"}], tensors={"norm": RAW})),
                         "BadHeader", "GGUF-T03", "two entries named norm"),
    "h07_kind": (lambda: join(gguf(table=[{**T_ENTRY, "kind": "q4"}], tensors={"norm": RAW})), "BadHeader",
                 "CLAQ-H07", 'kind "q4"'),
    "h08_shape_zero": (lambda: join(gguf(table=[{**T_ENTRY, "shape": [0]}], tensors={"norm": RAW})), "BadHeader",
                       "CLAQ-H08", "shape [0]"),
    "t04_dtypes_empty": (lambda: join(gguf(table=[{**T_ENTRY, "dtypes": {}}], tensors={"norm": RAW})), "BadHeader",
                         "GGUF-T04", "dtypes {}"),
    "h17_raw_two_sections": (lambda: join(gguf(table=[{**T_ENTRY, "dtypes": {"data": "F32", "x": "F32"}}],
                                               tensors={"norm": RAW})), "BadHeader", "CLAQ-H17",
                             "a raw entry with two sections"),
    "h11_dtype": (lambda: join(gguf(table=[{**T_ENTRY, "dtypes": {"data": "Q8"}}], tensors={"norm": RAW})),
                  "BadHeader", "CLAQ-H11", 'dtype "Q8"'),
    "t05_tensor_missing": (lambda: join(gguf(table=[{**T_ENTRY, "gguf": "nowhere"}], tensors={"norm": RAW})),
                           "BadHeader", "GGUF-T05", "gguf names no tensor"),
    "t06_tensor_claimed_twice": (lambda: join(gguf(table=[T_ENTRY, {**T_ENTRY, "name": "norm2"}],
                                                   tensors={"norm": RAW})), "BadHeader", "GGUF-T06",
                                 "two entries on one tensor"),
    "t07_ggml_type": (lambda: join(gguf(gguf_tensors=g_edit(lambda t: g_find(t, "w.bit_widths").__setitem__(
        2, GGML["F16"]) or g_find(t, "w.bit_widths").__setitem__(3, bytes([3, 2, 3, 0, 0, 0]))))), "BadHeader",
        "GGUF-T07", "a U8 section stored as F16"),
    "t08_raw_dims": (lambda: join(gguf(gguf_tensors=g_edit(lambda t: g_find(t, "norm").__setitem__(1, [1, 3])))),
                     "BadHeader", "GGUF-T08", "norm [3] stored with dimensions [1, 3]"),
    "t09_section_2d": (lambda: join(gguf(gguf_tensors=g_edit(lambda t: g_find(t, "w.bit_widths").__setitem__(
        1, [3, 1])))), "BadHeader", "GGUF-T09", "bit_widths with dimensions [3, 1]"),
    "h20_no_bit_widths": (lambda: join(_drop_section("w", "bit_widths", WORKED)), "BadHeader", "CLAQ-H20",
                          "w without bit_widths"),
    "h26_grid_missing": (lambda: join(_drop_section("g", "codebook_grid", GRID)), "BadHeader", "CLAQ-H26",
                         "U8 codebooks without codebook_grid"),
    "h19_v1_grid": (lambda: join(gguf(kvs={"claq.version": kv_u32(1)})), "BadHeader", "CLAQ-H19",
                    "extension version 1 with a grid weight", ["CLAQ-H22"]),
    "t10_stray_tensor": (lambda: join(gguf(gguf_tensors=g_edit(lambda t: t.append(["stray", [1], GGML["F32"],
                                                                                     bytes(4), None])))),
                         "BadHeader", "GGUF-T10", "a tensor no entry claims"),
    # the tokenizer and embedded files
    "f01_merges_numbers": (lambda: join(gguf(kvs={**TOKENIZER_KVS, "tokenizer.ggml.merges": kv_array("UINT32", [1])})),
                           "BadHeader", "GGUF-F01", "merges an array of UINT32"),
    "f02_rest_list": (lambda: join(gguf(kvs={**TOKENIZER_KVS, "claq.tokenizer_json": kv_str("[]")})), "BadHeader",
                      "GGUF-F02", "claq.tokenizer_json []"),
    "f02_rest_merges_tuples": (lambda: join(gguf(kvs={**TOKENIZER_KVS, "claq.tokenizer_json": kv_str(
        TOKENIZER_REST.replace('"pairs"', '"tuples"'))})), "BadHeader", "GGUF-F02", 'merges "tuples"'),
    "f03_tokens_missing": (lambda: join(gguf(kvs=TOKENIZER_KVS, drop=["tokenizer.ggml.tokens"])), "BadHeader",
                           "GGUF-F03", "claq.tokenizer_json without tokenizer.ggml.tokens"),
    "f04_hf_json_number": (lambda: join(gguf(kvs={"tokenizer.huggingface.json": kv_u32(1)})), "BadHeader",
                           "GGUF-F04", "tokenizer.huggingface.json a UINT32"),
    "h28_file_name_dotdot": (lambda: join(gguf(extra=[("claq.file...", *kv_str("x"))])), "BadHeader", "CLAQ-H28",
                             "claq.file..."),
    "h28_file_name_slash": (lambda: join(gguf(extra=[("claq.file.a/b", *kv_str("x"))])), "BadHeader", "CLAQ-H28",
                            "claq.file.a/b"),
    "f05_tokenizer_twice": (lambda: join(gguf(kvs=TOKENIZER_KVS, extra=[("claq.file.tokenizer.json", *kv_str("{}"))])),
                            "BadHeader", "GGUF-F05", "claq.file.tokenizer.json beside claq.tokenizer_json"),
    "f06_file_floats": (lambda: join(gguf(extra=[("claq.file.a", *kv_array("FLOAT32", [1.0]))])), "BadHeader",
                        "GGUF-F06", "a file as an array of FLOAT32"),
    "f07_file_empty": (lambda: join(gguf(extra=[("claq.file.a", *kv_str(""))])), "BadHeader", "GGUF-F07",
                       "an empty file"),
    # full validation
    "g01_name_64_bytes": (lambda: join(gguf(tensors={**G_TENSORS, "norm": RAW},
                                            table=[table_entry("norm", RAW, "n" * 64)]
                                            + [table_entry(n, t) for n, t in G_TENSORS.items() if n != "norm"],
                                            gguf_tensors=claq_tensors("n" * 64, RAW) + [
                                                g for n, t in G_TENSORS.items() if n != "norm"
                                                for g in claq_tensors(n, t)])),
                          "GgufLimitError", "GGUF-G01", "a tensor name of 64 bytes"),
    "g02_data_order": (lambda: join(gguf(gguf_tensors=g_edit(_swap_first_two))), "GgufLimitError", "GGUF-G02",
                       "the first two tensors' data swapped"),
    "t01_width_0": (lambda: join(gguf(tensors={**G_TENSORS, "w": WORKED_W0})), "BadTensorData", "CLAQ-T01",
                    "a 0-bit column"),
    "t08_padding_bits": (lambda: join(gguf(tensors={**G_TENSORS, "w": edit(WORKED, codes_2=("U32", [1],
                                                                                               u32([0x3 | 1 << 31])))})),
                         "BadTensorData", "CLAQ-T08", "bit 31 of codes_2 set"),
}


def _swap_first_two(tensors: list) -> None:
    """norm (12 bytes) and w.bit_widths (3 bytes), 32 bytes each with padding: the infos keep their order, the
    data region holds w.bit_widths' block first (each info's offset points at its own bytes)."""
    a, b = tensors[0], tensors[1]
    a[3], b[3] = b[3], a[3]  # gguf_parts writes the blocks in info order: bit_widths' bytes first, then norm's
    a[4], b[4] = 32, 0


LARGE_GGUF_BAD = {
    "s06_string_over_cap": (lambda path: write_parts(path, gguf(extra=[("claq.file.big", GV["STRING"], [
        struct.pack("<Q", (1 << 28) + 1), Zeros((1 << 28) + 1)])])), "BadHeader", "GGUF-S06",
        "a file of 2^28 + 1 NUL bytes as a STRING (sparse)"),
    "s09_array_items_over_cap": (lambda path: write_parts(path, gguf(extra=[("claq.file.big", GV["ARRAY"], [
        struct.pack("<IQ", GV["UINT8"], (1 << 23) + 1), Zeros((1 << 23) + 1)])])), "BadHeader", "GGUF-S09",
        "a file of 2^23 + 1 zero bytes as an array of UINT8 (sparse)"),
}


# ------------------------------------------------------------------------------------------ writing

def _expected(table: dict, large: dict) -> dict:
    out = {}
    for name, (make, category, rule, note, *also) in {**table, **large}.items():
        entry = {"category": category, "rule": rule}
        if also and also[0]:
            entry["also"] = also[0]
        entry["note"] = note
        if name in large:
            entry["large"] = True
        out[name] = entry
    return out


def write_all(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("bad", "gguf", "gguf/bad"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    for name, (tensors, files, values, *rest) in VALID.items():
        version, metadata, retext = (rest + [VERSION, METADATA, None][len(rest):])[:3]
        (directory / f"{name}.claq").write_bytes(assemble(tensors, files, metadata, version, retext=retext))
        texts = {k: (v.stored if isinstance(v, Stored) else v).decode() for k, v in files.items()}
        expected = {"tensors": values, "files": texts}
        text = json.dumps(expected, separators=(",", ":")) if name in COMPACT_JSON else json.dumps(expected, indent=1)
        (directory / f"{name}.json").write_text(text + "\n")
    for name, (make, *_) in BAD.items():
        (directory / "bad" / f"{name}.claq").write_bytes(make())
    (directory / "bad" / "expected.json").write_text(json.dumps(
        {f"{n}.claq": e for n, e in _expected(BAD, LARGE_BAD).items()}, indent=1, ensure_ascii=False) + "\n")
    for name, (parts, values, texts, hexes) in GGUF_VALID.items():
        (directory / "gguf" / f"{name}.gguf").write_bytes(join(parts))
        expected = {"tensors": values, "files": texts, "files_hex": hexes}
        (directory / "gguf" / f"{name}.json").write_text(json.dumps(expected, indent=1) + "\n")
    for name, (make, *_) in GGUF_BAD.items():
        (directory / "gguf" / "bad" / f"{name}.gguf").write_bytes(make())
    (directory / "gguf" / "bad" / "expected.json").write_text(json.dumps(
        {f"{n}.gguf": e for n, e in _expected(GGUF_BAD, LARGE_GGUF_BAD).items()}, indent=1, ensure_ascii=False) + "\n")


def write_large(directory: Path) -> dict:
    """The vectors of the size caps (not committed) into directory: {expected.json key: path}."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for table, suffix in ((LARGE_BAD, "claq"), (LARGE_GGUF_BAD, "gguf")):
        for name, (write, *_) in table.items():
            paths[f"{name}.{suffix}"] = directory / f"{name}.{suffix}"
            write(paths[f"{name}.{suffix}"])
    return paths


if __name__ == "__main__":
    write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
