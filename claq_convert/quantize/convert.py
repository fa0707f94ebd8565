"""One conversion run: calibration, layer-by-layer quantization, byte accounting, optional evaluation."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, MutableMapping, Optional

import numpy as np
import torch

from .. import __version__
from ..format import spec
from ..format.reader import decode_claq
from ..format.writer import ClaqWriter, encode_claq_sections
from ..models.source import ModelSource, check_checkpoint, load_pretrained
from ..progress import Progress, no_progress
from ..timing import NO_TIMER, Timer
from .calibration import DEFAULT_NSAMPLES
from .checkpoint import Checkpoint
from .columns import GRID_MAX_BITS
from .gptq import QuantizedWeight
from .pipeline import QuantConfig, head_target, input_energies, quantize_model
from .sensitivity import FISHER_WINDOWS, FisherSums, per_expert_use, weights_by_name


@dataclass
class ConvertOptions:
    model_dir: Path
    out: Optional[Path]
    quant: QuantConfig
    calib: tuple = ()                  # calibration sources (calibration.py); () is default_sources(nsamples)
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = 512
    seed: int = 0
    device: torch.device = torch.device("cpu")
    evaluate: bool = False
    eval_texts: Optional[dict] = None  # name -> text file scored by --eval; None: WikiText-2 test only
    raw_dtype: Optional[str] = None    # F32/F16/BF16 for the tensors kept raw; None: each keeps its source dtype
    threads: Optional[int] = None      # linears of one group quantized at once; None: torch.get_num_threads()
    checkpoint: Optional[Checkpoint] = None  # finished work saved here, and continued from (checkpoint.py)


def stored_bytes(result: QuantizedWeight) -> int:
    """Honest storage of one quantized weight in bytes, padding included.

    Codebook methods: the .claq sections, as the writer encodes them. Uniform baselines (not written by this version): the packed
    codes plus an fp16 scale and an fp16 zero point per row and group, and with groups an int32 group
    index per column, each padded like a section.
    """
    rows, cols = result.shape
    if result.method == "uniform":
        b, groups = int(result.bits[0]), result.scale.shape[0]
        group_map = spec.align(4 * cols) if groups > 1 else 0  # int32 group per column (act-order groups)
        return spec.align(4 * spec.code_words(rows * cols, b)) + 2 * spec.align(2 * rows * groups) + group_map
    return sections_bytes(encode_result(result))  # coded levels vary with the levels


def sections_bytes(sections: dict) -> int:
    """The bytes a weight's encoded sections take in the file, each padded."""
    return sum(spec.align(array.nbytes) for array in sections.values())


class EncodedResults:
    """The sections of the latest result encoded: a weight counted and then written is encoded once. The
    budget pass counts every weight before any is written, and a weight is encoded again when written
    (about 22 ns a parameter: 19 ms for a 1536 x 576 weight, some 2.4 min for a 7B): holding each one's
    sections until its write held them all at once (about the quantized tensors' size in the file)."""

    def __init__(self):
        self._latest: Optional[tuple[QuantizedWeight, dict]] = None

    def sections(self, result: QuantizedWeight) -> dict:
        if self._latest is None or self._latest[0] is not result:
            self._latest = None  # the previous sections go before the next are made
            self._latest = (result, encode_result(result))
        return self._latest[1]

    def stored_bytes(self, result: QuantizedWeight) -> int:
        """stored_bytes(result), counted on the encoding."""
        if result.method == "uniform":
            return stored_bytes(result)
        return sections_bytes(self.sections(result))


def held_results(stream, checkpoint: Optional[Checkpoint]) -> MutableMapping:
    """Every (name, result) of `stream`, for the budget pass. With a checkpoint, which saved each result as it
    came, they are read back from its files one at a time when asked (checkpoint.SavedResults); without
    one they are held in memory."""
    if checkpoint is None:
        return dict(stream)
    names = [name for name, _ in stream]  # each result goes as soon as the next comes
    saved = checkpoint.saved_results()
    if list(saved) != names:
        raise RuntimeError(f"{checkpoint.path} does not hold the results the conversion made, in its order")
    return saved


