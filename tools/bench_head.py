#!/usr/bin/env python
"""What the output head / tied embedding costs at each width: only that tensor quantized, all else fp32.

The tied SmolLM2 embedding is quantized with CLAQ at several widths, with GPTQ against the Hessian of
the final normed hidden states (self-sampled calibration, as claq-convert's default) and, for
comparison, data-free (per-column K-Means); perplexity on WikiText-2 and code over the first
`--windows` windows. This is what chose the default two extra bits for the head (pipeline.HEAD_EXTRA_BITS).
Writes bench/head.json.

    python tools/bench_head.py --windows 10
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from benchlib import ROOT, self_pool
from claq_convert.cli import machine_info
from claq_convert.data import eval_texts
from claq_convert.runtime.evaluate import perplexity
from claq_convert.quantize.pipeline import QuantConfig, quantize_weight

SETTINGS = {"kmeans-4": (QuantConfig(method="kmeans", bits=4), False), "claq-4": (QuantConfig(bits=4), True),
            "claq-5": (QuantConfig(bits=5), True), "claq-6": (QuantConfig(bits=6), True)}


@click.command()
@click.option("--windows", default=10, show_default=True, help="Evaluation windows per text.")
@click.option("--nsamples", default=16, show_default=True, help="Self-sampled windows for the head's Hessian.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench" / "head.json")
def main(windows, nsamples, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from claq_convert.fixture import DEFAULT_FIXTURE_DIR, build_fixture

    model_dir = build_fixture(DEFAULT_FIXTURE_DIR)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    texts = eval_texts(["wikitext", "code"])
    inputs = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: inputs.append(i[0].reshape(-1, i[0].shape[-1]).double()))
    with torch.no_grad():
        for batch in self_pool(model_dir, tokenizer, 128, 512, torch.device("cpu"))[:nsamples].split(4):
            model(batch)
    hook.remove()
    X = torch.cat(inputs)
    H = (X.T @ X * (2.0 / X.shape[0])).float()
    original = model.model.embed_tokens.weight.detach().clone()

    def score() -> dict:
        return {name: perplexity(model, tokenizer, path, nwindows=windows).ppl for name, path in texts.items()}

    report = {"machine": machine_info(), "windows": windows, "nsamples": nsamples, "fp32": score(), "runs": {}}
    for name, (qc, with_hessian) in SETTINGS.items():
        result = quantize_weight(original, H if with_hessian else None, qc)
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(torch.from_numpy(result.dequantize()))
        ppl = score()
        report["runs"][name] = {"relative_error": result.relative_error, "ppl": ppl,
                                "ratio_to_fp32": {t: ppl[t] / report["fp32"][t] for t in ppl}}
        click.echo(f"{name:10s} " + "  ".join(f"{t} {v:.3f}" for t, v in ppl.items()))
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
