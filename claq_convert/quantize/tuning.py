"""Codebook tuning: after quantization, refit every codebook entry by distillation, codes fixed.

GPTQ fits each weight to its own layer's inputs; what a user sees is the whole model's next-token
distribution. Tuning moves every codebook entry (and the norms' scales, stored raw) so that the quantized
model's distribution matches the source model's on the calibration windows (KL divergence, Adam), with
every code left where GPTQ put it; the forward sees every codebook as the file will store it. The file's
bits do not change: the same codebooks, refitted. On
self-sampled windows the target is the model's own distribution, not a text domain, so the gain carries
over to every evaluation text (README, "Tuning").

Pure functions and modules here; `convert.py` decides when to tune and writes the result.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch

from ..kernels.numba_quant import FP16_LEAST, GRID_TOP
from ..kernels.numpy_quant import grid_codebook
from ..progress import Progress, no_progress
from .gptq import QuantizedWeight

TUNE_LR = 3e-4         # Adam's step for codebook entries (measured on SmolLM2: README, "Tuning")
NORM_LR_FACTOR = 5.0   # the norms' scales (about 1) move faster than codebook entries (about 0.02)
MAX_ENTRIES = 256


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """numpy_quant.fp16_at_least in torch (x >= 0, float64): the next fp16 up is the next bit pattern."""
    r = x.to(torch.float16)
    up = (r.view(torch.int16) + 1).view(torch.float16)
    return torch.where(r.double() >= x, r.double(), up.double())


def grid_values(ordered: torch.Tensor) -> torch.Tensor:
    """numpy_quant.grid_codebook's float32 entries, in torch, for ascending codebooks [n, k] (float32): the
    values a file stores for them as u8 levels on each column's fp16 (offset, step) grid, bit for bit."""
    k = ordered.shape[1]
    x = ordered.double()
    offset = x[:, 0].to(torch.float16).double()
    span = x[:, -1] - offset
    step = torch.where(span > 0, _fp16_at_least(span.clamp(min=0) / GRID_TOP), torch.full_like(span, FP16_LEAST))
    levels = torch.round((x - offset[:, None]) / step[:, None]).clamp(0, GRID_TOP)
    index = torch.arange(k, dtype=torch.float64, device=ordered.device)
    y = levels - index  # strict_levels: strictly rising from 0 to GRID_TOP, the Numba kernel's two passes
    y[:, 0] = 0
    y = torch.cummax(y, dim=1).values
    y[:, -1] = GRID_TOP - (k - 1)
    y = torch.cummin(y.flip(1), dim=1).values.flip(1)
    return offset[:, None].float() + step[:, None].float() * (y + index).float()


class DecodedWeight(torch.nn.Module):
    """A parametrization: the weight decoded from trainable codebooks [in, 256] and fixed codes; outliers
    stay at their fp16 values (no gradient reaches them).

    The forward sees each codebook as the file will store it (fp16 entries, or u8 levels on the column's
    fp16 grid, `retuned`'s rule) and passes the gradient straight through to the float entries. Rounding
    only after the tuning, codes fixed, undid part of it (SmolLM2 at 3.5 bpw, 16 steps: WikiText ppl
    34.32 -> 34.54 on 20 windows; README, "Tuning")."""

    def __init__(self, result: QuantizedWeight, transposed: bool):
        super().__init__()
        rows, cols = result.shape
        self.transposed = transposed
        self.grid = result.codebook_grid is not None
        self.codebooks = torch.nn.Parameter(torch.from_numpy(result.column_codebooks.astype(np.float32)))
        self.widths = []  # (the buffer holding the columns of one width, its entry count): buffers follow .to()
        for b in np.unique(result.bits):
            self.register_buffer(f"columns_{int(b)}", torch.from_numpy(np.flatnonzero(result.bits == b)),
                                 persistent=False)
            self.widths.append((f"columns_{int(b)}", 1 << int(b)))
        flat = result.codes.astype(np.int64) + MAX_ENTRIES * np.arange(cols, dtype=np.int64)[None, :]
        self.register_buffer("index", torch.from_numpy(flat), persistent=False)
        out_cols = np.repeat(np.arange(cols), result.outlier_counts)
        self.register_buffer("outlier_rows", torch.from_numpy(result.outlier_rows.astype(np.int64)), persistent=False)
        self.register_buffer("outlier_cols", torch.from_numpy(out_cols.astype(np.int64)), persistent=False)
        self.register_buffer("outlier_values", torch.from_numpy(result.outlier_values.astype(np.float32)),
                             persistent=False)

    def stored(self) -> torch.Tensor:
        """The codebooks [in, 256] as the file would store them now (no gradient)."""
        with torch.no_grad():
            c = self.codebooks
            if not self.grid:
                return c.to(torch.float16).float()
            out = torch.zeros_like(c)
            for buffer, k in self.widths:
                columns = getattr(self, buffer)
                ordered, order = torch.sort(c[columns, :k], dim=1, stable=True)
                out[columns, :k] = torch.zeros_like(ordered).scatter_(1, order, grid_values(ordered))
            return out

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        c = self.codebooks
        c = c + (self.stored() - c).detach()  # stored values forward, the float entries' gradient back
        W = c.view(-1)[self.index]
        if self.outlier_rows.numel():
            W = W.index_put((self.outlier_rows, self.outlier_cols), self.outlier_values)
        return W.T if self.transposed else W


