"""The C reference reader (formats/c, written from formats/claq-v2.md alone) against the conformance vectors,
a converted model and a synthetic file of every width and dtype (bit for bit with the Python reader), coded
code streams (version 4, huffman_<b>: decoded as their fixed-width words, and every rule T19-T23, H35 on
hand-built sections, rule for rule with the Python reader), the spec's edge cases of the header, and a seeded
mutation run under AddressSanitizer + UndefinedBehaviorSanitizer whose verdicts are compared with the Python
reader's.

claq_dump's output (formats/c/README.md): "ok <version> <tensors> <files>", then per tensor
"T =<name hex> <kind> <ndim> <dims...>" and "V <count> <float32 bits as 8 hex digits>...", per embedded file
"F =<name hex> <encoding> <size> <bytes hex | ->"; or one line "error <Category>: <message>" and status 1.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from claq_convert.format import reader

ROOT = Path(__file__).resolve().parents[1]
CDIR = ROOT / "formats" / "c"
VECTORS = ROOT / "formats" / "vectors"
BAD = VECTORS / "bad"
CC = next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1"]
SANITIZE = ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
SAN_ENV = {"ASAN_OPTIONS": "exitcode=86:detect_leaks=1:abort_on_error=0", "LSAN_OPTIONS": "exitcode=87",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
CATEGORIES = ("TruncatedFile", "BadMagic", "UnsupportedVersion", "BadHeader", "BadLayout", "ChecksumMismatch",
              "BadTensorData", "BadFileData")
LINE = re.compile(r"^(ok \d+ \d+ \d+|error (" + "|".join(CATEGORIES) + r"): [^\n]*)\n$")
C_RULE = re.compile(r"\((CLAQ-[A-Z]\d+)\)")  # the rule a C message names, if any
NAMED_RULES = {"CLAQ-T06", "CLAQ-H35"} | {f"CLAQ-T{n}" for n in range(19, 24)}  # those the C reader names
MUTATION_SECONDS = float(os.environ.get("CLAQ_C_MUTATION_SECONDS", "60"))
MUTATION_CASES = int(os.environ.get("CLAQ_C_MUTATION_CASES", "4000"))

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH")


# ----------------------------------------------------------------------------------------- building

def _compile(out: Path, flags: list, libs: list) -> subprocess.CompletedProcess:
    cmd = [CC, *flags, "-I", str(CDIR), str(CDIR / "claq.c"), str(CDIR / "claq_dump.c"), "-o", str(out), *libs]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _links(directory: Path, flags: list, libs: list, source: str) -> bool:
    probe = directory / "probe.c"
    probe.write_text(source)
    done = subprocess.run([CC, *flags, str(probe), "-o", str(directory / "probe"), *libs], capture_output=True,
                          timeout=120)
    return done.returncode == 0


ZLIB_PROBE = "#include <zlib.h>\nint main(void) { return zlibVersion()[0] == 0; }\n"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("claq-c")


@pytest.fixture(scope="module")
def have_zlib(build_dir) -> bool:
    return _links(build_dir, FLAGS, ["-lz"], ZLIB_PROBE)


@pytest.fixture(scope="module")
def claq_dump(build_dir, have_zlib) -> Path:
    """claq_dump with zlib where the system has it (the embedded files of version 2 are zlib streams)."""
    exe = build_dir / "claq_dump"
    done = _compile(exe, FLAGS + (["-DCLAQ_WITH_ZLIB"] if have_zlib else []), ["-lz"] if have_zlib else [])
    assert done.returncode == 0, done.stderr
    return exe


@pytest.fixture(scope="module")
def claq_dump_nozlib(build_dir) -> Path:
    exe = build_dir / "claq_dump_nozlib"
    done = _compile(exe, FLAGS, [])
    assert done.returncode == 0, done.stderr
    return exe


@pytest.fixture(scope="module")
def claq_dump_sanitized(build_dir, have_zlib) -> Path:
    if not _links(build_dir, SANITIZE, [], "int main(void) { return 0; }\n"):
        pytest.skip(f"{CC} cannot link -fsanitize=address,undefined here")
    exe = build_dir / "claq_dump_san"
    done = _compile(exe, FLAGS + SANITIZE + (["-DCLAQ_WITH_ZLIB"] if have_zlib else []), ["-lz"] if have_zlib else [])
    assert done.returncode == 0, done.stderr
    return exe


# ----------------------------------------------------------------------------------------- running

def run(exe: Path, path: Path, quiet: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [str(exe)] + (["-q"] if quiet else []) + [str(path)]
    return subprocess.run(args, capture_output=True, timeout=60, env={**os.environ, **(env or {})})


def verdict(done: subprocess.CompletedProcess) -> str:
    first = done.stdout.split(b"\n", 1)[0].decode("utf-8", "replace")
    return "ok" if first.startswith("ok ") else first[len("error "):].split(":", 1)[0]


def parse_dump(text: str) -> dict:
    lines = text.split("\n")
    assert lines[0].startswith("ok "), lines[0]
    version, ntensors, nfiles = map(int, lines[0].split()[1:])
    tensors, files = {}, {}
    i = 1
    for _ in range(ntensors):
        t, name, kind, ndim, *dims = lines[i].split(" ")
        v = lines[i + 1].split(" ")
        assert t == "T" and v[0] == "V" and int(ndim) == len(dims)
        bits = np.array([int(x, 16) for x in v[2:]], np.uint32)
        assert bits.size == int(v[1])
        tensors[bytes.fromhex(name[1:]).decode()] = (kind, [int(d) for d in dims], bits)
        i += 2
    for _ in range(nfiles):
        f, name, encoding, size, content = lines[i].split(" ")
        assert f == "F"
        stored = None if content == "-" else bytes.fromhex(content)
        files[bytes.fromhex(name[1:]).decode()] = (encoding, int(size), stored)
        i += 1
    assert lines[i:] == [""]
    return {"version": version, "tensors": tensors, "files": files}


def dump(exe: Path, path: Path) -> dict:
    done = run(exe, path)
    assert done.returncode == 0 and done.stderr == b"", (done.stdout[:300], done.stderr[:300])
    return parse_dump(done.stdout.decode())


def f32_bits(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, np.float32)).view(np.uint32).ravel()


def python_verdict(path: Path) -> tuple[str, str]:
    """The Python reader's verdict: "ok" after validate(), or the ClaqFormatError subclass's name."""
    try:
        with reader.ClaqFile(path) as cf:
            cf.validate()
        return "ok", ""
    except reader.ClaqFormatError as e:
        return type(e).__name__, str(e)[:200]
    except Exception as e:  # not a format error: a bug of the Python reader
        return f"PythonCrash:{type(e).__name__}", str(e)[:200]


def compare_with_python(exe: Path, path: Path) -> dict:
    c = dump(exe, path)
    with reader.ClaqFile(path) as cf:
        assert list(c["tensors"]) == list(cf.tensors)
        for name, (kind, shape, bits) in c["tensors"].items():
            assert kind == cf.tensors[name]["kind"] and shape == cf.tensors[name]["shape"]
            expected = np.asarray(cf.decode(name))
            assert list(expected.shape) == shape
            assert np.array_equal(bits, f32_bits(expected)), name
        assert list(c["files"]) == list(cf.files)
        for name, (encoding, size, content) in c["files"].items():
            assert encoding == cf.files[name].get("encoding", "none") and size == len(cf.file(name))
            assert content is None or content == cf.file(name)
    return c


# ----------------------------------------------------------------------------------------- vectors

GOOD = sorted(VECTORS.glob("*.claq"))
EXPECTED = json.loads((BAD / "expected.json").read_text())  # file -> category, rule (claq-v2.md section 7), note
EXPECTED_BAD = {name: e["category"] for name, e in EXPECTED.items() if not e.get("large")}
LARGE_BAD = {name: e["category"] for name, e in EXPECTED.items() if e.get("large")}
NEEDS_ZLIB = {name for name, category in EXPECTED_BAD.items() if category == "BadFileData"}  # the stream is inflated


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good_vectors_decode_bit_for_bit(claq_dump, path):
    expected = json.loads(path.with_suffix(".json").read_text())
    got = dump(claq_dump, path)
    assert set(got["tensors"]) == set(expected["tensors"])
    for name, values in expected["tensors"].items():
        kind, shape, bits = got["tensors"][name]
        assert list(np.asarray(values, np.float32).shape) == shape
        assert np.array_equal(bits, f32_bits(values)), name
    assert {k: v[2].decode() for k, v in got["files"].items()} == expected["files"]


@pytest.mark.parametrize("name", sorted(EXPECTED_BAD))
def test_bad_vectors_give_the_expected_category(claq_dump, have_zlib, name):
    if not have_zlib and name in NEEDS_ZLIB:
        pytest.skip("no zlib to build claq_dump with: this vector needs inflation")
    done = run(claq_dump, BAD / name)
    assert done.returncode == 1 and done.stderr == b""
    assert LINE.match(done.stdout.decode()), done.stdout
    assert verdict(done) == EXPECTED_BAD[name], (EXPECTED[name]["rule"], done.stdout)
    named = C_RULE.search(done.stdout.decode())
    if EXPECTED[name]["rule"] in NAMED_RULES or named:  # the rules the C reader names (coded streams, T06, H35)
        assert named and named.group(1) in [EXPECTED[name]["rule"], *EXPECTED[name].get("also", [])], done.stdout


def test_size_cap_vectors_give_the_expected_category(claq_dump, tmp_path):
    """The vectors of the size caps (not committed; make_vectors.write_large writes them)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    paths = generator.write_large(tmp_path)
    assert LARGE_BAD and set(LARGE_BAD) <= set(paths)
    for name, category in LARGE_BAD.items():
        done = run(claq_dump, paths[name], quiet=True)
        assert done.returncode == 1 and verdict(done) == category, (name, done.stdout)


