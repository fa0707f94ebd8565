#!/usr/bin/env python
"""Quality table: every method and CLAQ strategy on the same model, calibration and protocol.

Each configuration is quantized in memory (the same pipeline claq-convert runs), its honest bpw taken
from the .claq byte layout, and its perplexity measured with the fixed protocol. Results are written to
bench/quality.json after every configuration, so a long run can be read (or resumed) part way.

    python tools/bench_quality.py                 # all configurations (about an hour on 2 cores)
    python tools/bench_quality.py --only claq-3 --only gptq-3
    python tools/bench_quality.py --table --readme   # no runs: the table from the JSON, into README.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from claq_convert.cli import machine_info, resolve_device  # noqa: E402
from claq_convert.convert import ConvertOptions, run_conversion  # noqa: E402
from claq_convert.pipeline import QuantConfig  # noqa: E402

# name -> QuantConfig fields. OR budgets follow the paper's 2.12 = AP 2.05 + OR 0.07.
CONFIGS = {
    "rtn-4": dict(method="rtn", bits=4), "rtn-3": dict(method="rtn", bits=3),
    "gptq-4": dict(method="gptq", bits=4), "gptq-3": dict(method="gptq", bits=3), "gptq-2": dict(method="gptq", bits=2),
    "kmeans-4": dict(method="kmeans", bits=4), "kmeans-3": dict(method="kmeans", bits=3),
    "claq-4": dict(bits=4), "claq-3": dict(bits=3), "claq-2": dict(bits=2),
    "claq-ap-2.1": dict(bits=2.1), "claq-ap-2.2": dict(bits=2.2), "claq-ap-3.1": dict(bits=3.1),
    "claq-or-2+0.07": dict(bits=2, outlier_bits=0.07), "claq-or-3+0.07": dict(bits=3, outlier_bits=0.07),
    "claq-or-2+0.07-fitall": dict(bits=2, outlier_bits=0.07, fit_outliers=True),
    "claq-or-3+0.07-fitall": dict(bits=3, outlier_bits=0.07, fit_outliers=True),
    "claq-apor-2.12": dict(bits=2.05, outlier_bits=0.07), "claq-apor-3.12": dict(bits=3.05, outlier_bits=0.07),
    # points between the paper's settings, against llama.cpp's 4-5.5 bpw types
    "claq-ap-3.5": dict(bits=3.5), "claq-or-4+0.07": dict(bits=4, outlier_bits=0.07),
    # ablations at the same honest bpw: the same bits spent on random columns
    "claq-ap-2.1-random": dict(bits=2.1, ranking="random"), "claq-ap-3.1-random": dict(bits=3.1, ranking="random"),
    "claq-or-2+0.07-random": dict(bits=2, outlier_bits=0.07, ranking="random"),
}


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="HF directory (default: the SmolLM2 fixture, built if missing).")
@click.option("--only", multiple=True, help="Run just these configurations (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench" / "quality.json")
@click.option("--nsamples", default=32, show_default=True)
@click.option("--seqlen", default=512, show_default=True)
@click.option("--resume", is_flag=True, help="Skip configurations already in --out.")
@click.option("--table", "table_only", is_flag=True, help="Run nothing: print the table of --out.")
@click.option("--readme", is_flag=True, help="Also write the table into README.md between its markers.")
def main(model, only, out, nsamples, seqlen, resume, table_only, readme):
    from claq_convert.fixture import DEFAULT_FIXTURE_DIR, build_fixture

    if table_only:
        return emit_table(json.loads(out.read_text()), readme)
    model = model or build_fixture(DEFAULT_FIXTURE_DIR)
    names = list(only) or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise click.UsageError(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    report = json.loads(out.read_text()) if resume and out.is_file() else {}
    report.update(machine=machine_info(), model=str(model),
                  calibration={"text": "valid.txt", "nsamples": nsamples, "seqlen": seqlen, "seed": 0},
                  protocol={"text": "test.txt", "seqlen": 512, "windows": 40})
    runs = report.setdefault("runs", {})
    ppl_before = report.get("ppl_fp32")
    for name in names:
        if name in runs:
            continue
        qc = QuantConfig(**CONFIGS[name])
        options = ConvertOptions(model_dir=model, out=None, quant=qc, nsamples=nsamples, seqlen=seqlen,
                                 device=resolve_device("auto"), evaluate=True)
        record = run_conversion(options, ppl_before=ppl_before, log=lambda s: click.echo(s, err=True))
        ppl_before = report["ppl_fp32"] = record["ppl_before"]
        s = record["summary"]
        runs[name] = {"config": qc.to_dict(), "ppl": record["ppl_after"]["ppl"], "nominal_bits": s["nominal_bits"],
                      "honest_bpw": s["honest_bpw"], "outliers": s["outliers"],
                      "mean_relative_error": s["mean_relative_error"], "convert_seconds": record["seconds"]["convert"],
                      "kernel_seconds": s["kernel_seconds"]}
        click.echo(f"{name:24s} ppl {runs[name]['ppl']:8.3f}  nominal {s['nominal_bits']:.3f}  "
                   f"honest {s['honest_bpw']:.4f} bpw  {record['seconds']['convert']:.0f} s")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    emit_table(report, readme)


README_MARKERS = ("<!-- quality-table: written by tools/bench_quality.py --readme -->", "<!-- /quality-table -->")


def emit_table(report: dict, readme: bool) -> None:
    table = markdown_table(report)
    click.echo(table)
    if readme:
        path = ROOT / "README.md"
        text = path.read_text()
        start, end = (text.find(m) for m in README_MARKERS)
        if start < 0 or end < start:
            raise click.ClickException(f"README.md lacks the markers {README_MARKERS}")
        path.write_text(text[:start + len(README_MARKERS[0])] + "\n" + table + "\n" + text[end:])


def markdown_table(report: dict) -> str:
    """One row per configuration, in the order of CONFIGS (the order of the issue's list)."""
    runs = report["runs"]
    lines = [f"fp32 reference: ppl {report['ppl_fp32']['ppl']:.2f}", "",
             "| configuration | method | ppl | nominal bits | honest bpw | outliers | convert s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in sorted(runs, key=lambda n: list(CONFIGS).index(n) if n in CONFIGS else len(CONFIGS)):
        r = runs[name]
        lines.append(f"| {name} | {r['config']['method']} | {r['ppl']:.2f} | {r['nominal_bits']:.3f} | "
                     f"{r['honest_bpw']:.3f} | {r['outliers']} | {r['convert_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
