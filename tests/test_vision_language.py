"""Vision-language releases (Qwen3.5, Gemma 3, Gemma 4, Gemma 4 Unified, Mistral 3, Llama 4): their language model converts to the very file that model
alone converts to, runs from it, and nothing of the vision tower is read."""
import numpy as np
import pytest
import torch

from claq_convert.format import reader
from claq_convert.models.architectures import LANGUAGE_MODELS
from claq_convert.models.source import ModelSource, load_pretrained
from claq_convert.quantize.convert import ConvertOptions, run_conversion
from claq_convert.quantize.pipeline import QuantConfig
from claq_convert.runtime.load import load

from conftest import FAMILY_CONFIGS, TEXT, build_tiny_model

VISION = {  # a one-block vision tower of each
    "qwen3_5": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                    temporal_patch_size=2, spatial_merge_size=2),
    "gemma3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                   patch_size=16),
    "gemma4": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16, patch_size=16, position_embedding_size=64),
    # an encoder-free release: its patches go straight through an embedder into the language model
    "gemma4_unified": dict(patch_size=16, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16,
                           output_proj_dims=64),
    "mistral3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                     patch_size=16, head_dim=16),
    "llama4": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                   patch_size=16, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64),
}
TEXT_TYPE = {"qwen3_5": "qwen3_5_text", "gemma3": "gemma3_text", "gemma4": "gemma4_text",
             "gemma4_unified": "gemma4_unified_text", "mistral3": "mistral", "llama4": "llama4_text"}


def build_release(directory, wrapper: str):
    """(a tiny vision-language release of `wrapper`, the directory of its language model saved alone)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    text_dir = build_tiny_model(directory / "text", family=TEXT_TYPE[wrapper])  # also the tokenizer
    text_config = AutoConfig.from_pretrained(str(text_dir)).to_dict()
    config = AutoConfig.for_model(wrapper, text_config=text_config, vision_config=VISION[wrapper],
                                  tie_word_embeddings=text_config.get("tie_word_embeddings", False))
    torch.manual_seed(1)
    release = AutoModelForImageTextToText.from_config(config)
    language = AutoModelForCausalLM.from_pretrained(str(text_dir), dtype=torch.float32)
    with torch.no_grad():  # the release's language model is the text model's (its modules' names vary by release)
        target = dict(release.named_parameters())
        for name, param in language.named_parameters():
            names = [old + name[len(new):] for old, new in LANGUAGE_MODELS[wrapper] if name.startswith(new)]
            found = [n for n in names if n in target]
            assert found, name
            target[found[0]].copy_(param)
    release.save_pretrained(str(directory / "release"))
    AutoTokenizer.from_pretrained(str(text_dir)).save_pretrained(str(directory / "release"))
    return directory / "release", text_dir


@pytest.mark.parametrize("wrapper", ["qwen3_5", "gemma3", "gemma4", "gemma4_unified", "mistral3", "llama4"])
def test_a_release_converts_to_the_file_its_language_model_converts_to(wrapper, tmp_path, text_file):
    release, text_dir = build_release(tmp_path, wrapper)
    source = ModelSource(release)
    assert source.config().model_type == TEXT_TYPE[wrapper]
    assert sorted(source.names()) == sorted(ModelSource(text_dir).names())  # no vision tensor is read
    paths = {}
    for name, directory in (("release", release), ("text", text_dir)):
        paths[name] = tmp_path / f"{name}.claq"
        run_conversion(ConvertOptions(model_dir=directory, out=paths[name], quant=QuantConfig(bits=4.1),
                                      calib=(text_file,), nsamples=4, seqlen=32))
    with reader.ClaqFile(paths["release"]) as a, reader.ClaqFile(paths["text"]) as b:
        assert a.metadata["config"]["model_type"] == TEXT_TYPE[wrapper]
        assert set(a.tensors) == set(b.tensors)
        for name in a.tensors:
            first, second = a.sections(name), b.sections(name)
            assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first), name
    model, tokenizer = load(paths["release"])
    ids = tokenizer(TEXT[:60], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    reference = load_pretrained(release)  # what evaluation and sampling load: the language model alone
    assert type(reference).__name__.endswith("ForCausalLM") and reference.config.model_type == TEXT_TYPE[wrapper]
