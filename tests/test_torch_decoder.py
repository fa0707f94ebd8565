"""The Torch decoder against the NumPy reference (bit for bit), ClaqLinear, and load() of a whole file."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from claq_convert.runtime import modules, torch_decoder
from claq_convert.format import reader, spec
from claq_convert.cli import eval_cmd, generate_cmd
from claq_convert.quantize.convert import ConvertOptions, apply_dequantized, encode_result, run_conversion
from claq_convert.quantize.gptq import GPTQ
from claq_convert.quantize.pipeline import QuantConfig
from claq_convert.runtime.load import load
from claq_convert.format.writer import encode_claq_sections

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VECTORS = Path(__file__).resolve().parents[1] / "formats" / "vectors"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", list(spec.ALLOWED_BITS))
def test_unpack_matches_numpy(device, bits):
    rng = np.random.default_rng(bits)
    for n in (1, 31, 32, 33, 1000):
        codes = rng.integers(0, 1 << bits, n)
        words = spec.pack_codes(codes, bits)
        ours = torch_decoder.unpack_codes(torch_decoder.to_torch(words, device), bits, n)
        assert torch.equal(ours.cpu(), torch.from_numpy(spec.unpack_codes(words, bits, n).astype(np.int64)))


def torch_decode(rows, sections, device):
    layout = torch_decoder.ClaqLayout(sections["bit_widths"], device)
    tensors = {k: torch_decoder.to_torch(v, device) for k, v in sections.items()}
    return torch_decoder.decode_claq(rows, tensors, layout).cpu().numpy()


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_decoders_agree_bit_for_bit_on_random_weights(device, grid):
    for seed in range(4):
        rows, cols = 29 + seed * 17, 40
        W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
        bits = np.random.default_rng(seed).choice(list(spec.ALLOWED_BITS), cols)
        r = GPTQ(W, None).quantize(bits, np.random.default_rng(seed).integers(0, 3, cols), grid=grid)
        sections = encode_result(r)
        assert ("codebook_grid" in sections) == grid
        expected = reader.decode_claq(rows, sections)
        assert np.array_equal(torch_decode(rows, sections, device), expected)
        assert np.array_equal(expected, r.dequantize())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", sorted(VECTORS.glob("*.claq")), ids=lambda p: p.stem)
def test_torch_decoder_passes_the_conformance_vectors(device, path):
    expected = json.loads(path.with_suffix(".json").read_text())["tensors"]
    with reader.ClaqFile(path) as cf:
        for name, values in expected.items():
            if cf.tensors[name]["kind"] == "claq":
                got = torch_decode(cf.tensors[name]["shape"][0], cf.sections(name), device)
                assert np.array_equal(got, np.array(values, np.float32))


def test_claq_linear_forward_and_cache():
    r = GPTQ(torch.randn(24, 16), None).quantize(np.full(16, 3))
    sections = encode_claq_sections(24, r.bits, r.codes, r.column_codebooks, r.outlier_counts, r.outlier_rows,
                                    r.outlier_values)
    x = torch.randn(5, 16)
    for cache in (False, True):
        layer = modules.ClaqLinear(24, sections, bias=torch.ones(24), cache=cache)
        y = layer(x)
        assert torch.equal(layer.dequantize(), torch.from_numpy(r.dequantize()))
        # the decoded weight is a transposed view (no copy), so the matmul may sum in another order
        torch.testing.assert_close(y, torch.nn.functional.linear(x, torch.from_numpy(r.dequantize()), torch.ones(24)),
                                   rtol=1e-6, atol=1e-6)
        assert (layer._weight is not None) == cache
        assert layer.packed_bytes() < 24 * 16 * 4


@pytest.fixture(scope="module")
def tiny_claq(tiny_model_dir, text_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("claq") / "tiny.claq"
    qc = QuantConfig(bits=3.1, outlier_bits=0.5)
    run_conversion(ConvertOptions(model_dir=tiny_model_dir, out=path, quant=qc, calib=(text_file,), nsamples=4, seqlen=32))
    return path


def test_loaded_model_equals_the_in_memory_dequantized_model(tiny_claq, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load(tiny_claq)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with reader.ClaqFile(tiny_claq) as cf:
        with torch.no_grad():
            params = dict(reference.named_parameters())
            for name, tensor in cf.tensors.items():
                if tensor["kind"] == "claq":
                    params[name].copy_(torch.from_numpy(cf.decode(name)))
    ids = tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # equal weights; the matmuls may sum in another order (transposed view)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    embedding = model.model.embed_tokens  # the tied table is quantized and kept once for both ends
    assert isinstance(embedding, modules.ClaqEmbedding) and model.lm_head.embedding is embedding
    assert isinstance(model.model.layers[0].mlp.down_proj, modules.ClaqLinear)


def test_cli_eval_and_generate_read_claq_files(tiny_claq, text_file, tmp_path):
    out = tmp_path / "e.json"
    r = CliRunner().invoke(eval_cmd, [str(tiny_claq), "--text", str(text_file), "--seqlen", "32", "--windows", "2",
                                      "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["peak_rss_after_load_bytes"] > 0
    g = CliRunner().invoke(generate_cmd, [str(tiny_claq), "quick brown", "--raw", "--max-new-tokens", "4"])
    assert g.exit_code == 0, g.output
    assert "tokens/s" in g.output


def test_a_file_without_its_weights_is_refused(tiny_claq, tmp_path):
    from claq_convert.format.writer import ClaqWriter

    with reader.ClaqFile(tiny_claq) as cf:
        path = tmp_path / "partial.claq"
        with ClaqWriter(path) as w:
            w.metadata.update(cf.metadata)
            w.add_raw("model.embed_tokens.weight", cf.decode("model.embed_tokens.weight"))
    with pytest.raises(ValueError, match="lacks tensors"):
        load(path)


@pytest.mark.parametrize("device", DEVICES)
def test_codes_at_reads_any_position_of_a_stream(device):
    rng = np.random.default_rng(7)
    for bits in (1, 2, 3, 4):
        codes = rng.integers(0, 1 << bits, 777)
        words = torch_decoder.to_torch(spec.pack_codes(codes, bits), device)
        positions = torch.from_numpy(rng.integers(0, codes.size, (13, 5))).to(device)
        got = torch_decoder.codes_at(words, bits, positions)
        assert torch.equal(got.cpu(), torch.from_numpy(codes)[positions.cpu()])
        assert torch.equal(torch_decoder.codes_at(words, bits, torch.tensor([codes.size - 1], device=device)).cpu(),
                           torch.tensor([codes[-1]]))


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_claq_embedding_rows_equal_the_reference_decoder(device, grid):
    rows, cols = 300, 24
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    bits = np.random.default_rng(3).choice([2, 3, 4], cols)
    r = GPTQ(W, None).quantize(bits, np.random.default_rng(3).integers(0, 4, cols), grid=grid)
    sections = encode_result(r)
    expected = torch.from_numpy(reader.decode_claq(rows, sections))
    embedding = modules.ClaqEmbedding(rows, sections, device=device)
    ids = torch.tensor([[5, 299, 0, 5], [int(r.outlier_rows[0]), 17, 17, 2]], device=device)
    assert torch.equal(embedding(ids).cpu(), expected[ids.cpu()])  # only the looked-up rows are decoded
    assert torch.equal(embedding.weight.cpu(), expected)
    head = modules.ClaqTiedHead(embedding)
    x = torch.randn(3, cols, device=device)
    torch.testing.assert_close(head(x).cpu(), x.cpu() @ expected.T)


def rewritten(source, path, config=None, extra_raw=None, files=None, raw=None):
    """A copy of the .claq file `source` with its config, embedded files or tensors changed."""
    from claq_convert.format.writer import ClaqWriter

    with reader.ClaqFile(source) as cf, ClaqWriter(path) as w:
        w.metadata.update(cf.metadata)
        if config is not None:
            w.metadata["config"] = config
        for name, tensor in cf.tensors.items():
            if tensor["kind"] == "raw":
                w.add_raw(name, (raw or {}).get(name, cf.decode(name)))
            else:
                w.add_quantized(name, tensor["shape"][0], {k: np.array(v) for k, v in cf.sections(name).items()})
        for name, array in (extra_raw or {}).items():
            w.add_raw(name, array)
        for name in cf.files:
            w.add_file(name, (files or {}).get(name, cf.file(name)))
    return path


def test_load_refuses_hostile_files_the_readers_accept_in_one_line(tiny_claq, tmp_path):
    with reader.ClaqFile(tiny_claq) as cf:
        config = dict(cf.metadata["config"])
        tokenizer_name = next(n for n in cf.files if n.endswith("tokenizer.json"))
    cases = {
        "no model_type": (dict(config={k: v for k, v in config.items() if k != "model_type"}), "no model config"),
        "bad value": (dict(config={**config, "hidden_size": "wide"}), "config"),
        "huge vocabulary": (dict(config={**config, "vocab_size": 10 ** 12}), "does not fit"),
        "2**63 layers": (dict(config={**config, "num_hidden_layers": 2 ** 63}), "decoder layers"),
        "2**32 layers, qwen2": (dict(config={**config, "model_type": "qwen2", "num_hidden_layers": 2 ** 32}),
                                "decoder layers"),  # its config builds a list a layer: load() hung there
        "a layer too many": (dict(config={**config, "num_hidden_layers": config["num_hidden_layers"] + 1}),
                             "decoder layers"),
        "unknown tensor": (dict(extra_raw={"model.layers.0.extra.weight": np.ones(3, np.float32)}), "no such tensor"),
        "wrong raw shape": (dict(raw={"model.norm.weight": np.ones(5, np.float32)}), "does not fit"),
        "bad tokenizer": (dict(files={tokenizer_name: b'{"model": {"type": "BPE", "vocab": 7}}'}), "tokenizer"),
    }
    for label, (change, message) in cases.items():
        path = rewritten(tiny_claq, tmp_path / f"{label.replace(' ', '-')}.claq", **change)
        with pytest.raises(ValueError, match=message) as caught:
            load(path)
        assert "\n" not in str(caught.value), label
