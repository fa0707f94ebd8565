"""How much the model's loss cares about each column of each weight: the diagonal Fisher, summed down columns.

For a small change dW of a weight, the language-model loss summed over the calibration tokens grows by
about 1/2 sum_ij F_ij dW_ij^2, F the diagonal of the Fisher information (the squared gradient of the
loss, summed over sequences). Quantizing column j to width b changes it by its K-Means error, which
spreads over the column's rows, so the column's cost is about 1/2 * (sum_i F_ij) * SSE_j(b) / rows.
Unlike a layer's own output error, this is in one unit for every weight of the model (nats of loss),
so the allocation can trade bits between an early v_proj and a late down_proj directly.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .progress import Progress, no_progress

# Windows of the calibration set the gradients are taken over (one backward pass through the whole
# model each).
FISHER_WINDOWS = 16


def spread_windows(calibration: torch.Tensor, count: int = FISHER_WINDOWS) -> torch.Tensor:
    """`count` windows evenly spaced over the calibration set: its sources are concatenated in order
    (self-sampled first by default), so the first `count` would all come from one source."""
    n = calibration.shape[0]
    if n <= count:
        return calibration
    return calibration[[i * n // count for i in range(count)]]


def column_fisher(model: torch.nn.Module, names: Sequence[str], windows: torch.Tensor,
                  transposed: Callable[[str], bool] = lambda name: False,
                  progress: Progress = no_progress) -> dict[str, np.ndarray]:
    """name -> float64 [in]: sum over windows and rows of the squared gradient of the window's summed
    next-token loss, for each named weight [out, in] of `model` (the model's own parameter names;
    `transposed(name)` says a parameter is stored [in, out], as GPT-2's Conv1D weights are)."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the model has no parameter {missing[0]}")
    wanted = set(names)
    previous = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in wanted)
    device = next(model.parameters()).device
    rows_axis = {n: 1 if transposed(n) else 0 for n in names}
    sums = {n: torch.zeros(params[n].shape[1 - rows_axis[n]], dtype=torch.float64, device=device) for n in names}
    try:
        for k in progress(range(windows.shape[0]), "measure sensitivity", windows.shape[0]):
            model.zero_grad(set_to_none=True)
            batch = windows[k:k + 1].to(device)
            logits = model(batch, use_cache=False).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, batch[0, 1:], reduction="sum")
            loss.backward()
            for n in names:
                sums[n] += params[n].grad.double().square().sum(dim=rows_axis[n])
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(previous[n])
    return {n: s.cpu().numpy() for n, s in sums.items()}
