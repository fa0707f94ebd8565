"""Every supported family: convert a tiny random model, validate, load from the file, same logits as in memory."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from claq_convert.models import architectures
from claq_convert.format import inspection, reader
from claq_convert.quantize import pipeline
from claq_convert.cli import convert_cmd, inspect_cmd
from claq_convert.models.source import ModelSource, check_checkpoint
from claq_convert.quantize.convert import ConvertOptions, run_conversion
from claq_convert.quantize.pipeline import QuantConfig
from claq_convert.runtime.load import load
from transformers.pytorch_utils import Conv1D

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
    architectures.unstack_experts(reference, config)  # a mixture's experts one linear each, as the file has them
    resolved = architectures.resolve(reference, config)
    expected = {f"{resolved.family.layers}.{i}.{n}.weight" for i in range(2) for n in resolved.linears(i)}
    with reader.ClaqFile(path) as cf:
        quantized = {n for n, t in cf.tensors.items() if t["kind"] == "claq"}
        assert expected < quantized  # every block linear, plus the head / embeddings
        params = dict(reference.named_parameters())
        with torch.no_grad():
            for name in quantized:
                decoded = torch.from_numpy(cf.decode(name))
                module = reference.get_submodule(name.removesuffix(".weight"))
                if isinstance(module, Conv1D):
                    decoded = decoded.T  # the file holds every quantized weight as [out, in]; Conv1D keeps [in, out]
                assert tuple(cf.tensors[name]["shape"]) == out_in(module), name
                params[name].copy_(decoded)
        verified = inspection.verify(cf, directory)  # claq-inspect --verify compares like with like
        assert all(0 <= verified[n].get("relative_error", -1) < 0.5 for n in quantized), verified
    ids = tokenizer("the quick brown fox jumps", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def out_in(module) -> tuple[int, int]:
    """(outputs, inputs) of a linear-like module, read from its own attributes."""
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.out_features, module.in_features


@pytest.mark.parametrize("converted_family", ["gpt2"], indirect=True)
def test_gpt2_gguf_uses_llama_cpp_names(converted_family, tmp_path):
    import gguf

    from claq_convert.format import gguf_ext

    _, _, path, _ = converted_family
    names = {t.name for t in gguf.GGUFReader(str(gguf_ext.claq_to_gguf(path, tmp_path / "m.gguf"))).tensors}
    stems = {n.split(".weight")[0].split(".bias")[0] for n in names}
    for i in range(2):
        layer = ("attn_qkv", "attn_output", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")
        assert {f"blk.{i}.{t}" for t in layer} <= stems
    assert {"token_embd", "position_embd", "output_norm"} <= stems
    assert not any(n.startswith("transformer.") for n in names)
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields  # hyperparameters from GPT-2's own config names
    assert fields["gpt2.block_count"].parts[-1][0] == 2 and fields["gpt2.embedding_length"].parts[-1][0] == 64


@pytest.mark.parametrize("converted_family, arch, expected", [
    ("nemotron_h", "nemotron_h", {"blk.0.ssm_in", "blk.0.ssm_out", "blk.0.ssm_conv1d", "blk.1.attn_q", "blk.1.attn_output",
                                  "blk.2.ffn_up", "blk.2.ffn_down", "token_embd", "output_norm", "output"}),
    ("nemotron_h-moe", "nemotron_h_moe", {"blk.0.attn_q", "blk.1.ffn_latent_down", "blk.1.ffn_up_exps.3",
                                          "blk.1.ffn_down_exps.0", "blk.1.ffn_latent_up", "blk.1.ffn_up_shexp",
                                          "blk.1.ffn_down_shexp", "blk.1.ffn_gate_inp"})], indirect=["converted_family"])
def test_gguf_names_tensors_by_the_checkpoint_names_gguf_py_knows(converted_family, arch, expected, tmp_path):
    """gguf-py maps Nemotron-H's checkpoint names (backbone.layers...), the file holds the module's (model.layers);
    with expert layers it is llama.cpp's nemotron_h_moe."""
    import gguf

    from claq_convert.format import gguf_ext

    _, _, path, _ = converted_family
    read = gguf.GGUFReader(str(gguf_ext.claq_to_gguf(path, tmp_path / "m.gguf")))
    names = {t.name for t in read.tensors}
    assert expected <= {n.split(".weight")[0].split(".bias")[0] for n in names}
    # every weight under llama.cpp's name (the Mamba mixer's A_log, D and dt_bias, not weights, keep theirs)
    assert not any(n.startswith(("backbone.", "model.")) for n in names if n.endswith(".weight")), names
    layers = len(FAMILY_CONFIGS[converted_family[0]]["hybrid_override_pattern"])  # config.json counts no layers
    assert read.fields[f"{arch}.block_count"].parts[-1][0] == layers