def tensor_record(result: QuantizedWeight, nbytes: Optional[int] = None) -> dict:
    """What the run record says of one weight; `nbytes`: its stored_bytes when already known."""
    rows, cols = result.shape
    nbytes = stored_bytes(result) if nbytes is None else nbytes
    return {"shape": [rows, cols], "bits_histogram": {str(b): int(n) for b, n in zip(*np.unique(result.bits, return_counts=True))},
            "nominal_bits": float(result.bits.mean()), "outliers": int(result.outlier_counts.sum()),
            "stored_bytes": nbytes, "bpw": nbytes * 8 / (rows * cols), "relative_error": result.relative_error,
            "seconds": result.info.get("seconds", 0.0), "kernel_seconds": result.info.get("kernel_seconds", 0.0)}


def summarize(tensors: dict[str, dict]) -> dict:
    params = sum(t["shape"][0] * t["shape"][1] for t in tensors.values())
    nbytes = sum(t["stored_bytes"] for t in tensors.values())
    nominal = sum(t["nominal_bits"] * t["shape"][0] * t["shape"][1] for t in tensors.values())
    return {"params": params, "stored_bytes": nbytes, "honest_bpw": nbytes * 8 / params,
            "nominal_bits": nominal / params, "outliers": sum(t["outliers"] for t in tensors.values()),
            "mean_relative_error": float(np.mean([t["relative_error"] for t in tensors.values()])),
            "kernel_seconds": sum(t["kernel_seconds"] for t in tensors.values())}


def encode_result(result: QuantizedWeight) -> dict:
    if result.method != "codebook":
        raise ValueError("only codebook methods (claq, kmeans) are stored in .claq files; evaluate baselines with --dry-run")
    grid = result.codebook_grid is not None
    return encode_claq_sections(result.shape[0], result.bits, result.codes,
                                result.codebook_levels if grid else result.column_codebooks,
                                result.outlier_counts, result.outlier_rows, result.outlier_values,
                                result.codebook_grid if grid else None)


# Files of a model directory that a runtime needs besides the weights and config.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


RAW_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def raw_array(tensor: torch.Tensor, dtype: Optional[str] = None) -> tuple[np.ndarray, str]:
    """A tensor kept raw, as (array, .claq dtype): its source dtype unless `dtype` overrides (never upcast
    silently); a scalar as shape [1] (the format's shapes have 1 to 8 sizes)."""
    if dtype is not None:
        tensor = tensor.to(RAW_DTYPES[dtype])
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16), "BF16"
    array = tensor.numpy()
    return array, None


def write_model_rest(writer: ClaqWriter, source: ModelSource, quantized: set, record: dict,
                     raw_dtype: Optional[str] = None, replaced: Optional[dict] = None) -> None:
    """Everything but the quantized weights: other tensors raw (`replaced`: name -> the values to store
    instead of the source's, in its dtype), config, tokenizer, the conversion record."""
    import json

    replaced = replaced or {}
    for name in source.names():
        if name in quantized:
            continue
        tensor = source.tensor(name)
        if name in replaced:  # already rounded to the dtype it is stored in (convert.tune_model)
            tensor = replaced[name] if raw_dtype else replaced[name].to(tensor.dtype)
        array, dtype = raw_array(tensor, raw_dtype)
        writer.add_raw(name, array, dtype=dtype)
    generation = source.dir / "generation_config.json"
    writer.metadata.update(
        config=source.config_dict(),
        generation_config=json.loads(generation.read_text()) if generation.is_file() else None,
        conversion=record)
    for filename in TOKENIZER_FILES:
        path = source.dir / filename
        if path.is_file():
            writer.add_file(filename, path.read_bytes())


