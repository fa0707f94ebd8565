#!/usr/bin/env python
"""Writes the conformance vectors of formats/claq-v1.md and claq-v2.md by hand (struct + zlib, not the writer).

Valid files: <name>.claq with <name>.json holding the expected decoded tensors (float32 values as
nested lists) and embedded files. Invalid files: bad/<name>.claq, with bad/expected.json naming the
error class the reference reader raises. `python formats/vectors/make_vectors.py [DIR]` rewrites them;
tests/test_vectors.py regenerates them and checks the committed bytes are identical.
"""
from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from claq_convert.spec import ALIGNMENT, MAGIC, WIDTHS_BY_VERSION  # noqa: E402  (the one source of the constants)

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


def assemble(tensors: dict, files: dict, metadata: dict, version: int = VERSION, corrupt=None) -> bytes:
    """tensors: name -> (kind, shape, [(section, dtype, count, payload bytes)]); files: name -> bytes
    (version 2: stored zlib-compressed, with the encoding and decoded size in the entry)."""
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
        if version == 1:
            header_files[name] = place("U8", [len(payload)], payload)
        else:
            packed = zlib.compress(payload, 9)
            header_files[name] = {**place("U8", [len(packed)], packed), "encoding": "zlib", "size": len(payload)}
    header = {"format": "claq", "version": version, "metadata": metadata, "tensors": header_tensors,
              "files": header_files}
    if corrupt:
        header, data = corrupt(header, data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (pad(16 + len(text)) - 16 - len(text))
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


BAD = {  # name -> (bytes, error class)
    "wrong_magic": (lambda: b"GGUF" + assemble({"w": WORKED}, {}, METADATA)[4:], "BadMagic"),
    "future_version": (lambda: assemble({"w": WORKED}, {}, METADATA, version=max(WIDTHS_BY_VERSION) + 1),
                       "UnsupportedVersion"),
    "truncated": (lambda: assemble({"w": WORKED}, {}, METADATA)[:-70], "BadLayout"),
    "short_preamble": (lambda: b"CLAQ\x01\x00", "TruncatedFile"),
    "header_past_end": (lambda: struct.pack("<4sIQ", MAGIC, VERSION, 1 << 40) + b"{}", "BadHeader"),
    "overlap": (lambda: assemble({"w": WORKED}, {}, METADATA, corrupt=_overlap), "BadLayout"),
    "hole": (lambda: assemble({"w": WORKED}, {}, METADATA, corrupt=_hole), "BadLayout"),
    "checksum": (lambda: assemble({"w": WORKED}, {}, METADATA, corrupt=_flip_byte), "ChecksumMismatch"),
    "bit_width_5": (lambda: assemble({"w": WORKED}, {}, METADATA, corrupt=_bad_width_crc), "BadTensorData"),
    "not_json": (lambda: struct.pack("<4sIQ", MAGIC, VERSION, 48) + b"{not json" + b" " * 39, "BadHeader"),
    "v1_grid_codebooks": (lambda: assemble({"w": GRID}, {}, METADATA, version=1), "BadHeader"),
    "v2_grid_missing": (lambda: assemble({"w": GRID}, {}, METADATA, version=2, corrupt=_drop_grid), "BadHeader"),
    "v2_grid_negative_step": (lambda: assemble({"w": GRID}, {}, METADATA, version=2, corrupt=_negative_step),
                              "BadTensorData"),
    "v2_file_size": (lambda: assemble({"w": GRID}, NOTE2, METADATA, version=2, corrupt=_file_size), "BadFileData"),
    "v2_file_not_zlib": (lambda: assemble({"w": GRID}, NOTE2, METADATA, version=2, corrupt=_file_not_zlib),
                         "BadFileData"),
    "v2_file_no_encoding": (lambda: assemble({"w": GRID}, NOTE2, METADATA, version=2, corrupt=_file_no_encoding),
                            "BadHeader"),
}


def write_all(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bad").mkdir(exist_ok=True)
    for name, (tensors, files, values, *version) in VALID.items():
        (directory / f"{name}.claq").write_bytes(assemble(tensors, files, METADATA, *version))
        expected = {"tensors": values, "files": {k: v.decode() for k, v in files.items()}}
        (directory / f"{name}.json").write_text(json.dumps(expected, indent=1) + "\n")
    for name, (make, error) in BAD.items():
        (directory / "bad" / f"{name}.claq").write_bytes(make())
    (directory / "bad" / "expected.json").write_text(
        json.dumps({f"{n}.claq": e for n, (_, e) in BAD.items()}, indent=1) + "\n")


if __name__ == "__main__":
    write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
