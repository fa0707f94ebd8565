"""What claq-convert knows about model families, in one table, checked against the real module graph.

Per family: where the decoder layers are, the true-sequential groups of linears inside a layer (linears
of one group read the same input, and a group's input depends only on the groups before it), and the
norm applied before the head. Everything else is found in the module graph of the model itself: the
embeddings and the head (transformers' get_input/output_embeddings), the parameters outside the layers.
`resolve` builds the model on the meta device and checks the entry against it, so a wrong entry or an
unexpected variant fails with one line before any work is done.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .experts import GPT_OSS, LLAMA4, PLAIN, UNGATED_PLAIN, Stacking

_LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
EXPERT = "*"  # in a group name: every expert of the layer's experts module (experts.py), expert by expert
OPTIONAL = "?"  # ending a group name: a linear some configurations of the family have and others lack
_ATTENTION = _LLAMA_GROUPS[:2]
_MOE_GROUPS = _ATTENTION + (("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"), ("mlp.experts.*.down_proj",))
_LATENT_ATTENTION = (("self_attn.q_proj?", "self_attn.q_a_proj?", "self_attn.kv_a_proj_with_mqa"),
                     ("self_attn.q_b_proj?", "self_attn.kv_b_proj"), ("self_attn.o_proj",))
_SHARED_EXPERTS = (("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_experts.gate_proj",
                    "mlp.shared_experts.up_proj"), ("mlp.experts.*.down_proj", "mlp.shared_experts.down_proj"))
# hybrid layers: Gated DeltaNet linear attention (Qwen3-Next's fused in_proj_qkvz/in_proj_ba, Qwen3.5's apart) in
# some layers, full attention in others; each layer has one kind, so every name is optional
_HYBRID_ATTENTION = (("self_attn.q_proj?", "self_attn.k_proj?", "self_attn.v_proj?", "linear_attn.in_proj_qkvz?",
                      "linear_attn.in_proj_ba?", "linear_attn.in_proj_qkv?", "linear_attn.in_proj_z?",
                      "linear_attn.in_proj_b?", "linear_attn.in_proj_a?"), ("self_attn.o_proj?", "linear_attn.out_proj?"))
_MAMBA_OR_ATTENTION = (("self_attn.q_proj?", "self_attn.k_proj?", "self_attn.v_proj?", "mamba.in_proj?"),
                       ("mamba.x_proj?",), ("self_attn.o_proj?", "mamba.out_proj?"))
# Mamba2 mixers (Granite 4's): in_proj yields the gate, the convolved x/B/C and dt at once, the convolution, the
# scan and a gated norm follow, out_proj reads the gated norm's output; the convolution weight is read, never called
_MAMBA2_OR_ATTENTION = (_MAMBA_OR_ATTENTION[0], _MAMBA_OR_ATTENTION[2])
# Qwen's one shared expert (mlp.shared_expert, singular; _SHARED_EXPERTS above is DeepSeek's mlp.shared_experts)
_SHARED_EXPERT = (("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_expert.gate_proj",
                   "mlp.shared_expert.up_proj"), ("mlp.experts.*.down_proj", "mlp.shared_expert.down_proj"))
# Gemma 4: a full attention layer may have no v_proj (attention_k_eq_v: its keys serve as values), a layer that
# attends over an earlier layer's keys and values neither k_proj nor v_proj (num_kv_shared_layers); with per-layer
# embeddings (hidden_size_per_layer_input), after the MLP's residual a gate reads the layer's output, and a
# projection reads the gate's activation times the layer's per-layer input
_GEMMA4_GROUPS = (("self_attn.q_proj", "self_attn.k_proj?", "self_attn.v_proj?"),) + _LLAMA_GROUPS[1:] + (
    ("per_layer_input_gate?",), ("per_layer_projection?",))
# checkpoints of Mixtral's lineage name an expert's gate, down and up matrices w1, w2, w3, under block_sparse_moe
_W123 = (("block_sparse_moe.", "mlp."), ("w1.", "gate_proj."), ("w2.", "down_proj."), ("w3.", "up_proj."))
# GraniteMoE checkpoints stack the experts as input_linear (gate and up) and output_linear (down)
_GRANITE_MOE = (("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj"),
                ("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj"),
                ("block_sparse_moe.router.layer.", "block_sparse_moe.router."))
_GRANITE_EXPERTS = (("block_sparse_moe.experts.*.gate_proj", "block_sparse_moe.experts.*.up_proj"),
                    ("block_sparse_moe.experts.*.down_proj",))
# ... and a shared MLP beside them (input_linear: its gate and up fused), run after the experts
_GRANITE_SHARED = ((*_GRANITE_EXPERTS[0], "shared_mlp.input_linear"), (*_GRANITE_EXPERTS[1], "shared_mlp.output_linear"))


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]              # config.model_type values served by this entry
    layers: str                               # dotted path of the ModuleList of decoder layers
    groups: tuple[tuple[str, ...], ...]       # linears of one layer, in true-sequential groups
    final_norm: Optional[str]                 # the norm before the head (None: the head reads the last layer)
    renames: tuple[tuple[str, str], ...] = () # (checkpoint segments, module segments) where the two differ,
                                              # replaced wherever they begin a dotted segment of a name
    experts: Optional[str] = None             # the layer's experts module, stacked by transformers, unstacked
                                              # into one linear per expert and matrix (experts.py)
    stacking: Stacking = PLAIN                # how transformers' module stacks them (and some checkpoints do)
    kept: tuple[str, ...] = ()                # linears of a layer stored unquantized (routers, a shared
                                              # expert's one-row gate: small, and a flipped route costs more)
    joined: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (a layer's parameter, the checkpoint tensors it is
                                              # stored as): concatenated along their first axis on reading, as
                                              # transformers does on load (source.py)
    dense: Optional[tuple[tuple[str, ...], ...]] = None  # a mixture's groups in its layers without experts
    conv1d: bool = False                      # the linears are transformers' Conv1D (x @ W + b, W stored [in, out]);
                                              # quantized, written and run as W^T [out, in] like every other
                                              # linear (llama.cpp's GGUF stores GPT-2 that way too)
    lookups: tuple[str, ...] = ()             # token-lookup tables besides the input embedding (modules outside
                                              # the layers, rows are tokens), quantized as an untied input
                                              # embedding is, where the model has them
    refused: tuple[tuple[str, str], ...] = () # (config attribute, why): configurations of the family refused
                                              # while that attribute is set (not 0, None or False)

    def linear_type(self) -> type:
        """The module class of this family's linears."""
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            return Conv1D
        return torch.nn.Linear

    def transposed(self, name: str) -> bool:
        """Whether the checkpoint tensor `name` is a block linear's weight stored [in, out] (a Conv1D's)."""
        if not self.conv1d or not name.startswith(self.layers + ".") or not name.endswith(".weight"):
            return False
        index, _, linear = name[len(self.layers) + 1:-len(".weight")].partition(".")
        return index.isdigit() and any(linear in group for group in self.groups)

    def layout(self, name: str, W):
        """W (a tensor or an array) with its axes swapped where `name` is stored transposed, else W itself.

        Quantization, the file and the runtime see every weight as [out, in]; the checkpoint and the
        transformers module keep their own layout. The swap is its own inverse: it converts either way.
        """
        if not self.transposed(name):
            return W
        return W.T.contiguous() if isinstance(W, torch.Tensor) else np.ascontiguousarray(W.T)


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "olmo3",
                     "granite", "stablelm", "smollm3", "helium", "cohere", "cohere2", "exaone4", "seed_oss",
                     "ernie4_5", "ministral", "ministral3", "internlm3", "vaultgemma", "hunyuan_v1_dense",
                     "iquestcoder", "hyperclovax", "cwm", "granite_swa", "olmo", "diffllama", "bitnet"),
           "model.layers", _LLAMA_GROUPS, "model.norm"),
    # attention sinks, stored as softmax_offset
    Family("flint", ("flint",), "model.layers", _LLAMA_GROUPS, "model.norm",
           renames=(("self_attn.softmax_offset", "self_attn.sinks"),)),
    # EXAONE 3: Llama's modules under GPT-2-style checkpoint names, which transformers renames on load
    Family("exaone", ("exaone",), "model.layers", _LLAMA_GROUPS, "model.norm",
           renames=(("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
                    ("transformer.ln_f.", "model.norm."), ("attn.attention.", "self_attn."),
                    ("self_attn.out_proj.", "self_attn.o_proj."), ("ln_1.", "input_layernorm."),
                    ("ln_2.", "post_attention_layernorm."), ("mlp.c_fc_0.", "mlp.gate_proj."),
                    ("mlp.c_fc_1.", "mlp.up_proj."), ("mlp.c_proj.", "mlp.down_proj."))),
    # an MLP without a gate: up, an activation, down
    Family("ungated", ("arcee", "nemotron", "apertus", "apertus1p5_text", "jais2"), "model.layers",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), ("mlp.up_proj",),
            ("mlp.down_proj",)), "model.norm"),
    Family("nanochat", ("nanochat",), "model.layers",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), ("mlp.fc1",), ("mlp.fc2",)),
           "model.norm"),
    Family("starcoder2", ("starcoder2",), "model.layers",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), ("mlp.c_fc",),
            ("mlp.c_proj",)), "model.norm"),
    # parallel attention and MLP reading one norm's output: fc1 could join q/k/v, listed apart as gpt_neox's
    Family("phi", ("phi",), "model.layers",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.dense",), ("mlp.fc1",),
            ("mlp.fc2",)), "model.final_layernorm"),
    Family("glm4", ("glm", "glm4"), "model.layers",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
            ("mlp.down_proj",)), "model.norm"),
    # one fused query_key_value a layer; the attention and MLP may read one norm's output (parallel variants)
    Family("falcon", ("falcon", "bloom"), "transformer.h",
           (("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",)), "transformer.ln_f"),
    Family("persimmon", ("persimmon",), "model.layers",
           (("self_attn.query_key_value",), ("self_attn.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
           "model.final_layernorm"),
    Family("mpt", ("mpt",), "transformer.blocks",
           (("attn.Wqkv",), ("attn.out_proj",), ("ffn.up_proj",), ("ffn.down_proj",)), "transformer.norm_f"),
    Family("codegen", ("codegen",), "transformer.h",
           (("attn.qkv_proj",), ("attn.out_proj",), ("mlp.fc_in",), ("mlp.fc_out",)), "transformer.ln_f"),
    Family("xglm", ("xglm",), "model.layers",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
           "model.layer_norm"),
    Family("biogpt", ("biogpt",), "biogpt.layers",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
           "biogpt.layer_norm"),
    # StarCoder / SantaCoder: GPT-2's names as plain linears (multi-query attention in c_attn); learned positions raw
    Family("gpt_bigcode", ("gpt_bigcode",), "transformer.h",
           (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)), "transformer.ln_f"),
    # local (windowed) and global attention layers, learned positions
    Family("gpt_neo", ("gpt_neo",), "transformer.h",
           (("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"), ("attn.attention.out_proj",),
            ("mlp.c_fc",), ("mlp.c_proj",)), "transformer.ln_f"),
    Family("gptj", ("gptj",), "transformer.h",
           (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("attn.out_proj",), ("mlp.fc_in",), ("mlp.fc_out",)),
           "transformer.ln_f"),
    # mixture of experts: each expert's matrices quantized apart, from the tokens routed to it; routers raw
    # (dense MLPs in the layers a config names so: Qwen3-MoE's mlp_only_layers, Mellum's mlp_layer_types)
    Family("moe", ("qwen3_moe", "olmoe", "mellum", "flex_olmo"), "model.layers", _MOE_GROUPS, "model.norm",
           experts="mlp.experts", dense=_LLAMA_GROUPS),
    # MiMo-V2-Flash: a dense first layer, attention sinks stored as attention_sink_bias
    Family("mimo_v2_flash", ("mimo_v2_flash",), "model.layers", _MOE_GROUPS, "model.norm", experts="mlp.experts",
           dense=_LLAMA_GROUPS, renames=(("self_attn.attention_sink_bias", "self_attn.sinks"),)),
    Family("mixtral", ("mixtral", "minimax_m2"), "model.layers", _MOE_GROUPS, "model.norm", renames=_W123,
           experts="mlp.experts"),
    # MiniMax-Text-01: lightning (linear) attention layers, its qkv_proj and output gate reading the layer's input,
    # and full attention layers
    Family("minimax", ("minimax",), "model.layers",
           (("self_attn.q_proj?", "self_attn.k_proj?", "self_attn.v_proj?", "self_attn.qkv_proj?",
             "self_attn.output_gate?"), ("self_attn.o_proj?", "self_attn.out_proj?")) + _MOE_GROUPS[2:],
           "model.norm", renames=_W123, experts="mlp.experts"),
    Family("phimoe", ("phimoe",), "model.layers", _MOE_GROUPS, "model.norm",
           renames=(("block_sparse_moe.gate.", "mlp.router."),) + _W123, experts="mlp.experts",
           kept=("mlp.router",)),  # its router is a linear
    Family("qwen2_moe", ("qwen2_moe",), "model.layers", _ATTENTION + _SHARED_EXPERT,
           "model.norm", experts="mlp.experts", kept=("mlp.shared_expert_gate",)),
    # linear attention (Gated DeltaNet) and full attention layers; its convolution, decay and norm kept raw
    Family("qwen3_next", ("qwen3_next", "qwen3_5_moe_text"), "model.layers", _HYBRID_ATTENTION + _SHARED_EXPERT,
           "model.norm", experts="mlp.experts", kept=("mlp.shared_expert_gate",)),
    Family("qwen3_5", ("qwen3_5_text",), "model.layers", _HYBRID_ATTENTION + _LLAMA_GROUPS[2:], "model.norm"),
    # OLMo hybrid: Gated DeltaNet layers (q/k/v, the decay's a, beta's b and the output gate g all read the layer's
    # normed input) and OLMo 3's full attention layers (reading the residual stream, normed after), every name
    # optional; the convolution, decay and gate norm kept raw. Its checkpoints name two norms as OLMo-core does,
    # and store the convolution as q/k/v parts that transformers concatenates on load
    Family("olmo_hybrid", ("olmo_hybrid",), "model.layers",
           (("self_attn.q_proj?", "self_attn.k_proj?", "self_attn.v_proj?", "linear_attn.q_proj?",
             "linear_attn.k_proj?", "linear_attn.v_proj?", "linear_attn.b_proj?", "linear_attn.a_proj?",
             "linear_attn.g_proj?"), ("self_attn.o_proj?", "linear_attn.o_proj?")) + _LLAMA_GROUPS[2:], "model.norm",
           renames=(("attention_layer_norm.", "input_layernorm."),
                    ("feedforward_layer_norm.", "post_attention_layernorm.")),
           joined=(("linear_attn.conv1d.weight", ("linear_attn.q_conv1d.weight", "linear_attn.k_conv1d.weight",
                                                  "linear_attn.v_conv1d.weight")),)),
    # mixtures whose first layers are dense, with shared experts beside the routed ones
    Family("glm4_moe", ("glm4_moe", "dots1"), "model.layers", _ATTENTION + _SHARED_EXPERTS, "model.norm",
           experts="mlp.experts", dense=_LLAMA_GROUPS),
    # Hunyuan 3: the same, its checkpoint's router, score bias and shared MLP named as transformers renames them on load
    Family("hy_v3", ("hy_v3",), "model.layers", _ATTENTION + _SHARED_EXPERTS, "model.norm", experts="mlp.experts",
           dense=_LLAMA_GROUPS, renames=(("mlp.router.gate.", "mlp.gate."), ("mlp.expert_bias", "mlp.e_score_correction_bias"),
                                         ("mlp.shared_mlp.", "mlp.shared_experts."))),
    Family("ernie4_5_moe", ("ernie4_5_moe",), "model.layers", _ATTENTION + _SHARED_EXPERTS, "model.norm",
           experts="mlp.experts", dense=_LLAMA_GROUPS, renames=(("mlp.moe_statics.", "mlp.gate.moe_statics."),)),
    Family("exaone_moe", ("exaone_moe",), "model.layers", _ATTENTION + _SHARED_EXPERTS, "model.norm",
           experts="mlp.experts", dense=_LLAMA_GROUPS,
           renames=(("mlp.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),)),
    # gated attention: its gate_proj reads the layer's normed input beside q/k/v; a linear router
    Family("afmoe", ("afmoe",), "model.layers",
           (_ATTENTION[0] + ("self_attn.gate_proj",),) + _ATTENTION[1:] + _SHARED_EXPERTS, "model.norm",
           experts="mlp.experts", dense=((_ATTENTION[0] + ("self_attn.gate_proj",),) + _LLAMA_GROUPS[1:]),
           kept=("mlp.router.gate",)),
    Family("hunyuan_v1_moe", ("hunyuan_v1_moe",), "model.layers",
           _ATTENTION + (("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_mlp.gate_proj",
                          "mlp.shared_mlp.up_proj"), ("mlp.experts.*.down_proj", "mlp.shared_mlp.down_proj")),
           "model.norm", experts="mlp.experts", kept=("mlp.gate.wg",)),
    Family("cohere2_moe", ("cohere2_moe",), "model.layers", _MOE_GROUPS, "model.norm", experts="mlp.experts"),
    # checkpoints that store the experts stacked (source.py reads them expert by expert): gpt-oss's with biases,
    # interleaved gate/up and a clamped SwiGLU (MXFP4 in its releases); GraniteMoE's, with a shared MLP or not
    Family("gpt_oss", ("gpt_oss",), "model.layers", _MOE_GROUPS, "model.norm", experts="mlp.experts",
           stacking=GPT_OSS),
    # Llama 4: experts and a shared expert in every moe_layers layer (all, or every other), dense MLPs between;
    # its linear router kept raw
    Family("llama4", ("llama4_text",), "model.layers",
           _ATTENTION + (("feed_forward.experts.*.gate_proj", "feed_forward.experts.*.up_proj",
                          "feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj"),
                         ("feed_forward.experts.*.down_proj", "feed_forward.shared_expert.down_proj")),
           "model.norm", experts="feed_forward.experts", stacking=LLAMA4, kept=("feed_forward.router",),
           dense=_ATTENTION + (("feed_forward.gate_proj", "feed_forward.up_proj"), ("feed_forward.down_proj",))),
    # Gemma 4: sliding and full attention layers (a full one with its own head size and rotary table, maybe without
    # v_proj); per-layer embeddings (E2B, E4B): a second token table whose rows hold a vector for every layer, each
    # layer's slice gated into it after its MLP, quantized as the input embedding is; the last layers of E2B and E4B
    # (num_kv_shared_layers) attend over the keys and values an earlier layer stored (the layer-by-layer passes
    # carry them: pipeline.shared_mappings). Gemma 4 Unified's text model has the same layers without per-layer
    # embeddings. Refused: the mixture (26B-A4B: experts beside the MLP in every layer)
    Family("gemma4", ("gemma4_text", "gemma4_unified_text"), "model.layers", _GEMMA4_GROUPS, "model.norm",
           lookups=("model.embed_tokens_per_layer",),
           refused=(("enable_moe_block", "its layers hold experts beside the MLP (enable_moe_block), which this "
                                         "version's gemma4 entry does not know"),)),
    # Jamba: Mamba layers (in_proj, then x_proj on its convolved half, out_proj on the gated scan) beside attention
    # layers, every name optional; dt_proj kept raw (the scan reads its weight, never calls it, so calibration sees
    # no input of it; small: inner x dt_rank); experts in every other layer, dense MLPs between
    Family("jamba", ("jamba",), "model.layers",
           _MAMBA_OR_ATTENTION + (("feed_forward.experts.*.gate_proj", "feed_forward.experts.*.up_proj"),
                                  ("feed_forward.experts.*.down_proj",)), "model.final_layernorm",
           experts="feed_forward.experts", kept=("mamba.dt_proj",),
           dense=_MAMBA_OR_ATTENTION + (("feed_forward.gate_proj", "feed_forward.up_proj"), ("feed_forward.down_proj",))),
    # Mamba: no attention; in_proj, then x_proj on the convolved half (Mamba 1), out_proj on the gated scan;
    # dt_proj kept raw as Jamba's
    Family("mamba", ("mamba", "falcon_mamba", "mamba2"), "backbone.layers",
           (("mixer.in_proj",), ("mixer.x_proj?",), ("mixer.out_proj",)), "backbone.norm_f", kept=("mixer.dt_proj",)),
    # Nemotron-H: each layer one mixer after one norm (hybrid_override_pattern): Mamba2 ([in_proj] [out_proj]),
    # attention without positions ([q,k,v] [o]) or an ungated relu^2 MLP ([up] [down]), the `dense` groups; or
    # (Nemotron 3) ungated experts beside a shared expert, the experts maybe inside a latent pair (fc1_latent_proj
    # before them, fc2_latent_proj after), the linear router's weight read and kept raw; checkpoints name the
    # model `backbone`, and some hold multi-token prediction layers (mtp.*) that the model does not have
    Family("nemotron_h", ("nemotron_h",), "model.layers",
           (("mixer.fc1_latent_proj?", "mixer.shared_experts.up_proj"),
            ("mixer.experts.*.up_proj", "mixer.shared_experts.down_proj"), ("mixer.experts.*.down_proj",),
            ("mixer.fc2_latent_proj?",)), "model.norm_f", renames=(("backbone.", "model."),),
           experts="mixer.experts", stacking=UNGATED_PLAIN,
           dense=(("mixer.q_proj?", "mixer.k_proj?", "mixer.v_proj?", "mixer.in_proj?", "mixer.up_proj?"),
                  ("mixer.o_proj?", "mixer.out_proj?", "mixer.down_proj?"))),
    Family("granitemoe", ("granitemoe",), "model.layers", _ATTENTION + _GRANITE_EXPERTS, "model.norm",
           experts="block_sparse_moe.experts", renames=_GRANITE_MOE),
    Family("granitemoeshared", ("granitemoeshared",), "model.layers",
           _ATTENTION + _GRANITE_SHARED, "model.norm", experts="block_sparse_moe.experts", renames=_GRANITE_MOE),
    # Granite 4: Mamba2 layers and attention layers, every one with GraniteMoEShared's experts and shared MLP; the
    # dense releases (num_local_experts 0) have the shared MLP alone
    Family("granitemoehybrid", ("granitemoehybrid",), "model.layers", _MAMBA2_OR_ATTENTION + _GRANITE_SHARED,
           "model.norm", experts="block_sparse_moe.experts", renames=_GRANITE_MOE,
           dense=_MAMBA2_OR_ATTENTION + (("shared_mlp.input_linear",), ("shared_mlp.output_linear",))),
    # Falcon-H1: a Mamba2 mixer and attention side by side in every layer, reading one norm's output (each scaled by
    # its own multiplier: the mixer runs first, so in_proj leads the group); the MLP calls up before gate
    Family("falcon_h1", ("falcon_h1",), "model.layers",
           (("mamba.in_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("mamba.out_proj", "self_attn.o_proj"), ("feed_forward.up_proj", "feed_forward.gate_proj"),
            ("feed_forward.down_proj",)), "model.final_layernorm"),
    # LFM2: gated short-convolution layers (in_proj's B, C and x; the depthwise convolution, read and never called,
    # stays raw; out_proj) and attention layers with q/k norms; the final norm is named embedding_norm
    Family("lfm2", ("lfm2",), "model.layers",
           (("self_attn.q_proj?", "self_attn.k_proj?", "self_attn.v_proj?", "conv.in_proj?"),
            ("self_attn.out_proj?", "conv.out_proj?"), ("feed_forward.w1", "feed_forward.w3"), ("feed_forward.w2",)),
           "model.embedding_norm"),
    # latent attention: q straight (q_proj) or through a low-rank pair (q_a_proj, norm, q_b_proj) by config;
    # the compressed kv (kv_a_proj_with_mqa) and its expansion (kv_b_proj) beside them; GLM-4.7-Flash's is
    # DeepSeek-V3's. DeepSeek-V3.2's sparse-attention indexer (wq_b reading q's normed low-rank output, wk and
    # weights_proj the layer's normed input) only picks the keys each query attends to, as a router picks experts,
    # and runs without gradients: the loss has none for the Fisher allocation to price it by, so it is kept raw
    # (0.13% of V3.2's parameters)
    Family("deepseek", ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite"), "model.layers",
           _LATENT_ATTENTION + _SHARED_EXPERTS, "model.norm", experts="mlp.experts",
           dense=_LATENT_ATTENTION + _LLAMA_GROUPS[2:],
           kept=("self_attn.indexer.wq_b", "self_attn.indexer.wk", "self_attn.indexer.weights_proj")),
    # fused projections: one linear per group
    Family("phi3", ("phi3",), "model.layers",
           (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)), "model.norm"),
    # parallel attention and MLP: both read the layer input (through their own norms), so the MLP's
    # input group follows the attention's only in order, not in data
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers",
           (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
           "gpt_neox.final_layer_norm", renames=(("embed_out.", "lm_head."),)),  # transformers renames on load
    Family("opt", ("opt",), "model.decoder.layers",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
           "model.decoder.final_layer_norm"),
    # Conv1D linears; the head is tied to transformer.wte, the learned positions transformer.wpe stay raw
    Family("gpt2", ("gpt2",), "transformer.h",
           (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)), "transformer.ln_f", conv1d=True),
)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
# Vision-language releases whose language model converts (the file holds that model alone, under its text
# config's type): where the checkpoint keeps the language model's tensors, and the names the text model gives
# them. Tensors elsewhere (the vision tower, the projector, Qwen3.5's multi-token prediction head) are not read.
LANGUAGE_MODELS = {
    "qwen3_5": (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    "qwen3_5_moe": (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    "gemma3": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
               ("model.language_model.", "model.")),
    "llama4": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
               ("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    "gemma4": (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    "gemma4_unified": (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    "mistral3": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."), ("lm_head.", "lm_head.")),
}


def language_model_name(wrapper_type: Optional[str], stored: str) -> Optional[str]:
    """The text model's name for the checkpoint tensor `stored` of a vision-language release of type
    `wrapper_type`, or None where it is not the language model's; `stored` itself for other types."""
    prefixes = LANGUAGE_MODELS.get(wrapper_type)
    if prefixes is None:
        return stored
    return next((new + stored[len(old):] for old, new in prefixes if stored.startswith(old)), None)
# Known and refused, with the reason (rather than "unsupported"):
_MOE = ("a mixture-of-experts model whose experts or layers this version does not know; its mixtures: "
        + ", ".join(sorted(t for f in FAMILIES if f.experts for t in f.model_types)))
_REFUSED: dict[str, str] = {
    **{t: _MOE for t in ("dbrx", "jetmoe", "lfm2_moe")},
    "deepseek_v4": "its layers carry several residual streams (hyper-connections) that hc_head collapses before "
                   "the final norm, and its attention's o_a_proj is a block-diagonal grouped linear, neither of which "
                   "this version calibrates or runs quantized",
}


class ArchitectureError(ValueError):
    """The model's family is unknown, or its module graph does not match its family's entry."""


def module_name(model_type: Optional[str], stored: str) -> str:
    """The module's name for the checkpoint tensor `stored` of a `model_type` checkpoint: each of the family's
    renames applied where it begins a dotted segment (the name itself for most families, or an unknown type)."""
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None or not family.renames:
        return stored
    dotted = "." + stored
    for old, new in family.renames:
        dotted = dotted.replace("." + old, "." + new)
    return dotted[1:]


def checkpoint_name(model_type: Optional[str], module: str) -> str:
    """The checkpoint's name for the module tensor `module` of a `model_type` model: module_name undone, each
    family rename the other way where its module segments begin a dotted segment, in one pass, the longest
    first (PhiMoE's mlp.router is its block_sparse_moe.gate, not mlp's rename then router); the name itself
    where the family has none."""
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None or not family.renames:
        return module
    back = {}
    for old, new in family.renames:
        back.setdefault(new, old)
    pattern = re.compile(r"(?<=\.)(?:" + "|".join(map(re.escape, sorted(back, key=len, reverse=True))) + ")")
    return pattern.sub(lambda m: back[m[0]], "." + module)[1:]


def transposed_weight(model_type: Optional[str], name: str) -> bool:
    """Whether `name` of a `model_type` checkpoint is stored [in, out] (False for an unknown type)."""
    family = _BY_MODEL_TYPE.get(model_type)
    return family is not None and family.transposed(name)


def family_for_type(model_type: Optional[str]) -> Optional[Family]:
    """The entry serving `model_type`, or None (unknown or refused: family_of says why)."""
    return _BY_MODEL_TYPE.get(model_type)


def supported_model_types() -> list[str]:
    """Every model type a checkpoint may have: the families' own, and the vision-language releases whose
    language model converts."""
    return sorted([*_BY_MODEL_TYPE, *LANGUAGE_MODELS])


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type in _REFUSED:
        raise ArchitectureError(f"model type {model_type!r} is not supported: {_REFUSED[model_type]}")
    if model_type not in _BY_MODEL_TYPE:
        raise ArchitectureError(f"model type {model_type!r} is not supported; supported: "
                                f"{', '.join(supported_model_types())}")
    family = _BY_MODEL_TYPE[model_type]
    for attribute, reason in family.refused:
        if getattr(config, attribute, None):
            raise ArchitectureError(f"this {model_type} model is not supported: {reason}")
    return family


class _EmptyOnMeta(torch.overrides.TorchFunctionMode):
    """torch.empty allocates on the meta device: modules create their parameters with it, while buffers
    are computed (arange, ones, tensor) and stay real."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device but real buffers (rotary tables,
    embedding scales are computed, not stored): the skeleton of a model of any size, at no memory cost.

    Parameters are never allocated for real (`_EmptyOnMeta`): a 7B model's embedding would cost
    gigabytes for a moment, and a file's config claiming a huge vocabulary could ask for more than the
    machine has. A parameter made some other way is moved to meta when registered."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        with _EmptyOnMeta():
            yield
    finally:
        torch.nn.Module.register_parameter = original


def skeleton(config, device="cpu", dtype: torch.dtype = torch.float32):
    """The model for `config`, parameters on the meta device, buffers computed and moved to `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        unstack_experts(model, config)
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != torch.device(device):
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, buffer.to(device), persistent=persistent)
    return model.eval()


def unstack_experts(model, config) -> None:
    """A mixture-of-experts model's stacked experts as one linear per expert and matrix (experts.py), in
    place, values kept (a model from from_pretrained) or on meta (a skeleton); other models unchanged."""
    from .experts import unstack_experts as unstack

    family = _BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if family is None or family.experts is None:
        return
    try:
        unstack(model.get_submodule(family.layers), family.experts, family.stacking)
    except (AttributeError, ValueError) as exc:
        raise ArchitectureError(f"{family.name} entry does not match this {config.model_type} model: {exc}") from None


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's persistent buffers by name: those a checkpoint stores (an activation's constants, as
    Apertus's xIELU keeps; a router's learned score bias), which the file keeps raw like parameters;
    computed ones (rotary tables) are not, as transformers' own loading ignores them."""
    stored = {}
    for name, buffer in module.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
            stored[name] = buffer
    return stored


def inside(name: str, prefix: str) -> bool:
    """Whether the dotted `name` is `prefix` or lies below it."""
    return name == prefix or name.startswith(prefix + ".")


@dataclass
class Resolved:
    """A family entry checked against one model: its layer list and final norm, as modules, and each
    layer's groups with every expert named (the entry's groups with EXPERT expanded, or its dense ones)."""
    family: Family
    layers: torch.nn.ModuleList
    final_norm: Optional[torch.nn.Module]
    layer_groups: tuple[tuple[tuple[str, ...], ...], ...] = ()  # per layer

    def groups(self, index: int) -> tuple[tuple[str, ...], ...]:
        return self.layer_groups[index]

    def linears(self, index: int) -> tuple[str, ...]:
        """The quantized linears of layer `index`, relative names, in group order."""
        return tuple(name for group in self.layer_groups[index] for name in group)

    @property
    def routed(self) -> frozenset[str]:
        """The linears that see only the tokens routed to their expert (a calibration batch may miss one)."""
        return frozenset(n for groups in self.layer_groups for group in groups for n in group
                         if self.family.experts and inside(n, self.family.experts))


def expanded(groups: tuple[tuple[str, ...], ...], experts: int) -> tuple[tuple[str, ...], ...]:
    """The groups with each name holding EXPERT repeated for experts 0..experts-1, expert by expert (an
    expert's gate beside its up: they read one input)."""
    out = []
    for group in groups:
        plain = [n for n in group if EXPERT not in n.split(".")]
        each = [n for n in group if EXPERT in n.split(".")]
        names = [n.replace(f".{EXPERT}.", f".{e}.") for e in range(experts) for n in each]
        out.append(tuple(names + plain))
    return tuple(out)


def resolve(model, config) -> Resolved:
    """Check the family entry against the model's module graph: the layer list exists, every grouped
    name is a linear of the family's type (nn.Linear, or Conv1D) in every layer, and every such linear of a
    layer is in exactly one group."""
    family = family_of(config)
    try:
        layers = model.get_submodule(family.layers)
        norm = model.get_submodule(family.final_norm) if family.final_norm else None
    except AttributeError as exc:
        raise ArchitectureError(f"{family.name} entry does not match this {config.model_type} model: {exc}") from None
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ArchitectureError(f"{family.name} entry: {family.layers} is not a non-empty list of layers")
    layer_groups = []
    for index, layer in enumerate(layers):
        groups = _layer_groups(family, layer, index)
        grouped = [name for group in groups for name in group]
        found = sorted(n for n, m in layer.named_modules() if isinstance(m, (torch.nn.Linear, family.linear_type()))
                       and n not in family.kept)
        if sorted(grouped) != found:
            raise ArchitectureError(f"{family.name} entry: layer {index} has linears {found}, the entry names "
                                    f"{sorted(grouped)}; a variant this version does not know")
        other = [n for n in grouped if not isinstance(layer.get_submodule(n), family.linear_type())]
        if other:  # a weight in the other layout would be quantized transposed
            raise ArchitectureError(f"{family.name} entry: layer {index}'s {', '.join(other)} is not a "
                                    f"{family.linear_type().__name__}; a variant this version does not know")
        layer_groups.append(groups)
    return Resolved(family, layers, norm, tuple(layer_groups))


def _layer_groups(family: Family, layer: torch.nn.Module, index: int) -> tuple[tuple[str, ...], ...]:
    """The groups of one layer: the entry's, with its experts named where the layer has them, the entry's
    dense groups where a mixture's layer has none (its first layers, often)."""
    from .experts import ExpertLinears

    if family.experts is None:
        return _present(family.groups, layer)
    if not _has(layer, family.experts):
        if family.dense is None:
            raise ArchitectureError(f"{family.name} entry: layer {index} has no {family.experts}, and the entry "
                                    "knows no dense layers; a variant this version does not know")
        return _present(family.dense, layer)
    experts = layer.get_submodule(family.experts)
    if not isinstance(experts, ExpertLinears):
        raise ArchitectureError(f"{family.name} entry: layer {index}'s {family.experts} is not unstacked experts "
                                "(architectures.unstack_experts)")
    return _present(expanded(family.groups, len(experts)), layer)


def _present(groups: tuple[tuple[str, ...], ...], layer: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
    """The groups with each OPTIONAL name kept (as a plain name) where the layer has it, dropped elsewhere."""
    out = []
    for group in groups:
        names = tuple(n.removesuffix(OPTIONAL) for n in group
                      if not n.endswith(OPTIONAL) or _has(layer, n.removesuffix(OPTIONAL)))
        if names:
            out.append(names)
    return tuple(out)


def _has(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
