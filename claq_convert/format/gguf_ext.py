"""GGUF extension (formats/gguf-claq.md): the .claq data as standard GGUF tensors and keys.

A .claq section becomes one GGUF tensor of a standard GGML type with the same bytes: unsigned
integers are stored in the signed type of the same width (U8 -> I8, U16 -> I16, U32 -> I32), so the
conversion is lossless in both directions and no GGML type id is invented. `GgufClaqFile` reads such
a file through gguf-py with the same interface as `reader.ClaqFile`, so the NumPy and Torch decoders,
`load()` and `claq-inspect` take either format.
"""
from __future__ import annotations

import json
import math
import mmap
import re
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from . import spec
from .reader import (BadHeader, BadLayout, BadMagic, ClaqFile, ClaqFormatError, TruncatedFile, UnsupportedVersion,
    brief_repr, check_claq_contents, check_file_name, check_tensor_entry, check_tensor_sections, decode_tensor,
    parse_json)

ARCH = "claq"
EXT_VERSION = spec.VERSION                   # written (the .claq version of its data); read: those of spec.WIDTHS_BY_VERSION
KEY_VERSION = "claq.version"
KEY_BASE = "claq.base_architecture"
KEY_CONFIG = "claq.config"                   # the HF config.json (JSON text)
KEY_GENERATION = "claq.generation_config"    # JSON text, or absent
KEY_CONVERSION = "claq.conversion"           # the conversion record (JSON text)
KEY_TENSORS = "claq.tensors"                 # JSON text: every tensor's source name, kind, shape, sections, dtypes
KEY_FILE_PREFIX = "claq.file."               # embedded files other than tokenizer.json: UTF-8 text as a
                                             # string, any other bytes (tokenizer.model) as an array of uint8
KEY_TOKENIZER_REST = "claq.tokenizer_json"   # tokenizer.json less the vocab and merges that tokenizer.ggml.* hold
HF_TOKENIZER_FILE = "tokenizer.json"         # rebuilt from KEY_TOKENIZER_REST, else under tokenizer.huggingface.json
GGML_NAME_MAX = 63                           # ggml's GGML_MAX_NAME is 64 bytes including the NUL
GGML_MAX_DIMS = 4
MAX_LAYERS = 4096                            # gguf-py's tensor name map grows with the layer count
GGUF_VERSIONS = (2, 3)                       # read (little-endian only); gguf-py writes 3
GGUF_DEFAULT_ALIGNMENT = 32
MAX_KV_ARRAY_ITEMS = 1 << 23                 # all KV arrays together: gguf-py spends ~10 us and ~0.7 KB on each
MAX_KV_STRING_BYTES = spec.MAX_FILE_BYTES    # one string value (a whole tokenizer.json at most)

# .claq dtype <-> GGML type with the same byte width and bit pattern.
_GGML_OF = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64", "I64": "I64", "I32": "I32", "I16": "I16",
            "I8": "I8", "U8": "I8", "U16": "I16", "U32": "I32"}


class GgufLimitError(ClaqFormatError):
    """The file breaks a limit of ggml's C reader (which gguf-py does not enforce)."""


# The rule (formats/gguf-claq.md section 5) a missing or mistyped value of each key breaks.
_KEY_RULES = {"general.architecture": "GGUF-K01", KEY_VERSION: "GGUF-K02", KEY_CONFIG: "GGUF-K03",
              KEY_GENERATION: "GGUF-K04", KEY_CONVERSION: "GGUF-K05", KEY_TENSORS: "GGUF-K06",
              "tokenizer.ggml.merges": "GGUF-F01", KEY_TOKENIZER_REST: "GGUF-F02", "tokenizer.ggml.tokens": "GGUF-F03",
              "tokenizer.huggingface.json": "GGUF-F04"}


# HF model_type -> llama.cpp's architecture name, whose tensor names and hyperparameter keys the file uses
# (where gguf-py 0.19 has none, as for OPT, the tensors keep their Hugging Face names, and no hyperparameter
# keys are written). formats/gguf-claq.md section 1 lists this table.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma4_text": "gemma4", "gemma4_unified_text": "gemma4", "phi3": "phi3", "gpt_neox": "gptneox", "gpt2": "gpt2",
             "opt": None, "olmo2": "olmo2", "olmo3": None, "granite": "granite", "stablelm": "stablelm",
             "smollm3": "smollm3", "helium": None, "cohere": "command-r", "cohere2": "cohere2", "exaone4": "exaone4",
             "seed_oss": "seed_oss", "ernie4_5": "ernie4_5", "arcee": "arcee", "nemotron": "nemotron", "apertus": "apertus",
             "starcoder2": "starcoder2", "phi": "phi2", "glm": "chatglm", "glm4": "glm4", "gptj": "gptj",
             "falcon": "falcon", "bloom": "bloom", "mpt": "mpt", "persimmon": None, "codegen": None, "xglm": None,
             "biogpt": None, "mixtral": "llama", "phimoe": "phimoe", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
             "olmoe": "olmoe", "glm4_moe": "glm4moe", "ernie4_5_moe": "ernie4_5-moe", "exaone_moe": "exaone-moe",
             "afmoe": "afmoe", "hunyuan_v1_moe": "hunyuan-moe", "cohere2_moe": None, "gpt_oss": "gpt-oss",
             "granitemoe": "granitemoe", "granitemoeshared": "granitemoe", "qwen3_next": "qwen3next",
             "qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe", "llama4_text": "llama4",
             "minimax_m2": "minimax-m2", "minimax": None, "dots1": "dots1", "jamba": "jamba",
             "granitemoehybrid": "granitehybrid", "falcon_h1": "falcon-h1", "lfm2": "lfm2",
             "nemotron_h": "nemotron_h",
             "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "glm4_moe_lite": "deepseek2",
             "deepseek_v32": "glm-dsa", "flex_olmo": None, "olmo_hybrid": None, "ministral": "llama", "ministral3": "mistral3",
             "internlm3": "llama", "vaultgemma": None, "hunyuan_v1_dense": "hunyuan-dense", "exaone": "exaone",
             "gpt_bigcode": "starcoder", "gpt_neo": None, "iquestcoder": "llama", "hyperclovax": None, "cwm": None,
             "flint": None, "granite_swa": None, "apertus1p5_text": None, "jais2": "jais2", "nanochat": None,
             "mimo_v2_flash": "mimo2", "mellum": None, "hy_v3": "hunyuan-moe", "olmo": "olmo", "mamba": "mamba",
             "falcon_mamba": "mamba", "mamba2": "mamba2", "diffllama": None, "bitnet": "bitnet"}


