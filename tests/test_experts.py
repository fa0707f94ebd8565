"""Mixture-of-experts layers: unstacked experts compute what transformers' stacked ones do, each expert's
Hessian comes from the tokens routed to it, and an expert no calibration token reaches is still quantized."""
import numpy as np
import pytest
import torch

from claq_convert.models import architectures
from claq_convert.models.experts import ExpertLinears, is_stacked, unstack_experts
from claq_convert.models.source import ModelSource

from conftest import FAMILY_CONFIGS, build_tiny_model, first_layer

# tiny configs of a mixture family whose layers have no experts: Granite 4's dense release, Nemotron-H's
# pattern of Mamba, attention and MLP layers
DENSE_RELEASES = ("granitemoehybrid-dense", "nemotron_h")
MOE = sorted(f for f in FAMILY_CONFIGS if architectures.family_of(
    type("C", (), {"model_type": FAMILY_CONFIGS[f].get("model_type", f)})()).experts and f not in DENSE_RELEASES)


def test_the_mixture_families_are_in_the_matrix():
    assert MOE == ["afmoe", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe",
                   "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "gpt_oss", "granitemoe", "granitemoehybrid",
                   "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "jamba", "llama4_text", "mellum", "mimo_v2_flash",
                   "minimax", "minimax_m2", "mixtral", "nemotron_h-moe", "olmoe", "phimoe", "qwen2_moe",
                   "qwen3_5_moe_text", "qwen3_moe", "qwen3_next"]


@pytest.mark.parametrize("family", MOE)
def test_unstacked_experts_compute_what_transformers_computes(family, tmp_path):
    """Same logits as transformers' own stacked experts, and every unstacked weight is a checkpoint tensor
    (under the family's renames) with the checkpoint's values."""
    from transformers import AutoModelForCausalLM

    directory = build_tiny_model(tmp_path / family, family=family)
    stacked = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    architectures.unstack_experts(model, model.config)
    arch = architectures.resolve(model, model.config)
    experts = arch.layers[-1].get_submodule(arch.family.experts)  # a mixture's first layers may be dense
    assert isinstance(experts, ExpertLinears) and len(experts) == 4
    assert arch.routed == {n for n in arch.linears(1) if ".experts." in n}
    assert len(arch.routed) == 4 * len(arch.family.stacking.matrices)  # gate, up, down (Nemotron-H's: up, down)
    ids = torch.randint(2, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stacked(ids).logits, rtol=0, atol=1e-5)
    source = ModelSource(directory)
    params = dict(model.named_parameters())
    assert set(params) <= set(source.names())
    for name in [n for n in params if ".experts." in n]:
        assert torch.equal(params[name], source.tensor(name)), name


