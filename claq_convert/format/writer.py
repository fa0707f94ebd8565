"""Streaming .claq writer: tensor by tensor, atomically renamed into place when complete.

Sections go to a temporary data file as they arrive (memory: one tensor). `close()` writes the
preamble and header to a temporary file beside the target, appends the data, fsyncs and renames, so
an interrupted conversion never leaves a file that looks valid. The mirror image of `reader.py`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from . import spec
from .huffman import encode_codes
from .rice import encode_levels

_RAW_DTYPES = {np.dtype(v).str: k for k, v in spec.DTYPES.items() if k != "BF16"}


def encode_claq_sections(rows: int, bits: np.ndarray, codes: np.ndarray, column_codebooks: np.ndarray,
                         outlier_counts: np.ndarray, outlier_rows: np.ndarray,
                         outlier_values: np.ndarray, codebook_grid: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """The sections of one quantized weight, in file order, as typed little-endian arrays.

    codes is uint8 [rows, in]; column_codebooks [in, >= 2**max(bits)] with column j's entries first:
    fp16 values, or with codebook_grid ([in, 2]: each column's fp16 offset and step) their u8 levels.
    """
    bits = np.asarray(bits, np.uint8)
    cols = bits.size
    if codes.shape != (rows, cols):
        raise ValueError(f"codes shape {codes.shape} does not match ({rows}, {cols})")
    if not np.isin(bits, spec.ALLOWED_BITS).all():
        raise ValueError(f"bit widths must be in {spec.ALLOWED_BITS}")
    sizes = np.left_shift(1, bits.astype(np.int64))
    mask = np.arange(column_codebooks.shape[1])[None, :] < sizes[:, None]
    sections = {"bit_widths": bits.astype(spec.DTYPES["U8"])}
    if codebook_grid is None:
        sections["codebooks"] = column_codebooks[mask].astype(spec.DTYPES["F16"])  # row-major: column by column
    else:
        if codebook_grid.shape != (cols, 2) or column_codebooks.dtype != np.uint8:
            raise ValueError("a grid codebook needs u8 levels and one (offset, step) pair per column")
        sections["codebook_grid"] = codebook_grid.astype(spec.DTYPES["F16"]).ravel()
        levels = column_codebooks[mask]
        coded = encode_levels(levels, bits) if spec.VERSION in spec.RICE_VERSIONS else None
        if coded is None or coded.size >= levels.size:  # coded only when it is shorter: never worse than u8
            sections["codebooks"] = levels
        else:
            sections[spec.RICE_SECTION] = coded
    for b in spec.ALLOWED_BITS:
        columns = spec.columns_of_width(bits, b)
        if columns.size:
            stream = codes.T[columns].ravel()  # one copy, in stream order
            coded = encode_codes(stream, b) if spec.VERSION in spec.HUFFMAN_VERSIONS else None
            if coded is None:  # coded only where that is shorter (encode_codes): never worse than fixed width
                sections[spec.code_section(b)] = spec.pack_codes(stream, b)
            else:
                sections[spec.huffman_section(b)] = coded
    n_outliers = int(np.sum(outlier_counts))
    if n_outliers:
        count_dtype = spec.outlier_count_dtype(int(np.max(outlier_counts)))
        sections["outlier_counts"] = np.asarray(outlier_counts).astype(spec.DTYPES[count_dtype])
        sections["outlier_rows"] = np.asarray(outlier_rows).astype(spec.DTYPES[spec.outlier_row_dtype(rows)])
        sections["outlier_values"] = np.asarray(outlier_values).astype(spec.DTYPES["F16"])
    return sections


def _dtype_name(array: np.ndarray) -> str:
    name = _RAW_DTYPES.get(array.dtype.newbyteorder("<").str)
    if name is None:
        raise ValueError(f"dtype {array.dtype} cannot be stored; use one of {', '.join(spec.DTYPES)}")
    return name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ClaqWriter:
    """with ClaqWriter(path) as w: w.add_raw(...); w.add_quantized(...); w.add_file(...); w.metadata[...] = ..."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data = tempfile.NamedTemporaryFile(prefix=f".{self.path.name}.", suffix=".data", dir=self.path.parent,
                                                 delete=False)
        self._offset = 0
        self.tensors: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        self.metadata: dict = {}
        self._closed = False

    # -- sections
    def _section(self, array: np.ndarray, dtype: str) -> dict:
        data = np.ascontiguousarray(array).astype(spec.DTYPES[dtype], copy=False).tobytes()
        if not data:
            raise ValueError("empty sections are not allowed")
        entry = {"dtype": dtype, "shape": [int(np.asarray(array).size)], "offset": self._offset,
                 "length": len(data), "crc32": zlib.crc32(data)}
        self._data.write(data)
        padded = spec.align(len(data))
        self._data.write(b"\0" * (padded - len(data)))
        self._offset += padded
        return entry

    def _check_name(self, name: str) -> None:
        if name in self.tensors or name in self.files:
            raise ValueError(f"duplicate name {name!r}")
        if not name or not name.isprintable():
            raise ValueError(f"name {name!r} must be non-empty printable text")

    def add_raw(self, name: str, array: np.ndarray, dtype: Optional[str] = None) -> None:
        """A tensor stored as is; dtype "BF16" takes the raw uint16 bits of a bfloat16 tensor. A shape holds
        1 to 8 positive sizes (CLAQ-H08): a scalar is given as [1] (convert.raw_array)."""
        self._check_name(name)
        if not 1 <= array.ndim <= spec.MAX_DIMS or 0 in array.shape:
            raise ValueError(f"tensor {name!r}: shape {list(array.shape)} is not 1 to {spec.MAX_DIMS} positive sizes")
        dtype = dtype or _dtype_name(array)
        entry = self._section(array.reshape(-1), dtype)
        entry["shape"] = [int(d) for d in array.shape]
        self.tensors[name] = {"kind": spec.KIND_RAW, "shape": entry["shape"], "sections": {"data": entry}}

    def add_quantized(self, name: str, rows: int, sections: dict[str, np.ndarray]) -> int:
        """A quantized weight from `encode_claq_sections`; returns its stored bytes (padding included)."""
        self._check_name(name)
        cols = int(sections["bit_widths"].size)
        start = self._offset
        entries = {}
        for section, array in sections.items():
            entries[section] = self._section(array, _dtype_name(array))
        self.tensors[name] = {"kind": spec.KIND_CLAQ, "shape": [int(rows), cols], "sections": entries}
        return self._offset - start

    def add_file(self, name: str, data: bytes) -> None:
        """An embedded file (tokenizer.json, chat_template.jinja ...): zlib-compressed when that is smaller
        (a 3.5 MB tokenizer.json takes 0.6 MB), else stored as is."""
        self._check_name(name)
        if not data or len(data) > spec.MAX_FILE_BYTES:
            raise ValueError(f"embedded file {name!r} must hold 1 to {spec.MAX_FILE_BYTES} bytes")
        packed = zlib.compress(data, 9)
        encoding, stored = ("zlib", packed) if len(packed) < len(data) else ("none", data)
        entry = self._section(np.frombuffer(stored, np.uint8), spec.FILE_DTYPE)
        self.files[name] = {**entry, "encoding": encoding, "size": len(data)}

    # -- finishing
    def header_bytes(self) -> bytes:
        header = {"format": "claq", "version": spec.VERSION, "metadata": self.metadata,
                  "tensors": self.tensors, "files": self.files}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
        padded = spec.align(spec.PREAMBLE.size + len(text)) - spec.PREAMBLE.size
        text += b" " * (padded - len(text))
        if len(text) > spec.MAX_HEADER_BYTES:
            raise ValueError(f"header of {len(text)} bytes exceeds the {spec.MAX_HEADER_BYTES}-byte cap")
        return text

    def close(self) -> Path:
        if self._closed:
            return self.path
        self._data.flush()
        header = self.header_bytes()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a finished file gets the usual mode
            with os.fdopen(fd, "wb") as out:
                out.write(spec.PREAMBLE.pack(spec.MAGIC, spec.VERSION, len(header)))
                out.write(header)
                self._data.seek(0)
                shutil.copyfileobj(self._data, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._discard_data()
        self._closed = True
        return self.path

    def abort(self) -> None:
        self._discard_data()
        self._closed = True

    def _discard_data(self) -> None:
        self._data.close()
        Path(self._data.name).unlink(missing_ok=True)

    def __enter__(self) -> "ClaqWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
