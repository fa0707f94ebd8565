#!/usr/bin/env python
"""CLAQ weights on a CUDA GPU: the Triton LUT product and decode kernels against cuBLAS on the fp16 weight.

For synthetic weights (random codes, random sorted fp16 codebooks per column) of 7B-class and SmolLM2
shapes, each all 4-bit and mixed 3/4-bit (a quarter of the columns at 4 bits: two streams), and batches
M = 1, 4, 16, it times in one run:

- fp16_linear: F.linear(x, W) with the decoded fp16 weight (cuBLAS), the speed to beat;
- lut: kernels_triton.lut_matmul_stream over every stream into a zeroed fp32 y (the zeroing included);
  at M = 1 that is the GEMV kernel, one launch a stream; lut_tiles: the tile kernel it replaced there
  (block_r=128); lut_one_launch: a kernels_triton.GemvPlan, every stream in one launch, its checks,
  schedule and arguments made beforehand (as ClaqLinear keeps it), with the settings the benchmark chose (below);
- decode_linear: kernels_triton.decode_stream to fp16 W^T, then F.linear;
- decode: the decode kernel alone; torch_decoder: torch_decoder.decode_claq to fp16;
- copy: a device-to-device copy of the fp16 weight's bytes (the bandwidth ceiling of a decode).

Each kernel is checked against the fp32 reference of spec.unpack_codes once before timing. Times are
medians of triton.testing.do_bench in microseconds, which flushes L2 before every call (a decode step
reads each layer's weight once, from HBM) and queues the call behind that flush (Python launch overhead
is hidden unless it exceeds the flush). Effective GB/s count the bytes an ideal kernel must move:
fp16_linear reads the fp16 weight; lut reads the packed weight (code words, fp16 codebooks, widths);
decode reads it and writes the fp16 W^T; decode_linear writes and reads W^T once more; copy reads and writes.
JSON goes to bench/decode-cuda.json with the machine. Only torch, triton, numpy and claq_convert's spec,
torch_decoder and kernels_triton are imported: the GPU machine needs nothing else.

With --sweep it first times the GEMV kernel alone, stream by stream (4-bit and 3-bit, 7B shapes), over a
grid of its launch settings (kernels_triton.gemv_config), and records every time and the best.
With --sweep-widths it first times the one-launch GEMV on whole weights (7B shapes, 4-bit and 3/4) over a
list of its settings (kernels_triton.gemv_widths_config: WIDTHS_GRID), chooses the setting with the least
geometric mean of its CUDA-graph time over cuBLAS's on those weights, and uses it for lut_one_launch (else
the module's defaults). It writes the settings, every time, the first setting timed again at the end of
each weight (how far one setting moves within a run) and the choice to *-sweep.json beside the output;
--sweep-only stops there.

"graph" entries replay one call per copy of the weight as one CUDA graph, the copies together over twice
the L2 cache: no launch gaps (do_bench counts the Python launch path whenever it outlasts the L2 flush),
and every weight read from HBM.

    python tools/bench_decode_cuda.py [--out PATH] [--sweep] [--sweep-widths [--sweep-only]]
    TRITON_INTERPRET=1 python tools/bench_decode_cuda.py --smoke [--out PATH]   # tiny shapes, CPU, end to end
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from claq_convert.format import spec  # noqa: E402
from claq_convert.runtime import torch_decoder  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "decode-cuda.json"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008),  # 7B-class: q/k/v/o, gate/up, down (rows x C)
          (576, 576), (1536, 576), (576, 1536)]        # SmolLM2-135M
SMOKE_SHAPES = [(64, 48), (29, 40)]                    # aligned and unaligned code layouts
BATCHES = (1, 4, 16)
MIXES = ("4", "3/4")  # all columns at 4 bits; a quarter at 4 and the rest at 3


class SyntheticWeight:
    """A random CLAQ weight W[rows, C] without outliers: its streams on the device, the sections
    torch_decoder.decode_claq reads, and the fp32 reference W^T from spec.unpack_codes (NumPy)."""

    def __init__(self, rng: np.random.Generator, rows: int, C: int, mix: str, device: torch.device):
        widths = np.full(C, 4, np.uint8)
        if mix == "3/4":
            widths[:] = 3
            widths[rng.permutation(C)[: C // 4]] = 4
        self.rows, self.C, self.widths = rows, C, widths
        self.Wt = np.empty((C, rows), np.float32)
        offsets = spec.codebook_offsets(widths)
        codebooks = np.empty(offsets[-1], np.float16)
        self.streams, self.sections = [], {}
        for b in np.unique(widths).tolist():
            columns = spec.columns_of_width(widths, b)
            n_codes = columns.size * rows
            words = rng.integers(0, 1 << 32, spec.code_words(n_codes, b), dtype=np.uint32)  # random bits: random codes
            unused = words.size * spec.WORD_BITS - n_codes * b
            words[-1] &= np.uint32((1 << (spec.WORD_BITS - unused)) - 1)  # the file's padding bits are zero
            table = np.sort(rng.standard_normal((columns.size, 1 << b)) * 0.02, axis=1).astype(np.float16)
            codes = spec.unpack_codes(words, b, n_codes).reshape(columns.size, rows)
            self.Wt[columns] = np.take_along_axis(table.astype(np.float32), codes.astype(np.intp), 1)
            codebooks[offsets[columns][:, None] + np.arange(1 << b)] = table
            words_t = torch.from_numpy(words.view(np.int32)).to(device)
            self.sections[spec.code_section(b)] = words_t
            self.streams.append((words_t, b, torch.from_numpy(table.astype(np.float32)).to(device),
                                 torch.from_numpy(columns).to(device), rows))
        self.sections["codebooks"] = torch.from_numpy(codebooks).to(device)
        self.layout = torch_decoder.ClaqLayout(widths, device)
        self.packed_bytes = sum(spec.claq_section_lengths(rows, widths, 0).values())


def check(name: str, ok: bool, failures: list[str], detail: str = "") -> bool:
    if not ok:
        failures.append(f"{name}: {detail}" if detail else name)
    return ok


def timer(device: torch.device, warmup_ms: int, rep_ms: int):
    """fn -> median microseconds: do_bench on CUDA; on the CPU (smoke) a few wall-clock runs."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: 1e3 * do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")

    def wall(fn, repeat=3):
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e6 * statistics.median(times)
    return wall


