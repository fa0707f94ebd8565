#!/usr/bin/env python
"""Decode throughput of the NumPy and Torch decoders, and generation speed of a .claq model.

Every quantized weight of FILE is decoded by each decoder; throughput is reported in GB/s of packed
input (the sections' bytes) and of decoded output counted as fp16, beside a memcpy of the same sizes
measured in the same run (the machine is shared: ratios are what to compare). Then greedy generation
tokens/s of the .claq model (ClaqLinear decoding at every step, and with cache=True) against the fp32
source model. JSON goes to bench/decode[-<device>].json with the machine.

    python tools/bench_decode.py out/smollm2-claq-4+0.claq [--source MODEL_DIR] [--device cuda]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from claq_convert.cli import load_hf, machine_info  # noqa: E402
from claq_convert.gguf_ext import open_model_file  # noqa: E402
from claq_convert.reader import decode_claq  # noqa: E402
from claq_convert.runtime import load  # noqa: E402
from claq_convert.torch_decoder import ClaqLayout, decode_claq as torch_decode, to_torch  # noqa: E402


def best_of(fn, repeat: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def load_rss(path) -> int:
    """Peak RSS of a fresh process that imports the stack, loads `path` and runs one short forward pass
    (so lazily mapped weights are counted too); None: imports only."""
    import subprocess

    code = ("import sys, torch, transformers, claq_convert.cli as c\n"
            "p = sys.argv[1]\n"
            "if p:\n"
            "    m, t = c.load_any(__import__('pathlib').Path(p), torch.device('cpu'))\n"
            "    with torch.no_grad(): m(t('Hello', return_tensors='pt')['input_ids'])\n"
            "print(c.peak_rss_bytes())")
    out = subprocess.run([sys.executable, "-c", code, str(path or "")], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def tokens_per_second(model, tokenizer, device, new_tokens: int) -> float:
    ids = tokenizer("The history of the city begins", return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, min_new_tokens=2)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The fp32 model it came from (default: the path in the file's conversion record).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--repeat", default=3, show_default=True)
@click.option("--new-tokens", default=32, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(file, source, device, repeat, new_tokens, out):
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    with open_model_file(file) as cf:
        names = [n for n, t in cf.tensors.items() if t["kind"] == "claq"]
        sections = {n: {k: np.array(v) for k, v in cf.sections(n).items()} for n in names}
        rows = {n: cf.tensors[n]["shape"][0] for n in names}
        source = source or Path(cf.metadata["conversion"]["model"])
    packed = sum(a.nbytes for s in sections.values() for a in s.values())
    params = sum(rows[n] * sections[n]["bit_widths"].size for n in names)
    decoded_fp16 = 2 * params
    on_device = {n: {k: to_torch(v, device) for k, v in s.items()} for n, s in sections.items()}
    layouts = {n: ClaqLayout(sections[n]["bit_widths"], device) for n in names}

    t_numpy = best_of(lambda: [decode_claq(rows[n], sections[n]) for n in names], repeat)
    t_torch = best_of(lambda: [torch_decode(rows[n], on_device[n], layouts[n], torch.float16) for n in names],
                      repeat, sync)
    src = torch.empty(decoded_fp16, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = best_of(lambda: dst.copy_(src), repeat, sync)
    report = {"file": str(file), "device": str(device), "machine": machine_info(), "tensors": len(names),
              "params": params, "packed_bytes": packed, "decoded_fp16_bytes": decoded_fp16,
              "numpy": {"seconds": t_numpy, "packed_GBps": packed / t_numpy / 1e9, "decoded_GBps": decoded_fp16 / t_numpy / 1e9},
              "torch": {"seconds": t_torch, "packed_GBps": packed / t_torch / 1e9, "decoded_GBps": decoded_fp16 / t_torch / 1e9},
              "memcpy_fp16_size": {"seconds": t_copy, "GBps": decoded_fp16 / t_copy / 1e9}}
    report["torch"]["over_memcpy"] = t_torch / t_copy
    report["numpy"]["over_memcpy"] = t_numpy / t_copy
    click.echo(f"{len(names)} weights, {params} params, {packed / 1e6:.1f} MB packed -> {decoded_fp16 / 1e6:.1f} MB fp16")
    for key in ("numpy", "torch"):
        r = report[key]
        click.echo(f"{key:6s} decode {r['seconds']:.3f} s: {r['packed_GBps']:.2f} GB/s packed, "
                   f"{r['decoded_GBps']:.2f} GB/s decoded ({r['over_memcpy']:.1f}x a memcpy of the decoded size)")
    click.echo(f"memcpy {decoded_fp16 / 1e6:.0f} MB: {t_copy:.4f} s ({report['memcpy_fp16_size']['GBps']:.1f} GB/s)")

    report["peak_rss_bytes"] = {"python_torch_transformers": load_rss(None), "claq_load_and_forward": load_rss(file),
                                "fp32_load_and_forward": load_rss(source)}
    model, tokenizer = load(file, device=device)
    report["generation"] = {"claq_tokens_per_s": tokens_per_second(model, tokenizer, device, new_tokens)}
    del model
    cached, _ = load(file, device=device, cache=True)
    report["generation"]["claq_cached_tokens_per_s"] = tokens_per_second(cached, tokenizer, device, new_tokens)
    del cached
    fp32, _ = load_hf(source, device)
    report["generation"]["fp32_tokens_per_s"] = tokens_per_second(fp32, tokenizer, device, new_tokens)
    g = report["generation"]
    report["fp32_weight_bytes"] = sum(p.numel() * p.element_size() for p in fp32.parameters())
    click.echo(f"generation: claq {g['claq_tokens_per_s']:.1f} tok/s, claq cached {g['claq_cached_tokens_per_s']:.1f}, "
               f"fp32 {g['fp32_tokens_per_s']:.1f} ({g['claq_tokens_per_s'] / g['fp32_tokens_per_s']:.2f}x)")
    rss = {k: v / 2**20 for k, v in report["peak_rss_bytes"].items()}
    click.echo(f"peak RSS of a process that loads nothing {rss['python_torch_transformers']:.0f} MiB; that loads "
               f"and runs the .claq model {rss['claq_load_and_forward']:.0f} MiB, the fp32 model "
               f"{rss['fp32_load_and_forward']:.0f} MiB; "
               f"fp32 weights {report['fp32_weight_bytes'] / 2**20:.0f} MiB, file {Path(file).stat().st_size / 2**20:.0f} MiB")
    out = out or ROOT / "bench" / ("decode.json" if device.type == "cpu" else f"decode-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
