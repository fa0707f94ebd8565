"""What claq-inspect reports: a summary of a validated file, and its error against the source model."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import spec


def safe_text(text) -> str:
    """Text from the file (names, config values): control characters escaped before they reach a terminal,
    so a value can neither forge an output line nor send escape sequences."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def _field(obj, *keys):
    """obj[k1][k2]... where each step is an object holding the key, else None (metadata is free-form JSON)."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def summarize(cf) -> dict:
    tensors = {}
    histogram: dict[str, int] = {}
    params = stored = outliers = all_params = codebook_bytes = code_bytes = streams = coded_streams = 0
    for name, tensor in cf.tensors.items():
        entry = {"kind": tensor["kind"], "shape": tensor["shape"], "stored_bytes": cf.stored_bytes(name)}
        all_params += math.prod(tensor["shape"])
        if tensor["kind"] == spec.KIND_CLAQ:
            rows, cols = tensor["shape"]
            sections = cf.sections(name, check_crc=False)
            widths, counts = np.unique(sections["bit_widths"], return_counts=True)
            entry["bits_histogram"] = {str(int(w)): int(c) for w, c in zip(widths, counts)}
            for w, c in entry["bits_histogram"].items():
                histogram[w] = histogram.get(w, 0) + c
            entry["outliers"] = int(sections["outlier_rows"].size) if "outlier_rows" in sections else 0
            entry["bpw"] = entry["stored_bytes"] * 8 / (rows * cols)
            entry["codebook_bytes"] = sum(spec.align(e["length"]) for s, e in tensor["sections"].items()
                                          if s in ("codebooks", "codebook_grid", spec.RICE_SECTION))
            codebook_bytes += entry["codebook_bytes"]
            code_sections = [s for s in tensor["sections"] if spec.is_code_section(s) or spec.is_huffman_section(s)]
            code_bytes += sum(spec.align(tensor["sections"][s]["length"]) for s in code_sections)
            streams += len(code_sections)
            coded_streams += sum(map(spec.is_huffman_section, code_sections))
            params += rows * cols
            stored += entry["stored_bytes"]
            outliers += entry["outliers"]
        tensors[name] = entry
    config = _field(cf.metadata, "config")
    conversion = _field(cf.metadata, "conversion")
    conversion = conversion if isinstance(conversion, dict) else {}
    fmt = "gguf" if type(cf).__name__ == "GgufClaqFile" else "claq"
    return {"file": str(cf.path), "bytes": cf.size, "format": fmt, "version": getattr(cf, "version", spec.VERSION),
            "parameters": all_params, "file_bits_per_parameter": cf.size * 8 / all_params if all_params else None,
            "model": {"architectures": _field(config, "architectures"), "model_type": _field(config, "model_type"),
                      "layers": _field(config, "num_hidden_layers") or _field(config, "n_layer"),  # GPT-2's names
                      "hidden_size": _field(config, "hidden_size") or _field(config, "n_embd")},
            "tensors": tensors, "files": sorted(cf.files),
            "quantized": {"tensors": sum(t["kind"] == spec.KIND_CLAQ for t in tensors.values()), "params": params,
                          "stored_bytes": stored, "honest_bpw": stored * 8 / params if params else None,
                          "bits_histogram": dict(sorted(histogram.items())), "outliers": outliers,
                          "codebook_bytes": codebook_bytes, "codebook_bpw": codebook_bytes * 8 / params if params else None,
                          "code_bytes": code_bytes, "code_bpw": code_bytes * 8 / params if params else None,
                          "code_streams": streams, "coded_streams": coded_streams},
            "raw": {"tensors": sum(t["kind"] == spec.KIND_RAW for t in tensors.values()),
                    "stored_bytes": sum(t["stored_bytes"] for t in tensors.values() if t["kind"] == spec.KIND_RAW)},
            "conversion": {k: conversion.get(k) for k in ("tool", "quant", "calibration", "summary") if k in conversion}}


def verify(cf, model_dir: Path) -> dict:
    """Decode every tensor and compare with the source checkpoint (relative Frobenius error)."""
    from ..models.architectures import transposed_weight
    from ..models.source import ModelSource

    source = ModelSource(model_dir)
    model_type = getattr(source.config(), "model_type", None)
    report = {}
    for name in cf.tensors:
        reference = source.tensor(name).float().numpy()
        if cf.tensors[name]["kind"] == spec.KIND_CLAQ and transposed_weight(model_type, name):
            reference = reference.T  # a Conv1D weight: stored [in, out], quantized as [out, in]
        decoded = cf.decode(name)
        if decoded.shape != reference.shape:
            report[name] = {"error": f"shape {list(decoded.shape)} vs source {list(reference.shape)}"}
            continue
        norm = float(np.linalg.norm(reference))
        report[name] = {"relative_error": float(np.linalg.norm(decoded - reference) / norm) if norm else 0.0}
    return report


def _sources(calib) -> list:
    sources = _field(calib, "sources")
    if isinstance(sources, list) and sources:
        return sources
    return [sources] if sources else [_field(calib, "text")]


def render(summary: dict, per_tensor: bool = False) -> str:
    """The human summary: one line per item; every value that comes from the file goes through safe_text."""
    q, raw, model = summary["quantized"], summary["raw"], summary["model"]
    version = summary["version"]
    kind = f"CLAQ GGUF (extension v{version})" if summary["format"] == "gguf" else f".claq v{version}"
    whole = summary["file_bits_per_parameter"]
    lines = [f"{safe_text(summary['file'])}: valid {kind}, {summary['bytes']} bytes, {summary['parameters']} parameters"
             + (f", {whole:.4f} bits per parameter (whole file)" if whole else ""),
             f"model: {safe_text(model['architectures'])} ({safe_text(model['model_type'])}), "
             f"{safe_text(model['layers'])} layers, hidden {safe_text(model['hidden_size'])}",
             f"quantized: {q['tensors']} tensors, {q['params']} weights, {q['stored_bytes']} bytes, "
             + (f"honest {q['honest_bpw']:.4f} bpw (quantized tensors), codebooks {q['codebook_bpw']:.4f} of it, "
                f"codes {q['code_bpw']:.4f} ({q['coded_streams']} of {q['code_streams']} streams Huffman-coded)"
                if q["honest_bpw"] else "no weights"),
             "bit widths (columns): " + ", ".join(f"{b}-bit {n}" for b, n in q["bits_histogram"].items()),
             f"outliers: {q['outliers']}",
             f"raw: {raw['tensors']} tensors, {raw['stored_bytes']} bytes; files: {', '.join(map(safe_text, summary['files']))}"]
    conv = summary["conversion"]
    if conv:
        quant, calib = _field(conv, "quant"), _field(conv, "calibration")
        values = {k: safe_text(_field(quant, k)) for k in ("method", "bits", "outlier_bits", "outlier_threshold")}
        values.update({k: safe_text(_field(calib, k)) for k in ("nsamples", "seqlen", "seed")})
        lines.append(f"conversion: {safe_text(conv.get('tool'))}, method {values['method']} bits {values['bits']} "
                     f"outlier_bits {values['outlier_bits']} S {values['outlier_threshold']}; calibration "
                     f"{values['nsamples']}x{values['seqlen']} seed {values['seed']} "
                     f"from {', '.join(safe_text(Path(str(s)).name) for s in _sources(calib))}")
    if not per_tensor:
        return "\n".join(lines)
    lines.append("per tensor:")
    for name, t in summary["tensors"].items():
        if t["kind"] == spec.KIND_CLAQ:
            hist = " ".join(f"{b}b:{n}" for b, n in t["bits_histogram"].items())
            lines.append(f"  {safe_text(name)} {t['shape']} {t['bpw']:.3f} bpw [{hist}] outliers {t['outliers']}")
        else:
            lines.append(f"  {safe_text(name)} {t['shape']} raw {t['stored_bytes']} bytes")
    return "\n".join(lines)
