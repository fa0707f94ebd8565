"""Sequential, layer-by-layer quantization of a causal LM (GPTQ's calibration scheme).

The calibration batch runs through the model one decoder layer at a time; each layer's inputs are the
outputs of the already-quantized layers before it. Inside a layer the linears are quantized in
true-sequential groups, the inputs of each group recomputed after the previous group is quantized.
Only the layer being quantized is materialised (RAM about one layer); weights stream from safetensors.
The linears of one group are independent of each other, so they are quantized in parallel threads
(`quantize_group`), with results identical to the one-by-one order.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import MutableMapping
import inspect
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Collection, Iterator, Optional

import numpy as np
import torch

from ..format import spec
from ..models.architectures import Resolved, inside, persistent_buffers, resolve, skeleton
from ..models.source import ModelSource
from ..progress import Progress, no_progress
from ..timing import NO_TIMER, Timer
from .columns import CODEBOOKS, column_ranking, column_reserve, grid_codebooks, plan_columns
from .gptq import GPTQ, QuantizedWeight
from .replay import LayerReplay, memory_share, return_freed_memory
from .target import toward_source
from .tuning import TUNE_LR

METHODS = ("claq", "kmeans", "gptq", "rtn")
ALLOCATIONS = ("relative", "absolute", "fisher")
ROW_WEIGHTINGS = ("fisher", "none")
ALLOCATION_UNITS = ("column", "matrix")


@dataclass
class QuantConfig:
    method: str = "claq"
    bits: float = 4.0                 # target; fractional means adaptive precision (claq only)
    ap_bits: Optional[tuple[int, int]] = None   # explicit (low, high) for adaptive precision
    outlier_bits: float = 0.0         # outlier-reservation budget, extra bits per weight
    outlier_threshold: float = 13.0   # S of Outlier Order
    or_top_fraction: float = 0.1
    or_top_share: float = 0.5
    fit_outliers: bool = False        # K-Means on the whole column, reserved outliers included
    ranking: str = "outlier"          # column ranking for AP and OR; "random" is an ablation
    blocksize: int = 128
    percdamp: float = 0.01
    actorder: bool = True
    kmeans_iters: int = 0             # 0: exact 1-D K-Means optimum (DP); > 0: Lloyd, at most this many
    quantize_embeddings: bool = True  # also the output head and the input embedding (one tensor when tied)
    head_bits: Optional[float] = None # target of the head/embedding; None: HEAD_EXTRA_BITS above `bits`
    group_size: int = 0               # uniform baselines: a grid per this many columns (0: per row)
    bpw: Optional[float] = None       # measured allocation: quantized tensors take at most this many bits per weight
    allocation: str = "fisher"        # its loss per weight: "fisher", the model loss it adds (sensitivity.py),
                                      # or the layer output error "relative" to the weight's output energy, or
                                      # "absolute"
    allocation_unit: str = "column"   # "column": every column its own width; "matrix": one setting a weight
    row_weighting: str = "fisher"     # claq: the rows' weights in each column's K-Means, "fisher"
                                      # (sensitivity.py) or "none"
    codebook: str = "auto"            # codebook entries: "grid" (u8 levels, fp16 offset+step a column), "f16",
                                      # or "auto": grid where every width is <= columns.GRID_MAX_BITS
    tune_steps: int = 0               # > 0: codebooks (and norm scales) tuned by distillation, this many windows
    tune_lr: float = TUNE_LR          # the codebook entries' learning rate (tuning.py)
    toward_source: float = 0.0        # claq/gptq: GPTQ's target pulled this share of the way toward the source
                                      # layer's output on the source model's inputs (target.py)
    grid_guard: float = 0.0           # grid codebooks: a column whose grid rounding makes more than this share
                                      # of its error keeps its largest weights in fp16 where they pay for
                                      # their bits (numba_quant.gptq_block)
    column_widths: Optional[tuple[int, ...]] = field(default=None, repr=False)  # one weight's allocated
                                      # widths (set per weight from a column allocation; not a user option)

    def validate(self) -> None:
        numbers = {"bits": self.bits, "outlier_bits": self.outlier_bits, "outlier_threshold": self.outlier_threshold,
                   "percdamp": self.percdamp, "bpw": self.bpw, "head_bits": self.head_bits, "tune_lr": self.tune_lr,
                   "toward_source": self.toward_source, "grid_guard": self.grid_guard}
        for name, value in numbers.items():
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number, not {value}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method != "claq" and (not float(self.bits).is_integer() or self.outlier_bits):
            raise ValueError("fractional bits and outlier reservation are CLAQ features; use --method claq")
        if self.method in ("gptq", "rtn") and not 2 <= self.bits <= 8:
            raise ValueError("uniform methods take 2..8 bits")
        if self.method in ("claq", "kmeans") and not 1 <= self.bits <= 8:
            raise ValueError("codebook methods take 1..8 bits (codebooks of at most 256 entries)")
        if self.group_size and (self.method not in ("gptq", "rtn") or self.group_size < 0):
            raise ValueError("--group-size is a positive column count for the uniform baselines (gptq, rtn)")
        if self.bpw is not None and (self.method != "claq" or not 1 < self.bpw <= 5):
            raise ValueError("--bpw (measured allocation) is a CLAQ option, a budget in (1, 5] bits per weight")
        if self.bpw is not None and self.outlier_bits and (self.allocation_unit != "column"
                                                           or self.outlier_bits >= self.bpw - 1):
            raise ValueError("--outlier-bits with --bpw: a part of the budget, below --bpw minus 1, "
                             "with the column allocation (--allocation-unit column)")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation loss {self.allocation!r}; use one of {', '.join(ALLOCATIONS)}")
        if self.outlier_bits < 0:
            raise ValueError("--outlier-bits must be >= 0")
        if self.head_bits is not None and not 1 <= self.head_bits <= 8:
            raise ValueError("--head-bits must lie in 1..8")
        if self.allocation_unit not in ALLOCATION_UNITS:
            raise ValueError(f"unknown allocation unit {self.allocation_unit!r}; use one of {', '.join(ALLOCATION_UNITS)}")
        if self.row_weighting not in ROW_WEIGHTINGS:
            raise ValueError(f"unknown row weighting {self.row_weighting!r}; use one of {', '.join(ROW_WEIGHTINGS)}")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"unknown codebook storage {self.codebook!r}; choose one of {', '.join(CODEBOOKS)}")
        if not isinstance(self.tune_steps, int) or self.tune_steps < 0:
            raise ValueError("--tune-steps must be a whole number >= 0")
        if self.tune_steps and (self.method not in ("claq", "kmeans") or not 0 < float(self.tune_lr) < 1):
            raise ValueError("--tune-steps tunes codebooks (methods claq, kmeans), at a learning rate in (0, 1)")
        if not 0 <= self.toward_source <= 1:
            raise ValueError("--toward-source is a share of the way, in [0, 1]")
        if self.toward_source and self.method not in ("claq", "gptq"):
            raise ValueError("--toward-source moves GPTQ's target; use it with --method claq or gptq")
        if not 0 <= self.grid_guard < 1:
            raise ValueError("--grid-guard is a share of a column's error, in [0, 1) (0: off)")
        if self.grid_guard and (self.method not in ("claq", "kmeans") or self.codebook == "f16"):
            raise ValueError("--grid-guard guards grid codebooks; use it with --method claq or kmeans and "
                             "--codebook auto or grid")
        if self.ranking not in ("outlier", "random"):
            raise ValueError(f"unknown column ranking {self.ranking!r}; use outlier or random")

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["column_widths"]  # per weight, not the conversion's settings
        return out


def quantize_weight(W: torch.Tensor, H: Optional[torch.Tensor], qc: QuantConfig,
                    timer: Timer = NO_TIMER, workers: int = 1,
                    row_weights: Optional[np.ndarray] = None) -> QuantizedWeight:
    """One linear weight under the configured method (H None for the calibration-free methods; then
    `workers` threads share its columns, else its K-Means DPs). `row_weights` [out]: the rows' weights
    in the codebooks' K-Means (None: equal)."""
    uniform = qc.method in ("gptq", "rtn")
    use_h = qc.method in ("claq", "gptq")
    with timer.phase("plan"):
        Wn = W.detach().float().cpu().numpy()
        if qc.method == "claq" and qc.column_widths is not None:
            bits, reserve = np.asarray(qc.column_widths, np.int64), outlier_reserve(Wn, qc)
            if bits.shape != (Wn.shape[1],):
                raise ValueError(f"{bits.size} allocated widths for a weight of {Wn.shape[1]} columns")
        elif qc.method == "claq":
            plan = plan_columns(Wn, qc.bits, qc.outlier_bits, qc.outlier_threshold, qc.ap_bits,
                                qc.or_top_fraction, qc.or_top_share, qc.ranking)
            bits, reserve = plan.bits, plan.reserve
        else:
            bits, reserve = np.full(Wn.shape[1], int(qc.bits), np.int64), None
        del Wn
        gptq = GPTQ(W, H if use_h else None, qc.blocksize, qc.percdamp, qc.actorder)
    return gptq.quantize(bits, reserve, uniform=uniform, fit_all=qc.fit_outliers, max_iter=qc.kmeans_iters,
                         group_size=qc.group_size, grid=not uniform and grid_codebooks(qc.codebook, bits), timer=timer,
                         workers=workers, row_weights=None if uniform else row_weights, grid_guard=qc.grid_guard)


