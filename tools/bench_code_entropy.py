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
- `huffman_chunked`: what a file could store and a loader expand to fixed-width streams in parallel: the
  stream's codes Huffman-coded with lengths limited to MAX_CODE_LENGTH (one table lookup a code), one
  byte of code length per entry rank, and a u32 bit offset every CHUNK_CODES codes (chunks decode apart).
  The tool encodes every stream so (`encode_stream`) and checks that `decode_stream` gives the codes back.
Then the honest bpw of the file's quantized tensors as they are, and with the code streams replaced by
`huffman_with_offsets` or `huffman_chunked` (everything else as stored). `--time-decode`: the seconds that
decoding every chunked stream of the file takes (best of three, Numba over the chunks, torch's threads).

    python tools/bench_code_entropy.py out/quality/ROW.claq --out bench/code-entropy.json [--time-decode]
"""
from __future__ import annotations

import heapq
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
from claq_convert.format.reader import check_claq_contents, open_claq  # noqa: E402

OFFSET_BITS = 32  # a u32 bit offset per column
MAX_CODE_LENGTH = 12  # a decoder looks each code up in a table of 2**12 entries
CHUNK_CODES = 4096  # codes between two u32 bit offsets of a chunked stream
LENGTH_BITS = 8  # the table: one byte of code length per entry rank


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code lengths of an optimal prefix code for symbol counts (0 for unused symbols; 1 if only one is used)."""
    used = np.flatnonzero(counts > 0)
    lengths = np.zeros(counts.size, np.int64)
    if used.size == 1:
        lengths[used] = 1
        return lengths
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def limited_lengths(counts: np.ndarray, longest: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths of at most `longest` bits: rare symbols' counts are raised (by a share of the
    total each round) until the tree is that shallow. Not optimal under the limit (package-merge is), but
    at most 2**8 symbols and a 12-bit limit it rarely has to act."""
    counts = np.asarray(counts, np.float64)
    raised = counts.copy()
    while True:
        lengths = huffman_lengths(raised)
        if lengths.max() <= longest:
            return lengths
        raised = np.where(counts > 0, raised + counts.sum() / (1 << (longest - 1)), 0.0)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical prefix codes for `lengths` (shorter first, then by symbol), each stored bit-reversed, so
    that a reader taking stream bits least significant first meets the code's first bit first."""
    codes = np.zeros(lengths.size, np.uint64)
    code, previous = 0, 0
    for symbol in np.lexsort((np.arange(lengths.size), lengths)):
        length = int(lengths[symbol])
        if length == 0:
            continue
        code <<= length - previous
        previous = length
        codes[symbol] = int(f"{code:0{length}b}"[::-1], 2)
        code += 1
    return codes


def encode_stream(symbols: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(u64 words, u32 bit offset of every CHUNK_CODES-th code, bits used) of `symbols` coded back to back,
    least significant bit first."""
    length = lengths[symbols].astype(np.int64)
    code = canonical_codes(lengths)[symbols]
    ends = np.cumsum(length)
    start = ends - length
    bits = int(ends[-1]) if ends.size else 0
    words = np.zeros(bits // 64 + 2, np.uint64)  # a spare word: the decoder reads two at a time
    word, shift = start >> 6, (start & 63).astype(np.uint64)
    np.bitwise_or.at(words, word, code << shift)
    spill = (start & 63) + length > 64
    np.bitwise_or.at(words, word[spill] + 1, code[spill] >> (np.uint64(64) - shift[spill]))
    return words, start[::CHUNK_CODES].astype(np.uint32), bits


def decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(symbol, code length) for each value of the next MAX_CODE_LENGTH stream bits."""
    symbol = np.zeros(1 << MAX_CODE_LENGTH, np.uint8)
    length = np.zeros(1 << MAX_CODE_LENGTH, np.uint8)
    for s, code in enumerate(canonical_codes(lengths).tolist()):
        if lengths[s]:
            index = code | (np.arange(1 << (MAX_CODE_LENGTH - int(lengths[s]))) << int(lengths[s]))
            symbol[index], length[index] = s, lengths[s]
    return symbol, length


@numba.njit(parallel=True)  # no cache: the tests load this file under another module name
def decode_stream(words, chunk_starts, count, symbol, length, out):
    """out[:count] = the symbols of an `encode_stream` stream, its chunks in parallel."""
    mask = np.uint64((1 << MAX_CODE_LENGTH) - 1)
    for chunk in numba.prange(chunk_starts.size):
        bit = np.int64(chunk_starts[chunk])
        for i in range(chunk * CHUNK_CODES, min(count, (chunk + 1) * CHUNK_CODES)):
            word, shift = bit >> 6, bit & 63
            window = words[word] >> np.uint64(shift)
            if shift > 64 - MAX_CODE_LENGTH:
                window |= words[word + 1] << np.uint64(64 - shift)
            index = window & mask
            out[i] = symbol[index]
            bit += length[index]


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
    stream is appended to `streams` as (words, chunk starts, count, decode table, the ranks it codes)."""
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
        words, chunk_starts, coded = encode_stream(r.ravel(), lengths)  # column by column, as stored
        if streams is not None:
            streams.append((words, chunk_starts, r.size, decode_table(lengths), r.ravel().astype(np.uint8)))
        out[b] = {"codes": int(columns.size * rows), "fixed": float(columns.size * rows * b),
                  "column_entropy": cross_entropy_bits(counts, counts / rows),
                  "pooled_entropy": cross_entropy_bits(pooled, pooled / pooled.sum()),
                  "huffman": huffman, "huffman_with_offsets": huffman + OFFSET_BITS * columns.size,
                  "huffman_chunked": float(coded + OFFSET_BITS * chunk_starts.size + LENGTH_BITS * k)}
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
        stored_bits, params = 0, 0
        with open_claq(path) as f:
            for name, tensor in f.tensors.items():
                if tensor["kind"] != spec.KIND_CLAQ:
                    continue
                rows = tensor["shape"][0]
                sections = check_claq_contents(name, rows, f.sections(name), f.widths)
                stored_bits += 8 * f.stored_bytes(name)
                params += int(np.prod(tensor["shape"]))
                for b, row in tensor_report(rows, sections, streams).items():
                    for key, value in row.items():
                        totals[key] += value
                        by_width.setdefault(b, dict.fromkeys(row, 0.0))[key] += value
        decoded = [np.empty(count, np.uint8) for _, _, count, _, _ in streams]
        seconds = []
        for _ in range(3 if time_decode else 1):
            start = time.perf_counter()
            for (words, chunk_starts, count, (symbol, length), _), into in zip(streams, decoded):
                decode_stream(words, chunk_starts, count, symbol, length, into)
            seconds.append(time.perf_counter() - start)
        if not all(np.array_equal(into, stream[4]) for stream, into in zip(streams, decoded)):
            raise click.ClickException(f"{path}: a chunked stream did not decode to its codes")
        per_code = {key: totals[key] / totals["codes"] for key in totals if key != "codes"}
        report["files"][str(path)] = {
            "quantized_params": params, "honest_bpw": stored_bits / params,
            "honest_bpw_huffman_codes": (stored_bits - totals["fixed"] + totals["huffman_with_offsets"]) / params,
            "honest_bpw_huffman_chunked": (stored_bits - totals["fixed"] + totals["huffman_chunked"]) / params,
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
