"""Reference NumPy decoder for .claq files: the spec (formats/claq-v2.md, versions 1 to 4) in code.

NumPy and the standard library only (importable without torch), but for coded code streams (format v4),
whose chunks a Numba kernel decodes (format/huffman.py, loaded on first use). Opening a file validates the
preamble, the header and the placement of every section before any data is read; decoding a
tensor checks its checksums and contents. Every failure raises a subclass of ClaqFormatError whose
message names the tensor or section.
"""
from __future__ import annotations

import json
import math
import mmap
import re
import unicodedata
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from . import spec
from .huffman import CodedCodesError, fixed_words, with_fixed_codes
from .rice import CodedLevelsError, with_levels


class ClaqFormatError(Exception):
    """The file is not a valid .claq file. `rule`: the id of the rule it breaks (claq-v2.md section 7,
    gguf-claq.md section 5), which str() appends with the category: "... [BadHeader CLAQ-H07]"."""

    def __init__(self, message: str = "", rule: Optional[str] = None):
        super().__init__(message)
        self.rule = rule

    def __str__(self) -> str:
        return f"{super().__str__()} [{type(self).__name__}{' ' + self.rule if self.rule else ''}]"


class TruncatedFile(ClaqFormatError):
    pass


class BadMagic(ClaqFormatError):
    pass


class UnsupportedVersion(ClaqFormatError):
    pass


class BadHeader(ClaqFormatError):
    pass


class BadLayout(ClaqFormatError):
    """Sections overlap, leave holes, are misaligned or run past the end of the file."""


class ChecksumMismatch(ClaqFormatError):
    pass


class BadTensorData(ClaqFormatError):
    pass


class BadFileData(ClaqFormatError):
    """An embedded file's stored bytes do not decode to its declared size."""


# Limits of the JSON a reader parses (.claq headers, the claq.* keys of a GGUF file): deeper nesting or
# larger numbers than any metadata needs are refused before they cost time or memory (claq-v2.md, 1).
MAX_JSON_DEPTH, MAX_INT_DIGITS = spec.MAX_JSON_DEPTH, spec.MAX_INT_DIGITS
_SURROGATE = re.compile("[\ud800-\udfff]")
_FILE_NAME_BAD = re.compile(r"[/\\]")
DECODE_BLOCK = 1 << 20  # codes decode_claq looks up at a time: its int64 indices stay 8 MiB


def brief_repr(value, limit: int = 120) -> str:
    """repr of a value read from a file, cut short: error messages stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _strict_object(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise BadHeader(f"duplicate key in a JSON object: {brief_repr(key)}", rule="CLAQ-J04")
            seen.add(key)
    return obj


def _reject_constant(name):
    raise BadHeader(f"non-standard JSON constant {name}", rule="CLAQ-J05")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadHeader(f"a JSON integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})", rule="CLAQ-J06")
    value = int(text)
    if not -(1 << 63) <= value < 1 << 64:
        raise BadHeader(f"the JSON integer {value} is outside [-2**63, 2**64)", rule="CLAQ-J06")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadHeader(f"the JSON number {brief_repr(text)} is outside the range of a double", rule="CLAQ-J07")
    return value


def _check_json_tree(value, what: str) -> None:
    """Nesting depth and text (no lone surrogates) of parsed JSON, walked without recursion."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise BadHeader(f"{what} has a string with a lone surrogate escape, which is not Unicode text",
                                rule="CLAQ-J08")
        elif isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise BadHeader(f"{what} nests arrays and objects deeper than {MAX_JSON_DEPTH}", rule="CLAQ-J09")
            if isinstance(node, dict):
                stack.extend((key, depth) for key in node)
                node = node.values()
            stack.extend((child, depth + 1) for child in node)


