#!/usr/bin/env python
"""Decode and product throughput of every decoder, and generation speed of a .claq model.

Every quantized weight of FILE (the tied embedding included) is decoded to float32 by the NumPy
reference, the portable Torch decoder and the device's kernels (modules.ClaqLinear.decode); throughput
is reported in GB/s of packed input and of decoded float32 output, beside a memcpy of the decoded
size measured in the same run (the machine is shared: ratios are what to compare). Then one batch-1
product through every weight (the kernels straight from the codes, against F.linear with the decoded
fp32 weights in memory), and greedy generation tokens/s of the .claq model (kernels; the portable
decoder; cache=True) against the fp32 source model, with each one's peak resident memory, and the
time of one forward over a 512-token prompt (the kernels' many-row path) against the fp32 model's.
JSON goes to bench/decode[-<device>].json with the machine.

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
from claq_convert.format.gguf_ext import open_model_file  # noqa: E402
from claq_convert.runtime.modules import ClaqLinear  # noqa: E402
from claq_convert.format.reader import decode_claq  # noqa: E402
from claq_convert.runtime.load import load  # noqa: E402


def best_of(fn, repeat: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def load_rss(path, skeleton_only: bool = False) -> int:
    """Peak RSS of a fresh process that imports the stack, loads `path` and generates 8 tokens (so
    lazily mapped weights and every transient of a generation step are counted). `skeleton_only`: the
    baseline, a process that imports the same code and builds the model's skeleton (parameters on meta)
    but loads no weight; transformers' model code alone is over 100 MiB."""
    import subprocess

    code = ("import sys, torch, transformers, claq_convert.cli as c, claq_convert.kernels.numba_decode\n"
            "from pathlib import Path\n"
            "p, only = Path(sys.argv[1]), sys.argv[2] == '1'\n"
            "if only:\n"
            "    from claq_convert.models.architectures import skeleton\n"
            "    from claq_convert.runtime.load import config_of\n"
            "    skeleton(config_of(p), 'cpu')\n"
            "else:\n"
            "    m, t = c.load_any(p, torch.device('cpu'))\n"
            "    ids = t('Hello, my name is', return_tensors='pt')['input_ids']\n"
            "    with torch.no_grad(): m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)\n"
            "print(c.peak_rss_bytes())")
    out = subprocess.run([sys.executable, "-c", code, str(path), "1" if skeleton_only else "0"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def held_bytes(model) -> int:
    """Bytes of every tensor the model holds (parameters and buffers, packed sections and tables)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def tokens_per_second(model, tokenizer, device, new_tokens: int) -> float:
    ids = tokenizer("The history of the city begins", return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, min_new_tokens=2)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def prompt_seconds(model, device, tokens: int, repeat: int, sync) -> float:
    """Best time of one forward over a prompt of `tokens` random ids (batch rows > 1: decode + matmul)."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        model(ids)  # warm-up
        return best_of(lambda: model(ids), repeat, sync)


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
    decoded = 4 * params  # float32
    fast = {n: ClaqLinear(rows[n], sections[n], device=device) for n in names}
    portable = {n: ClaqLinear(rows[n], sections[n], device=device, kernels="torch") for n in names}
    for n in names[:3]:  # compile the kernels outside the timing, and check them on the way
        assert torch.equal(fast[n].decode().cpu(), torch.from_numpy(decode_claq(rows[n], sections[n])))

    # every decoder writes into fresh memory except "kernels_into_buffer", which reuses one buffer per
    # weight as the memcpy reuses its destination (fresh memory costs page faults, not decoding)
    buffers = {n: torch.empty(sections[n]["bit_widths"].size, rows[n], device=device) for n in names}
    timings = {"numpy": best_of(lambda: [decode_claq(rows[n], sections[n]) for n in names], repeat),
               "torch": best_of(lambda: [portable[n].decode() for n in names], repeat, sync),
               "kernels": best_of(lambda: [fast[n].decode() for n in names], repeat, sync),
               "kernels_into_buffer": best_of(lambda: [fast[n].decode(buffers[n]) for n in names], repeat, sync)}
    del buffers
    # written first: untouched pages all map the kernel's one zero page, and a copy from it reads the cache
    src = torch.ones(decoded, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = best_of(lambda: dst.copy_(src), repeat, sync)
    del src, dst
    report = {"file": str(file), "device": str(device), "machine": machine_info(), "tensors": len(names),
              "params": params, "packed_bytes": packed, "decoded_fp32_bytes": decoded,
              "memcpy_fp32_size": {"seconds": t_copy, "GBps": decoded / t_copy / 1e9}, "decode": {}}
    click.echo(f"{len(names)} weights, {params} params, {packed / 1e6:.1f} MB packed -> {decoded / 1e6:.1f} MB fp32")
    click.echo(f"memcpy {decoded / 1e6:.0f} MB: {t_copy:.4f} s ({decoded / t_copy / 1e9:.1f} GB/s)")
    for key, t in timings.items():
        r = report["decode"][key] = {"seconds": t, "packed_GBps": packed / t / 1e9, "decoded_GBps": decoded / t / 1e9,
                                     "share_of_memcpy": t_copy / t}
        click.echo(f"decode {key:19s} {t:.3f} s: {r['packed_GBps']:.2f} GB/s packed, {r['decoded_GBps']:.2f} GB/s "
                   f"decoded = {100 * r['share_of_memcpy']:.1f}% of a memcpy of the decoded size")

    xs = {n: torch.randn(1, sections[n]["bit_widths"].size, device=device) for n in names}
    weights = {n: fast[n].decode().contiguous() for n in names}
    with torch.no_grad():
        t_product = best_of(lambda: [fast[n](xs[n]) for n in names], repeat, sync)
        t_fp32 = best_of(lambda: [torch.nn.functional.linear(xs[n], weights[n]) for n in names], repeat, sync)
    del weights
    report["batch1_product"] = {"kernels_seconds": t_product, "fp32_matmul_seconds": t_fp32,
                                "kernels_over_fp32_speed": t_fp32 / t_product}
    click.echo(f"batch-1 product through every weight: kernels {t_product * 1e3:.1f} ms, fp32 F.linear "
               f"{t_fp32 * 1e3:.1f} ms ({t_fp32 / t_product:.2f}x fp32's speed)")
    del fast, portable

    g = report["generation"] = {}
    held = report["held_weight_bytes"] = {}
    for key, options in (("claq", {}), ("claq_portable", {"kernels": "torch"}), ("claq_cached", {"cache": True})):
        model, tokenizer = load(file, device=device, **options)
        g[key + "_tokens_per_s"] = tokens_per_second(model, tokenizer, device, new_tokens)
        if key == "claq":
            g["claq_prompt_512_seconds"] = prompt_seconds(model, device, 512, repeat, sync)
        held[key] = held_bytes(model) + sum(m._weight.numel() * 4 for m in model.modules()
                                            if isinstance(m, ClaqLinear) and m._weight is not None)
        del model
    fp32, _ = load_hf(source, device)
    g["fp32_tokens_per_s"] = tokens_per_second(fp32, tokenizer, device, new_tokens)
    g["fp32_prompt_512_seconds"] = prompt_seconds(fp32, device, 512, repeat, sync)
    held["fp32"] = held_bytes(fp32)
    del fp32
    click.echo(f"generation tok/s: claq {g['claq_tokens_per_s']:.1f}, portable decoder {g['claq_portable_tokens_per_s']:.1f}, "
               f"cached {g['claq_cached_tokens_per_s']:.1f}, fp32 {g['fp32_tokens_per_s']:.1f} "
               f"({g['claq_tokens_per_s'] / g['fp32_tokens_per_s']:.2f}x fp32)")
    click.echo(f"a 512-token prompt's forward: claq {g['claq_prompt_512_seconds']:.3f} s, fp32 "
               f"{g['fp32_prompt_512_seconds']:.3f} s ({g['fp32_prompt_512_seconds'] / g['claq_prompt_512_seconds']:.2f}x fp32's speed)")
    click.echo("weights held: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in held.items())
               + f" (claq {held['claq'] / held['fp32']:.2f}x fp32)")
    if device.type == "cpu":
        rss = report["peak_rss_bytes"] = {"claq_skeleton_only": load_rss(file, skeleton_only=True),
                                          "claq_load_and_generate": load_rss(file),
                                          "fp32_skeleton_only": load_rss(source, skeleton_only=True),
                                          "fp32_load_and_generate": load_rss(source)}
        claq = rss["claq_load_and_generate"] - rss["claq_skeleton_only"]
        fp = rss["fp32_load_and_generate"] - rss["fp32_skeleton_only"]
        report["peak_rss_above_skeleton_over_fp32"] = claq / fp
        click.echo(f"peak RSS above a process that builds the skeleton only: .claq {claq / 2**20:.0f} MiB, "
                   f"fp32 {fp / 2**20:.0f} MiB ({claq / fp:.2f}x); file {Path(file).stat().st_size / 2**20:.0f} MiB")
    out = out or ROOT / "bench" / ("decode.json" if device.type == "cpu" else f"decode-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
