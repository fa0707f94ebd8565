"""Checkpoints published already quantized, read back to the float values their formats define.

Pure functions on tensors (source.py reads the bytes): fine-grained FP8 (DeepSeek-V3, Qwen3-FP8, GLM-4.5-FP8:
e4m3 weights, one float32 scale per block of rows and columns) and MXFP4 (gpt-oss's experts: e2m1 codes,
two a byte, one power-of-two scale per 32 inputs). CLAQ then quantizes those values as it would bf16 ones;
each function gives what transformers' own dequantization gives, in float32 (tests compare the two).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# e2m1 values by code: the sign is the code's high bit (OCP Microscaling spec; transformers' FP4_VALUES)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32     # inputs sharing one scale
SCALE_BIAS = 127     # an e8m0 scale s stands for 2 ** (s - 127)


def fp8_scale_shape(shape: Sequence[int], block: Optional[Sequence[int]]) -> tuple[int, ...]:
    """The shape of the scales an FP8 weight of `shape` has: one per block of block[0] rows and block[1]
    columns (the last blocks may be partial), or one for the whole tensor (block None)."""
    if block is None:
        return ()
    rows, cols = shape
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def fp8_weight(weight: torch.Tensor, scale_inv: torch.Tensor, block: Optional[Sequence[int]]) -> torch.Tensor:
    """An FP8 weight [rows, cols] times its scales (`weight_scale_inv`, despite the name a multiplier:
    float32 or e8m0), each over its block of rows and columns, in float32."""
    values = weight.to(torch.float32)
    scale = scale_inv.to(torch.float32)
    if block is None:
        return values * scale.reshape(())
    rows, cols = values.shape
    scale = scale.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return values * scale


def mxfp4_matrix(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An MXFP4 matrix [rows, groups * 32] in float32 from its codes `blocks` [rows, groups, 16] (uint8, the
    low nibble the earlier input) and e8m0 `scales` [rows, groups]: each code's e2m1 value times 2 ** (s - 127)."""
    rows, groups, _ = blocks.shape
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.uint8).to(torch.int64)
    values = torch.stack([table[codes & 0x0F], table[codes >> 4]], dim=-1).reshape(rows, groups, MXFP4_BLOCK)
    exponents = (scales.to(torch.int32) - SCALE_BIAS)[..., None]
    return torch.ldexp(values, exponents).reshape(rows, groups * MXFP4_BLOCK)
