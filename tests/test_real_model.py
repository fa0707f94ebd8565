"""The real SmolLM2 fixture converted to a 4-bit .claq file, then run from the file (slow: a few minutes)."""
import numpy as np
import pytest
import torch

from claq_convert.format import reader
from claq_convert.quantize.convert import ConvertOptions, run_conversion
from claq_convert.runtime.evaluate import perplexity
from claq_convert.quantize.pipeline import QuantConfig
from claq_convert.runtime.load import load
from claq_convert.runtime.torch_decoder import ClaqLayout, decode_claq, to_torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_claq(smollm2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-4bit.claq"
    # the default calibration (self-sampled text and this Python's texts), at a third of its windows for CI
    record = run_conversion(ConvertOptions(model_dir=smollm2_dir, out=path, quant=QuantConfig(bits=4), nsamples=32))
    return path, record


def test_decoders_agree_on_every_tensor_and_bytes_are_honest(smollm2_claq):
    path, record = smollm2_claq
    with reader.ClaqFile(path) as cf:
        cf.validate()
        quantized = [n for n, t in cf.tensors.items() if t["kind"] == "claq"]
        assert len(quantized) == 30 * 7 + 1 and "model.embed_tokens.weight" in quantized  # + the tied head
        for name in quantized:
            rows = cf.tensors[name]["shape"][0]
            sections = cf.sections(name)
            ours = decode_claq(rows, {k: to_torch(v, "cpu") for k, v in sections.items()},
                               ClaqLayout(sections["bit_widths"], "cpu"))
            assert np.array_equal(ours.numpy(), cf.decode(name)), name
            assert cf.stored_bytes(name) == record["tensors"][name]["stored_bytes"]
    assert record["summary"]["honest_bpw"] < 4.65  # 4-bit blocks (4.24 bpw, grid codebooks) and the 6-bit tied head
    # the default needs no text beside the model and Python
    assert record["calibration"]["sources"] == ["self:22", "python-docs:5", "python-code:5"]
    # the rows' Fisher weights, from 16 windows spread over the three sources
    assert record["quant"]["row_weighting"] == "fisher" and record["sensitivity"]["windows"] == 16
    assert path.stat().st_size < 80e6  # the whole file: 78.5 MB (83.1 with fp16 codebooks and a raw tokenizer.json)
    with reader.ClaqFile(path) as cf:
        assert cf.files["tokenizer.json"]["encoding"] == "zlib" and cf.files["tokenizer.json"]["length"] < 1e6


def test_the_4bit_file_answers_paris_and_matches_in_memory_perplexity(smollm2_claq, smollm2_dir):
    from transformers import AutoModelForCausalLM

    path, _ = smollm2_claq
    model, tokenizer = load(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        answer = tokenizer.decode(model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer
    from_file = perplexity(model, tokenizer, nwindows=8)
    reference = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    with reader.ClaqFile(path) as cf, torch.no_grad():
        params = dict(reference.named_parameters())
        for name, tensor in cf.tensors.items():
            if tensor["kind"] == "claq":
                params[name].copy_(torch.from_numpy(cf.decode(name)))
    in_memory = perplexity(reference, tokenizer, nwindows=8)
    assert from_file.ppl == pytest.approx(in_memory.ppl, rel=1e-4)
    assert from_file.ppl < 40


@pytest.fixture(scope="module")
def smollm2_3bit(smollm2_dir, tmp_path_factory):
    from claq_convert.format.gguf_ext import claq_to_gguf

    directory = tmp_path_factory.mktemp("smollm2-3bit")
    claq = directory / "m.claq"
    from claq_convert.data import default_text

    run_conversion(ConvertOptions(model_dir=smollm2_dir, out=claq, quant=QuantConfig(bits=3),
                                  calib=(default_text("valid"),), nsamples=32))  # a text: no sampling time
    return claq, claq_to_gguf(claq, directory / "m.gguf")


def test_3bit_gguf_is_lossless_readable_and_evaluates_like_the_claq(smollm2_3bit, tmp_path):
    import subprocess
    import sys

    import gguf

    from claq_convert.format.gguf_ext import GgufClaqFile, gguf_to_claq

    claq, gguf_path = smollm2_3bit
    with reader.ClaqFile(claq) as cf:  # GGUF keys are not compressed: the tokenizer counts at its full size
        entry = cf.files["tokenizer.json"]
        uncompressed = cf.size - entry["length"] + entry["size"]
    assert gguf_path.stat().st_size <= uncompressed * 1.01  # and once only (vocab and merges not repeated)
    assert len(gguf.GGUFReader(str(gguf_path)).tensors) > 30 * 7 * 3
    dump = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_dump", str(gguf_path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "claq.base_architecture" in dump.stdout
    back = gguf_to_claq(gguf_path, tmp_path / "back.claq")
    with reader.ClaqFile(claq) as a, GgufClaqFile(gguf_path) as g, reader.ClaqFile(back) as b:
        g.validate()
        for name in a.tensors:
            assert np.array_equal(a.decode(name), g.decode(name)), name
            for section, array in a.sections(name).items():
                assert array.tobytes() == b.sections(name)[section].tobytes(), (name, section)
    ppl = [perplexity(*load(path), nwindows=8).ppl for path in (claq, gguf_path)]
    assert ppl[0] == ppl[1]