def graph_timer(device: torch.device, replays: int = 25):
    """calls -> median microseconds a call, the calls replayed as one CUDA graph (no host launch cost
    between them). Each call works on its own copy of the weight and the copies together exceed the
    L2 cache (copies()), so every call reads its weight from HBM, as a decode step goes layer by layer.
    On the CPU (smoke) the calls run one after another, timed by the wall clock."""
    def measure(calls) -> float:
        for call in calls:
            call()  # compile, warm up
        if device.type != "cuda":
            start = time.perf_counter()
            for call in calls:
                call()
            return 1e6 * (time.perf_counter() - start) / len(calls)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(1e3 * start.elapsed_time(end) / len(calls))
        del graph
        return statistics.median(times)
    return measure


def copies(nbytes: int, device: torch.device) -> int:
    """How many copies of nbytes together take at least twice the L2 cache (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    return max(2, -(-2 * l2 // nbytes))


def stream_copies(weight: SyntheticWeight, device: torch.device) -> list[list[tuple]]:
    """Copies of the weight's streams (words, bits, tables, columns), enough to exceed the L2 cache."""
    return [[(w.clone(), b, t.clone(), c.clone()) for w, b, t, c, _ in weight.streams]
            for _ in range(copies(weight.packed_bytes, device))]


def run_case(weight: SyntheticWeight, device, time_us, failures: list[str], seed: int,
             one_launch: dict | None = None, graph_us=None) -> dict:
    from claq_convert.kernels import triton_lut as kt

    rows, C = weight.rows, weight.C
    label = f"{rows}x{C} {'+'.join(map(str, sorted(set(weight.widths.tolist()))))}-bit"
    fp16_bytes = 2 * rows * C
    W16 = torch.from_numpy(weight.Wt.T.copy()).to(device=device, dtype=torch.float16)  # nn.Linear's layout
    out16 = torch.empty(C, rows, dtype=torch.float16, device=device)
    copy_dst = torch.empty_like(W16)

    def decode(out):
        for s in weight.streams:
            kt.decode_stream(*s, out)

    def torch_decode():
        return torch_decoder.decode_claq(rows, weight.sections, weight.layout, torch.float16)

    # correctness, once: decode exact in fp32 and fp16, the torch decoder too, the LUT to fp32 rounding
    out32 = torch.full((C, rows), float("nan"), device=device)
    decode(out32)
    check(f"{label} decode fp32", np.array_equal(out32.cpu().numpy(), weight.Wt), failures)
    decode(out16)
    check(f"{label} decode fp16", torch.equal(out16.cpu(), torch.from_numpy(weight.Wt).half()), failures)
    check(f"{label} torch_decoder", torch.equal(torch_decode().T.cpu(), torch.from_numpy(weight.Wt).half()), failures)
    del out32

    g = torch.Generator().manual_seed(seed)
    result = {"rows": rows, "C": C, "widths": {str(b): int(np.count_nonzero(weight.widths == b))
                                               for b in np.unique(weight.widths).tolist()},
              "packed_bytes": weight.packed_bytes, "fp16_bytes": fp16_bytes, "batches": {}}
    us = {"decode": time_us(lambda: decode(out16)), "torch_decoder": time_us(torch_decode),
          "copy": time_us(lambda: copy_dst.copy_(W16))}
    result["us"] = us
    result["gbps"] = {"decode": (weight.packed_bytes + fp16_bytes) / us["decode"] / 1e3,
                      "torch_decoder": (weight.packed_bytes + fp16_bytes) / us["torch_decoder"] / 1e3,
                      "copy": 2 * fp16_bytes / us["copy"] / 1e3}
    result["ratios"] = {"decode/copy": us["decode"] / us["copy"],
                        "torch_decoder/decode": us["torch_decoder"] / us["decode"]}
    print(f"{label}: decode {us['decode']:.1f} us, torch_decoder {us['torch_decoder']:.1f} us, "
          f"copy {us['copy']:.1f} us", flush=True)

    Wt64 = weight.Wt.astype(np.float64)
    for M in BATCHES:
        x = torch.randn(M, C, generator=g).to(device=device, dtype=torch.float16)
        y = torch.empty(M, rows, device=device)

        def lut():
            y.zero_()
            for s in weight.streams:
                kt.lut_matmul_stream(*s, x, y)

        lut()
        xs = x.cpu().double().numpy()
        error = np.abs(y.cpu().numpy() - xs @ Wt64)
        bound = 2 * C * 2.0 ** -24 * (np.abs(xs) @ np.abs(Wt64)) + 1e-30
        check(f"{label} lut M={M}", bool(np.all(error <= bound)), failures,
              f"error/bound {float((error / bound).max()):.3g}")

        t = {"fp16_linear": time_us(lambda: torch.nn.functional.linear(x, W16)), "lut": time_us(lut),
             "decode_linear": time_us(lambda: (decode(out16), torch.nn.functional.linear(x, out16.T)))}
        if M == 1:
            def lut_tiles():
                y.zero_()
                for s in weight.streams:
                    kt.lut_matmul_stream(*s, x, y, block_r=128)

            lut_tiles()
            error = np.abs(y.cpu().numpy() - xs @ Wt64)
            check(f"{label} lut_tiles M=1", bool(np.all(error <= bound)), failures)
            t["lut_tiles"] = time_us(lut_tiles)
        if M == 1 and all(rows * s[1] % spec.WORD_BITS == 0 for s in weight.streams):  # word-aligned streams
            streams = [(w, b, tables, columns) for w, b, tables, columns, _ in weight.streams]
            schedule = kt.gemv_schedule({b: int(c.numel()) for _, b, _, c in streams}, rows, device,
                                        kt.gemv_widths_config(**(one_launch or {})))

            plan = kt.GemvPlan(streams, rows, schedule, **(one_launch or {}))

            def lut_one_launch():
                y.zero_()
                plan(x, y)

            lut_one_launch()
            error = np.abs(y.cpu().numpy() - xs @ Wt64)
            check(f"{label} lut_one_launch M=1", bool(np.all(error <= bound)), failures)
            t["lut_one_launch"] = time_us(lut_one_launch)
            if graph_us is not None:  # the same three products replayed as CUDA graphs over copies of the weight
                W16s = [W16.clone() for _ in range(copies(fp16_bytes, device))]
                sets = stream_copies(weight, device)
                gt = {"fp16_linear": graph_us([lambda W=W: torch.nn.functional.linear(x, W) for W in W16s]),
                     "lut": graph_us([lambda c=c: (y.zero_(), [kt.lut_matmul_stream(*s, rows, x, y) for s in c])
                                      for c in sets]),
                     "lut_one_launch": graph_us([lambda p=kt.GemvPlan(c, rows, schedule, **(one_launch or {})):
                                                 (y.zero_(), p(x, y)) for c in sets])}
                result.setdefault("graph", {"copies": {"fp16": len(W16s), "packed": len(sets)}})
                result["graph"]["us"] = gt
                result["graph"]["ratios"] = {"lut/fp16_linear": gt["lut"] / gt["fp16_linear"],
                                             "lut_one_launch/fp16_linear": gt["lut_one_launch"] / gt["fp16_linear"]}
                print(f"  M= 1 graphs: fp16_linear {gt['fp16_linear']:.1f} us, lut {gt['lut']:.1f} us "
                      f"({gt['lut'] / gt['fp16_linear']:.2f}x), lut_one_launch {gt['lut_one_launch']:.1f} us "
                      f"({gt['lut_one_launch'] / gt['fp16_linear']:.2f}x)", flush=True)
                del W16s, sets
        ratios = {"lut/fp16_linear": t["lut"] / t["fp16_linear"],
                  "decode_linear/fp16_linear": t["decode_linear"] / t["fp16_linear"],
                  "lut/decode_linear": t["lut"] / t["decode_linear"]}
        if "lut_one_launch" in t:
            ratios["lut_one_launch/fp16_linear"] = t["lut_one_launch"] / t["fp16_linear"]
        result["batches"][str(M)] = {
            "us": t,
            "gbps": {"fp16_linear": fp16_bytes / t["fp16_linear"] / 1e3, "lut": weight.packed_bytes / t["lut"] / 1e3,
                     "decode_linear": (weight.packed_bytes + 2 * fp16_bytes) / t["decode_linear"] / 1e3},
            "ratios": ratios}
        print(f"  M={M:2d}: fp16_linear {t['fp16_linear']:.1f} us, lut {t['lut']:.1f} us "
              f"({t['lut'] / t['fp16_linear']:.2f}x), decode+linear {t['decode_linear']:.1f} us"
              + (f", lut_tiles {t['lut_tiles']:.1f} us" if "lut_tiles" in t else "")
              + (f", lut_one_launch {t['lut_one_launch']:.1f} us ({t['lut_one_launch'] / t['fp16_linear']:.2f}x)"
                 if "lut_one_launch" in t else ""), flush=True)
    return result