def parse_json(text: str, what: str = "header"):
    """Strict JSON: no duplicate keys, no NaN/Infinity, integers in [-2**63, 2**64), finite numbers, nesting
    at most MAX_JSON_DEPTH deep, no lone surrogates. Every failure is a one-line BadHeader naming `what`."""
    try:
        value = json.loads(text, object_pairs_hook=_strict_object, parse_constant=_reject_constant,
                           parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as exc:
        raise BadHeader(f"{what} is not valid JSON: {exc.msg} at offset {exc.pos}", rule="CLAQ-J03") from None
    except RecursionError:  # the parser's own stack ends far above MAX_JSON_DEPTH
        raise BadHeader(f"{what} nests arrays and objects deeper than {MAX_JSON_DEPTH}", rule="CLAQ-J09") from None
    except BadHeader as exc:
        raise BadHeader(f"{what}: {exc.args[0]}", rule=exc.rule) from None
    _check_json_tree(value, what)
    return value


def _is_uint(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _expected_dtypes(section: str, version: int) -> tuple[str, ...]:
    if spec.is_code_section(section):
        return ("U32",)
    if spec.is_huffman_section(section):
        return ("U8",)
    return {"bit_widths": ("U8",), "codebooks": spec.CODEBOOK_DTYPES[version], "codebook_grid": ("F16",),
            spec.RICE_SECTION: ("U8",),
            "outlier_counts": ("U8", "U16"), "outlier_rows": ("U16", "U32"), "outlier_values": ("F16",)}[section]


def check_metadata(metadata: dict, where: str = "metadata") -> None:
    """config and conversion are objects, generation_config an object or null (where present)."""
    for key, types, what in (("config", dict, "an object"), ("conversion", dict, "an object"),
                             ("generation_config", (dict, type(None)), "an object or null")):
        if key in metadata and not isinstance(metadata[key], types):
            raise BadHeader(f"{where} {key!r} must be {what}, not {type(metadata[key]).__name__}", rule="CLAQ-H05")


_NOT_PRINTABLE = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp", "Zs"}  # spec section 2; unassigned (Cn) is allowed


def is_printable_text(text: str) -> bool:
    """Section 2's "printable text": no code point of the categories Cc, Cf, Cs, Co, Zl, Zp, or Zs other
    than the space. Not str.isprintable(), which also refuses unassigned code points, so its answer
    changes with the Unicode version of the running Python."""
    return all(ch == " " or unicodedata.category(ch) not in _NOT_PRINTABLE for ch in text)


def check_file_name(name: str) -> None:
    """An embedded file's name is a plain file name (it becomes one when a tokenizer is loaded)."""
    if not name or name in (".", "..") or len(name.encode("utf-8")) > 255 or not is_printable_text(name) \
            or _FILE_NAME_BAD.search(name):
        raise BadHeader(f"embedded file name {brief_repr(name)} is not a plain file name "
                        "(1 to 255 bytes of printable text, no '/' or '\\', not '.' or '..')", rule="CLAQ-H28")


def parse_header(raw: bytes, version: int) -> dict:
    """Decode and schema-check the header (no section placement yet)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadHeader(f"header is not UTF-8 ({exc.reason} at byte {exc.start})", rule="CLAQ-J01") from None
    if not text.startswith("{"):
        raise BadHeader("header must start with '{'", rule="CLAQ-J02")
    header = parse_json(text)
    if not isinstance(header, dict) or set(header) != {"format", "version", "metadata", "tensors", "files"}:
        raise BadHeader("header keys must be exactly format, version, metadata, tensors, files", rule="CLAQ-H01")
    if header["format"] != "claq":
        raise BadHeader(f"header says format {brief_repr(header['format'])}, not 'claq'", rule="CLAQ-H02")
    if type(header["version"]) is not int or header["version"] != version:
        raise BadHeader(f"header says version {brief_repr(header['version'])}; the preamble says {version}",
                        rule="CLAQ-H03")
    for key in ("metadata", "tensors", "files"):
        if not isinstance(header[key], dict):
            raise BadHeader(f"header field {key!r} must be an object", rule="CLAQ-H04")
    check_metadata(header["metadata"])
    for name, tensor in header["tensors"].items():
        _check_tensor_schema(name, tensor, version)
    fields = spec.FILE_FIELDS_BY_VERSION[version]
    for name, entry in header["files"].items():
        check_file_name(name)
        _check_section_entry(f"file {brief_repr(name)}", entry, fields)
        if entry["dtype"] != spec.FILE_DTYPE:
            raise BadHeader(f"file {brief_repr(name)}: dtype must be {spec.FILE_DTYPE}", rule="CLAQ-H29")
        if len(entry["shape"]) != 1:
            raise BadHeader(f"file {brief_repr(name)}: shape must be [n]", rule="CLAQ-H30")
        if "encoding" in fields:
            if not isinstance(entry["encoding"], str) or entry["encoding"] not in spec.FILE_ENCODINGS:
                raise BadHeader(f"file {brief_repr(name)}: encoding must be one of {', '.join(spec.FILE_ENCODINGS)}",
                                rule="CLAQ-H31")
            if not _is_uint(entry["size"]) or not 0 < entry["size"] <= spec.MAX_FILE_BYTES:
                raise BadHeader(f"file {brief_repr(name)}: size must be an integer in 1..{spec.MAX_FILE_BYTES}",
                                rule="CLAQ-H32")
            if entry["encoding"] == "none" and entry["size"] != entry["length"]:
                raise BadHeader(f"file {brief_repr(name)}: an unencoded file's size must equal its length",
                                rule="CLAQ-H33")
    return header


def _check_dtype(where: str, dtype) -> None:
    if not isinstance(dtype, str) or dtype not in spec.DTYPES:
        raise BadHeader(f"{where}: unknown dtype {brief_repr(dtype)}", rule="CLAQ-H11")


def _check_section_entry(where: str, entry, fields: tuple = spec.SECTION_FIELDS) -> None:
    if not isinstance(entry, dict) or set(entry) != set(fields):
        raise BadHeader(f"{where}: needs exactly the fields {', '.join(fields)}", rule="CLAQ-H10")
    _check_dtype(where, entry["dtype"])
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > spec.MAX_DIMS or not all(_is_uint(d) for d in shape):
        raise BadHeader(f"{where}: shape must be a list of at most {spec.MAX_DIMS} non-negative integers", rule="CLAQ-H12")
    for field in ("offset", "length", "crc32"):
        if not _is_uint(entry[field]):
            raise BadHeader(f"{where}: {field} must be a non-negative integer", rule="CLAQ-H13")
    if entry["crc32"] >= 1 << 32:
        raise BadHeader(f"{where}: crc32 out of range", rule="CLAQ-H14")
    if entry["length"] == 0:
        raise BadHeader(f"{where}: empty sections are not allowed", rule="CLAQ-H15")
    if entry["offset"] % spec.ALIGNMENT:
        raise BadLayout(f"{where}: offset {entry['offset']} is not {spec.ALIGNMENT}-byte aligned", rule="CLAQ-L01")
    if entry["length"] != math.prod(shape) * spec.DTYPES[entry["dtype"]].itemsize:
        raise BadHeader(f"{where}: length {entry['length']} does not match shape {shape} of {entry['dtype']}",
                        rule="CLAQ-H16")


def check_tensor_entry(name: str, kind, shape) -> None:
    """A tensor's kind (one this reader knows) and shape (1 to 8 positive integers): both readers."""
    if not isinstance(kind, str) or kind not in spec.KINDS:
        raise BadHeader(f"tensor {brief_repr(name)}: unknown kind {brief_repr(kind)} (this reader knows {', '.join(spec.KINDS)})",
                        rule="CLAQ-H07")
    if not isinstance(shape, list) or not 1 <= len(shape) <= spec.MAX_DIMS or not all(_is_uint(d) and d > 0 for d in shape):
        raise BadHeader(f"tensor {brief_repr(name)}: shape must list 1 to {spec.MAX_DIMS} positive integers",
                        rule="CLAQ-H08")


def check_tensor_sections(name: str, kind: str, shape: list, sections: dict, version: int) -> None:
    """The sections a tensor of this kind and shape needs, as {section: (dtype, shape)}: spec sections 4
    and 5 (both readers; the dtypes are known ones, checked before)."""
    if kind == spec.KIND_RAW:
        if set(sections) != {"data"} or sections["data"][1] != shape:
            raise BadHeader(f"tensor {brief_repr(name)}: a raw tensor has one section 'data' of the tensor's shape",
                            rule="CLAQ-H17")
        return
    if len(shape) != 2:
        raise BadHeader(f"tensor {brief_repr(name)}: a quantized weight is 2-D", rule="CLAQ-H18")
    allowed = {"bit_widths", "codebooks", "outlier_counts", "outlier_rows", "outlier_values"}
    allowed |= {spec.code_section(b) for b in spec.WIDTHS_BY_VERSION[version]}
    if "U8" in spec.CODEBOOK_DTYPES[version]:
        allowed.add("codebook_grid")
    if version in spec.RICE_VERSIONS:
        allowed.add(spec.RICE_SECTION)
    if version in spec.HUFFMAN_VERSIONS:
        allowed |= {spec.huffman_section(b) for b in spec.WIDTHS_BY_VERSION[version]}
    unknown = set(sections) - allowed
    if unknown:
        raise BadHeader(f"tensor {brief_repr(name)}: unknown section {brief_repr(sorted(unknown)[0])}", rule="CLAQ-H19")
    if "bit_widths" not in sections:
        raise BadHeader(f"tensor {brief_repr(name)}: missing section 'bit_widths'", rule="CLAQ-H20")
    if "codebooks" not in sections and spec.RICE_SECTION not in sections:
        raise BadHeader(f"tensor {brief_repr(name)}: missing section 'codebooks'"
                        + (f" (or {spec.RICE_SECTION!r})" if version in spec.RICE_VERSIONS else ""), rule="CLAQ-H20")
    if "codebooks" in sections and spec.RICE_SECTION in sections:
        raise BadHeader(f"tensor {brief_repr(name)}: codebooks and {spec.RICE_SECTION} are both present",
                        rule="CLAQ-H34")
    both = [b for b in spec.WIDTHS_BY_VERSION[version]
            if spec.code_section(b) in sections and spec.huffman_section(b) in sections]
    if both:
        raise BadHeader(f"tensor {brief_repr(name)}: codes_{both[0]} and huffman_{both[0]} are both present",
                        rule="CLAQ-H35")
    present = {"outlier_counts", "outlier_rows", "outlier_values"} & set(sections)
    if present and len(present) != 3:
        raise BadHeader(f"tensor {brief_repr(name)}: outlier sections must come together (counts, rows, values)",
                        rule="CLAQ-H21")
    for section, (dtype, section_shape) in sections.items():
        if dtype not in _expected_dtypes(section, version):
            raise BadHeader(f"tensor {brief_repr(name)} section {section!r}: dtype must be "
                            f"{' or '.join(_expected_dtypes(section, version))}", rule="CLAQ-H22")
        if len(section_shape) != 1:
            raise BadHeader(f"tensor {brief_repr(name)} section {section!r}: shape must be [n]", rule="CLAQ-H23")
    if "outlier_rows" in sections and sections["outlier_rows"][0] == "U16" and shape[0] > 65536:
        raise BadHeader(f"tensor {brief_repr(name)}: U16 outlier rows cannot address {shape[0]} rows (U32 needed)",
                        rule="CLAQ-H24")
    if sections["bit_widths"][1] != [shape[1]]:
        raise BadHeader(f"tensor {brief_repr(name)}: bit_widths must have one entry per column ({shape[1]})",
                        rule="CLAQ-H25")
    if ("codebook_grid" in sections) != (spec.RICE_SECTION in sections or sections["codebooks"][0] == "U8"):
        raise BadHeader(f"tensor {brief_repr(name)}: section codebook_grid must exist exactly when codebooks is U8 "
                        f"or {spec.RICE_SECTION} is present", rule="CLAQ-H26")
    if "codebook_grid" in sections and sections["codebook_grid"][1] != [2 * shape[1]]:
        raise BadHeader(f"tensor {brief_repr(name)}: codebook_grid must hold two entries per column ({2 * shape[1]})",
                        rule="CLAQ-H27")


def _check_tensor_schema(name: str, tensor, version: int) -> None:
    if not isinstance(tensor, dict) or set(tensor) != {"kind", "shape", "sections"}:
        raise BadHeader(f"tensor {brief_repr(name)}: needs exactly kind, shape, sections", rule="CLAQ-H06")
    check_tensor_entry(name, tensor["kind"], tensor["shape"])
    if not isinstance(tensor["sections"], dict):
        raise BadHeader(f"tensor {brief_repr(name)}: sections must be an object", rule="CLAQ-H09")
    for section, entry in tensor["sections"].items():
        _check_section_entry(f"tensor {brief_repr(name)} section {brief_repr(section)}", entry)
    check_tensor_sections(name, tensor["kind"], tensor["shape"],
                          {s: (e["dtype"], e["shape"]) for s, e in tensor["sections"].items()}, version)


def check_layout(header: dict, data_size: int) -> None:
    """Sections must tile the data region: first at 0, each next at the aligned end of the previous."""
    entries = [(e["offset"], e["length"], f"tensor {brief_repr(t)} section {brief_repr(s)}")
               for t, tensor in header["tensors"].items() for s, e in tensor["sections"].items()]
    entries += [(e["offset"], e["length"], f"file {brief_repr(f)}") for f, e in header["files"].items()]
    entries.sort()
    expected = 0
    for offset, length, where in entries:
        if offset < expected:
            raise BadLayout(f"{where}: overlaps the section before it", rule="CLAQ-L02")
        if offset > expected:
            raise BadLayout(f"{where}: leaves a hole of {offset - expected} bytes before it", rule="CLAQ-L03")
        expected = spec.align(offset + length)
    if expected != data_size:
        what = "runs past the end of the file" if expected > data_size else "is followed by unused bytes"
        raise BadLayout(f"the data region {what} (sections end at {expected}, file holds {data_size})", rule="CLAQ-L04")


def decode_claq(rows: int, sections: dict[str, np.ndarray]) -> np.ndarray:
    """W[rows, in] float32 from a quantized weight's typed sections (the decoding rule of the spec)."""
    bits = sections["bit_widths"]
    cols = bits.size
    sections = with_fixed_codes(with_levels(sections), rows)
    codebooks = spec.codebook_entries(sections["codebooks"], bits, sections.get("codebook_grid"))
    starts = spec.codebook_offsets(bits)
    W = np.empty((rows, cols), np.float32)
    for b in spec.ALLOWED_BITS:
        columns = spec.columns_of_width(bits, b)
        if columns.size:
            codes = spec.unpack_codes(sections[spec.code_section(b)], b, columns.size * rows).reshape(columns.size, rows)
            step = max(1, DECODE_BLOCK // rows)  # the columns whose entry indices (int64) are made at once
            for first in range(0, columns.size, step):
                part = columns[first:first + step]
                W[:, part] = codebooks[starts[part][:, None] + codes[first:first + step]].T
    if "outlier_counts" in sections:
        col_of = np.repeat(np.arange(cols), sections["outlier_counts"].astype(np.int64))
        W[sections["outlier_rows"].astype(np.int64), col_of] = sections["outlier_values"].astype(np.float32)
    return W


def check_claq_contents(name: str, rows: int, sections: dict[str, np.ndarray],
                        widths: tuple = spec.ALLOWED_BITS) -> dict[str, np.ndarray]:
    """Values inside a quantized weight's sections: widths (those of the file's version), codebooks,
    streams, padding, outliers. Returns the sections with coded levels (codebook_rice) decoded into
    `codebooks` (u8 levels) and coded streams (huffman_<b>) into codes_<b>, the one layout every decoder takes."""
    bits = sections["bit_widths"]
    bad = ~np.isin(bits, widths)
    if bad.any():
        raise BadTensorData(f"tensor {brief_repr(name)}: column {int(np.flatnonzero(bad)[0])} has bit width "
                            f"{int(bits[bad][0])}, allowed {widths}", rule="CLAQ-T01")
    try:
        sections = with_levels(sections)
    except CodedLevelsError as exc:
        raise BadTensorData(f"tensor {brief_repr(name)}: {exc}", rule=exc.rule) from None
    if sections["codebooks"].size != spec.codebook_offsets(bits)[-1]:
        raise BadTensorData(f"tensor {brief_repr(name)}: codebooks hold {sections['codebooks'].size} entries, "
                            f"the bit widths need {spec.codebook_offsets(bits)[-1]}", rule="CLAQ-T02")
    grid = sections.get("codebook_grid")
    if (grid is not None) != (sections["codebooks"].dtype == np.uint8):
        raise BadTensorData(f"tensor {brief_repr(name)}: codebook_grid must exist exactly when codebooks are u8 levels")
    if grid is not None:
        if grid.size != 2 * bits.size:
            raise BadTensorData(f"tensor {brief_repr(name)}: codebook_grid must hold two entries per column")
        if not np.isfinite(grid).all():
            raise BadTensorData(f"tensor {brief_repr(name)}: codebook_grid contains a non-finite value",
                                rule="CLAQ-T03")
        if np.any(grid[1::2] < 0):
            raise BadTensorData(f"tensor {brief_repr(name)}: a codebook grid has a negative step", rule="CLAQ-T04")
    if not np.isfinite(spec.codebook_entries(sections["codebooks"], bits, grid)).all():
        raise BadTensorData(f"tensor {brief_repr(name)}: codebooks contain a non-finite value", rule="CLAQ-T05")
    for b in widths:
        n_codes = int(np.count_nonzero(bits == b)) * rows
        coded = sections.get(spec.huffman_section(b))
        words = sections.get(spec.code_section(b))
        if (words is None and coded is None) != (n_codes == 0):
            raise BadTensorData(f"tensor {brief_repr(name)}: section codes_{b} (or huffman_{b}) must exist exactly "
                                f"when a column has {b} bits", rule="CLAQ-T06")
        if coded is not None:
            try:
                words = fixed_words(coded, b, n_codes)
            except CodedCodesError as exc:
                raise BadTensorData(f"tensor {brief_repr(name)} section huffman_{b}: {exc}", rule=exc.rule) from None
            sections = {**{k: v for k, v in sections.items() if k != spec.huffman_section(b)},
                        spec.code_section(b): words}
            continue
        if words is None:
            continue
        if words.size != spec.code_words(n_codes, b):
            raise BadTensorData(f"tensor {brief_repr(name)}: codes_{b} has {words.size} words, expected {spec.code_words(n_codes, b)}",
                                rule="CLAQ-T07")
        if not spec.codes_padding_ok(words, b, n_codes):
            raise BadTensorData(f"tensor {brief_repr(name)}: codes_{b} has non-zero padding bits", rule="CLAQ-T08")
    if "outlier_counts" in sections:
        counts, out_rows, values = (sections[k] for k in ("outlier_counts", "outlier_rows", "outlier_values"))
        if counts.size != bits.size or int(counts.sum(dtype=np.int64)) != out_rows.size or out_rows.size != values.size:
            raise BadTensorData(f"tensor {brief_repr(name)}: outlier counts, rows and values disagree in size",
                                rule="CLAQ-T09")
        if out_rows.size and int(out_rows.max()) >= rows:
            raise BadTensorData(f"tensor {brief_repr(name)}: an outlier row is out of range (rows {rows})",
                                rule="CLAQ-T10")
        if not np.isfinite(values).all():
            raise BadTensorData(f"tensor {brief_repr(name)}: an outlier value is not finite", rule="CLAQ-T11")
        if int(counts.max(initial=0)) > rows:
            raise BadTensorData(f"tensor {brief_repr(name)}: a column has more outliers than rows", rule="CLAQ-T12")
        r = out_rows.astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(counts.astype(np.int64))[:-1]])
        first = np.zeros(r.size, bool)  # first outlier of each column: no order against the one before
        first[starts[counts > 0]] = True
        if r.size > 1 and np.any((np.diff(r) <= 0) & ~first[1:]):
            raise BadTensorData(f"tensor {brief_repr(name)}: outlier rows are not strictly ascending within a column",
                                rule="CLAQ-T12")
    return sections


def decode_file(name: str, entry: dict, stored) -> bytes:
    """An embedded file's bytes from its stored section: as is, or inflated to exactly its declared size."""
    if entry.get("encoding", "none") == "none":
        return bytes(stored)
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(bytes(stored), entry["size"] + 1)  # never more than declared (+1 to notice)
    except zlib.error as exc:
        raise BadFileData(f"file {brief_repr(name)}: not a zlib stream ({exc})", rule="CLAQ-F01") from None
    if len(data) != entry["size"] or not inflater.eof:
        raise BadFileData(f"file {brief_repr(name)}: zlib data does not decode to exactly its {entry['size']} bytes",
                          rule="CLAQ-F02")
    if inflater.unused_data:
        raise BadFileData(f"file {brief_repr(name)}: bytes follow the end of the zlib stream", rule="CLAQ-F03")
    return data


def decode_tensor(name: str, tensor: dict, sections: dict[str, np.ndarray], copy: bool = True,
                  widths: tuple = spec.ALLOWED_BITS) -> np.ndarray:
    """Any tensor as float32, from its header entry and typed sections (shared by the .claq and GGUF readers).

    copy=False may return the F32 section itself: only for sections the caller owns (`sections(copy=True)`).
    """
    if tensor["kind"] == spec.KIND_RAW:
        data = sections["data"]
        if tensor["sections"]["data"]["dtype"] == "BF16":
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32, copy=copy).reshape(tensor["shape"])
    rows = tensor["shape"][0]
    return decode_claq(rows, check_claq_contents(name, rows, sections, widths))