def test_each_expert_gets_the_hessian_of_its_own_tokens(tmp_path):
    from claq_convert.quantize.pipeline import _group_hessians

    model_dir = build_tiny_model(tmp_path / "mixtral", family="mixtral")
    with torch.no_grad():
        _, arch, layer, states, kwargs = first_layer(model_dir)
        group = arch.groups(0)[2]  # every expert's gate and up
        inputs: dict[str, list] = {}
        handles = [layer.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
            for n in group]
        for h, kw in zip(states, kwargs):
            layer(h, **kw)
        for handle in handles:
            handle.remove()
        hessians, _ = _group_hessians(layer, {n: layer.get_submodule(n) for n in group}, states, kwargs,
                                      routed=arch.routed)
    counts = []
    for name in group:
        x = torch.cat(inputs[name])
        counts.append(x.shape[0])
        torch.testing.assert_close(hessians[name], 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    tokens = sum(h.shape[0] * h.shape[1] for h in states)
    assert sum(counts) == 2 * 2 * tokens and len(set(counts)) > 1  # top-2, gate and up: tokens differ per expert


def _never_to_expert_3(monkeypatch):
    """Route every slot meant for expert 3 to expert 2 instead (Mixtral's router)."""
    from transformers.models.mixtral import modeling_mixtral

    forward = modeling_mixtral.MixtralTopKRouter.forward

    def rerouted(self, hidden_states):
        logits, scores, index = forward(self, hidden_states)
        return logits, scores, torch.where(index == 3, 2, index)
    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", rerouted)


def test_an_expert_no_token_reaches_is_quantized_without_a_hessian(tmp_path, text_file, monkeypatch):
    from claq_convert.format import reader
    from claq_convert.quantize.convert import ConvertOptions, run_conversion
    from claq_convert.quantize.pipeline import QuantConfig, _group_hessians

    model_dir = build_tiny_model(tmp_path / "mixtral", family="mixtral")
    _never_to_expert_3(monkeypatch)
    with torch.no_grad():
        _, arch, layer, states, kwargs = first_layer(model_dir)
        group = arch.groups(0)[2]
        hessians, _ = _group_hessians(layer, {n: layer.get_submodule(n) for n in group}, states, kwargs,
                                      routed=arch.routed)
    assert [n for n in group if hessians[n] is None] == ["mlp.experts.3.gate_proj", "mlp.experts.3.up_proj"]
    path = tmp_path / "m.claq"
    run_conversion(ConvertOptions(model_dir=model_dir, out=path, quant=QuantConfig(bits=3.1),
                                  calib=(text_file,), nsamples=4, seqlen=32))
    source = ModelSource(model_dir)
    with reader.ClaqFile(path) as cf:
        for matrix in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.0.mlp.experts.3.{matrix}.weight"
            assert cf.tensors[name]["kind"] == "claq"
            W = source.tensor(name).numpy()
            assert np.linalg.norm(cf.decode(name) - W) < 0.5 * np.linalg.norm(W)


def test_only_the_layout_a_family_names_is_unstacked():
    from transformers import AutoConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from claq_convert.models.experts import GPT_OSS

    config = AutoConfig.for_model("gpt_oss", hidden_size=16, intermediate_size=8, num_local_experts=2)
    assert not is_stacked(GptOssExperts(config))  # biases beside the matrices: not the plain layout
    assert is_stacked(GptOssExperts(config), GPT_OSS)
    layers = torch.nn.ModuleList([torch.nn.Module()])
    layers[0].experts = GptOssExperts(config)
    with pytest.raises(ValueError, match="layer 0's experts is a GptOssExperts, not experts stacked"):
        unstack_experts(layers, "experts")
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    from claq_convert.models.experts import UNGATED_PLAIN

    ungated = AutoConfig.for_model("nemotron_h", hidden_size=16, moe_intermediate_size=8, n_routed_experts=2)
    assert not is_stacked(NemotronHExperts(ungated)) and not is_stacked(GptOssExperts(config), UNGATED_PLAIN)
    assert is_stacked(NemotronHExperts(ungated), UNGATED_PLAIN)  # up_proj and down_proj, no gate


def test_checkpoint_names_of_mixtral_lineage_become_module_names():
    name = architectures.module_name
    assert name("mixtral", "model.layers.3.block_sparse_moe.experts.7.w1.weight") == "model.layers.3.mlp.experts.7.gate_proj.weight"
    assert name("mixtral", "model.layers.3.block_sparse_moe.experts.7.w2.weight") == "model.layers.3.mlp.experts.7.down_proj.weight"
    assert name("mixtral", "model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.gate.weight"
    assert name("phimoe", "model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.router.weight"
    assert name("gpt_neox", "embed_out.weight") == "lm_head.weight"
    assert name("llama", "model.layers.0.mlp.w1.weight") == "model.layers.0.mlp.w1.weight"
    assert name("nemotron_h", "backbone.layers.0.mixer.in_proj.weight") == "model.layers.0.mixer.in_proj.weight"
    for model_type, stored in (("mixtral", "model.layers.3.block_sparse_moe.experts.7.w3.weight"),
                               ("phimoe", "model.layers.3.block_sparse_moe.gate.weight"), ("gpt_neox", "embed_out.weight"),
                               ("nemotron_h", "backbone.norm_f.weight"), ("llama", "model.norm.weight")):
        assert architectures.checkpoint_name(model_type, name(model_type, stored)) == stored  # GGUF names need it


def test_gguf_names_an_expert_by_llama_cpp_stacked_tensor_and_index():
    from claq_convert.format.gguf_ext import gguf_name

    assert gguf_name("model.layers.3.mlp.experts.7.gate_proj.weight", 4, "qwen3moe") == "blk.3.ffn_gate_exps.7.weight"
    assert gguf_name("model.layers.3.mlp.experts.7.down_proj.weight", 4, "llama") == "blk.3.ffn_down_exps.7.weight"
    assert gguf_name("model.layers.3.mlp.shared_expert.up_proj.weight", 4, "qwen2moe") == "blk.3.ffn_up_shexp.weight"
    assert gguf_name("model.layers.3.mlp.gate.weight", 4, "olmoe") == "blk.3.ffn_gate_inp.weight"


def test_a_router_bias_the_checkpoint_stores_is_what_calibration_routes_with(tmp_path):
    """GLM-4.5's routers keep a learned score bias as a buffer: the layer passes load it from the checkpoint
    (the value the module computes at init, zeros, would route other tokens)."""
    from transformers import AutoModelForCausalLM

    from claq_convert.quantize.pipeline import _materialise

    directory = build_tiny_model(tmp_path / "glm4_moe", family="glm4_moe")
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    bias.copy_(torch.arange(bias.numel(), dtype=bias.dtype))
    model.save_pretrained(str(directory))
    source = ModelSource(directory)
    config = source.config()
    skeleton = architectures.skeleton(config)
    layer = architectures.resolve(skeleton, config).layers[1]
    assert not layer.mlp.gate.e_score_correction_bias.any()  # as built
    _materialise(layer, "model.layers.1.", source, "cpu")
    assert torch.equal(layer.mlp.gate.e_score_correction_bias, torch.arange(bias.numel(), dtype=bias.dtype))


def test_experts_are_budgeted_per_use_and_an_unreached_one_at_its_siblings_level():
    from claq_convert.quantize.sensitivity import FisherSums, per_expert_use

    name = "model.layers.0.mlp.experts.{}.gate_proj.weight".format
    columns = {name(0): np.array([4.0, 8.0]), name(1): np.array([1.0, 3.0]), name(2): np.zeros(2),
               "model.layers.0.self_attn.q_proj.weight": np.array([5.0, 6.0])}
    rows = {n: c[::-1].copy() for n, c in columns.items()}
    sums = FisherSums(columns, rows, tokens={name(0): 40, name(1): 20, name(2): 0})
    even, unreached = per_expert_use(sums)
    mean = 20  # (40 + 20 + 0) / 3 tokens an expert
    np.testing.assert_allclose(even.columns[name(0)], [2.0, 4.0])   # x 20/40
    np.testing.assert_allclose(even.columns[name(1)], [1.0, 3.0])   # x 20/20
    np.testing.assert_allclose(even.columns[name(2)], [2.5, 2.5])   # the siblings' mean level, evenly
    np.testing.assert_allclose(even.rows[name(0)], rows[name(0)] * mean / 40)
    assert not even.rows[name(2)].any() and unreached == 1
    assert even.columns["model.layers.0.self_attn.q_proj.weight"] is columns["model.layers.0.self_attn.q_proj.weight"]
    assert per_expert_use(FisherSums(columns, rows))[0].columns == columns  # a dense model: unchanged


def test_the_fisher_pass_counts_the_tokens_routed_to_each_expert(tmp_path):
    from claq_convert.quantize.convert import measure_fisher

    model_dir = build_tiny_model(tmp_path / "mixtral", family="mixtral")
    windows = torch.randint(2, 200, (3, 24), generator=torch.Generator().manual_seed(0))
    sums = measure_fisher(ModelSource(model_dir), windows, torch.device("cpu"))
    for layer in range(2):
        for matrix in ("gate_proj", "up_proj", "down_proj"):
            counts = [sums.tokens[f"model.layers.{layer}.mlp.experts.{e}.{matrix}.weight"] for e in range(4)]
            assert sum(counts) == 2 * windows.numel()  # two experts a token
    assert not any(".self_attn." in n for n in sums.tokens)


@pytest.mark.parametrize("family, arch", [("qwen3_moe", "qwen3moe"), ("ernie4_5_moe", "ernie4_5-moe")])
def test_the_gguf_names_experts_and_counts_them_as_llama_cpp_does(family, arch, tmp_path, text_file):
    import gguf

    from claq_convert.format.gguf_ext import GgufClaqFile, claq_to_gguf
    from claq_convert.quantize.convert import ConvertOptions, run_conversion
    from claq_convert.quantize.pipeline import QuantConfig

    model_dir = build_tiny_model(tmp_path / family, family=family)
    run_conversion(ConvertOptions(model_dir=model_dir, out=tmp_path / "m.claq", quant=QuantConfig(bits=3.1),
                                  calib=(text_file,), nsamples=4, seqlen=32))
    path = claq_to_gguf(tmp_path / "m.claq", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    value = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith(arch + ".")}
    assert value[f"{arch}.expert_count"] == 4 and value[f"{arch}.expert_used_count"] == 2
    assert value[f"{arch}.expert_feed_forward_length"] == 48
    names = {t.name for t in reader.tensors}
    assert "blk.1.ffn_gate_exps.3.weight.bit_widths" in names and "blk.1.ffn_down_exps.0.weight.bit_widths" in names
    with GgufClaqFile(path) as g:
        g.validate()
        assert "model.layers.1.mlp.experts.3.gate_proj.weight" in g.tensors


def _stack_experts(model_dir, layers=2, experts=4):
    """Rewrite a qwen3_moe checkpoint's per-expert matrices as transformers 5 holds them: 3-D stacks."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = [torch.cat([tensors.pop(f"{prefix}{e}.gate_proj.weight"), tensors.pop(f"{prefix}{e}.up_proj.weight")])
                   for e in range(experts)]
        tensors[prefix + "gate_up_proj"] = torch.stack(gate_up)
        tensors[prefix + "down_proj"] = torch.stack([tensors.pop(f"{prefix}{e}.down_proj.weight") for e in range(experts)])
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def test_a_checkpoint_that_stacks_its_experts_reads_as_one_that_keeps_them_apart(tmp_path):
    """A mixture saved in transformers' in-memory layout (3-D experts) reads expert by expert: the same names
    and values as the per-expert checkpoint, and the stacks themselves are not parameters of the model."""
    from claq_convert.models.source import check_checkpoint

    apart = build_tiny_model(tmp_path / "apart", family="qwen3_moe")
    stacked = build_tiny_model(tmp_path / "stacked", family="qwen3_moe")
    _stack_experts(stacked)
    a, b = ModelSource(apart), ModelSource(stacked)
    assert sorted(a.names()) == sorted(b.names())
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in b.names())
    for name in a.names():
        assert b.shape(name) == a.shape(name) and torch.equal(b.tensor(name), a.tensor(name)), name
    check_checkpoint(b)


def test_stacked_experts_that_do_not_fit_one_another_fail_in_one_line_before_any_work(tmp_path, text_file):
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from claq_convert.cli import convert_cmd

    model_dir = build_tiny_model(tmp_path / "qwen3_moe", family="qwen3_moe")
    tensors = _stack_experts(model_dir)
    tensors["model.layers.1.mlp.experts.down_proj"] = tensors["model.layers.1.mlp.experts.down_proj"][:, :, :40].clone()
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(convert_cmd, [str(model_dir), str(out / "m.claq"), "--calib", str(text_file)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "model.layers.1.mlp.experts holds stacked experts of shapes [4, 96, 64] and [4, 64, 40]" in result.output
    assert "calibration" not in result.output.lower() and not any(out.iterdir())
