#!/usr/bin/env python
"""How cheap can a per-column codebook be? K-Means SSE when the entries must sit on a coarser grid.

Format v2 stores a codebook of 2**b entries as u8 levels on the column's fp16 grid (offset, step):
2**b * 8 + 32 bits a column. Issue 11 asks for codebooks at <= 0.15 bpw at 4 bits; on SmolLM2 that is
at most ~106 bits a column (576-row columns, 192 on k/v_proj). This tool measures what a cheaper
codebook costs in quantization error: for sampled columns of real block linears, the least SSE of 16
entries chosen from a grid of 2**L points (L-bit levels, the best of a few grid spans, chosen exactly by
dynamic programming) against the unconstrained optimum (fp16 entries). Grids: `asym` spans the
optimum's first to last centroid (fp16 offset and step, 32 bits), `sym` is symmetric about 0 (one fp16
step, 16 bits). `shapesS`: the weight shares S shapes learned from all its columns
(kernels_shapes.learn_shapes; a table of S x 2**b fp16 values a weight) and each column stores a u8
shape index and an fp16 offset and scale (40 bits). Data-free columns, no GPTQ: the error a codebook
adds before compensation.

    python tools/bench_codebook.py [--model DIR] [--columns 96] [--layers 0 --layers 14] [--shapes 16]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
from numba import njit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from claq_convert.kernels import numba_quant as kernels, shapes as kernels_shapes  # noqa: E402
from claq_convert.cli import machine_info  # noqa: E402
from claq_convert.fixture import DEFAULT_FIXTURE_DIR, build_fixture  # noqa: E402
from claq_convert.models.source import ModelSource  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SPANS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # grid span as a fraction of the optimum's outermost centroids
GRID_BITS = {"asym": 32, "sym": 16}        # bits of a column's grid parameters (fp16 offset/step, or step)
SHAPE_COLUMN_BITS = 8 + 32                  # a column of a shared-shape codebook: u8 index, fp16 offset and scale


@njit(cache=True)
def _cost(prefix, prefix_sq, i, j, p):
    """Sum over sorted entries i..j-1 of (x - p)^2."""
    if j <= i:
        return 0.0
    s, s2 = prefix[j] - prefix[i], prefix_sq[j] - prefix_sq[i]
    return s2 - 2.0 * p * s + (j - i) * p * p


@njit(cache=True)
def grid_sse(xs, prefix, prefix_sq, grid, k):
    """Least SSE of ascending xs coded with k points chosen from the ascending `grid`, each entry to its
    nearest chosen point: f[m, g] is the best cost of the entries below grid[g] with m + 1 points, the
    last at g; consecutive points g' < g split the entries between them at their midpoint."""
    G, n = grid.shape[0], xs.shape[0]
    inf = 1e300
    f = np.full((k, G), inf)
    pos = np.searchsorted(xs, grid)
    for g in range(G):
        f[0, g] = _cost(prefix, prefix_sq, 0, pos[g], grid[g])
    for m in range(1, k):
        for g in range(m, G):
            best = inf
            for h in range(m - 1, g):
                if f[m - 1, h] < inf:
                    mid = np.searchsorted(xs, 0.5 * (grid[h] + grid[g]))
                    c = (f[m - 1, h] + _cost(prefix, prefix_sq, pos[h], mid, grid[h])
                         + _cost(prefix, prefix_sq, mid, pos[g], grid[g]))
                    best = min(best, c)
            f[m, g] = best
    best = inf
    for g in range(k - 1, G):
        best = min(best, f[k - 1, g] + _cost(prefix, prefix_sq, pos[g], n, grid[g]))
    return best


def column_errors(column: np.ndarray, bits: int, level_bits: tuple[int, ...]) -> dict[str, float]:
    """SSE of one column: the fp16-entry optimum, and the best grid-constrained codebook per scheme."""
    xs = np.sort(column.astype(np.float64))
    prefix = np.concatenate([[0.0], np.cumsum(xs)])
    prefix_sq = np.concatenate([[0.0], np.cumsum(xs * xs)])
    k = 1 << bits
    centroids = kernels.kmeans_optimal_sorted(xs, prefix, prefix_sq, k)
    entries = np.sort(centroids.astype(np.float16).astype(np.float64))
    out = {"f16": float(np.sum(np.min((xs[:, None] - entries[None, :]) ** 2, axis=1)))}
    reach = max(abs(centroids[0]), abs(centroids[-1]))
    for L in level_bits:
        G = 1 << L
        grids = {"asym": [centroids[0] * s + (centroids[-1] - centroids[0]) * s * np.arange(G) / (G - 1)
                          for s in SPANS],
                 "sym": [(np.arange(G) - (G - 1) / 2) * reach * s / (G / 2 - 0.5) for s in SPANS]}
        for scheme, candidates in grids.items():
            out[f"{scheme}{L}"] = min(grid_sse(xs, prefix, prefix_sq, g, k) for g in candidates)
    return out