class ClaqFile:
    """A validated, memory-mapped .claq file. Use as a context manager or call close()."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self._open()
        except BaseException:
            self._file.close()
            raise

    def _open(self) -> None:
        size = self.path.stat().st_size
        if size < spec.PREAMBLE.size:
            raise TruncatedFile(f"{size} bytes is shorter than the {spec.PREAMBLE.size}-byte preamble", rule="CLAQ-P01")
        magic, version, header_len = spec.PREAMBLE.unpack(self._file.read(spec.PREAMBLE.size))
        if magic != spec.MAGIC:
            raise BadMagic(f"not a .claq file (magic {magic!r}, expected {spec.MAGIC!r})", rule="CLAQ-P02")
        if version not in spec.WIDTHS_BY_VERSION:
            raise UnsupportedVersion(f"file is format version {version}; this reader reads versions "
                                     f"{', '.join(map(str, spec.WIDTHS_BY_VERSION))} (a newer claq-convert may read it)",
                                     rule="CLAQ-P03")
        self.version = version
        self.widths = spec.WIDTHS_BY_VERSION[version]
        if header_len > spec.MAX_HEADER_BYTES:
            raise BadHeader(f"header length {header_len} exceeds the {spec.MAX_HEADER_BYTES}-byte cap", rule="CLAQ-P04")
        if spec.PREAMBLE.size + header_len > size:
            raise TruncatedFile(f"header length {header_len} runs past the end of the {size}-byte file",
                                rule="CLAQ-P05")
        if (spec.PREAMBLE.size + header_len) % spec.ALIGNMENT:
            raise BadHeader(f"header length {header_len} does not end on a {spec.ALIGNMENT}-byte boundary",
                            rule="CLAQ-P06")
        self.header = parse_header(self._file.read(header_len), version)
        self.data_start = spec.PREAMBLE.size + header_len
        check_layout(self.header, size - self.data_start)
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.size = size

    # -- access
    @property
    def metadata(self) -> dict:
        return self.header["metadata"]

    @property
    def tensors(self) -> dict:
        return self.header["tensors"]

    @property
    def files(self) -> dict:
        return self.header["files"]

    def _section(self, where: str, entry: dict, check_crc: bool = True, copy: bool = False,
                 rule: str = "CLAQ-C01") -> np.ndarray:
        start = self.data_start + entry["offset"]
        if copy:
            view = np.empty(entry["length"], np.uint8)
            self._file.seek(start)
            if self._file.readinto(view) != entry["length"]:
                raise TruncatedFile(f"{where}: the file ended early (changed since it was opened?)")
        else:
            view = memoryview(self._mmap)[start:start + entry["length"]]
        if check_crc and zlib.crc32(view) != entry["crc32"]:
            raise ChecksumMismatch(f"{where}: checksum mismatch (file damaged?)", rule=rule)
        return np.frombuffer(view, spec.DTYPES[entry["dtype"]])

    def sections(self, name: str, check_crc: bool = True, copy: bool = False) -> dict[str, np.ndarray]:
        """The typed arrays of a tensor's sections: read-only views of the map, or with `copy` arrays of
        their own read from the file (a loader's way: no mapped pages stay resident beside the copy)."""
        tensor = self._tensor(name)
        return {s: self._section(f"tensor {brief_repr(name)} section {s!r}", e, check_crc, copy)
                for s, e in tensor["sections"].items()}

    def _tensor(self, name: str) -> dict:
        if name not in self.tensors:
            raise KeyError(f"no tensor {brief_repr(name)} in {self.path}")
        return self.tensors[name]

    def decode(self, name: str) -> np.ndarray:
        """A tensor as float32 (quantized weights decoded; raw tensors converted)."""
        return decode_tensor(name, self._tensor(name), self.sections(name), widths=self.widths)

    def file(self, name: str) -> bytes:
        if name not in self.files:
            raise KeyError(f"no embedded file {brief_repr(name)} in {self.path}")
        entry = self.files[name]
        return decode_file(name, entry, self._section(f"file {brief_repr(name)}", entry, rule="CLAQ-C02"))

    def stored_bytes(self, name: str) -> int:
        """Bytes a tensor occupies in the file, alignment padding included."""
        return sum(spec.align(e["length"]) for e in self._tensor(name)["sections"].values())

    def validate(self) -> None:
        """Everything: checksums, zero padding between sections, and every tensor's contents."""
        for name, tensor in self.tensors.items():
            sections = self.sections(name)
            if tensor["kind"] == spec.KIND_CLAQ:
                check_claq_contents(name, tensor["shape"][0], sections, self.widths)
        for name in self.files:
            self.file(name)
        entries = [e for t in self.tensors.values() for e in t["sections"].values()] + list(self.files.values())
        for entry in entries:
            start = self.data_start + entry["offset"] + entry["length"]
            pad = self._mmap[start:self.data_start + spec.align(entry["offset"] + entry["length"])]
            if pad.count(0) != len(pad):
                raise BadLayout(f"non-zero padding after the section at offset {entry['offset']}", rule="CLAQ-L05")

    def close(self) -> None:
        if getattr(self, "_mmap", None) is not None:
            try:
                self._mmap.close()
            except BufferError:  # arrays handed out still view the map; it closes when they go
                pass
            self._mmap = None
        self._file.close()

    def __enter__(self) -> "ClaqFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_claq(path) -> ClaqFile:
    return ClaqFile(path)
