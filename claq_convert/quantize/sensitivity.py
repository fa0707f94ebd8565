"""How much the model's loss cares about each column and each row of each weight: the diagonal Fisher,
summed down columns (for the bit allocation) and along rows (to weigh rows in the codebooks' K-Means).

For a small change dW of a weight, the language-model loss summed over the calibration tokens grows by
about 1/2 sum_ij F_ij dW_ij^2, F the diagonal of the Fisher information (the squared gradient of the
loss, summed over sequences). Quantizing column j to width b changes it by its K-Means error, which
spreads over the column's rows, so the column's cost is about 1/2 * (sum_i F_ij) * SSE_j(b) / rows.
Unlike a layer's own output error, this is in one unit for every weight of the model (nats of loss),
so the allocation can trade bits between an early v_proj and a late down_proj directly.

Along a row the sums say how much the loss cares about that output: within one matrix they spread over
two to four orders of magnitude (attention rows by head and rotary frequency, MLP neurons by use), so the
K-Means of a column, which spans every row, should spend its entries where the costly rows lie
(`row_weights`; SqueezeLLM's sensitivity-weighted K-Means, per column here, with GPTQ unchanged since its
compensation treats each row alike).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..progress import Progress, no_progress

# Windows of the calibration set the gradients are taken over (one backward pass through the whole
# model each).
FISHER_WINDOWS = 16
# The output head's rows are tokens: their sums span eight orders of magnitude on SmolLM2 (a token the
# calibration never has as a target keeps only its tiny predicted probability), and how rare a token is
# in 16 windows says little about a user's text, so the head's weights are the square roots of its sums
# (measured, whole 4-bit SmolLM2: 9.0 / 10.6 / 7.5 / 6.8% on the four texts against 10.0 / 14.3 / 9.0 /
# 7.1% with an unweighted head).
HEAD_ROW_POWER = 0.5
# The least row weight, relative to the matrix's mean: a row no calibration gradient reached keeps a
# voice in its columns' codebooks.
ROW_WEIGHT_FLOOR = 1e-3


@dataclass
class FisherSums:
    columns: dict[str, np.ndarray]  # name -> float64 [in]
    rows: dict[str, np.ndarray]     # name -> float64 [out]
    head: Optional[str] = None      # which name is the output head (its rows are tokens), if any
    tokens: dict[str, int] = field(default_factory=dict)  # an expert's weight -> the tokens routed to it


_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def per_expert_use(sums: FisherSums) -> tuple[FisherSums, int]:
    """(the sums with every expert's as if the experts of its layer were used alike, how many expert weights
    no measured token reached).

    An expert's sums grow with the tokens the calibration routed to it, and which experts a text uses
    depends on the text (code experts, math experts): allocating by the calibration's routing would starve
    the experts its domains happen not to use, and give an unreached expert the narrowest width for every
    column. So each expert's sums are divided by its tokens and multiplied by the mean over its siblings
    (the same matrix of the layer's other experts): what it costs per use, at an even share of the use.
    An unreached expert's columns get its siblings' mean level, evenly (its per-column profile is unknown);
    its rows stay zero (the row weights of its K-Means are then even)."""
    siblings: dict[str, list[str]] = {}
    for name in sums.tokens:
        siblings.setdefault(_EXPERT_INDEX.sub(".experts.*.", name), []).append(name)
    columns, rows, unreached = dict(sums.columns), dict(sums.rows), 0
    for names in siblings.values():
        mean = sum(sums.tokens[n] for n in names) / len(names)
        reached = [n for n in names if sums.tokens[n] > 0]
        for n in reached:
            columns[n] = sums.columns[n] * (mean / sums.tokens[n])
            rows[n] = sums.rows[n] * (mean / sums.tokens[n])
        level = float(np.mean([columns[n].mean() for n in reached])) if reached else 0.0
        for n in names:
            if sums.tokens[n] == 0:
                columns[n] = np.full_like(sums.columns[n], level)
                unreached += 1
    return FisherSums(columns, rows, sums.head, dict(sums.tokens)), unreached


def row_weights(row_sums: np.ndarray, power: float = 1.0) -> np.ndarray:
    """A matrix's Fisher row sums (to `power`) as K-Means weights: mean 1, at least ROW_WEIGHT_FLOOR."""
    sums = np.asarray(row_sums, np.float64) ** power
    mean = float(sums.mean()) if sums.size else 0.0
    if not np.isfinite(mean) or mean <= 0.0:
        return np.ones(sums.shape)
    return np.maximum(sums / mean, ROW_WEIGHT_FLOOR)


def spread_windows(calibration: torch.Tensor, count: int = FISHER_WINDOWS) -> torch.Tensor:
    """`count` windows evenly spaced over the calibration set: its sources are concatenated in order
    (self-sampled first by default), so the first `count` would all come from one source."""
    n = calibration.shape[0]
    if n <= count:
        return calibration
    return calibration[[i * n // count for i in range(count)]]


def weights_by_name(sums: FisherSums) -> dict[str, np.ndarray]:
    """Every measured weight's row weights (row_weights); the head's from the square roots of its sums."""
    return {name: row_weights(rows, HEAD_ROW_POWER if name == sums.head else 1.0) for name, rows in sums.rows.items()}


class SquaredGradients:
    """Folds each weight's gradient, as soon as it is complete, into its squares summed down columns and
    along rows, and lets it go, so at most one weight's gradient is held at a time. One backward pass is
    one term of the sums (the gradient of one window's loss)."""

    def __init__(self, transposed: Callable[[str], bool] = lambda name: False):
        self.transposed = transposed
        self.columns: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def count(self, name: str, module: torch.nn.Module) -> "torch.utils.hooks.RemovableHandle":
        """Count the tokens `module` (an expert's linear, weight `name`) is given."""
        self.tokens.setdefault(name, 0)

        def hook(_module, inputs):
            self.tokens[name] += inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]
        return module.register_forward_pre_hook(hook)

    def watch(self, name: str, param: torch.nn.Parameter) -> "torch.utils.hooks.RemovableHandle":
        """Start summing `param` (stored [out, in], or [in, out] where transposed(name)) under `name`."""
        rows_axis = 1 if self.transposed(name) else 0
        if name not in self.columns:
            self.columns[name] = torch.zeros(param.shape[1 - rows_axis], dtype=torch.float64, device=param.device)
            self.rows[name] = torch.zeros(param.shape[rows_axis], dtype=torch.float64, device=param.device)

        def hook(p):
            squared = p.grad.double().square()
            self.columns[name] += squared.sum(dim=rows_axis)
            self.rows[name] += squared.sum(dim=1 - rows_axis)
            p.grad = None
        param.requires_grad_(True)
        return param.register_post_accumulate_grad_hook(hook)

    def sums(self, head: Optional[str] = None, order: Optional[Sequence[str]] = None) -> FisherSums:
        """The sums so far, named in `order` (default: as first watched)."""
        names = list(self.columns) if order is None else list(order)
        return FisherSums(columns={n: self.columns[n].cpu().numpy() for n in names},
                          rows={n: self.rows[n].cpu().numpy() for n in names}, head=head,
                          tokens={n: self.tokens[n] for n in names if n in self.tokens})


def window_loss(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """One window's summed next-token cross-entropy (logits [1, T, vocab], window [1, T])."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum")


def fisher_sums(model: torch.nn.Module, names: Sequence[str], windows: torch.Tensor,
                transposed: Callable[[str], bool] = lambda name: False,
                progress: Progress = no_progress) -> FisherSums:
    """The squared gradient of each window's summed next-token loss, summed over windows, and then over
    rows (`columns`, [in]) or over columns (`rows`, [out]), for each named weight [out, in] of `model`
    (the model's own parameter names; `transposed(name)` says a parameter is stored [in, out], as GPT-2's
    Conv1D weights are). The whole model at once: the reference for fisher_stream.streamed_fisher_sums,
    which holds one decoder layer at a time."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the model has no parameter {missing[0]}")
    previous = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    squares = SquaredGradients(transposed)
    handles = [squares.watch(n, params[n]) for n in names]
    try:
        for k in progress(range(windows.shape[0]), "measure sensitivity", windows.shape[0]):
            model.zero_grad(set_to_none=True)
            batch = windows[k:k + 1].to(device)
            window_loss(model(batch, use_cache=False).logits, batch).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(previous[n])
    return squares.sums()
