"""The .claq writer and reference reader: round trips, atomic writes, and hostile headers via claq-inspect."""
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from claq_convert.format import reader, spec
from claq_convert.cli import inspect_cmd
from claq_convert.quantize.convert import ConvertOptions, encode_result, measure_fisher, run_conversion
from claq_convert.quantize.calibration import calibration_set
from claq_convert.quantize.gptq import GPTQ
from claq_convert.quantize.pipeline import QuantConfig, quantize_model
from claq_convert.quantize.sensitivity import weights_by_name
from claq_convert.models.source import ModelSource
from claq_convert.format.writer import ClaqWriter, encode_claq_sections


def random_result(rows=37, cols=23, seed=0, grid=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    bits = np.random.default_rng(seed).choice([1, 2, 3, 4], cols)
    reserve = np.random.default_rng(seed + 1).integers(0, 3, cols)
    return GPTQ(W, None).quantize(bits, reserve, grid=grid)


def sections_of(r):
    return encode_result(r)


def test_roundtrip_is_bit_exact_for_every_width_and_raw_dtype(tmp_path):
    results = [random_result(seed=s, grid=s == 1) for s in range(3)]  # fp16 and grid codebooks
    raw = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "f16": np.array([1.5, -2], np.float16),
           "i64": np.array([7, -1], np.int64)}
    bf16 = torch.tensor([1.0, -3.5, 0.15625], dtype=torch.bfloat16)
    path = tmp_path / "x.claq"
    with ClaqWriter(path) as w:
        for i, r in enumerate(results):
            sections = sections_of(r)
            coded = sections[spec.RICE_SECTION].size if i == 1 else None   # the grid weight's levels are coded
            stored = w.add_quantized(f"q{i}", r.shape[0], sections)
            args = (r.shape[0], r.bits, int(r.outlier_counts.sum()), int(r.outlier_counts.max()))
            assert stored == spec.claq_stored_bytes(*args, grid=i == 1, coded_levels=coded)
            assert stored <= spec.claq_stored_bytes(*args, grid=i == 1)
        for name, array in raw.items():
            w.add_raw(name, array)
        w.add_raw("bf16", bf16.view(torch.int16).numpy().view(np.uint16), dtype="BF16")
        w.add_file("tokenizer.json", b'{"x": 1}')
        w.metadata["config"] = {"model_type": "test"}
    assert path.stat().st_size % spec.ALIGNMENT == 0
    with reader.ClaqFile(path) as cf:
        cf.validate()
        for i, r in enumerate(results):
            assert np.array_equal(cf.decode(f"q{i}"), r.dequantize())
            assert set(np.unique(cf.sections(f"q{i}")["bit_widths"])) == set(np.unique(r.bits))
        for name, array in raw.items():
            assert np.array_equal(cf.decode(name), array.astype(np.float32))
        assert np.array_equal(cf.decode("bf16"), bf16.float().numpy())
        assert cf.file("tokenizer.json") == b'{"x": 1}'
        assert cf.metadata["config"] == {"model_type": "test"}