def run_conversion(options: ConvertOptions, progress: Progress = no_progress,
                   log: Callable[[str], None] = lambda s: None, ppl_before: Optional[dict] = None,
                   calibration: Optional[torch.Tensor] = None, timer: Timer = NO_TIMER) -> dict:
    """Quantize, account and (options.evaluate) evaluate; `ppl_before` reuses a known baseline and
    `calibration` given token windows (else they are made from options.calib). `timer` gets the
    pipeline's sections and phases, plus "calibration", each weight's "write" and "rest" (timing.py)."""
    from transformers import AutoTokenizer

    from ..models.architectures import family_of
    from .calibration import calibration_set, default_sources, describe, self_windows

    qc = options.quant
    qc.validate()
    source = ModelSource(options.model_dir)
    family_of(source.config())
    check_checkpoint(source)
    tokenizer = AutoTokenizer.from_pretrained(str(options.model_dir))
    sources = tuple(options.calib) or default_sources(options.nsamples)
    start = time.perf_counter()
    checkpoint = options.checkpoint
    if calibration is None and checkpoint is not None:
        calibration = checkpoint.calibration()
    if calibration is None:
        with timer.section("calibration"):
            sampled = self_windows(sources, options.nsamples)
            calibration = calibration_set(sources, tokenizer,
                                          lambda: load_sampler_within_memory(options.model_dir, options.device,
                                                                             options.seqlen, sampled),
                                          options.nsamples, options.seqlen, options.seed, progress=progress)
    if checkpoint is not None:
        checkpoint.save_calibration(calibration)
    calib_seconds = time.perf_counter() - start
    record = {"tool": f"claq-convert {__version__}", "model": str(options.model_dir), "quant": qc.to_dict(),
              "calibration": {"sources": describe(sources), "nsamples": int(calibration.shape[0]), "seqlen": options.seqlen,
                              "seed": options.seed},
              "device": str(options.device)}
    saved = checkpoint.allocation() if checkpoint is not None and qc.bpw is not None else None
    fisher, weights = _sensitivity(options, source, calibration, saved is not None, record, progress, timer)
    targets = None
    if qc.bpw is not None:
        with timer.section("allocation"):
            targets, record["allocation"] = saved or allocate_bits(source, calibration, qc, options.device, log,
                                                                   fisher, weights)
        if checkpoint is not None and saved is None:
            checkpoint.save_allocation(targets, record["allocation"])
    results: MutableMapping[str, QuantizedWeight] = {}  # --eval's, where no checkpoint holds them
    tensors = {}
    norms: dict[str, torch.Tensor] = {}
    writer = ClaqWriter(options.out) if options.out is not None else None
    encoded = EncodedResults()
    try:
        # the checkpoint holds every result as the file will, unless tuning changes them: --bpw and --eval
        # read them back from it one at a time (so a resumed --bpw run need not load them on the way)
        read_back = checkpoint if not qc.tune_steps else None
        stream = _quantized(options, source, calibration, targets, weights, progress, log, timer,
                            load_saved=read_back is None or qc.bpw is None)
        every = None  # tuning, --bpw: every result first, written once every layer's section has closed
        if qc.tune_steps:  # tuning moves all codebooks at once
            with timer.section("tuning"):
                every, norms, record["tuning"] = tune_model(options, dict(stream), calibration, progress, log)
        if qc.bpw is not None:  # the allocation estimated coded levels: count what the file will hold
            from .budget import within_budget

            if every is None:  # read back one at a time from a checkpoint (else held in memory)
                every = held_results(stream, read_back)
            with timer.section("budget"):
                every, record["budget"] = within_budget(every, record["allocation"]["budget_bytes"],
                                                        encoded.stored_bytes, log, progress)
        if every is not None:
            stream = progress(every.items(), "write weights", len(every))
        for name, result in stream:
            with timer.section("write") if every is not None else contextlib.nullcontext(), timer.phase("write"):
                tensors[name] = tensor_record(result, encoded.stored_bytes(result))
                if writer is not None:
                    sections = encoded.sections(result)
                    # The file must hold exactly what the quantizer produced: decode what we are about to write.
                    if not np.array_equal(decode_claq(result.shape[0], sections), result.dequantize()):
                        raise RuntimeError(f"{name}: encoded sections do not decode to the quantizer's result")
                    written = writer.add_quantized(name, result.shape[0], sections)
                    if written != tensors[name]["stored_bytes"]:
                        raise RuntimeError(f"{name}: byte accounting ({tensors[name]['stored_bytes']}) "
                                           f"disagrees with the file ({written})")
            if options.evaluate and read_back is None:
                results[name] = result
        record.update(tensors=tensors, summary=summarize(tensors))
        if writer is not None:
            with timer.section("rest"), timer.phase("write"):
                write_model_rest(writer, source, set(tensors), without_wall_clock(record), options.raw_dtype, norms)
                writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    record["seconds"] = {"convert": time.perf_counter() - start, "calibration": calib_seconds}
    if options.out is not None:
        record["out"] = str(options.out)
        record["file_bytes"] = Path(options.out).stat().st_size
        record["parameters"] = source_parameters(source)
        record["file_bits_per_parameter"] = record["file_bytes"] * 8 / record["parameters"]
    if options.evaluate:
        if read_back is not None:  # one at a time, as the file holds them
            results = every if every is not None else read_back.saved_results()
        record.update(evaluate_before_after(options, results, progress, ppl_before, norms))
    return record


