"""Checkpoints released already quantized: FP8 with block scales and gpt-oss's MXFP4 experts read as the
values transformers' own dequantization gives, convert, and leave no trace of their format in the file;
every other quantized checkpoint is refused in one line before any work."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from claq_convert.cli import convert_cmd
from claq_convert.format import reader
from claq_convert.models import dequant
from claq_convert.models.source import ModelSource, SourceError, load_pretrained
from claq_convert.quantize.convert import ConvertOptions, run_conversion
from claq_convert.quantize.pipeline import QuantConfig

from conftest import build_tiny_model

FP8_BLOCK = [32, 32]


def _set_quantization(model_dir, quantization: dict) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization
    (model_dir / "config.json").write_text(json.dumps(config))


def _fp8_checkpoint(model_dir, block=FP8_BLOCK):
    """The tiny Llama's block linears as FP8 e4m3 with one float32 scale per block of rows and columns,
    as DeepSeek-V3's releases store them."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    for name in [n for n in tensors if ".layers." in n and n.endswith("proj.weight")]:
        W = tensors[name]
        scale = torch.rand(*dequant.fp8_scale_shape(W.shape, block), generator=torch.Generator().manual_seed(0)) / 64 + 1e-3
        expanded = scale.repeat_interleave(block[0], 0)[:W.shape[0]].repeat_interleave(block[1], 1)[:, :W.shape[1]]
        tensors[name] = (W / expanded).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    _set_quantization(model_dir, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": block})
    return tensors


def _mxfp4_checkpoint(model_dir):
    """The tiny gpt-oss's expert stacks as MXFP4 blocks and scales (random codes), as its releases store them."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = tensors.pop(name).shape  # gpt-oss holds them [E, in, out]; MXFP4 [E, out, in]
        groups = inputs // dequant.MXFP4_BLOCK
        tensors[name + "_blocks"] = torch.randint(0, 256, (experts, outputs, groups, 16), dtype=torch.uint8,
                                                  generator=generator)
        tensors[name + "_scales"] = torch.randint(118, 124, (experts, outputs, groups), dtype=torch.uint8,
                                                  generator=generator)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    _set_quantization(model_dir, {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                       "model.layers.*.mlp.router"]})
    return tensors


def test_fp8_weights_read_as_transformers_dequantizes_them(tmp_path):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    model_dir = build_tiny_model(tmp_path / "llama")
    tensors = _fp8_checkpoint(model_dir)
    source = ModelSource(model_dir)
    assert not any(n.endswith("_scale_inv") for n in source.names())
    name = "model.layers.1.mlp.down_proj.weight"  # [64, 160]: partial blocks of columns
    expected = _dequantize_fp8_weight(tensors[name].clone(), tensors[name + "_scale_inv"], FP8_BLOCK, torch.float32)
    assert source.shape(name) == (64, 160) and torch.equal(source.tensor(name), expected)
    model = load_pretrained(model_dir, dtype=torch.float32)  # what evaluation and sampling load
    params = dict(model.named_parameters())
    assert torch.equal(params[name], expected) and not any(p.is_meta for p in params.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as from_pretrained ties them
    assert load_pretrained(model_dir, dtype="auto").dtype == torch.float32  # the checkpoint's (a float32 one)


def test_mxfp4_experts_read_as_transformers_dequantizes_them(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model_dir = build_tiny_model(tmp_path / "gpt_oss", family="gpt_oss")
    tensors = _mxfp4_checkpoint(model_dir)
    source = ModelSource(model_dir)
    prefix = "model.layers.1.mlp.experts."
    gate_up = convert_moe_packed_tensors(tensors[prefix + "gate_up_proj_blocks"], tensors[prefix + "gate_up_proj_scales"],
                                         dtype=torch.float32)  # [E, in, out], as GptOssExperts holds it
    down = convert_moe_packed_tensors(tensors[prefix + "down_proj_blocks"], tensors[prefix + "down_proj_scales"],
                                      dtype=torch.float32)
    for e in range(4):
        assert torch.equal(source.tensor(f"{prefix}{e}.gate_proj.weight"), gate_up[e][:, 0::2].T)
        assert torch.equal(source.tensor(f"{prefix}{e}.up_proj.weight"), gate_up[e][:, 1::2].T)
        assert torch.equal(source.tensor(f"{prefix}{e}.down_proj.weight"), down[e].T)
        assert torch.equal(source.tensor(f"{prefix}{e}.up_proj.bias"), tensors[prefix + "gate_up_proj_bias"][e, 1::2])
    assert not any(n.endswith(("_blocks", "_scales", "gate_up_proj_bias")) for n in source.names())
    model = load_pretrained(model_dir, dtype=torch.float32)  # its experts unstacked, as converted
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts[2].gate_proj.weight, gate_up[2][:, 0::2].T)
    assert torch.equal(experts[3].down_proj.bias, tensors[prefix + "down_proj_bias"][3])
    assert not any(p.is_meta for p in model.parameters())
    ids = torch.randint(2, 200, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("family, make", [("llama", _fp8_checkpoint), ("gpt_oss", _mxfp4_checkpoint)])
def test_a_quantized_release_converts_and_the_file_keeps_no_trace_of_its_format(family, make, tmp_path, text_file):
    model_dir = build_tiny_model(tmp_path / family, family=family)
    make(model_dir)
    path = tmp_path / "m.claq"
    record = run_conversion(ConvertOptions(model_dir=model_dir, out=path, quant=QuantConfig(bits=4.1),
                                           calib=(text_file,), nsamples=4, seqlen=32))
    source = ModelSource(model_dir)
    with reader.ClaqFile(path) as cf:
        # bits per parameter over the model's parameters, not over scales or packed code bytes
        assert record["parameters"] == sum(int(np.prod(t["shape"])) for t in cf.tensors.values())
        assert "quantization_config" not in cf.metadata["config"]
        assert set(cf.tensors) == set(source.names()) | ({"lm_head.weight"} & set(cf.tensors))
        for name in [n for n in source.names() if cf.tensors[n]["kind"] == "claq"]:
            W = source.tensor(name).numpy()
            assert ((cf.decode(name) - W) ** 2).sum() < 0.1 * (W ** 2).sum(), name


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_a_checkpoint_quantized_otherwise_fails_in_one_line_before_any_work(method, tmp_path, text_file):
    model_dir = build_tiny_model(tmp_path / "llama")
    _set_quantization(model_dir, {"quant_method": method, "bits": 4})
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(convert_cmd, [str(model_dir), str(out / "m.claq"), "--calib", str(text_file)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"already quantized by '{method}'" in result.output and "unquantized release" in result.output
    assert not any(out.iterdir())


def test_fp8_weights_without_their_scales_are_refused(tmp_path):
    model_dir = build_tiny_model(tmp_path / "llama")
    tensors = _fp8_checkpoint(model_dir)
    del tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SourceError, match="q_proj.weight is stored in FP8 without a scale"):
        ModelSource(model_dir)
    tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"] = torch.ones(3, 3)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SourceError, match=r"q_proj.weight_scale_inv is \[3, 3\] for a \[64, 64\] weight"):
        ModelSource(model_dir)