def test_without_zlib_everything_but_inflation_works(claq_dump_nozlib):
    for path in GOOD:
        got = dump(claq_dump_nozlib, path)
        for name, (encoding, size, content) in got["files"].items():
            assert (content is None) == (encoding == "zlib")
    for name, category in EXPECTED_BAD.items():
        done = run(claq_dump_nozlib, BAD / name)
        if name in NEEDS_ZLIB:  # CRC fine; the stream is not inflated
            assert done.returncode == 0 and done.stdout.startswith(b"ok ")
        else:
            assert verdict(done) == category


# ----------------------------------------------------------------------------------- converted model

@pytest.fixture(scope="module")
def tiny_claq(tiny_model_dir, text_file, tmp_path_factory) -> Path:
    from claq_convert.quantize.convert import ConvertOptions, run_conversion
    from claq_convert.quantize.pipeline import QuantConfig

    path = tmp_path_factory.mktemp("claq-c-model") / "tiny.claq"
    run_conversion(ConvertOptions(model_dir=tiny_model_dir, out=path, quant=QuantConfig(bits=3.1, outlier_bits=0.5),
                                  calib=(text_file,), nsamples=4, seqlen=32))
    return path


def test_converted_model_bit_for_bit_with_the_python_reader(claq_dump, have_zlib, tiny_claq):
    if not have_zlib:
        pytest.skip("no zlib to build claq_dump with: the model's tokenizer files are zlib streams")
    got = compare_with_python(claq_dump, tiny_claq)
    with reader.ClaqFile(tiny_claq) as cf:
        sections = [t["sections"] for t in cf.tensors.values() if t["kind"] == "claq"]
    widths = {k.split("_")[1] for s in sections for k in s if k.startswith(("codes_", "huffman_"))}
    assert len(widths) >= 2 and any("outlier_counts" in s for s in sections)
    assert any(k.startswith("huffman_") for s in sections for k in s)  # the writer codes streams where shorter
    assert any("codebook_grid" in s for s in sections)
    assert any(kind == "raw" for kind, _, _ in got["tensors"].values()) and got["files"]


def _random_claq(rng: np.random.Generator, rows: int, bits: np.ndarray, grid: bool, outliers: int,
                 max_count: int = 0, skew: float = 0.0) -> dict:
    """The sections encode_claq_sections writes for random codes: uniform (stored as codes_<b>), or with skew,
    geometric with that parameter (low codes serve most rows, as K-Means codes do: the writer stores a stream
    as huffman_<b> where that is shorter)."""
    from claq_convert.format.writer import encode_claq_sections

    cols = bits.size
    if skew:
        codes = np.stack([np.minimum(rng.geometric(skew, rows) - 1, (1 << int(b)) - 1) for b in bits], axis=1)
    else:
        codes = np.stack([rng.integers(0, 1 << int(b), rows) for b in bits], axis=1)
    codes = codes.astype(np.uint8)
    counts = np.zeros(cols, np.int64)
    counts[rng.integers(0, cols, outliers)] += 1
    if max_count:
        counts[0] = max_count
    counts = np.minimum(counts, rows)
    out_rows = np.concatenate([np.sort(rng.choice(rows, c, replace=False)) for c in counts]) if counts.sum() else []
    values = rng.standard_normal(int(counts.sum())).astype(np.float16)
    if grid:
        offsets = rng.choice([-65504.0, -1024.0, -2.0, -0.5, 0.0, 1.0, 1024.0, 2048.0], cols)
        steps = rng.choice([0.0, 2.0 ** -24, 2.0 ** -14, 2.0 ** -10, 0.001, 0.25, 1.0, 3.0], cols)
        books = rng.integers(0, 256, (cols, 256)).astype(np.uint8)
        return encode_claq_sections(rows, bits, codes, books, counts, out_rows, values,
                                    codebook_grid=np.stack([offsets, steps], axis=1))
    books = rng.standard_normal((cols, 256)).astype(np.float16)
    books[0, :4] = [2.0 ** -24, -65504.0, 65504.0, -0.0]  # a subnormal, the extremes, a negative zero
    return encode_claq_sections(rows, bits, codes, books, counts, out_rows, values)


