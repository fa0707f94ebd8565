#!/usr/bin/env python
"""llama.cpp's quantization types on the reference model, under the project's own perplexity protocol.

Method (as the earlier peer numbers were made): llama.cpp from the pinned llama-cpp-python sdist, only
llama-quantize and llama-imatrix built (CMake Release, CPU), all cached under ~/.cache/claq-convert/peers.
convert_hf_to_gguf.py makes an F32 GGUF of the fp32 fixture (checked bit exact after undoing its q/k row
permutation); llama-imatrix runs on WikiText-2 valid.txt (the project's calibration text); llama-quantize
writes each type. Each GGUF is read back with gguf-py, dequantized, q/k un-permuted and scored in torch with
claq_convert.runtime.evaluate.perplexity on every text, at two scopes: "block_linears" (only the 7 linears of each
layer replaced, the rest fp32: comparable with CLAQ) and "whole_model" (every tensor as stored; the model is
tied, so the head is the quantized token_embd). Honest bpw: stored bytes * 8 / weights of the block linears;
for the whole model, file bytes * 8 / all parameters. fp32 is scored in the same run (the ratios' reference).

A benchmark tool only: never a dependency of the package, never run in tests. Run it niced on a shared box:

    nice -n 19 python tools/bench_peers.py        # everything: build ~5 min on 2 cores, then minutes a model
    nice -n 19 python tools/bench_peers.py --only IQ3_S-imat --resume
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections import Counter
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import click
import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from claq_convert.cli import load_hf, machine_info  # noqa: E402
from claq_convert.data import default_text, eval_texts  # noqa: E402
from claq_convert.runtime.evaluate import perplexity  # noqa: E402
from claq_convert.fixture import (DEFAULT_FIXTURE_DIR, DEFAULT_PERMUTED_DIR, build_fixture, build_permuted_fixture,
    hf_name, unpermute_qk)

VERSION = "0.3.36"  # of llama-cpp-python, whose sdist vendors llama.cpp
PACKAGE = f"llama-cpp-python=={VERSION}"
SENTENCEPIECE = "sentencepiece==0.2.1"  # the converter imports it even for BPE vocabularies
PEERS = DEFAULT_FIXTURE_DIR.parent / "peers"
IMATRIX = {"ctx": 512, "chunks": 64}  # 32k tokens: twice what CLAQ calibrates on (32 x 512)
# llama-quantize types; "-imat": quantized with the importance matrix (the IQ types refuse to run without one)
# Q4_1 is the source file's own type: on the original fixture it gives the weights back exactly (the grid check)
TYPES = ("Q4_K_M", "Q3_K_M", "Q4_0", "Q3_K_S", "Q3_K_S-imat", "IQ3_S-imat", "Q4_K_M-imat", "Q4_1", "Q5_0",
         "IQ4_NL", "IQ4_NL-imat")
# original: the fixture itself, whose block linears lie on the Q4_1 grid of their 32-weight row blocks;
# permuted: its renumbered twin (fixture.build_permuted_fixture), the same function without that alignment
FIXTURES = {"original": (DEFAULT_FIXTURE_DIR, build_fixture, "peers.json", ""),
            "permuted": (DEFAULT_PERMUTED_DIR, build_permuted_fixture, "peers-permuted.json", "-permuted")}
BLOCK_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def log(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def run(cmd: list, logfile: Path) -> None:
    """Run a step with its output in a log file; a failure raises with the log's tail (goes into the JSON)."""
    log(" ".join(map(str, cmd)))
    with open(logfile, "w") as fh:
        rc = subprocess.run(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {' '.join(map(str, cmd))}\n" + logfile.read_text()[-1500:])


def build_tools() -> tuple[Path, Path]:
    """(llama.cpp sources, bin dir): the pinned sdist unpacked once, a CPU Release build of the two tools we use."""
    src, build = PEERS / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp", PEERS / f"build-{VERSION}"
    if not (src / "CMakeLists.txt").is_file():
        PEERS.mkdir(parents=True, exist_ok=True)  # pip makes src/ itself; the log goes beside it
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
             "-d", PEERS / "src"], PEERS / "download.log")
        with tarfile.open(PEERS / "src" / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            tar.extractall(PEERS / "src", filter="data")
    if not (build / "CMakeCache.txt").is_file():
        run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
             "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON"], PEERS / "configure.log")
    run(["cmake", "--build", build, "-j2", "--target", "llama-quantize", "llama-imatrix"], PEERS / "build.log")
    return src, build / "bin"