# types whose releases with expert layers are another llama.cpp architecture than the dense ones (its tensor
# names for the experts and the shared expert exist there only), and the layer types marking expert layers
GGUF_EXPERTS_ARCH = {"nemotron_h": ("nemotron_h_moe", "moe")}


def gguf_arch(config: dict) -> Optional[str]:
    """llama.cpp's architecture for a model of `config` (standard_config's): GGUF_ARCH's for its type, or
    GGUF_EXPERTS_ARCH's where its layers include expert layers (Nemotron 3's among Nemotron-H's)."""
    model_type = config.get("model_type")
    experts = GGUF_EXPERTS_ARCH.get(model_type)
    if experts is not None and experts[1] in (config.get("layer_types") or ()):
        return experts[0]
    return GGUF_ARCH[model_type]


def gguf_name(hf_name: str, n_layers: int, base_arch: Optional[str] = "llama") -> str:
    """Standard GGUF tensor name of a Hugging Face parameter (gguf-py's own name map); a tensor the map does
    not know (or an architecture llama.cpp lacks) keeps its Hugging Face name."""
    import gguf

    stem, dot, suffix = hf_name.rpartition(".")
    if base_arch is not None and dot:
        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[base_arch]
        # one expert's matrix: llama.cpp's name of the experts' stacked tensor, then the expert's index
        expert = _EXPERT.fullmatch(stem)
        keys, index = ([expert["stacked"] + expert["matrix"], expert["layer"] + "mlp.experts." + expert["matrix"]],
                       "." + expert["index"]) if expert else ([stem], "")
        names = gguf.get_tensor_name_map(arch, n_layers)
        # an expert under another module than mlp (GraniteMoE's block_sparse_moe) takes mlp's name if its own has none
        mapped = next((m for m in map(names.get_name, keys) if m is not None), None)
        if mapped is not None:
            return f"{mapped}{index}.{suffix}"
    return hf_name


_EXPERT = re.compile(r"(?P<stacked>(?P<layer>.+\.\d+\.).*experts\.)(?P<index>\d+)\.(?P<matrix>\w+)")


