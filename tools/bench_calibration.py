#!/usr/bin/env python
"""Which calibration carries over to other text: each setting quantized the same way, scored on every text.

For every configuration (calibration sources, windows, length, dampening) the block linears are
quantized in memory with the same pipeline claq-convert runs (the head held at fp32, so only the
calibration differs) and the perplexity measured on every evaluation text (data.eval_texts), as the
ratio to fp32 on that text. Self-sampled text is sampled once into a pool (tools/benchlib.py).
Results go to bench/calibration.json after every configuration.

    python tools/bench_calibration.py                  # all configurations (about an hour on 2 cores)
    python tools/bench_calibration.py --only self-64 --resume
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import calibration_for, open_report, selected  # noqa: E402
from claq_convert.quantize.calibration import SELF  # noqa: E402
from claq_convert.cli import resolve_device  # noqa: E402
from claq_convert.quantize.convert import ConvertOptions, run_conversion  # noqa: E402
from claq_convert.data import default_text, eval_texts  # noqa: E402
from claq_convert.quantize.pipeline import QuantConfig  # noqa: E402

WIKI_VALID = "wikitext-valid"
# name -> (calibration sources, nsamples, seqlen, QuantConfig fields)
CONFIGS = {
    "wiki-32": ((WIKI_VALID,), 32, 512, {}),
    "wiki-128": ((WIKI_VALID,), 128, 512, {}),
    "wiki-32-damp0.1": ((WIKI_VALID,), 32, 512, {"percdamp": 0.1}),
    "self-64": ((SELF,), 64, 512, {}),
    "self-128": ((SELF,), 128, 512, {}),
    "self-64-damp0.1": ((SELF,), 64, 512, {"percdamp": 0.1}),
    "self+wiki-128": ((SELF, WIKI_VALID), 128, 512, {}),
    "self-128-damp0.1": ((SELF,), 128, 512, {"percdamp": 0.1}),
    "self-128-ap3.5": ((SELF,), 128, 512, {"bits": 3.5}),
    "wiki-32-ap3.5": ((WIKI_VALID,), 32, 512, {"bits": 3.5}),
    # texts of the running Python (calibration.BUILTIN_TEXTS): its standard library's code, its reference's prose
    "self+code-64": ((SELF, "python-code"), 64, 512, {}),
    "self+docs+code-64": ((SELF, "python-docs", "python-code"), 64, 512, {}),
    "self64+code16": (("self:64", "python-code:16"), 80, 512, {}),
    "self64+docs16+code16": (("self:64", "python-docs:16", "python-code:16"), 96, 512, {}),
}


def resolve_sources(sources) -> tuple:
    return tuple(str(default_text("valid")) if s == WIKI_VALID else s for s in sources)


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="HF directory (default: the SmolLM2 fixture, built if missing).")
@click.option("--only", multiple=True, help="Run just these configurations (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench" / "calibration.json")
@click.option("--resume", is_flag=True, help="Skip configurations already in --out.")
@click.option("--table", "table_only", is_flag=True, help="Run nothing: print --out as a markdown table.")
def main(model, only, out, resume, table_only):
    from transformers import AutoTokenizer

    from claq_convert.fixture import DEFAULT_FIXTURE_DIR, build_fixture

    if table_only:
        return click.echo(markdown_table(json.loads(out.read_text())))
    model = model or build_fixture(DEFAULT_FIXTURE_DIR)
    names = selected(only, CONFIGS)
    device = resolve_device("auto")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    texts = eval_texts()
    report = open_report(out, resume, model, texts)
    runs, fp32 = report["runs"], report["ppl_fp32"]
    for name in names:
        if name in runs:
            continue
        sources, nsamples, seqlen, fields = CONFIGS[name]
        calibration = calibration_for(resolve_sources(sources), nsamples, seqlen, model, tokenizer, device)
        # the block linears only: the head/embedding is held at fp32 so only the calibration differs
        qc = QuantConfig(**{"bits": 4.0, "quantize_embeddings": False, **fields})
        options = ConvertOptions(model_dir=model, out=None, quant=qc, calib=resolve_sources(sources),
                                 nsamples=nsamples, seqlen=seqlen, device=device, evaluate=True, eval_texts=texts)
        record = run_conversion(options, ppl_before=fp32, calibration=calibration,
                                log=lambda s: click.echo(s, err=True))
        fp32.update(record["ppl_before"])
        ratios = {t: record["ppl_after"][t]["ppl"] / fp32[t]["ppl"] for t in texts}
        runs[name] = {"calibration": list(sources), "nsamples": nsamples, "seqlen": seqlen, "config": qc.to_dict(),
                      "honest_bpw": record["summary"]["honest_bpw"],
                      "ppl": {t: record["ppl_after"][t]["ppl"] for t in texts}, "ratio_to_fp32": ratios,
                      "worst_ratio": max(ratios.values()), "convert_seconds": record["seconds"]["convert"]}
        click.echo(f"{name:20s} " + "  ".join(f"{t} {r:.4f}" for t, r in ratios.items()))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


def markdown_table(report: dict) -> str:
    """Loss against fp32 per text for every calibration measured (block linears at 4 bits)."""
    texts = list(report["ppl_fp32"])
    lines = ["| calibration | windows | " + " | ".join(texts) + " | worst |", "|---|---:|" + "---:|" * (len(texts) + 1)]
    for name, r in report["runs"].items():
        cells = [f"{r['ratio_to_fp32'][t] - 1:+.1%}" for t in texts]
        lines.append(f"| {name} | {r['nsamples']}x{r['seqlen']} | " + " | ".join(cells) + f" | {r['worst_ratio'] - 1:+.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
