#!/usr/bin/env python
"""Can a 7B-class model be converted on this machine, and how long would it take?

Builds a synthetic Llama with Llama-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads, 32 KV
heads) but only `--layers` decoder layers, random weights N(0, 0.02) stored as fp16 safetensors, one shard
per layer, in a temporary directory. Its vocabulary is a real tokenizer's: the SmolLM2 fixture's when it is
on this machine (49152 tokens), else a tokenizer.json found in the repository, else a byte-level BPE trained
on README.md (the vocabulary then padded to Llama-2's 32000). It converts the layers with the real
pipeline (convert.run_conversion, 4 bits by default) under a timing.PhaseTimer, with a checkpoint beside
its output as the CLI keeps one (the --bpw budget pass reads every result back from it), records the
seconds of every phase of every layer and each section's peak memory, and projects a full 32-layer conversion.

Calibration is `--nsamples` windows of README.md's tokens: text shipped with the repository, the same on
every machine, and next to free (self-sampling, the CLI default, runs the whole model for every token; it
is not what is measured here: tools/bench_sampling.py measures it). Forward and Hessian time grow with the calibration tokens; the projection
is also given at the CLI's default of 64 windows, those phases scaled linearly.

The head and the (untied, as in Llama-2) input embedding are quantized at 6 bits, one single-threaded
K-Means per column over the whole vocabulary: too long to measure whole on a small machine. By default
(`--head-rows 2048`) each is quantized on its first 2048 rows, all columns, the head with the full-size
Hessian, and the per-row phases are scaled to the full vocabulary; `--head-rows 0` runs them whole, through
the pipeline. `--speedup` also times layer 0's q/k/v group quantized one by one and in parallel threads,
and checks the two agree bit for bit. `--resume-check` converts twice more with a checkpoint (--resume):
interrupted once layer 0 is saved, then resumed; it reports the checkpoint's cost (seconds spent saving,
bytes on disk) and whether the resumed file is byte for byte the uninterrupted one.

`--shape qwen3-30b-a3b` builds a mixture of experts with Qwen3-30B-A3B's shapes instead (hidden 2048, 128
experts of 768 with 8 a token, 48 layers, its 151936-token vocabulary), the experts stored one tensor per
expert matrix as its checkpoints are; its random router spreads the calibration tokens over the experts.

    python tools/bench_scale.py                          # --layers 2 on the CPU -> bench/scale-cpu.json
    python tools/bench_scale.py --shape qwen3-30b-a3b    # -> bench/scale-cpu-qwen3-30b-a3b.json
    python tools/bench_scale.py --device cuda            # -> bench/scale-cuda.json
    python tools/bench_scale.py --smoke --out /tmp/s.json   # tiny shapes, seconds: the tool end to end

Needs torch, transformers, numba, safetensors, numpy and click; not the gguf package.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from claq_convert.quantize.calibration import DEFAULT_NSAMPLES, read_text, text_windows  # noqa: E402
from claq_convert.quantize.checkpoint import Checkpoint, checkpoint_dir  # noqa: E402
from claq_convert.cli import DEFAULT_BPW  # noqa: E402
from claq_convert.quantize.convert import TOKENIZER_FILES, ConvertOptions, fingerprint, run_conversion  # noqa: E402
from claq_convert.data import tokenize_text  # noqa: E402
from claq_convert.quantize.pipeline import (  # noqa: E402
    QuantConfig, head_target, quantize_group, quantize_weight, worker_count)
from claq_convert.quantize.sensitivity import FISHER_WINDOWS  # noqa: E402
from claq_convert.models.source import ModelSource  # noqa: E402
from claq_convert.timing import PhaseTimer  # noqa: E402

LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, num_hidden_layers=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
                 vocab_size=32000)
# a mixture of experts: Qwen3-30B-A3B's shapes (128 experts of 768, 8 a token; 48 layers)
QWEN3_30B_A3B = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, num_hidden_layers=48, rms_norm_eps=1e-6,
                     max_position_embeddings=40960, vocab_size=151936)
SHAPES = {"llama-2-7b": LLAMA2_7B, "qwen3-30b-a3b": QWEN3_30B_A3B}
SMOKE = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
             num_hidden_layers=32, rms_norm_eps=1e-5, max_position_embeddings=256, vocab_size=300)
SMOKE_MOE = dict(QWEN3_30B_A3B, hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_experts=8,
                 num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=256, vocab_size=300)
WEIGHT_STD = 0.02
CALIBRATION_TEXT = ROOT / "README.md"
ROW_PHASES = ("load", "plan", "kmeans", "gptq_update", "finish")  # grow with the head's rows; the others do not


def echo(message: str) -> None:
    click.echo(message, err=True)


def machine_info(device: torch.device) -> dict:
    import numba
    import transformers

    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numba": numba.__version__, "threads": torch.get_num_threads(), "device": str(device)}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device if device.type == "cuda" else 0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device if device.type == "cuda" else 0).total_memory
    return info


# ------------------------------------------------------------------------------------------------ the model
def _find_tokenizer_json() -> Path | None:
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in ("build", "out", "bench"))
        if "tokenizer.json" in files:
            return Path(directory) / "tokenizer.json"
    return None


def write_tokenizer(directory: Path) -> str:
    """Tokenizer files into `directory`; returns where they came from."""
    from claq_convert.fixture import DEFAULT_FIXTURE_DIR

    if (DEFAULT_FIXTURE_DIR / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (DEFAULT_FIXTURE_DIR / name).is_file():
                shutil.copy2(DEFAULT_FIXTURE_DIR / name, directory / name)
        return f"SmolLM2 fixture ({DEFAULT_FIXTURE_DIR})"
    found = _find_tokenizer_json()
    if found is not None:
        shutil.copy2(found, directory / "tokenizer.json")
        return str(found.relative_to(ROOT))
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([read_text(CALIBRATION_TEXT)], vocab_size=32000, min_frequency=2,
                            special_tokens=["<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(
        str(directory))
    return "byte-level BPE trained on README.md"


def build_model(directory: Path, shape: dict, layers: int, seed: int = 0) -> dict:
    """A model directory with `shape`'s type and sizes and `layers` decoder layers, fp16 N(0, WEIGHT_STD)
    weights (norms 1) in one safetensors shard per layer, written tensor by tensor (memory: one layer); a
    mixture's experts one tensor per expert matrix, as its checkpoints store them."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from claq_convert.models.architectures import skeleton

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_source = write_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    vocab = max(len(tokenizer), shape["vocab_size"])
    settings = {k: v for k, v in shape.items() if k != "model_type"}
    config = AutoConfig.for_model(shape["model_type"], **{**settings, "num_hidden_layers": layers, "vocab_size": vocab},
                                  tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    config.save_pretrained(str(directory))
    names = [(n, tuple(p.shape)) for n, p in skeleton(config, "meta").named_parameters()]

    def shard_of(name: str) -> str:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            return f"model-layer-{int(parts[2]):03d}.safetensors"
        return "model-head.safetensors" if name.startswith("lm_head") else "model-outside.safetensors"

    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, list] = {}
    for name, size in names:
        shards.setdefault(shard_of(name), []).append((name, size))
    weight_map = {}
    for shard, members in shards.items():
        tensors = {}
        for name, size in members:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(size, dtype=torch.float16)
            else:
                tensors[name] = (torch.randn(size, generator=gen) * WEIGHT_STD).to(torch.float16)
            weight_map[name] = shard
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    params = sum(math.prod(size) for _, size in names)
    return {"layers": layers, "vocab_size": vocab, "tokenizer": tokenizer_source, "parameters": params,
            "config": {k: v for k, v in shape.items() if k not in ("num_hidden_layers", "vocab_size")},
            "dtype": "float16", "weight_std": WEIGHT_STD}