def test_tensors_transformers_does_not_load_are_neither_read_nor_stored(tmp_path, text_file):
    """Nemotron 3's checkpoints may hold multi-token prediction layers (mtp.*), which the model has not: stored
    raw, they would make the file one load() refuses."""
    from safetensors.torch import load_file, save_file

    directory = build_tiny_model(tmp_path / "nemotron_h", family="nemotron_h")
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["mtp.layers.0.mixer.q_proj.weight"] = torch.ones(64, 64)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    source = ModelSource(directory)
    check_checkpoint(source)  # hides what the model's own loading ignores (its _keys_to_ignore_on_load_unexpected)
    assert "mtp.layers.0.mixer.q_proj.weight" not in source.names()
    path = tmp_path / "m.claq"
    run_conversion(ConvertOptions(model_dir=directory, out=path, quant=QuantConfig(bits=3.1), calib=(text_file,),
                                  nsamples=4, seqlen=32))
    with reader.ClaqFile(path) as cf:
        assert not any(n.startswith("mtp.") for n in cf.tensors)
    load(path)


def test_nemotron_h_configs_of_either_spelling_give_the_layer_count_and_the_architecture():
    """transformers 5 writes layers_block_type and no num_hidden_layers; NVIDIA's releases a hybrid_override_pattern."""
    from claq_convert.format import gguf_ext

    for config, arch in (({"hybrid_override_pattern": "M-M*-"}, "nemotron_h"), ({"hybrid_override_pattern": "ME*E"}, "nemotron_h_moe"),
                         ({"layers_block_type": ["linear_attention", "moe", "full_attention", "moe"]}, "nemotron_h_moe")):
        standard = gguf_ext.standard_config({"model_type": "nemotron_h", **config})
        assert gguf_ext.gguf_arch(standard) == arch and standard["num_hidden_layers"] == len(standard["layer_types"])
    assert gguf_ext.gguf_arch(gguf_ext.standard_config({"model_type": "nemotron_h", "hybrid_override_pattern": "MX"})) == "nemotron_h"


