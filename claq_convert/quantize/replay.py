"""Replay what a decoder layer's finished parts computed, instead of computing it again.

Quantizing a layer in true-sequential groups runs the layer once per group (up to the group's first
linear, so its inputs see the groups before it quantized) and once more for the layer's outputs: the
early parts run again on every pass (on SmolLM2, 2.2 times the linear work of one forward pass and the
attention four times). A submodule whose every group linear is already quantized computes the same thing
on every later pass over the same calibration batch, so its first complete output is kept and handed back
on the later passes: the numbers are the very ones it would compute again (same inputs, same weights,
same kernels), and the file does not change.

What a finished module holds is let go once a module around it holds every batch's output (the attention
block's once o_proj is done stands for its q/k/v's); a module without a group linear is never kept (norms:
cheap to run), and nothing is kept past BUDGET_PER_STATE times the layer's inputs or half the free
memory (shared out when two replays run side by side): what does not fit is computed again, as before.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

# What the kept outputs may take, in multiples of the layer's input states: on SmolLM2 the attention
# block's output and the MLP's gate and up outputs take 6.3x; a 7B-class Llama (hidden 4096, MLP 11008) 6.4x.
BUDGET_PER_STATE = 8
# ... and at most this share of the memory free on the states' device when the layer starts (a large
# calibration set on a GPU: what does not fit is computed again, as without replay).
FREE_MEMORY_SHARE = 0.5


def free_bytes(device: torch.device) -> int:
    """Memory free on `device` now (a CPU: Linux's MemAvailable, page cache it can drop included, else
    the free physical pages; unknown: no limit)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that says
        return 1 << 62


def return_freed_memory() -> None:
    """Hand the pages of freed C heap memory back to the system (glibc's malloc_trim; elsewhere nothing).

    A layer's transients (activations, Hessians, the worker threads' K-Means scratch) are freed into
    glibc's arenas, which keep them: the default SmolLM2 conversion's RSS grew 50-80 MB a layer (2.9 to
    5.2 GB over 30 layers) while what it held grew 9.5 MB a layer. Trimmed after each layer, its peak
    went from 5.6 to 3.6 GB; the layers took 185 s instead of 172 (the next layer faults its pages in
    again; one run each)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc (musl, macOS), or no C library by that name
        return None


def memory_share(replays: int) -> float:
    """The share of the free memory each of `replays` replays running side by side may keep."""
    return FREE_MEMORY_SHARE / replays


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _cloned(value: Any) -> Any:
    """A copy of a module's output (tensors in nested tuples/lists), so that a caller writing into what it
    got (an in-place add) cannot change what is kept, nor the kept copy what a later caller gets."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cloned(item) for item in value)
    return value


def nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


class LayerReplay:
    """Outputs of one layer's finished submodules, per calibration batch and call.

    `linears`: the layer's group linears (relative names); `states`: its inputs, one tensor a batch.
    `share`: the share of the free memory it may keep (`memory_share()` splits it between replays that run
    side by side).
    `finished(names)` marks linears quantized (their weights already replaced); `passing()` wraps a pass
    over the batches, taken from `batches()`. A kept output is handed back only for the same batch, the
    same call of the module in that batch (a module a layer calls twice keeps two) and inputs with the
    same fingerprint (sampled float64 sums): were a group table to put a module before what feeds it, the
    module would compute afresh instead of handing back what it computed from the unquantized inputs.
    """

    def __init__(self, layer: torch.nn.Module, linears: Iterable[str], states: list,
                 share: float = FREE_MEMORY_SHARE):
        self.layer = layer
        self.count = len(states)
        self.budget_bytes = BUDGET_PER_STATE * sum(nbytes(h) for h in states)
        if states:
            self.budget_bytes = min(self.budget_bytes, int(share * free_bytes(states[0].device)))
        self.pending = set(linears)
        self.under = {name: {linear for linear in self.pending if _within(linear, name)}
                      for name, _ in layer.named_modules() if name}
        self.kept: dict[str, dict[tuple[int, int], tuple]] = {}  # name -> (batch, call) -> (fingerprint, output)
        self.kept_bytes = 0
        self.current: int | None = None
        self.calls: dict[str, int] = {}  # calls of each module in the current batch

    def finished(self, names: Iterable[str]) -> None:
        self.pending -= set(names)

    def batches(self, states: list, kwargs: list) -> Iterator[tuple]:
        """(states, kwargs) of each calibration batch, noting which batch runs."""
        for index, pair in enumerate(zip(states, kwargs)):
            self.current = index
            self.calls.clear()
            yield pair
        self.current = None

    def _done(self, name: str) -> bool:
        return bool(self.under[name]) and not (self.under[name] & self.pending)

    def _whole(self, name: str) -> bool:
        return len({batch for batch, _ in self.kept.get(name, ())}) == self.count

    def _drop(self, name: str) -> None:
        for _, value in self.kept.pop(name, {}).values():
            self.kept_bytes -= nbytes(value)

    @contextmanager
    def passing(self):
        """Within: the finished modules hand back their kept outputs (or keep them when first run); what a
        module holding outputs of every batch contains is let go (its output stands for it)."""
        for name in list(self.kept):
            if any(self._whole(parent) for parent in _parents(name)):
                self._drop(name)
        patched = []  # a container its parent never calls (a ModuleList) leaves its children to keep theirs
        for name in [n for n in self.under if self._done(n) and not any(self._whole(p) for p in _parents(n))]:
            module = self.layer.get_submodule(name)
            own = module.__dict__.get("forward")
            module.forward = self._replaying(name, module.forward)
            patched.append((module, own))
        try:
            yield self
        finally:
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own
            self.current = None

    def _replaying(self, name: str, forward):
        kept = self.kept.setdefault(name, {})

        def replay(*args, **kwargs):
            if self.current is None:
                return forward(*args, **kwargs)
            call = self.calls[name] = self.calls.get(name, -1) + 1
            key, print_ = (self.current, call), fingerprint(args, kwargs)
            if key in kept:
                if kept[key][0] == print_:
                    return _cloned(kept[key][1])
                self.kept_bytes -= nbytes(kept.pop(key)[1])  # its inputs changed: compute afresh
            out = forward(*args, **kwargs)
            size = nbytes(out)
            if _keepable(out) and self.kept_bytes + size <= self.budget_bytes:
                kept[key] = (print_, _cloned(out))
                self.kept_bytes += size
            return out
        return replay

    def close(self) -> None:
        for name in list(self.kept):
            self._drop(name)


# A fingerprint sums every this-many-th entry of each argument: a change upstream (a quantized linear)
# moves nearly every entry, so a sample finds it, for a sixtieth of a pass over every argument of every call.
FINGERPRINT_STRIDE = 61


def fingerprint(args: tuple, kwargs: dict) -> tuple:
    """The shapes and float64 sums of every FINGERPRINT_STRIDE-th entry of every tensor among a call's
    arguments (a complex tensor's real and imaginary parts: DeepSeek-V2's rotary factors)."""
    return tuple((tuple(t.shape), float(_real(t).reshape(-1)[::FINGERPRINT_STRIDE].sum(dtype=torch.float64)))
                 for t in _tensors((args, tuple(kwargs.values()))))


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _keepable(value: Any) -> bool:
    """A tensor, or tuples/lists of tensors and None: what _cloned copies whole."""
    if value is None or isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and all(_keepable(item) for item in value)


def _within(linear: str, module: str) -> bool:
    return linear == module or linear.startswith(module + ".")


def _parents(name: str) -> Iterator[str]:
    parts = name.split(".")
    for end in range(1, len(parts)):
        yield ".".join(parts[:end])
