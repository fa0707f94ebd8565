#!/usr/bin/env python
"""Shared codebook shapes inside GPTQ against v2's grid codebooks: ppl on every text at the same widths.

The format does not store shapes yet, so this runs bench_quality's conversion of fixed 4-bit blocks
(fp32 embedding, the default calibration) twice: as claq-convert does it (`grid-4`), and with every
weight's codebooks fitted to S shapes learned from its own columns of each width before GPTQ
(`shapesS-4`: GPTQ.quantize(shapes=...), kernels.MODE_SHAPES; the file then holds the entries as fp16,
so its own bpw is v1's). The shapes' honest bpw is computed from what they would store: 40 bits a
column (u8 index, fp16 offset and scale) and each weight's tables of S x 2**b fp16 values, instead of
v2's 2**b u8 levels + 32 bits. Results in bench/quality-shapes.json (bench_quality's layout, plus
`shapes` for each shapes run).

    python tools/bench_shapes.py [--model DIR] [--shapes 16] [--resume]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import bench_quality  # noqa: E402
from claq_convert.quantize import gptq  # noqa: E402
from claq_convert.kernels import shapes as kernels_shapes  # noqa: E402

SHAPE_COLUMN_BITS = 8 + 32  # u8 shape index, fp16 offset and scale
GRID_PARAMETER_BITS = 32    # v2's codebook_grid: fp16 offset and step a column (beside its 2**b u8 levels)


def with_shapes(count: int, stats: dict):
    """GPTQ.quantize that learns `count` shapes per width from the weight's columns and fits to them."""
    original = gptq.GPTQ.quantize

    def quantize(self, bits, reserve=None, uniform=False, *args, row_weights=None, **kwargs):
        if uniform:
            return original(self, bits, reserve, uniform, *args, row_weights=row_weights, **kwargs)
        W = self.W.cpu().numpy()
        weights = np.ones(W.shape[0]) if row_weights is None else np.asarray(row_weights, np.float64)
        shapes = {}
        for b in np.unique(bits):
            columns = np.ascontiguousarray(W[:, bits == b].T.astype(np.float64))
            shapes[int(b)] = kernels_shapes.learn_shapes(columns, weights, int(b), count)
            stats["table_bits"] += 16 * shapes[int(b)].size
            stats["grid_codebook_bits"] += int((bits == b).sum()) * ((8 << int(b)) + GRID_PARAMETER_BITS)
        stats["columns"] += W.shape[1]
        result = original(self, bits, reserve, uniform, *args, row_weights=row_weights, shapes=shapes, **kwargs)
        result.column_codebooks = result.column_codebooks.astype(np.float16)  # stored as fp16 entries
        return result

    return original, quantize


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path.home() / ".cache" / "claq-convert" / "SmolLM2-135M-Instruct-permuted")
@click.option("--shapes", "count", default=16, show_default=True, help="Shapes per weight and width.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench" / "quality-shapes.json")
@click.option("--resume", is_flag=True, help="Skip the runs already in --out.")
def main(model, count, out, resume):
    grid, shaped = "grid-4", f"shapes{count}-4"
    for name in (grid, shaped):
        bench_quality.CONFIGS[name] = dict(bits=4, quantize_embeddings=False)
    args = ["--model", str(model), "--out", str(out), "--resume"]
    if not (resume and out.is_file() and grid in json.loads(out.read_text())["runs"]):
        bench_quality.main.main(args + ["--only", grid], standalone_mode=False)
    stats = {"columns": 0, "table_bits": 0, "grid_codebook_bits": 0}
    original, patched = with_shapes(count, stats)
    gptq.GPTQ.quantize = patched
    try:
        bench_quality.main.main(args + ["--only", shaped], standalone_mode=False)
    finally:
        gptq.GPTQ.quantize = original
    report = json.loads(out.read_text())
    run, params = report["runs"][shaped], report["runs"][shaped]["quantized_params"]
    if stats["columns"]:  # this call converted it (not skipped by --resume)
        saved = stats["grid_codebook_bits"] - SHAPE_COLUMN_BITS * stats["columns"] - stats["table_bits"]
        run["shapes"] = dict(stats, count=count, honest_bpw=report["runs"][grid]["honest_bpw"] - saved / params,
                             codebook_bpw=(SHAPE_COLUMN_BITS * stats["columns"] + stats["table_bits"]) / params)
        out.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(json.dumps(run.get("shapes", {})))


if __name__ == "__main__":
    main()
