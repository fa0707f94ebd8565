#!/usr/bin/env python
"""The host side of a batch-1 GEMV launch: what Python spends per call before Triton launches the kernel.

A generation step makes one product per weight (211 for SmolLM2), each a launch of
kernels_triton._gemv_widths_kernel. Here the kernel is replaced by a stub, so only claq-convert's own
Python is timed, on any machine (no GPU needed; Triton's launcher and the driver come on top):

- lut_gemv_streams: the function, which checks every stream and builds the schedule's argument list
  at each call (the schedule itself made beforehand, as the bench of the kernels does);
- gemv_plan: a kernels_triton.GemvPlan made once (as ClaqLinear keeps it), then called: it checks
  only x and y.

Rounds alternate the two; each round times `--calls` calls; medians in microseconds a call, and their
ratio. JSON goes to bench/launch-host.json with the machine.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0" if "--cuda" in sys.argv else "1")  # before triton_lut is imported

import click  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from claq_convert.cli import machine_info  # noqa: E402
from claq_convert.format import spec  # noqa: E402
from claq_convert.kernels import triton_lut as kt  # noqa: E402

# (rows, {bits: columns}): a 7B-class weight with two widths, and a SmolLM2 one with one
SHAPES = {"4096 x 4096, mixed 3/4": (4096, {3: 3072, 4: 1024}), "576 x 576, 4-bit": (576, {4: 576})}


class _StubKernel:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **settings) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **settings: None


def _streams(rows: int, widths: dict, device) -> list:
    streams, first = [], 0
    for b, n in widths.items():
        words = torch.zeros(spec.code_words(n * rows, b), dtype=torch.int32, device=device)
        columns = torch.arange(first, first + n, dtype=torch.int64, device=device)
        streams.append((words, b, torch.zeros(n, 1 << b, device=device), columns))
        first += n
    return streams


def _per_call_us(call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def measure(calls: int, rounds: int, device) -> dict:
    kernel = kt._gemv_widths_kernel
    kt._gemv_widths_kernel = _StubKernel()
    try:
        cases = {}
        for label, (rows, widths) in SHAPES.items():
            streams = _streams(rows, widths, device)
            x = torch.zeros(1, sum(widths.values()), device=device)
            y = torch.zeros(1, rows, device=device)
            schedule = kt.gemv_schedule(widths, rows, device, kt.gemv_widths_config())
            plan = kt.GemvPlan(streams, rows, schedule)
            timed = {"lut_gemv_streams": lambda: kt.lut_gemv_streams(streams, rows, x, y, schedule),
                     "gemv_plan": lambda: plan(x, y)}
            for call in timed.values():  # warm: first calls import and cache
                _per_call_us(call, max(1, calls // 10))
            times = {name: [] for name in timed}
            for _ in range(rounds):
                for name, call in timed.items():
                    times[name].append(_per_call_us(call, calls))
            us = {name: statistics.median(t) for name, t in times.items()}
            cases[label] = {"us": us, "rounds_us": times,
                            "ratio lut_gemv_streams/gemv_plan": us["lut_gemv_streams"] / us["gemv_plan"]}
            click.echo(f"{label}: lut_gemv_streams {us['lut_gemv_streams']:.2f} us a call, GemvPlan "
                       f"{us['gemv_plan']:.2f} us ({cases[label]['ratio lut_gemv_streams/gemv_plan']:.1f}x)")
        return cases
    finally:
        kt._gemv_widths_kernel = kernel


@click.command()
@click.option("--calls", default=20000, show_default=True, help="Calls timed in each round.")
@click.option("--rounds", default=5, show_default=True, help="Rounds, the two paths alternating.")
@click.option("--cuda", is_flag=True, help="Tensors on the GPU (the kernel is still stubbed).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench" / "launch-host.json",
              show_default=True)
def main(calls: int, rounds: int, cuda: bool, out: Path) -> None:
    device = torch.device("cuda" if cuda else "cpu")
    report = {"machine": machine_info(), "device": str(device), "calls": calls, "rounds": rounds,
              "method": "kernels_triton._gemv_widths_kernel replaced by a stub: claq-convert's Python per call "
                        "only, Triton's launcher and the driver not included; medians of the rounds",
              "cases": measure(calls, rounds, device)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
