"""Perplexity under the project's fixed protocol (see README): non-overlapping windows of test.txt."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..data import default_text, eval_windows, tokenize_file
from ..progress import Progress, no_progress


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int          # scored next-token predictions
    windows: int
    seqlen: int
    seconds: float
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model, tokenizer, text: Optional[Path] = None, seqlen: int = 512, nwindows: int = 40,
               batch_size: int = 4, progress: Progress = no_progress) -> PerplexityResult:
    """exp(mean next-token cross-entropy) over the first `nwindows` non-overlapping windows."""
    text = Path(text) if text is not None else default_text("test")
    windows = eval_windows(tokenize_file(tokenizer, text), seqlen, nwindows)
    device = next(model.parameters()).device
    start = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    batches = list(windows.split(batch_size))
    for batch in progress(batches, "perplexity", len(batches)):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=windows.shape[0],
                            seqlen=seqlen, seconds=time.perf_counter() - start, text=str(text))
