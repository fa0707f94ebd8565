"""Gemma 4: the per-layer embedding table is quantized as the input embedding is, the layers that attend over
an earlier layer's keys and values (E2B, E4B) are calibrated with the quantized model's keys and values, a
resumed conversion gets them back, and the unused projections the releases store for those layers are not
kept."""
import json

import pytest
import torch
from click.testing import CliRunner

from claq_convert.cli import convert_cmd
from claq_convert.format import reader
from claq_convert.models import architectures
from claq_convert.models.source import ModelSource
from claq_convert.quantize.checkpoint import SHARED, Checkpoint, checkpoint_dir
from claq_convert.quantize.convert import ConvertOptions, apply_dequantized, run_conversion
from claq_convert.quantize.pipeline import QuantConfig, quantize_model
from claq_convert.runtime.load import load
from claq_convert.runtime.modules import ClaqEmbedding

from conftest import build_tiny_model, full_forward_samples
from test_resume import interrupting

SHARED_FAMILY = "gemma4_text-shared"  # 4 layers, the last two reading layer 0's and layer 1's keys and values


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gemma4-shared"), family=SHARED_FAMILY)


def test_the_tiny_model_shares_keys_and_values(shared_dir):
    config = ModelSource(shared_dir).config()
    assert config.kv_sharing_modes == ["store", "store", "reuse", "reuse"]
    model = architectures.skeleton(config, "meta")
    arch = architectures.resolve(model, config)
    assert arch.groups(2)[0] == ("self_attn.q_proj",)  # no k_proj, no v_proj: it reads layer 0's
    assert arch.linears(2)[-2:] == ("per_layer_input_gate", "per_layer_projection")
    assert model.model.layers[2].mlp.gate_proj.out_features == 2 * model.model.layers[0].mlp.gate_proj.out_features


@pytest.mark.parametrize("pull", [0.0, 0.25])
def test_the_later_layers_are_calibrated_with_the_quantized_keys_and_values(pull, shared_dir):
    """The layers run one at a time from recorded keywords: the store the model makes for a batch travels with
    them, so a reading layer sees what the quantized storing layer stored, as the quantized model will (and the
    source layers of --toward-source keep a store of their own). The last layer's outputs in the pass are the
    outputs of the model with the quantized weights."""
    from transformers import AutoModelForCausalLM

    calibration = torch.randint(2, 200, (4, 24), generator=torch.Generator().manual_seed(3))
    seen = {}
    shared = {}

    def on_layer(index, states, *rest):
        seen[index] = torch.cat(states)
        shared[index] = rest

    qc = QuantConfig(bits=3.0, quantize_embeddings=False, toward_source=pull)
    results = dict(quantize_model(ModelSource(shared_dir), calibration, qc, batch_size=2, on_layer=on_layer))
    assert all(len(shared[i]) == 1 for i in range(4))  # the store, handed to the checkpoint after every layer
    assert [sorted(m) for m in shared[0][0][0]] == [["sliding_attention"]]
    assert [sorted(m) for m in shared[1][0][0]] == [["full_attention", "sliding_attention"]]
    model = AutoModelForCausalLM.from_pretrained(str(shared_dir), dtype=torch.float32).eval()
    apply_dequantized(model, results)
    outputs = []
    model.model.layers[-1].register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for batch in calibration.split(2):
            model(batch, use_cache=False)
    torch.testing.assert_close(seen[3], torch.cat(outputs), rtol=1e-5, atol=1e-5)


def test_the_source_layers_of_toward_source_read_the_source_keys_and_values(shared_dir, monkeypatch):
    """--toward-source runs a copy of each layer with its source weights beside the quantized one, from the same
    recorded keywords: it must keep a store of its own, or its reading layers would attend over the quantized
    model's keys and values (whichever pass stored last)."""
    import copy

    from transformers import AutoModelForCausalLM

    calibration = torch.randint(2, 200, (4, 24), generator=torch.Generator().manual_seed(3))

    def watch(layer, reads):
        if layer.self_attn.is_kv_shared_layer:
            layer.self_attn.register_forward_pre_hook(lambda m, args, kwargs: reads.append(
                (m.layer_type, kwargs["shared_kv_states"][m.layer_type][0].clone())), with_kwargs=True)

    expected = []
    model = AutoModelForCausalLM.from_pretrained(str(shared_dir), dtype=torch.float32).eval()
    for layer in model.model.layers:
        watch(layer, expected)
    with torch.no_grad():
        for batch in calibration.split(2):
            model(batch, use_cache=False)
    read = []
    deepcopy = copy.deepcopy

    def copied(value, *args, **kwargs):  # the pipeline's source layers: copies of the decoder layers
        out = deepcopy(value, *args, **kwargs)
        if type(value).__name__ == "Gemma4TextDecoderLayer":
            watch(out, read)
        return out
    monkeypatch.setattr(copy, "deepcopy", copied)
    qc = QuantConfig(bits=3.0, quantize_embeddings=False, toward_source=0.25)
    for _ in quantize_model(ModelSource(shared_dir), calibration, qc, batch_size=2):
        pass
    assert len(read) >= 4 and {kind for kind, _ in read} == {"sliding_attention", "full_attention"}
    for kind, keys in read:
        assert any(kind == k and torch.allclose(keys, e, rtol=1e-5, atol=1e-5) for k, e in expected), kind