def test_encoding_and_the_reference_decode_need_no_int64_array_per_code(monkeypatch):
    # a whole weight is encoded (Huffman counts) and decoded (codebook indices) a block at a time: np.bincount
    # and the index arrays took 8 bytes a code each (17.6 bytes a code for the write's decode check).
    # Measured as the growth of the peak from one weight to one 4 times larger, with blocks small enough
    # that their own arrays are a constant far below what a whole weight's would take
    import tracemalloc

    from claq_convert.format import huffman

    monkeypatch.setattr(huffman, "ENCODE_BLOCK", 1 << 16)
    monkeypatch.setattr(reader, "DECODE_BLOCK", 1 << 16)

    def peaks(rows: int, cols: int = 192) -> tuple[int, int]:
        rng = np.random.default_rng(3)
        bits = np.where(np.arange(cols) % 3 == 0, 3, 5).astype(np.uint8)
        codes = np.minimum(rng.geometric(0.3, (rows, cols)) - 1, (1 << bits.astype(int)) - 1).astype(np.uint8)
        codebooks = np.sort(rng.standard_normal((cols, 32)), axis=1).astype(np.float32)
        no_outliers = (np.zeros(cols, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float16))
        tracemalloc.start()
        try:
            sections = encode_claq_sections(rows, bits, codes, codebooks, *no_outliers)
            _, encoding = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            W = reader.decode_claq(rows, sections)
            _, decoding = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert {"huffman_3", "huffman_5"} <= sections.keys()  # the coded path is the one measured
        expected = np.take_along_axis(codebooks.astype(np.float16).astype(np.float32).T, codes.astype(np.int64), 0)
        assert np.array_equal(W, expected)
        return encoding, decoding

    peaks(1 << 10)  # first calls compile and import what decoding needs
    small, large = peaks(1 << 13), peaks(1 << 15)
    n = ((1 << 15) - (1 << 13)) * 192
    encoding, decoding = (large[0] - small[0]) / n, (large[1] - small[1]) / n
    assert encoding < 2 and decoding < 8, (encoding, decoding)  # W alone is 4 bytes a code


def test_an_interrupted_write_leaves_nothing(tmp_path):
    path = tmp_path / "x.claq"
    with pytest.raises(RuntimeError):
        with ClaqWriter(path) as w:
            w.add_raw("a", np.zeros(3, np.float32))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_finished_file_has_the_usual_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        with ClaqWriter(tmp_path / "x.claq") as w:
            w.add_raw("a", np.zeros(3, np.float32))
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "x.claq").stat().st_mode) == 0o644


def test_writer_rejects_duplicates_and_bad_input(tmp_path):
    with ClaqWriter(tmp_path / "x.claq") as w:
        w.add_raw("a", np.zeros(3, np.float32))
        with pytest.raises(ValueError):
            w.add_raw("a", np.zeros(3, np.float32))
        with pytest.raises(ValueError):
            w.add_raw("c", np.zeros(3, np.complex64))
    r = random_result()
    with pytest.raises(ValueError):
        encode_claq_sections(r.shape[0], np.full(r.shape[1], 9), r.codes, r.column_codebooks,
                             r.outlier_counts, r.outlier_rows, r.outlier_values)


@pytest.fixture(scope="module")
def converted(tiny_model_dir, text_file, tmp_path_factory):
    """Real converter output: AP 3.1 with outliers (codes_3, codes_4, outliers) and AP 2.2 (codes_2)."""
    out = {}
    for label, bits in (("ap31", 3.1), ("ap22", 2.2)):
        qc = QuantConfig(bits=bits, outlier_bits=0.5)
        path = tmp_path_factory.mktemp(label) / "model.claq"
        options = ConvertOptions(model_dir=tiny_model_dir, out=path, quant=qc, calib=(text_file,), nsamples=4, seqlen=32)
        out[label] = (path, qc, run_conversion(options))
    return out


def test_converted_file_decodes_to_the_quantizer_result_bit_for_bit(converted, tiny_model_dir, text_file):
    from transformers import AutoTokenizer

    path, qc, record = converted["ap31"]
    calib = calibration_set([text_file], AutoTokenizer.from_pretrained(str(tiny_model_dir)), None, 4, 32, 0)
    source = ModelSource(tiny_model_dir)
    weights = weights_by_name(measure_fisher(source, calib, torch.device("cpu"), head=True))  # what the conversion did
    results = dict(quantize_model(source, calib, qc, row_weights=weights))  # deterministic: same run again
    with reader.ClaqFile(path) as cf:
        cf.validate()
        for name, r in results.items():
            assert np.array_equal(cf.decode(name), r.dequantize()), name
            assert cf.stored_bytes(name) == record["tensors"][name]["stored_bytes"]
        source = ModelSource(tiny_model_dir)
        for name in source.names():
            if name not in results:
                assert np.array_equal(cf.decode(name), source.tensor(name).numpy())
        assert cf.metadata["conversion"]["quant"]["bits"] == 3.1
        assert "tokenizer.json" in cf.files


