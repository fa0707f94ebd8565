"""A Hugging Face checkpoint directory read tensor by tensor from safetensors (no full model in RAM).

Every reader sees the model's own parameter names with float values, whatever layout the checkpoint
chose: a mixture whose experts are stored stacked (gpt-oss, GraniteMoE, a transformers 5 save) reads as
one matrix per expert, sliced expert by expert from the stacks; FP8 weights with their block scales and
gpt-oss's MXFP4 experts read as the values they stand for (dequant.py); a parameter stored in parts (OLMo
hybrid's convolution) reads as their concatenation. Tensors transformers' loading ignores (a multi-token
prediction layer past the decoder layers) are dropped once the model's names are known (check_checkpoint).
Other quantized checkpoints are refused: their stored numbers are not the weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, NamedTuple

import torch


class SourceError(Exception):
    """The model directory cannot be used; the message says why."""


HUB_CACHE_HINT = "download it first (huggingface-cli download NAME) or pass a model directory"


def resolve_model(model: str | Path) -> Path:
    """A model directory, or a Hugging Face hub id ("org/name") resolved from the local hub cache (offline)."""
    path = Path(model)
    if path.is_dir():
        return path
    text = str(model)
    if path.exists():
        raise SourceError(f"{text} is a file, not a model directory")
    if text.count("/") != 1 or text.startswith((".", "/")) or not all(text.split("/")):
        raise SourceError(f"{text}: no such model directory (a hub id looks like org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise SourceError(f"{text}: no such directory, and huggingface_hub is not installed to look it up") from None
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise SourceError(f"{text} is not in the local Hugging Face cache; {HUB_CACHE_HINT}") from None


def _check_safetensors(path: Path) -> None:
    """The header parses and the file holds every byte it declares (a truncated download fails here)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size or n > 100 * 1024 * 1024:
            raise SourceError(f"{path} is not a safetensors file (bad header length); re-download it")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError):
            raise SourceError(f"{path} has an unreadable safetensors header; re-download it") from None
    if 8 + n + end > size:
        raise SourceError(f"{path} is truncated: its header declares {8 + n + end} bytes, the file has {size}; "
                          "re-download it")


# quantization_config.quant_method values whose weights are read back here (dequant.py)
READABLE_QUANTIZATION = ("fp8", "mxfp4")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


class _View(NamedTuple):
    """A parameter the checkpoint stores in another form: its shape, and how to make it."""
    path: Path
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


