"""Torch decoder: the decoding rule of formats/claq-v1.md with tensor operations, on any device.

The twin of `reader.decode_claq` (NumPy); the tests check the two agree bit for bit. It runs on any
device torch has and is the portable fallback and reference of the modules in `modules.py`, whose
fast paths (Numba on the CPU, Triton on CUDA) are held to it.
"""
from __future__ import annotations

import numpy as np
import torch

from ..format import spec
from ..format.huffman import decode_codes
from ..format.rice import decode_levels


def _lane_tables(bits: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the 32 codes of one group of `bits` words: each code's word, the next word, and its shift."""
    start = torch.arange(32, dtype=torch.int64) * bits
    word = start >> 5
    return word.to(device), torch.clamp(word + 1, max=bits - 1).to(device), (start & 31).to(device)


def unpack_codes(words: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """u32 words (held in an int32 or int64 tensor) -> int64 codes.

    32 codes of b bits fill exactly b words, so the stream is a [groups, b] table and every code's
    position inside its group is one of 32 fixed lanes: no per-code index arithmetic, no gather over
    the stream. A width dividing 32 never straddles words and needs only shifts of its own word.
    """
    groups = -(-n_codes // 32)
    w = words.reshape(-1)
    if w.numel() < groups * bits:  # the last group's missing words are zero
        w = torch.cat([w, w.new_zeros(groups * bits - w.numel())])
    table = w[: groups * bits].view(groups, bits)
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # int32 >> sign-extends, but the mask keeps only bits below 32
        shifts = torch.arange(0, 32, bits, device=w.device, dtype=torch.int32)
        codes = (table.to(torch.int32).reshape(-1, 1) >> shifts) & mask
        return codes.view(-1)[:n_codes].to(torch.int64)
    table = table.to(torch.int64) & 0xFFFFFFFF
    word, following, shift = _lane_tables(bits, w.device)
    pair = table[:, word] | (table[:, following] << 32)  # bits past the first 35 are never kept
    return ((pair >> shift) & mask).view(-1)[:n_codes]


def codes_at(words: torch.Tensor, bits: int, positions: torch.Tensor) -> torch.Tensor:
    """The codes at arbitrary stream positions (int64 tensor of any shape): random access into a stream.

    Code i starts at stream bit i*bits; it is read from its word and the next (clamped at the end,
    where a code never straddles), as in spec.unpack_codes. Only the words read are widened.
    """
    w = words.reshape(-1)
    start = positions * bits
    word = start >> 5
    low = w[word].to(torch.int64) & 0xFFFFFFFF
    high = w[torch.clamp(word + 1, max=w.numel() - 1)].to(torch.int64) & 0xFFFFFFFF
    return ((low | (high << 32)) >> (start & 31)) & ((1 << bits) - 1)


class ClaqLayout:
    """What follows from a weight's bit widths: the columns of each stream and the codebook offsets."""

    def __init__(self, bit_widths: np.ndarray, device):
        self.cols = int(bit_widths.size)
        self.starts = torch.from_numpy(spec.codebook_offsets(bit_widths)[:-1]).to(device)
        sizes = np.left_shift(1, bit_widths.astype(np.int64))
        self.entry_columns = torch.from_numpy(np.repeat(np.arange(self.cols), sizes)).to(device)  # grid codebooks
        self.columns = {b: torch.from_numpy(spec.columns_of_width(bit_widths, b)).to(device)
                        for b in spec.ALLOWED_BITS if np.any(bit_widths == b)}


def codebook_values(sections: dict[str, torch.Tensor], layout: ClaqLayout, dtype: torch.dtype) -> torch.Tensor:
    """Every codebook entry (spec.codebook_entries): fp16 entries, or u8 levels on each column's grid,
    offset + step * level in float32 with the product rounded first (two tensor ops, never fused)."""
    if spec.RICE_SECTION in sections:  # coded levels, decoded on the host (modules decode them once, at load)
        levels = decode_levels(sections[spec.RICE_SECTION].cpu().numpy(), sections["bit_widths"].cpu().numpy())
        codebooks = torch.from_numpy(levels).to(sections["bit_widths"].device)
    else:
        codebooks = sections["codebooks"]
    if "codebook_grid" not in sections:
        return codebooks.to(dtype)
    grid = sections["codebook_grid"].float().view(-1, 2)[layout.entry_columns]
    product = grid[:, 1] * codebooks.float()
    return (grid[:, 0] + product).to(dtype)


def decode_claq(rows: int, sections: dict[str, torch.Tensor], layout: ClaqLayout,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[rows, in] from the sections (torch tensors on one device).

    Decoded column by column into W^T [in, rows] (each stream is column-major already) and returned as
    its transposed view, which F.linear takes without a copy.
    """
    codebooks = codebook_values(sections, layout, dtype)
    Wt = None
    for b, columns in layout.columns.items():
        n_codes = columns.numel() * rows
        if spec.huffman_section(b) in sections:  # coded codes, decoded on the host (modules expand them at load)
            coded = decode_codes(sections[spec.huffman_section(b)].cpu().numpy().view(np.uint8), b, n_codes)
            codes = torch.from_numpy(coded.astype(np.int64)).to(codebooks.device).view(columns.numel(), rows)
        else:
            codes = unpack_codes(sections[spec.code_section(b)], b, n_codes).view(columns.numel(), rows)
        entries = layout.starts[columns][:, None] + torch.arange(1 << b, device=codes.device)
        values = torch.gather(codebooks[entries], 1, codes)  # each column's own small codebook
        if columns.numel() == layout.cols:  # one width for the whole weight: no scatter
            Wt = values
            break
        if Wt is None:
            Wt = torch.empty(layout.cols, rows, dtype=dtype, device=codebooks.device)
        Wt.index_copy_(0, columns, values)
    if "outlier_counts" in sections:
        counts = sections["outlier_counts"].to(torch.int64)
        col_of = torch.repeat_interleave(torch.arange(layout.cols, device=Wt.device), counts)
        Wt[col_of, sections["outlier_rows"].to(torch.int64)] = sections["outlier_values"].to(dtype)
    return Wt.T


def to_torch(array: np.ndarray, device) -> torch.Tensor:
    """A section array as a torch tensor; copied only when read-only (a view of a file map)."""
    if array.dtype == np.dtype("<u4"):    # code words: the same bits as int32; unpack_codes masks them back
        array = array.view(np.int32)
    elif array.dtype == np.dtype("<u2"):  # outlier rows (few): widened, torch has little uint16 arithmetic
        array = array.astype(np.int32)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device)