def outlier_reserve(W: np.ndarray, qc: QuantConfig) -> np.ndarray:
    """Outliers kept in fp16 per column of W [out, in] for qc.outlier_bits (the paper's rule: the top
    columns by qc.ranking share qc.or_top_share of them); the allocation pays for the same ones."""
    if not qc.outlier_bits:  # every weight of a default conversion: no ranking to compute
        return np.zeros(W.shape[1], np.int64)
    order = column_ranking(W, qc.outlier_threshold, qc.ranking)
    return column_reserve(order, W.shape[0], qc.outlier_bits, qc.or_top_fraction, qc.or_top_share)


# (name, W, H or None, its config, its row weights or None)
Job = tuple[str, torch.Tensor, Optional[torch.Tensor], QuantConfig, Optional[np.ndarray]]


def worker_count(threads: Optional[int] = None) -> int:
    """Threads that quantize a group's linears at once: `threads`, else torch's intra-op thread count."""
    return max(1, torch.get_num_threads() if threads is None else int(threads))


def _load_linalg(device: torch.device) -> None:
    """One small Cholesky on `device` before threads start: torch loads its CUDA solver library lazily,
    and two threads that make the first call at once fail ("lazy wrapper should be called at most once",
    seen on an H200 with torch 2.11)."""
    torch.linalg.cholesky(torch.eye(2, device=device))


