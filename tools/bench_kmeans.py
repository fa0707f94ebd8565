#!/usr/bin/env python
"""1-D K-Means on real weight columns: our Numba kernels against scikit-learn, and their share of a conversion.

Columns come from the SmolLM2 fixture's block linears. For a sample of columns, each method fits 2**b
centroids per column; we report seconds per column and SSE relative to the exact optimum. Then the exact
kernel runs over every column of every block linear (what one conversion fits), which, set against
the conversion time in bench/quality.json, gives the K-Means share of a conversion.

    pip install scikit-learn     # bench-only
    python tools/bench_kmeans.py [--columns 256] [--bits 2 --bits 3 --bits 4]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from claq_convert.kernels import numba_quant as kernels  # noqa: E402
from claq_convert.cli import machine_info  # noqa: E402
from claq_convert.fixture import DEFAULT_FIXTURE_DIR, build_fixture  # noqa: E402
from claq_convert.models.architectures import FAMILIES  # noqa: E402
from claq_convert.models.source import ModelSource  # noqa: E402


def fit_ours(column: np.ndarray, k: int, max_iter: int) -> np.ndarray:
    xs = np.sort(column.astype(np.float64))
    prefix = np.concatenate([[0.0], np.cumsum(xs)])
    if max_iter:
        return kernels.kmeans_sorted(xs, prefix, k, max_iter)
    return kernels.kmeans_optimal_sorted(xs, prefix, np.concatenate([[0.0], np.cumsum(xs * xs)]), k)


def fit_sklearn(column: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=3, random_state=0).fit(column.reshape(-1, 1).astype(np.float64)).cluster_centers_.ravel()


def sse(column: np.ndarray, centroids: np.ndarray) -> float:
    x = column.astype(np.float64)
    return float(np.sum(np.min((x[:, None] - np.sort(centroids)[None, :]) ** 2, axis=1)))


def timed(fn, columns, k):
    start = time.perf_counter()
    fits = [fn(c, k) for c in columns]
    return (time.perf_counter() - start) / len(columns), fits


@click.command()
@click.option("--columns", default=256, show_default=True, help="Sampled columns per bit width.")
@click.option("--bits", "bit_list", multiple=True, type=int, default=(2, 3, 4), show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench" / "kmeans.json")
def main(columns, bit_list, out):
    source = ModelSource(build_fixture(DEFAULT_FIXTURE_DIR))
    names = [f"model.layers.{i}.{m}.weight" for i in range(30) for group in FAMILIES[0].groups for m in group]
    rng = np.random.default_rng(0)
    sample = []
    for name in rng.choice(names, 16, replace=False):
        W = source.tensor(str(name)).numpy()
        sample += [W[:, j] for j in rng.choice(W.shape[1], columns // 16, replace=False)]
    fit_ours(sample[0], 4, 0), fit_ours(sample[0], 4, 100)  # compile / load the JIT cache outside the timing
    report = {"machine": machine_info(), "columns": len(sample), "rows": sorted({c.size for c in sample}), "bits": {}}
    for b in bit_list:
        k = 1 << b
        t_opt, opt = timed(lambda c, k: fit_ours(c, k, 0), sample, k)
        t_lloyd, lloyd = timed(lambda c, k: fit_ours(c, k, 100), sample, k)
        t_sk, sk = timed(fit_sklearn, sample, k)
        best = np.array([sse(c, f) for c, f in zip(sample, opt)])
        ratio = lambda fits: float(np.mean([sse(c, f) for c, f in zip(sample, fits)] / np.maximum(best, 1e-30)))
        row = {"optimal_dp_s_per_column": t_opt, "lloyd_s_per_column": t_lloyd, "sklearn_s_per_column": t_sk,
               "sklearn_over_optimal_time": t_sk / t_opt, "sse_ratio_lloyd": ratio(lloyd), "sse_ratio_sklearn": ratio(sk),
               "sklearn_columns_worse_than_optimal": int(np.sum([sse(c, f) > s * (1 + 1e-9) for c, f, s in zip(sample, sk, best)]))}
        report["bits"][str(b)] = row
        click.echo(f"{b}-bit: optimal {t_opt * 1e3:.3f} ms/col, Lloyd {t_lloyd * 1e3:.3f}, sklearn {t_sk * 1e3:.2f} "
                   f"({t_sk / t_opt:.0f}x slower); SSE vs optimal: Lloyd {row['sse_ratio_lloyd']:.4f}, "
                   f"sklearn {row['sse_ratio_sklearn']:.4f}")
    # every column of the model, as one 3-bit conversion fits them (exact kernel)
    start = time.perf_counter()
    n_columns = 0
    for name in names:
        W = source.tensor(name).numpy()
        for j in range(W.shape[1]):
            fit_ours(W[:, j], 8, 0)
        n_columns += W.shape[1]
    whole = time.perf_counter() - start
    report["whole_model_3bit"] = {"columns": n_columns, "seconds": whole}
    quality = ROOT / "bench" / "quality.json"
    if quality.is_file():
        runs = json.loads(quality.read_text()).get("runs", {})
        if "claq-3" in runs:
            report["whole_model_3bit"]["share_of_claq3_conversion"] = whole / runs["claq-3"]["convert_seconds"]
    click.echo(f"whole model, 3-bit: {n_columns} columns in {whole:.1f} s"
               + (f" = {report['whole_model_3bit']['share_of_claq3_conversion']:.0%} of the claq-3 conversion"
                  if "share_of_claq3_conversion" in report["whole_model_3bit"] else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