SWEEP_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SWEEP_GRID = {"block_rows": (64, 128, 256), "block_c": (8, 16, 32), "warps": (4, 8), "programs_per_sm": (4, 16)}
SMOKE_GRID = {"block_rows": (8, 32), "block_c": (8,), "warps": (4,), "programs_per_sm": (4,)}


def sweep(device, time_us, failures: list[str], shapes, grid: dict) -> list[dict]:
    """The GEMV kernel on one stream (every column at 4 bits, or the 3-bit stream of the 3/4 mix) for
    every launch setting in `grid`, checked once per setting; the fp16 matmul of the same weight beside it."""
    import itertools

    from claq_convert.kernels import triton_lut as kt

    results = []
    for i, (rows, C) in enumerate(shapes):
        for j, mix in enumerate(MIXES):
            weight = SyntheticWeight(np.random.default_rng([100 + i, j]), rows, C, mix, device)
            stream = min(weight.streams, key=lambda s: s[1])  # 4-bit alone, or the 3-bit stream of 3/4
            words, bits, tables, columns, _ = stream
            x = torch.randn(1, C, generator=torch.Generator().manual_seed(i)).to(device=device, dtype=torch.float16)
            y = torch.empty(1, rows, device=device)
            Wt = np.zeros((C, rows), np.float64)
            Wt[columns.cpu().numpy()] = weight.Wt[columns.cpu().numpy()]
            xs = x.cpu().double().numpy()
            bound = 2 * C * 2.0 ** -24 * (np.abs(xs) @ np.abs(Wt)) + 1e-30
            W16 = torch.from_numpy(Wt.T.copy()).to(device=device, dtype=torch.float16)
            case = {"rows": rows, "C": C, "bits": bits, "columns": int(columns.numel()),
                    "fp16_linear_us": time_us(lambda: torch.nn.functional.linear(x, W16)), "settings": []}
            for values in itertools.product(*grid.values()):
                tuning = dict(zip(grid, values))

                def gemv():
                    y.zero_()
                    kt.lut_gemv_stream(words, bits, tables, columns, rows, x, y, **tuning)

                gemv()
                label = f"sweep {rows}x{C} {bits}-bit {tuning}"
                if check(label, bool(np.all(np.abs(y.cpu().numpy() - xs @ Wt) <= bound)), failures):
                    case["settings"].append(dict(tuning, us=time_us(gemv)))
                    print(f"  {label}: {case['settings'][-1]['us']:.1f} us", flush=True)
            case["best"] = min(case["settings"], key=lambda r: r["us"]) if case["settings"] else None
            print(f"sweep {rows}x{C} {bits}-bit ({case['columns']} columns): fp16_linear "
                  f"{case['fp16_linear_us']:.1f} us, best {case['best']}", flush=True)
            results.append(case)
            del weight, W16
    return results