def shaped_errors(columns: np.ndarray, shapes: np.ndarray) -> float:
    """Summed SSE of columns ([cols, rows]) coded with the best of a weight's shapes (offset and scale in fp16)."""
    total = 0.0
    entries = np.empty(shapes.shape[1])
    for column in columns:
        xs = np.sort(column.astype(np.float64))
        prefix_w, prefix, prefix_sq = kernels.weighted_prefix_sums(xs, np.ones(xs.size))
        centroids = kernels.kmeans_optimal_weighted(xs, prefix_w, prefix, prefix_sq, shapes.shape[1])
        kernels_shapes.shaped_codebook(xs, prefix_w, prefix, prefix_sq, shapes, centroids,
                                       kernels_shapes.FIT_ITERATIONS, entries)
        total += float(np.sum(np.min((xs[:, None] - entries[None, :]) ** 2, axis=1)))
    return total


def codebook_share(source: ModelSource, names: list[str], bits_per_column: int, bits_per_weight: int = 0) -> float:
    """Codebook bits over all block-linear weights when every column's codebook costs this many bits
    (and every weight's table `bits_per_weight`)."""
    columns = params = 0
    for name in names:
        rows, cols = source.tensor(name).shape
        columns, params = columns + cols, params + rows * cols
    return (bits_per_column * columns + bits_per_weight * len(names)) / params


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="HF directory (default: the SmolLM2 fixture, built if missing).")
@click.option("--columns", default=96, show_default=True, help="Sampled columns per weight.")
@click.option("--layers", multiple=True, type=int, default=(0, 14, 29), show_default=True)
@click.option("--bits", default=4, show_default=True, help="Codebook width (2**bits entries).")
@click.option("--level-bits", "level_bits", multiple=True, type=int, default=(5, 6, 8), show_default=True)
@click.option("--shapes", "shape_counts", multiple=True, type=int, default=(4, 16, 64), show_default=True,
              help="Shared-shape tables of this many shapes a weight (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench" / "codebook-grid.json")
def main(model, columns, layers, bits, level_bits, shape_counts, out):
    source = ModelSource(model or build_fixture(DEFAULT_FIXTURE_DIR))
    block = [n for n in source.names() if ".layers." in n and n.endswith(".weight")
             and any(f".{m}." in n for m in LINEARS)]
    rng = np.random.default_rng(0)
    weights, total = {}, {}
    for layer in layers:
        for linear in LINEARS:
            name = f"model.layers.{layer}.{linear}.weight"
            W = source.tensor(name).float().numpy()
            picked = rng.choice(W.shape[1], min(columns, W.shape[1]), replace=False)
            sums: dict[str, float] = {}
            for j in picked:
                for scheme, value in column_errors(W[:, j], bits, level_bits).items():
                    sums[scheme] = sums.get(scheme, 0.0) + value
            Wt = np.ascontiguousarray(W.T.astype(np.float64))
            for count in shape_counts:
                shapes = kernels_shapes.learn_shapes(Wt, np.ones(W.shape[0]), bits, count)
                sums[f"shapes{count}"] = shaped_errors(Wt[picked], shapes)
            for scheme, value in sums.items():
                total[scheme] = total.get(scheme, 0.0) + value
            weights[name] = {s: v / sums["f16"] - 1.0 for s, v in sums.items() if s != "f16"}
            click.echo(f"{name:40s} " + "  ".join(f"{s} {v:+.1%}" for s, v in weights[name].items()))
    k = 1 << bits
    schemes = {"f16": (16 * k, 0)}
    schemes.update({f"{scheme}{L}": (L * k + GRID_BITS[scheme], 0) for L in level_bits for scheme in GRID_BITS})
    schemes.update({f"shapes{S}": (SHAPE_COLUMN_BITS, 16 * k * S) for S in shape_counts})
    shares = {s: {"bits_per_column": b, "bits_per_weight": t, "codebook_bpw": codebook_share(source, block, b, t),
                  "sse_over_f16": total[s] / total["f16"] - 1.0}
              for s, (b, t) in schemes.items()}
    for s, v in shares.items():
        click.echo(f"{s:6s} {v['bits_per_column']:4d} bits a column  {v['codebook_bpw']:.3f} bpw  "
                   f"SSE {v['sse_over_f16']:+.1%}")
    report = {"tool": "tools/bench_codebook.py", "machine": machine_info(), "model": str(model or DEFAULT_FIXTURE_DIR),
              "bits": bits, "columns_per_weight": columns, "layers": list(layers), "spans": list(SPANS),
              "note": "asym8 has v2's cost (u8 levels, fp16 offset and step); v2 rounds the optimum's centroids "
                      "to their nearest levels, the grid schemes here choose the best levels (a lower bound); shapesS "
                      "learns S shapes from all of a weight's columns and fits the sampled ones",
              "per_weight_sse_over_f16": weights, "schemes": shares}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
