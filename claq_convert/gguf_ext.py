"""GGUF extension (formats/gguf-claq-v1.md): the .claq data as standard GGUF tensors and keys.

A .claq section becomes one GGUF tensor of a standard GGML type with the same bytes: unsigned
integers are stored in the signed type of the same width (U8 -> I8, U16 -> I16, U32 -> I32), so the
conversion is lossless in both directions and no GGML type id is invented. `GgufClaqFile` reads such
a file through gguf-py with the same interface as `reader.ClaqFile`, so the NumPy and Torch decoders,
`load()` and `claq-inspect` take either format.
"""
from __future__ import annotations

import json
import mmap
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from . import spec
from .reader import BadHeader, ClaqFile, ClaqFormatError, check_claq_contents, decode_tensor

ARCH = "claq"
EXT_VERSION = 2                              # written; read: those of spec.WIDTHS_BY_VERSION (same widths)
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

# .claq dtype <-> GGML type with the same byte width and bit pattern.
_GGML_OF = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64", "I64": "I64", "I32": "I32", "I16": "I16",
            "I8": "I8", "U8": "I8", "U16": "I16", "U32": "I32"}


class GgufLimitError(ClaqFormatError):
    """The file breaks a limit of ggml's C reader (which gguf-py does not enforce)."""


# HF model_type -> llama.cpp's architecture name, whose tensor names and hyperparameter keys the file uses
# (OPT has none in llama.cpp: its tensors keep their Hugging Face names, and no hyperparameter keys are written).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "gpt_neox": "gptneox", "opt": None}


def gguf_name(hf_name: str, n_layers: int, base_arch: Optional[str] = "llama") -> str:
    """Standard GGUF tensor name of a Hugging Face parameter (gguf-py's own name map); a tensor the map does
    not know (or an architecture llama.cpp lacks) keeps its Hugging Face name."""
    import gguf

    stem, dot, suffix = hf_name.rpartition(".")
    if base_arch is not None and dot:
        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[base_arch]
        mapped = gguf.get_tensor_name_map(arch, n_layers).get_name(stem)
        if mapped is not None:
            return f"{mapped}.{suffix}"
    return hf_name


