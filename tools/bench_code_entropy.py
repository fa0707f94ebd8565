"""What entropy-coded code streams would save: the codes of a .claq file against their fixed-width streams.

Today every column of width b stores each code in b bits. K-Means codes are not uniform (the middle entries
of a bell-shaped column are used more often), so a coder could store fewer bits. For every quantized
tensor this reads the stored codes (as the decoders do) and reports, per code:
- `fixed`: the width, as stored now;
- `column_entropy`: each column's empirical entropy (a bound that per-column tables would pay for);
- `pooled_entropy`: the cross-entropy under one distribution of entry ranks per (tensor, width), whose
  table costs nothing next to the codes;
- `huffman`: a canonical Huffman code built from that pooled distribution, bits as it would store them;
- `huffman_with_offsets`: the same plus one u32 bit offset per column, what random access by column (the
  LUT kernels read one column at a time) would need;
- `huffman_chunked`: what format v4 stores (section huffman_<b>, claq_convert/format/huffman.py): the
  stream's codes under a Huffman code limited to 12 bits, a byte of codeword length per entry rank, and a
  u32 bit offset every 4096 codes (chunks decode apart). The tool codes every stream so and checks that
  `huffman.decode_codes` gives the codes back.
Then the honest bpw of the file's quantized tensors as they are, and with the code streams as stored
(codes_<b> or, in a version-4 file, huffman_<b>) replaced by `huffman_with_offsets` or `huffman_chunked`
(everything else as stored). `--time-decode`: the seconds that decoding every chunked stream of the
file takes (best of three, Numba over the chunks, torch's threads, each checked as a reader checks it).

    python tools/bench_code_entropy.py out/quality/ROW.claq --out bench/code-entropy.json [--time-decode]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numba
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from claq_convert.cli import machine_info  # noqa: E402
from claq_convert.format import spec  # noqa: E402
from claq_convert.format.huffman import coded_section, decode_codes, huffman_lengths, limited_lengths  # noqa: E402
from claq_convert.format.reader import check_claq_contents, open_claq  # noqa: E402

OFFSET_BITS = 32  # a u32 bit offset per column


def cross_entropy_bits(counts: np.ndarray, p: np.ndarray) -> float:
    """Bits to code `counts` (any shape, last axis the symbols) under distribution(s) p."""
    logp = np.log2(np.where(p > 0, p, 1.0))
    return float(-(counts * logp).sum())


def ranks(codes: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """codes [columns, rows] as the rank of their entry within the column's ascending codebook [columns, k]."""
    rank = np.argsort(np.argsort(entries, axis=1, kind="stable"), axis=1, kind="stable")
    return np.take_along_axis(rank, codes.astype(np.int64), axis=1)


def tensor_report(rows: int, sections: dict, streams: list | None = None) -> dict:
    """Per-width code bits of one quantized tensor, as stored and under the coders above; each chunked
    stream is appended to `streams` as (its huffman_<b> section, b, the ranks it codes)."""
    bits = sections["bit_widths"]
    entries = spec.codebook_entries(sections["codebooks"], bits, sections.get("codebook_grid"))
    starts = spec.codebook_offsets(bits)
    out = {}
    for b in spec.ALLOWED_BITS:
        columns = spec.columns_of_width(bits, b)
        if not columns.size:
            continue
        k = 1 << b
        codes = spec.unpack_codes(sections[spec.code_section(b)], b, columns.size * rows).reshape(columns.size, rows)
        r = ranks(codes, entries[starts[columns][:, None] + np.arange(k)[None, :]])
        counts = np.zeros((columns.size, k))
        np.add.at(counts, (np.repeat(np.arange(columns.size), rows), r.ravel()), 1)
        pooled = counts.sum(0)
        huffman = float((pooled * huffman_lengths(pooled)).sum())
        lengths = limited_lengths(pooled)
        section = coded_section(r.ravel().astype(np.uint8), lengths)  # column by column, as stored
        if streams is not None:
            streams.append((section, b, r.ravel().astype(np.uint8)))
        out[b] = {"codes": int(columns.size * rows), "fixed": float(columns.size * rows * b),
                  "column_entropy": cross_entropy_bits(counts, counts / rows),
                  "pooled_entropy": cross_entropy_bits(pooled, pooled / pooled.sum()),
                  "huffman": huffman, "huffman_with_offsets": huffman + OFFSET_BITS * columns.size,
                  "huffman_chunked": float(8 * section.size)}
    return out


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench/code-entropy.json",
              show_default=True)
@click.option("--time-decode", is_flag=True, help="Also time decoding every chunked stream (best of three).")
def main(files, out, time_decode):
    report = {"machine": machine_info(), "files": {}}
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    for path in files:
        totals = dict.fromkeys(("codes", "fixed", "column_entropy", "pooled_entropy", "huffman",
                                "huffman_with_offsets", "huffman_chunked"), 0.0)
        streams: list = []
        by_width: dict = {}
        stored_bits, code_bits, params = 0, 0, 0
        with open_claq(path) as f:
            for name, tensor in f.tensors.items():
                if tensor["kind"] != spec.KIND_CLAQ:
                    continue
                rows = tensor["shape"][0]
                sections = check_claq_contents(name, rows, f.sections(name), f.widths)
                stored_bits += 8 * f.stored_bytes(name)
                code_bits += sum(8 * e["length"] for s, e in tensor["sections"].items()  # the streams as stored
                                 if spec.is_code_section(s) or spec.is_huffman_section(s))
                params += int(np.prod(tensor["shape"]))
                for b, row in tensor_report(rows, sections, streams).items():
                    for key, value in row.items():
                        totals[key] += value
                        by_width.setdefault(b, dict.fromkeys(row, 0.0))[key] += value
        seconds = []
        for _ in range(3 if time_decode else 1):
            start = time.perf_counter()
            decoded = [decode_codes(section, b, ranks.size) for section, b, ranks in streams]
            seconds.append(time.perf_counter() - start)
        if not all(np.array_equal(into, stream[2]) for stream, into in zip(streams, decoded)):
            raise click.ClickException(f"{path}: a chunked stream did not decode to its codes")
        per_code = {key: totals[key] / totals["codes"] for key in totals if key != "codes"}
        report["files"][str(path)] = {
            "quantized_params": params, "honest_bpw": stored_bits / params,
            "honest_bpw_huffman_codes": (stored_bits - code_bits + totals["huffman_with_offsets"]) / params,
            "honest_bpw_huffman_chunked": (stored_bits - code_bits + totals["huffman_chunked"]) / params,
            **({"decode_seconds": min(seconds), "decode_threads": numba.get_num_threads(),
                "decode_codes_per_second": totals["codes"] / min(seconds)} if time_decode else {}),
            "bits_per_code": per_code,
            "by_width": {b: {key: v / w["codes"] for key, v in w.items() if key != "codes"} | {"codes": int(w["codes"])}
                         for b, w in sorted(by_width.items())}}
        click.echo(f"{path}: {json.dumps(report['files'][str(path)], indent=1)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