def converter_python() -> Path:
    """A venv for the converter: sentencepiece of its own, torch/transformers seen from this venv via a .pth."""
    venv, python = PEERS / "convert-venv", PEERS / "convert-venv" / "bin" / "python"
    if not python.is_file():
        run([sys.executable, "-m", "venv", venv], PEERS / "venv.log")
        run([python, "-m", "pip", "install", "--quiet", SENTENCEPIECE], PEERS / "venv.log")
        site = next((venv / "lib").glob("python*/site-packages"))
        (site / "claq_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def hf_weights(gguf_reader, n_head: int, n_kv: int) -> dict:
    """Dequantized GGUF tensors under HF names, q/k rows put back in HF order."""
    out = {}
    for t in gguf_reader.tensors:
        w, name = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32), hf_name(t.name)  # a writable copy
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_qk(w, n_head if "q_proj" in name else n_kv)
        out[name] = w
    return out


def check_round_trip(f32_gguf: Path, model) -> None:
    """The F32 GGUF must give back the source weights exactly, or the q/k mapping (and all numbers) is wrong."""
    cfg, params = model.config, dict(model.named_parameters())
    for name, w in hf_weights(GGUFReader(f32_gguf), cfg.num_attention_heads, cfg.num_key_value_heads).items():
        if not np.array_equal(w, params[name].detach().numpy()):
            raise RuntimeError(f"F32 GGUF round trip differs at {name}")


def tensor_classes(reader) -> dict:
    """Tensor class (blk.N. dropped) -> {ggml type: count}: llama.cpp falls back per tensor (576 % 256 != 0)."""
    classes: dict = {}
    for t in reader.tensors:
        cls = t.name.split(".", 2)[2] if t.name.startswith("blk.") else t.name
        classes.setdefault(cls, Counter())[t.tensor_type.name] += 1
    return {k: dict(v) for k, v in sorted(classes.items())}


@contextmanager
def patched(model, state: dict):
    """Weights swapped in for one evaluation, then restored (tied head follows token_embd)."""
    if "lm_head.weight" in state:
        raise RuntimeError("GGUF has an untied output.weight; this tool assumes the tied reference model")
    params = dict(model.named_parameters())
    saved = {k: params[k].detach().clone() for k in state}  # restored after, so one model serves every type
    with torch.no_grad():
        for k, w in state.items():
            params[k].copy_(torch.from_numpy(w))
        try:
            yield
        finally:
            for k, w in saved.items():
                params[k].copy_(w)


def evaluate(model, tokenizer, texts: dict) -> dict:
    """Perplexity on every text, the project's protocol (40 windows of 512 tokens)."""
    return {name: perplexity(model, tokenizer, path).ppl for name, path in texts.items()}


SCOPES = ("block_linears", "whole_model")


def measure(gguf_path: Path, model, tokenizer, texts: dict, fp32: dict, scopes=SCOPES) -> dict:
    """File size, ggml types, and for each scope: honest bpw, ppl per text, ratio to fp32 per text."""
    reader, cfg = GGUFReader(gguf_path), model.config
    linears = [t for t in reader.tensors if t.name.startswith("blk.") and t.name.split(".")[2] in BLOCK_LINEARS]
    result = {"file_bytes": gguf_path.stat().st_size, "tensor_types": tensor_classes(reader), "scopes": {}}
    bpw = {"block_linears": sum(int(t.n_bytes) for t in linears) * 8 / sum(int(t.n_elements) for t in linears),
           "whole_model": result["file_bytes"] * 8 / sum(int(t.n_elements) for t in reader.tensors)}
    result["file_bits_per_parameter"] = bpw["whole_model"]
    whole, params = hf_weights(reader, cfg.num_attention_heads, cfg.num_key_value_heads), dict(model.named_parameters())
    block = {k: whole[k] for k in map(hf_name, (t.name for t in linears))}
    # token_embd and norms often come back bit exact (F32, or Q8_0 of a table already on a Q8_0 grid): then the
    # whole model is the block-linears model, and its (deterministic) perplexity is not measured twice
    same = all(np.array_equal(w, params[k].detach().numpy()) for k, w in whole.items() if k not in block)
    for scope, state in (("block_linears", block), ("whole_model", whole)):
        if scope not in scopes:
            continue
        if not (same and scope == "whole_model"):
            log(f"  {gguf_path.name}: {scope}")
            with patched(model, state):
                ppl = evaluate(model, tokenizer, texts)
        result["scopes"][scope] = {"bpw": bpw[scope], "ppl": ppl, "ratio": {k: ppl[k] / fp32[k] for k in ppl},
                                   **({"same_weights_as": "block_linears"} if same and scope == "whole_model" else {})}
    return result


def make(target: Path, cmd: list, logfile: Path) -> None:
    """Run `cmd` (which writes `target`) unless done, into a .part file so a killed run never looks done.
    The file keeps its .gguf ending: llama-imatrix picks its output format from it."""
    if not target.is_file():
        part = target.with_suffix(".part" + target.suffix)
        run([part if c == target else c for c in cmd], logfile)
        os.replace(part, target)