def standard_config(config: dict) -> dict:
    """The config with transformers' standard names filled in where the family's config class keeps its own
    (GPT-2: n_layer, n_embd, n_head, n_positions), from that class's attribute_map; and the layer count, where
    the config lists a type per layer instead (Nemotron-H's config.json has layers_block_type, its class
    derives num_hidden_layers from it)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    aliases = CONFIG_MAPPING[model_type].attribute_map if model_type in CONFIG_MAPPING else {}
    standard = {**{std: config[own] for std, own in aliases.items() if own in config}, **config}
    if model_type in CONFIG_MAPPING and not isinstance(standard.get("layer_types"), list):
        pattern = getattr(CONFIG_MAPPING[model_type], "_pattern_to_list", None)  # Nemotron-H's older configs
        if isinstance(standard.get("hybrid_override_pattern"), str) and callable(pattern):
            try:
                standard["layer_types"] = pattern(standard["hybrid_override_pattern"])
            except KeyError:  # a letter no layer type has: left for transformers to refuse
                pass
    if "num_hidden_layers" not in standard and isinstance(standard.get("layer_types"), list):
        standard["num_hidden_layers"] = len(standard["layer_types"])
    return standard


def _arch_keys(config: dict, arch: Optional[str]) -> dict:
    """llama.cpp's hyperparameter keys for the model, from its HF config (those the config has)."""
    import gguf

    if arch is None:
        return {}
    K = gguf.Keys
    heads = config.get("num_attention_heads")
    heads = heads if _is_count(heads) and heads else None
    hidden = config.get("hidden_size") if _is_count(config.get("hidden_size")) else None
    values = {K.LLM.CONTEXT_LENGTH: ("uint32", config.get("max_position_embeddings")),
              K.LLM.EMBEDDING_LENGTH: ("uint32", config.get("hidden_size")),
              K.LLM.BLOCK_COUNT: ("uint32", config.get("num_hidden_layers")),
              K.LLM.FEED_FORWARD_LENGTH: ("uint32", config.get("intermediate_size")),
              K.Attention.HEAD_COUNT: ("uint32", heads),
              K.Attention.HEAD_COUNT_KV: ("uint32", config.get("num_key_value_heads", heads)),
              K.Attention.LAYERNORM_RMS_EPS: ("float32", config.get("rms_norm_eps")),
              K.Attention.LAYERNORM_EPS: ("float32", config.get("layer_norm_eps", config.get("layer_norm_epsilon"))),
              K.Rope.DIMENSION_COUNT: ("uint32", config.get("head_dim") or (hidden // heads if heads and hidden else None)),
              K.LLM.VOCAB_SIZE: ("uint32", config.get("vocab_size")),
              K.LLM.EXPERT_COUNT: ("uint32", _first(config, "num_local_experts", "num_experts", "n_routed_experts",
                                                    "moe_num_experts")),
              K.LLM.EXPERT_USED_COUNT: ("uint32", _first(config, "num_experts_per_tok", "moe_k", "moe_topk")),
              K.LLM.EXPERT_FEED_FORWARD_LENGTH: ("uint32", config.get("moe_intermediate_size")),
              K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: ("uint32", config.get("shared_expert_intermediate_size")),
              K.Rope.FREQ_BASE: ("float32", config.get("rope_theta") or _rope_theta(config))}
    ok = {"uint32": _is_count, "float32": _is_float32}
    return {key.format(arch=arch): (kind, value) for key, (kind, value) in values.items() if ok[kind](value)}


def _first(config: dict, *keys: str):
    """The value of the first of `keys` the config has (families name one setting differently)."""
    return next((config[key] for key in keys if config.get(key) is not None), None)


def _rope_theta(config: dict):
    rope = config.get("rope_parameters")
    return rope.get("rope_theta") if isinstance(rope, dict) else None


def _is_count(value) -> bool:
    """A config value llama.cpp stores as UINT32 (informative keys: others are left out)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 32


def _is_float32(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= float(np.finfo(np.float32).max)


def _read_vocab(files: dict[str, bytes]):
    """(tokens, token types, gguf-py's SpecialVocab) from the HF tokenizer files; raises what gguf-py raises
    for a tokenizer it cannot read (the caller then stores tokenizer.json whole)."""
    from gguf.vocab import BpeVocab, SpecialVocab

    with tempfile.TemporaryDirectory(prefix="claq-gguf-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        tokens, _, types = zip(*BpeVocab(Path(tmp)).all_tokens())
        return list(tokens), [int(t) for t in types], SpecialVocab(Path(tmp), load_merges=True, n_vocab=len(tokens))


def _add_tokenizer(writer, vocab) -> tuple[list[str], list[str]]:
    """tokenizer.ggml.* (tokens, types, merges, special ids, chat template) from `_read_vocab`'s result.

    Returns the token list and the merges as written, from which `tokenizer_json_rest` works."""
    tokens, types, special = vocab
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")  # llama.cpp's pre-tokenizer ids are hashes we do not guess
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
    return tokens, list(special.merges)


# tokenizer.json's vocabulary and merges are the bulk of it, and tokenizer.ggml.tokens/merges already
# hold them: storing both would put the tokenizer in the file twice (about 2 MB for SmolLM2). So the
# GGUF keeps the rest of tokenizer.json and a reader puts the two back (formats/gguf-claq-v1.md, 2).

def rebuild_tokenizer_json(rest: str, tokens: list[str], merges: list[str]) -> bytes:
    """tokenizer.json from `claq.tokenizer_json` and the tokenizer.ggml.tokens/merges lists."""
    return _rebuild_tokenizer(json.loads(rest), tokens, merges)


def _rebuild_tokenizer(obj: dict, tokens: list[str], merges: list[str]) -> bytes:
    model = obj["model"]
    form = model["merges"]
    model["vocab"] = {token: i for i, token in enumerate(tokens)}
    model["merges"] = [m.split(" ", 1) for m in merges] if form == "pairs" else list(merges)
    return json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")


def tokenizer_json_rest(data: bytes, tokens: list[str], merges: list[str]) -> str | None:
    """`claq.tokenizer_json` for this tokenizer.json, or None when the rebuild would not give its exact bytes."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("merges"), list) or "vocab" not in model:
        return None
    model["vocab"] = None
    model["merges"] = "pairs" if model["merges"] and isinstance(model["merges"][0], list) else "strings"
    rest = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return rest if rebuild_tokenizer_json(rest, tokens, merges) == data else None


def check_gguf_model_type(model_type) -> None:
    if not isinstance(model_type, str) or model_type not in GGUF_ARCH:
        raise ValueError(f"the GGUF extension maps {', '.join(sorted(GGUF_ARCH))} models; this one is "
                         f"{brief_repr(model_type)}: write a .claq file instead")


def claq_to_gguf(claq_path, gguf_path) -> Path:
    """Lossless .claq -> .gguf: every section becomes a GGUF tensor with the same bytes."""
    import gguf

    gguf_path = Path(gguf_path)
    with ClaqFile(claq_path) as cf:
        cf.validate()
        config = cf.metadata.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{claq_path} has no model config in its metadata, which a GGUF file needs")
        base = config.get("model_type", "llama")
        check_gguf_model_type(base)
        layers = standard_config(config).get("num_hidden_layers")
        if not _is_count(layers) or layers > MAX_LAYERS:
            raise ValueError(f"{claq_path}: the config's num_hidden_layers {brief_repr(layers)} is not a count of "
                             f"layers (0 to {MAX_LAYERS})")
        tmp = gguf_path.with_name(f".{gguf_path.name}.tmp")
        try:
            _write_gguf(gguf, cf, config, base, tmp)
        except BaseException:  # an error or an interrupt leaves no partial file behind
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(gguf_path)
    return gguf_path


def _write_gguf(gguf, cf, config: dict, base: str, tmp: Path) -> None:
    """Everything of the CLAQ GGUF file into `tmp` (the caller renames it or removes it)."""
    from ..models.architectures import checkpoint_name

    writer = gguf.GGUFWriter(str(tmp), ARCH)
    writer.add_uint32(KEY_VERSION, EXT_VERSION)
    writer.add_string(KEY_BASE, base)
    standard = standard_config(config)
    arch = gguf_arch(standard)
    for key, (kind, value) in _arch_keys(standard, arch).items():
        getattr(writer, f"add_{kind}")(key, value)
    writer.add_string(KEY_CONFIG, json.dumps(config))
    if cf.metadata.get("generation_config") is not None:
        writer.add_string(KEY_GENERATION, json.dumps(cf.metadata["generation_config"]))
    writer.add_string(KEY_CONVERSION, json.dumps(cf.metadata.get("conversion", {})))
    files = {name: cf.file(name) for name in cf.files}
    if HF_TOKENIZER_FILE in files:
        try:
            vocab = _read_vocab(files)
        except Exception:  # gguf-py cannot read this tokenizer (its errors vary): stored whole, below
            vocab = None
        rest = None
        if vocab is not None:
            tokens, merges = _add_tokenizer(writer, vocab)
            rest = tokenizer_json_rest(files[HF_TOKENIZER_FILE], tokens, merges)
        if rest is not None:
            writer.add_string(KEY_TOKENIZER_REST, rest)
        else:  # not rebuilt exactly: the whole file, under gguf-py's standard key
            writer.add_string(gguf.Keys.Tokenizer.HF_JSON, files[HF_TOKENIZER_FILE].decode("utf-8"))
    for name, data in files.items():
        if name != HF_TOKENIZER_FILE:
            try:
                writer.add_string(KEY_FILE_PREFIX + name, data.decode("utf-8"))
            except UnicodeDecodeError:  # a binary file (a sentencepiece model): its bytes, exactly
                writer.add_key_value(KEY_FILE_PREFIX + name, list(data), gguf.GGUFValueType.ARRAY,
                                     gguf.GGUFValueType.UINT8)
    table = []
    for name, tensor in cf.tensors.items():
        stem = gguf_name(name, standard["num_hidden_layers"], arch)
        if stem == name:  # gguf-py may know the checkpoint's name only (Nemotron-H's backbone.layers)
            stored = checkpoint_name(base, name)
            mapped = gguf_name(stored, standard["num_hidden_layers"], arch)
            stem = mapped if mapped != stored else name
        dtypes = {s: e["dtype"] for s, e in tensor["sections"].items()}
        table.append({"name": name, "gguf": stem, "kind": tensor["kind"], "shape": tensor["shape"], "dtypes": dtypes})
        for section, array in cf.sections(name).items():
            target = stem if tensor["kind"] == spec.KIND_RAW else f"{stem}.{section}"
            if len(target.encode()) > GGML_NAME_MAX:
                raise ValueError(f"GGUF tensor name {target!r} is longer than ggml's {GGML_NAME_MAX} bytes")
            ggml = _GGML_OF[dtypes[section]]
            data = np.ascontiguousarray(array).view(spec.DTYPES[ggml] if ggml != "BF16" else np.uint16)
            if tensor["kind"] == spec.KIND_RAW:
                data = data.reshape(tensor["shape"])
            if ggml == "BF16":  # u16 bits: gguf-py keeps the shape (a u8 view would be read as a byte shape)
                writer.add_tensor(target, data, raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(target, data)
    writer.add_string(KEY_TENSORS, json.dumps(table))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_to_claq(gguf_path, claq_path) -> Path:
    """Lossless .gguf -> .claq (the inverse of claq_to_gguf)."""
    from .writer import ClaqWriter

    with GgufClaqFile(gguf_path) as gf, ClaqWriter(claq_path) as w:
        gf.validate()
        for name, tensor in gf.tensors.items():
            sections = gf.sections(name)
            if tensor["kind"] == spec.KIND_RAW:
                w.add_raw(name, sections["data"].reshape(tensor["shape"]), dtype=tensor["sections"]["data"]["dtype"])
            else:
                w.add_quantized(name, tensor["shape"][0], sections)
        for name in gf.files:
            w.add_file(name, gf.file(name))
        w.metadata.update(gf.metadata)
    return Path(claq_path)


def drop_mapped_pages(mapped: mmap.mmap | None, start: int, length: int) -> None:
    """madvise(DONTNEED) the whole pages of a read-only map covering [start, start + length)."""
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED") or length <= 0:
        return
    first = start - start % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, first, min(start + length, len(mapped)) - first)


class GgufTensorInfo(NamedTuple):
    name: str
    ggml_type: str           # GGML type name (one of _GGML_OF's values)
    dims: tuple[int, ...]    # as stored: fastest first
    offset: int              # from the start of the data region
    n_bytes: int


class GgufLayout(NamedTuple):
    version: int
    alignment: int
    data_offset: int
    kv_types: dict           # key -> (value type,) or (ARRAY, item type)
    tensors: list


def scan_gguf(path) -> GgufLayout:
    """Walk a GGUF header without trusting it, before gguf-py parses it: every count, length and type is
    checked against the file size and the GGUF value types before anything is allocated or looped over.

    gguf-py trusts them: a 2 KB file whose KV array claims 2**62 items keeps it looping, its memory
    growing, until it is killed. Here that file fails at once. Strings must be UTF-8, arrays must not nest
    (ggml refuses them), all arrays together hold at most MAX_KV_ARRAY_ITEMS items, tensors have at most
    GGML_MAX_DIMS dimensions, a GGML type a CLAQ section can have, and data inside the file.
    """
    import gguf

    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise TruncatedFile(f"{size} bytes is shorter than the 24-byte GGUF preamble", rule="GGUF-S01")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _GgufScan(data, size, gguf).run()


class _GgufScan:
    """The cursor of scan_gguf: reads fields as bytes copied out of the map (no views outlive it)."""

    def __init__(self, data, size: int, gguf):
        V = gguf.GGUFValueType
        self.data, self.size, self.pos, self.items = data, size, 0, 0
        self.STRING, self.ARRAY, self.UINT32 = int(V.STRING), int(V.ARRAY), int(V.UINT32)
        self.scalar = {int(v): n for v, n in ((V.UINT8, 1), (V.INT8, 1), (V.UINT16, 2), (V.INT16, 2), (V.UINT32, 4),
                                              (V.INT32, 4), (V.FLOAT32, 4), (V.BOOL, 1), (V.UINT64, 8), (V.INT64, 8),
                                              (V.FLOAT64, 8))}
        self.types = set(self.scalar) | {self.STRING, self.ARRAY}
        self.ggml = {int(gguf.GGMLQuantizationType[name]): name for name in set(_GGML_OF.values())}
        self.item_size = {name: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]
                          for name in self.ggml.values()}

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise TruncatedFile(f"GGUF {what} at byte {self.pos} runs past the end of the {self.size}-byte file",
                                rule="GGUF-S04")
        self.pos += n
        return self.pos - n

    def uint(self, n: int, what: str) -> int:
        start = self.take(n, what)
        return int.from_bytes(self.data[start:start + n], "little")

    def string(self, what: str) -> str:
        n = self.uint(8, f"{what} length")
        start = self.take(n, what)
        if n > MAX_KV_STRING_BYTES:
            raise BadHeader(f"GGUF {what} holds {n} bytes; at most {MAX_KV_STRING_BYTES} are allowed", rule="GGUF-S06")
        try:
            return self.data[start:start + n].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadHeader(f"GGUF {what} is not UTF-8 ({exc.reason} at byte {start + exc.start})",
                            rule="GGUF-S05") from None

    def value_type(self, what: str) -> int:
        vtype = self.uint(4, what)
        if vtype not in self.types:
            raise BadHeader(f"GGUF {what} is {vtype}, not a GGUF value type", rule="GGUF-S07")
        return vtype

    def value(self, vtype: int, what: str) -> tuple[tuple[int, ...], int]:
        """Skip one value of type `vtype`: its (types, start)."""
        start = self.pos
        if vtype == self.STRING:
            self.string(what)
            return (vtype,), start
        if vtype != self.ARRAY:
            self.take(self.scalar[vtype], what)
            return (vtype,), start
        itype = self.value_type(f"item type of {what}")
        if itype == self.ARRAY:
            raise GgufLimitError(f"{what} is a nested array, which ggml's reader refuses", rule="GGUF-S08")
        count = self.uint(8, f"item count of {what}")
        least = 8 if itype == self.STRING else self.scalar[itype]
        if count > (self.size - self.pos) // least:
            raise TruncatedFile(f"GGUF {what} claims {count} items, more than the rest of the file holds",
                                rule="GGUF-S04")
        self.items += count
        if self.items > MAX_KV_ARRAY_ITEMS:
            raise BadHeader(f"GGUF key arrays hold more than {MAX_KV_ARRAY_ITEMS} items (bulk data belongs in tensors)",
                            rule="GGUF-S09")
        if itype == self.STRING:
            for _ in range(count):
                self.string(f"item of {what}")
        else:
            self.take(count * least, what)
        return (vtype, itype), start

    def run(self) -> GgufLayout:
        magic = self.data[:4]
        if magic != b"GGUF":
            raise BadMagic(f"not a GGUF file (magic {magic!r})", rule="GGUF-S02")
        self.pos = 4
        version = self.uint(4, "version")
        if version not in GGUF_VERSIONS:
            endian = " (a big-endian file?)" if version and not version & 0xFFFF else ""
            raise UnsupportedVersion(f"GGUF version {version}{endian}; this reader reads little-endian versions "
                                     f"{' and '.join(map(str, GGUF_VERSIONS))}", rule="GGUF-S03")
        n_tensors, n_kv = self.uint(8, "tensor count"), self.uint(8, "key count")
        if n_kv > (self.size - self.pos) // 13 or n_tensors > (self.size - self.pos) // 24:
            raise TruncatedFile(f"GGUF header claims {n_kv} keys and {n_tensors} tensors, more than the "
                                f"{self.size}-byte file holds", rule="GGUF-S04")
        kv_types, starts = {}, {}
        for _ in range(n_kv):
            key = self.string("key name")
            if key in kv_types:
                raise BadHeader(f"GGUF key {brief_repr(key)} appears twice", rule="GGUF-S10")
            what = f"key {brief_repr(key)}"
            kv_types[key], starts[key] = self.value(self.value_type(f"type of {what}"), what)
        alignment = GGUF_DEFAULT_ALIGNMENT
        if "general.alignment" in kv_types:
            if kv_types["general.alignment"] != (self.UINT32,):
                raise BadHeader("GGUF key 'general.alignment' must be a UINT32", rule="GGUF-S11")
            at = starts["general.alignment"]
            alignment = int.from_bytes(self.data[at:at + 4], "little")
            if alignment == 0 or alignment & (alignment - 1):
                raise BadHeader(f"GGUF general.alignment {alignment} is not a power of two", rule="GGUF-S11")
        tensors, names = [], set()
        for _ in range(n_tensors):
            name = self.string("tensor name")
            if name in names:
                raise BadHeader(f"GGUF tensor {brief_repr(name)} appears twice", rule="GGUF-S12")
            names.add(name)
            what = f"tensor {brief_repr(name)}"
            n_dims = self.uint(4, f"dimension count of {what}")
            if n_dims > GGML_MAX_DIMS:
                raise GgufLimitError(f"{what} has {n_dims} dimensions; ggml allows {GGML_MAX_DIMS}", rule="GGUF-S13")
            dims = tuple(self.uint(8, f"dimensions of {what}") for _ in range(n_dims))
            ggml = self.uint(4, f"type of {what}")
            if ggml not in self.ggml:
                raise BadHeader(f"GGUF {what} has GGML type {ggml}; CLAQ sections and raw tensors use "
                                f"{', '.join(sorted(self.ggml.values()))}", rule="GGUF-S14")
            offset = self.uint(8, f"data offset of {what}")
            type_name = self.ggml[ggml]
            tensors.append(GgufTensorInfo(name, type_name, dims, offset, math.prod(dims) * self.item_size[type_name]))
        data_offset = spec.align(self.pos, alignment)
        for t in tensors:
            if data_offset + t.offset + t.n_bytes > self.size:
                raise BadLayout(f"GGUF tensor {brief_repr(t.name)}: {t.n_bytes} bytes at data offset {t.offset} run past "
                                f"the end of the {self.size}-byte file", rule="GGUF-S15")
        return GgufLayout(version, alignment, data_offset, kv_types, tensors)


_TABLE_KEYS = ("name", "gguf", "kind", "shape", "dtypes")


class GgufClaqFile:
    """A CLAQ GGUF file read through gguf-py, with the interface of reader.ClaqFile.

    The header is scanned first (scan_gguf); gguf-py parses only a file that passed. Opening checks every
    claq.* key and the tensor table against the GGUF tensors, as ClaqFile checks a .claq header."""

    def __init__(self, path):
        import gguf

        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.layout = scan_gguf(self.path)
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except (ValueError, IndexError, OSError, KeyError) as exc:  # not expected after the scan: kept as a net
            raise BadHeader(f"not a readable GGUF file: {brief_repr(str(exc))}") from None
        arch = self._string(gguf.Keys.General.ARCHITECTURE)
        if arch != ARCH:
            raise BadHeader(f"general.architecture is {brief_repr(arch)}, not {ARCH!r}: not a CLAQ GGUF file",
                            rule="GGUF-K01")
        version = self._scalar(KEY_VERSION, gguf.GGUFValueType.UINT32)
        if version not in spec.WIDTHS_BY_VERSION:
            raise BadHeader(f"CLAQ GGUF extension version {version}; this reader reads "
                            f"{', '.join(map(str, spec.WIDTHS_BY_VERSION))}", rule="GGUF-K02")
        self.version, self.widths = version, spec.WIDTHS_BY_VERSION[version]
        fields = self._reader.fields
        self.metadata = {"config": self._json_object(KEY_CONFIG),
                         "generation_config": self._json_object(KEY_GENERATION, null=True) if KEY_GENERATION in fields
                         else None,
                         "conversion": self._json_object(KEY_CONVERSION) if KEY_CONVERSION in fields else {}}
        self._arrays, self.tensors = {}, {}
        self._read_table(parse_json(self._string(KEY_TENSORS), f"GGUF key {KEY_TENSORS!r}"), version)
        self.files = self._read_files(gguf)
        self.alignment = self.layout.alignment

    def _read_table(self, table, version: int) -> None:
        """claq.tensors against the GGUF tensors: each entry's sections are GGUF tensors of the GGML type of
        their dtype and of the entry's shape; every GGUF tensor belongs to exactly one entry."""
        if not isinstance(table, list):
            raise BadHeader(f"GGUF key {KEY_TENSORS!r} must hold a JSON array", rule="GGUF-K06")
        by_name = {t.name: t for t in self._reader.tensors}
        owner: dict[str, str] = {}
        for index, entry in enumerate(table):
            if not isinstance(entry, dict) or set(entry) != set(_TABLE_KEYS):
                raise BadHeader(f"{KEY_TENSORS}[{index}]: needs exactly the keys {', '.join(_TABLE_KEYS)}",
                                rule="GGUF-T01")
            name, stem, kind, shape, dtypes = (entry[k] for k in _TABLE_KEYS)
            if not isinstance(name, str) or not isinstance(stem, str):
                raise BadHeader(f"{KEY_TENSORS}[{index}]: name and gguf must be strings", rule="GGUF-T02")
            if name in self.tensors:
                raise BadHeader(f"tensor {brief_repr(name)} is listed twice in {KEY_TENSORS}", rule="GGUF-T03")
            check_tensor_entry(name, kind, shape)
            if not isinstance(dtypes, dict) or not dtypes:
                raise BadHeader(f"tensor {brief_repr(name)}: dtypes must be an object naming its sections",
                                rule="GGUF-T04")
            if kind == spec.KIND_RAW and set(dtypes) != {"data"}:
                raise BadHeader(f"tensor {brief_repr(name)}: a raw tensor has one section 'data' of the tensor's shape",
                                rule="CLAQ-H17")
            sections, schema = {}, {}
            for section, dtype in dtypes.items():
                where = f"tensor {brief_repr(name)} section {brief_repr(section)}"
                if not isinstance(dtype, str) or dtype not in spec.DTYPES:
                    raise BadHeader(f"{where}: unknown dtype {brief_repr(dtype)}", rule="CLAQ-H11")
                target = stem if kind == spec.KIND_RAW else f"{stem}.{section}"
                t = by_name.get(target)
                if t is None:
                    raise BadHeader(f"{where}: GGUF tensor {brief_repr(target)} is missing", rule="GGUF-T05")
                if target in owner:
                    raise BadHeader(f"GGUF tensor {brief_repr(target)} belongs to {brief_repr(owner[target])} and {brief_repr(name)}",
                                    rule="GGUF-T06")
                owner[target] = name
                if t.tensor_type.name != _GGML_OF[dtype]:
                    raise BadHeader(f"{where}: GGUF tensor {brief_repr(target)} is {t.tensor_type.name}; a {dtype} section "
                                    f"is stored as {_GGML_OF[dtype]}", rule="GGUF-T07")
                dims = [int(d) for d in t.shape]
                if kind == spec.KIND_RAW and dims != shape[::-1]:
                    raise BadHeader(f"{where}: GGUF tensor {brief_repr(target)} has dimensions {dims}; the tensor's shape "
                                    f"{shape} needs {shape[::-1]} (fastest first)", rule="GGUF-T08")
                if kind != spec.KIND_RAW and len(dims) != 1:
                    raise BadHeader(f"{where}: GGUF tensor {brief_repr(target)} must be 1-D, it has dimensions {dims}",
                                    rule="GGUF-T09")
                array = np.asarray(t.data).reshape(-1).view(spec.DTYPES[dtype])
                section_shape = shape if kind == spec.KIND_RAW else dims
                if array.size != math.prod(section_shape):  # the scan bounds the bytes; this is the view's count
                    raise BadHeader(f"{where}: GGUF tensor {brief_repr(target)} holds {array.size} values, "
                                    f"not {section_shape}")
                self._arrays[(name, section)] = (array, t)
                sections[section] = {"dtype": dtype, "shape": section_shape, "length": int(t.n_bytes)}
                schema[section] = (dtype, section_shape)
            check_tensor_sections(name, kind, shape, schema, version)
            self.tensors[name] = {"kind": kind, "shape": shape, "sections": sections}
        for t in self._reader.tensors:
            if t.name not in owner:
                raise BadHeader(f"GGUF tensor {brief_repr(t.name)} belongs to no {KEY_TENSORS} entry", rule="GGUF-T10")

    def _read_files(self, gguf) -> dict[str, bytes]:
        fields, files = self._reader.fields, {}
        if KEY_TOKENIZER_REST in fields:
            merges = self._strings(gguf.Keys.Tokenizer.MERGES) if gguf.Keys.Tokenizer.MERGES in fields else []
            rest = parse_json(self._string(KEY_TOKENIZER_REST), f"GGUF key {KEY_TOKENIZER_REST!r}")
            model = rest.get("model") if isinstance(rest, dict) else None
            if not isinstance(model, dict) or model.get("merges") not in ("pairs", "strings"):
                raise BadHeader(f"GGUF key {KEY_TOKENIZER_REST!r} is not a tokenizer.json object whose model's merges "
                                "say 'pairs' or 'strings'", rule="GGUF-F02")
            files[HF_TOKENIZER_FILE] = _rebuild_tokenizer(rest, self._strings(gguf.Keys.Tokenizer.LIST), merges)
        elif gguf.Keys.Tokenizer.HF_JSON in fields:
            files[HF_TOKENIZER_FILE] = self._string(gguf.Keys.Tokenizer.HF_JSON).encode("utf-8")
        for key in fields:
            if key.startswith(KEY_FILE_PREFIX):
                name = key[len(KEY_FILE_PREFIX):]
                check_file_name(name)
                if name in files:
                    raise BadHeader(f"GGUF key {brief_repr(key)} repeats the embedded file {brief_repr(name)}",
                                    rule="GGUF-F05")
                files[name] = self._file_bytes(key)
                if not files[name]:
                    raise BadHeader(f"GGUF key {brief_repr(key)} holds an empty file", rule="GGUF-F07")
        return files

    def _scalar(self, key, vtype):
        field = self._reader.fields.get(key)
        if field is None:
            raise BadHeader(f"missing GGUF key {key!r}", rule=_KEY_RULES.get(key))
        if field.types != [vtype]:
            raise BadHeader(f"GGUF key {key!r} must be a {vtype.name}", rule=_KEY_RULES.get(key))
        return field.contents()

    def _string(self, key) -> str:
        import gguf

        return self._scalar(key, gguf.GGUFValueType.STRING)

    def _json_object(self, key, null: bool = False):
        value = parse_json(self._string(key), f"GGUF key {key!r}")
        if not isinstance(value, dict) and not (null and value is None):
            raise BadHeader(f"GGUF key {key!r} must hold a JSON object{' or null' if null else ''}",
                            rule=_KEY_RULES.get(key))
        return value

    def _file_bytes(self, key) -> bytes:
        import gguf

        field = self._reader.fields[key]
        if field.types == [gguf.GGUFValueType.STRING]:
            return self._string(key).encode("utf-8")
        if field.types in ([gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8], [gguf.GGUFValueType.ARRAY]) \
                and all(field.parts[i].dtype == np.uint8 for i in field.data):
            return bytes(np.concatenate([field.parts[i] for i in field.data])) if field.data else b""
        raise BadHeader(f"GGUF key {brief_repr(key)} is neither a string nor an array of uint8", rule="GGUF-F06")

    def _strings(self, key) -> list[str]:
        import gguf

        field = self._reader.fields.get(key)
        if field is None:
            raise BadHeader(f"missing GGUF key {key!r}", rule=_KEY_RULES.get(key))
        if field.types == [gguf.GGUFValueType.ARRAY] and not field.data:  # empty: gguf-py records no item type
            return []
        if field.types != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
            raise BadHeader(f"GGUF key {key!r} is not an array of strings", rule=_KEY_RULES.get(key))
        return field.contents()

    def sections(self, name: str, check_crc: bool = True, copy: bool = False) -> dict[str, np.ndarray]:
        """As ClaqFile.sections (GGUF has no checksums); `copy` also drops the mapped pages afterwards."""
        if name not in self.tensors:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        arrays = {section: self._arrays[(name, section)][0] for section in self.tensors[name]["sections"]}
        if copy:
            arrays = {section: np.array(a) for section, a in arrays.items()}
            self._release(name)
        return arrays

    def decode(self, name: str) -> np.ndarray:
        return decode_tensor(name, self.tensors[name], self.sections(name), widths=self.widths)

    def file(self, name: str) -> bytes:
        return self.files[name]

    def _release(self, name: str) -> None:
        """Drop the tensor's mapped pages from resident memory (they stay in the page cache)."""
        mapped = getattr(self._reader.data, "_mmap", None)  # gguf-py maps the file with np.memmap
        for section in self.tensors[name]["sections"]:
            t = self._arrays[(name, section)][1]
            drop_mapped_pages(mapped, int(t.data_offset), int(t.n_bytes))

    def stored_bytes(self, name: str) -> int:
        """Bytes of the tensor's GGUF tensors, each padded to the file's alignment."""
        return sum(spec.align(e["length"], self.alignment) for e in self.tensors[name]["sections"].values())

    def validate(self) -> None:
        """The CLAQ contents plus the limits of ggml's C reader."""
        check_ggml_limits(self._reader, self.alignment)
        for name, tensor in self.tensors.items():
            if tensor["kind"] == spec.KIND_CLAQ:
                check_claq_contents(name, tensor["shape"][0], self.sections(name), self.widths)

    def close(self) -> None:
        self._reader = None
        self._arrays = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_ggml_limits(reader, alignment: int) -> None:
    """Names under 64 bytes, at most 4 dims, contiguous aligned data, no nested KV arrays."""
    import gguf

    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.types) > 1 \
                and field.types[1] == gguf.GGUFValueType.ARRAY:
            raise GgufLimitError(f"key {key!r} is a nested array, which ggml's reader refuses", rule="GGUF-S08")
    expected = 0
    for t in reader.tensors:
        if len(t.name.encode()) > GGML_NAME_MAX:
            raise GgufLimitError(f"tensor name {t.name!r} is longer than {GGML_NAME_MAX} bytes", rule="GGUF-G01")
        if len(t.shape) > GGML_MAX_DIMS:
            raise GgufLimitError(f"tensor {t.name!r} has {len(t.shape)} dimensions; ggml allows {GGML_MAX_DIMS}",
                                 rule="GGUF-S13")
        relative = t.data_offset - reader.data_offset
        if relative != expected:
            raise GgufLimitError(f"tensor {t.name!r} is at data offset {relative}, ggml expects {expected}",
                                 rule="GGUF-G02")
        expected = spec.align(relative + int(t.n_bytes), alignment)


def open_model_file(path):
    """ClaqFile or GgufClaqFile, chosen by the file's magic."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GgufClaqFile(path)
    return ClaqFile(path)