def calibration_windows(model_dir: Path, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenize_text(tokenizer, read_text(CALIBRATION_TEXT))
    while ids.numel() <= seqlen:  # a small tokenizer's windows may outgrow the text: repeat it
        ids = torch.cat([ids, ids])
    return text_windows(ids, nsamples, seqlen, seed, where=str(CALIBRATION_TEXT))


# ------------------------------------------------------------------------------------------------ measuring
def warm_up(qc: QuantConfig) -> float:
    """Compile (or load from Numba's cache) every kernel the run uses, so no layer pays for it."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(64, 48, generator=gen)
    X = torch.randn(256, 48, generator=gen)
    H = X.T @ X / 128
    for config, h in ((qc, H), (replace(qc, bits=head_target(qc), ap_bits=None), H),
                      (replace(qc, bits=head_target(qc), ap_bits=None), None)):
        quantize_weight(W, h, config)
    return time.perf_counter() - start


def surrogate_hessian(tokens: int, hidden: int, seqlen: int, device, timer) -> torch.Tensor:
    """H = 2/n X^T X of random N(0, 1) inputs: the head's Hessian at the real cost (one addmm per window)."""
    gen = torch.Generator().manual_seed(1)
    with timer.phase("hessian"):
        total = torch.zeros(hidden, hidden, device=device)
        for start in range(0, tokens, seqlen):
            x = torch.randn(min(seqlen, tokens - start), hidden, generator=gen).to(device)
            total.addmm_(x.T, x)
        return total * (2.0 / tokens)


def sample_head(source: ModelSource, qc: QuantConfig, rows: int, tokens: int, seqlen: int, device, timer) -> dict:
    """The head (with a Hessian) and the input embedding (data-free) quantized on their first `rows` rows.

    Sections "head" and "embedding" hold only what grows with the rows (reading them, quantizing them), so
    their time and memory scale to the whole vocabulary; the head's Hessian is section "head hessian".
    """
    from safetensors import safe_open

    end_qc = replace(qc, bits=head_target(qc), ap_bits=None)
    sampled = {}
    for section, name in (("head", "lm_head.weight"), ("embedding", "model.embed_tokens.weight")):
        with safe_open(str(source.files[name]), framework="pt") as f:
            vocab, hidden = f.get_slice(name).get_shape()
            H = None
            if section == "head":
                with timer.section("head hessian"):
                    H = surrogate_hessian(tokens, hidden, seqlen, device, timer)
            with timer.section(section):
                with timer.phase("load"):
                    W = f.get_slice(name)[:rows].float().to(device)
                result = quantize_weight(W, H, end_qc, timer)
                del W, H
        sampled[section] = {"name": name, "rows_quantized": int(result.shape[0]), "rows": int(vocab),
                            "bits": int(end_qc.bits), "relative_error": result.relative_error}
    return sampled


def group_speedup(source: ModelSource, qc: QuantConfig, tokens: int, seqlen: int, device, workers: int) -> dict:
    """Layer 0's q/k/v quantized one by one, then `workers` at once: seconds of each, and whether they agree."""
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    weights = {name: source.tensor(name).float().to(device) for name in names}
    H = surrogate_hessian(tokens, weights[names[0]].shape[1], seqlen, device, PhaseTimer())
    jobs = [(name, W, H, qc, None) for name, W in weights.items()]
    timings, results = {}, {}
    for label, count in (("sequential", 1), ("parallel", workers)):
        start = time.perf_counter()
        results[label] = dict(quantize_group(jobs, count))
        timings[label] = time.perf_counter() - start
    fields = ("codes", "column_codebooks", "codebook_levels", "codebook_grid", "outlier_counts", "outlier_rows",
              "outlier_values", "bits")
    identical = all(np.array_equal(getattr(results["sequential"][n], f), getattr(results["parallel"][n], f))
                    for n in names for f in fields if getattr(results["sequential"][n], f) is not None)
    return {"group": [n.rsplit(".", 2)[-2] for n in names], "workers": min(workers, len(names)),
            "sequential_seconds": timings["sequential"], "parallel_seconds": timings["parallel"],
            "speedup": timings["sequential"] / timings["parallel"], "identical": identical}


def tree_bytes(directory: Path) -> int:
    """Bytes of every file under `directory` (a checkpoint's size on disk)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


class _TimedCheckpoint(Checkpoint):
    """A checkpoint that counts the seconds spent saving, and stops the conversion after layer `stop_after`."""
    seconds = 0.0
    stop_after = None

    def save_result(self, *args, **kwargs):
        start = time.perf_counter()
        super().save_result(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def finish_layer(self, index, states):
        start = time.perf_counter()
        super().finish_layer(index, states)
        self.seconds += time.perf_counter() - start
        if index == self.stop_after:
            raise KeyboardInterrupt


def resume_check(options: ConvertOptions, calibration: torch.Tensor, reference: Path) -> dict:
    """Convert with a checkpoint, interrupted once layer 0 is saved, then resume: cost and byte identity."""
    out = options.out.with_name("resumed.claq")
    place = checkpoint_dir(out)
    report = {}
    for run, resume in (("interrupted", False), ("resumed", True)):
        checkpoint = _TimedCheckpoint.open(place, fingerprint(options), resume)
        checkpoint.stop_after = None if resume else 0
        start = time.perf_counter()
        try:
            run_conversion(replace(options, out=out, checkpoint=checkpoint), log=echo, calibration=calibration)
        except KeyboardInterrupt:
            report["checkpoint_bytes_after_layer_0"] = tree_bytes(place)
        report[run] = {"seconds": time.perf_counter() - start, "saving_seconds": checkpoint.seconds}
    checkpoint.remove()
    report["identical"] = out.read_bytes() == reference.read_bytes()
    out.unlink()
    return report


# ------------------------------------------------------------------------------------------------ projecting
def _mean_phases(entries: list[dict]) -> dict:
    names = sorted({p for e in entries for p in e["phases"]})
    return {p: float(np.mean([e["phases"].get(p, 0.0) for e in entries])) for p in names}


def project(report: dict, layers: int, target_layers: int, nsamples: int, seqlen: int, head_rows: int, model: dict,
            target_nsamples: int = DEFAULT_NSAMPLES) -> dict:
    """Seconds of a `target_layers`-layer conversion: the mean measured layer times `target_layers`, plus
    the sections outside the layers (the head and embedding scaled to the whole vocabulary when sampled),
    at the measured calibration size and at `target_nsamples` windows (forward and Hessian scaled; the
    hidden states, held twice while a layer's outputs are computed, added to the peak memory)."""
    sections = report["sections"]
    measured = [sections[f"layer {i}"] for i in range(layers)]
    layer = {"seconds": float(np.mean([e["seconds"] for e in measured])), "phases": _mean_phases(measured)}
    token_scale = target_nsamples / nsamples

    def tokens_extra(phases: dict) -> float:  # more calibration tokens: forward and Hessian grow linearly
        return (token_scale - 1) * (phases.get("forward", 0.0) + phases.get("hessian", 0.0))

    ends = {}
    vocab, hidden = model["vocab_size"], model["config"]["hidden_size"]
    rows = min(head_rows, vocab) if head_rows else vocab
    linear = vocab / rows
    # memory: the sampled sections grow by a per-weight working set (the lower of the two rates: the
    # embedding's, which has no Hessian) plus, for the head, its H-sized extras, which do not grow with rows
    grown = {name: max(sections[name].get("peak_rss_bytes", 0) - sections[name].get("rss_at_start_bytes", 0), 0)
             for name in ("head", "embedding") if name in sections}
    rate = min(grown.values(), default=0) / (rows * hidden)
    for name in grown:
        entry = sections[name]
        if head_rows:  # scale the per-row phases to the whole vocabulary; the K-Means DP is n log n in rows
            scale = {p: linear * (math.log2(vocab) / math.log2(rows) if p == "kmeans" else 1.0) for p in ROW_PHASES}
            phases = {p: s * scale.get(p, 1.0) for p, s in entry["phases"].items()}
            seconds = entry["seconds"] + sum(phases.values()) - sum(entry["phases"].values())
            hessian = sections.get(f"{name} hessian")
            if hessian is not None:  # measured whole: it does not grow with the rows
                seconds += hessian["seconds"]
                for p, s in hessian["phases"].items():
                    phases[p] = phases.get(p, 0.0) + s
            fixed_bytes = grown[name] - rate * rows * hidden
            ends[name] = {"seconds": seconds, "phases": phases, "measured_rows": rows, "rows": vocab,
                          "bytes_per_weight": rate, "fixed_bytes": int(fixed_bytes),
                          "peak_rss_bytes": int(entry.get("rss_at_start_bytes", 0) + fixed_bytes + rate * vocab * hidden)}
            if "cuda_peak_bytes" in entry:  # the device holds the rows' weights and their working copies
                ends[name]["cuda_peak_bytes"] = int(entry["cuda_peak_bytes"] * linear)
        else:
            ends[name] = {key: entry[key] for key in ("seconds", "phases", "peak_rss_bytes", "cuda_peak_bytes")
                          if key in entry}
    fixed = {name: sections[name]["seconds"] for name in ("calibration", "inputs", "rest") if name in sections}
    # the Fisher pass (one decoder layer at a time, forward then backward) and the allocation (a loss table
    # per weight) grow with the layers in time; the Fisher pass also with its windows (min(FISHER_WINDOWS,
    # nsamples)). Its memory grows with the windows only: one layer's inputs, the gradients arriving at its
    # output and those leaving its input; every layer's inputs wait on disk (quantize/fisher_stream.py)
    windows, hidden = min(FISHER_WINDOWS, nsamples), model["config"]["hidden_size"]
    by_layers = {}
    for name in ("sensitivity", "allocation", "budget", "write"):  # the last two: every weight read back (--bpw)
        if name not in sections:
            continue
        entry = sections[name]
        grown = max(entry.get("peak_rss_bytes", 0) - entry.get("rss_at_start_bytes", 0), 0)
        seconds = entry["seconds"] * target_layers / layers
        if name == "sensitivity":
            seconds *= FISHER_WINDOWS / windows
            grown += 3 * (FISHER_WINDOWS - windows) * seqlen * hidden * 4
        by_layers[name] = {"seconds": seconds, "peak_rss_bytes": int(entry.get("rss_at_start_bytes", 0) + grown)}
        if name == "sensitivity":
            by_layers[name]["disk_bytes"] = target_layers * FISHER_WINDOWS * seqlen * hidden * 4
    projected = set(ends) | {f"{name} hessian" for name in ends} | set(by_layers)
    total = (target_layers * layer["seconds"] + sum(e["seconds"] for e in ends.values()) + sum(fixed.values())
             + sum(e["seconds"] for e in by_layers.values()))
    extra = (target_layers * tokens_extra(layer["phases"]) + sum(tokens_extra(e["phases"]) for e in ends.values())
             + tokens_extra(sections.get("inputs", {"phases": {}})["phases"]))
    parts = [e for name, e in sections.items() if name not in projected] + list(ends.values()) + list(by_layers.values())
    peaks = [e.get("peak_rss_bytes", 0) for e in parts]
    cuda_peaks = [e["cuda_peak_bytes"] for e in parts if "cuda_peak_bytes" in e]
    return {"layers": target_layers, "per_layer": layer, "head_and_embedding": ends, "other_seconds": fixed,
            "scaled_with_layers": by_layers,
            "total_seconds": total, "total_hours": total / 3600, "peak_rss_bytes": max(peaks),
            **({"cuda_peak_bytes": max(cuda_peaks)} if cuda_peaks else {}),
            f"total_seconds_at_nsamples_{target_nsamples}": total + extra,
            f"peak_rss_bytes_at_nsamples_{target_nsamples}": max(peaks) + 2 * 4 * max(target_nsamples - nsamples, 0)
            * seqlen * model["config"]["hidden_size"],
            "note": ("mean measured layer x layers + sections outside the layers; the Fisher pass and the "
                     "allocation's times scaled with the layers (the Fisher pass's head part, which does not grow, "
                     "with them: an overestimate), its memory with its windows (its layer inputs on disk); self-sampled calibration (the CLI default) not included; "
                     "the head/embedding per-row phases scaled to the vocabulary")}


# ------------------------------------------------------------------------------------------------ the command
@click.command()
@click.option("--layers", type=click.IntRange(1), default=2, show_default=True, help="Decoder layers built and converted.")
@click.option("--nsamples", type=click.IntRange(1), default=None, help="Calibration windows [8; --smoke 4].")
@click.option("--seqlen", type=click.IntRange(16), default=None, help="Tokens per window [512; --smoke 64].")
@click.option("--bpw", type=float, default=DEFAULT_BPW, show_default=True,
              help="The measured allocation's budget (the CLI default), with its Fisher pass.")
@click.option("--bits", type=float, default=None, help="The paper's fixed rule at this target instead of --bpw.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto (cuda when present).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Linears of one group quantized at once (default: torch.get_num_threads()).")
@click.option("--head-rows", type=click.IntRange(0), default=None,
              help="Quantize the head and embedding on this many rows and scale up; 0: whole, through the "
                   "pipeline [2048; --smoke 512].")
@click.option("--speedup/--no-speedup", default=True, show_default=True,
              help="Also time layer 0's q/k/v one by one against in parallel threads.")
@click.option("--resume-check", "resume_check_", is_flag=True,
              help="Also convert with a checkpoint, interrupted after layer 0 and resumed (twice the layers' time).")
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="llama-2-7b", show_default=True,
              help="Whose layer shapes: a dense 7B, or a mixture of experts (Qwen3-30B-A3B).")
@click.option("--smoke", is_flag=True, help="Tiny shapes (hidden 64): checks the tool end to end in seconds.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the temporary model and .claq go (default: the system's temp dir).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON report (default: bench/scale-cpu.json or bench/scale-cuda.json).")
def main(layers, nsamples, seqlen, bpw, bits, device, threads, head_rows, speedup, resume_check_, shape, smoke, workdir,
         out):
    """Convert a few layers of a 7B-class model's shapes with the real pipeline and project the whole conversion."""
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    named = shape
    out = out or ROOT / "bench" / (f"scale-{device.type}.json" if named == "llama-2-7b" else
                                   f"scale-{device.type}-{named}.json")
    shape = (SMOKE if named == "llama-2-7b" else SMOKE_MOE) if smoke else SHAPES[named]
    nsamples = nsamples or (4 if smoke else 8)
    seqlen = seqlen or (64 if smoke else 512)
    head_rows = head_rows if head_rows is not None else 512 if smoke else 2048
    qc = QuantConfig(bits=bits or 4.0, bpw=None if bits else bpw, quantize_embeddings=head_rows == 0)
    workers = worker_count(threads)
    report = {"tool": "tools/bench_scale.py", "machine": machine_info(device),
              "settings": {"shape": named, "layers": layers, "nsamples": nsamples, "seqlen": seqlen, "bits": qc.bits, "bpw": qc.bpw,
                           "head_bits": head_target(qc), "workers": workers, "head_rows": head_rows, "smoke": smoke,
                           "calibration": f"{nsamples} windows of {CALIBRATION_TEXT.name}"}}
    with tempfile.TemporaryDirectory(prefix="claq-scale-", dir=workdir) as tmp:
        model_dir = Path(tmp) / "model"
        start = time.perf_counter()
        report["model"] = build_model(model_dir, shape, layers)
        report["build_seconds"] = time.perf_counter() - start
        echo(f"built {report['model']['parameters'] / 1e9:.2f} B parameters in {report['build_seconds']:.0f} s "
             f"(vocabulary {report['model']['vocab_size']}, tokenizer: {report['model']['tokenizer']})")
        report["warm_up_seconds"] = warm_up(qc)
        timer = PhaseTimer(device, per_section_rss=True)
        with timer.section("calibration"):
            calibration = calibration_windows(model_dir, nsamples, seqlen)
        options = ConvertOptions(model_dir=model_dir, out=Path(tmp) / "model.claq", quant=qc, nsamples=nsamples,
                                 seqlen=seqlen, device=device, threads=workers)
        start = time.perf_counter()
        # with a checkpoint beside the output, as the CLI converts (--bpw's budget pass reads results back from it)
        checkpoint = Checkpoint.open(checkpoint_dir(options.out), fingerprint(options), resume=False)
        try:
            record = run_conversion(replace(options, checkpoint=checkpoint), log=echo, calibration=calibration,
                                    timer=timer)
            report["checkpoint_bytes"] = tree_bytes(checkpoint.path)
        finally:
            checkpoint.remove()
        report["convert_seconds"] = time.perf_counter() - start
        report["file_bytes"] = record["file_bytes"]
        source = ModelSource(model_dir)
        if head_rows:
            echo(f"head and embedding on their first {head_rows} rows")
            report["head_sample"] = sample_head(source, qc, head_rows, nsamples * seqlen, seqlen, device, timer)
        report["timing"] = timer.report()
        if resume_check_:
            echo("with a checkpoint: interrupted after layer 0, then resumed")
            report["resume"] = resume_check(options, calibration, options.out)
        if speedup:
            echo(f"q/k/v of layer 0: one by one, then {workers} at once")
            report["group_speedup"] = group_speedup(source, qc, nsamples * seqlen, seqlen, device, max(workers, 2))
    report["projection"] = project(report["timing"], layers, SHAPES[named]["num_hidden_layers"], nsamples, seqlen,
                                   head_rows, report["model"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    p = report["projection"]
    click.echo(f"{device}: {p['per_layer']['seconds']:.1f} s a layer; {p['layers']} layers projected "
               f"{p['total_hours']:.2f} h, peak RSS {p['peak_rss_bytes'] / 2**30:.2f} GiB -> {out}")


if __name__ == "__main__":
    main()
