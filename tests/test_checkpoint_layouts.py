"""Checkpoints whose tensors are not the model's parameters one for one: OLMo hybrid's convolution stored as
q/k/v parts that transformers concatenates on load, and multi-token prediction layers transformers' loading
ignores (GLM-4.7-Flash's model.layers.47, DeepSeek's model.layers.61)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from claq_convert.models.source import ModelSource, SourceError, check_checkpoint

from conftest import FAMILY_CONFIGS, build_tiny_model

CONV = "model.layers.0.linear_attn.{}conv1d.weight"


def test_olmo_hybrids_convolution_parts_read_as_the_parameter_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / "olmo_hybrid", family="olmo_hybrid")
    stored = load_file(str(model_dir / "model.safetensors"))
    parts = [CONV.format(p) for p in ("q_", "k_", "v_")]
    assert set(parts) <= set(stored) and CONV.format("") not in stored  # transformers 5.24 saves the parts
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    source = ModelSource(model_dir)
    params = dict(model.named_parameters())
    assert set(params) == set(source.names())  # no part, no OLMo-core norm name left
    for name, param in params.items():
        assert source.shape(name) == tuple(param.shape) and torch.equal(source.tensor(name), param), name
    check_checkpoint(source)

    # the releases split it as q, k and v (transformers' own save in three near-equal chunks): the same whole
    config = FAMILY_CONFIGS["olmo_hybrid"]
    key_dim = config["linear_num_key_heads"] * config["linear_key_head_dim"]
    whole = torch.cat([stored.pop(p) for p in parts])
    assert whole.shape[0] == 2 * key_dim + config["linear_num_value_heads"] * config["linear_value_head_dim"]
    stored.update(zip(parts, whole.split([key_dim, key_dim, whole.shape[0] - 2 * key_dim])))
    save_file(stored, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(ModelSource(model_dir).tensor(CONV.format("")), params[CONV.format("")])

    del stored[parts[1]]
    save_file(stored, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SourceError, match=f"stores {parts[0]} without {parts[1]}; an incomplete checkpoint"):
        ModelSource(model_dir)


@pytest.mark.parametrize("family, layer", [("glm4_moe_lite", 47), ("deepseek_v32", 61)])
def test_a_prediction_layer_transformers_ignores_is_not_read(family, layer, tmp_path):
    """A release's multi-token prediction layer (a whole decoder layer with its experts, past the last one the
    model has) is neither read nor written: transformers' loading ignores it, and the file would be refused."""
    model_dir = build_tiny_model(tmp_path / family, family=family)
    stored = load_file(str(model_dir / "model.safetensors"))
    prefix = f"model.layers.{layer}."
    extra = {prefix + n: torch.ones(4, 64) for n in ("eh_proj.weight", "mlp.experts.0.gate_proj.weight")}
    save_file({**stored, **extra}, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    source = ModelSource(model_dir)
    check_checkpoint(source)  # what conversion does first: the model's names known, the layer is dropped
    assert sorted(source.names()) == sorted(stored)


def test_what_an_ignore_pattern_matches_is_read_where_the_model_has_it(tmp_path):
    """GPT-2's class ignores attn.bias (old checkpoints' causal masks), a pattern its c_attn.bias matches too."""
    model_dir = build_tiny_model(tmp_path / "gpt2", family="gpt2")
    stored = load_file(str(model_dir / "model.safetensors"))
    mask = "transformer.h.0.attn.bias"
    save_file({**stored, mask: torch.ones(1, 1, 8, 8)}, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    source = ModelSource(model_dir)
    check_checkpoint(source)
    assert "transformer.h.0.attn.c_attn.bias" in source.names() and sorted(source.names()) == sorted(stored)
