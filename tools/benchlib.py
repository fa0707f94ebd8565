"""What the quality benchmarks share: their JSON report, and self-sampled calibration made once."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from claq_convert.calibration import SELF, calibration_set, window_counts  # noqa: E402
from claq_convert.cli import machine_info  # noqa: E402
from claq_convert.convert import load_sampler  # noqa: E402

CACHE = ROOT / "out" / "calibration-cache"


def selected(only, configs: dict) -> list[str]:
    """The configurations to run: those named with --only (checked), else all."""
    import click

    names = list(only) or list(configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise click.UsageError(f"unknown configuration(s) {unknown}; known: {', '.join(configs)}")
    return names


def open_report(out: Path, resume: bool, model, texts: dict) -> dict:
    """The report to extend: the one at `out` when resuming (its fp32 results are reused), else a new one."""
    report = json.loads(out.read_text()) if resume and out.is_file() else {}
    report.update(machine=machine_info(), model=str(model),
                  protocol={"texts": {k: str(v) for k, v in texts.items()}, "seqlen": 512, "windows": 40})
    report.setdefault("runs", {})
    report.setdefault("ppl_fp32", {})
    return report


def _model_tag(model) -> str:
    """'' for the fixture (the cache files made before the permuted twin existed), else '-<dir name>'."""
    from claq_convert.fixture import DEFAULT_FIXTURE_DIR

    return "" if Path(model).resolve() == DEFAULT_FIXTURE_DIR.resolve() else f"-{Path(model).name}"


def self_pool(model, tokenizer, count: int, seqlen: int, device) -> torch.Tensor:
    """`count` self-sampled windows (seed 0), sampled once and kept as .npy. The first n of them are
    exactly what calibration_set samples for n windows: one seeded stream, drawn batch after batch."""
    path = CACHE / f"self-{count}x{seqlen}-seed0{_model_tag(model)}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path, allow_pickle=False))
    windows = calibration_set((SELF,), tokenizer, lambda: load_sampler(model, device), count, seqlen, 0)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, windows.numpy(), allow_pickle=False)
    return windows


SELF_POOL = 128  # self-sampled windows kept per model; a calibration takes the first of them


def calibration_for(sources, nsamples: int, seqlen: int, model, tokenizer, device) -> torch.Tensor:
    """calibration_set's windows for these sources (SOURCE:N names a count), the self-sampled part taken
    from the cached pool: the same windows claq-convert makes for them (each source seeded by its position)."""
    sources, counts = window_counts(sources, nsamples)
    parts = []
    for position, (source, count) in enumerate(zip(sources, counts)):
        if str(source) == SELF:
            if position or count > SELF_POOL or count % 32:
                raise ValueError("the cached pool matches calibration_set for self first, in multiples of 32 windows")
            parts.append(self_pool(model, tokenizer, SELF_POOL, seqlen, device)[:count])
        else:
            parts.append(calibration_set((source,), tokenizer, None, count, seqlen, position))
    return torch.cat(parts)
