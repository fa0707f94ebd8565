"""Hostile files from the fuzzing of the readers (tools/fuzz_readers.py): one hand-built file per failure
class, each refused with its own ClaqFormatError in one line, fast; then a short seeded fuzz run."""
import importlib.util
import json
import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from claq_convert.format import gguf_ext, spec
from claq_convert.cli import inspect_cmd
from claq_convert.format.gguf_ext import GgufClaqFile, GgufLimitError
from claq_convert.format.inspection import render, summarize
from claq_convert.format.reader import BadHeader, BadLayout, ClaqFile, TruncatedFile, UnsupportedVersion
from claq_convert.format.writer import ClaqWriter

ROOT = Path(__file__).resolve().parents[1]


def open_all(path):
    """What claq-inspect does, and every tensor decoded."""
    with gguf_ext.open_model_file(path) as cf:
        cf.validate()
        render(summarize(cf), per_tensor=True)
        for name in cf.tensors:
            cf.decode(name)


def refused(path, error, seconds=2.0):
    """The file fails with exactly `error` (or a subclass), within `seconds`, in one short line."""
    start = time.perf_counter()
    with pytest.raises(error) as caught:
        open_all(path)
    assert time.perf_counter() - start < seconds
    message = str(caught.value)
    assert message and "\n" not in message and len(message) < 400, message
    return message


def inspect_fails_in_one_line(path):
    result = CliRunner().invoke(inspect_cmd, [str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("invalid: "), result.output
    return result.output


# --------------------------------------------------------------------------- .claq files, edited headers

CONFIG = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 4}


@pytest.fixture(scope="module")
def claq_base(tmp_path_factory) -> Path:
    """A small valid .claq: one raw tensor, one quantized weight, one embedded file, full metadata."""
    path = tmp_path_factory.mktemp("base") / "base.claq"
    with ClaqWriter(path) as w:
        w.add_raw("norm", np.arange(4, dtype=np.float32))
        w.add_quantized("w", 2, {"bit_widths": np.array([1, 1], np.uint8),
                                 "codebooks": np.array([-1, 1, -2, 2], np.float16),
                                 "codes_1": np.array([0b1001], np.uint32)})
        w.add_file("note.txt", b"hello")
        w.metadata.update(config=CONFIG, generation_config=None, conversion={"tool": "test"})
    open_all(path)
    return path


def header_text(path) -> str:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[8:16])[0]
    return raw[16:16 + n].decode().rstrip(" ")


def with_header(base, path, text) -> Path:
    """`base` with its header replaced by `text` (str or bytes), padded and sized as the spec says."""
    raw = base.read_bytes()
    n = struct.unpack("<Q", raw[8:16])[0]
    body = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    body += b" " * ((-(16 + len(body))) % 64)
    path.write_bytes(raw[:4] + struct.pack("<IQ", spec.VERSION, len(body)) + body + raw[16 + n:])
    return path


def edited(base, path, fn) -> Path:
    header = json.loads(header_text(base))
    fn(header)
    return with_header(base, path, json.dumps(header))


def set_metadata(key, value):
    return lambda h: h["metadata"].__setitem__(key, value)


def raw_in_metadata(base, path, raw: str) -> Path:
    """A header whose metadata.config.extra is the JSON text `raw`, put in as it is."""
    text = header_text(base).replace('"model_type":', f'"extra":{raw},"model_type":', 1)
    return with_header(base, path, text)


@pytest.mark.parametrize("label,raw", [
    ("deep_arrays", "[" * 100_000 + "]" * 100_000),   # was RecursionError
    ("deep_objects", '{"a":' * 3000 + "1" + "}" * 3000),
    ("depth_65", "[" * 65 + "]" * 65),
    ("int_5000_digits", "1" * 5000),                  # was ValueError (Python's int digit limit)
    ("int_past_u64", str(1 << 64)),
    ("float_overflow", "1e400"),                      # parsed as inf before
    ("lone_surrogate", '"\\ud800"'),
])
def test_json_limits(claq_base, tmp_path, label, raw):
    refused(raw_in_metadata(claq_base, tmp_path / f"{label}.claq", raw), BadHeader)


def test_json_limits_keep_what_metadata_needs(claq_base, tmp_path):
    ok = raw_in_metadata(claq_base, tmp_path / "ok.claq",
                         "[" * 60 + "]" * 60 + f',"big":{(1 << 64) - 1},"neg":{-(1 << 63)},"pair":"\\ud83d\\ude00"')
    open_all(ok)