def quantize_group(jobs: list[Job], workers: int = 1, timer: Timer = NO_TIMER) -> Iterator[tuple[str, QuantizedWeight]]:
    """(name, QuantizedWeight) for each job, in the jobs' order.

    With workers > 1 up to that many jobs run at once in threads (the Numba kernels and torch release the
    GIL). A job's result depends on its own W, H and config only (no random state, no shared buffers), so
    it is the one-by-one result bit for bit. One by one (workers 1), each result is yielded before the
    next job starts: memory for one result at a time.
    """
    if workers <= 1 or len(jobs) <= 1:  # a job alone has the threads for its K-Means (gptq.GPTQ.quantize)
        for name, W, H, qc, weights in jobs:
            yield name, quantize_weight(W, H, qc, timer, workers if len(jobs) == 1 else 1, row_weights=weights)
        return
    _load_linalg(next((H.device for _, _, H, _, _ in jobs if H is not None), jobs[0][1].device))
    with ThreadPoolExecutor(min(workers, len(jobs)), thread_name_prefix="claq-quantize") as pool:
        futures = [pool.submit(quantize_weight, W, H, qc, timer, row_weights=weights) for _, W, H, qc, weights in jobs]
        try:
            for (name, *_), future in zip(jobs, futures):
                yield name, future.result()
        finally:  # an error or a consumer that stops early: start nothing more
            for future in futures:
                future.cancel()


# X^T X is symmetric: in this many column blocks, only the blocks on and above the diagonal are
# multiplied (10 of 16) and the rest mirrored. On 2 cores (MKL), three batches of 4096 tokens: 69 -> 32 ms
# at 576 columns, 298 -> 211 ms at 1536, bit for bit the full product's (each entry is the same dot
# product over the tokens; a BLAS may order it otherwise).
GRAM_BLOCKS = 4