@pytest.fixture(scope="module")
def every_width_claq(tmp_path_factory) -> Path:
    """Every width 1..8 (fp16 and grid codebooks, odd row counts so codes straddle words), coded streams of
    widths 2..8 over several chunks (skewed codes, 4099 rows), u16 outlier counts, u32 outlier rows (65537
    rows), every raw dtype, a zlib and a stored embedded file."""
    from claq_convert.format.writer import ClaqWriter

    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("claq-c-widths") / "widths.claq"
    with ClaqWriter(path) as w:
        w.metadata = {"config": {"model_type": "example"}, "generation_config": None, "conversion": {"tool": "test"}}
        for grid in (False, True):
            for rows in (1, 7, 33):
                bits = np.array(list(range(1, 9)) * 2 + list(rng.integers(1, 9, 5)), np.uint8)
                w.add_quantized(f"w{rows}{'g' if grid else 'f'}", rows, _random_claq(rng, rows, bits, grid, 9))
        w.add_quantized("many_outliers", 300, _random_claq(rng, 300, np.array([7, 8, 5]), True, 3, max_count=290))
        w.add_quantized("tall", 65537, _random_claq(rng, 65537, np.array([1, 8]), False, 4))
        for grid in (False, True):
            bits = np.array([2, 3, 4, 5, 6, 7, 8, 5, 1], np.uint8)
            w.add_quantized(f"coded{'g' if grid else 'f'}", 4099, _random_claq(rng, 4099, bits, grid, 7, skew=0.5))
        for dtype in ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32"):
            info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
            values = (rng.integers(info.min, info.max, (3, 5), dtype=dtype, endpoint=True) if info else
                      (rng.standard_normal((3, 5)) * 1e3).astype(dtype))
            w.add_raw(f"raw_{dtype}", values)
        w.add_raw("raw_bf16", rng.integers(0, 1 << 16, (2, 2, 2)).astype(np.uint16) & 0x7f7f, dtype="BF16")
        w.add_file("compressible.txt", b"claq " * 100)
        w.add_file("random.bin", rng.integers(0, 256, 50, dtype=np.uint8).tobytes())
    return path


def test_every_width_and_dtype_bit_for_bit_with_the_python_reader(claq_dump, have_zlib, every_width_claq):
    if not have_zlib:
        pytest.skip("no zlib to build claq_dump with")
    got = compare_with_python(claq_dump, every_width_claq)
    with reader.ClaqFile(every_width_claq) as cf:
        sections = {name: t["sections"] for name, t in cf.tensors.items()}
    assert {f"codes_{b}" for b in range(1, 9)} <= {k for s in sections.values() for k in s}
    assert {f"huffman_{b}" for b in range(2, 9)} <= {k for s in sections.values() for k in s}
    assert sections["many_outliers"]["outlier_counts"]["dtype"] == "U16"
    assert sections["tall"]["outlier_rows"]["dtype"] == "U32"
    assert {e for e, _, _ in got["files"].values()} == {"zlib", "none"}


# --------------------------------------------------------------------------------- header edge cases