def attach(model: torch.nn.Module, results: dict[str, QuantizedWeight], transposed: Callable[[str], bool]
           ) -> dict[str, DecodedWeight]:
    """Make every quantized weight of `model` a function of its codebooks (a tied head shares the
    embedding's). Returns name -> parametrization; the model's other parameters are frozen."""
    from torch.nn.utils import parametrize

    for p in model.parameters():
        p.requires_grad_(False)
    by_tensor = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    decoded = {}
    for name, result in results.items():
        module = DecodedWeight(result, transposed(name)).to(params[name].device)  # the model may be on CUDA
        for alias in by_tensor[id(params[name])]:  # a tied head is the same tensor under a second name
            owner, _, leaf = alias.rpartition(".")
            parametrize.register_parametrization(model.get_submodule(owner), leaf, module, unsafe=True)
        decoded[name] = module
    return decoded


def norm_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The scales of the model's normalization layers (LayerNorm, RMSNorm of any family), by name."""
    found = {}
    for module_name, module in model.named_modules():
        if "norm" not in type(module).__name__.lower():
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.dim() == 1:
            found[f"{module_name}.weight" if module_name else "weight"] = weight
    return found


def distill(student: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor, steps: int, lr: float,
            parameters: list, norms: list, seed: int = 0, progress: Progress = no_progress) -> list[float]:
    """`steps` Adam steps, one calibration window each (shuffled, cycled), on KL(teacher || student) per
    token; cosine-decayed learning rate. Returns each step's loss."""
    for p in parameters + norms:
        p.requires_grad_(True)
    groups = [{"params": parameters, "lr": lr}] + ([{"params": norms, "lr": lr * NORM_LR_FACTOR}] if norms else [])
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(windows.shape[0], generator=generator)
                       for _ in range(-(-steps // windows.shape[0]))])
    device = next(iter(parameters)).device
    losses = []
    for step in progress(range(steps), "tuning", steps):
        batch = windows[order[step]][None].to(device)
        with torch.no_grad():
            target = teacher(batch, use_cache=False).logits.float().log_softmax(-1)
        logits = student(batch, use_cache=False).logits.float()
        loss = torch.nn.functional.kl_div(logits.log_softmax(-1), target, log_target=True,
                                          reduction="none").sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    for p in parameters + norms:
        p.requires_grad_(False)
    return losses


def retuned(result: QuantizedWeight, codebooks: np.ndarray) -> QuantizedWeight:
    """`result` with its codebooks replaced by tuned float values [in, 256], stored as the result was
    (u8 levels on fp16 grids, or fp16): each column's entries sorted ascending and its codes renumbered
    to match, so the weight decodes to the tuned values as rounded by the storage."""
    cols = result.shape[1]
    used = np.arange(MAX_ENTRIES)[None, :] < (1 << result.bits.astype(np.int64))[:, None]   # [in, 256]
    values = np.where(used, codebooks.astype(np.float64), np.inf)
    order = np.argsort(values, axis=1, kind="stable")                 # unused entries last
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(MAX_ENTRIES)[None, :].repeat(cols, 0), axis=1)
    codes = rank[np.arange(cols)[None, :], result.codes.astype(np.int64)].astype(np.uint8)
    ordered = np.where(used, np.take_along_axis(values, order, axis=1), 0.0)
    if result.codebook_grid is None:  # fp16 entries
        return replace(result, codes=codes, column_codebooks=ordered.astype(np.float16))
    levels = np.zeros((cols, MAX_ENTRIES), np.uint8)
    entries = np.zeros((cols, MAX_ENTRIES), np.float32)
    grid = np.zeros((cols, 2), np.float64)
    for b in np.unique(result.bits):  # levels strictly increasing from 0 to 255, as the quantizer makes them
        columns, k = np.flatnonzero(result.bits == b), 1 << int(b)
        levels[columns, :k], grid[columns], entries[columns, :k] = grid_codebook(ordered[columns, :k])
    grid = grid.astype(np.float16)
    return replace(result, codes=codes, column_codebooks=entries, codebook_levels=levels, codebook_grid=grid)


def tune(model: torch.nn.Module, teacher: torch.nn.Module, results: dict[str, QuantizedWeight],
         transposed: Callable[[str], bool], windows: torch.Tensor, steps: int, lr: float, seed: int = 0,
         progress: Progress = no_progress, log: Optional[Callable[[str], None]] = None
         ) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict]:
    """(tuned results, tuned norm scales by name, a record). `model` is a copy of the source model that
    this function changes; `teacher` the source model, unchanged."""
    decoded = attach(model, results, transposed)
    norms = norm_parameters(model)
    losses = distill(model, teacher, windows, steps, lr, [d.codebooks for d in decoded.values()],
                     list(norms.values()), seed, progress)
    tuned = {name: retuned(result, decoded[name].codebooks.detach().cpu().numpy()) for name, result in results.items()}
    record = {"steps": steps, "lr": lr, "windows": int(windows.shape[0]),
              "kl_first": float(np.mean(losses[:8])), "kl_last": float(np.mean(losses[-8:]))}
    if log is not None:
        log(f"tuning: KL {record['kl_first']:.4f} over the first 8 steps, {record['kl_last']:.4f} over the last 8")
    return tuned, {name: p.detach().cpu().clone() for name, p in norms.items()}, record