def tune_model(options: ConvertOptions, results: dict[str, QuantizedWeight], calibration: torch.Tensor,
               progress: Progress, log) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict]:
    """Codebooks (and norm scales) tuned by distillation from the source model (tuning.py)."""
    from ..models.architectures import family_of, unstack_experts
    from .tuning import tune

    qc = options.quant
    teacher = load_sampler(options.model_dir, options.device).float()
    student = load_pretrained(options.model_dir, dtype=torch.float32).to(options.device)
    unstack_experts(student, student.config)  # one weight per expert matrix, as quantized
    family = family_of(student.config)
    start = time.perf_counter()
    tuned, norms, record = tune(student, teacher, results, family.transposed, calibration, qc.tune_steps, qc.tune_lr,
                                seed=options.seed, progress=progress, log=log)
    record["seconds"] = time.perf_counter() - start
    source = ModelSource(options.model_dir)
    # as the file will store them (the source's dtype or --raw-dtype), so --eval scores what is written
    stored = {name: value.to(RAW_DTYPES[options.raw_dtype] if options.raw_dtype else source.tensor(name).dtype)
              for name, value in norms.items() if name in source.files}
    return tuned, {name: value.float() for name, value in stored.items()}, record


def _sensitivity(options: ConvertOptions, source: ModelSource, calibration, allocated: bool, record: dict,
                 progress, timer) -> tuple[Optional[FisherSums], Optional[dict]]:
    """(Fisher sums if measured now, row weights if used): one backward pass serves the allocation and the
    row weights; a resumed conversion reuses the checkpoint's weights (and allocation: `allocated`)."""
    qc, checkpoint = options.quant, options.checkpoint
    weights = checkpoint.row_weights() if checkpoint is not None else None
    wants_weights = qc.method == "claq" and qc.row_weighting == "fisher"
    wants_fisher = qc.bpw is not None and qc.allocation == "fisher"
    if wants_fisher or wants_weights:  # the same record whether measured now or reused by --resume
        record["sensitivity"] = {"windows": min(FISHER_WINDOWS, int(calibration.shape[0]))}
    fisher = None
    if (wants_fisher and not allocated) or (wants_weights and weights is None):
        with timer.section("sensitivity"):
            tick = time.perf_counter()
            fisher = measure_fisher(source, calibration, options.device, progress,
                                    head=wants_weights and qc.quantize_embeddings)
            record["sensitivity"]["seconds"] = time.perf_counter() - tick
        fisher, _ = per_expert_use(fisher)  # a mixture's experts budgeted as if used alike
    if wants_weights and weights is None:
        weights = weights_by_name(fisher)
        if checkpoint is not None:
            checkpoint.save_row_weights(weights)
    return fisher, weights if wants_weights else None


def _quantized(options: ConvertOptions, source: ModelSource, calibration, targets, weights, progress, log, timer,
               load_saved: bool = True):
    """quantize_model's results; with a checkpoint, first those it holds (without `load_saved` their names,
    each with None, for a caller that reads them back itself), and each new one saved as it comes."""
    checkpoint = options.checkpoint
    if checkpoint is None:
        yield from quantize_model(source, calibration, options.quant, options.device, progress=progress, log=log,
                                  targets=targets, threads=options.threads, timer=timer, row_weights=weights)
        return
    finished = checkpoint.finished(options.device)
    if finished.layers or finished.ends:
        log(f"resuming from {checkpoint.path}: layers done {finished.layers}"
            + (f", and {', '.join(finished.ends)}" if finished.ends else ""))
    yield from checkpoint.results() if load_saved else ((name, None) for name in checkpoint.result_names())
    ends = set(end_tensors(source)) if options.quant.quantize_embeddings else set()
    for name, result in quantize_model(source, calibration, options.quant, options.device, progress=progress, log=log,
                                       targets=targets, threads=options.threads, timer=timer,
                                       start_layer=finished.layers, start_states=finished.states, done=finished.ends,
                                       on_layer=checkpoint.finish_layer, row_weights=weights,
                                       start_shared=finished.shared):
        checkpoint.save_result(name, result, end=name in ends)  # before the pipeline goes on
        yield name, result