def test_a_duplicate_key_among_many_fails_fast(claq_base, tmp_path):
    """The duplicate-key check counted every key once per key: 100,000 keys and one twice took minutes."""
    keys = ",".join(f'"k{i}":0' for i in range(100_000))
    refused(raw_in_metadata(claq_base, tmp_path / "dup.claq", "{" + keys + ',"k5":1}'), BadHeader)


@pytest.mark.parametrize("label,fn", [
    ("dtype_list", lambda h: h["tensors"]["norm"]["sections"]["data"].update(dtype=[])),   # was TypeError
    ("dtype_object", lambda h: h["tensors"]["w"]["sections"]["codebooks"].update(dtype={})),
    ("kind_list", lambda h: h["tensors"]["norm"].update(kind=[])),
    ("version_bool", lambda h: h.update(version=True)),
    ("encoding_list", lambda h: h["files"]["note.txt"].update(encoding=[])),
    ("config_list", set_metadata("config", [])),                                        # was AttributeError
    ("config_string", set_metadata("config", "llama")),
    ("conversion_number", set_metadata("conversion", 1.5)),                             # was TypeError
    ("generation_list", set_metadata("generation_config", [1])),
    ("file_name_parent", lambda h: h["files"].__setitem__("..", h["files"].pop("note.txt"))),
    ("file_name_path", lambda h: h["files"].__setitem__("a/b", h["files"].pop("note.txt"))),
    ("file_name_empty", lambda h: h["files"].__setitem__("", h["files"].pop("note.txt"))),
    ("file_name_newline", lambda h: h["files"].__setitem__("a\nb", h["files"].pop("note.txt"))),
])
def test_header_values_of_the_wrong_type(claq_base, tmp_path, label, fn):
    refused(edited(claq_base, tmp_path / f"{label}.claq", fn), BadHeader)


def test_messages_quote_file_text_briefly(claq_base, tmp_path):
    long_dtype = edited(claq_base, tmp_path / "long.claq",
                        lambda h: h["tensors"]["norm"]["sections"]["data"].update(dtype="X" * 100_000))
    assert "..." in refused(long_dtype, BadHeader)


# --------------------------------------------------------------------------- GGUF files, byte by byte

STRING, ARRAY, UINT8, UINT32 = 8, 9, 0, 4
F32, F16, Q4_0, I8, I32, BF16 = 0, 1, 2, 24, 26, 30


def gstr(text) -> bytes:
    data = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(data)) + data


def kv_string(key, value):
    return (key, STRING, gstr(value))