def test_an_interrupted_conversion_resumes_with_the_stored_keys_and_values(shared_dir, text_file, tmp_path,
                                                                          monkeypatch):
    """Stopped after layer 1 (both storing layers done), the resumed run starts at a reading layer: the keys
    and values are in the checkpoint beside the hidden states, and the file is the uninterrupted one."""
    def args(out, *extra):
        return [str(shared_dir), str(out), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                "--bits", "3.1", *extra]

    for extra in ((), ("--toward-source", "0.25")):
        whole = tmp_path / f"whole{len(extra)}.claq"
        assert CliRunner().invoke(convert_cmd, args(whole, *extra)).exit_code == 0
        out = tmp_path / f"model{len(extra)}.claq"
        with monkeypatch.context() as patch:
            patch.setattr(Checkpoint, "finish_layer", interrupting(Checkpoint.finish_layer, at=2, after=True))
            assert CliRunner().invoke(convert_cmd, args(out, *extra)).exit_code == 130
        assert (checkpoint_dir(out) / "layer-00001" / SHARED).is_file()
        assert not (checkpoint_dir(out) / "layer-00000" / SHARED).exists()  # the newest holds all there is
        result = CliRunner().invoke(convert_cmd, args(out, *extra, "--resume"))
        assert result.exit_code == 0, result.output
        assert out.read_bytes() == whole.read_bytes()


def test_the_per_layer_embeddings_are_quantized_as_the_embedding_is(tmp_path, text_file):
    directory = build_tiny_model(tmp_path / "gemma4", family="gemma4_text")
    path = tmp_path / "model.claq"
    run_conversion(ConvertOptions(model_dir=directory, out=path, quant=QuantConfig(bits=4.0), calib=(text_file,),
                                  nsamples=4, seqlen=32))
    table = "model.embed_tokens_per_layer.weight"
    with reader.ClaqFile(path) as cf:
        assert cf.tensors[table]["kind"] == "claq" and cf.tensors[table]["shape"] == [320, 16]
        assert cf.tensors["model.embed_tokens.weight"]["kind"] == "claq"  # the tied head/embedding
        assert cf.tensors["model.per_layer_model_projection.weight"]["kind"] == "raw"
        widths = cf.metadata["conversion"]["tensors"][table]
    assert widths["nominal_bits"] == 6.0  # the head's target: two bits above the blocks'
    model, tokenizer = load(path)
    looked_up = model.model.embed_tokens_per_layer
    assert isinstance(looked_up, ClaqEmbedding) and float(looked_up.embed_scale) == pytest.approx(8 ** 0.5)
    ids = tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]
    with reader.ClaqFile(path) as cf, torch.no_grad():
        expected = torch.from_numpy(cf.decode(table))[ids] * 8 ** 0.5
        torch.testing.assert_close(looked_up(ids), expected)


def test_the_unused_projections_a_release_stores_are_not_kept(shared_dir, tmp_path, text_file):
    """E2B's and E4B's checkpoints keep k_proj, v_proj and their norms for the layers that read an earlier
    layer's keys and values; transformers ignores them on load, and so does the conversion: the file holds the
    model's tensors only, and loads."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "release-like"
    directory.mkdir()
    for item in shared_dir.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            (directory / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(shared_dir / "model.safetensors"))
    extra = {f"model.layers.{i}.self_attn.{n}.weight": torch.randn(s) for i in (2, 3)
             for n, s in (("k_proj", (32 if i == 2 else 64, 64)), ("v_proj", (32 if i == 2 else 64, 64)),
                          ("k_norm", (16 if i == 2 else 32,)))}
    save_file({**tensors, **extra}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    path = tmp_path / "model.claq"
    run_conversion(ConvertOptions(model_dir=directory, out=path, quant=QuantConfig(bits=4.0), calib=(text_file,),
                                  nsamples=4, seqlen=32))
    with reader.ClaqFile(path) as cf:
        assert not set(extra) & set(cf.tensors)
        assert set(cf.tensors) >= set(tensors) - {"lm_head.weight"}
    model, _ = load(path)
    assert model.config.num_kv_shared_layers == 2


def test_the_mixture_is_refused_in_one_line():
    config = json.loads(json.dumps({"model_type": "gemma4_text", "enable_moe_block": True}))
    with pytest.raises(architectures.ArchitectureError, match="experts beside the MLP"):
        architectures.family_of(type("C", (), config)())
    assert architectures.family_of(type("C", (), {**config, "enable_moe_block": False})()).name == "gemma4"


def test_self_sampling_counts_each_layers_cache_and_draws_what_full_forwards_draw(shared_dir):
    """The default calibration samples from the model with a preallocated cache, sized by the keys and values
    per layer: Gemma 4's config refuses a model-wide head size (its full layers have their own), so each
    layer's is counted; the reading layers attend over the stored keys and values as at a full forward."""
    from transformers import AutoModelForCausalLM

    from claq_convert.quantize import calibration

    model = AutoModelForCausalLM.from_pretrained(str(shared_dir), dtype=torch.float32).eval()
    # 2 sliding layers (2 key/value heads of 16) and 2 full ones (2 of 32), keys and values, float32, 16 tokens
    assert calibration.cache_bytes_per_sequence(model.config, 16) == 2 * (2 * 16 + 2 * 32) * 2 * 4 * 16
    first = torch.arange(2, model.config.vocab_size)
    tokens = calibration.sample_windows(model, first, nsamples=3, seqlen=16, seed=0)
    assert torch.equal(tokens, full_forward_samples(model, first, nsamples=3, seqlen=16, seed=0))