# Wall-clock measurements stay out of the file: a file is a function of its inputs alone, so a resumed
# conversion writes the very bytes of an uninterrupted one (they stay in the run record, --json).
WALL_CLOCK_KEYS = ("seconds", "kernel_seconds")


def without_wall_clock(value):
    """`value` (a conversion record) less every WALL_CLOCK_KEYS entry, at any depth."""
    if isinstance(value, dict):
        return {k: without_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(value, list):
        return [without_wall_clock(v) for v in value]
    return value


def fingerprint(options: ConvertOptions) -> dict:
    """Everything that determines a conversion's output but its calibration token ids (which the checkpoint
    keeps and hashes): a resumed conversion must match it. Model and text files by size and mtime
    (hashing a 7B checkpoint would cost minutes); threads, as float sums may depend on them."""
    import sys

    from .calibration import BUILTIN_TEXTS, SELF, default_sources, parse_source
    from .pipeline import worker_count

    def stat(path: Path) -> list[int]:
        info = Path(path).stat()
        return [info.st_size, info.st_mtime_ns]

    def identity(source) -> object:  # what a calibration source's windows depend on
        name = str(parse_source(source)[0])
        return SELF if name == SELF else sys.version if name in BUILTIN_TEXTS else stat(Path(name))

    source = ModelSource(options.model_dir)
    files = set(source.files.values()) | {source.dir / n for n in ("config.json", "generation_config.json",
                                                                    "model.safetensors.index.json", *TOKENIZER_FILES)}
    sources = tuple(options.calib) or default_sources(options.nsamples)
    return {"tool": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "model": {"dir": str(options.model_dir),  # as the file's record has it
                      "files": {p.name: stat(p) for p in sorted(files) if p.is_file()}},
            "quant": options.quant.to_dict(),
            "calibration": {"sources": [[str(s), identity(s)] for s in sources],
                            "nsamples": options.nsamples, "seqlen": options.seqlen, "seed": options.seed},
            "raw_dtype": options.raw_dtype, "device": str(options.device),
            "threads": {"torch": torch.get_num_threads(), "workers": worker_count(options.threads)}}


def measure_fisher(source: ModelSource, calibration: torch.Tensor, device, progress: Progress = no_progress,
                   head: bool = False):
    """sensitivity.FisherSums of every block linear (and with `head` of the weight quantized as the output
    head), from the unquantized model over spread windows, one decoder layer in memory at a time."""
    from .fisher_stream import streamed_fisher_sums
    from .sensitivity import spread_windows

    return streamed_fisher_sums(source, spread_windows(calibration), device, head, progress)


def allocate_bits(source: ModelSource, calibration: torch.Tensor, qc, device, log,
                  fisher=None, weights: Optional[dict] = None) -> tuple[dict, dict]:
    """Bit settings per weight for the --bpw budget (allocation.py), and a record of what was chosen.

    The block linears compete for the budget. The head and an untied input embedding keep their fixed
    target (head_target) and are paid from the same budget first: their loss is not comparable with the
    blocks' (measured: allocated with them, the head fell to 1-2 bits and a relative error of 0.58).
    """
    from .allocation import (MAX_BITS, allocate, allocate_columns, candidates, coded_code_bits, coded_level_bits,
                             column_losses, stored_estimate)
    from ..models.architectures import family_of

    start = time.perf_counter()
    family = family_of(source.config())
    columns = {}
    if qc.allocation == "fisher":  # its losses need no input energies (a forward pass, 82 s on SmolLM2)
        fisher = fisher or measure_fisher(source, calibration, device)
        columns = fisher.columns
        energies = {name: None for name in columns if name != fisher.head}  # the block linears, in order
    else:
        energies = input_energies(source, calibration, device, quantize_embeddings=False)
    weights = weights or {}
    relative = qc.allocation == "relative"
    rows, tables, params, outliers, level_bits, code_bits = {}, {}, 0, {}, {}, {}
    # grid levels priced as the v3 writer codes them, code streams as v4 codes them (estimated;
    # within_budget holds the file to the budget)
    coded = qc.codebook != "f16"
    coded_streams = spec.VERSION in spec.HUFFMAN_VERSIONS
    for name in energies:  # one weight in memory at a time: only its loss table is kept
        W = family.layout(name, source.tensor(name).float().numpy())
        rows[name], params = W.shape[0], params + W.size
        if qc.outlier_bits:
            outliers[name] = _outlier_total(W, qc)
        if coded:
            level_bits[name] = coded_level_bits(W, GRID_MAX_BITS, row_weights=weights.get(name))
        if coded_streams:
            code_bits[name] = coded_code_bits(W, MAX_BITS)
        if qc.allocation_unit == "column":
            tables[name] = column_losses(W, energies[name], relative, columns.get(name), weights.get(name))
        else:
            tables[name] = candidates(W, energies[name], qc.outlier_threshold, relative=relative,
                                      codebook=qc.codebook, fisher=columns.get(name), row_weights=weights.get(name),
                                      level_bits=level_bits.get(name), code_bits=code_bits.get(name))
        del W
    fixed, targets = 0, {}
    width = int(round(head_target(qc)))
    for name in end_tensors(source) if qc.quantize_embeddings else ():
        end_rows, end_cols = source.shape(name)
        W = source.tensor(name).float().numpy() if qc.outlier_bits or coded or coded_streams else None
        kept = _outlier_total(W, qc) if qc.outlier_bits else (0, 0)
        fixed += stored_estimate(end_rows, np.full(end_cols, width), kept, qc.codebook,
                                 coded_level_bits(W, GRID_MAX_BITS, widths=[width], row_weights=weights.get(name))
                                 if coded and width <= GRID_MAX_BITS else None,
                                 coded_code_bits(W, width) if coded_streams else None)
        del W
        params += end_rows * end_cols
        targets[name] = (width, width, 0.0)
    budget = int(qc.bpw * params // 8)
    if qc.allocation_unit == "column":
        widths = allocate_columns(tables, rows, budget - fixed, qc.codebook, outliers, level_bits, code_bits)
        spent = fixed + sum(stored_estimate(rows[name], bits, outliers.get(name, (0, 0)), qc.codebook,
                                            level_bits.get(name), code_bits.get(name)) for name, bits in widths.items())
        targets.update({name: {"widths": bits.tolist()} for name, bits in widths.items()})
    else:
        choice = allocate(tables, budget - fixed)
        spent = sum(c.nbytes for c in choice.values()) + fixed
        targets.update({name: c.setting.as_tuple() for name, c in choice.items()})
    log(f"allocation: {spent} of {budget} bytes ({spent * 8 / params:.4f} bpw) over {len(tables)} weights, "
        f"{time.perf_counter() - start:.1f} s")
    # the record (it goes into the file) names each weight's setting, or counts its columns per width 1..8
    chosen = {name: np.bincount(t["widths"], minlength=9)[1:].tolist() if isinstance(t, dict) else t
              for name, t in targets.items()}
    record = {"budget_bytes": budget, "allocated_bytes": spent, "seconds": time.perf_counter() - start,
              "unit": qc.allocation_unit, "targets": chosen}
    return targets, record


def _outlier_total(W: np.ndarray, qc) -> tuple[int, int]:
    """(outliers the quantizer will keep in W, the most in one column): pipeline.outlier_reserve's."""
    from .pipeline import outlier_reserve

    reserve = outlier_reserve(W, qc)
    return int(reserve.sum()), int(reserve.max(initial=0))


def end_tensors(source: ModelSource) -> list[str]:
    """The head (a tied embedding's name), an untied input embedding and the family's other token tables
    (Gemma 4's per-layer embeddings), as the checkpoint names them."""
    from transformers import AutoModelForCausalLM

    from .pipeline import head_and_embedding_names, lookup_names

    config = source.config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ends = [n for n in head_and_embedding_names(model, config, set(source.names())) if n is not None]
    return ends + lookup_names(model, config)


def source_parameters(source: ModelSource) -> int:
    """Every parameter the checkpoint stores (a tied embedding once), as the model holds them: an FP8 weight
    without its scales, MXFP4 experts by their values rather than their bytes."""
    return sum(int(np.prod(source.shape(name))) for name in source.names())


def load_sampler_within_memory(model_dir: Path, device: torch.device, seqlen: int, windows: int):
    """load_sampler's model for `windows` self-sampled windows, refused with what to do instead where it
    would not fit in the memory free on `device`: its weights (the checkpoint's bytes, before loading),
    then the KV cache of the sequences sampled at once (after). Thrashing through the weights at every token,
    or being killed once they are loaded, would cost the user far more than the one line."""
    from ..data import DataError
    from .calibration import cache_bytes_per_sequence, sampling_batch
    from .replay import free_bytes

    def size(n: int) -> str:
        return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    def refuse_unless_free(need: int, what: str) -> None:
        free = free_bytes(device)
        if need > free:
            raise DataError(f"sampling calibration text from the model needs {what} in memory, {size(need)}, and "
                            f"{device} has {size(free)} free; calibrate on text instead (--calib python-docs "
                            "--calib python-code, or --calib FILE) or free memory")

    refuse_unless_free(sum(path.stat().st_size for path in set(ModelSource(model_dir).files.values())),
                       "its weights")
    model = load_sampler(model_dir, device)
    dtype = next(model.parameters()).dtype
    batch = min(sampling_batch(model.config, seqlen, dtype), windows)
    refuse_unless_free(batch * (cache_bytes_per_sequence(model.config, seqlen, dtype) or 0),
                       f"beside its weights the keys and values of {batch} sequences")
    return model


def load_sampler(model_dir: Path, device: torch.device):
    """The unquantized model, for sampling calibration text from it, in the checkpoint's own dtype: a
    7B model in 16 bits takes 13.5 GB where fp32 would take 27. On the CPU fp16 becomes bfloat16 (the
    same size, with native CPU matrix products where fp16 has few)."""
    model = load_pretrained(model_dir, dtype="auto").to(device).eval()
    if device.type == "cpu" and model.dtype == torch.float16:
        model = model.to(torch.bfloat16)
    return model


def evaluate_before_after(options: ConvertOptions, results: MutableMapping[str, QuantizedWeight], progress: Progress,
                          ppl_before: Optional[dict] = None, replaced: Optional[dict] = None) -> dict:
    """Perplexity on each evaluation text before and after; `ppl_before` (name -> result) reuses known
    baselines; `replaced`: raw tensors the file stores changed (tuned norm scales)."""
    from transformers import AutoTokenizer

    from ..data import default_text
    from ..runtime.evaluate import perplexity

    texts = options.eval_texts or {"wikitext": default_text("test")}
    tokenizer = AutoTokenizer.from_pretrained(str(options.model_dir))
    model = load_pretrained(options.model_dir, dtype=torch.float32).to(options.device).eval()
    known = ppl_before or {}
    before = {name: known.get(name) or perplexity(model, tokenizer, path, progress=progress).to_dict()
              for name, path in texts.items()}
    apply_dequantized(model, results)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in (replaced or {}).items():  # as the file stores it: in the source's dtype
            params[name].copy_(value)
    after = {name: perplexity(model, tokenizer, path, progress=progress).to_dict() for name, path in texts.items()}
    return {"ppl_before": before, "ppl_after": after}


@torch.no_grad()
def apply_dequantized(model, results: MutableMapping[str, QuantizedWeight]) -> None:
    """Replace each quantized weight of an fp32 model by its dequantized values (in place), one result
    read at a time (checkpoint.SavedResults reads each from disk when asked)."""
    from ..models.architectures import family_of, unstack_experts

    family = family_of(model.config)
    unstack_experts(model, model.config)  # the results name each expert's matrices
    params = dict(model.named_parameters())
    for name, result in results.items():
        params[name].copy_(torch.from_numpy(family.layout(name, result.dequantize())))