class ModelSource:
    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise SourceError(f"{self.dir} is not a Hugging Face model directory (no config.json)")
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            files = {name: self.dir / f for name, f in json.loads(index.read_text())["weight_map"].items()}
            for path in set(files.values()):
                if not path.is_file():
                    raise SourceError(f"{path} is listed in the index but missing; re-download the model")
                _check_safetensors(path)
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            path = self.dir / "model.safetensors"
            _check_safetensors(path)
            with safe_open(str(path), framework="pt") as f:
                files = {name: path for name in f.keys()}
        else:
            raise SourceError(f"{self.dir} has no model.safetensors (pickle checkpoints are not read)")
        self._handles = {}
        # names as the model's modules have them (transformers renames some checkpoint keys on load)
        from .architectures import LANGUAGE_MODELS, language_model_name, module_name

        try:
            config = json.loads((self.dir / "config.json").read_text())
            self.wrapper = config.get("model_type") if config.get("model_type") in LANGUAGE_MODELS else None
            model_type = config["text_config"].get("model_type") if self.wrapper else config.get("model_type")
        except (json.JSONDecodeError, AttributeError, KeyError):
            raise SourceError(f"{self.dir / 'config.json'} is not a JSON object with a model type (and a "
                              "text_config, for a vision-language release)") from None
        language = {name: language_model_name(self.wrapper, name) for name in files}
        self._stored = {module_name(model_type, lm): name for name, lm in language.items() if lm is not None}
        self._paths = {name: files[stored] for name, stored in self._stored.items()}  # every stored tensor's file
        self.files = dict(self._paths)  # the model's parameters (and stored buffers) -> the file they come from
        self._views: dict[str, _View] = {}
        self._last_slice = None  # (name, index, tensor): an expert's gate_up stack slice serves its gate and up
        self._read_quantized(config.get("quantization_config"))
        self._read_stacked_experts(model_type)
        self._read_joined(model_type)

    def names(self) -> list[str]:
        return list(self.files)

    def hide(self, names) -> None:
        """Leave the stored tensors `names` unread from now on (what the model's own loading ignores)."""
        for name in names:
            self.files.pop(name, None)
            self._views.pop(name, None)

    def _read_quantized(self, quantization) -> None:
        """FP8 weights as views of their dequantized values; any other quantized checkpoint refused."""
        from . import dequant

        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        if quantization is not None and method not in READABLE_QUANTIZATION:
            raise SourceError(f"{self.dir} holds weights already quantized by {method!r}; claq-convert reads "
                              f"bf16/fp16/fp32 checkpoints, or {' and '.join(READABLE_QUANTIZATION)} ones: "
                              "convert from the unquantized release of the model")
        block = quantization.get("weight_block_size") if method == "fp8" else None
        for name in list(self.files):
            if self._dtype(name) not in _FP8_DTYPES:
                continue
            scale = name + "_scale_inv"
            if method != "fp8" or scale not in self.files:
                raise SourceError(f"{self.dir}: {name} is stored in FP8 without a scale (fine-grained FP8 "
                                  "checkpoints name it NAME_scale_inv); a quantized layout not read here")
            shape = self.shape(name)
            if len(shape) != 2 or self.shape(scale) not in (dequant.fp8_scale_shape(shape, block), (1,)):
                raise SourceError(f"{self.dir}: {scale} is {list(self.shape(scale))} for a {list(shape)} weight "
                                  f"in blocks of {block}; re-download the model")
            self._views[name] = _View(self._paths[name], shape, lambda n=name, s=scale: dequant.fp8_weight(
                self._read(n), self._read(s), block if self.shape(s) != (1,) else None))
            del self.files[scale]

    def _read_stacked_experts(self, model_type) -> None:
        """A mixture whose checkpoint stacks each layer's experts (transformers' in-memory layout, or gpt-oss's
        MXFP4 blocks and scales) read as one matrix per expert and linear, named as the model's unstacked
        experts name them (experts.py)."""
        from .architectures import family_for_type

        family = family_for_type(model_type)
        if family is None or family.experts is None:
            return
        pattern = re.compile(rf"({re.escape(family.layers)}\.\d+\.{re.escape(family.experts)})\.gate_up_proj(_blocks)?")
        for prefix in sorted({m[1] for n in list(self.files) if (m := pattern.fullmatch(n))}):
            self._stacked_views(prefix, family.stacking)

    def _read_joined(self, model_type) -> None:
        """Each layer parameter the family stores in parts (Family.joined) as a view of the parts concatenated
        along their first axis, which transformers does on load: whatever their sizes (a transformers 5.24 save
        splits OLMo hybrid's convolution in three near-equal chunks, its releases as q, k and v), only the whole
        is the module's parameter."""
        from .architectures import family_for_type

        family = family_for_type(model_type)
        for target, parts in family.joined if family is not None else ():
            pattern = re.compile(rf"({re.escape(family.layers)}\.\d+\.){re.escape(parts[0])}")
            for prefix in sorted({m[1] for n in list(self.files) if (m := pattern.fullmatch(n))}):
                names = tuple(prefix + part for part in parts)
                missing = [n for n in names if n not in self.files]
                if missing:
                    raise SourceError(f"{self.dir} stores {names[0]} without {', '.join(missing)}; an incomplete "
                                      "checkpoint")
                shapes = [self.shape(n) for n in names]
                if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
                    raise SourceError(f"{self.dir}: {', '.join(names)} are {', '.join(str(list(s)) for s in shapes)}, "
                                      "which do not concatenate into one parameter")
                shape = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
                self._views[prefix + target] = _View(self._paths[names[0]], shape, lambda ns=names: torch.cat(
                    [self.tensor(n) for n in ns]))
                for name in names:
                    del self.files[name]
                self.files[prefix + target] = self._paths[names[0]]

    def _stacked_views(self, prefix: str, stacking) -> None:
        from . import dequant
        from .experts import MATRICES, PLAIN, expert_shapes

        stored = {}  # matrix -> (the names it is read from, [E, out, in])
        for matrix in ("gate_up_proj", "down_proj"):
            name = f"{prefix}.{matrix}"
            if name + "_blocks" in self.files and name + "_scales" in self.files:
                experts, rows, groups, width = self.shape(name + "_blocks")
                if width * 2 != dequant.MXFP4_BLOCK or self.shape(name + "_scales") != (experts, rows, groups):
                    raise SourceError(f"{self.dir}: {name}_blocks and _scales are not MXFP4 stacks of one shape")
                stored[matrix] = ((name + "_blocks", name + "_scales"), (experts, rows, groups * dequant.MXFP4_BLOCK))
            elif name in self.files:
                shape = self.shape(name)
                if len(shape) != 3:
                    raise SourceError(f"{self.dir}: {name} is {list(shape)}, not a stack of expert matrices")
                out_in = (shape[0], shape[2], shape[1]) if stacking.transposed else shape
                stored[matrix] = ((name,), out_in)
            else:
                raise SourceError(f"{self.dir} stacks {prefix}'s experts without {matrix}; an incomplete checkpoint")
        try:
            experts, hidden, inner = PLAIN.shapes(stored["gate_up_proj"][1], stored["down_proj"][1])
        except ValueError as exc:
            raise SourceError(f"{self.dir}: {prefix} holds {exc}, which do not fit one another") from None
        biases = {m: f"{prefix}.{m}_bias" for m in ("gate_up_proj", "down_proj")} if stacking.biases else {}
        for m, name in biases.items():
            if name not in self.files or self.shape(name) != (experts, 2 * inner if m == "gate_up_proj" else hidden):
                raise SourceError(f"{self.dir}: {name} is missing or not [{experts}, ...] beside {prefix}'s experts")
        path = self._paths[stored["gate_up_proj"][0][0]]
        shapes = expert_shapes(hidden, inner)
        for e in range(experts):
            for matrix in MATRICES:
                stack = "down_proj" if matrix == "down_proj" else "gate_up_proj"
                part = MATRICES.index(matrix) if stack == "gate_up_proj" else None
                self._views[f"{prefix}.{e}.{matrix}.weight"] = _View(path, shapes[matrix], lambda s=stored[stack][0], e=e, p=part: (
                    self._expert_matrix(s, e, stacking) if p is None else stacking.split(self._expert_matrix(s, e, stacking))[p]))
                if biases:
                    self._views[f"{prefix}.{e}.{matrix}.bias"] = _View(path, shapes[matrix][:1], lambda b=biases[stack], e=e, p=part: (
                        self._slice(b, e) if p is None else stacking.split(self._slice(b, e))[p]))
        for names, _ in stored.values():
            for name in names:
                del self.files[name]
        for name in biases.values():
            del self.files[name]
        self.files.update({name: view.path for name, view in self._views.items()})

    def _expert_matrix(self, names: tuple[str, ...], e: int, stacking) -> torch.Tensor:
        """Expert e's matrix [out, in] of a stack: MXFP4 (blocks, scales) dequantized, else sliced and turned."""
        from . import dequant

        if len(names) == 2:
            return dequant.mxfp4_matrix(self._slice(names[0], e), self._slice(names[1], e))
        return stacking.oriented(self._slice(names[0], e))

    def _slice(self, name: str, index: int) -> torch.Tensor:
        """Entry `index` of the stored tensor `name` along its first axis (only those bytes are read)."""
        if self._last_slice is None or self._last_slice[:2] != (name, index):
            self._last_slice = (name, index, self._handle(name).get_slice(self._stored[name])[index])
        return self._last_slice[2]

    def _read(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(self._stored[name])

    def _dtype(self, name: str) -> str:
        return self._handle(name).get_slice(self._stored[name]).get_dtype()

    def _handle(self, name: str):
        from safetensors import safe_open

        path = self._paths.get(name)
        if path is None:
            raise SourceError(f"tensor {name!r} not found in {self.dir}")
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter `name` (a module's name), as the model holds it: a view's values, else the stored tensor."""
        view = self._views.get(name)
        return view.make() if view is not None else self._read(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The parameter's shape, from the file's header (nothing is read)."""
        view = self._views.get(name)
        if view is not None:
            return view.shape
        return tuple(self._handle(name).get_slice(self._stored[name]).get_shape())

    def config(self):
        """The transformers config of the model read here: a vision-language release's text config."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(self.dir))
        return config.get_text_config(decoder=True) if self.wrapper else config

    def config_dict(self) -> dict:
        """config.json as the file keeps it: the text config of a vision-language release, and without a
        quantization_config (an FP8/MXFP4 source's: the file's weights are CLAQ's, read as floats)."""
        if self.wrapper:
            config = self.config().to_dict()
        else:
            config = json.loads((self.dir / "config.json").read_text())
        config.pop("quantization_config", None)
        return config


def _config_json(model_dir: Path) -> dict:
    """config.json as a dict ({} where it cannot be read: ModelSource says why when it is needed)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def quantization_method(model_dir: Path):
    """config.json's quantization_config.quant_method (None for an unquantized checkpoint)."""
    quantization = _config_json(model_dir).get("quantization_config")
    return quantization.get("quant_method") if isinstance(quantization, dict) else None


def load_pretrained(model_dir: Path, dtype=torch.float32):
    """The checkpoint as a transformers model (AutoModelForCausalLM.from_pretrained) in `dtype` ("auto": the
    checkpoint's own). An FP8 or MXFP4 checkpoint, or a vision-language release, is built from its (text)
    config and filled with the values ModelSource reads (a mixture's experts unstacked, as converted):
    transformers would keep quantized weights quantized, or need accelerate and a GPU to dequantize them,
    and would build a release's whole vision-language model."""
    from transformers import AutoModelForCausalLM

    from .architectures import LANGUAGE_MODELS, persistent_buffers, skeleton

    if quantization_method(model_dir) is None and _config_json(model_dir).get("model_type") not in LANGUAGE_MODELS:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    source = ModelSource(model_dir)
    config = source.config()
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.bfloat16
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = skeleton(config, "cpu", dtype)
    state = {name: source.tensor(name).to(dtype) for name, _ in model.named_parameters()}
    state.update({name: source.tensor(name) for name in persistent_buffers(model) if name in source.files})
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def unused_tensors(model, names) -> list[str]:
    """The stored tensors among `names` that the model's own loading ignores (its classes'
    _keys_to_ignore_on_load_unexpected, regular expressions searched in a name, as transformers does), and
    that are neither a parameter nor a buffer of it: Gemma 4 E2B's and E4B's checkpoints keep k_proj, v_proj
    and their norms for the layers that attend over an earlier layer's keys and values instead."""
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    if not patterns:
        return []
    ignored = re.compile("|".join(f"({p})" for p in patterns))
    own = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    return [n for n in names if n not in own and ignored.search(n)]


def check_checkpoint(source: ModelSource) -> None:
    """Before any work: the model's family entry fits its module graph (architectures.resolve), and the
    checkpoint holds every parameter the model has, at its shape (under the family's renames). A checkpoint
    of another layout (a mixture saved with its experts stacked) fails here in one line, not hours in.
    Stored tensors the model's loading ignores (unused_tensors) are hidden from then on: the file does not
    keep them."""
    from .architectures import resolve, skeleton

    config = source.config()
    model = skeleton(config, "meta")
    resolve(model, config)
    source.hide(unused_tensors(model, source.names()))
    stored = set(source.names())
    for name, param in model.named_parameters():
        if name not in stored:
            raise SourceError(f"{source.dir} lacks {name}, which a {config.model_type} model has: a checkpoint "
                              "of another layout, or an incomplete one")
        if source.shape(name) != tuple(param.shape):
            raise SourceError(f"{source.dir}: {name} is {list(source.shape(name))} in the checkpoint, "
                              f"{list(param.shape)} in a {config.model_type} model of its config")
