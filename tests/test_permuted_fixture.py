"""The permuted twin of the fixture: the same function with the hidden units renumbered."""
import json

import numpy as np
import pytest
import torch

from claq_convert import fixture


def _logits(state: dict, config, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tied", [True, False])
def test_permuted_state_computes_the_same_function(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from ones, so a wrong norm permutation shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    permuted = fixture.permute_llama_state(state, config.to_dict(), seed=3)
    ids = torch.randint(0, 50, (2, 12))
    assert torch.allclose(_logits(state, config, ids), _logits(permuted, config, ids), atol=1e-5)
    changed = [k for k in state if not np.array_equal(state[k], permuted[k])]
    assert len(changed) == len(state)  # every tensor is renumbered somewhere
    assert all(sorted(state[k].ravel()) == sorted(permuted[k].ravel()) for k in ("model.norm.weight",))


def test_unknown_tensor_is_refused():
    config = {"hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1}
    with pytest.raises(fixture.FixtureError, match="no permutation rule"):
        fixture.permute_llama_state({"model.layers.0.mlp.fc.weight": np.zeros((8, 4), np.float32)}, config)


def _values_per_row_block(w: np.ndarray, block: int = 32) -> int:
    """The most distinct values in any `block`-long run of a row."""
    runs = w.reshape(-1, block)
    runs = np.sort(runs, axis=1)
    return int(((np.diff(runs, axis=1) != 0).sum(axis=1) + 1).max())


@pytest.mark.slow
def test_real_twin_has_no_row_block_grid_and_same_logits(smollm2_dir, tmp_path):
    from safetensors.numpy import load_file

    twin = fixture.build_permuted_fixture(tmp_path / "twin", smollm2_dir)
    original, permuted = load_file(str(smollm2_dir / "model.safetensors")), load_file(str(twin / "model.safetensors"))
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        assert _values_per_row_block(original[name]) <= 16  # the Q4_1 source: one 16-level grid per block of 32
        assert _values_per_row_block(permuted[name]) > 16
    assert json.loads((twin / "claq_fixture.json").read_text())["permuted"]["seed"] == fixture.PERMUTED_SEED
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(smollm2_dir))
    config.num_hidden_layers = 4  # the first layers are enough to check the renumbering
    ids = torch.arange(100, 140)[None]
    keep = lambda s: {k: v for k, v in s.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < 4}
    assert torch.allclose(_logits(keep(original), config, ids), _logits(keep(permuted), config, ids), atol=1e-3)
