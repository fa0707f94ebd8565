#!/usr/bin/env python
"""Seeded mutation fuzzer of the .claq and CLAQ GGUF readers: any exception other than the library's own
ClaqFormatError is a failure, and so are a hang, a memory blow-up, an error message of more than one line
and claq-inspect output that a file can forge.

Seeds are the conformance vectors (formats/vectors, the hostile ones too) and a small .claq and .gguf of a
complete tiny Llama, written here with the writer (no torch); its weights' skewed code streams are long
enough that the writer Huffman-codes most of them (huffman_<b>, format v4). Case i mutates one seed (even i
a .claq, odd i a .gguf) with one to three mutations drawn from a generator seeded by (--seed, i), so every
case can be rebuilt alone (--dump writes each failure class's first file). Besides blind byte edits and
JSON edits of the header, mutations know the structure: typed values poked into sections, and edits aimed
at a huffman_<b> section's parts (a chunk offset, a codeword length, the codewords flipped, cut or
extended, the stream coded anew with other lengths or another number of codes), the layout and checksum
redone so that the content checks (CLAQ-T19 to T23) see them. Each case is read as claq-inspect reads it
(open, validate, summarize, render) and then every tensor is decoded and every file inflated, in worker
processes limited in address space (--memory-mb) and time (--timeout per case; a worker stuck in C code is
killed and counted as a hang).

    python tools/fuzz_readers.py --seed 0 --count 20000 --out fuzz.json [--dump DIR] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VECTORS = ROOT / "formats" / "vectors"


# --------------------------------------------------------------------------- seeds

def _tokenizer_files() -> dict[str, bytes]:
    """A byte-level BPE tokenizer of 24 tokens, written as the Hugging Face files (tokenizer.json pretty-printed
    the way the GGUF writer can rebuild it, so the .gguf seed carries claq.tokenizer_json)."""
    letters = ["a", "b", "c", "d", "e", "f", "g", "h", "Ġ", "é"]
    vocab = {"<s>": 0, "</s>": 1}
    for token in letters + ["ab", "cd", "abcd", "ef", "gh", "Ġa", "éé", "efgh", "Ġab", "Ġabcd", "hé", "ca"]:
        vocab[token] = len(vocab)
    merges = ["a b", "c d", "ab cd", "e f", "g h", "Ġ a", "é é", "ef gh", "Ġa b", "Ġab cd", "h é", "c a"]
    tokenizer = {"version": "1.0", "truncation": None, "padding": None,
                 "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                   "normalized": False, "special": True} for t, i in (("<s>", 0), ("</s>", 1))],
                 "normalizer": None,
                 "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                   "use_regex": True},
                 "post_processor": None,
                 "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                 "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                           "ignore_merges": False, "vocab": vocab, "merges": [m.split(" ") for m in merges]}}
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "model_max_length": 64,
              "tokenizer_class": "PreTrainedTokenizerFast",
              "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    return {"tokenizer.json": json.dumps(tokenizer, indent=2, ensure_ascii=False).encode(),
            "tokenizer_config.json": json.dumps(config, indent=2).encode()}


def _codes(rng, rows: int, bits, skew):
    """uint8 codes [rows, cols] of the columns' widths: uniform (skew None) or skewed the way K-Means codes
    are, so that the writer Huffman-codes the stream (format v4): "normal" (the middle codes most used),
    "geometric" (code 0 most, a long tail: codewords up to the 12-bit limit), "constant" (one code value:
    a one-codeword, incomplete code)."""
    import numpy as np

    top = (1 << bits.astype(np.int64))[None, :]
    if skew is None:
        return (rng.integers(0, 256, (rows, bits.size)) % top).astype(np.uint8)
    if skew == "normal":
        codes = np.rint(rng.normal((top - 1) / 2, np.maximum(top / 10, 0.35), (rows, bits.size)))
    elif skew == "geometric":
        codes = rng.geometric(0.3, (rows, bits.size)) - 1
    else:
        codes = np.ones((rows, bits.size))
    return np.clip(codes, 0, top - 1).astype(np.uint8)


def _quantized(rng, rows: int, cols: int, widths, grid: bool, outliers: bool, skew=None):
    import numpy as np

    from claq_convert.format.writer import encode_claq_sections

    bits = rng.choice(widths, cols).astype(np.uint8)
    top = 1 << int(bits.max())
    codes = _codes(rng, rows, bits, skew)
    counts = rng.integers(0, 3, cols) if outliers else np.zeros(cols, np.int64)
    out_rows = np.concatenate([np.sort(rng.choice(rows, int(c), replace=False)) for c in counts]).astype(np.int64)
    values = rng.normal(0, 4, out_rows.size)
    if grid:
        levels = np.sort(rng.integers(0, 256, (cols, top)), axis=1).astype(np.uint8)
        offsets_steps = np.stack([rng.normal(0, 1, cols), rng.uniform(0, 0.05, cols)], axis=1)
        return encode_claq_sections(rows, bits, codes, levels, counts, out_rows, values, offsets_steps)
    books = np.sort(rng.normal(0, 1, (cols, top)), axis=1)
    return encode_claq_sections(rows, bits, codes, books, counts, out_rows, values)


SEED_FILES = ("tiny-llama.claq", "tiny-raw-tokenizer.claq", "tiny-llama.gguf", "tiny-whole-tokenizer.gguf")


def write_seeds(directory: Path, reuse: bool = False) -> dict[str, list[Path]]:
    """{"claq": [...], "gguf": [...]}: the vectors and a complete tiny Llama as .claq and .gguf (with `reuse`,
    those already in `directory` are kept, so that two versions of the readers see the same seeds)."""
    import numpy as np

    from claq_convert.format import gguf_ext
    from claq_convert.format.writer import ClaqWriter

    vectors = sorted(VECTORS.glob("*.claq")) + sorted((VECTORS / "bad").glob("*.claq"))
    claq, whole, gguf_seed, gguf_whole = (directory / name for name in SEED_FILES)
    if reuse and all(p.is_file() for p in (claq, whole, gguf_seed, gguf_whole)):
        return {"claq": [claq, whole] + vectors, "gguf": [gguf_seed, gguf_whole]}
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    hidden, inter, tokenizer = 64, 128, _tokenizer_files()
    vocab = 24
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 64, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1,
              "torch_dtype": "float32"}
    conversion = {"tool": "claq-convert fuzz seed", "quant": {"method": "claq", "bits": 3.1, "outlier_bits": 0.5,
                                                              "outlier_threshold": 13.0},
                  "calibration": {"nsamples": 4, "seqlen": 32, "seed": 0, "sources": ["self", "/tmp/text.txt"]},
                  "summary": {"honest_bpw": 3.5, "params": 1234}}
    # name: (shape, widths, grid codebooks, codes). Streams of a few thousand skewed codes are Huffman-coded
    # by the writer (huffman_<b>, format v4): one chunk or two (4096 codes a chunk), complete codes, an
    # incomplete one (k_proj: one code value), codewords up to 12 bits (o_proj); uniform codes keep codes_<b>.
    all_widths = (1, 2, 3, 4, 6, 8)
    linears = {"self_attn.q_proj": ((hidden, hidden), all_widths, True, None),
               "self_attn.k_proj": ((hidden // 2, hidden), (2,), False, "constant"),
               "self_attn.v_proj": ((hidden // 2, hidden), (3, 4), True, "normal"),
               "self_attn.o_proj": ((hidden, hidden), (8,), True, "geometric"),
               "mlp.gate_proj": ((inter, hidden), (3,), True, "normal"),
               "mlp.up_proj": ((inter, hidden), all_widths, False, "normal"),
               "mlp.down_proj": ((hidden, inter), (2, 5), True, "normal")}
    with ClaqWriter(claq) as w:
        w.add_quantized("model.embed_tokens.weight", vocab,
                        _quantized(rng, vocab, hidden, (2, 3, 5), grid=False, outliers=True))
        for i, (name, ((rows, cols), widths, grid, skew)) in enumerate(linears.items()):
            w.add_quantized(f"model.layers.0.{name}.weight", rows,
                            _quantized(rng, rows, cols, widths, grid=grid, outliers=i % 3 != 1, skew=skew))
        w.add_raw("model.layers.0.input_layernorm.weight", rng.normal(1, 0.1, hidden).astype(np.float32))
        bf16 = (rng.normal(1, 0.1, hidden).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        w.add_raw("model.layers.0.post_attention_layernorm.weight", bf16, dtype="BF16")
        w.add_raw("model.norm.weight", rng.normal(1, 0.1, hidden).astype(np.float16))
        for name, data in tokenizer.items():
            w.add_file(name, data)
        w.add_file("tokenizer.model", bytes(range(256)) + b"\xff\xfe\x00")
        w.metadata.update(config=config, generation_config={"bos_token_id": 0, "eos_token_id": 1, "max_length": 64},
                          conversion=conversion)
    gguf_ext.claq_to_gguf(claq, gguf_seed)
    with ClaqWriter(whole) as w:  # a compact tokenizer.json: stored whole in the GGUF file
        w.add_raw("model.norm.weight", rng.normal(1, 0.1, hidden).astype(np.float32))
        w.add_raw("model.embed_tokens.weight", rng.normal(0, 1, (vocab, hidden)).astype(np.float32))
        w.add_file("tokenizer.json", json.dumps(json.loads(tokenizer["tokenizer.json"])).encode())
        w.metadata.update(config={**config, "model_type": "qwen2"}, generation_config=None, conversion={})
    gguf_ext.claq_to_gguf(whole, gguf_whole)
    return {"claq": [claq, whole] + vectors, "gguf": [gguf_seed, gguf_whole]}


# --------------------------------------------------------------------------- JSON mutations

class Raw:
    """Bytes put into serialized JSON as they are (huge numbers, deep nesting, bad UTF-8, constants)."""

    def __init__(self, data: bytes):
        self.data = data


class Obj(list):
    """A JSON object as its list of (key, value) pairs, so that a mutation can duplicate a key."""


def json_tree(data: bytes):
    return json.loads(data, object_pairs_hook=lambda pairs: Obj([list(p) for p in pairs]))


def dump(node) -> bytes:
    if isinstance(node, Raw):
        return node.data
    if isinstance(node, Obj):
        return b"{" + b",".join(dump(k) + b":" + dump(v) for k, v in node) + b"}"
    if isinstance(node, list):
        return b"[" + b",".join(dump(v) for v in node) + b"]"
    return json.dumps(node).encode()


def nodes(tree, path=()):
    """Every (path, node) of the tree; a path step is ("k", i) for a key, ("v", i) for a value or element."""
    yield path, tree
    if isinstance(tree, Obj):
        for i, (key, value) in enumerate(tree):
            yield path + (("k", i),), key
            yield from nodes(value, path + (("v", i),))
    elif isinstance(tree, list) and not isinstance(tree, Raw):
        for i, value in enumerate(tree):
            yield from nodes(value, path + (("v", i),))


def _parent(tree, path):
    for _, i in path[:-1]:
        tree = tree[i][1] if isinstance(tree, Obj) else tree[i]
    return tree


def _set(tree, path, value):
    if not path:
        return value
    parent, (what, i) = _parent(tree, path), path[-1]
    if isinstance(parent, Obj):
        parent[i][0 if what == "k" else 1] = value
    else:
        parent[i] = value
    return tree


FORGED = "line\nvalid: forged line\x1b[31m\x07\r\u202e\u2028"
SCALARS = [None, True, False, 0, -1, 1, 2, 3, 7, 8, 9, 64, 255, 256, 65536, 2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 63,
           2 ** 64, -(2 ** 63), 1.5, -0.0, 1e308, "", "x", "claq", "raw", "U8", "U16", "U32", "F16", "F32", "BF16",
           "I8", "none", "zlib", "data", "bit_widths", "codebooks", "codebook_rice", FORGED, "\ud800", "é" * 3]
RAWS = [b"1" * 5000, b"-" + b"9" * 400, b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b'"\xff\xfe"',
        b'"\\ud800"', b'"\x01\x1b"', b"[" * 100 + b"]" * 100, b"[" * 5000 + b"]" * 5000, b"[" * 100000 + b"]" * 100000,
        b'{"a":' * 3000 + b"1" + b"}" * 3000, b"0.5e-99999", b"123456789012345678901234567890"]


def mutate_json(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One edit of the JSON text `data`: a node replaced, tweaked, dropped, duplicated... (a blind byte edit
    where an earlier mutation left text that no longer parses)."""
    try:
        tree = json_tree(data)
    except (ValueError, RecursionError):
        out = bytearray(data)
        what = mutate_bytes(rng, out, len(out))
        return bytes(out), f"json text: {what}"
    everything = list(nodes(tree))
    path, node = rng.choice(everything)
    op = rng.choice(["scalar", "scalar", "raw", "tweak", "tweak", "drop", "dup_key", "copy", "wrap", "rename"])
    if op == "tweak" and isinstance(node, int) and not isinstance(node, bool):
        value = rng.choice([node + 1, node - 1, node * 2, -node, node + 64, node - 64, 0, node ^ 1, node << 32])
        tree = _set(tree, path, value)
        return dump(tree), f"json tweak {node}->{value}"
    if op == "tweak" and isinstance(node, list) and not isinstance(node, Obj):
        choice = rng.choice(["append", "pop", "reverse"])
        if choice == "append":
            node.append(rng.choice(node) if node else 1)
        elif choice == "pop" and node:
            node.pop(rng.randrange(len(node)))
        else:
            node.reverse()
        return dump(tree), f"json list {choice}"
    if op == "drop" and path:
        parent, (_, i) = _parent(tree, path), path[-1]
        del parent[i]
        return dump(tree), "json drop"
    if op == "dup_key":
        objects = [(p, n) for p, n in everything if isinstance(n, Obj) and n]
        if objects:
            _, obj = rng.choice(objects)
            obj.append(list(rng.choice(obj)))
            return dump(tree), "json duplicate key"
    if op == "copy":
        _, other = rng.choice(everything)
        tree = _set(tree, path, json_tree(dump(other)) if not isinstance(other, str) else other)
        return dump(tree), "json copy node"
    if op == "wrap":
        tree = _set(tree, path, rng.choice([[node], Obj([["x", node]])]))
        return dump(tree), "json wrap"
    if op == "rename" and path and path[-1][0] == "v" and isinstance(_parent(tree, path), Obj):
        parent, (_, i) = _parent(tree, path), path[-1]
        parent[i][0] = rng.choice(["", FORGED, "x" * 300, "\ud800", "data", parent[i][0] + "."])
        return dump(tree), "json rename key"
    if op == "raw":
        raw = rng.choice(RAWS)
        tree = _set(tree, path, Raw(raw))
        return dump(tree), f"json raw {raw[:12]!r}"
    value = rng.choice(SCALARS + [[], [0], [1, 1], Obj(), Obj([["a", 1]])])
    tree = _set(tree, path, value)
    return dump(tree), f"json value {str(value)[:12]!r}"