def add_gram(total: torch.Tensor, x: torch.Tensor, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """total += x^T x for x [tokens, n] (total [n, n]); returns total. The blocks below the diagonal are
    copies of those above it."""
    n = x.shape[1]
    edges = [n * b // blocks for b in range(blocks + 1)]
    spans = [slice(edges[b], edges[b + 1]) for b in range(blocks) if edges[b + 1] > edges[b]]
    for a, rows in enumerate(spans):
        for cols in spans[a:]:
            total[rows, cols].addmm_(x[:, rows].T, x[:, cols])
    for a, rows in enumerate(spans):
        for cols in spans[a + 1:]:
            total[cols, rows] = total[rows, cols].T
    return total


class _StopForward(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for a decoder layer to record the keywords it is called with, without running it: it
    passes its input on, and the last one stops the forward pass. Layers of one model may be called with
    different keywords (a sliding-window layer's mask beside a full one's, Gemma 3's local and global
    rotary tables), so each layer's are recorded; the first layer's inputs are the states."""

    def __init__(self, layer, first: bool, last: bool):
        super().__init__()
        self.layer, self.first, self.last = layer, first, last
        self.states, self.keywords = [], []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the model's forward reads from its layers (an attention type)
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        if self.first:  # later layers are passed what the model makes of it: not their states
            self.states.append(hidden_states)
        self.keywords.append(_as_keywords(self.layer.forward, args, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def shared_mappings(kwargs: list, batch: int) -> list[MutableMapping]:
    """The mutable mappings the model handed its layers in calibration batch `batch` (`kwargs[layer][batch]`),
    each once, in the order the layers first got them: state that layers pass on to later layers. Gemma 4's
    KVSharingDict is one: a layer stores its keys and values there, and the last layers attend over those
    instead of computing their own. The recorded keywords hold the very object the model made for the batch,
    so running the layers in order carries it as the model does."""
    found, seen = [], set()
    for layer in kwargs:
        for value in layer[batch].values():
            if isinstance(value, MutableMapping) and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
    return found


def private_copies(kwargs: list) -> list:
    """`kwargs` (per layer, per batch) with each batch's shared mappings (shared_mappings) replaced by empty
    ones of the same type, shared by the layers of that batch as the originals are: a second model run from the
    same keywords (the source model beside the quantized one) then keeps its own keys and values."""
    out = [[dict(kw) for kw in layer] for layer in kwargs]
    for batch in range(len(kwargs[0]) if kwargs else 0):
        fresh = {id(m): type(m)() for m in shared_mappings(kwargs, batch)}
        for layer in out:
            for name, value in layer[batch].items():
                if id(value) in fresh:
                    layer[batch][name] = fresh[id(value)]
    return out


def shared_state(kwargs: list) -> list[list[dict]]:
    """What the shared mappings hold now, per batch and mapping (what a resumed conversion must put back:
    the keys and values the finished layers stored for the later ones); empty lists where there is none."""
    return [[dict(m) for m in shared_mappings(kwargs, batch)] for batch in range(len(kwargs[0]) if kwargs else 0)]


def restore_shared_state(kwargs: list, state: list[list[dict]]) -> None:
    """Put `state` (shared_state's) into the batches' shared mappings."""
    for batch, saved in enumerate(state):
        mappings = shared_mappings(kwargs, batch)
        if len(mappings) != len(saved):
            raise ValueError(f"calibration batch {batch} hands the layers {len(mappings)} shared mappings, "
                             f"the saved state {len(saved)}")
        for mapping, values in zip(mappings, saved):
            mapping.clear()
            mapping.update(values)


def _as_keywords(forward, args: tuple, kwargs: dict) -> dict:
    """A layer call's arguments after the hidden states, all as keywords (GPT-2 passes its causal mask
    positionally), so every later call can be layer(h, **kwargs)."""
    if not args:
        return kwargs
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(forward).parameters.values() if p.kind in kinds][1:]
    if len(args) > len(names):
        raise ValueError(f"a decoder layer was called with {len(args) + 1} positional arguments, "
                         f"its forward names {len(names) + 1}")
    return {**dict(zip(names, args)), **kwargs}


def _set_tensor(module: torch.nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner, _, leaf = dotted.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    setattr(target, leaf, torch.nn.Parameter(value, requires_grad=False))


def _materialise(module: torch.nn.Module, prefix: str, source: ModelSource, device) -> None:
    """The module's parameters from the checkpoint, in float32 on `device`; and its persistent buffers the
    checkpoint stores (a router's learned score bias: what the module computes at init would route
    differently), as transformers' own loading sets them."""
    for name, _ in list(module.named_parameters()):
        _set_tensor(module, name, source.tensor(prefix + name).float().to(device))
    for name, buffer in persistent_buffers(module).items():
        if prefix + name in source.files:
            with torch.no_grad():
                buffer.copy_(source.tensor(prefix + name))


def _release(module: torch.nn.Module) -> None:
    """A materialised module's parameters back to the meta device; its buffers stay: _materialise loads
    only the buffers the checkpoint stores, and one built with the module (an activation's constants, a
    rotary table) is needed again when a later pass materialises the module anew."""
    for name, param in list(module.named_parameters()):
        _set_tensor(module, name, param.detach().to("meta"))


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def outside_modules(model, arch: Resolved) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every leaf module with parameters outside the decoder layers but the head:
    embeddings, learned positions, norms."""
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if n and not inside(n, arch.family.layers)
            and m is not head and not any(True for _ in m.children()) and any(True for _ in m.parameters())]


def _first_layer_inputs(source: ModelSource, calibration: torch.Tensor, device, batch_size: int,
                        timer: Timer = NO_TIMER):
    """(model skeleton, its config, its resolved family entry, the inputs of decoder layer 0 per batch, every
    layer's keywords per batch: keywords[layer][batch]).

    Every parameter outside the decoder layers but the head (embeddings, positions, norms) is loaded for
    the pass up to the layers, then dropped again; the layers are loaded one at a time later.
    """
    config = source.config()
    model = skeleton(config, device)
    arch = resolve(model, config)
    outside = outside_modules(model, arch)
    with timer.phase("load"):
        for name, module in outside:
            _materialise(module, name + ".", source, device)
    layers = list(arch.layers)
    catchers = [_Catcher(layer, first=index == 0, last=index == len(layers) - 1) for index, layer in enumerate(layers)]
    for index, catcher in enumerate(catchers):
        arch.layers[index] = catcher
    try:
        with timer.phase("forward"):
            for batch in calibration.split(batch_size):
                try:
                    model(batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for index, layer in enumerate(layers):
            arch.layers[index] = layer
    for name, module in outside:
        if module is not arch.final_norm:
            _release(module)
    return model, config, arch, catchers[0].states, [c.keywords for c in catchers]


@torch.no_grad()
def input_energies(source: ModelSource, calibration: torch.Tensor, device="cpu", batch_size: int = 8,
                   quantize_embeddings: bool = True) -> dict[str, np.ndarray]:
    """sum over calibration tokens of x_j**2 for each input feature j of every weight to be quantized.

    The diagonal of each weight's Hessian, from one pass through the unquantized model (each layer
    materialised in turn); the allocation weighs each column's quantization error by it.
    """
    model, config, arch, states, kwargs = _first_layer_inputs(source, calibration, device, batch_size)
    energies: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            energies[name] = energies.get(name, 0) + (x * x).sum(dim=0)
        return record

    for index, layer in enumerate(arch.layers):
        prefix = f"{arch.family.layers}.{index}."
        _materialise(layer, prefix, source, device)
        handles = [layer.get_submodule(n).register_forward_hook(hook(prefix + n + ".weight"))
                   for n in arch.linears(index)]
        states = [_layer_output(layer(h, **kw)) for h, kw in zip(states, kwargs[index])]
        for handle in handles:
            handle.remove()
        for n in arch.routed & set(arch.linears(index)):  # an expert no calibration token reached
            name = prefix + n + ".weight"
            if name not in energies:
                energies[name] = torch.zeros(layer.get_submodule(n).in_features, dtype=torch.float64, device=device)
        _release(layer)
    if quantize_embeddings:
        head_name, _ = head_and_embedding_names(model, config, set(source.names()))
        norm = arch.final_norm
        x = torch.cat([(norm(h) if norm is not None else h).reshape(-1, h.shape[-1]) for h in states]).double()
        energies[head_name] = (x * x).sum(dim=0)
    return {name: e.cpu().numpy() for name, e in energies.items()}


@torch.no_grad()
def quantize_model(source: ModelSource, calibration: torch.Tensor, qc: QuantConfig, device="cpu",
                   batch_size: int = 8, progress: Progress = no_progress,
                   log: Callable[[str], None] = lambda s: None, targets: Optional[dict] = None,
                   threads: Optional[int] = None, timer: Timer = NO_TIMER, start_layer: int = 0,
                   start_states: Optional[list] = None, done: Collection[str] = (),
                   on_layer: Optional[Callable[..., None]] = None,
                   row_weights: Optional[dict] = None,
                   start_shared: Optional[list] = None) -> Iterator[tuple[str, QuantizedWeight]]:
    """Yield (parameter name, QuantizedWeight) for every block linear, layer by layer, then the head.

    `targets` (name -> (low, high, fraction), from allocation.allocate) overrides the bit target per weight;
    `row_weights` (name -> float [out], sensitivity.row_weights) weigh the rows in a weight's K-Means.
    `threads`: how many linears of one group are quantized at once (None: torch.get_num_threads(); 1: one
    by one); the results do not depend on it. `timer` gets a section per layer ("inputs", "layer N",
    "head", "embedding") and the phases of timing.py.

    Resuming (checkpoint.py): `start_layer` > 0 skips the layers before it, whose outputs `start_states`
    are (one tensor per calibration batch, exactly as this function produced them); `done` names the
    head/embedding tensors already quantized. `on_layer(index, states)` is called when a layer is
    finished, with its outputs, after its last result was consumed and before the next layer starts; for
    a model whose layers store state for later ones (shared_mappings: Gemma 4's shared keys and values) as
    `on_layer(index, states, shared)` with shared_state's, which a resumed run gets back as `start_shared`.
    """
    qc.validate()
    with timer.section("inputs"):
        model, config, arch, states, kwargs = _first_layer_inputs(source, calibration, device, batch_size, timer)
    layers = arch.layers
    workers = worker_count(threads)
    if start_layer:
        if start_states is None or len(start_states) != len(states) or not 0 < start_layer <= len(layers):
            raise ValueError(f"cannot resume at layer {start_layer} of {len(layers)} from "
                             f"{'no' if start_states is None else len(start_states)} calibration batches")

    needs_h = qc.method in ("claq", "gptq")
    # --toward-source: the source model's own hidden states, beside the quantized model's (target.py), and
    # its own shared keys and values
    source_states = None
    source_kwargs = private_copies(kwargs)
    if qc.toward_source and needs_h and start_layer < len(layers):
        with timer.section("source states"):
            source_states = _source_states(arch, source, states, source_kwargs, device, start_layer)
    if start_layer:
        states = start_states
        if start_shared is not None:  # the keys and values the finished layers stored for later ones
            restore_shared_state(kwargs, start_shared)
    for index in progress(range(start_layer, len(layers)), "quantize layers", len(layers) - start_layer):
        with timer.section(f"layer {index}"):
            start = time.perf_counter()
            layer = layers[index]
            prefix = f"{arch.family.layers}.{index}."
            with timer.phase("load"):
                _materialise(layer, prefix, source, device)
            errors = []
            share = memory_share(1 if source_states is None else 2)  # the source layer's replay beside it
            replay = LayerReplay(layer, arch.linears(index), states, share)
            source_pass = source_replay = None
            if source_states is not None:  # the layer with its source weights: nothing in it changes, so what
                source_layer = copy.deepcopy(layer)   # its groups' passes complete may replay
                source_replay = LayerReplay(source_layer, arch.linears(index), source_states, share)
                source_pass = (source_layer, source_states, source_replay, source_kwargs[index])
            for group in arch.groups(index):
                linears = {name: layer.get_submodule(name) for name in group}
                if source_replay is not None:  # a module holding a later group's linear computes until that
                    # group's pass: Falcon-H1's mixer completes in the pass up to the attention's q/k/v, and
                    # replayed whole it would hide its out_proj's input from the next group's pass
                    source_replay.finished(group)
                with (timer.phase("forward"), replay.passing(),
                      source_replay.passing() if source_replay else contextlib.nullcontext()):
                    hessians, crosses = (_group_hessians(layer, linears, states, kwargs[index], timer, replay, source_pass,
                                                          arch.routed)
                                         if needs_h else ({}, {}))
                jobs = []
                for name, linear in linears.items():
                    full = prefix + name + ".weight"
                    W = arch.family.layout(full, linear.weight)
                    if name in crosses:
                        with timer.phase("hessian"):
                            W = toward_source(W, crosses[name], hessians[name], qc.toward_source, qc.percdamp)
                    jobs.append((name, W, hessians.get(name), _with_target(qc, targets, full),
                                 (row_weights or {}).get(full)))
                hessians.clear()  # the jobs hold them, and let them go with the jobs
                crosses.clear()
                for name, result in quantize_group(jobs, workers, timer):
                    with timer.phase("finish"):
                        dequantized = arch.family.layout(prefix + name + ".weight", result.dequantize())
                        linears[name].weight.data = torch.from_numpy(dequantized).to(device)
                    errors.append(result.relative_error)
                    yield prefix + name + ".weight", result
                jobs.clear()
                replay.finished(group)
            with timer.phase("forward"), replay.passing():
                states = [_layer_output(layer(h, **kw)) for h, kw in replay.batches(states, kwargs[index])]
            replay.close()
            if source_pass is not None:
                source_layer = source_pass[0]
                with timer.phase("forward"), source_replay.passing():
                    source_states = [_layer_output(source_layer(h, **kw))
                                     for h, kw in source_replay.batches(source_states, source_kwargs[index])]
                source_replay.close()
                del source_layer, source_pass, source_replay
            _release(layer)
            return_freed_memory()
            log(f"layer {index:3d}: {time.perf_counter() - start:6.1f} s, mean relative error {np.mean(errors):.4f}")
        if on_layer is not None:
            shared = shared_state(kwargs)
            if any(shared):
                on_layer(index, states, shared)
            else:
                on_layer(index, states)

    if qc.quantize_embeddings:
        yield from _quantize_head_and_embedding(model, config, arch, source, states, qc, device, log, targets, timer,
                                                done, workers, row_weights or {})


def _source_states(arch: Resolved, source: ModelSource, states: list, kwargs: list, device, layers: int) -> list:
    """The source model's hidden states after its first `layers` decoder layers (a resumed conversion's
    starting point; each layer materialised in turn), from the first layer's inputs `states` (`kwargs`:
    each layer's keywords per batch)."""
    states = [h.clone() for h in states]
    for index in range(layers):
        layer = arch.layers[index]
        _materialise(layer, f"{arch.family.layers}.{index}.", source, device)
        states = [_layer_output(layer(h, **kw)) for h, kw in zip(states, kwargs[index])]
        _release(layer)
    return states


def head_and_embedding_names(model, config, source_names) -> tuple[Optional[str], Optional[str]]:
    """(head weight to quantize against the final hidden states, untied input embedding to quantize data-free).

    A tied embedding is one tensor serving both: it is quantized once, as the head (the product that
    reads all of it at every token), under the embedding's own name, the one the checkpoint stores.
    """
    embedding = _parameter_name(model, model.get_input_embeddings())
    head_module = model.get_output_embeddings()
    head = _parameter_name(model, head_module) if head_module is not None else None
    tied = bool(getattr(config, "tie_word_embeddings", False)) or head not in source_names
    if tied:
        return embedding, None
    return head, embedding


def lookup_names(model, config) -> list[str]:
    """The weights of the token-lookup tables besides the input embedding that the model has (its family's
    `lookups`: Gemma 4's per-layer embeddings), quantized data-free as an untied input embedding is: a lookup
    reads one row a token, so a column's codebook serves the same feature of every token."""
    from ..models.architectures import family_for_type

    family = family_for_type(getattr(config, "model_type", None))
    names = []
    for path in family.lookups if family is not None else ():
        try:
            module = model.get_submodule(path)
        except AttributeError:  # a configuration of the family without it
            continue
        if not isinstance(module, torch.nn.Embedding):
            raise ValueError(f"{path} is a {type(module).__name__}, not the token table its family names")
        names.append(f"{path}.weight")
    return names


def _parameter_name(model, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}.weight"
    raise ValueError("module not found in the model")


# The head reads every hidden state into every logit and, tied, is also every token's embedding: at the
# blocks' width it costs far more than they do (SmolLM2, 10 windows: 4 bits +20% ppl, 5 bits +4%, 6 bits +0.6%).
# Under the fixed rule it gets two bits more than the blocks.
HEAD_EXTRA_BITS = 2
# Under a measured allocation (--bpw) its bits come out of the blocks' budget, and the blocks' columns put
# them to better use: it gets the budget rounded up. The whole permuted SmolLM2 on the four texts: at
# --bpw 4.6 (78.3 MB) a 6-bit head lost 5.6 / 9.5 / 6.9 / 5.7%, a 5-bit one 4.4 / 7.6 / 5.9 / 4.6%, a 4-bit
# one 6.6 / 9.2 / 9.2 / 4.9%; at --bpw 3.7 (63.2 MB) a 5-bit head 30.0 / 34.5 / 25.3 / 23.0%, a 4-bit one
# 25.1 / 31.7 / 22.7 / 18.4%.


def head_target(qc: QuantConfig) -> float:
    """Bit target of the output head / tied embedding: --head-bits; else under --bpw the budget rounded up,
    under the fixed rule the blocks' target plus two (at most 8)."""
    if qc.head_bits is not None:
        return qc.head_bits
    if qc.bpw is not None:
        return float(min(max(math.ceil(qc.bpw), 1), max(spec.ALLOWED_BITS)))
    return min(float(qc.bits) + HEAD_EXTRA_BITS, float(max(spec.ALLOWED_BITS)))


def _with_target(qc: QuantConfig, targets: Optional[dict], name: str) -> QuantConfig:
    """qc for one weight with its allocated target: a setting (low, high, fraction), or {"widths": [...]}
    (allocation.allocate_columns), one width a column."""
    if not targets or name not in targets:
        return qc
    from .allocation import Setting

    target = targets[name]
    if isinstance(target, dict):
        widths = tuple(int(b) for b in target["widths"])
        return replace(qc, bits=float(np.mean(widths)), ap_bits=None, bpw=None, column_widths=widths)
    setting = Setting(*target)
    return replace(qc, bits=setting.target, ap_bits=(setting.low, setting.high), bpw=None)


def _quantize_head_and_embedding(model, config, arch: Resolved, source, states, qc: QuantConfig, device, log,
                                 targets=None, timer: Timer = NO_TIMER, done: Collection[str] = (), workers: int = 1,
                                 row_weights: Optional[dict] = None):
    head_name, embedding_name = head_and_embedding_names(model, config, set(source.names()))
    end_qc = replace(qc, bits=head_target(qc), ap_bits=None)
    head_qc = _with_target(end_qc, targets, head_name)
    if head_name not in done:  # a resumed conversion may have it already
        with timer.section("head"):
            start = time.perf_counter()
            norm = arch.final_norm
            H = None
            if qc.method in ("claq", "gptq"):  # H of the head's input: the final normed hidden states
                with timer.phase("hessian"):
                    total = None
                    count = 0
                    for h in states:
                        x = (norm(h) if norm is not None else h).reshape(-1, h.shape[-1]).float()
                        total = add_gram(torch.zeros(x.shape[1], x.shape[1], device=x.device) if total is None
                                         else total, x)
                        count += x.shape[0]
                    H = total * (2.0 / count)
            with timer.phase("load"):
                W = source.tensor(head_name).float().to(device)
            result = quantize_weight(W, H, head_qc, timer, workers,  # workers: without a Hessian (--method kmeans)
                                     row_weights=(row_weights or {}).get(head_name))
            del W, H
            log(f"head {head_name}: {time.perf_counter() - start:6.1f} s, relative error {result.relative_error:.4f}")
            yield head_name, result
    tables = ([embedding_name] if embedding_name is not None else []) + lookup_names(model, config)
    for name in tables:  # no Hessian: per-column K-Means, data-free
        if name in done:
            continue
        with timer.section("embedding" if name == embedding_name else name):
            start = time.perf_counter()
            with timer.phase("load"):
                W = source.tensor(name).float().to(device)
            result = quantize_weight(W, None, _with_target(end_qc, targets, name), timer, workers)
            del W
            log(f"embedding {name}: {time.perf_counter() - start:6.1f} s, relative error {result.relative_error:.4f}")
            yield name, result


def _group_hessians(layer, linears: dict, states, kwargs, timer: Timer = NO_TIMER,
                    replay: Optional[LayerReplay] = None, source: Optional[tuple] = None,
                    routed: Collection[str] = frozenset()
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(H, C) for each linear of the group, over all calibration tokens: H = 2/n sum x x^T (float32), and
    with `source` = (the layer with its source weights, its source inputs one tensor a batch, a LayerReplay
    of it or None, and optionally its own keywords per batch: private_copies') C = 2/n sum x_f x^T, x_f the
    linear's input in the source model (target.py; else C is empty).

    Pre-hooks read each linear's input before it runs, and the pass stops before the group's last linear
    computes anything (nothing after it is needed). A linear that reads the very tensor an earlier one of
    its group read (q/k/v, gate/up: what the family table promises, checked on the first batch) shares
    that one's sum instead of accumulating a copy: the same numbers, once. When the first batch shows
    every linear of the group reading one tensor, the later batches stop before the first linear: the
    others would only compute what nothing reads (on SmolLM2 a seventh of the calibration forward).

    `routed` linears (experts') read only the tokens routed to their expert, a different number each, and
    may read none in a batch: n is counted per input, and a group holding them runs the whole layer (no
    linear of it is sure to run last). An expert no calibration token reached gets H = None, and is
    quantized without one, as the calibration-free methods are. They get no C: the source model routes
    its own tokens, so an expert's tokens there and here need not be the same ones.
    """
    sums: dict[str, torch.Tensor] = {}
    crosses: dict[str, torch.Tensor] = {}
    owners: dict[str, str] = {}  # linear -> the first linear of the group that reads its input
    seen: dict[str, torch.Tensor] = {}  # this batch: linear -> its input
    seen_source: dict[str, torch.Tensor] = {}  # this batch: linear -> its input in the source model
    counts: dict[str, int] = {}  # linear -> rows of its input, summed over the batches
    first, last = list(linears)[0], list(linears)[-1]
    sparse = any(name in routed for name in linears)
    stop = [None if sparse else last]  # the linear before which a batch's pass ends

    def hook(name):
        def record(module, inputs):
            x = inputs[0]
            owner = next((n for n, t in seen.items() if t is x), name)
            if owners.setdefault(name, owner) != owner:
                raise RuntimeError(f"{name} read the input of {owner} in one calibration batch but not in "
                                   "another; the group's Hessians would be inconsistent")
            seen[name] = x
            if owner == name:
                counts[name] = counts.get(name, 0) + x.reshape(-1, x.shape[-1]).shape[0]
                with timer.phase("hessian"):
                    x = x.reshape(-1, x.shape[-1]).float()
                    if name not in sums:
                        sums[name] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
                    add_gram(sums[name], x)
                    if source is not None and name not in routed:
                        x_f = seen_source[name].reshape(-1, x.shape[-1]).float()
                        if name not in crosses:
                            crosses[name] = torch.zeros_like(sums[name])
                        crosses[name].addmm_(x_f.T, x)
            if name == stop[0]:
                missing = [n for n in linears if n not in seen] if name == last else []
                if missing:
                    raise RuntimeError(f"{last} ran before {', '.join(missing)} of its group: the family table's "
                                       "order differs from this model's forward pass")
                raise _StopForward  # the rest of the layer is not needed for this group
        return record

    # the source pass needs the inputs of the group's unrouted linears only, and must stop inside the layer:
    # a pass that completed a module of the source layer (all finished) would have later passes replay it
    # whole, past the hooks of the linears inside
    source_stop = next((n for n in reversed(list(linears)) if n not in routed), None) if sparse else None
    if sparse and source_stop is None:
        source = None  # a group of experts only: nothing of the source pass is used

    def record_source(name):
        def record(module, inputs):
            seen_source[name] = inputs[0]
            if name == (source_stop if sparse else stop[0]):
                raise _StopForward
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    source_batches = None
    if source is not None:
        source_layer, source_states, source_replay, *own = source
        source_kwargs = own[0] if own else kwargs
        handles += [source_layer.get_submodule(name).register_forward_pre_hook(record_source(name))
                    for name in linears if name not in routed]
        source_batches = (source_replay.batches(source_states, source_kwargs) if source_replay is not None
                          else zip(source_states, source_kwargs))
    batches = replay.batches(states, kwargs) if replay is not None else zip(states, kwargs)
    try:
        for h, kw in batches:
            seen.clear()
            if source_batches is not None:  # this batch's source inputs first, for the quantized pass to meet
                h_f, kw_f = next(source_batches)
                seen_source.clear()
                try:
                    source_layer(h_f, **kw_f)
                except _StopForward:
                    pass
            try:
                layer(h, **kw)
            except _StopForward:
                pass
            if not sparse and set(owners.values()) == {first}:  # one input for all: the rest need not run
                stop[0] = first
    finally:
        for handle in handles:
            handle.remove()
    seen.clear()
    seen_source.clear()
    hessians = {name: total * (2.0 / counts[name]) for name, total in sums.items()}
    crosses = {name: total * (2.0 / counts[name]) for name, total in crosses.items()}
    missing = [name for name in linears if name not in owners]
    if any(name not in routed for name in missing):
        raise RuntimeError(f"{', '.join(n for n in missing if n not in routed)} never ran in the calibration "
                           "pass: the family table names a linear this model's forward does not use")
    return ({name: hessians[owners[name]] if name in owners else None for name in linears},
            {name: crosses[owners[name]] for name in linears if owners.get(name) in crosses})