def _arch_keys(config: dict, arch: Optional[str]) -> dict:
    """llama.cpp's hyperparameter keys for the model, from its HF config (those the config has)."""
    import gguf

    if arch is None:
        return {}
    K = gguf.Keys
    heads = config.get("num_attention_heads")
    values = {K.LLM.CONTEXT_LENGTH: ("uint32", config.get("max_position_embeddings")),
              K.LLM.EMBEDDING_LENGTH: ("uint32", config.get("hidden_size")),
              K.LLM.BLOCK_COUNT: ("uint32", config.get("num_hidden_layers")),
              K.LLM.FEED_FORWARD_LENGTH: ("uint32", config.get("intermediate_size")),
              K.Attention.HEAD_COUNT: ("uint32", heads),
              K.Attention.HEAD_COUNT_KV: ("uint32", config.get("num_key_value_heads", heads)),
              K.Attention.LAYERNORM_RMS_EPS: ("float32", config.get("rms_norm_eps")),
              K.Attention.LAYERNORM_EPS: ("float32", config.get("layer_norm_eps")),
              K.Rope.DIMENSION_COUNT: ("uint32", config.get("head_dim") or (config["hidden_size"] // heads if heads else None)),
              K.LLM.VOCAB_SIZE: ("uint32", config.get("vocab_size")),
              K.Rope.FREQ_BASE: ("float32", config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta"))}
    return {key.format(arch=arch): (kind, value) for key, (kind, value) in values.items() if value is not None}


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
    obj = json.loads(rest)
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
    if model_type not in GGUF_ARCH:
        raise ValueError(f"the GGUF extension maps {', '.join(sorted(GGUF_ARCH))} models; this one is "
                         f"{model_type!r}: write a .claq file instead")


def claq_to_gguf(claq_path, gguf_path) -> Path:
    """Lossless .claq -> .gguf: every section becomes a GGUF tensor with the same bytes."""
    import gguf

    gguf_path = Path(gguf_path)
    with ClaqFile(claq_path) as cf:
        cf.validate()
        config = cf.metadata["config"]
        base = config.get("model_type", "llama")
        check_gguf_model_type(base)
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
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    writer.add_uint32(KEY_VERSION, EXT_VERSION)
    writer.add_string(KEY_BASE, base)
    for key, (kind, value) in _arch_keys(config, GGUF_ARCH[base]).items():
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
        stem = gguf_name(name, config["num_hidden_layers"], GGUF_ARCH[base])
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
            if ggml == "BF16":
                writer.add_tensor(target, data.view(np.uint8), raw_shape=data.shape,
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
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


class GgufClaqFile:
    """A CLAQ GGUF file read through gguf-py, with the interface of reader.ClaqFile."""

    def __init__(self, path):
        import gguf

        self.path = Path(path)
        self.size = self.path.stat().st_size
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except (ValueError, IndexError, OSError, KeyError) as exc:  # gguf-py's own parse errors
            raise BadHeader(f"not a readable GGUF file: {exc}") from None
        fields = self._reader.fields
        arch = self._string(gguf.Keys.General.ARCHITECTURE)
        if arch != ARCH:
            raise BadHeader(f"general.architecture is {arch!r}, not {ARCH!r}: not a CLAQ GGUF file")
        version = self._scalar(KEY_VERSION)
        if version not in spec.WIDTHS_BY_VERSION:
            raise BadHeader(f"CLAQ GGUF extension version {version}; this reader reads "
                            f"{', '.join(map(str, spec.WIDTHS_BY_VERSION))}")
        self.widths = spec.WIDTHS_BY_VERSION[version]
        try:
            table = json.loads(self._string(KEY_TENSORS))
            config = json.loads(self._string(KEY_CONFIG))
        except json.JSONDecodeError as exc:
            raise BadHeader(f"a claq.* key is not valid JSON: {exc.msg}") from None
        self.metadata = {"config": config,
                         "generation_config": json.loads(self._string(KEY_GENERATION)) if KEY_GENERATION in fields else None,
                         "conversion": json.loads(self._string(KEY_CONVERSION)) if KEY_CONVERSION in fields else {}}
        by_name = {t.name: t for t in self._reader.tensors}
        self._arrays, self.tensors = {}, {}
        for entry in table:
            name, stem, kind = entry["name"], entry["gguf"], entry["kind"]
            sections = {}
            for section, dtype in entry["dtypes"].items():
                target = stem if kind == spec.KIND_RAW else f"{stem}.{section}"
                if target not in by_name or dtype not in spec.DTYPES or _GGML_OF[dtype] != by_name[target].tensor_type.name:
                    raise BadHeader(f"tensor {name!r}: GGUF tensor {target!r} missing or of the wrong type")
                t = by_name[target]
                array = np.asarray(t.data).reshape(-1).view(spec.DTYPES[dtype])
                self._arrays[(name, section)] = (array, t)
                sections[section] = {"dtype": dtype, "shape": [int(array.size)] if kind != spec.KIND_RAW else entry["shape"],
                                     "length": int(t.n_bytes)}
            self.tensors[name] = {"kind": kind, "shape": entry["shape"], "sections": sections}
        self.files = {}
        if KEY_TOKENIZER_REST in fields:
            merges = self._strings(gguf.Keys.Tokenizer.MERGES) if gguf.Keys.Tokenizer.MERGES in fields else []
            try:
                self.files[HF_TOKENIZER_FILE] = rebuild_tokenizer_json(
                    self._string(KEY_TOKENIZER_REST), self._strings(gguf.Keys.Tokenizer.LIST), merges)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise BadHeader(f"{KEY_TOKENIZER_REST!r} is not a tokenizer.json object with a model") from None
        elif gguf.Keys.Tokenizer.HF_JSON in fields:
            self.files[HF_TOKENIZER_FILE] = self._string(gguf.Keys.Tokenizer.HF_JSON).encode("utf-8")
        for key in fields:
            if key.startswith(KEY_FILE_PREFIX):
                self.files[key[len(KEY_FILE_PREFIX):]] = self._file_bytes(key)
        self.alignment = int(self._scalar(gguf.Keys.General.ALIGNMENT)) if gguf.Keys.General.ALIGNMENT in fields else 32

    def _scalar(self, key):
        field = self._reader.fields.get(key)
        if field is None:
            raise BadHeader(f"missing GGUF key {key!r}")
        return field.contents()

    def _string(self, key) -> str:
        value = self._scalar(key)
        if not isinstance(value, str):
            raise BadHeader(f"GGUF key {key!r} is not a string")
        return value

    def _file_bytes(self, key) -> bytes:
        import gguf

        field = self._reader.fields[key]
        if field.types == [gguf.GGUFValueType.STRING]:
            return self._string(key).encode("utf-8")
        if field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8]:
            return bytes(np.concatenate([field.parts[i] for i in field.data]).astype(np.uint8)) if field.data else b""
        raise BadHeader(f"GGUF key {key!r} is neither a string nor an array of uint8")

    def _strings(self, key) -> list[str]:
        value = self._scalar(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadHeader(f"GGUF key {key!r} is not an array of strings")
        return value

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
            raise GgufLimitError(f"key {key!r} is a nested array, which ggml's reader refuses")
    expected = 0
    for t in reader.tensors:
        if len(t.name.encode()) > GGML_NAME_MAX:
            raise GgufLimitError(f"tensor name {t.name!r} is longer than {GGML_NAME_MAX} bytes")
        if len(t.shape) > GGML_MAX_DIMS:
            raise GgufLimitError(f"tensor {t.name!r} has {len(t.shape)} dimensions; ggml allows {GGML_MAX_DIMS}")
        relative = t.data_offset - reader.data_offset
        if relative != expected:
            raise GgufLimitError(f"tensor {t.name!r} is at data offset {relative}, ggml expects {expected}")
        expected = spec.align(relative + int(t.n_bytes), alignment)


def open_model_file(path):
    """ClaqFile or GgufClaqFile, chosen by the file's magic."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GgufClaqFile(path)
    return ClaqFile(path)

