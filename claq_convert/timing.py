"""Where a conversion spends its time and memory: an optional recorder the pipeline reports to.

Library code takes a `timer` and wraps each unit of work in `timer.section(name)` (the first layer's
inputs, a decoder layer, the head) and each kind of work in `timer.phase(name)`. The default, NO_TIMER,
records nothing: every call returns one shared null context, so an unused timer costs a method call per
phase (a few per weight block), nothing measurable. PhaseTimer records.

Phases (a phase is timed exclusively: time in a phase nested inside it counts for the inner one only):

    load         the weights read from safetensors onto the device
    forward      calibration tokens through the layer (also the partial passes that feed the Hessians)
    hessian      H += X^T X over the calibration tokens
    plan         the column plan (Outlier Order, widths, reserve) and GPTQ's own copies of W and H
    cholesky     the working copy of W, dead columns, act-order, dampening, the Cholesky factor of H^-1
    kmeans       the Numba block kernel: per-column codebook fits and the error propagation inside a block
    gptq_update  the lazy updates of the columns after each block, with the block's host/device copies
    finish       un-permuting, assembling the result, its error, the dequantized weight put back
    write        encoding, the decode check and the file write of each weight (quantize/convert.py)

Phases are summed per section. They are timed per thread: when a group's linears are quantized in
parallel threads, their phases add up, so a section's phases may sum to more than its wall time.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

_NULL = nullcontext()  # stateless, so one instance serves every call


class Timer:
    """Records nothing: the default of every function that takes a timer."""

    def section(self, name: str):
        return _NULL

    def phase(self, name: str):
        return _NULL


NO_TIMER = Timer()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux: VmHWM, which `reset_peak_rss` can restart; else
    ru_maxrss, which a process inherits from its parent at exec: a small child reports a big parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def rss_bytes() -> int:
    """This process's resident memory now (Linux only; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter (Linux >= 4.0: /proc/self/clear_refs); whether that worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PhaseTimer(Timer):
    """Wall seconds per section and phase, and each section's peak memory.

    `device` "cuda..." synchronizes the device at every phase boundary (so queued kernels are charged to
    the phase that queued them) and records each section's peak CUDA memory. `per_section_rss` restarts
    the process's peak-RSS counter at each section (Linux), so each section reports its own peak; it is
    off by default because it changes what anything else in the process reads as its peak.
    """

    def __init__(self, device=None, per_section_rss: bool = False):
        self.sections: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._current = "run"   # set by the thread that opens sections; worker threads record into it
        self._per_section_rss = per_section_rss
        self._cuda = None
        if device is not None and str(device).startswith("cuda"):
            import torch

            self._cuda = torch.cuda
            self._device = torch.device(device)

    # -- recording
    def _sync(self) -> None:
        if self._cuda is not None:
            self._cuda.synchronize(self._device)

    def _entry(self, section: str) -> dict:
        return self.sections.setdefault(section, {"seconds": 0.0, "phases": {}})

    def _add(self, section: str, phase: str, seconds: float) -> None:
        with self._lock:
            phases = self._entry(section)["phases"]
            phases[phase] = phases.get(phase, 0.0) + seconds

    def _stack(self) -> list:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def phase(self, name: str):
        return _Phase(self, name)

    def section(self, name: str):
        return _Section(self, name)

    # -- reading
    def report(self) -> dict:
        """{"sections": {name: {"seconds", "phases": {phase: seconds}, "peak_rss_bytes"[, "cuda_peak_bytes"]}},
        "peak_rss_bytes": the process's peak}; a section's peak RSS is its own only with per_section_rss."""
        with self._lock:
            sections = {name: {**entry, "phases": dict(entry["phases"])} for name, entry in self.sections.items()}
        return {"sections": sections, "peak_rss_bytes": max([peak_rss_bytes()] +
                                                            [s.get("peak_rss_bytes", 0) for s in sections.values()])}


class _Phase:
    __slots__ = ("timer", "name", "section", "start")

    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        timer = self.timer
        timer._sync()
        now = time.perf_counter()
        stack = timer._stack()
        if stack:  # pause the enclosing phase
            outer = stack[-1]
            timer._add(outer.section, outer.name, now - outer.start)
        self.section, self.start = timer._current, now
        stack.append(self)
        return self

    def __exit__(self, *exc) -> None:
        timer = self.timer
        timer._sync()
        now = time.perf_counter()
        stack = timer._stack()
        stack.pop()
        timer._add(self.section, self.name, now - self.start)
        if stack:  # resume the enclosing phase
            stack[-1].start = now


class _Section:
    __slots__ = ("timer", "name", "previous", "start")

    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        timer = self.timer
        timer._sync()
        if timer._cuda is not None:
            timer._cuda.reset_peak_memory_stats(timer._device)
        with timer._lock:
            entry = timer._entry(self.name)
        if timer._per_section_rss:
            entry["rss_at_start_bytes"] = rss_bytes()
            entry["per_section_rss"] = reset_peak_rss()
        self.previous, timer._current = timer._current, self.name
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        timer = self.timer
        timer._sync()
        seconds = time.perf_counter() - self.start
        timer._current = self.previous
        peak = peak_rss_bytes()
        with timer._lock:
            entry = timer._entry(self.name)
            entry["seconds"] += seconds
            entry["peak_rss_bytes"] = max(entry.get("peak_rss_bytes", 0), peak)
            if timer._cuda is not None:
                cuda_peak = int(timer._cuda.max_memory_allocated(timer._device))
                entry["cuda_peak_bytes"] = max(entry.get("cuda_peak_bytes", 0), cuda_peak)