def test_unsupported_family_fails_in_one_line_before_any_work(tmp_path, text_file):
    from transformers import RwkvConfig, RwkvForCausalLM

    directory = tmp_path / "rwkv"
    RwkvForCausalLM(RwkvConfig(hidden_size=32, num_hidden_layers=2, vocab_size=50)).save_pretrained(str(directory))
    result = CliRunner().invoke(convert_cmd, [str(directory), str(tmp_path / "x.claq"), "--calib", str(text_file)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "'rwkv' is not supported" in result.output and "gpt2" in result.output  # the supported types
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rwkv"]  # no output, no checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "xlstm"
    with pytest.raises(architectures.ArchitectureError, match="supported: .*llama"):
        architectures.family_of(type("C", (), config)())
    config["model_type"] = "dbrx"  # known, and refused with the reason
    with pytest.raises(architectures.ArchitectureError, match="'dbrx' is not supported: a mixture-of-experts .* mixtral"):
        architectures.family_of(type("C", (), config)())
    config["model_type"] = "deepseek_v4"
    with pytest.raises(architectures.ArchitectureError, match="'deepseek_v4' is not supported: .*hyper-connections"):
        architectures.family_of(type("C", (), config)())


@pytest.mark.parametrize("family, differ", [("gemma3_text", True), ("gpt_oss", True), ("gemma2", True),
                                            ("llama4_text", True), ("qwen3_next", False),
                                            ("ministral", True), ("gemma4_text", True),
                                            ("deepseek_v32", False)])
def test_each_layer_is_called_with_its_own_keywords(family, differ, tmp_path):
    """A sliding-window layer and a full one get different masks (and Gemma 3's and 4's global layers their own
    rotary table): the pass that feeds the layers records what transformers calls each layer with (Qwen3-Next
    reads each layer's type from the layer itself, through the stand-in; Gemma 4 passes each layer its own
    slice of the per-layer inputs, positionally; DeepSeek-V3.2's indexer needs the causal mask as a
    tensor, which its model always builds)."""
    from transformers import AutoModelForCausalLM

    directory = build_tiny_model(tmp_path / family, family=family)
    ids = torch.randint(2, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    called = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, args, kwargs: called.append(
            pipeline._as_keywords(m.forward, args[1:], kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)
        _, _, _, _, recorded = pipeline._first_layer_inputs(ModelSource(directory), ids, "cpu", 2)
    assert len(recorded) == len(called) == 2 and len(recorded[0]) == 1

    def tensors(value):
        return [value] if isinstance(value, torch.Tensor) else [t for v in value for t in tensors(v)] \
            if isinstance(value, (tuple, list)) else []
    for index, kwargs in enumerate(called):
        for name in ("attention_mask", "position_embeddings", "per_layer_input"):
            expected, got = tensors(kwargs.get(name)), tensors(recorded[index][0].get(name))
            assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected)), (index, name)
    if family == "gemma4_text":
        first, second = (recorded[i][0]["per_layer_input"] for i in (0, 1))
        assert first.shape == (2, 40, 8) and not torch.equal(first, second)
    first, second = (tensors(recorded[i][0].get("attention_mask")) + tensors(recorded[i][0]["position_embeddings"])
                     for i in (0, 1))
    assert differ == (len(first) != len(second) or not all(torch.equal(a, b) for a, b in zip(first, second)))


@pytest.mark.parametrize("converted_family", ["deepseek_v32"], indirect=True)
def test_the_sparse_attention_indexer_is_kept_raw(converted_family):
    """DeepSeek-V3.2's indexer only picks the keys each query attends to (8 of the 32 here, so its picks matter
    in the family test's logits), without gradients: stored raw like a router, beside the quantized attention."""
    _, directory, path, _ = converted_family
    assert json.loads((directory / "config.json").read_text())["index_topk"] < 32
    with reader.ClaqFile(path) as cf:
        for layer in range(2):
            prefix = f"model.layers.{layer}.self_attn."
            assert all(cf.tensors[f"{prefix}indexer.{n}.weight"]["kind"] == "raw"
                       for n in ("wq_b", "wk", "weights_proj"))
            assert all(cf.tensors[f"{prefix}{n}.weight"]["kind"] == "claq" for n in ("q_a_proj", "q_b_proj", "o_proj"))


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
    from claq_convert.format import gguf_ext

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


def test_conv1d_weights_are_quantized_and_applied_as_out_in(tmp_path, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from claq_convert.quantize.calibration import calibration_set
    from claq_convert.quantize.convert import apply_dequantized
    from claq_convert.quantize.pipeline import quantize_model
    from claq_convert.models.source import ModelSource

    directory = build_tiny_model(tmp_path / "gpt2", family="gpt2")
    source = ModelSource(directory)
    ids = calibration_set((text_file,), AutoTokenizer.from_pretrained(str(directory)), None, 4, 32)
    # GPT-2's model passes the layer its causal mask positionally: recorded under the parameter's name
    _, _, _, _, kwargs = pipeline._first_layer_inputs(source, ids, "cpu", 8)
    assert {"cache", "attention_mask", "position_ids"} <= set(kwargs[0][0])
    qc = QuantConfig(bits=4, quantize_embeddings=False)
    results = dict(quantize_model(source, ids, qc))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_dequantized(model, results)
    params = dict(model.named_parameters())
    assert len(results) == 8
    for name, result in results.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, Conv1D) and result.shape == (module.nf, module.nx)
        assert torch.equal(params[name], torch.from_numpy(result.dequantize()).T)
        # quantized, not scrambled: close to the original stored [in, out] weight
        assert torch.linalg.norm(params[name] - original[name]) < 0.2 * torch.linalg.norm(original[name])


def test_every_family_has_a_gguf_mapping_and_the_spec_lists_each():
    """A supported type the GGUF extension did not map would be refused after the whole conversion; the
    spec's table (formats/gguf-claq.md section 1) follows gguf_ext.GGUF_ARCH."""
    import re
    from pathlib import Path

    from claq_convert.format import gguf_ext

    # a vision-language release's file holds its text model, under the text config's type
    families = set(architectures.supported_model_types()) - set(architectures.LANGUAGE_MODELS)
    assert families == set(gguf_ext.GGUF_ARCH)
    spec = (Path(__file__).resolve().parents[1] / "formats" / "gguf-claq.md").read_text()
    header = spec.index("| `model_type` | llama.cpp architecture")
    table = spec[spec.index("\n", header):spec.index("## 2. Keys")]
    listed = {}
    for types, arch in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| (.+) \|$", table, re.M):
        for model_type in re.findall(r"`(\w+)`", types):
            named = re.fullmatch(r"`([\w-]+)`", arch)
            listed[model_type] = model_type if arch == "the same name" else named.group(1) if named else None
            assert named or arch == "the same name" or arch.startswith("none"), arch
    assert listed == gguf_ext.GGUF_ARCH


@pytest.mark.parametrize("converted_family", ["apertus"], indirect=True)
def test_stored_buffers_load_raw_and_nothing_else_poses_as_one(converted_family, tmp_path):
    """Apertus's xIELU keeps scalar constants as buffers its checkpoint stores: the file keeps them raw as
    shape [1] and load() gives them back their shape; a forged name is refused as before."""
    from test_format import rewrite

    _, _, path, _ = converted_family
    beta, up = "model.layers.0.mlp.act_fn.beta", "model.layers.0.mlp.up_proj.weight"
    with reader.ClaqFile(path) as cf:
        assert cf.tensors[beta]["kind"] == "raw" and cf.tensors[beta]["shape"] == [1]
        stored = float(cf.decode(beta)[0])
    model, _ = load(path)
    assert model.get_buffer(beta).shape == () and float(model.get_buffer(beta)) == stored

    def renamed(names: dict):
        def fn(header):  # the same entries in the same order, under other names
            header["tensors"] = {names.get(n, n): t for n, t in header["tensors"].items()}
        return fn

    computed = rewrite(path, tmp_path / "a.claq", renamed({beta: "model.rotary_emb.inv_freq"}))
    with pytest.raises(ValueError, match="no such tensor"):
        load(computed)
    swapped = rewrite(path, tmp_path / "b.claq", renamed({beta: up, up: beta}))  # the quantized entry comes first
    with pytest.raises(ValueError, match="a buffer of the model, stored quantized"):
        load(swapped)


def test_refused_types_are_real_and_not_supported():
    from transformers import CONFIG_MAPPING

    assert not set(architectures._REFUSED) & set(architectures.supported_model_types())
    assert all(t in CONFIG_MAPPING for t in list(architectures._REFUSED) + architectures.supported_model_types())


@pytest.mark.parametrize("converted_family", ["olmo", "nanochat"], indirect=True)
def test_a_model_left_without_parameters_still_generates(converted_family):
    """OLMo's and NanoChat's norms have no weights: with every linear and the embedding quantized, the model
    read back has no parameter, and transformers reads a model's device and dtype from its first one."""
    _, _, path, _ = converted_family
    model, tokenizer = load(path)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == [("device_anchor", (0,))]
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    ids = tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
