"""What the quality benchmarks share: their JSON report, and self-sampled calibration made once."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoConfig  # noqa: E402

from claq_convert.quantize.calibration import SELF, calibration_set, sampling_batch, window_counts  # noqa: E402
from claq_convert.cli import machine_info  # noqa: E402
from claq_convert.quantize.convert import load_sampler  # noqa: E402

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


def self_pool(model, tokenizer, count: int, seqlen: int, device, seed: int = 0) -> torch.Tensor:
    """`count` self-sampled windows (`seed`), sampled once and kept as .npy. The first n of them are
    exactly what calibration_set samples for n windows: one seeded stream, drawn batch after batch."""
    path = CACHE / f"self-{SAMPLER}-{count}x{seqlen}-seed{seed}{_model_tag(model)}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path, allow_pickle=False))
    windows = calibration_set((SELF,), tokenizer, lambda: load_sampler(model, device), count, seqlen, seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, windows.numpy(), allow_pickle=False)
    return windows


SELF_POOL = 128  # self-sampled windows kept per model; a calibration takes the first of them
# The sampler's version in the pools' names: "v2" draws by inverse transform, 64 sequences at once
# (calibration.sample_tokens, sampling_batch); the pools without it were drawn by torch.multinomial, 32 at
# once, and are what the bench rows measured before it were calibrated on.
SAMPLER = "v2"


def calibration_for(sources, nsamples: int, seqlen: int, model, tokenizer, device, seed: int = 0) -> torch.Tensor:
    """calibration_set's windows for these sources (SOURCE:N names a count), the self-sampled part taken
    from the cached pool: the same windows claq-convert makes for them (each source seeded by `seed` plus
    its position). Seeds other than 0 keep a pool of just the windows asked for."""
    sources, counts = window_counts(sources, nsamples)
    parts = []
    for position, (source, count) in enumerate(zip(sources, counts)):
        if str(source) == SELF:
            batch = sampling_batch(AutoConfig.from_pretrained(str(model)), seqlen)
            if position or count > SELF_POOL or count % batch:
                raise ValueError(f"the cached pool matches calibration_set for self first, in multiples of {batch} windows")
            parts.append(self_pool(model, tokenizer, SELF_POOL if seed == 0 else count, seqlen, device, seed)[:count])
        else:
            parts.append(calibration_set((source,), tokenizer, None, count, seqlen, seed + position))
    return torch.cat(parts)