def split_file(blob: bytes):
    """(version, header dict, data) of a file whose preamble and header parse, else None."""
    if len(blob) < 16 or blob[:4] != b"CLAQ":
        return None
    version, n = struct.unpack_from("<IQ", blob, 4)
    if n > len(blob) - 16:
        return None
    try:
        header = json.loads(blob[16:16 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return (version, header, blob[16 + n:]) if isinstance(header, dict) else None


def assemble(version: int, text: bytes, data: bytes, pad: bytes = b" ") -> bytes:
    fill = (-(16 + len(text))) % 64
    return struct.pack("<4sIQ", b"CLAQ", version, len(text) + fill) + text + pad * fill + data


def dumps(header) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _edge_cases() -> dict:
    """name -> (bytes, the C reader's verdict by the reading in formats/c/README.md)."""
    blob = (VECTORS / "v2_grid_codebooks.claq").read_bytes()
    v, base, data = split_file(blob)
    v1, base1, data1 = split_file((VECTORS / "worked_example.claq").read_bytes())
    cases = {}

    def conv(raw: str, expected: str, name: str) -> None:  # raw JSON text as metadata.conversion["x"]
        h = copy.deepcopy(base)
        h["metadata"]["conversion"]["x"] = "@@X@@"
        cases[name] = (assemble(v, dumps(h).replace(b'"@@X@@"', raw.encode()), data), expected)

    def edit(fn, expected: str, name: str, version1: bool = False) -> None:
        h = copy.deepcopy(base1 if version1 else base)
        d = fn(h)  # new data bytes, or anything else to keep the file's
        if not isinstance(d, bytes):
            d = data1 if version1 else data
        cases[name] = (assemble(v1 if version1 else v, dumps(h), d), expected)

    # section 1, rule 3: the root object is depth 1, so 64 levels are allowed in all (metadata 2, conversion 3)
    conv(_nested(61), "ok", "depth_64")
    conv(_nested(62), "BadHeader", "depth_65")
    conv(_nested(100000), "BadHeader", "depth_100000")
    conv(str(2 ** 64 - 1), "ok", "int_2^64-1")
    conv(str(2 ** 64), "BadHeader", "int_2^64")
    conv(str(-2 ** 63), "ok", "int_-2^63")
    conv(str(-2 ** 63 - 1), "BadHeader", "int_-2^63-1")
    conv("-0", "ok", "int_minus_zero")
    conv("1" * 21, "BadHeader", "int_21_digits")
    conv("1" + "0" * 400 + ".5", "BadHeader", "float_long_overflow")
    conv("1e308", "ok", "float_1e308")
    conv("1e309", "BadHeader", "float_1e309")
    conv("-1e309", "BadHeader", "float_-1e309")
    conv("1.7976931348623158e308", "ok", "float_rounds_to_max")
    conv("1.7976931348623159e308", "BadHeader", "float_rounds_to_inf")
    conv("1e-400", "ok", "float_underflow_to_zero")
    conv("0." + "0" * 30 + "1" * 40, "ok", "float_40_digits")
    conv("NaN", "BadHeader", "nan")
    conv("Infinity", "BadHeader", "infinity")
    conv("-Infinity", "BadHeader", "minus_infinity")
    conv('"\\ud800"', "BadHeader", "lone_high_surrogate")
    conv('"\\udc00"', "BadHeader", "lone_low_surrogate")
    conv('"\\ud800\\u0041"', "BadHeader", "high_surrogate_then_letter")
    conv('"\\ud83d\\ude00"', "ok", "surrogate_pair")
    conv('{"a":1,"a":2}', "BadHeader", "duplicate_key")
    conv('{"a":1,"\\u0061":2}', "BadHeader", "duplicate_key_escaped")
    conv('"tab\there"', "BadHeader", "raw_control_character")
    conv('"del\x7f"', "ok", "raw_del")
    conv("[1,]", "BadHeader", "trailing_comma")
    conv("01", "BadHeader", "leading_zero")
    conv("1.", "BadHeader", "bare_decimal_point")
    conv("'x'", "BadHeader", "single_quotes")
    text = dumps(base)
    cases["trailing_newline_then_spaces"] = (assemble(v, text + b"\n", data), "ok")
    cases["padding_nul"] = (assemble(v, text, data, pad=b"\0"), "BadHeader")
    cases["padding_invalid_utf8"] = (assemble(v, text + b"\xff", data), "BadHeader")
    cases["leading_space"] = (assemble(v, b" " + text, data), "BadHeader")
    cases["bom"] = (assemble(v, b"\xef\xbb\xbf" + text, data), "BadHeader")
    cases["two_objects"] = (assemble(v, text + b"{}", data), "BadHeader")
    cases["overlong_utf8"] = (assemble(v, text.replace(b'"tool"', b'"\xc0\xaf"'), data), "BadHeader")
    cases["encoded_surrogate"] = (assemble(v, text.replace(b'"tool"', b'"\xed\xa0\x80"'), data), "BadHeader")

    w = lambda h: h["tensors"]["w"]  # noqa: E731
    sec = lambda h, s: h["tensors"]["w"]["sections"][s]  # noqa: E731
    # section 2: metadata
    edit(lambda h: h["metadata"].pop("config"), "ok", "metadata_without_config")
    edit(lambda h: h["metadata"].update(extra=1), "ok", "metadata_extra_key")
    edit(lambda h: h["metadata"].update(config=[]), "BadHeader", "metadata_config_list")
    edit(lambda h: h["metadata"].update(generation_config=[]), "BadHeader", "metadata_generation_config_list")
    edit(lambda h: h.update(metadata=[]), "BadHeader", "metadata_list")
    edit(lambda h: h.update(extra=1), "BadHeader", "top_level_extra_key")
    edit(lambda h: h.update(version=2.0), "BadHeader", "version_float")
    edit(lambda h: h.update(format="CLAQ"), "BadHeader", "format_upper_case")
    # tensors
    edit(lambda h: w(h).update(extra=1), "BadHeader", "tensor_extra_key")
    edit(lambda h: w(h).update(kind="gguf"), "BadHeader", "tensor_kind_unknown")
    edit(lambda h: w(h).update(shape=[4, 4, 1]), "BadHeader", "claq_shape_3d")
    edit(lambda h: w(h).update(shape=[True, 4]), "BadHeader", "shape_true")
    edit(lambda h: w(h).update(shape=[4.0, 4]), "BadHeader", "shape_float")
    edit(lambda h: sec(h, "bit_widths").update(shape=[1, 4]), "BadHeader", "section_shape_2d")
    edit(lambda h: sec(h, "bit_widths").update(crc32=2 ** 32), "BadHeader", "crc_2^32")
    edit(lambda h: sec(h, "bit_widths").update(offset=-64), "BadHeader", "offset_negative")
    edit(lambda h: sec(h, "bit_widths").update(offset=1), "BadLayout", "offset_misaligned")
    edit(lambda h: sec(h, "bit_widths").update(dtype="I8"), "BadHeader", "bit_widths_i8")
    edit(lambda h: sec(h, "codes_1").update(dtype="I32"), "BadHeader", "codes_i32")
    edit(lambda h: w(h)["sections"].update(codes_9=w(h)["sections"].pop("codes_5")), "BadHeader", "codes_9")
    edit(lambda h: h["tensors"].update({"": h["tensors"].pop("w")}), "ok", "empty_tensor_name")
    edit(lambda h: h["tensors"].update({"a\nb\u0000": h["tensors"].pop("w")}), "ok", "control_tensor_name")
    edit(lambda h: h.update(tensors={}, files={}), "BadLayout", "no_sections_but_data")
    cases["no_sections_no_data"] = (assemble(v, dumps({**base, "tensors": {}, "files": {}}), b""), "ok")
    edit(lambda h: sec(h, "codes_5").update(offset=sec(h, "codes_5")["offset"] + 1)
         or h["files"]["note.txt"].update(encoding="gzip"), "BadLayout", "misaligned_offset_then_bad_file_later")
    # sizes near 2^64: every product and sum is checked for overflow
    edit(lambda h: w(h).update(shape=[2 ** 64 - 1, 4]), "BadTensorData", "claq_out_2^64-1")
    edit(lambda h: w(h).update(shape=[2 ** 62, 4]), "BadTensorData", "claq_code_bits_overflow")
    edit(lambda h: w(h).update(shape=[2 ** 64 - 1, 3]), "BadHeader", "u16_outlier_rows_out_2^64-1", version1=True)
    edit(lambda h: h["tensors"]["norm"].update(shape=[2 ** 32, 2 ** 32]) or
         h["tensors"]["norm"]["sections"]["data"].update(shape=[2 ** 32, 2 ** 32]), "BadHeader", "raw_product_overflow",
         version1=True)
    edit(lambda h: sec(h, "codes_5").update(offset=2 ** 64 - 64), "BadLayout", "offset_2^64-64")
    edit(lambda h: sec(h, "bit_widths").update(shape=[2 ** 64 - 1], length=2 ** 64 - 1), "BadHeader",
         "length_2^64-1_but_in_4")
    edit(lambda h: h["files"]["note.txt"].update(shape=[2 ** 64 - 1], length=2 ** 64 - 1), "BadLayout",
         "file_length_2^64-1")
    # version 1
    edit(lambda h: w(h)["sections"].update(codes_5=w(h)["sections"].pop("codes_3")), "BadHeader", "v1_codes_5",
         version1=True)
    edit(lambda h: h["files"]["note.txt"].update(encoding="none", size=19), "BadHeader", "v1_file_with_encoding",
         version1=True)

    # outlier_rows and outlier_values of different sizes: both "Σ counts" (section 5), decidable from the header
    def values_two(h):
        s = h["tensors"]["w"]["sections"]["outlier_values"]
        start = s["offset"]
        s.update(shape=[2], length=4, crc32=zlib.crc32(data1[start:start + 4]))
    edit(values_two, "BadTensorData", "outlier_rows_values_differ", version1=True)

    # embedded files (version 2): names and the encoding
    def file_named(name):
        return lambda h: h["files"].update({name: h["files"].pop("note.txt")})
    for name, expected in [("a/b", "BadHeader"), ("a\\b", "BadHeader"), (".", "BadHeader"), ("..", "BadHeader"),
                           ("", "BadHeader"), ("x" * 255, "ok"), ("x" * 256, "BadHeader"), ("é" * 127, "ok"),
                           ("é" * 128, "BadHeader"), ("x\u0001", "BadHeader"), ("x\u007f", "BadHeader"),
                           ("x\u0085", "BadHeader"), ("x\u00a0", "BadHeader"), ("x\u00ad", "BadHeader"),
                           ("x\u2028", "BadHeader"), ("x\ue000", "BadHeader"), ("x\u0378", "ok"), ("x\u4e00", "ok"),
                           ("x\U0001f600", "ok"), ("...", "ok"), (" ", "ok")]:
        edit(file_named(name), expected, f"file_name_{name.encode('unicode_escape').decode()[:12]}_{len(name)}")
    edit(lambda h: h["files"]["note.txt"].update(encoding="gzip"), "BadHeader", "file_encoding_gzip")
    edit(lambda h: h["files"]["note.txt"].update(size=0), "BadHeader", "file_size_0")
    edit(lambda h: h["files"]["note.txt"].update(size=2 ** 28 + 1), "BadHeader", "file_size_too_big")
    edit(lambda h: h["files"]["note.txt"].update(encoding="none"), "BadHeader", "file_none_size_mismatch")

    # where the Python reader is more lenient than the spec (KNOWN_EDGE_DISAGREEMENTS)
    one_bit = [("bit_widths", "U8", [1], b"\1"), ("codebooks", "F16", [2], struct.pack("<2e", -1.0, 1.0))]
    outliers = [("outlier_counts", "U8", [1], b"\1"), ("outlier_rows", "U16", [1], struct.pack("<H", 5)),
                ("outlier_values", "F16", [1], struct.pack("<e", 0.5))]
    cases["u16_outlier_rows_out_65537"] = (build_file({"w": ("claq", [65537, 1], one_bit + [
        ("codes_1", "U32", [2049], bytes(4 * 2049))] + outliers)}), "BadHeader")
    cases["u16_outlier_rows_out_65536"] = (build_file({"w": ("claq", [65536, 1], one_bit + [
        ("codes_1", "U32", [2048], bytes(4 * 2048))] + outliers)}), "ok")
    cases["claq_section_shape_4x1"] = (build_file({"w": ("claq", [4, 1], one_bit + [
        ("codes_1", "U32", [1, 1], bytes(4))])}), "BadHeader")
    cases["file_shape_3x1"] = (build_file({"w": ("claq", [4, 1], one_bit + [("codes_1", "U32", [1], bytes(4))])},
                                          {"a.txt": ([3, 1], b"abc")}), "BadHeader")
    return cases


def build_file(tensors: dict, files: dict | None = None, version: int = 2) -> bytes:
    """tensors: name -> (kind, shape, [(section, dtype, shape, payload)]); files: name -> (shape, bytes), stored."""
    data, header_tensors, header_files = b"", {}, {}

    def place(dtype, shape, payload):
        nonlocal data
        entry = {"dtype": dtype, "shape": shape, "offset": len(data), "length": len(payload),
                 "crc32": zlib.crc32(payload)}
        data += payload + bytes(-len(payload) % 64)
        return entry
    for name, (kind, shape, sections) in tensors.items():
        header_tensors[name] = {"kind": kind, "shape": shape, "sections": {s: place(*rest) for s, *rest in sections}}
    for name, (shape, payload) in (files or {}).items():
        header_files[name] = {**place("U8", shape, payload), "encoding": "none", "size": len(payload)}
    header = {"format": "claq", "version": version, "metadata": {}, "tensors": header_tensors, "files": header_files}
    return assemble(version, dumps(header), data)


EDGE_CASES = _edge_cases()
# Where the Python reader's verdict differs from the C reader's on an edge case, and why (see README.md).
KNOWN_EDGE_DISAGREEMENTS: dict[str, str] = {}  # none left: section 2 now defines "printable text"


def test_header_edge_cases(claq_dump, tmp_path):
    disagreements = []
    for i, (name, (blob, expected)) in enumerate(EDGE_CASES.items()):
        path = tmp_path / f"case{i}.claq"
        path.write_bytes(blob)
        done = run(claq_dump, path, quiet=True)
        assert LINE.match(done.stdout.decode("utf-8", "replace")) and done.stderr == b"", (name, done.stdout)
        assert verdict(done) == expected, (name, done.stdout)
        py, message = python_verdict(path)
        if py != expected:
            disagreements.append((name, expected, py, message))
    print("\nedge cases where the Python reader differs (name, C, Python, Python's message):")
    for d in disagreements:
        print("  ", d)
    unexplained = [d for d in disagreements if KNOWN_EDGE_DISAGREEMENTS.get(d[0]) != d[2]]
    assert not unexplained, unexplained


# --------------------------------------------------------------------------- coded code streams (version 4)

def _hand_coded(rng: np.random.Generator, rows: int, bits: list, codes: np.ndarray, lengths: dict) -> dict:
    """A weight (fp16 codebooks) whose stream of each width b in `lengths` is huffman_<b> under those codeword
    lengths, a code the writer would not choose (1-bit codes, an incomplete code, 12-bit codewords)."""
    from claq_convert.format import huffman, spec
    from claq_convert.format.writer import encode_claq_sections

    bits = np.asarray(bits, np.uint8)
    sections = encode_claq_sections(rows, bits, codes.astype(np.uint8),
                                    rng.standard_normal((bits.size, 256)).astype(np.float16),
                                    np.zeros(bits.size, np.int64), [], np.zeros(0, np.float16))
    out = {}
    for name, array in sections.items():
        b = int(name.split("_")[1]) if name.startswith(("codes_", "huffman_")) else 0
        if b in lengths:
            stream = codes[:, spec.columns_of_width(bits, b)].T.ravel().astype(np.uint8)
            out[spec.huffman_section(b)] = huffman.coded_section(stream, np.asarray(lengths[b]))
        else:
            out[name] = array
    return out


@pytest.fixture(scope="module")
def coded_claq_pair(tmp_path_factory) -> tuple[Path, Path]:
    """The same weights twice: with coded streams (huffman_1 .. huffman_8: chunk boundaries on and off a
    column's end, streams of one chunk and of one code, 12-bit codewords, an incomplete code, 1-bit codes),
    and with every stream as its fixed-width words (codes_<b>)."""
    from claq_convert.format import huffman
    from claq_convert.format.writer import ClaqWriter

    rng = np.random.default_rng(11)
    weights = {}
    for grid in (False, True):
        for rows, skew in ((4096, 0.5), (4099, 0.4), (9001, 0.7), (3, 0.9), (1, 0.9)):
            bits = np.array([2, 3, 4, 5, 6, 7, 8, 1, 8, 3], np.uint8)
            weights[f"w{rows}{'g' if grid else 'f'}"] = (rows, _random_claq(rng, rows, bits, grid, 5, skew=skew))
    rows = 6000
    codes = np.stack([rng.integers(0, 2, rows), rng.integers(0, 2, rows), np.full(rows, 5),
                      np.minimum(rng.geometric(0.5, rows) - 1, 12), rng.integers(0, 13, rows),
                      rng.integers(0, 4, rows)], axis=1)
    weights["hand"] = (rows, _hand_coded(rng, rows, [1, 1, 3, 4, 4, 2], codes, {
        1: [1, 1],                                  # 1-bit codes, coded
        3: [0, 0, 0, 0, 0, 1, 0, 0],                # one value used: the codeword 0 (an incomplete code)
        4: list(range(1, 13)) + [12, 0, 0, 0]}))    # a complete code with codewords of 1 to 12 bits
    paths = []
    for which in ("coded", "fixed"):
        path = tmp_path_factory.mktemp("claq-c-coded") / f"{which}.claq"
        with ClaqWriter(path) as w:
            for name, (rows, sections) in weights.items():
                w.add_quantized(name, rows, sections if which == "coded" else huffman.with_fixed_codes(sections, rows))
        paths.append(path)
    return paths[0], paths[1]


def test_coded_streams_decode_as_their_fixed_width_words(claq_dump, coded_claq_pair):
    from claq_convert.format import spec

    coded, fixed = coded_claq_pair
    with reader.ClaqFile(coded) as cf:
        names = {k for t in cf.tensors.values() for k in t["sections"]}
        assert {f"huffman_{b}" for b in range(1, 9)} <= names
        chunks = spec.chunk_count(2 * 6000)  # hand's huffman_4: two columns of 6000 rows
        assert cf.sections("hand")["huffman_4"][4 * chunks:4 * chunks + 16].max() == 12  # 12-bit codewords
    with reader.ClaqFile(fixed) as cf:
        assert not any(k.startswith("huffman_") for t in cf.tensors.values() for k in t["sections"])
    got, expected = compare_with_python(claq_dump, coded), dump(claq_dump, fixed)
    assert got["version"] == 4 and list(got["tensors"]) == list(expected["tensors"])
    for name, (kind, shape, bits) in got["tensors"].items():
        assert shape == expected["tensors"][name][1] and np.array_equal(bits, expected["tensors"][name][2]), name


def python_rule(path: Path) -> tuple[str, str | None]:
    """The Python reader's category and rule id ("ok", None when valid)."""
    try:
        with reader.ClaqFile(path) as cf:
            cf.validate()
        return "ok", None
    except reader.ClaqFormatError as e:
        return type(e).__name__, getattr(e, "rule", None)


# The worked example of claq-v2.md ("Worked example (coded codes)"): 6 rows at 2 bits, codes 1, 1, 0, 2, 1, 1
# under the lengths [2, 1, 2, 0] (1: "0", 0: "10", 2: "11"): K = 1 offset, 4 lengths, the codewords' byte.
WORKED = bytes.fromhex("00000000" "02010200" "34")
BOOK = (-1.0, -0.25, 0.5, 1.0)  # codebook of the 2-bit column


def _coded_case(sections: list, rows: int = 6, bits: bytes = b"\2", version: int = 4) -> bytes:
    """A one-tensor file "w" [rows, len(bits)] with fp16 codebooks (BOOK for 2-bit columns) and `sections`."""
    books = b"".join(struct.pack(f"<{1 << b}e", *(BOOK if b == 2 else np.linspace(-1, 1, 1 << b))) for b in bits)
    return build_file({"w": ("claq", [rows, len(bits)], [("bit_widths", "U8", [len(bits)], bits),
                                                         ("codebooks", "F16", [len(books) // 2], books)] + sections)},
                      version=version)


def _huffman(payload: bytes, b: int = 2, dtype: str = "U8", name: str = "") -> tuple:
    size = {"U8": 1, "I8": 1, "U16": 2, "U32": 4}[dtype]
    return (name or f"huffman_{b}", dtype, [len(payload) // size], payload)


def _two_chunks(rows: int = 4100, pad: int = 0, second: int | None = None) -> bytes:
    """huffman_2 of `rows` codes 0 under the lengths [1, 0, 2, 0] (0: "0", 2: "10"; "11" starts no codeword): two
    chunks (4096 codes, then rows - 4096), the second at bit `second` (4096 when right); `pad` ORed into the
    last byte (bits rows - rows % 8 onwards: codewords of chunk 1, then padding)."""
    stream = bytearray((rows + 7) // 8)
    stream[-1] |= pad
    return struct.pack("<II", 0, 4096 if second is None else second) + bytes([1, 0, 2, 0]) + bytes(stream)


def _coded_rule_cases() -> dict:
    """name -> (file bytes, expected category, expected rule (None: valid))."""
    T = "BadTensorData"
    codes_2 = ("codes_2", "U32", [1], struct.pack("<I", 0x5a5))  # 6 codes of 2 bits
    cases = {
        "worked_example": (_coded_case([_huffman(WORKED)]), "ok", None),
        "worked_example_v3": (_coded_case([_huffman(WORKED)], version=3), "BadHeader", "CLAQ-H19"),
        "huffman_9": (_coded_case([_huffman(WORKED, name="huffman_9")]), "BadHeader", "CLAQ-H19"),
        "huffman_0": (_coded_case([_huffman(WORKED, name="huffman_0")]), "BadHeader", "CLAQ-H19"),
        "huffman_02": (_coded_case([_huffman(WORKED, name="huffman_02")]), "BadHeader", "CLAQ-H19"),
        "huffman_i8": (_coded_case([_huffman(WORKED, dtype="I8")]), "BadHeader", "CLAQ-H22"),
        "huffman_u32": (_coded_case([_huffman(WORKED + bytes(3), dtype="U32")]), "BadHeader", "CLAQ-H22"),
        "codes_and_huffman": (_coded_case([codes_2, _huffman(WORKED)]), "BadHeader", "CLAQ-H35"),
        "codes_and_huffman_u32": (_coded_case([_huffman(WORKED + bytes(3), dtype="U32"), codes_2]), "BadHeader",
                                  "CLAQ-H35"),  # H35 comes before H22
        "huffman_without_width": (_coded_case([_huffman(WORKED), _huffman(WORKED, b=3)]), T, "CLAQ-T06"),
        "width_without_stream": (_coded_case([_huffman(WORKED)], bits=b"\2\3"), T, "CLAQ-T06"),
        "t19_short": (_coded_case([_huffman(WORKED[:8])]), T, "CLAQ-T19"),
        "t19_longest_then_t23": (_coded_case([_huffman(WORKED + bytes(8))]), T, "CLAQ-T23"),  # 17 bytes: T19 allows
        "t19_long": (_coded_case([_huffman(WORKED + bytes(9))]), T, "CLAQ-T19"),
        "t19_before_t20": (_coded_case([_huffman(bytes(4) + bytes([13, 13, 13, 13]))]), T, "CLAQ-T19"),
        "t19_rows_2^64-1": (_coded_case([_huffman(WORKED)], rows=2 ** 64 - 1), T, "CLAQ-T19"),
        "t19_codes_overflow": (_coded_case([_huffman(WORKED)], rows=2 ** 63, bits=b"\2\2"), T, "CLAQ-T19"),
        "t20_length_13": (_coded_case([_huffman(bytes.fromhex("00000000" "020d0200" "34"))]), T, "CLAQ-T20"),
        "t20_no_length": (_coded_case([_huffman(bytes.fromhex("00000000" "00000000" "34"))]), T, "CLAQ-T20"),
        "t20_kraft": (_coded_case([_huffman(bytes.fromhex("00000000" "01010200" "34"))]), T, "CLAQ-T20"),
        "t20_before_t21": (_coded_case([_huffman(bytes.fromhex("01000000" "01010200" "34"))]), T, "CLAQ-T20"),
        "t21_first_not_0": (_coded_case([_huffman(bytes.fromhex("01000000" "02010200" "34"))]), T, "CLAQ-T21"),
        "t21_past_the_end": (_coded_case([_huffman(_two_chunks(second=4104 + 1))], rows=4100), T, "CLAQ-T21"),
        "t21_at_the_end_then_t23": (_coded_case([_huffman(_two_chunks(second=4104))], rows=4100), T, "CLAQ-T23"),
        "two_chunks": (_coded_case([_huffman(_two_chunks())], rows=4100), "ok", None),
        "two_chunks_exact": (_coded_case([_huffman(_two_chunks(rows=8192))], rows=8192), "ok", None),
        "t22_no_codeword": (_coded_case([_huffman(bytes.fromhex("00000000" "02010000" "34"))]), T, "CLAQ-T22"),
        "t22_past_the_end": (_coded_case([_huffman(bytes.fromhex("00000000" "00000200" "00"))]), T, "CLAQ-T22"),
        "t22_codeword_across_the_end": (_coded_case([_huffman(bytes.fromhex("00000000" "00000300" "0000"))]), T,
                                        "CLAQ-T22"),
        "t23_chunk_ends_early": (_coded_case([_huffman(_two_chunks(second=4097))], rows=4100), T, "CLAQ-T23"),
        "t23_before_next_chunk_t22": (_coded_case([_huffman(_two_chunks(pad=0xf0, second=4100))], rows=4100), T,
                                      "CLAQ-T23"),
        "t22_in_chunk_1": (_coded_case([_huffman(_two_chunks(pad=0x0c))], rows=4100), T, "CLAQ-T22"),  # "11"
        "t23_padding_bits": (_coded_case([_huffman(_two_chunks(pad=0x10))], rows=4100), T, "CLAQ-T23"),
        "t23_padding_bit_7": (_coded_case([_huffman(bytes.fromhex("00000000" "02010200" "b4"))], rows=5), T,
                              "CLAQ-T23"),
        "t23_byte_after": (_coded_case([_huffman(WORKED + b"\0")]), T, "CLAQ-T23"),
    }
    # chunk 1 starts at the end of part 3 (T21 allows it), where chunk 0 ends: it meets no codeword (T22)
    at_end = struct.pack("<II", 0, 8192) + bytes([2, 0, 0, 0]) + bytes(1024)  # 4096 codes 0 of 2 bits ("00")
    cases["t22_chunk_at_the_end"] = (_coded_case([_huffman(at_end)], rows=4100), T, "CLAQ-T22")
    # the least width of both codes_<b> and huffman_<b> is reported (H35); T06 and the stream rules go width by width
    both = [("codes_3", "U32", [1], bytes(4)), ("huffman_3", "U8", [9], WORKED), codes_2, _huffman(WORKED)]
    cases["codes_and_huffman_least_width"] = (_coded_case(both, bits=b"\2\3"), "BadHeader", "CLAQ-H35")
    cases["width_2_t19_before_width_3_t06"] = (_coded_case([_huffman(WORKED[:8])], bits=b"\2\3"), T, "CLAQ-T19")
    return cases


CODED_RULE_CASES = _coded_rule_cases()


@pytest.mark.parametrize("name", sorted(CODED_RULE_CASES))
def test_coded_stream_rules_as_the_python_reader(claq_dump, tmp_path, name):
    blob, category, rule = CODED_RULE_CASES[name]
    path = tmp_path / f"{name}.claq"
    path.write_bytes(blob)
    done = run(claq_dump, path)
    text = done.stdout.decode("utf-8", "replace")
    assert LINE.match(text.split("\n", 1)[0] + "\n") and done.stderr == b"", text[:300]
    assert verdict(done) == category, text[:300]
    named = C_RULE.search(text.split("\n", 1)[0])
    if rule in NAMED_RULES or named:
        assert named and named.group(1) == rule, text[:300]
    assert python_rule(path) == (category, rule)
    if name == "codes_and_huffman_least_width":
        assert "codes_2 and huffman_2" in text, text
    if name == "worked_example":  # codes 1, 1, 0, 2, 1, 1
        assert np.array_equal(parse_dump(text)["tensors"]["w"][2], f32_bits([[BOOK[c]] for c in (1, 1, 0, 2, 1, 1)]))


# ------------------------------------------------------------------------------- mutation (sanitizers)

def _entries(header: dict):
    """Every section entry of a parsed header (tensors' then files'), as dicts that can be edited in place."""
    tensors = header.get("tensors") if isinstance(header.get("tensors"), dict) else {}
    for t in tensors.values():
        if isinstance(t, dict) and isinstance(t.get("sections"), dict):
            yield from (e for e in t["sections"].values() if isinstance(e, dict))
    files = header.get("files") if isinstance(header.get("files"), dict) else {}
    yield from (e for e in files.values() if isinstance(e, dict))


def _places(value, out):
    """(container, key) of every value in a JSON tree."""
    if isinstance(value, dict):
        for k in list(value):
            out.append((value, k))
            _places(value[k], out)
    elif isinstance(value, list):
        for i in range(len(value)):
            out.append((value, i))
            _places(value[i], out)
    return out


SECTION_NAMES = ["bit_widths", "codebooks", "codebook_grid", "codebook_rice", "outlier_counts", "outlier_rows",
                 "outlier_values", "data", "codes_0", "codes_9", "codes_10", "huffman_0", "huffman_9", "huffman_01",
                 "extra"] + [f"codes_{b}" for b in range(1, 9)] + [f"huffman_{b}" for b in range(1, 9)]
STRINGS = ["", "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "raw", "claq", "none",
           "zlib", "x/y", "..", "\ud800", "é", "\u0000"]


def _new_value(rng: random.Random, value):
    if isinstance(value, bool) or value is None:
        return rng.choice([0, 1, "true", None, True, False, []])
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, value + 64, value - 64, value * 2, value // 2, 0, -1, 1, 2 ** 32,
                           2 ** 63, 2 ** 64 - 1, 2 ** 64, -2 ** 63 - 1, 10 ** 25, float(value), value + 0.5, True,
                           None, str(value), [value], rng.randrange(0, 1 << 20), 64 * rng.randrange(0, 64)])
    if isinstance(value, float):
        whole = int(value) if math.isfinite(value) else 0  # an earlier mutation may have made it inf or nan
        return rng.choice([whole, float("inf"), float("nan"), -value, 1e308, "x"])
    if isinstance(value, str):
        return rng.choice(STRINGS + [value + "x", value[:-1], value.upper(), 1, None])
    if isinstance(value, list):
        return rng.choice([value + [1], value[:-1], [], [value], value * 2, value + [0], value + [2.5], {}, 3])
    return rng.choice([{}, [], None, "x", 1])  # dicts


def mutate_header(rng: random.Random, header: dict, data: bytes) -> tuple[dict, bytes]:
    h = copy.deepcopy(header)
    entries = list(_entries(h))
    r = rng.random()
    if r < 0.15 and len(entries) >= 2:  # move one section onto another's place, or swap two
        a, b = rng.sample(entries, 2)
        if rng.random() < 0.5:
            a["offset"], b["offset"] = b.get("offset"), a.get("offset")
        else:
            a["offset"] = b.get("offset")
        return h, data
    if r < 0.30:  # rename, drop or add a key of an object
        objects = [c[k] for c, k in _places(h, []) if isinstance(c[k], dict) and c[k]] + [h]
        obj = rng.choice(objects)
        key = rng.choice(list(obj))
        action = rng.randrange(3)
        if action == 0:
            obj.pop(key)
        elif action == 1:
            obj[rng.choice(SECTION_NAMES + ["kind", "shape", "encoding", "size", "crc32", "config"])] = obj.pop(key)
        else:
            obj[rng.choice(SECTION_NAMES + ["size", "encoding", "extra"])] = copy.deepcopy(obj[key])
        return h, data
    places = _places(h, [])
    container, key = rng.choice(places)
    container[key] = _new_value(rng, container[key])
    return h, data


def mutate_data(rng: random.Random, header: dict, data: bytes) -> tuple[dict, bytes]:
    """Change bytes of one section (or its padding) and fix its CRC-32, so that the contents are checked."""
    h = copy.deepcopy(header)
    entries = [e for e in _entries(h) if isinstance(e.get("offset"), int) and isinstance(e.get("length"), int)
               and 0 <= e["offset"] and 0 < e["length"] and e["offset"] + e["length"] <= len(data)]
    if not entries:
        return h, data
    e = rng.choice(entries)
    start, end = e["offset"], e["offset"] + e["length"]
    blob = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 4])):
        if rng.random() < 0.1:  # a padding byte
            pos = min(len(blob) - 1, end + rng.randrange(64))
        else:
            pos = rng.randrange(start, end)
        blob[pos] = rng.choice([0, 0xff, 0x7c, 0xfc, 0x80, 5, 9, rng.randrange(256),
                                blob[pos] ^ (1 << rng.randrange(8))])
    if rng.random() < 0.9:
        e["crc32"] = zlib.crc32(bytes(blob[start:end]))
    return h, bytes(blob)


def mutate(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    parsed = split_file(blob)
    r = rng.random()
    if r < 0.25 or parsed is None:
        out = bytearray(blob)
        n = 16 + struct.unpack_from("<Q", blob, 8)[0] if len(blob) >= 16 else len(blob)
        for _ in range(rng.choice([1, 1, 2, 3, 8])):
            if not out:
                break
            hi = min(len(out), n) if rng.random() < 0.5 and n > 0 else len(out)
            pos = rng.randrange(hi)
            out[pos] = rng.choice([rng.randrange(256), out[pos] ^ (1 << rng.randrange(8)), 0x20, 0x22, 0x7b])
        return "flip", bytes(out)
    if r < 0.35:
        cut = rng.choice([rng.randrange(len(blob) + 1), len(blob) - rng.randrange(1, 65), rng.randrange(80)])
        return "truncate", blob[:max(cut, 0)]
    version, header, data = parsed
    if r < 0.65:
        kind, (header, data) = "header", mutate_header(rng, header, data)
    elif r < 0.95:
        kind, (header, data) = "data", mutate_data(rng, header, data)
    else:
        kind, (header, data) = "header+data", mutate_data(rng, *mutate_header(rng, header, data))
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=rng.random() < 0.5)
        text = text.encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return kind, blob
    return kind, assemble(version, text, data)


# Disagreements between the C and Python readers the mutation run may meet, by the C reader's message, each with
# the reason (formats/c/README.md). The two the C reader first found (section shapes other than [n], U16 outlier
# rows for more than 65536 rows) were the Python reader's and are fixed there.
KNOWN_MUTATION_DISAGREEMENTS: dict[str, str] = {}


def explained(c: str, message: str) -> bool:
    return c == "BadHeader" and any(re.search(p, message) for p in KNOWN_MUTATION_DISAGREEMENTS)


def test_mutations_under_sanitizers(claq_dump_sanitized, tiny_claq, every_width_claq, coded_claq_pair, tmp_path):
    for i, (name, (blob, expected)) in enumerate(EDGE_CASES.items()):  # the edge cases, sanitized too
        path = tmp_path / f"edge{i}.claq"
        path.write_bytes(blob)
        done = run(claq_dump_sanitized, path, quiet=True, env=SAN_ENV)
        assert done.returncode in (0, 1) and done.stderr == b"" and verdict(done) == expected, (name, done)
    for i, (name, (blob, expected, _)) in enumerate(CODED_RULE_CASES.items()):  # and the coded streams' cases
        path = tmp_path / f"coded{i}.claq"
        path.write_bytes(blob)
        done = run(claq_dump_sanitized, path, quiet=True, env=SAN_ENV)
        assert done.returncode in (0, 1) and done.stderr == b"" and verdict(done) == expected, (name, done)
    bases = [p.read_bytes() for p in GOOD + sorted(BAD.glob("*.claq"))]
    bases += [tiny_claq.read_bytes(), every_width_claq.read_bytes(), coded_claq_pair[0].read_bytes()]
    bases += [blob for blob, _, _ in CODED_RULE_CASES.values()]  # small coded streams, valid and not
    rng = random.Random(20240611)
    path = tmp_path / "mutant.claq"
    keep = Path(os.environ["CLAQ_C_DISAGREEMENTS_DIR"]) if os.environ.get("CLAQ_C_DISAGREEMENTS_DIR") else None
    start, cases, verdicts, disagreements, rules = time.monotonic(), 0, {}, {}, {}
    while cases < MUTATION_CASES and time.monotonic() - start < MUTATION_SECONDS:
        kind, blob = mutate(rng, rng.choice(bases))
        path.write_bytes(blob)
        done = run(claq_dump_sanitized, path, quiet=True, env=SAN_ENV)
        text = done.stdout.decode("utf-8", "replace")
        assert done.returncode in (0, 1) and done.stderr == b"" and LINE.match(text), \
            (cases, kind, done.returncode, text[:300], done.stderr.decode("utf-8", "replace")[:2000])
        c = verdict(done)
        py, message = python_verdict(path)
        verdicts[c] = verdicts.get(c, 0) + 1
        named = C_RULE.search(text)
        if named:  # a rule the C reader names (T06, T19-T23, H35): the Python reader's must be the same
            rules[named.group(1)] = rules.get(named.group(1), 0) + 1
            py_rule = python_rule(path)[1] if py == c else None
            if py == c and py_rule != named.group(1):
                c, py = f"{c} {named.group(1)}", f"{py} {py_rule}"
        cases += 1
        if c != py:
            key = (kind, c, py)
            disagreements.setdefault(key, []).append((text.strip()[:200], message))
            if keep:
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"{cases:05d}-{kind}-{c}-{py}.claq").write_bytes(blob)
    elapsed = time.monotonic() - start
    print(f"\nmutation run: {cases} cases in {elapsed:.1f} s; C verdicts {dict(sorted(verdicts.items()))}; "
          f"rules named {dict(sorted(rules.items()))}")
    for (kind, c, py), examples in sorted(disagreements.items()):
        print(f"  disagreement ({kind}) C {c} vs Python {py}: {len(examples)} cases, e.g. {examples[0]}")
    assert cases >= min(MUTATION_CASES, 200)
    unexplained = {k: v for k, v in disagreements.items() if not all(explained(k[1], m) for m, _ in v)}
    assert not unexplained, {k: v[:2] for k, v in unexplained.items()}
