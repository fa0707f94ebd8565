#!/usr/bin/env python
"""What the default calibration's self-sampled windows cost for a 7B-class model, on this machine.

`claq-convert` calibrates by default on 64 windows of 512 tokens the model writes itself
(calibration.sample_windows): the whole model runs once for every token, `sampling_batch` sequences at
once, each holding a KV cache of every layer. tools/bench_scale.py measures everything else of a 7B
conversion and calibrates on text; this tool measures the sampling. It builds Llama-2-7B-shaped models
(bench_scale.build_model: fp16 safetensors, random weights) with 1 and 2 decoder layers, loads each as
the CLI does (convert.load_sampler: bfloat16 on the CPU), times one batch of windows at each batch size,
and projects the default's 64 windows for 32 layers from the slope between the two depths
(time = outside + layers * per layer). Memory: the sampler's weights and a batch's KV cache, from their
sizes (the weights of 32 layers are not built here).

    python tools/bench_sampling.py                       # -> bench/sampling-cpu.json
    python tools/bench_sampling.py --smoke --out /tmp/s.json   # tiny shapes, seconds
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_scale import LLAMA2_7B, SMOKE, build_model, echo, machine_info  # noqa: E402
from claq_convert.quantize.calibration import (  # noqa: E402
    DEFAULT_NSAMPLES, cache_bytes_per_sequence, default_sources, first_token_candidates, sample_windows,
    sampling_batch, self_windows)
from claq_convert.quantize.convert import load_sampler  # noqa: E402

DEPTHS = (1, 2)


def time_batch(model, first_tokens, batch: int, seqlen: int) -> float:
    """Seconds to sample one batch of `batch` windows of `seqlen` tokens."""
    start = time.perf_counter()
    sample_windows(model, first_tokens, batch, seqlen, seed=0, batch_size=batch)
    return time.perf_counter() - start


def project(runs: dict, batches: list[int], windows: int, layers: int, config_7b, seqlen: int, dtype) -> dict:
    """Every batch size's time for `windows` windows of a `layers`-layer model, from the two depths."""
    out = {}
    for batch in batches:
        shallow, deep = runs[f"layers {DEPTHS[0]}, batch {batch}"], runs[f"layers {DEPTHS[1]}, batch {batch}"]
        per_layer = (deep - shallow) / (DEPTHS[1] - DEPTHS[0])
        outside = shallow - DEPTHS[0] * per_layer  # embedding, head, sampling the token
        per_batch = outside + layers * per_layer
        seconds = math.ceil(windows / batch) * per_batch
        out[str(batch)] = {"seconds_per_layer_per_batch": per_layer, "seconds_outside_layers_per_batch": outside,
                           "seconds": seconds, "hours": seconds / 3600,
                           "ms_per_token": per_batch / (batch * (seqlen - 1)) * 1e3,
                           "kv_cache_bytes": batch * cache_bytes_per_sequence(config_7b, seqlen, dtype)}
    return out


@click.command()
@click.option("--batches", default="8,16,32,64", show_default=True, help="Sequences sampled at once, comma-separated.")
@click.option("--seqlen", type=click.IntRange(16), default=None, help="Tokens per window [512; --smoke 64].")
@click.option("--smoke", is_flag=True, help="Tiny shapes (hidden 64): checks the tool end to end in seconds.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the temporary models are built [the system's temporary folder].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON report [bench/sampling-cpu.json].")
def main(batches, seqlen, smoke, workdir, out):
    """Time self-sampled calibration on Llama-2-7B-shaped layers and project the default's 64 windows."""
    from transformers import AutoConfig, AutoTokenizer

    device = torch.device("cpu")
    out = out or ROOT / "bench" / "sampling-cpu.json"
    shape = SMOKE if smoke else LLAMA2_7B
    seqlen = seqlen or (64 if smoke else 512)
    batches = sorted({int(b) for b in batches.split(",") if b.strip()})
    windows = self_windows(default_sources(), DEFAULT_NSAMPLES)  # the CLI default's: 64 of 96
    report = {"tool": "tools/bench_sampling.py", "machine": machine_info(device),
              "settings": {"seqlen": seqlen, "batches": batches, "depths": list(DEPTHS), "smoke": smoke,
                           "default_self_windows": windows}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="claq-sampling-", dir=workdir) as tmp:
        for depth in DEPTHS:
            model_dir = Path(tmp) / f"layers-{depth}"
            report.setdefault("models", {})[str(depth)] = build_model(model_dir, shape, depth)
            model = load_sampler(model_dir, device)
            dtype = next(model.parameters()).dtype
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            first = first_token_candidates(tokenizer, model.get_output_embeddings().weight.shape[0])
            time_batch(model, first, 1, 8)  # warm up: first calls allocate and pick kernels
            for batch in batches:
                seconds = time_batch(model, first, batch, seqlen)
                report["runs"][f"layers {depth}, batch {batch}"] = seconds
                echo(f"{depth} layer(s), {batch} sequences: {seconds:.1f} s a batch of {seqlen} tokens")
            del model
        config = AutoConfig.from_pretrained(str(model_dir))
    full = AutoConfig.for_model(shape["model_type"], **{**{k: v for k, v in shape.items() if k != "model_type"},
                                                     "vocab_size": config.vocab_size})
    report["sampler_dtype"] = str(dtype).replace("torch.", "")
    report["cli_batch"] = sampling_batch(full, seqlen, dtype)
    report["weights_bytes_32_layers"] = report["models"]["1"]["parameters"] * dtype.itemsize + (
        full.num_hidden_layers - 1) * (report["models"]["2"]["parameters"] - report["models"]["1"]["parameters"]) * dtype.itemsize
    report["projection"] = project(report["runs"], batches, windows, full.num_hidden_layers, full, seqlen, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for batch, p in report["projection"].items():
        click.echo(f"batch {batch}: {windows} windows of 32 layers {p['hours']:.2f} h, "
                   f"KV cache {p['kv_cache_bytes'] / 2**30:.2f} GiB")
    click.echo(f"the CLI samples {report['cli_batch']} at once; weights {report['weights_bytes_32_layers'] / 2**30:.1f} GiB"
               f" -> {out}")


if __name__ == "__main__":
    main()