# --------------------------------------------------------------------------- byte mutations

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 63, 64, 255, 256, 0x7FFF, 0xFFFF, 0x10000, 2 ** 31 - 1, 2 ** 31,
               2 ** 32 - 1, 2 ** 32, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]


def interesting_int(rng: random.Random, old: int, size: int) -> int:
    value = rng.choice(INTERESTING + [old + 1, old - 1, old * 2, old + 64, old // 2, rng.getrandbits(8 * size)])
    return value % (1 << (8 * size))


def mutate_bytes(rng: random.Random, data: bytearray, hot: int) -> str:
    """A blind edit; positions fall in the first `hot` bytes (the header) half of the time."""
    def pos():
        limit = hot if rng.random() < 0.5 and hot else len(data)
        return rng.randrange(max(1, limit))
    op = rng.choice(["flip", "flip", "bytes", "value", "truncate", "extend", "delete", "insert"])
    if not data:
        data += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        return "bytes into an empty file"
    if op == "flip":
        n = rng.randint(1, 8)
        for _ in range(n):
            data[pos() % len(data)] ^= 1 << rng.randrange(8)
        return f"{n} bit flips"
    if op == "bytes":
        at, n = pos() % len(data), rng.randint(1, 16)
        data[at:at + n] = bytes(rng.getrandbits(8) for _ in range(n))
        return f"random bytes at {at}"
    if op == "value":
        at = pos() % len(data)
        data[at] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x20, 0x0A, 0x1B, 0x22, 0x5C, 0x7B, 0x5B])
        return f"byte value at {at}"
    if op == "truncate":
        at = rng.randrange(len(data))
        del data[at:]
        return f"truncated at {at}"
    if op == "extend":
        n = rng.choice([1, 7, 32, 64, 200])
        data += bytes(rng.getrandbits(8) for _ in range(n)) if rng.random() < 0.5 else b"\0" * n
        return f"extended by {n}"
    if op == "delete":
        at, n = pos() % len(data), rng.randint(1, 64)
        del data[at:at + n]
        return f"deleted {n} at {at}"
    at, n = pos() % len(data), rng.randint(1, 64)
    data[at:at] = bytes(rng.getrandbits(8) for _ in range(n))
    return f"inserted {n} at {at}"


