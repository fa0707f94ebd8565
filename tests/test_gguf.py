"""The GGUF extension: lossless both ways, readable by gguf-py, decoded like .claq, ggml limits enforced."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from claq_convert.format import gguf_ext
from claq_convert.cli import convert_cmd, inspect_cmd, translate_cmd
from claq_convert.quantize.convert import ConvertOptions, run_conversion
from claq_convert.quantize.pipeline import QuantConfig
from claq_convert.format.reader import BadHeader, ClaqFile
from claq_convert.runtime.load import load


@pytest.fixture(scope="module")
def claq_and_gguf(tiny_model_dir, text_file, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf")
    claq = directory / "m.claq"
    run_conversion(ConvertOptions(model_dir=tiny_model_dir, out=claq, quant=QuantConfig(bits=3.1, outlier_bits=0.5),
                                  calib=(text_file,), nsamples=4, seqlen=32))
    gguf_path = gguf_ext.claq_to_gguf(claq, directory / "m.gguf")
    return claq, gguf_path


def test_roundtrip_keeps_every_section_byte_for_byte(claq_and_gguf, tmp_path):
    claq, gguf_path = claq_and_gguf
    back = gguf_ext.gguf_to_claq(gguf_path, tmp_path / "back.claq")
    with ClaqFile(claq) as a, gguf_ext.GgufClaqFile(gguf_path) as g, ClaqFile(back) as b:
        g.validate()
        b.validate()
        assert list(a.tensors) == list(g.tensors) == list(b.tensors)
        for name in a.tensors:
            assert np.array_equal(a.decode(name), g.decode(name))
            for section, array in a.sections(name).items():
                assert array.dtype == b.sections(name)[section].dtype
                assert array.tobytes() == b.sections(name)[section].tobytes() == g.sections(name)[section].tobytes()
        assert a.metadata == b.metadata == g.metadata
        assert {n: a.file(n) for n in a.files} == {n: b.file(n) for n in b.files} == {n: g.file(n) for n in g.files}


def test_tokenizer_json_is_stored_once_and_rebuilt_exactly(claq_and_gguf):
    import gguf

    claq, gguf_path = claq_and_gguf
    fields = gguf.GGUFReader(str(gguf_path)).fields
    assert gguf_ext.KEY_TOKENIZER_REST in fields and gguf.Keys.Tokenizer.HF_JSON not in fields
    with ClaqFile(claq) as a:
        original = a.file("tokenizer.json")
    assert len(fields[gguf_ext.KEY_TOKENIZER_REST].contents()) < len(original) / 2


def test_a_tokenizer_json_that_cannot_be_rebuilt_is_stored_whole(claq_and_gguf, tmp_path, monkeypatch):
    import gguf

    claq, _ = claq_and_gguf
    monkeypatch.setattr(gguf_ext, "tokenizer_json_rest", lambda *args: None)
    whole = gguf_ext.claq_to_gguf(claq, tmp_path / "whole.gguf")
    assert gguf.Keys.Tokenizer.HF_JSON in gguf.GGUFReader(str(whole)).fields
    with ClaqFile(claq) as a, gguf_ext.GgufClaqFile(whole) as g:
        assert g.file("tokenizer.json") == a.file("tokenizer.json")


def test_tokenizer_json_rest_accepts_only_exact_rebuilds():
    tokens, merges = ["a", "b", "ab"], ["a b"]
    pretty = gguf_ext.rebuild_tokenizer_json('{"model": {"vocab": null, "merges": "pairs"}}', tokens, merges)
    assert b'"ab": 2' in pretty and b'[\n        "a",\n        "b"\n      ]' in pretty
    rest = gguf_ext.tokenizer_json_rest(pretty, tokens, merges)
    assert rest is not None and gguf_ext.rebuild_tokenizer_json(rest, tokens, merges) == pretty
    compact = b'{"model":{"vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}}'   # not indented as HF writes it
    assert gguf_ext.tokenizer_json_rest(compact, tokens, merges) is None
    assert gguf_ext.tokenizer_json_rest(pretty, ["a", "b", "ba"], merges) is None   # other vocabulary
    assert gguf_ext.tokenizer_json_rest(b"not json", tokens, merges) is None


def test_gguf_py_reads_it(claq_and_gguf):
    import gguf

    _, gguf_path = claq_and_gguf
    reader = gguf.GGUFReader(str(gguf_path))
    assert reader.fields["general.architecture"].contents() == "claq"
    assert reader.fields["llama.block_count"].contents() == 2
    assert any(t.name == "blk.0.attn_q.weight.bit_widths" for t in reader.tensors)
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 300
    dump = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_dump", str(gguf_path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "blk.1.ffn_down.weight.codebook_rice" in dump.stdout  # coded grid levels


def test_runtime_and_inspect_take_gguf(claq_and_gguf):
    claq, gguf_path = claq_and_gguf
    model_a, tok = load(claq)
    model_b, _ = load(gguf_path)
    ids = tok("the quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model_a(ids).logits, model_b(ids).logits)
    result = CliRunner().invoke(inspect_cmd, [str(gguf_path)])
    assert result.exit_code == 0, result.output
    assert "CLAQ GGUF" in result.stdout and "honest" in result.stdout


def test_convert_and_translate_clis(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(convert_cmd, [str(tiny_model_dir), str(out), "--bits", "2", "--calib", str(text_file),
                                         "--nsamples", "2", "--seqlen", "32"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:4] == b"GGUF" and not list(tmp_path.glob(".*tmp"))
    back = tmp_path / "m.claq"
    r = CliRunner().invoke(translate_cmd, [str(out), str(back)])
    assert r.exit_code == 0, r.output
    assert back.read_bytes()[:4] == b"CLAQ"


def write_gguf(path, arch="claq", tensor_name="x", nested=False):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(gguf_ext.KEY_VERSION, 1)
    writer.add_string(gguf_ext.KEY_CONFIG, "{}")
    writer.add_string(gguf_ext.KEY_TENSORS, '[{"name": "x", "gguf": "%s", "kind": "raw", "shape": [4], '
                                            '"dtypes": {"data": "F32"}}]' % tensor_name)
    if nested:
        writer.add_array("claq.nested", [[1, 2], [3]])
    writer.add_tensor(tensor_name, np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_ggml_limits_and_foreign_files_are_rejected(tmp_path):
    ok = write_gguf(tmp_path / "ok.gguf")
    with gguf_ext.GgufClaqFile(ok) as f:
        f.validate()
        assert np.array_equal(f.decode("x"), np.arange(4, dtype=np.float32))
    long_name = write_gguf(tmp_path / "long.gguf", tensor_name="t" * 70)
    r = CliRunner().invoke(inspect_cmd, [str(long_name)])
    assert r.exit_code == 1 and "63 bytes" in r.output
    nested = write_gguf(tmp_path / "nested.gguf", nested=True)
    r = CliRunner().invoke(inspect_cmd, [str(nested)])
    assert r.exit_code == 1 and "nested" in r.output
    with pytest.raises(BadHeader, match="not a CLAQ GGUF"):
        gguf_ext.GgufClaqFile(write_gguf(tmp_path / "llama.gguf", arch="llama"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 40)
    r = CliRunner().invoke(inspect_cmd, [str(garbage)])
    assert r.exit_code == 1 and r.output.startswith("invalid:")


def test_binary_embedded_files_survive_the_round_trip(tmp_path):
    """A sentencepiece tokenizer.model is not UTF-8: it travels as a uint8 array, byte for byte."""
    from claq_convert.format.writer import ClaqWriter

    claq = tmp_path / "x.claq"
    blob = bytes(range(256)) * 3 + b"\xff\xfe"
    with ClaqWriter(claq) as w:
        w.add_raw("model.norm.weight", np.ones(4, np.float32))
        w.add_file("tokenizer.model", blob)
        w.add_file("chat_template.jinja", "{{ messages }}".encode())
        w.metadata.update(config={"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 4,
                                  "num_attention_heads": 1, "vocab_size": 8}, generation_config=None, conversion={})
    gguf_path = gguf_ext.claq_to_gguf(claq, tmp_path / "x.gguf")
    with gguf_ext.GgufClaqFile(gguf_path) as g:
        assert g.file("tokenizer.model") == blob
    assert gguf_ext.gguf_to_claq(gguf_path, tmp_path / "back.claq").read_bytes() == claq.read_bytes()
