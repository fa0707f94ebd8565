"""Text for calibration and evaluation: where it is found and how it is cut into token windows."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

# The shared WikiText-2 copy sits beside the checkout; CLAQ_DATA overrides it.
_DATA_CANDIDATES = [Path(os.environ["CLAQ_DATA"])] if os.environ.get("CLAQ_DATA") else []
_DATA_CANDIDATES += [Path.cwd() / ".." / "shared" / "data" / "wikitext-2",
                     Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"]


class DataError(Exception):
    """Text could not be found or is too short; the message says what to pass instead."""


def default_text(split: str) -> Path:
    """`valid.txt` (calibration) or `test.txt` (evaluation) of the shared WikiText-2, or a clear error."""
    for directory in _DATA_CANDIDATES:
        path = directory / f"{split}.txt"
        if path.is_file():
            return path.resolve()
    raise DataError(f"no text given and WikiText-2 {split}.txt not found in "
                    + ", ".join(str(d) for d in _DATA_CANDIDATES)
                    + "; pass a text file (or set CLAQ_DATA to a folder holding it)")


def tokenize_file(tokenizer, path: Path) -> torch.Tensor:
    """All of the file's text as one 1-D LongTensor of token ids, without special tokens."""
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, path: Optional[Path] = None, nsamples: int = 32, seqlen: int = 512,
                        seed: int = 0) -> torch.Tensor:
    """`nsamples` random `seqlen`-token windows (seeded) from a text file: LongTensor [nsamples, seqlen]."""
    path = Path(path) if path is not None else default_text("valid")
    ids = tokenize_file(tokenizer, path)
    if ids.numel() <= seqlen:
        raise DataError(f"{path} has {ids.numel()} tokens, fewer than one {seqlen}-token window")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int = 512, nwindows: int = 40) -> torch.Tensor:
    """Non-overlapping `seqlen` windows from the start of `ids`, the first `nwindows` of them."""
    available = ids.numel() // seqlen
    if available == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one {seqlen}-token window")
    n = available if nwindows <= 0 else min(nwindows, available)
    return ids[: n * seqlen].view(n, seqlen)
