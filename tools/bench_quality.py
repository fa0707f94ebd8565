#!/usr/bin/env python
"""Quality table: methods and CLAQ strategies on the same model, calibration and protocol, on every text.

Each configuration is converted with the same pipeline claq-convert runs (the default calibration
unless the configuration says otherwise), written to out/quality/NAME.claq so the whole file's size is
measured, and its perplexity measured on every evaluation text (data.eval_texts: WikiText-2 test and
texts of other domains) as the ratio to fp32 on that text. Baselines that .claq does not store (rtn,
gptq) are quantized in memory and counted as their packed codes plus fp16 grid parameters.
Results go to bench/quality.json after every configuration, so a long run can be read or resumed.

    python tools/bench_quality.py                 # all configurations (about an hour on 2 cores)
    python tools/bench_quality.py --only claq-4 --resume
    python tools/bench_quality.py --table --readme   # no runs: the table from the JSON, into README.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import calibration_for, open_report, selected  # noqa: E402
from claq_convert.format import inspection  # noqa: E402
from claq_convert.quantize.calibration import DEFAULT_NSAMPLES, SELF, default_sources  # noqa: E402
from claq_convert.cli import resolve_device  # noqa: E402
from claq_convert.quantize.convert import ConvertOptions, run_conversion  # noqa: E402
from claq_convert.data import eval_texts  # noqa: E402
from claq_convert.quantize.pipeline import QuantConfig  # noqa: E402
from claq_convert.format.reader import open_claq  # noqa: E402

# name -> QuantConfig fields, plus "calib": the calibration sources (quantize/calibration.py; "wikitext-valid": that
# file; absent: claq-convert's default), and "bpw_of": a budget equal to that configuration's measured honest
# bpw (the measured allocation against the fixed rule at equal bits). These were measured with 64
# self-sampled windows, the default before the Python texts joined it:
SELF_CALIBRATED = {
    "rtn-4": dict(method="rtn", bits=4), "gptq-4-g128": dict(method="gptq", bits=4, group_size=128),
    "kmeans-4": dict(method="kmeans", bits=4),
    "claq-4": dict(bits=4), "claq-4-wikicalib": dict(bits=4, calib="wikitext-valid"),
    "claq-4-fp32-embedding": dict(bits=4, quantize_embeddings=False),
    "claq-ap-4.2-fp32-embedding": dict(bits=4.2, ap_bits=(4, 5), quantize_embeddings=False),
    "claq-ap-4.5-fp32-embedding": dict(bits=4.5, ap_bits=(4, 5), quantize_embeddings=False),
    "claq-5-fp32-embedding": dict(bits=5, quantize_embeddings=False),
    # format v1 against v2: fp16 codebooks (v1's only kind), and v2's grid codebooks at the same honest bpw
    "claq-4-f16-codebooks-fp32-embedding": dict(bits=4, codebook="f16", quantize_embeddings=False),
    # format v3: claq-4-fp32-embedding again, its grid levels made strictly rising and coded (codebook_rice)
    "claq-4-coded-levels-fp32-embedding": dict(bits=4, quantize_embeddings=False),
    "claq-alloc-grid=claq-4-f16-codebooks": dict(bpw_of="claq-4-f16-codebooks-fp32-embedding",
                                                 quantize_embeddings=False),
    "claq-ap-4.1-fp32-embedding": dict(bits=4.1, ap_bits=(4, 5), quantize_embeddings=False),
    "claq-or-4+0.07": dict(bits=4, outlier_bits=0.07),
    "claq-ap-3.5": dict(bits=3.5), "claq-ap-3.1": dict(bits=3.1), "claq-3": dict(bits=3),
    "claq-ap-3.1-random": dict(bits=3.1, ranking="random"),
    "claq-alloc-absolute=claq-4": dict(bpw_of="claq-4", allocation="absolute"),
    "claq-alloc=claq-4": dict(bpw_of="claq-4"), "claq-alloc=claq-ap-3.5": dict(bpw_of="claq-ap-3.5"),
    "claq-alloc=claq-ap-3.1": dict(bpw_of="claq-ap-3.1"),
    "claq-alloc-fisher=claq-ap-4.2-fp32-embedding": dict(bpw_of="claq-ap-4.2-fp32-embedding", allocation="fisher",
                                                         quantize_embeddings=False),
    "claq-alloc-fisher=claq-4-fp32-embedding": dict(bpw_of="claq-4-fp32-embedding", allocation="fisher",
                                                    quantize_embeddings=False),
    "claq-ap-3.33-fp32-embedding": dict(bits=3.33, ap_bits=(3, 4), quantize_embeddings=False),
    "claq-alloc-fisher=claq-ap-3.33-fp32-embedding": dict(bpw_of="claq-ap-3.33-fp32-embedding", allocation="fisher",
                                                          quantize_embeddings=False),
}
CONFIGS = {name: {"calib": (SELF,), **fields} for name, fields in SELF_CALIBRATED.items()}
CONFIGS.update({  # v1 against v3 at the same widths, again from other calibration seeds ("seed": of the windows)
    f"{name}-seed-{seed}": {**CONFIGS[name], "seed": seed}
    for seed in range(1, 10) for name in ("claq-4-f16-codebooks-fp32-embedding", "claq-4-coded-levels-fp32-embedding")})
CONFIGS.update({  # the default calibration (self-sampled text and this Python's reference prose and code)
    "default-claq-4": dict(bits=4),
    "default-claq-4-fp32-embedding": dict(bits=4, quantize_embeddings=False),
    "default-claq-ap-4.2-fp32-embedding": dict(bits=4.2, ap_bits=(4, 5), quantize_embeddings=False),
    # the measured allocation at the fixed rule's size; its Fisher windows spread over all three sources
    "default-claq-alloc-fisher=default-claq-ap-4.2-fp32-embedding": dict(
        bpw_of="default-claq-ap-4.2-fp32-embedding", allocation="fisher", quantize_embeddings=False),
    # the whole model at the default file's size: the head keeps its target, the blocks share the rest
    "default-claq-alloc-fisher=default-claq-4": dict(bpw_of="default-claq-4", allocation="fisher"),
})
# Everything above was measured before the rows' Fisher weights entered the K-Means: plain K-Means.
for fields in CONFIGS.values():
    if fields.get("method", "claq") == "claq":
        fields.setdefault("row_weighting", "none")
CONFIGS.update({  # the K-Means weighted by each row's Fisher sum (--row-weights fisher, the default now)
    "rows-claq-4": dict(bits=4),
    "rows-claq-ap-4.2-fp32-embedding": dict(bits=4.2, ap_bits=(4, 5), quantize_embeddings=False),
    "rows-claq-alloc-fisher=default-claq-ap-4.2-fp32-embedding": dict(
        bpw_of="default-claq-ap-4.2-fp32-embedding", allocation="fisher", quantize_embeddings=False),
    "rows-claq-alloc-fisher=default-claq-4": dict(bpw_of="default-claq-4", allocation="fisher"),
    "rows-claq-ap-3.33-fp32-embedding": dict(bits=3.33, ap_bits=(3, 4), quantize_embeddings=False),
})
# Everything above that allocates did it per weight (one setting each; the default was "matrix" then).
for fields in CONFIGS.values():
    if "bpw_of" in fields:
        fields.setdefault("allocation_unit", "matrix")
CONFIGS.update({  # every column its own width (--allocation-unit column, the default now)
    "cols-claq-alloc-fisher=default-claq-ap-4.2-fp32-embedding": dict(
        bpw_of="default-claq-ap-4.2-fp32-embedding", allocation="fisher", quantize_embeddings=False),
    "cols-claq-alloc-fisher=default-claq-4": dict(bpw_of="default-claq-4", allocation="fisher"),
    "cols-claq-alloc-fisher=claq-ap-3.33-fp32-embedding": dict(
        bpw_of="claq-ap-3.33-fp32-embedding", allocation="fisher", quantize_embeddings=False),
    # the whole model at just under the 80 MB (the file: 4.69 bpw of quantized tensors, 0.9 MB else)
    "cols-claq-bpw-4.69": dict(bpw=4.69, allocation="fisher"),
    # the blocks at the 4.5 bpw
    "cols-claq-bpw-4.5-fp32-embedding": dict(bpw=4.5, allocation="fisher", quantize_embeddings=False),
    # claq-convert's default setting (cli.DEFAULT_BPW) until the head's 5 bits: the whole model
    "cols-claq-bpw-4.6": dict(bpw=4.6, allocation="fisher"),
    # a 3-bit-class whole file under the 65 MB: 3.7 bpw of quantized tensors, the head at 5 bits
    "cols-claq-bpw-3.7-head-5": dict(bpw=3.7, head_bits=5, allocation="fisher"),
})
# Everything above that allocates over the whole model gave the head the fixed rule's 6 bits (4 + 2).
for fields in CONFIGS.values():
    if ("bpw" in fields or "bpw_of" in fields) and fields.get("quantize_embeddings", True):
        fields.setdefault("head_bits", 6)
CONFIGS.update({  # the head at --bpw rounded up (pipeline.head_target), its default now
    # claq-convert's default setting (cli.DEFAULT_BPW): the whole model
    "cols-claq-bpw-4.6-head-5": dict(bpw=4.6, allocation="fisher"),
    "cols-claq-bpw-4.69-head-5": dict(bpw=4.69, allocation="fisher"),
    "cols-claq-bpw-3.7-head-4": dict(bpw=3.7, allocation="fisher"),
    # the blocks at the 3.5 bpw, and the same budget with 0.07 bpw of it on fp16 outliers
    "cols-claq-bpw-3.5-fp32-embedding": dict(bpw=3.5, allocation="fisher", quantize_embeddings=False),
    "cols-claq-bpw-3.5-or-0.07-fp32-embedding": dict(bpw=3.5, outlier_bits=0.07, allocation="fisher",
                                                     quantize_embeddings=False),
    # the default budget with 0.05 bpw of it on fp16 outliers
    "cols-claq-bpw-4.6-or-0.05-head-5": dict(bpw=4.6, outlier_bits=0.05, allocation="fisher"),
    # then every codebook and norm scale tuned by distillation from the source model (--tune-steps)
    "cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192": dict(bpw=3.5, outlier_bits=0.07, allocation="fisher",
                                                             quantize_embeddings=False, tune_steps=192),
    "cols-claq-bpw-4.6-head-5-tune-96": dict(bpw=4.6, allocation="fisher", tune_steps=96),
    "cols-claq-bpw-4.6-head-5-tune-192": dict(bpw=4.6, allocation="fisher", tune_steps=192),
    "cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-384": dict(bpw=3.5, outlier_bits=0.07, allocation="fisher",
                                                             quantize_embeddings=False, tune_steps=384),
    "cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192-lr-1e-3": dict(
        bpw=3.5, outlier_bits=0.07, allocation="fisher", quantize_embeddings=False, tune_steps=192, tune_lr=1e-3),
    # format v3: the allocation prices grid levels as bytes, coded they take about 0.065 bpw less at this
    # budget, so asking 3.56 fills about 3.5 (the honest bpw is measured from the file, as always)
    "cols-claq-bpw-3.56-or-0.07-fp32-embedding-tune-192": dict(bpw=3.56, outlier_bits=0.07, allocation="fisher",
                                                              quantize_embeddings=False, tune_steps=192),
    # the allocation prices coded levels (an estimate; quantize/budget.py holds the file to --bpw): the same budgets
    # as above, now filled
    "cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192-coded-price": dict(
        bpw=3.5, outlier_bits=0.07, allocation="fisher", quantize_embeddings=False, tune_steps=192),
    "cols-claq-bpw-4.5-fp32-embedding-coded-price": dict(bpw=4.5, allocation="fisher", quantize_embeddings=False),
    "cols-claq-bpw-4.6-head-5-coded-price": dict(bpw=4.6, allocation="fisher"),
    # the 3.5 row again after the sampler changed (calibration.sample_tokens, 64 sequences at once): the
    # same setting on the windows the current claq-convert draws
    "cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192-sampler-v2": dict(
        bpw=3.5, outlier_bits=0.07, allocation="fisher", quantize_embeddings=False, tune_steps=192),
    # the tuning's forward sees the codebooks as the file stores them (tuning.DecodedWeight): the same setting
    "cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192-stored-forward": dict(
        bpw=3.5, outlier_bits=0.07, allocation="fisher", quantize_embeddings=False, tune_steps=192),
})
CONFIGS.update({  # GPTQ's target pulled a share of the way toward the source layer's output (--toward-source)
    f"cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192-toward-source-{pull:g}": dict(
        bpw=3.5, outlier_bits=0.07, allocation="fisher", quantize_embeddings=False, tune_steps=192,
        toward_source=pull) for pull in (0.125, 0.25)})
CONFIGS["cols-claq-bpw-4.6-head-5-toward-source-0.25"] = dict(bpw=4.6, allocation="fisher", toward_source=0.25)
# what coded code streams would buy (bench/code-entropy.json: Huffman codes over each tensor and width's entry
# ranks, no per-column offsets, take 0.13 bits a code fewer on the 3.5 bpw file): the widths of 3.63 bpw
CONFIGS["cols-claq-bpw-3.63-or-0.07-fp32-embedding-tune-192-toward-source-0.125"] = dict(
    bpw=3.63, outlier_bits=0.07, allocation="fisher", quantize_embeddings=False, tune_steps=192, toward_source=0.125)
CONFIGS.update({  # ... and again from other calibration seeds, with and without the pull
    f"{name}-seed-{seed}": {**CONFIGS[name], "seed": seed} for seed in (1, 2) for name in (
        "cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192-stored-forward",
        "cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192-toward-source-0.125")})
# format v4: the code streams Huffman-coded where shorter, and the allocation pricing them so (the rows
# above are version-3 files, written before; these have the widths that the coded bytes allow)
CONFIGS.update({
    f"cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192-toward-source-0.125-coded-codes{suffix}": dict(
        bpw=3.5, outlier_bits=0.07, allocation="fisher", quantize_embeddings=False, tune_steps=192,
        toward_source=0.125, **extra) for suffix, extra in (("", {}), ("-seed-1", {"seed": 1}), ("-seed-2", {"seed": 2}))})
CONFIGS["cols-claq-bpw-4.6-head-5-coded-codes"] = dict(bpw=4.6, allocation="fisher")  # claq-convert's default, as v4
# the rows above priced codes from row-weighted data-free codes (they spent 3.434 bpw); this one from unweighted ones
CONFIGS["cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192-toward-source-0.125-coded-codes-unweighted-estimate"] = \
    CONFIGS["cols-claq-bpw-3.5-or-0.07-fp32-embedding-tune-192-toward-source-0.125-coded-codes"]
# 4.5 bpw of blocks against Q4_K_M as format v4 (coded codes priced per width), over two seeds
CONFIGS.update({f"cols-claq-bpw-4.5-fp32-embedding-coded-codes{suffix}": dict(
    bpw=4.5, allocation="fisher", quantize_embeddings=False, **extra) for suffix, extra in (("", {}), ("-seed-1", {"seed": 1}))})
# issue 11, v1 against v3 at equal widths: a far outlier stretches a column's 8-bit grid over its bulk;
# --grid-guard keeps such columns' largest weights in fp16 (the same seeds as the rows above); "-again" reruns
# the unguarded seed-0 row with today's code, to check that the older rows still pair with these
CONFIGS["claq-4-coded-levels-fp32-embedding-again"] = CONFIGS["claq-4-coded-levels-fp32-embedding"]
# (it did not: 27.87 / 25.34 / 37.40 / 11.01 against 27.82 / 24.96 / 36.87 / 11.21; the pipeline has changed
# since), so v1's fp16 codebooks again too, at the seeds of the guarded rows
CONFIGS.update({f"claq-4-f16-codebooks-fp32-embedding-again{suffix}": {
    **CONFIGS["claq-4-f16-codebooks-fp32-embedding"], **({"seed": seed} if seed else {})}
    for seed, suffix in [(0, "")] + [(k, f"-seed-{k}") for k in range(1, 7)]})
CONFIGS.update({f"claq-4-grid-guard-0.02-fp32-embedding{suffix}": dict(
    bits=4, quantize_embeddings=False, grid_guard=0.02, **({"seed": seed} if seed else {}))
    for seed, suffix in [(0, "")] + [(k, f"-seed-{k}") for k in range(1, 7)]})
CONFIGS["cols-claq-bpw-4.6-head-5-grid-guard-0.02"] = dict(bpw=4.6, allocation="fisher", grid_guard=0.02)  # the default, guarded
# the default again, with a margin per width on the code estimate (the row above it had one of 1.03)
CONFIGS["cols-claq-bpw-4.6-head-5-coded-codes-per-width-margins"] = CONFIGS["cols-claq-bpw-4.6-head-5-coded-codes"]
# the guard keeping a reserve only where it cuts the column's error by more than its 32 bits would buy
# (numba_quant.GUARD_GAIN): the rows above kept every reserve it tried
CONFIGS.update({f"claq-4-paid-grid-guard-0.02-fp32-embedding{suffix}": dict(
    bits=4, quantize_embeddings=False, grid_guard=0.02, **({"seed": seed} if seed else {}))
    for seed, suffix in [(0, "")] + [(k, f"-seed-{k}") for k in range(1, 7)]})
CONFIGS["cols-claq-bpw-4.6-head-5-paid-grid-guard-0.02"] = dict(bpw=4.6, allocation="fisher", grid_guard=0.02)
CONFIGS.update({f"{name}-seed-1": {**CONFIGS[name], "seed": 1} for name in (  # the default, paired on a 2nd seed
    "cols-claq-bpw-4.6-head-5-coded-codes-per-width-margins", "cols-claq-bpw-4.6-head-5-paid-grid-guard-0.02")})


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="HF directory (default: the SmolLM2 fixture, built if missing).")
@click.option("--only", multiple=True, help="Run just these configurations (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench" / "quality.json")
@click.option("--nsamples", default=None, type=int, help="Calibration windows (default: claq-convert's).")
@click.option("--resume", is_flag=True, help="Skip configurations already in --out.")
@click.option("--table", "table_only", is_flag=True, help="Run nothing: print the table of --out.")
@click.option("--readme", is_flag=True, help="Also write the table into README.md between its markers.")
@click.option("--threads", type=int, default=None,
              help="torch threads for the whole run (the results depend on it: float order of the matmuls).")
@click.option("--peers", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --table: a bench_peers.py report of the same model; its block-linear rows join the table.")
def main(model, only, out, nsamples, resume, table_only, readme, threads, peers):
    from transformers import AutoTokenizer

    from claq_convert.data import default_text
    from claq_convert.fixture import DEFAULT_FIXTURE_DIR, build_fixture

    if table_only:
        return emit_table(json.loads(out.read_text()), readme, json.loads(peers.read_text()) if peers else None)
    model = model or build_fixture(DEFAULT_FIXTURE_DIR)
    names = selected(only, CONFIGS)
    if threads:
        import torch

        torch.set_num_threads(threads)
    texts = eval_texts()
    report = open_report(out, resume, model, texts)
    runs, fp32 = report["runs"], report["ppl_fp32"]
    for name in names:
        if name in runs:
            continue
        fields = dict(CONFIGS[name])
        calib = fields.pop("calib", None)
        seed = fields.pop("seed", 0)
        if "bpw_of" in fields:
            reference = fields.pop("bpw_of")
            if reference not in runs:
                raise click.ClickException(f"{name} needs {reference} measured first")
            fields["bpw"] = runs[reference]["honest_bpw"]
        qc = QuantConfig(**fields)
        stores = qc.method in ("claq", "kmeans")
        count = nsamples or (64 if calib else DEFAULT_NSAMPLES)  # 64: what the self-only runs had
        sources = ((str(default_text("valid")),) if calib == "wikitext-valid" else tuple(calib) if calib
                   else default_sources(count))
        options = ConvertOptions(
            model_dir=model, out=ROOT / "out" / "quality" / f"{name}.claq" if stores else None, quant=qc,
            calib=sources, nsamples=count, seed=seed, device=resolve_device("auto"), evaluate=True, eval_texts=texts)
        # claq-convert's windows, the self-sampled ones taken from the shared pool
        calibration = calibration_for(sources, count, 512, model, AutoTokenizer.from_pretrained(str(model)),
                                      options.device, seed)
        record = run_conversion(options, ppl_before=fp32, log=lambda s: click.echo(s, err=True),
                                calibration=calibration)
        fp32.update(record["ppl_before"])
        s = record["summary"]
        runs[name] = {"config": qc.to_dict(), "calibration": record["calibration"], "threads": _threads(),
                      "ppl": {t: record["ppl_after"][t]["ppl"] for t in texts},
                      "ratio_to_fp32": {t: record["ppl_after"][t]["ppl"] / fp32[t]["ppl"] for t in texts},
                      "nominal_bits": s["nominal_bits"], "honest_bpw": s["honest_bpw"], "quantized_params": s["params"],
                      "outliers": s["outliers"], "file_bytes": record.get("file_bytes"),
                      "file_bits_per_parameter": record.get("file_bits_per_parameter"),
                      "convert_seconds": record["seconds"]["convert"], "kernel_seconds": s["kernel_seconds"]}
        if stores:  # the codebooks' and the codes' shares of the honest bits, as claq-inspect reports them
            with open_claq(options.out) as cf:
                quantized = inspection.summarize(cf)["quantized"]
            runs[name]["codebook_bpw"], runs[name]["code_bpw"] = quantized["codebook_bpw"], quantized["code_bpw"]
        click.echo(f"{name:24s} honest {s['honest_bpw']:.4f} bpw  " +
                   "  ".join(f"{t} {r['ppl']:.3f}" for t, r in record["ppl_after"].items()))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    emit_table(report, readme)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


README_MARKERS = ("<!-- quality-table: written by tools/bench_quality.py --readme -->", "<!-- /quality-table -->")
PERMUTED_MARKERS = ("<!-- quality-table-permuted: written by tools/bench_quality.py --readme -->",
                    "<!-- /quality-table-permuted -->")


def emit_table(report: dict, readme: bool, peers: dict = None) -> None:
    table = markdown_table(report, peers)
    click.echo(table)
    if readme:
        path = ROOT / "README.md"
        text = path.read_text()
        markers = README_MARKERS if "permuted" not in report["model"] else PERMUTED_MARKERS
        start, end = (text.find(m) for m in markers)
        if start < 0 or end < start:
            raise click.ClickException(f"README.md lacks the markers {markers}")
        path.write_text(text[:start + len(markers[0])] + "\n" + table + "\n" + text[end:])


def markdown_table(report: dict, peers: dict = None) -> str:
    """One row per configuration, by scope then honest bpw: ppl and its loss against fp32 on every text.
    With `peers`, llama.cpp's types join the block-linears rows (their token_embd kept as in the source)."""
    runs, fp32 = report["runs"], report["ppl_fp32"]
    texts = list(fp32)
    lines = ["| configuration | quantized | honest bpw | file MB | file bits/param | "
             + " | ".join(texts) + " | worst loss |",
             "|---|---|---:|---:|---:|" + "---:|" * len(texts) + "---:|",
             "| fp32 | | 32 | | | " + " | ".join(f"{fp32[t]['ppl']:.2f}" for t in texts) + " | |"]
    rows = []
    for name, r in runs.items():
        scope = "blocks+head" if r["config"].get("quantize_embeddings", False) else "blocks"
        size = f"{r['file_bytes'] / 1e6:.1f}" if r.get("file_bytes") else "—"
        whole = f"{r['file_bits_per_parameter']:.3f}" if r.get("file_bits_per_parameter") else "—"
        rows.append((scope, r["honest_bpw"], name, size, whole, r["ppl"], r["ratio_to_fp32"]))
    for name, r in (peers or {}).get("runs", {}).items():
        block = r.get("scopes", {}).get("block_linears")
        if block:
            whole = r.get("file_bits_per_parameter") or r["scopes"].get("whole_model", {}).get("bpw")
            rows.append(("blocks", block["bpw"], f"llama.cpp {name}", f"{r['file_bytes'] / 1e6:.1f}",
                         f"{whole:.3f}" if whole else "—", block["ppl"], block["ratio"]))
    for scope, bpw, name, size, whole, ppl, ratio in sorted(rows, key=lambda row: (row[0] != "blocks", row[1])):
        cells = [f"{ppl[t]:.2f} ({ratio[t] - 1:+.1%})" for t in texts]
        lines.append(f"| {name} | {scope} | {bpw:.3f} | {size} | {whole} | " + " | ".join(cells)
                     + f" | {max(ratio.values()) - 1:+.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
