"""Run a model from a .claq file alone: config, tokenizer and weights all come from the file."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..format import spec
from ..format.gguf_ext import open_model_file
from ..format.reader import check_claq_contents, decode_tensor
from ..models.architectures import family_of, persistent_buffers, skeleton
from .modules import ClaqEmbedding, ClaqLinear, ClaqTiedHead


def _brief(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _tokenizer_from(cf):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="claq-tokenizer-") as tmp:
        for name in cf.files:
            (Path(tmp) / Path(name).name).write_bytes(cf.file(name))
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # the tokenizers library panics (a BaseException) on some bad files
            raise ValueError(f"the file's tokenizer cannot be loaded ({_brief(error)})") from None


def _set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(value, requires_grad=False))


# Config keys that count decoder layers. Some configs build a list a layer while they are made (Qwen2's
# layer_types): a file claiming 2**32 layers hung load() there (found by the fuzzer), before the count could
# be checked against the tensors (_check_layer_count), so a count beyond any model's is refused first.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
MAX_LAYERS = 1 << 16


# config.json spells the floats JSON lacks as {"__float__": "Infinity"} (transformers writes them so, and decodes
# them when it reads the file: a Mamba2 mixer's time_step_limit is (0, inf)); the file keeps config.json as it is
_SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _special_floats(value):
    """`value` (a config's JSON) with each tagged special float decoded, as transformers reads config.json."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("__float__"), str) and value["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[value["__float__"]]
        return {k: _special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_special_floats(v) for v in value]
    return value


def _config_from(meta):
    from transformers import AutoConfig

    if not isinstance(meta, dict) or not isinstance(meta.get("model_type"), str):
        raise ValueError("the file's metadata holds no model config with a model_type: it cannot be run")
    for key in LAYER_COUNT_KEYS:
        count = meta.get(key)
        if isinstance(count, (int, float)) and not isinstance(count, bool) and count > MAX_LAYERS:
            raise ValueError(f"the file's config claims {str(count)[:30]} decoder layers ({key}), more than any "
                             f"model has: its config is wrong")
    meta = _special_floats(meta)
    try:
        return AutoConfig.for_model(meta.pop("model_type"), **{k: v for k, v in meta.items() if k != "transformers_version"})
    except Exception as error:
        raise ValueError(f"the file's model config is not one transformers accepts ({_brief(error)})") from None


def _check_layer_count(config, family, names) -> None:
    """The config's decoder layers are the layers the file's tensors name, 0..n-1: a config claiming 2**63
    layers would otherwise build modules until memory runs out (found by the fuzzer)."""
    prefix = family.layers + "."
    indices = {n[len(prefix):].partition(".")[0] for n in names if n.startswith(prefix)}
    numbered = sorted(int(i) for i in indices if i.isdigit() and len(i) <= 9)
    claimed = getattr(config, "num_hidden_layers", None)
    if numbered != list(range(len(numbered))) or len(numbered) != len(indices) or claimed != len(numbered):
        raise ValueError(f"the file's config claims {str(claimed)[:30]} decoder layers but its tensors hold "
                         f"{len(indices)}: the file lacks tensors, or its config is wrong")


def _skeleton(config, device, dtype):
    family_of(config)  # an unsupported family fails here, in one line
    try:
        return skeleton(config, device, dtype)
    except Exception as error:
        raise ValueError(f"the file's model config does not build a model ({_brief(error)})") from None


def config_of(path):
    """The transformers config of a .claq/.gguf file (from its metadata) or of a Hugging Face directory."""
    if Path(path).is_file():
        with open_model_file(path) as cf:
            return _config_from(cf.metadata["config"])
    from ..models.source import ModelSource

    return ModelSource(path).config()  # a vision-language release's text config


def load(path, device="cpu", dtype: torch.dtype = torch.float32, cache: bool = False, kernels: str = "auto"):
    """(model, tokenizer) from a .claq (or CLAQ .gguf) file; quantized linears become ClaqLinear modules on `device`.

    `dtype` is the compute dtype of the raw tensors and of decoded weights. `cache` keeps each decoded
    weight after its first use (faster, but resident memory grows to the unquantized size). `kernels`:
    "auto" multiplies with the device's kernels (Numba on the CPU, Triton on CUDA), "torch" with the
    portable Torch decoder (modules.py).
    """
    from transformers import GenerationConfig

    device = torch.device(device)
    with open_model_file(path) as cf:
        config = _config_from(cf.metadata.get("config"))
        family = family_of(config)
        _check_layer_count(config, family, cf.tensors)
        model = _skeleton(config, device, dtype)
        parameters = dict(model.named_parameters(remove_duplicate=False))  # a tied head under both names
        buffers = persistent_buffers(model)
        for name, tensor in cf.tensors.items():
            target_tensor = parameters.get(name, buffers.get(name))
            if target_tensor is None:
                raise ValueError(f"{name}: a {config.model_type} model has no such tensor")
            if name in buffers and tensor["kind"] != spec.KIND_RAW:
                raise ValueError(f"{name}: a buffer of the model, stored quantized; only weights are quantized")
            shape = tuple(target_tensor.shape)
            if tensor["kind"] == spec.KIND_RAW and tuple(tensor["shape"]) != (shape or (1,)):  # a scalar is stored as [1]
                raise ValueError(f"{name}: file shape {tensor['shape']} does not fit the model's {shape}")
            sections = cf.sections(name, copy=True)  # owned arrays: nothing of the map stays resident
            if tensor["kind"] == spec.KIND_RAW:
                values = torch.from_numpy(decode_tensor(name, tensor, sections, copy=False)).reshape(shape)
                if name in parameters:
                    _set_parameter(model, name, values.to(device=device, dtype=dtype))
                else:
                    owner, _, leaf = name.rpartition(".")
                    kept = dtype if values.is_floating_point() else values.dtype  # an integer buffer stays one
                    model.get_submodule(owner).register_buffer(leaf, values.to(device=device, dtype=kept))
                continue
            module_name = name.removesuffix(".weight")
            target = model.get_submodule(module_name)
            linear_like = (torch.nn.Linear, family.linear_type(), torch.nn.Embedding)
            if not isinstance(target, linear_like) or not name.endswith(".weight"):
                raise ValueError(f"{name}: only the weight of a linear or an embedding can be quantized")
            # the file holds every quantized weight as [out, in]; a Conv1D keeps its own as [in, out]
            stored = tuple(parameters[name].shape)
            expected = stored[::-1] if family.transposed(name) else stored
            sections = check_claq_contents(name, tensor["shape"][0], sections, cf.widths)
            if isinstance(target, torch.nn.Embedding):
                replacement = ClaqEmbedding(tensor["shape"][0], sections, device=device, compute_dtype=dtype,
                                            cache=cache, scale=getattr(target, "embed_scale", None), kernels=kernels)
            else:
                bias = cf.decode(module_name + ".bias") if module_name + ".bias" in cf.tensors else None
                # x W^T + b with W [out, in]: a Conv1D's x @ W_stored + b as well
                replacement = ClaqLinear(tensor["shape"][0], sections, None if bias is None else torch.from_numpy(bias),
                                         device=device, compute_dtype=dtype, cache=cache, kernels=kernels)
            if expected != (replacement.out_features, replacement.in_features):
                raise ValueError(f"{name}: file shape {tensor['shape']} does not fit the model's {module_name}")
            owner, _, leaf = module_name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, replacement)
        if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in cf.tensors:
            embedding = model.get_input_embeddings()
            if isinstance(embedding, ClaqEmbedding):  # one stored table serves both ends
                model.set_output_embeddings(ClaqTiedHead(embedding))
            else:
                model.get_output_embeddings().weight = embedding.weight
        missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
        if missing:
            raise ValueError(f"the file lacks tensors the model needs: {', '.join(missing[:5])}")
        if next(model.parameters(), None) is None:
            # every weight quantized and norms without weights (OLMo, NanoChat): transformers reads a model's device
            # and dtype from its first parameter (generate, masks), so the model keeps an empty one for them
            model.register_parameter("device_anchor", torch.nn.Parameter(torch.empty(0, device=device, dtype=dtype),
                                                                          requires_grad=False))
        if cf.metadata.get("generation_config"):
            model.generation_config = GenerationConfig.from_dict(cf.metadata["generation_config"])
        tokenizer = _tokenizer_from(cf)
    return model.eval(), tokenizer
