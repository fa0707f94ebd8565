"""Torch decoder: the decoding rule of formats/claq-v1.md with tensor operations, on any device.

The twin of `reader.decode_claq` (NumPy); the tests check the two agree bit for bit. `ClaqLinear`
keeps a weight's packed sections on the device and decodes them in `forward`, so resident weight
memory stays close to the file's size.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import spec


def unpack_codes(words: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """u32 words (held in an int32 or int64 tensor) -> int64 codes; each code reads its word and the next."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, w.new_zeros(1)])
    start = torch.arange(n_codes, device=words.device, dtype=torch.int64) * bits
    word, shift = start >> 5, start & 31
    pair = w[word] | (w[word + 1] << 32)  # wraps past 2**63, but only bits below 35 are kept
    return (pair >> shift) & ((1 << bits) - 1)


class ClaqLayout:
    """What follows from a weight's bit widths: the columns of each stream and the codebook offsets."""

    def __init__(self, bit_widths: np.ndarray, device):
        self.cols = int(bit_widths.size)
        self.starts = torch.from_numpy(spec.codebook_offsets(bit_widths)[:-1]).to(device)
        self.columns = {b: torch.from_numpy(spec.columns_of_width(bit_widths, b)).to(device)
                        for b in spec.ALLOWED_BITS if np.any(bit_widths == b)}


def decode_claq(rows: int, sections: dict[str, torch.Tensor], layout: ClaqLayout,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[rows, in] from the sections (torch tensors on one device)."""
    codebooks = sections["codebooks"].to(dtype)
    W = torch.empty(rows, layout.cols, dtype=dtype, device=codebooks.device)
    for b, columns in layout.columns.items():
        codes = unpack_codes(sections[spec.code_section(b)], b, columns.numel() * rows).view(columns.numel(), rows)
        W[:, columns] = codebooks[layout.starts[columns][:, None] + codes].T
    if "outlier_counts" in sections:
        counts = sections["outlier_counts"].to(torch.int64)
        col_of = torch.repeat_interleave(torch.arange(layout.cols, device=W.device), counts)
        W[sections["outlier_rows"].to(torch.int64), col_of] = sections["outlier_values"].to(dtype)
    return W


def to_torch(array: np.ndarray, device) -> torch.Tensor:
    """A section array as a torch tensor (copied: file maps are read-only)."""
    if array.dtype == np.dtype("<u4"):    # code words: the same bits as int32; unpack_codes masks them back
        array = array.view(np.int32)
    elif array.dtype == np.dtype("<u2"):  # outlier rows (few): widened, torch has little uint16 arithmetic
        array = array.astype(np.int32)
    return torch.from_numpy(np.array(array, copy=True)).to(device)


class ClaqLinear(torch.nn.Module):
    """A Linear whose weight is decoded from CLAQ sections at each forward (or once, with cache=True)."""

    def __init__(self, rows: int, sections: dict[str, np.ndarray], bias: Optional[torch.Tensor] = None,
                 device="cpu", compute_dtype: torch.dtype = torch.float32, cache: bool = False):
        super().__init__()
        self.out_features, self.in_features = rows, int(sections["bit_widths"].size)
        self.layout = ClaqLayout(np.asarray(sections["bit_widths"]), device)
        self.section_names = list(sections)
        for name, array in sections.items():
            self.register_buffer(name, to_torch(array, device), persistent=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(device), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.cache = cache
        self._weight: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        sections = {name: getattr(self, name) for name in self.section_names}
        return decode_claq(self.out_features, sections, self.layout, self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        if self._weight is not None:
            return self._weight
        W = self.dequantize()
        if self.cache:
            self._weight = W
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def packed_bytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.section_names)

    def extra_repr(self) -> str:
        widths = ",".join(str(b) for b in self.layout.columns)
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={widths}, cache={self.cache}"