# --------------------------------------------------------------------------- .claq mutations

def claq_parts(data: bytes):
    """(version, header JSON text, data region) of a .claq file whose header parses, else None."""
    if len(data) < 16 or data[:4] != b"CLAQ":
        return None
    version, n = struct.unpack("<IQ", data[4:16])
    if 16 + n > len(data):
        return None
    try:
        json_tree(data[16:16 + n])
    except (ValueError, RecursionError):
        return None
    return version, data[16:16 + n].rstrip(b" "), data[16 + n:]


def claq_assemble(version: int, header: bytes, region: bytes) -> bytes:
    pad = (-(16 + len(header))) % 64
    return struct.pack("<4sIQ", b"CLAQ", version, len(header) + pad) + header + b" " * pad + region


TYPED = {"U8": ("<B", [0, 1, 4, 5, 8, 9, 255]), "I8": ("<b", [0, -1, 127, -128]),
         "U16": ("<H", [0, 1, 0xFFFF, 0x7E00, 0x7C00, 0xFC00, 0x8000]),
         "F16": ("<H", [0x7E00, 0x7C00, 0xFC00, 0xBC00, 0]), "U32": ("<I", [0, 0xFFFFFFFF, 1 << 31, 1]),
         "I32": ("<i", [0, -1, 2 ** 31 - 1]), "F32": ("<f", [float("nan"), 1e38]),
         "BF16": ("<H", [0x7FC0, 0]), "I16": ("<h", [-1]), "F64": ("<d", [float("inf")]), "I64": ("<q", [-1])}