# Tiles of 8 or 16 columns by 256 rows at 1, 2, 4, 8 bits and of 8 or 4 columns by 512 rows at 3, 5, 6, 7
# on 4 warps, words loaded 0, 1 or 2 tiles ahead, slices sized for 6, 8 or 10 programs an SM: with Triton
# 3.6 on sm_90 these take 40 to 72 registers a thread, so 7 to 12 programs fit on an SM at once
WIDTHS_GRID = [{"rows_one_word": 256, "c_one_word": c1, "rows_multi_word": 512, "c_multi_word": cm, "warps": 4,
                "programs_per_sm": pps, "prefetch": prefetch}
               for c1, cm in ((8, 8), (16, 8), (8, 4)) for prefetch in (0, 1, 2) for pps in (6, 8, 10)]
SMOKE_WIDTHS_GRID = [{"rows_one_word": 32, "c_one_word": 8, "rows_multi_word": 32, "c_multi_word": 8, "warps": 4,
                      "programs_per_sm": 4, "prefetch": prefetch} for prefetch in (0, 1, 2)]


def sweep_widths(device, time_us, failures: list[str], shapes, settings: list[dict], graph_us) -> dict:
    """The one-launch GEMV on whole weights (every mix) for every setting in `settings`, each checked once,
    timed by do_bench and as CUDA graphs over copies of the weight (graph_timer); the chosen setting
    has the least geometric mean graph time over the weights (checked on all of them)."""
    from claq_convert.kernels import triton_lut as kt

    cases = []
    for i, (rows, C) in enumerate(shapes):
        for j, mix in enumerate(MIXES):
            weight = SyntheticWeight(np.random.default_rng([200 + i, j]), rows, C, mix, device)
            streams = [(w, b, tables, columns) for w, b, tables, columns, _ in weight.streams]
            x = torch.randn(1, C, generator=torch.Generator().manual_seed(i)).to(device=device, dtype=torch.float16)
            y = torch.empty(1, rows, device=device)
            xs, Wt = x.cpu().double().numpy(), weight.Wt.astype(np.float64)
            bound = 2 * C * 2.0 ** -24 * (np.abs(xs) @ np.abs(Wt)) + 1e-30
            W16 = torch.from_numpy(weight.Wt.T.copy()).to(device=device, dtype=torch.float16)
            W16s = [W16] + [W16.clone() for _ in range(copies(2 * rows * C, device) - 1)]
            sets = stream_copies(weight, device)
            case = {"rows": rows, "C": C, "mix": mix,
                    "fp16_linear_us": time_us(lambda: torch.nn.functional.linear(x, W16)),
                    "fp16_linear_graph_us": graph_us([lambda W=W: torch.nn.functional.linear(x, W) for W in W16s]),
                    "us": [], "graph_us": []}
            for tuning in settings:
                schedule = kt.gemv_schedule({b: int(c.numel()) for _, b, _, c in streams}, rows, device,
                                            kt.gemv_widths_config(**tuning))

                def gemv():
                    y.zero_()
                    kt.lut_gemv_streams(streams, rows, x, y, schedule, **tuning)

                try:  # a setting that fails to compile or launch is recorded, and the sweep goes on
                    gemv()
                    error = None
                except Exception as exc:  # noqa: BLE001
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                ok = check(f"sweep-widths {rows}x{C} {mix} {tuning}",
                           error is None and bool(np.all(np.abs(y.cpu().numpy() - xs @ Wt) <= bound)), failures,
                           error or "")
                case["us"].append(time_us(gemv) if ok else None)
                case["graph_us"].append(graph_us([lambda c=c: (y.zero_(), kt.lut_gemv_streams(
                    c, rows, x, y, schedule, **tuning)) for c in sets]) if ok else None)
            first = settings[0]  # timed again last: how far the same setting moves within one run
            schedule = kt.gemv_schedule({b: int(c.numel()) for _, b, _, c in streams}, rows, device,
                                        kt.gemv_widths_config(**first))
            case["first_again_graph_us"] = graph_us([lambda c=c: (y.zero_(), kt.lut_gemv_streams(
                c, rows, x, y, schedule, **first)) for c in sets]) if case["graph_us"][0] is not None else None
            best = min(range(len(settings)),
                       key=lambda k: case["graph_us"][k] if case["graph_us"][k] is not None else np.inf)
            print(f"sweep-widths {rows}x{C} {mix}: fp16_linear {case['fp16_linear_us']:.1f} us "
                  f"(graphs {case['fp16_linear_graph_us']:.1f}), best by graphs {case['graph_us'][best]:.1f} us "
                  f"(do_bench {case['us'][best]:.1f}) at {settings[best]}", flush=True)
            cases.append(case)
            del weight, W16, W16s, sets
    valid = [k for k in range(len(settings)) if all(c["graph_us"][k] is not None for c in cases)]
    chosen = min(valid, key=lambda k: sum(np.log(c["graph_us"][k] / c["fp16_linear_graph_us"]) for c in cases)) \
        if valid else None
    return {"settings": settings, "cases": cases,
            "chosen": None if chosen is None else settings[chosen],
            "chosen_graph_ratios": None if chosen is None else
            {f"{c['rows']}x{c['C']} {c['mix']}": c["graph_us"][chosen] / c["fp16_linear_graph_us"] for c in cases}}