def test_inspect_reports_the_converters_honest_bpw(converted):
    path, _, record = converted["ap31"]
    result = CliRunner().invoke(inspect_cmd, [str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["quantized"]["stored_bytes"] == record["summary"]["stored_bytes"]
    assert summary["quantized"]["honest_bpw"] == pytest.approx(record["summary"]["honest_bpw"], rel=1e-12)
    assert summary["quantized"]["bits_histogram"].keys() == {"3", "4", "5", "6"}  # AP 3.1; the head AP 5.1
    text = CliRunner().invoke(inspect_cmd, [str(path)])
    assert text.exit_code == 0 and "honest" in text.stdout and f"valid .claq v{spec.VERSION}" in text.stdout


def rewrite(path, target, header_fn=None, data_fn=None):
    """Copy `path` to `target` with its header (dict) and/or data region (bytes) changed."""
    raw = path.read_bytes()
    _, version, n = struct.unpack("<4sIQ", raw[:16])
    header = json.loads(raw[16:16 + n])
    data = raw[16 + n:]
    if header_fn:
        header_fn(header)
    if data_fn:
        data = data_fn(header, data)
    text = json.dumps(header).encode()
    text += b" " * (spec.align(16 + len(text)) - 16 - len(text))
    target.write_bytes(struct.pack("<4sIQ", b"CLAQ", version, len(text)) + text + data)
    return target


def inspect_fails(path, *needles):
    result = CliRunner().invoke(inspect_cmd, [str(path)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("invalid:")
    assert len(result.output.strip().splitlines()) == 1
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def first_tensor(header, kind):
    return next(n for n, t in header["tensors"].items() if t["kind"] == kind)


@pytest.mark.parametrize("mutate", ["drop", "format", "version", "wrong_type", "extra"])
def test_every_top_level_field_mutated_is_rejected(converted, tmp_path, mutate):
    path = converted["ap31"][0]
    for key in ("format", "version", "metadata", "tensors", "files"):
        def fn(h, key=key):
            if mutate == "drop":
                del h[key]
            elif mutate == "extra":
                h["unexpected"] = 1
            elif mutate == "wrong_type":
                h[key] = [] if key != "format" else 7
            else:
                h[key] = "gguf" if key == "format" else spec.VERSION + 1
        if mutate in ("format", "version") and key != mutate:
            continue
        inspect_fails(rewrite(path, tmp_path / f"{key}.claq", fn))


def test_every_tensor_field_mutated_is_rejected(converted, tmp_path):
    path = converted["ap31"][0]
    header = json.loads(path.read_bytes()[16:16 + struct.unpack("<Q", path.read_bytes()[8:16])[0]])
    for kind in ("claq", "raw"):
        name = first_tensor(header, kind)
        mutations = {"kind": lambda t: t.update(kind="q4_k"), "shape_empty": lambda t: t.update(shape=[]),
                     "shape_negative": lambda t: t.update(shape=[-1] + t["shape"][1:]),
                     "shape_text": lambda t: t.update(shape=["a"]), "no_sections": lambda t: t.pop("sections"),
                     "extra": lambda t: t.update(extra=1)}
        for label, fn in mutations.items():
            inspect_fails(rewrite(path, tmp_path / f"{kind}-{label}.claq", lambda h: fn(h["tensors"][name])), name)


def section_kinds(converted):
    """(file, tensor or file name, section) for every section kind present in the converted files."""
    seen, out = set(), []
    for label in ("ap31", "ap22"):
        path = converted[label][0]
        raw = path.read_bytes()
        header = json.loads(raw[16:16 + struct.unpack("<Q", raw[8:16])[0]])
        for name, tensor in header["tensors"].items():
            for section in tensor["sections"]:
                if section not in seen:
                    seen.add(section)
                    out.append((path, name, section))
        for name in header["files"]:
            if "file" not in seen:
                seen.add("file")
                out.append((path, name, None))
    return out


ENTRY_MUTATIONS = {
    "dtype_unknown": lambda e: e.update(dtype="Q4_K"), "dtype_other": lambda e: e.update(dtype="I64"),
    "shape": lambda e: e.update(shape=[e["shape"][0] + 1] + e["shape"][1:]),
    "offset_aligned": lambda e: e.update(offset=e["offset"] + 64), "offset_odd": lambda e: e.update(offset=e["offset"] + 1),
    "offset_huge": lambda e: e.update(offset=1 << 62), "length": lambda e: e.update(length=e["length"] + 1),
    "length_negative": lambda e: e.update(length=-8), "crc": lambda e: e.update(crc32=e["crc32"] ^ 1),
    "crc_range": lambda e: e.update(crc32=1 << 33), "missing": lambda e: e.pop("crc32"),
}


def test_every_section_kind_and_entry_field_mutated_is_rejected(converted, tmp_path):
    kinds = section_kinds(converted)
    assert {s for _, _, s in kinds} >= {"bit_widths", "codebooks", "codebook_grid", "codes_2", "codes_3", "codes_4",
                                        "outlier_counts", "outlier_rows", "outlier_values", "data", None}
    for path, name, section in kinds:
        for label, fn in ENTRY_MUTATIONS.items():
            def mutate(h, name=name, section=section, fn=fn):
                fn(h["files"][name] if section is None else h["tensors"][name]["sections"][section])
            target = rewrite(path, tmp_path / f"{section}-{label}.claq", mutate)
            # placement errors may name the neighbouring section; all others name this one
            needles = () if label.startswith("offset") or label == "length" else (name,)
            inspect_fails(target, *needles)


def test_section_contents_are_validated(converted, tmp_path):
    path = converted["ap31"][0]

    def poke(section, change, dtype=None):
        def data_fn(header, data):
            name = next(n for n, t in header["tensors"].items() if section in t["sections"]
                        and dtype in (None, t["sections"][section]["dtype"]))
            entry = header["tensors"][name]["sections"][section]
            start, end = entry["offset"], entry["offset"] + entry["length"]
            payload = bytearray(data[start:end])
            change(payload, header["tensors"][name])
            entry["crc32"] = zlib.crc32(bytes(payload))
            return data[:start] + bytes(payload) + data[end:]
        return data_fn

    def set_u16(payload, index, value):
        payload[2 * index: 2 * index + 2] = struct.pack("<H", value)

    cases = {
        "width": poke("bit_widths", lambda p, t: p.__setitem__(0, 7)),
        "codebook_nan": poke("codebooks", lambda p, t: set_u16(p, 0, 0x7E00), "F16"),  # the 5/6-bit head
        "grid_nan": poke("codebook_grid", lambda p, t: set_u16(p, 0, 0x7E00)),        # u8 levels: 3/4 bits
        "grid_step": poke("codebook_grid", lambda p, t: set_u16(p, 1, 0xBC00)),       # step -1.0
        "row_range": poke("outlier_rows", lambda p, t: set_u16(p, 0, 65535)),
        "row_order": poke("outlier_rows", lambda p, t: (set_u16(p, 0, 5), set_u16(p, 1, 5))),
    }
    for label, data_fn in cases.items():
        inspect_fails(rewrite(path, tmp_path / f"{label}.claq", data_fn=data_fn), "tensor 'model.")


def test_nonzero_padding_bits_are_rejected(tmp_path):
    r = random_result(rows=37, cols=5, seed=4)  # 37 rows: streams end inside a word
    r.bits[:] = 3
    r = GPTQ(torch.from_numpy(r.dequantize()), None).quantize(np.full(5, 3))
    path = tmp_path / "x.claq"
    with ClaqWriter(path) as w:
        w.add_quantized("w", 37, sections_of(r))
    assert CliRunner().invoke(inspect_cmd, [str(path)]).exit_code == 0

    def flip_top_bit(header, data):
        entry = header["tensors"]["w"]["sections"]["codes_3"]
        end = entry["offset"] + entry["length"]
        payload = bytearray(data[entry["offset"]:end])
        payload[-1] |= 0x80  # 37 * 5 * 3 = 555 bits: bit 31 of the last word is padding
        entry["crc32"] = zlib.crc32(bytes(payload))
        return data[:entry["offset"]] + bytes(payload) + data[end:]

    inspect_fails(rewrite(path, tmp_path / "pad.claq", data_fn=flip_top_bit), "padding")


def test_truncated_and_garbage_files(tmp_path, converted):
    raw = converted["ap31"][0].read_bytes()
    for label, data in {"empty": b"", "magic": b"XXXX" + raw[4:], "cut": raw[: len(raw) // 2],
                        "one_byte_more": raw + b"\0", "huge_header": raw[:8] + struct.pack("<Q", 1 << 63) + raw[16:],
                        "not_utf8": raw[:16] + b"{\xff" + raw[18:]}.items():
        path = tmp_path / f"{label}.claq"
        path.write_bytes(data)
        inspect_fails(path)


def test_reference_reader_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, claq_convert.format.reader; assert 'torch' not in sys.modules, sorted(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_version_1_files_stay_readable_with_their_own_widths(tmp_path):
    """A v2 reader reads v1 files, and holds them to v1's widths (1 to 4); v2 allows 1 to 8."""
    rows, cols = 40, 6
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    for bits, ok_in_v1 in ((np.array([1, 2, 3, 4, 4, 2]), True), (np.array([5, 6, 7, 8, 1, 4]), False)):
        r = GPTQ(W, None).quantize(bits)
        path = tmp_path / f"w{int(bits[0])}.claq"
        with ClaqWriter(path) as w:
            w.add_quantized("w", rows, encode_claq_sections(rows, r.bits, r.codes, r.column_codebooks,
                                                            r.outlier_counts, r.outlier_rows, r.outlier_values))
        with reader.ClaqFile(path) as cf:
            assert cf.version == spec.VERSION and np.array_equal(cf.decode("w"), r.dequantize())
        v1 = rewrite(path, tmp_path / f"v1-{int(bits[0])}.claq", lambda h: h.update(version=1))
        raw = bytearray(v1.read_bytes())
        raw[4:8] = struct.pack("<I", 1)  # the preamble's version too
        v1.write_bytes(bytes(raw))
        if ok_in_v1:
            with reader.ClaqFile(v1) as cf:
                cf.validate()
                assert cf.version == 1 and np.array_equal(cf.decode("w"), r.dequantize())
        else:
            inspect_fails(v1, "codes_5")  # v1 knows no 5-bit stream


def test_a_scalar_is_stored_as_shape_one_and_the_writer_refuses_shapes_the_readers_refuse(tmp_path):
    from claq_convert.quantize.convert import raw_array

    array, dtype = raw_array(torch.tensor(0.5, dtype=torch.bfloat16))
    assert array.shape == (1,) and dtype == "BF16"
    with ClaqWriter(tmp_path / "a.claq") as writer:
        for shape in [(), (2, 0), (1,) * (spec.MAX_DIMS + 1)]:
            with pytest.raises(ValueError, match="positive sizes"):
                writer.add_raw("t", np.zeros(shape, np.float32))
        writer.add_raw("scalar", array, dtype=dtype)
        writer.add_raw("deep", np.zeros((1,) * spec.MAX_DIMS, np.float32))
    with reader.ClaqFile(tmp_path / "a.claq") as cf:
        assert cf.tensors["scalar"]["shape"] == [1] and len(cf.tensors["deep"]["shape"]) == spec.MAX_DIMS