def poke_typed(rng: random.Random, payload: bytearray, dtype: str) -> str:
    fmt, values = TYPED[dtype]
    size = struct.calcsize(fmt)
    if len(payload) < size:
        return "nothing to poke"
    at = rng.randrange(len(payload) // size) * size
    value = rng.choice(values)
    payload[at:at + size] = struct.pack(fmt, value)
    return f"{dtype} value {value} at {at}"


def mutate_claq(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    parts = claq_parts(data)
    op = rng.choice(["bytes", "preamble", "json", "json", "json", "data", "data"] if parts else ["bytes", "preamble"])
    if parts and b'"huffman_' in parts[1] and rng.random() < 0.25:  # coded streams: their own edits
        done = mutate_claq_huffman(rng, parts)
        if done is not None:
            return done
    if op == "preamble":
        out = bytearray(data.ljust(16, b"\0"))
        at, size = rng.choice([(4, 4), (8, 8), (8, 8)])
        old = int.from_bytes(out[at:at + size], "little")
        value = interesting_int(rng, old, size)
        if rng.random() < 0.3:
            value = (value + 63) // 64 * 64 - 16 if value > 16 else value
        out[at:at + size] = value.to_bytes(size, "little")
        return bytes(out), f"preamble field at {at}: {old} -> {value}"
    if op == "json":
        version, header, region = parts
        text, what = mutate_json(rng, header)
        return claq_assemble(version, text, region), what
    if op == "data":
        version, header, region = parts
        tree = json.loads(header)  # parsed in claq_parts already
        tensors = tree.get("tensors") if isinstance(tree, dict) else None
        files = tree.get("files") if isinstance(tree, dict) else None
        entries = [(f"{t}/{s}", e) for t, tensor in (tensors.items() if isinstance(tensors, dict) else ())
                   if isinstance(tensor, dict) and isinstance(tensor.get("sections"), dict)
                   for s, e in tensor["sections"].items()]
        entries += [(f"file {f}", e) for f, e in (files.items() if isinstance(files, dict) else ())]
        entries = [(w, e) for w, e in entries if isinstance(e, dict) and isinstance(e.get("dtype"), str)
                   and e["dtype"] in TYPED and type(e.get("offset")) is int and type(e.get("length")) is int
                   and 0 <= e["offset"] < e["offset"] + e["length"] <= len(region)]
        if entries:
            where, entry = rng.choice(entries)
            body = bytearray(region)
            payload = bytearray(body[entry["offset"]:entry["offset"] + entry["length"]])
            what = poke_typed(rng, payload, entry["dtype"]) if rng.random() < 0.7 else mutate_bytes(rng, payload, 0)
            payload = payload[:entry["length"]].ljust(entry["length"], b"\0")
            body[entry["offset"]:entry["offset"] + entry["length"]] = payload
            entry["crc32"] = zlib.crc32(bytes(payload))  # the checksum follows, so the content checks run
            return claq_assemble(version, json.dumps(tree).encode(), bytes(body)), f"data {where}: {what}"
    out = bytearray(data)
    what = mutate_bytes(rng, out, 16 + (len(parts[1]) if parts else 0))
    return bytes(out), what


# --------------------------------------------------------------------------- coded streams (huffman_<b>)

def huffman_prefix(bits: int, n_codes: int) -> tuple[int, int]:
    """(chunks, bytes before the codewords) of a huffman_<bits> section of n_codes codes (claq-v2.md)."""
    from claq_convert.format import spec

    return spec.chunk_count(n_codes), spec.huffman_prefix_bytes(n_codes, bits)


REFERENCE_CODES = 1 << 17  # the plain decoder below reads streams up to this many codes (the seeds': 8192)


def reference_codes(payload: bytes, bits: int, n_codes: int):
    """The codes of a huffman_<bits> section by the spec's rules in plain Python (no library decoder, so a
    mutation never depends on the code under test), or None where the section is not a valid one."""
    from claq_convert.format.huffman import canonical_codewords

    chunks, prefix = huffman_prefix(bits, n_codes)
    if n_codes <= 0 or n_codes > REFERENCE_CODES or len(payload) < prefix:
        return None
    lengths = list(payload[4 * chunks:prefix])
    if max(lengths) > 12 or not any(lengths) or sum(1 << (12 - n) for n in lengths if n) > 4096:
        return None
    table = {}  # (length, the codeword's bits as read, least significant first) -> value
    for s, codeword in enumerate(canonical_codewords(lengths).tolist()):
        if lengths[s]:
            table[(lengths[s], int(codeword))] = s
    stream = int.from_bytes(payload[prefix:], "little")
    n_bits, bit, codes = 8 * (len(payload) - prefix), 0, []
    offsets = struct.unpack_from(f"<{chunks}I", payload)
    for e in range(n_codes):
        if e % 4096 == 0 and offsets[e // 4096] != bit:
            return None
        window = (stream >> bit) & 0xFFF
        for n in range(1, 13):
            s = table.get((n, window & ((1 << n) - 1)))
            if s is not None:
                break
        if s is None or bit + n > n_bits:
            return None
        codes.append(s)
        bit += n
    return codes if (bit + 7) // 8 == n_bits // 8 and not stream >> bit else None


def _valid_lengths(rng: random.Random, codes, bits: int, lengths) -> tuple[list[int], str]:
    """Other codeword lengths for the same codes that a valid section may have (each used value a length)."""
    used = sorted(set(codes))
    choice = rng.choice(["fixed", "longest", "spare", "swap"])
    if choice == "fixed":  # every value bits long: a complete code, no shorter than codes_<b>
        return [bits] * (1 << bits), "every codeword bits long"
    if choice == "longest":  # every used value 12 bits: the longest section T19 allows
        return [12 if s in used else 0 for s in range(1 << bits)], "every used codeword 12 bits"
    new = list(lengths)
    if choice == "spare":  # unused values given codewords too, while Kraft's inequality holds
        room = 4096 - sum(1 << (12 - n) for n in new if n)
        for s in range(1 << bits):
            if not new[s] and room >= 1:
                new[s] = 12
                room -= 1
        return new, "unused values given 12-bit codewords"
    a, b = rng.choice(used), rng.choice(used)  # two used values trade lengths: the same code, other bits
    new[a], new[b] = new[b], new[a]
    return new, f"lengths of {a} and {b} swapped"


def reencode_huffman(rng: random.Random, payload: bytes, bits: int, n_codes: int):
    """The section coded anew from its codes: valid with other lengths, or for a few codes more or fewer
    (a stream of another length: chunk offsets and bounds no longer fit), or with other code values."""
    import numpy as np

    from claq_convert.format.huffman import coded_section

    codes = reference_codes(payload, bits, n_codes)
    if codes is None:
        return None
    chunks, prefix = huffman_prefix(bits, n_codes)
    lengths = list(payload[4 * chunks:prefix])
    op = rng.choice(["lengths", "lengths", "count", "values"])
    if op == "lengths":
        lengths, what = _valid_lengths(rng, codes, bits, lengths)
    elif op == "count":
        d = rng.choice([-4096, -9, -1, 1, 8, 4096, 4097])
        codes = codes[:d] if d < 0 else codes + [rng.choice(codes) for _ in range(d)]
        what = f"{d:+d} codes"
    else:  # other used values: still valid, other weights
        used = [s for s in range(1 << bits) if lengths[s]]
        for _ in range(rng.randint(1, 64)):
            codes[rng.randrange(len(codes))] = rng.choice(used)
        what = "other code values"
    if not codes:
        return None
    return bytes(coded_section(np.array(codes, np.uint8), np.array(lengths, np.int64))), f"coded anew, {what}"


def mutate_huffman(rng: random.Random, payload: bytes, bits: int, n_codes: int) -> tuple[bytes, str]:
    """One edit aimed at a huffman_<bits> section of n_codes codes, at its parts (chunk offsets, codeword
    lengths, codewords) or at the whole (coded anew): (new bytes, of any length; what was done)."""
    out = bytearray(payload)
    chunks, prefix = huffman_prefix(bits, n_codes)
    if not 0 < n_codes <= 1 << 24 or len(out) < prefix:  # another mutation broke the section's frame
        return bytes(out), f"frame broken: {mutate_bytes(rng, out, 0)}"
    n_bits = 8 * (len(out) - prefix)
    op = rng.choice(["offset", "offset", "length", "length", "lengths", "flip", "flip", "padding", "cut", "extend",
                     "chunks", "reencode", "reencode"])
    if op == "reencode":
        done = reencode_huffman(rng, payload, bits, n_codes)
        if done is not None:
            return done
        op = "flip"
    if op == "offset":
        c = rng.randrange(1, chunks) if chunks > 1 and rng.random() < 0.7 else rng.randrange(chunks)
        old, = struct.unpack_from("<I", out, 4 * c)
        near = [struct.unpack_from("<I", out, 4 * k)[0] for k in (c - 1, c + 1) if 0 <= k < chunks]
        value = rng.choice([0, 1, 7, 8, 12, 13, old - 1, old + 1, old - 8, old + 8, old - 12, old + 12, n_bits - 1,
                            n_bits, n_bits + 1, n_bits + 8, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1,
                            rng.randrange(n_bits + 1)] + near) % 2 ** 32
        struct.pack_into("<I", out, 4 * c, value)
        return bytes(out), f"offset[{c}] {old} -> {value}"
    lengths = range(4 * chunks, prefix)
    if op == "length":
        used = [at for at in lengths if out[at]]
        at = rng.choice(used) if used and rng.random() < 0.6 else rng.choice(lengths)
        old = out[at]
        out[at] = rng.choice([0, 1, 2, 11, 12, 13, 16, 255, old - 1, old + 1]) % 256
        return bytes(out), f"length[{at - 4 * chunks}] {old} -> {out[at]}"
    if op == "lengths":
        part = out[4 * chunks:prefix]
        how = rng.choice(["shuffle", "reverse", "all", "swap"])
        if how == "shuffle":
            rng.shuffle(part)
        elif how == "reverse":
            part.reverse()
        elif how == "all":
            value = rng.choice([0, 1, bits, bits + 1, 12])
            part[:] = bytes([value]) * len(part)
            how = f"all {value}"
        else:
            a, b = rng.randrange(len(part)), rng.randrange(len(part))
            part[a], part[b] = part[b], part[a]
            how = f"swap {a} {b}"
        out[4 * chunks:prefix] = part
        return bytes(out), f"lengths {how}"
    if op == "padding" and n_bits:  # bits after the last codeword, in the last byte
        mask = rng.choice([0x80, 0xC0, 0xF0, 1 << rng.randrange(8)])
        out[-1] |= mask
        return bytes(out), f"last byte |= {mask:#x}"
    if op == "cut" and n_bits:
        n = rng.choice([1, 1, 2, 3, rng.randint(1, n_bits // 8)])
        del out[len(out) - n:]
        return bytes(out), f"codewords cut by {n} bytes"
    if op == "extend":
        n = rng.choice([1, 1, 2, 8, 200])
        out += bytes(rng.getrandbits(8) for _ in range(n)) if rng.random() < 0.5 else b"\0" * n
        return bytes(out), f"codewords extended by {n} bytes"
    if op == "chunks":  # the offsets part loses, gains or reorders an offset: every later part shifts
        c = rng.randrange(chunks)
        how = rng.choice(["drop", "duplicate", "swap"])
        if how == "drop":
            del out[4 * c:4 * c + 4]
        elif how == "duplicate":
            out[4 * c:4 * c] = out[4 * c:4 * c + 4]
        else:
            d = rng.randrange(chunks)
            out[4 * c:4 * c + 4], out[4 * d:4 * d + 4] = out[4 * d:4 * d + 4], out[4 * c:4 * c + 4]
        return bytes(out), f"chunk offsets: {how} {c}"
    if not n_bits:
        return bytes(out), "no codewords to flip"
    n = rng.randint(1, 4)
    where = rng.choice(["anywhere", "chunk start", "end"])
    for _ in range(n):
        if where == "chunk start":
            start = struct.unpack_from("<I", out, 4 * rng.randrange(chunks))[0]
            bit = min(n_bits - 1, max(0, start + rng.randrange(-8, 24)))
        elif where == "end":
            bit = n_bits - 1 - rng.randrange(min(n_bits, 24))
        else:
            bit = rng.randrange(n_bits)
        out[prefix + bit // 8] ^= 1 << (bit % 8)
    return bytes(out), f"{n} codeword bit flips ({where})"


def _span_ok(entry, size: int) -> bool:
    return (isinstance(entry, dict) and type(entry.get("offset")) is int and type(entry.get("length")) is int
            and 0 <= entry["offset"] <= entry["offset"] + entry["length"] <= size)


def _huffman_width(section) -> int:
    """b of a section named huffman_<b> (1 to 8), else 0."""
    tail = section[len("huffman_"):] if isinstance(section, str) and section.startswith("huffman_") else ""
    return int(tail) if tail.isascii() and tail.isdigit() and 1 <= int(tail) <= 8 else 0  # not "huffman_\u00b2"


def claq_huffman_targets(tree, region: bytes) -> list:
    """(tensor, section, entry, b, codes) of every huffman_<b> section of a parsed .claq header whose entry,
    shape and bit_widths section still frame it (the codes: the columns of width b times the rows)."""
    tensors = tree.get("tensors") if isinstance(tree, dict) else None
    targets = []
    for name, tensor in (tensors.items() if isinstance(tensors, dict) else ()):
        sections = tensor.get("sections") if isinstance(tensor, dict) else None
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if not isinstance(sections, dict) or not isinstance(shape, list) or not shape or type(shape[0]) is not int \
                or not _span_ok(sections.get("bit_widths"), len(region)):
            continue
        widths = region[sections["bit_widths"]["offset"]:][:sections["bit_widths"]["length"]]
        targets += [(name, section, entry, _huffman_width(section), widths.count(_huffman_width(section)) * shape[0])
                    for section, entry in sections.items() if _huffman_width(section) and _span_ok(entry, len(region))]
    return targets


def claq_replace(tree, region: bytes, entry: dict, payload: bytes) -> bytes:
    """The data region with `entry`'s section replaced by `payload` of any length: the sections after it
    move by the change in its aligned length, so the layout still tiles (CLAQ-L02 to L04)."""
    from claq_convert.format.spec import align

    start, old_end = entry["offset"], align(entry["offset"] + entry["length"])
    new_end = align(start + len(payload))
    tensors, files = tree.get("tensors"), tree.get("files")
    others = [e for t in (tensors.values() if isinstance(tensors, dict) else ()) if isinstance(t, dict)
              and isinstance(t.get("sections"), dict) for e in t["sections"].values()]
    others += list(files.values()) if isinstance(files, dict) else []
    for other in others:
        if other is not entry and isinstance(other, dict) and type(other.get("offset")) is int \
                and other["offset"] >= old_end:
            other["offset"] += new_end - old_end
    entry["length"] = len(payload)
    if entry.get("dtype") == "U8" and isinstance(entry.get("shape"), list):
        entry["shape"] = [len(payload)]
    return region[:start] + payload + bytes(new_end - start - len(payload)) + region[old_end:]


def rename_coded(rng: random.Random, tree) -> "str | None":
    """A code stream section renamed: codes_<b> read as huffman_<b> (dtype U8), huffman_<b> as codes_<b> or as
    the stream of another width, or under a name that only looks like one."""
    tensors = tree.get("tensors") if isinstance(tree, dict) else None
    streams = [(t, s) for t, tensor in (tensors.items() if isinstance(tensors, dict) else ())
               if isinstance(tensor, dict) and isinstance(tensor.get("sections"), dict)
               for s in tensor["sections"] if _huffman_width(s) or str(s).startswith("codes_")]
    if not streams:
        return None
    name, old = rng.choice(streams)
    sections = tensors[name]["sections"]
    entry = sections[old]
    if old.startswith("codes_"):
        new, dtype, size = "huffman_" + old[len("codes_"):], "U8", 1
    else:
        b = _huffman_width(old)
        new = rng.choice([f"codes_{b}", f"huffman_{b % 8 + 1}", f"huffman_{b - 1 or 8}", "huffman_0", "huffman_9",
                          f"huffman_0{b}", "huffman_\u00b2", "huffman_\u0663", f"huffman_{b} "])
        dtype, size = ("U32", 4) if new.startswith("codes_") and rng.random() < 0.7 else ("U8", 1)
    if new in sections:
        return None
    if isinstance(entry, dict):
        entry["dtype"] = dtype
        if type(entry.get("length")) is int:
            entry["shape"] = [entry["length"] // size]
    tensors[name]["sections"] = {new if k == old else k: v for k, v in sections.items()}
    return f"{name}: section {old} renamed {new!r} ({dtype})"


def mutate_claq_huffman(rng: random.Random, parts) -> "tuple[bytes, str] | None":
    """A huffman_<b> section of a .claq file edited by mutate_huffman, its checksum recomputed (mostly), so
    the content checks T19-T23 run; or (now and then) a code stream renamed. None where the file has no
    huffman_<b> section left."""
    version, header, region = parts
    tree = json.loads(header)
    if rng.random() < 0.1:
        what = rename_coded(rng, tree)
        if what is not None:
            return claq_assemble(version, json.dumps(tree).encode(), region), f"huffman rename {what}"
    targets = claq_huffman_targets(tree, region)
    if not targets:
        return None
    name, section, entry, bits, n_codes = rng.choice(targets)
    new, what = mutate_huffman(rng, region[entry["offset"]:][:entry["length"]], bits, n_codes)
    body = claq_replace(tree, region, entry, new)
    stale = rng.random() < 0.05  # now and then the checksum stays the old one
    if not stale:
        entry["crc32"] = zlib.crc32(new)
    return claq_assemble(version, json.dumps(tree).encode(), body), \
        f"huffman {name}/{section}{' (stale crc)' if stale else ''}: {what}"


def gguf_huffman_targets(data: bytes, fields, strings, data_start: int) -> list:
    """(tensor, start, length, b, codes, infos) of every huffman_<b> tensor of a mapped CLAQ GGUF file whose
    table entry, tensor info and bit_widths tensor still frame it; infos: each tensor's field offsets."""
    texts = [(o, n) for o, n, label in strings if label == "claq.tensors"]
    try:
        table = json.loads(data[texts[0][0] + 8:][:texts[0][1]]) if texts else []
    except (ValueError, RecursionError):
        return []
    infos: dict[str, dict] = {}
    for offs, _, label in fields:
        for field in (" n_dims", " dim 0", " offset"):
            if label.endswith(field):
                infos.setdefault(label[:-len(field)], {})[field.strip()] = offs

    def span(name):
        info = infos.get(name, {})
        if len(info) != 3 or struct.unpack_from("<I", data, info["n_dims"])[0] != 1:
            return None
        start = data_start + struct.unpack_from("<Q", data, info["offset"])[0]
        length = struct.unpack_from("<Q", data, info["dim 0"])[0]
        return (start, length) if start + length <= len(data) else None

    targets = []
    for entry in table if isinstance(table, list) else ():
        stem = entry.get("gguf") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        widths = span(f"{stem}.bit_widths") if isinstance(stem, str) else None
        if widths is None or not isinstance(shape, list) or not shape or type(shape[0]) is not int:
            continue
        column_widths = data[widths[0]:widths[0] + widths[1]]
        for name in infos:
            bits = _huffman_width(name[len(stem) + 1:]) if name.startswith(stem + ".") else 0
            if bits and span(name):
                targets.append((name, *span(name), bits, column_widths.count(bits) * shape[0], infos))
    return targets


def mutate_gguf_huffman(rng: random.Random, data: bytes, fields, strings, data_start: int):
    """A huffman_<b> tensor of a CLAQ GGUF file edited by mutate_huffman (GGUF has no checksums); a new length
    goes into its dimension and the tensors after it move, so the layout stays aligned. None: no such tensor."""
    targets = gguf_huffman_targets(data, fields, strings, data_start)
    if not targets:
        return None
    name, start, length, bits, n_codes, infos = rng.choice(targets)
    new, what = mutate_huffman(rng, data[start:start + length], bits, n_codes)
    out = bytearray(data)
    start -= data_start  # offsets within the data region, each tensor padded to the (default) 32 bytes
    old_end, new_end = (start + n + (-(start + n) % 32) for n in (length, len(new)))
    struct.pack_into("<Q", out, infos[name]["dim 0"], len(new))
    for info in infos.values():
        if "offset" in info:
            offset, = struct.unpack_from("<Q", out, info["offset"])
            if offset >= old_end:  # an earlier mutation may have left it near 2**64: u64 arithmetic
                struct.pack_into("<Q", out, info["offset"], (offset + new_end - old_end) % 2 ** 64)
    body = new + bytes(new_end - start - len(new))
    return bytes(out[:data_start + start]) + body + bytes(out[data_start + old_end:]), f"gguf huffman {name}: {what}"


# --------------------------------------------------------------------------- GGUF mutations

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_map(data: bytes):
    """Offsets of every integer field and string of a GGUF file that parses (a seed), or None."""
    fields, strings = [], []
    try:
        offs = 24
        fields += [(4, 4, "version"), (8, 8, "tensor count"), (16, 8, "kv count")]
        n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

        def string(label, offs):
            n, = struct.unpack_from("<Q", data, offs)
            if offs + 8 + n > len(data):
                raise ValueError("string past the end")
            fields.append((offs, 8, f"{label} length"))
            strings.append((offs, n, label))
            return offs + 8 + n, data[offs + 8:offs + 8 + n]

        def value(vtype, offs, label):
            if vtype == 8:
                return string(label, offs)[0]
            if vtype == 9:
                fields.append((offs, 4, f"{label} item type"))
                fields.append((offs + 4, 8, f"{label} count"))
                itype, count = struct.unpack_from("<IQ", data, offs)
                if count > len(data):
                    raise ValueError("array longer than the file")
                offs += 12
                for i in range(count):
                    offs = value(itype, offs, f"{label}[{i}]")
                return offs
            return offs + SCALAR_SIZES[vtype]

        if n_kv > len(data) or n_tensors > len(data):
            return None
        for _ in range(n_kv):
            offs, key = string("key", offs)
            key = key.decode()
            fields.append((offs, 4, f"{key} type"))
            vtype, = struct.unpack_from("<I", data, offs)
            offs = value(vtype, offs + 4, key)
        for _ in range(n_tensors):
            offs, name = string("tensor name", offs)
            name = name.decode()
            fields.append((offs, 4, f"{name} n_dims"))
            n_dims, = struct.unpack_from("<I", data, offs)
            if n_dims > 8:
                raise ValueError("too many dimensions")
            fields += [(offs + 4 + 8 * d, 8, f"{name} dim {d}") for d in range(n_dims)]
            offs += 4 + 8 * n_dims
            fields += [(offs, 4, f"{name} type"), (offs + 4, 8, f"{name} offset")]
            offs += 12
    except (struct.error, ValueError, KeyError, OverflowError, RecursionError):  # an earlier mutation broke it
        return None
    return fields, strings, offs


def mutate_gguf(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    mapped = gguf_map(data)
    if mapped is None:
        out = bytearray(data)
        what = mutate_bytes(rng, out, min(len(data), 4096))
        return bytes(out), what
    fields, strings, header_end = mapped
    op = rng.choice(["bytes", "int", "int", "string", "json", "json", "data"])
    if b".huffman_" in data[:header_end] and rng.random() < 0.25:  # coded streams: their own edits
        done = mutate_gguf_huffman(rng, data, fields, strings, (header_end + 31) // 32 * 32)
        if done is not None:
            return done
    if op == "int":
        offs, size, label = rng.choice(fields)
        old = int.from_bytes(data[offs:offs + size], "little")
        if label.endswith("n_dims") and rng.random() < 0.6:
            value = rng.choice([0, 1, 2, 4, 5, 1 << 31])
        elif label.endswith("type") and rng.random() < 0.6:
            value = rng.choice([0, 1, 2, 4, 6, 7, 8, 9, 10, 12, 13, 24, 26, 28, 30, 0xFFFFFFFF])
        else:
            value = interesting_int(rng, old, size)
        out = bytearray(data)
        out[offs:offs + size] = value.to_bytes(size, "little")
        return bytes(out), f"gguf {label}: {old} -> {value}"
    data_start = (header_end + 31) // 32 * 32

    def splice(offs, old_len, new: bytes) -> bytes:
        head = data[:offs] + struct.pack("<Q", len(new)) + new + data[offs + 8 + old_len:header_end]
        return head + b"\0" * ((-len(head)) % 32) + data[data_start:]

    if op == "json":
        texts = [(o, n, label) for o, n, label in strings if label.startswith("claq.")
                 and label != "claq.base_architecture" and data[o + 8:o + 9] in (b"{", b"[")]
        if texts:
            offs, n, label = rng.choice(texts)
            text, what = mutate_json(rng, data[offs + 8:offs + 8 + n])
            return splice(offs, n, text), f"gguf {label}: {what}"
    if op in ("string", "json"):
        offs, n, label = rng.choice(strings)
        new = rng.choice([b"", b"\xff\xfe", b"\xc3", FORGED.encode("utf-8", "surrogatepass"), b"claq", b"llama",
                          b"x" * 70, b"{}", b"[]", b"null", data[offs + 8:offs + 8 + n] + b"\x80",
                          data[offs + 8:offs + 8 + n][:-1]])
        return splice(offs, n, new), f"gguf string {label}: {new[:12]!r}"
    if op == "data" and len(data) > data_start:
        out = bytearray(data)
        at = rng.randrange(data_start, len(data))
        n = rng.choice([1, 2, 4])
        out[at:at + n] = bytes(rng.choice([0, 0xFF, 0x7E, 0x7C, 0x09, 0x80]) for _ in range(n))
        return bytes(out), f"gguf data bytes at {at}"
    out = bytearray(data)
    what = mutate_bytes(rng, out, header_end)
    return bytes(out), what


# --------------------------------------------------------------------------- one case

def make_case(seed: int, index: int, seeds: dict[str, list[Path]], cache: dict) -> tuple[bytes, str, str]:
    """(file bytes, seed name, what was done) of case `index`: deterministic in (seed, index)."""
    rng = random.Random(f"{seed}:{index}")
    fmt = "claq" if index % 2 == 0 else "gguf"
    pool = seeds[fmt]
    path = pool[0] if rng.random() < 0.5 else rng.choice(pool)
    if path not in cache:
        cache[path] = path.read_bytes()
    data, done = cache[path], []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        data, what = (mutate_gguf if data[:4] == b"GGUF" else mutate_claq)(rng, data)
        done.append(what)
    return data, path.name, "; ".join(done)


class OutputProblem(Exception):
    """claq-inspect's output is not what it must be (a forged line, an unescaped control character), or the
    readers accepted a coded stream that the spec's rules refuse or decoded it to other codes."""


class CaseTimeout(BaseException):
    """The case ran past its time."""


def check_rendered(text: str, summary: dict) -> None:
    from claq_convert.format import spec

    expected = 6 + bool(summary["conversion"]) + 1 + len(summary["tensors"])
    lines = text.split("\n")
    if len(lines) != expected:
        raise OutputProblem(f"render printed {len(lines)} lines, expected {expected}")
    bad = [c for c in text if c != "\n" and not c.isprintable()]
    if bad:
        raise OutputProblem(f"render printed the control character {bad[0]!r}")
    text.encode("utf-8")  # a lone surrogate would break the terminal write
    if any(t["kind"] not in spec.KINDS for t in summary["tensors"].values()):
        raise OutputProblem("a tensor of a kind this reader does not know was reported valid")


def inspect_like(path: Path) -> None:
    """What claq-inspect does, then every tensor decoded and every file read."""
    import numpy as np

    from claq_convert.format.gguf_ext import open_model_file
    from claq_convert.format.inspection import render, summarize

    with open_model_file(path) as cf:
        cf.validate()
        summary = summarize(cf)
        check_rendered(render(summary, per_tensor=True), summary)
        json.dumps(summary, allow_nan=False)
        for name, tensor in cf.tensors.items():
            decoded = cf.decode(name)
            if decoded.shape != tuple(tensor["shape"]) or decoded.dtype != np.float32:
                raise OutputProblem(f"tensor decoded to {decoded.shape} {decoded.dtype}, "
                                    f"its entry says {tensor['shape']}")
            cf.sections(name, copy=True)
            if tensor["kind"] == "claq":
                check_coded_streams(cf, name, tensor["shape"][0])
        for name in cf.files:
            cf.file(name)


def check_coded_streams(cf, name: str, rows: int) -> None:
    """Each huffman_<b> section of a weight the readers accept is valid by the fuzzer's own plain reading of
    the spec (reference_codes) and decodes to the codes it gives: the readers accept no section the rules
    refuse, and decode what they accept right."""
    import numpy as np

    from claq_convert.format import spec
    from claq_convert.format.reader import check_claq_contents

    sections = cf.sections(name)
    coded = [s for s in sections if spec.is_huffman_section(s)]
    if not coded:
        return
    fixed = check_claq_contents(name, rows, sections, cf.widths)
    for section in coded:
        bits = int(section[len(spec.HUFFMAN_PREFIX):])
        n_codes = int(np.count_nonzero(sections["bit_widths"] == bits)) * rows
        if n_codes > REFERENCE_CODES:
            continue
        ours = reference_codes(bytes(sections[section]), bits, n_codes)
        if ours is None:
            raise OutputProblem(f"{section} of {name[:60]!r} was accepted, but breaks the spec's rules")
        if not np.array_equal(spec.unpack_codes(fixed[spec.code_section(bits)], bits, n_codes), ours):
            raise OutputProblem(f"{section} of {name[:60]!r} decoded to other codes than the spec's")


def site_of(exc: BaseException) -> tuple[str, str]:
    """(innermost frame, innermost frame of claq_convert) as 'file:line'."""
    frames = traceback.extract_tb(exc.__traceback__)

    def short(frame):
        name = frame.filename
        for marker in ("site-packages/", str(ROOT) + "/"):
            if marker in name:
                name = name.split(marker, 1)[1]
        return f"{name}:{frame.lineno}"
    ours = [f for f in frames if "claq_convert" in f.filename]
    return (short(frames[-1]) if frames else "?", short(ours[-1]) if ours else "?")


def load_like(path: Path) -> None:
    """claq_convert.load on a file the readers accept: only one-line errors (library, ValueError, OSError) may
    come out; anything else counts as a load failure."""
    from claq_convert import load
    from claq_convert.format.reader import ClaqFormatError

    try:
        load(path)
    except (ClaqFormatError, ValueError, OSError):
        pass
    except (CaseTimeout, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - a Rust panic in tokenizers is a BaseException
        raise LoadFailure(f"{type(exc).__name__}: {exc}") from exc


class LoadFailure(Exception):
    """load() raised something other than a one-line error on a file the readers accept."""


def run_case(path: Path, timeout: float, with_load: bool = False) -> dict:
    import signal

    from claq_convert.format.reader import ClaqFormatError

    def alarm(*_):
        raise CaseTimeout(f"no result within {timeout} s")
    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    start = time.perf_counter()
    try:
        inspect_like(path)
        outcome = {"outcome": "valid"}
        if with_load:
            load_like(path)
    except ClaqFormatError as exc:
        message = str(exc)
        outcome = {"outcome": "library", "error": type(exc).__name__}
        if "\n" in message or not message or len(message) > 600:
            site = site_of(exc)
            outcome = {"outcome": "failure", "type": "BadMessage", "site": site[0], "ours": site[1],
                       "message": f"{type(exc).__name__} of {len(message)} characters, "
                                  f"{message.count(chr(10)) + 1} lines: {message[:200]!r}"}
    except LoadFailure as failure:
        site = site_of(failure.__cause__)
        outcome = {"outcome": "failure", "type": f"load() {type(failure.__cause__).__name__}", "site": site[0],
                   "ours": site[1], "message": str(failure)[:300]}
    except (Exception, CaseTimeout) as exc:  # noqa: BLE001 - the point is to catch everything else
        site = site_of(exc)
        kind = "MemoryError" if isinstance(exc, MemoryError) else type(exc).__name__
        outcome = {"outcome": "failure", "type": kind, "site": site[0], "ours": site[1], "message": str(exc)[:300]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    outcome["seconds"] = time.perf_counter() - start
    return outcome


WARMUP_CASES = 200  # per worker, before its high-water mark counts as a case's memory


def worker(args) -> None:
    """Cases [start, stop): one JSON line 'start' before each and one result after."""
    import resource

    limit = args.memory_mb * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    seeds = {k: [Path(p) for p in v] for k, v in json.loads(Path(args.seeds_index).read_text()).items()}
    cache: dict = {}
    if args.load:  # imported once, outside the cases' time
        import claq_convert.runtime.load  # noqa: F401
        import transformers  # noqa: F401
    channel = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol; whatever the libraries print goes to stderr
    os.dup2(2, 1)
    target = Path(args.scratch) / f"case-{os.getpid()}"
    for number, index in enumerate(range(args.start, args.stop)):
        data, seed_name, what = make_case(args.seed, index, seeds, cache)
        target.write_bytes(data)
        print(json.dumps({"i": index, "status": "start"}), file=channel, flush=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = run_case(target, args.timeout, args.load)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the worker's high-water mark
        memory = {"peak_rss": peak * 1024, "size": len(data)}
        if number >= WARMUP_CASES:  # the first cases of a worker grow it by its imports and caches
            memory["rss_growth"] = (peak - before) * 1024
        print(json.dumps({"i": index, "status": "done", "seed_file": seed_name, "mutation": what, **result,
                          **memory}), file=channel, flush=True)
    target.unlink(missing_ok=True)


# --------------------------------------------------------------------------- driver

def tail(stream, n: int) -> str:
    stream.flush()
    stream.seek(0)
    return stream.read()[-n:]


def run_batch(args, start: int, stop: int, index_file: Path, scratch: Path, record) -> None:
    """Run cases [start, stop) in workers; a worker that dies or stalls costs its in-flight case only."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    next_case = start
    while next_case < stop:
        cmd = [sys.executable, __file__, "--worker", "--seeds-index", str(index_file), "--scratch", str(scratch),
               "--seed", str(args.seed), "--start", str(next_case), "--stop", str(stop),
               "--timeout", str(args.timeout), "--memory-mb", str(args.memory_mb)] + (["--load"] if args.load else [])
        errors = open(scratch / f"worker-{next_case}.err", "w+")  # a file: a chatty worker never blocks on a pipe
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, env=env, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] + [lines.put(None)], daemon=True).start()
        in_flight = None
        while True:
            try:
                line = lines.get(timeout=args.timeout + 30)
            except queue.Empty:
                proc.kill()
                record({"i": in_flight, "outcome": "failure", "type": "Hang", "site": "worker killed",
                        "ours": "?", "message": f"no result within {args.timeout + 30} s"})
                next_case = in_flight + 1
                break
            if line is None:
                proc.wait()
                if in_flight is None and next_case < stop:
                    raise RuntimeError(f"the fuzzer's worker failed: {tail(errors, 2000)}")
                if in_flight is not None:
                    record({"i": in_flight, "outcome": "failure", "type": "Crash", "site": f"exit {proc.returncode}",
                            "ours": "?", "message": tail(errors, 300)})
                    next_case = in_flight + 1
                else:
                    next_case = stop
                break
            event = json.loads(line)
            if event["status"] == "start":
                in_flight = event["i"]
            else:
                in_flight = None
                record(event)
                next_case = event["i"] + 1
        proc.stdout.close()
        errors.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="base seed of the mutations")
    parser.add_argument("--count", type=int, default=2000, help="mutated files to try (half .claq, half .gguf)")
    parser.add_argument("--first", type=int, default=0, help="index of the first case (to rerun a range)")
    parser.add_argument("--out", type=Path, help="write the summary and every failure class as JSON here")
    parser.add_argument("--dump", type=Path, help="write the first file of every failure class here")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a case may take")
    parser.add_argument("--memory-mb", type=int, default=1536, help="address-space limit of a worker")
    parser.add_argument("--seeds", type=Path, help="directory of the seed files: written there unless it holds "
                                                   "them already (default: a fresh temporary one)")
    parser.add_argument("--load", action="store_true",
                        help="also claq_convert.load() every file the readers accept (needs torch; slower)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seeds-index", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        args.memory_mb = max(args.memory_mb, 4096)  # torch and transformers alone map ~1 GB
    if args.worker:
        worker(args)
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="claq-fuzz-") as tmp:
        seeds = write_seeds(args.seeds or Path(tmp) / "seeds", reuse=args.seeds is not None)
        index_file = Path(tmp) / "seeds.json"
        index_file.write_text(json.dumps({k: [str(p) for p in v] for k, v in seeds.items()}))
        results = summarize_run(args, seeds, index_file, Path(tmp))
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if results["failures"] else 0


def summarize_run(args, seeds, index_file: Path, scratch: Path) -> dict:
    counts = {"valid": 0, "library": 0, "failure": 0}
    by_format = {"claq": 0, "gguf": 0}
    huffman = {"valid": 0, "library": 0, "failure": 0}  # cases with an edit aimed at a huffman_<b> section
    errors: dict[str, int] = {}
    classes: dict[str, dict] = {}
    slowest = [0.0, None]
    memory = {"worker_peak_rss": 0, "largest_case_growth": {"bytes": 0, "case": None, "file_bytes": None}}
    lock = threading.Lock()

    def record(event):
        with lock:
            memory["worker_peak_rss"] = max(memory["worker_peak_rss"], event.get("peak_rss", 0))
            if event.get("rss_growth", 0) > memory["largest_case_growth"]["bytes"]:
                memory["largest_case_growth"] = {"bytes": event["rss_growth"], "case": event["i"],
                                                 "file_bytes": event["size"]}
            counts[event["outcome"]] += 1
            if "huffman" in (event.get("mutation") or ""):
                huffman[event["outcome"]] += 1
            if event.get("i") is not None:
                by_format["claq" if event["i"] % 2 == 0 else "gguf"] += 1
            if event["outcome"] == "library":
                errors[event["error"]] = errors.get(event["error"], 0) + 1
            if event.get("seconds", 0) > slowest[0]:
                slowest[:] = [event["seconds"], event.get("i")]
            if event["outcome"] != "failure":
                return
            key = f"{event['type']} at {event['site']} (claq_convert: {event['ours']})"
            entry = classes.setdefault(key, {"count": 0, "first_case": event.get("i"),
                                             "seed_file": event.get("seed_file"), "mutation": event.get("mutation"),
                                             "message": event.get("message")})
            entry["count"] += 1
            if entry["count"] == 1 and args.dump and event.get("i") is not None:
                args.dump.mkdir(parents=True, exist_ok=True)
                data, _, _ = make_case(args.seed, event["i"], seeds, {})
                ext = "gguf" if event["i"] % 2 else "claq"
                (args.dump / f"case-{event['i']}.{ext}").write_bytes(data)

    stop = args.first + args.count
    jobs = max(1, args.jobs)
    bounds = [args.first + (args.count * k) // jobs for k in range(jobs + 1)]
    threads = [threading.Thread(target=run_batch, args=(args, bounds[k], bounds[k + 1], index_file, scratch, record))
               for k in range(jobs) if bounds[k] < bounds[k + 1]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts.values()) == args.count, (counts, stop)
    return {"seed": args.seed, "first": args.first, "count": args.count, "per_format": by_format, "outcomes": counts,
            "huffman_cases": huffman,
            "library_errors": dict(sorted(errors.items())), "slowest_case": {"seconds": round(slowest[0], 3),
                                                                            "case": slowest[1]},
            "memory": memory, "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                          "cpus": os.cpu_count(), "jobs": jobs},
            "failures": dict(sorted(classes.items(), key=lambda kv: -kv[1]["count"]))}


def _growth(memory: dict) -> str:
    largest = memory["largest_case_growth"]
    if not largest["bytes"]:
        return "no case after the warm-up raised it"
    return (f"largest rise in one case {largest['bytes'] / 2**20:.1f} MiB (case {largest['case']}, a file of "
            f"{largest['file_bytes']} bytes)")


def report(results: dict) -> str:
    o = results["outcomes"]
    lines = [f"{results['count']} cases (seed {results['seed']}, {results['per_format']['claq']} .claq, "
             f"{results['per_format']['gguf']} .gguf) in {results.get('seconds', 0)} s: {o['valid']} valid, "
             f"{o['library']} library errors, {o['failure']} failures in {len(results['failures'])} classes; "
             f"slowest case {results['slowest_case']['seconds']} s; worker peak RSS "
             f"{results['memory']['worker_peak_rss'] / 2**20:.0f} MiB, " + _growth(results['memory']),
             "library errors: " + ", ".join(f"{k} {v}" for k, v in results["library_errors"].items())]
    if "huffman_cases" in results:
        h = results["huffman_cases"]
        lines.append(f"edits of huffman_<b> sections: {sum(h.values())} cases, {h['valid']} valid, "
                     f"{h['library']} library errors, {h['failure']} failures")
    for key, entry in results["failures"].items():
        lines.append(f"  {entry['count']:6d}  {key}  [case {entry['first_case']}: {entry['mutation']}] "
                     f"{(entry['message'] or '')[:120]!r}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
