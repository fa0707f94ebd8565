"""Every supported family: convert a tiny random model, validate, load from the file, same logits as in memory."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from claq_convert import architectures, reader
from claq_convert.cli import convert_cmd, inspect_cmd
from claq_convert.convert import ConvertOptions, run_conversion
from claq_convert.pipeline import QuantConfig
from claq_convert.runtime import load

from conftest import FAMILY_CONFIGS, build_tiny_model


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def converted_family(request, text_file, tmp_path_factory):
    directory = build_tiny_model(tmp_path_factory.mktemp(request.param), family=request.param)
    path = directory.parent / "model.claq"
    record = run_conversion(ConvertOptions(model_dir=directory, out=path, quant=QuantConfig(bits=3.1),
                                           calib=(text_file,), nsamples=4, seqlen=32))
    return request.param, directory, path, record


def test_family_converts_loads_and_matches_the_in_memory_model(converted_family):
    from transformers import AutoModelForCausalLM

    family, directory, path, record = converted_family
    assert CliRunner().invoke(inspect_cmd, [str(path)]).exit_code == 0
    model, tokenizer = load(path)
    reference = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    config = reference.config
    resolved = architectures.resolve(reference, config)
    expected = {f"{resolved.family.layers}.{i}.{n}.weight" for i in range(2) for n in resolved.linears}
    with reader.ClaqFile(path) as cf:
        quantized = {n for n, t in cf.tensors.items() if t["kind"] == "claq"}
        assert expected < quantized  # every block linear, plus the head / embeddings
        params = dict(reference.named_parameters())
        with torch.no_grad():
            for name in quantized:
                params[name].copy_(torch.from_numpy(cf.decode(name)))
    ids = tokenizer("the quick brown fox jumps", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_unsupported_family_fails_in_one_line_before_any_work(tmp_path, text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(str(directory))
    result = CliRunner().invoke(convert_cmd, [str(directory), str(tmp_path / "x.claq"), "--calib", str(text_file)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "gpt2" in result.output and "Conv1D" in result.output
    assert not (tmp_path / "x.claq").exists()
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "rwkv"
    with pytest.raises(architectures.ArchitectureError, match="supported: .*llama"):
        architectures.family_of(type("C", (), config)())


def test_a_wrong_entry_fails_loudly():
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=40)
    model = architectures.skeleton(config)
    assert all(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    wrong = architectures.Family("llama", ("llama",), "model.layers", (("self_attn.q_proj",),), "model.norm")
    original = architectures._BY_MODEL_TYPE["llama"]
    architectures._BY_MODEL_TYPE["llama"] = wrong
    try:
        with pytest.raises(architectures.ArchitectureError, match="a variant this version does not know"):
            architectures.resolve(model, config)
    finally:
        architectures._BY_MODEL_TYPE["llama"] = original


def test_family_gguf_round_trip_is_byte_exact(converted_family, tmp_path):
    from claq_convert import gguf_ext

    family, directory, path, _ = converted_family
    gguf_path = gguf_ext.claq_to_gguf(path, tmp_path / "m.gguf")
    back = gguf_ext.gguf_to_claq(gguf_path, tmp_path / "back.claq")
    assert back.read_bytes() == path.read_bytes()
    with reader.ClaqFile(path) as a, gguf_ext.GgufClaqFile(gguf_path) as g:
        g.validate()
        for name in a.tensors:
            assert np.array_equal(a.decode(name), g.decode(name)), name
    model, _ = load(gguf_path)
    assert model.config.model_type == json.loads((directory / "config.json").read_text())["model_type"]