def gguf_file(kvs, tensors=(), version=3, alignment=32) -> bytes:
    """kvs: (key, value type, value bytes); tensors: (name, dims fastest first, GGML type, data bytes)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        out += gstr(key) + struct.pack("<I", vtype) + value
    blobs = b""
    for name, dims, ggml, data in tensors:
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml, len(blobs))
        blobs += data + b"\0" * ((-len(data)) % alignment)
    return out + b"\0" * ((-len(out)) % alignment) + blobs


RAW_ENTRY = {"name": "x", "gguf": "x", "kind": "raw", "shape": [4], "dtypes": {"data": "F32"}}
X_DATA = np.arange(4, dtype=np.float32).tobytes()


def claq_gguf(path, table=None, tensors=None, config="{}", extra=(), replace=None) -> Path:
    """A minimal CLAQ GGUF file (one raw tensor "x"), with keys, table or tensors swapped in."""
    kvs = {"general.architecture": kv_string("general.architecture", "claq"),
           "claq.version": ("claq.version", UINT32, struct.pack("<I", 2)),
           "claq.config": kv_string("claq.config", config),
           "claq.tensors": kv_string("claq.tensors", json.dumps([RAW_ENTRY] if table is None else table)
                                     if not isinstance(table, (str, bytes)) else table)}
    for key, value in (replace or {}).items():
        kvs[key] = value
    path.write_bytes(gguf_file([v for v in kvs.values() if v is not None] + list(extra),
                               [("x", [4], F32, X_DATA)] if tensors is None else tensors))
    return path


# A 2 x 2 weight of two 1-bit columns, as GGUF tensors.
QUANT_ENTRY = {"name": "w", "gguf": "w", "kind": "claq", "shape": [2, 2],
               "dtypes": {"bit_widths": "U8", "codebooks": "F16", "codes_1": "U32"}}
QUANT_TENSORS = [("w.bit_widths", [2], I8, bytes([1, 1])),
                 ("w.codebooks", [4], F16, np.float16([-1, 1, -2, 2]).tobytes()),
                 ("w.codes_1", [1], I32, struct.pack("<I", 0b1001))]


def test_the_minimal_gguf_is_valid(tmp_path):
    path = claq_gguf(tmp_path / "ok.gguf")
    open_all(path)
    with GgufClaqFile(path) as g:
        assert np.array_equal(g.decode("x"), np.arange(4, dtype=np.float32))
    quantized = claq_gguf(tmp_path / "w.gguf", table=[QUANT_ENTRY], tensors=QUANT_TENSORS)
    open_all(quantized)
    with GgufClaqFile(quantized) as g:
        assert np.array_equal(g.decode("w"), np.array([[1, -2], [-1, 2]], np.float32))


def test_a_kv_array_claiming_2_62_items_fails_at_once(tmp_path):
    """2.2 KB that gguf-py would loop over for ever, memory growing: the pre-scan counts bytes first."""
    junk = ("claq.junk", ARRAY, struct.pack("<IQ", UINT8, 1 << 62) + bytes(2048))
    path = claq_gguf(tmp_path / "huge.gguf", extra=[junk])
    assert path.stat().st_size < 2500
    refused(path, TruncatedFile, seconds=2.0)
    start = time.perf_counter()
    inspect_fails_in_one_line(path)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("label,extra,error", [
    ("string_array_huge", [("a", ARRAY, struct.pack("<IQ", STRING, 1 << 40) + gstr("x"))], TruncatedFile),
    ("string_length_huge", [("a", STRING, struct.pack("<Q", 1 << 63) + b"x")], TruncatedFile),
    ("nested_deep", [("a", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", ARRAY, 1) * 5000)],
     GgufLimitError),                                                              # was RecursionError in gguf-py
    ("unknown_value_type", [("a", 99, b"\0" * 8)], BadHeader),
    ("duplicate_key", [kv_string("claq.config", "{}")], BadHeader),
    ("key_not_utf8", [(b"claq.\xff", STRING, gstr("x"))], BadHeader),
])
def test_gguf_header_walk(tmp_path, label, extra, error):
    refused(claq_gguf(tmp_path / f"{label}.gguf", extra=extra), error)


def test_gguf_preamble_and_tensor_infos(tmp_path):
    big_endian = tmp_path / "be.gguf"
    big_endian.write_bytes(b"GGUF" + struct.pack(">I", 3) + bytes(16))
    refused(big_endian, UnsupportedVersion)
    refused(claq_gguf(tmp_path / "q4.gguf", tensors=[("x", [32], Q4_0, bytes(18))]), BadHeader)
    refused(claq_gguf(tmp_path / "dims.gguf", tensors=[("x", [1, 1, 1, 1, 4], F32, X_DATA)]), GgufLimitError)
    refused(claq_gguf(tmp_path / "past.gguf", tensors=[("x", [1 << 40], F32, X_DATA)]), BadLayout)
    wrap = tmp_path / "wrap.gguf"   # 2**32 * 2**32 elements: the product wraps to 0 in uint64
    refused(claq_gguf(wrap, tensors=[("x", [1 << 32, 1 << 32], F32, X_DATA)]), BadLayout)
    refused(claq_gguf(tmp_path / "name.gguf", tensors=[(b"x\xff", [4], F32, X_DATA)]), BadHeader)


@pytest.mark.parametrize("label,kwargs", [
    ("config_not_utf8", {"config": b'{"a": "\xff"}'}),                               # was UnicodeDecodeError
    ("config_list", {"config": "[]"}),
    ("config_deep", {"config": "[" * 50_000 + "]" * 50_000}),                        # was RecursionError
    ("config_big_int", {"config": '{"a": ' + "9" * 5000 + "}"}),                     # was ValueError
    ("conversion_not_json", {"extra": [kv_string("claq.conversion", "{bad")]}),      # was JSONDecodeError
    ("conversion_string", {"extra": [kv_string("claq.conversion", '"x"')]}),          # was AttributeError
    ("generation_list", {"extra": [kv_string("claq.generation_config", "[1]")]}),
    ("version_string", {"replace": {"claq.version": kv_string("claq.version", "2")}}),
    ("version_array", {"replace": {"claq.version": ("claq.version", ARRAY, struct.pack("<IQI", UINT32, 1, 2))}}),
    ("architecture_number", {"replace": {"general.architecture": ("general.architecture", UINT32, bytes(4))}}),
    ("tokenizer_rest_surrogate", {"extra": [kv_string("claq.tokenizer_json", '{"model": {"merges": "\\ud800"}}'),
                                            ("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 0))]}),
    ("tokenizer_rest_list", {"extra": [kv_string("claq.tokenizer_json", "[]"),
                                       ("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 0))]}),
    ("file_empty", {"extra": [kv_string("claq.file.note.txt", "")]}),
    ("file_name_dotdot", {"extra": [kv_string("claq.file...", "x")]}),
    ("file_float_array", {"extra": [("claq.file.a", ARRAY, struct.pack("<IQf", 6, 1, 1.0))]}),
])
def test_gguf_claq_keys(tmp_path, label, kwargs):
    refused(claq_gguf(tmp_path / f"{label}.gguf", **kwargs), BadHeader)


def entry(**changes):
    return [{**RAW_ENTRY, **changes}]


@pytest.mark.parametrize("label,table,tensors", [
    ("not_array", "{}", None),                                                       # was TypeError
    ("entry_not_object", [1], None),
    ("entry_missing_gguf", [{k: v for k, v in RAW_ENTRY.items() if k != "gguf"}], None),  # was KeyError
    ("name_number", entry(name=3), None),
    ("kind_unknown", [{**QUANT_ENTRY, "kind": "q4"}], QUANT_TENSORS),   # was read as quantized, unchecked
    ("kind_unhashable", entry(kind=[]), None),
    ("shape_empty", entry(shape=[]), None),                        # was IndexError
    ("shape_zero", entry(shape=[0]), None),                        # was ZeroDivisionError
    ("dtypes_list", entry(dtypes=[]), None),                       # was AttributeError
    ("dtype_unhashable", entry(dtypes={"data": {}}), None),        # was TypeError
    ("dtype_unknown", entry(dtypes={"data": "Q8"}), None),
    ("raw_two_sections", entry(dtypes={"data": "F32", "x": "F32"}), None),
    ("listed_twice", entry() + entry(), None),
    ("gguf_tensor_missing", entry(gguf="y"), None),
    ("gguf_tensor_unlisted", entry(), [("x", [4], F32, X_DATA), ("y", [4], F32, X_DATA)]),
    ("wrong_ggml_type", entry(), [("x", [8], F16, X_DATA)]),
    ("raw_shape_mismatch", entry(), [("x", [2, 2], F32, X_DATA)]),   # was valid, then failed to decode
    ("raw_shape_other_count", entry(shape=[2]), None),
    ("quantized_missing_sections", [{"name": "w", "gguf": "w", "kind": "claq", "shape": [2, 2],
                                     "dtypes": {"codebooks": "F16"}}], [("w.codebooks", [4], F16, bytes(8))]),
    ("quantized_section_2d", [{"name": "w", "gguf": "w", "kind": "claq", "shape": [2, 2],
                               "dtypes": {"bit_widths": "U8", "codebooks": "F16"}}],
     [("w.bit_widths", [1, 2], I8, bytes([1, 1])), ("w.codebooks", [4], F16, bytes(8))]),
])
def test_gguf_tensor_table(tmp_path, label, table, tensors):
    refused(claq_gguf(tmp_path / f"{label}.gguf", table=table, tensors=tensors), BadHeader)


def test_bf16_raw_tensors_keep_their_shape_in_gguf(tmp_path):
    """The writer gave a BF16 raw tensor half its dimensions (gguf-py read the u16 view as bytes): the
    reader now refuses such a file, and a written one round-trips."""
    claq = tmp_path / "bf16.claq"
    bits = (np.array([1.0, -2.5, 0.15625, 3.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    with ClaqWriter(claq) as w:
        w.add_raw("model.norm.weight", bits.reshape(2, 2), dtype="BF16")
        w.metadata.update(config=CONFIG, generation_config=None, conversion={})
    path = gguf_ext.claq_to_gguf(claq, tmp_path / "bf16.gguf")
    with GgufClaqFile(path) as g, ClaqFile(claq) as c:
        g.validate()
        assert np.array_equal(g.decode("model.norm.weight"), c.decode("model.norm.weight"))
    old = [{"name": "x", "gguf": "x", "kind": "raw", "shape": [4], "dtypes": {"data": "BF16"}}]
    refused(claq_gguf(tmp_path / "old.gguf", table=old, tensors=[("x", [2], BF16, bits.tobytes())]), BadHeader)


# --------------------------------------------------------------------------- claq-inspect

def test_inspect_reports_hostile_files_in_one_line(claq_base, tmp_path):
    files = [raw_in_metadata(claq_base, tmp_path / "deep.claq", "[" * 100_000 + "]" * 100_000),
             edited(claq_base, tmp_path / "config.claq", set_metadata("config", [])),
             claq_gguf(tmp_path / "kind.gguf", table=[{**QUANT_ENTRY, "kind": "q4"}], tensors=QUANT_TENSORS),
             claq_gguf(tmp_path / "shape.gguf", tensors=[("x", [2, 2], F32, X_DATA)]),
             claq_gguf(tmp_path / "utf8.gguf", config=b'{"a": "\xff"}')]
    for path in files:
        inspect_fails_in_one_line(path)


def test_inspect_escapes_control_characters_in_config_strings(claq_base, tmp_path):
    forged = "llama\nvalid: forged line\x1b[2J\x07"
    conversion = {"tool": "t\rx", "quant": {"method": "claq\x1b[31m", "bits": "3\n4"},
                  "calibration": {"sources": "self\nfile", "seed": "\u202e0"}}
    path = edited(claq_base, tmp_path / "forged.claq", lambda h: (
        h["metadata"]["config"].update(model_type=forged, architectures=["A\nB"], num_hidden_layers="1\n2",
                                       hidden_size="\x1b]0;title\x07"),
        h["metadata"].__setitem__("conversion", conversion)))
    result = CliRunner().invoke(inspect_cmd, [str(path), "--tensors"])
    assert result.exit_code == 0, result.output
    lines = result.output.rstrip("\n").split("\n")
    assert len(lines) == 7 + 1 + 2, result.output  # summary, conversion, "per tensor:" and two tensors
    assert not any(c != "\n" and not c.isprintable() for c in result.output)
    assert "llama\\nvalid: forged line\\x1b[2J\\x07" in result.output
    assert "method claq\\x1b[31m bits 3\\n4" in result.output and "from self\\nfile" in result.output
    assert "\\u202e0" in result.output


def test_metadata_of_other_shapes_summarizes(claq_base, tmp_path):
    """conversion fields of unexpected types (lists, numbers) print as text, never raise."""
    conversion = {"tool": ["a"], "quant": [1, 2], "calibration": {"sources": 7, "text": None}}
    path = edited(claq_base, tmp_path / "conv.claq", set_metadata("conversion", conversion))
    result = CliRunner().invoke(inspect_cmd, [str(path)])
    assert result.exit_code == 0 and "conversion: ['a'], method None" in result.output, result.output


# --------------------------------------------------------------------------- coded streams (format v4)

@pytest.mark.parametrize("damage", ["none", "offset", "bytes"])
def test_coded_streams_decode_alike_on_one_thread_and_in_parallel(damage):
    """A stream of fewer than HUFFMAN_PARALLEL_CHUNKS chunks decodes on one thread: a parallel region per
    stream cost milliseconds on a busy machine and made the short fuzz run below 3x slower (48 s against
    16). Both kernels give the same codes and chunk ends, whatever the damage."""
    from claq_convert.format import huffman
    from claq_convert.kernels import numba_decode

    rng = np.random.default_rng(5)
    n = (numba_decode.HUFFMAN_PARALLEL_CHUNKS + 3) * spec.CHUNK_CODES - 17
    codes = np.clip(np.rint(rng.normal(7.5, 2, n)), 0, 15).astype(np.uint8)
    section = huffman.encode_codes(codes, 4)
    prefix, chunks = spec.huffman_prefix_bytes(n, 4), spec.chunk_count(n)
    starts = section[:4 * chunks].view("<u4").astype(np.int64)
    stream = np.concatenate([section[prefix:], np.zeros(2, np.uint8)])
    if damage == "offset":
        starts[[1, chunks // 2, chunks - 1]] += [1, -3, 12]
    if damage == "bytes":
        stream[rng.integers(0, stream.size - 2, 50)] ^= rng.integers(1, 256, 50).astype(np.uint8)
    symbol, length = huffman.decode_table(section[4 * chunks:prefix].astype(np.int64))
    results = []
    for parallel in (False, True, None):
        got, ends = np.zeros(n, np.uint8), np.zeros(chunks, np.int64)
        numba_decode.decode_huffman_chunks(stream, 8 * (stream.size - 2), starts, symbol, length, got, ends, parallel)
        results.append((got, ends))
    for got, ends in results[1:]:
        assert np.array_equal(ends, results[0][1]) and np.array_equal(got, results[0][0])
    if damage == "none":
        assert np.array_equal(results[0][0], codes) and np.array_equal(results[0][1][:-1], starts[1:])
    else:
        assert (results[0][1][:-1] != starts[1:]).any()


# --------------------------------------------------------------------------- a short fuzz run

def load_fuzzer():
    spec_ = importlib.util.spec_from_file_location("fuzz_readers", ROOT / "tools" / "fuzz_readers.py")
    fuzz = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(fuzz)
    return fuzz


def coded_streams(path) -> dict[str, int]:
    """huffman_<b> section -> its codes, over the file's weights."""
    streams = {}
    with gguf_ext.open_model_file(path) as cf:
        for name, tensor in cf.tensors.items():
            widths = cf.sections(name)["bit_widths"] if tensor["kind"] == spec.KIND_CLAQ else None
            for section in tensor["sections"]:
                if spec.is_huffman_section(section):
                    bits = int(section[len(spec.HUFFMAN_PREFIX):])
                    streams[f"{name}/{section}"] = int(np.count_nonzero(widths == bits)) * tensor["shape"][0]
    return streams