def machine(device: torch.device) -> dict:
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "triton": triton.__version__, "numpy": np.__version__, "cuda": torch.version.cuda, "device": str(device),
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, gpu_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1; writes to a temp file unless --out")
    parser.add_argument("--sweep", action="store_true", help="first time the GEMV kernel over its launch settings")
    parser.add_argument("--sweep-widths", action="store_true",
                        help="first time the one-launch GEMV over its settings and use the best for lut_one_launch")
    parser.add_argument("--sweep-only", action="store_true",
                        help="stop after the sweeps (their JSON is written beside --out: *-sweep.json)")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    args = parser.parse_args(argv)

    if args.smoke:
        out = args.out or Path(tempfile.gettempdir()) / "decode-cuda-smoke.json"
        if out.resolve() == DEFAULT_OUT.resolve():
            print(f"--smoke never writes {DEFAULT_OUT.relative_to(ROOT)}: pass another --out", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels_triton's @triton.jit run
        device, shapes = torch.device("cpu"), SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: this benchmark needs one (--smoke checks the script on the CPU)", file=sys.stderr)
            return 1
        out, device, shapes = args.out or DEFAULT_OUT, torch.device("cuda"), SHAPES

    time_us = timer(device, args.warmup_ms, args.rep_ms)
    failures: list[str] = []
    cases = []
    started = time.perf_counter()
    swept = None
    if args.sweep:
        swept = sweep(device, timer(device, 5, 25), failures, SMOKE_SHAPES[:1] if args.smoke else SWEEP_SHAPES,
                      SMOKE_GRID if args.smoke else SWEEP_GRID)
    swept_widths, one_launch = None, None
    if args.sweep_widths:
        swept_widths = sweep_widths(device, timer(device, 5, 25), failures,
                                    SMOKE_SHAPES[:1] if args.smoke else SWEEP_SHAPES,
                                    SMOKE_WIDTHS_GRID if args.smoke else WIDTHS_GRID, graph_timer(device))
        one_launch = swept_widths["chosen"]
        partial = out.with_name(out.stem + "-sweep.json")  # kept should the cases after it not finish
        partial.write_text(json.dumps({"machine": machine(device), "sweep_widths": swept_widths}, indent=1) + "\n")
        print(f"wrote {partial}; chosen {one_launch}: graph time over cuBLAS's "
              f"{swept_widths['chosen_graph_ratios']}", flush=True)
    for i, (rows, C) in enumerate([] if args.sweep_only else shapes):
        for j, mix in enumerate(MIXES):
            weight = SyntheticWeight(np.random.default_rng([i, j]), rows, C, mix, device)
            case = run_case(weight, device, time_us, failures, seed=10 * i + j, one_launch=one_launch,
                            graph_us=graph_timer(device))
            cases.append(dict(case, mix=mix))
            del weight
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report = {"machine": machine(device), "smoke": args.smoke, "seconds": time.perf_counter() - started,
              "method": "medians of triton.testing.do_bench (L2 flushed before each call), microseconds; "
                        "'graph' entries: medians of CUDA graph replays of one call per copy of the weight, "
                        "the copies over twice the L2 cache (no launch gaps, weights from HBM); "
                        "x fp16, y fp32; codebooks fp16 values read as fp32 tables; no outliers",
              "failures": failures, "cases": cases}
    from claq_convert.kernels import triton_lut as kt

    report["one_launch_settings"] = kt.gemv_widths_config(**(one_launch or {}))
    if swept is not None:
        report["sweep"] = swept
    if swept_widths is not None:
        report["sweep_widths"] = swept_widths
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} in {report['seconds']:.0f} s", flush=True)
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