def prepare(model_dir: Path, suffix: str = "") -> dict:
    """Sources, build, F32 GGUF and imatrix, each made once and cached; returns paths and the commands used."""
    (src, bin_dir), work = build_tools(), PEERS / f"gguf-{VERSION}{suffix}"
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "model-f32.gguf"
    imatrix = work / f"imatrix-c{IMATRIX['ctx']}-n{IMATRIX['chunks']}.gguf"
    commands = {"convert": [converter_python(), src / "convert_hf_to_gguf.py", model_dir, "--outtype", "f32",
                            "--outfile", f32],
                "imatrix": [bin_dir / "llama-imatrix", "-m", f32, "-f", default_text("valid"), "-c", IMATRIX["ctx"],
                            "--chunks", IMATRIX["chunks"], "-t", os.cpu_count(), "-o", imatrix]}
    make(f32, commands["convert"], work / "convert.log")
    make(imatrix, commands["imatrix"], work / "imatrix.log")
    return {"bin": bin_dir, "work": work, "f32": f32, "imatrix": imatrix,
            "commands": {k: " ".join(map(str, v)) for k, v in commands.items()}}


def quantize_and_measure(name: str, setup: dict, model, tokenizer, texts: dict, fp32: dict, scopes=SCOPES) -> dict:
    """One type: quantize (cached), then both scopes; a failure is recorded and the other types still run."""
    qtype, use_imatrix = name.removesuffix("-imat"), name.endswith("-imat")
    target, start = setup["work"] / f"{name}.gguf", time.perf_counter()
    cmd = [setup["bin"] / "llama-quantize", *(["--imatrix", setup["imatrix"]] if use_imatrix else []),
           setup["f32"], target, qtype, os.cpu_count()]
    record = {"type": qtype, "imatrix": use_imatrix, "quantize_command": " ".join(map(str, cmd))}
    try:
        make(target, cmd, setup["work"] / f"quantize-{name}.log")
        record.update(measure(target, model, tokenizer, texts, fp32, scopes))
    except Exception as exc:
        record["error"] = str(exc)
    return {**record, "seconds": time.perf_counter() - start}


def save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


@click.command()
@click.option("--only", multiple=True, help=f"Run just these types (repeatable): {', '.join(TYPES)}.")
@click.option("--fixture", "fixture_name", type=click.Choice(list(FIXTURES)), default="original", show_default=True,
              help="The fixture, or its permuted twin (report: bench/peers-permuted.json).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Report (default: bench/peers.json, or bench/peers-permuted.json).")
@click.option("--resume", is_flag=True, help="Skip types already measured in --out (failed ones are retried).")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(SCOPES), default=SCOPES, show_default=True,
              help="Which scopes to score (each costs one perplexity run per text).")
def main(only, fixture_name, out, resume, scopes):
    names = list(only) or list(TYPES)
    if unknown := [n for n in names if n not in TYPES]:
        raise click.UsageError(f"unknown type(s) {unknown}; known: {', '.join(TYPES)}")
    fixture_dir, build, report_name, suffix = FIXTURES[fixture_name]
    out = out or ROOT / "bench" / report_name
    report = json.loads(out.read_text()) if resume and out.is_file() else {}
    model_dir, texts, start = build(fixture_dir), eval_texts(), time.perf_counter()
    report.update(machine=machine_info(), model=str(model_dir), fixture=fixture_name, llama_cpp=PACKAGE,
                  gguf_py=metadata.version("gguf"),
                  imatrix=IMATRIX, protocol={"seqlen": 512, "windows": 40, "texts": {k: str(texts[k]) for k in texts}})
    try:
        setup = prepare(model_dir, suffix)
    except Exception as exc:  # recorded: the JSON says why there are no numbers
        save({**report, "setup_error": str(exc)}, out)
        raise click.ClickException(f"setup failed: {exc}")
    report.pop("setup_error", None)
    report["commands"] = setup["commands"]
    model, tokenizer = load_hf(model_dir, "cpu")
    check_round_trip(setup["f32"], model)
    if "fp32" not in report:  # kept on --resume: the ratios of one file share one reference
        log("fp32 reference")
        report["fp32"] = evaluate(model, tokenizer, texts)
        save(report, out)
    runs = report.setdefault("runs", {})
    for name in names:
        if resume and "scopes" in runs.get(name, {}):
            continue
        runs[name] = quantize_and_measure(name, setup, model, tokenizer, texts, report["fp32"], scopes)
        log(f"{name}: " + json.dumps(runs[name].get("scopes", runs[name].get("error"))))
        report["seconds_last_run"] = time.perf_counter() - start
        save(report, out)


if __name__ == "__main__":
    main()