def test_the_fuzz_seeds_hold_coded_streams(tmp_path):
    """The tiny Llama the fuzzer writes has code streams long and skewed enough for the writer to code them
    (format v4), in .claq and GGUF: streams of one chunk and of several, and each one decodes."""
    fuzz = load_fuzzer()
    seeds = fuzz.write_seeds(tmp_path / "seeds")
    for path in (seeds["claq"][0], seeds["gguf"][0]):
        streams = coded_streams(path)
        assert len(streams) >= 8, streams
        assert any(n > spec.CHUNK_CODES for n in streams.values()), streams
        open_all(path)


def test_huffman_edits_of_a_gguf_keep_offsets_that_an_earlier_edit_set_near_2_64(tmp_path):
    """Case 63667 of seed 2027 poked a tensor's offset to 2**64 - 1, then grew a coded stream before it:
    moving that offset must wrap as the u64 it is, not stop the fuzzer."""
    fuzz = load_fuzzer()
    data = bytearray(fuzz.write_seeds(tmp_path / "seeds")["gguf"][0].read_bytes())
    fields, strings, header_end = fuzz.gguf_map(bytes(data))
    offsets = [offs for offs, _, label in fields if label.endswith(" offset")]
    last = max(offsets, key=lambda offs: struct.unpack_from("<Q", data, offs)[0])
    struct.pack_into("<Q", data, last, 2 ** 64 - 1)
    moved = set()
    for seed in range(40):
        done = fuzz.mutate_gguf_huffman(random.Random(seed), bytes(data), fields, strings, (header_end + 31) // 32 * 32)
        assert done is not None
        moved.add(struct.unpack_from("<Q", done[0], last)[0])
    assert 2 ** 64 - 1 in moved and any(value < 2 ** 10 for value in moved), moved  # kept, and wrapped


def test_a_short_seeded_fuzz_run_finds_only_library_errors(tmp_path):
    fuzz = load_fuzzer()
    out = tmp_path / "fuzz.json"
    start = time.perf_counter()
    code = fuzz.main(["--seed", "11", "--count", "1500", "--timeout", "10", "--out", str(out)])
    results = json.loads(out.read_text())
    assert code == 0 and results["failures"] == {}, json.dumps(results["failures"], indent=1)[:3000]
    assert results["outcomes"]["library"] > 500 and results["outcomes"]["valid"] > 50
    assert results["per_format"] == {"claq": 750, "gguf": 750}
    coded = results["huffman_cases"]  # cases with an edit aimed at a huffman_<b> section
    assert sum(coded.values()) > 150 and coded["valid"] > 5 and coded["library"] > 100, coded
    assert time.perf_counter() - start < 60
    memory = results["memory"]  # no case raises the worker's high-water mark by more than a few MiB
    assert memory["worker_peak_rss"] > 0 and memory["largest_case_growth"]["bytes"] < 64 * 2**20, memory
