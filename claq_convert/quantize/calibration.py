"""Calibration token windows: from text files, sampled from the model itself, or a mix of both.

`--calib` takes one or more sources; the windows are split evenly between them (the remainder to the
first), or each names its count (SOURCE:N). A source is a text file (plain text, or JSONL with a "text"
field), `self`: sequences the model writes itself, LLM-QAT's data-free generation (a uniformly random
first token, then plain sampling at temperature 1), or a text every Python installation has
(`python-code`, `python-docs`). The default mixes the three and needs nothing beside the model and
Python: it carries over to other domains better than any one text (README, "Calibration").
"""
from __future__ import annotations

import inspect
import json
import sysconfig
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..data import DataError, tokenize_text
from ..progress import Progress, no_progress

SELF = "self"
# Texts every Python has, read from the running interpreter (PSF licence; nothing is downloaded or shipped):
PYTHON_CODE = "python-code"   # the standard library's top-level modules: source code
PYTHON_DOCS = "python-docs"   # pydoc's topics, the language reference in English prose
BUILTIN_TEXTS = (PYTHON_CODE, PYTHON_DOCS)
Source = Union[str, Path]
# What `claq-convert` calibrates on when no --calib is given, in shares of the windows: chosen by
# bench/calibration-permuted.json, where adding the two Python texts to 64 self-sampled windows cut the
# worst loss over four texts of other domains from 13.1% to 11.6% and the mean from 10.8% to 9.1%.
DEFAULT_SHARES = ((SELF, 4), (PYTHON_DOCS, 1), (PYTHON_CODE, 1))
DEFAULT_NSAMPLES = 96


def default_sources(nsamples: int = DEFAULT_NSAMPLES) -> tuple[str, ...]:
    """The default calibration of `nsamples` windows as SOURCE:N: DEFAULT_SHARES of them, the remainder to
    the first (96 windows: self:64, python-docs:16, python-code:16)."""
    total = sum(share for _, share in DEFAULT_SHARES)
    counts = [nsamples * share // total for _, share in DEFAULT_SHARES]
    counts[0] += nsamples - sum(counts)
    return tuple(f"{source}:{count}" for (source, _), count in zip(DEFAULT_SHARES, counts) if count > 0)


def read_text(path: Path) -> str:
    """A plain text file, or the "text" fields of a JSONL file (one JSON object per line) joined by blank lines."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; give a plain text or JSONL file") from None
    if path.suffix.lower() != ".jsonl":
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number} is not a JSON object; JSONL needs one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number} has no string field \"text\"")
        texts.append(record["text"])
    return "\n\n".join(texts)


def builtin_text(name: str) -> str:
    """The text of a built-in calibration source (BUILTIN_TEXTS), from this Python installation."""
    if name == PYTHON_DOCS:
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise DataError("this Python has no pydoc_data (the python-docs text); give a text file instead") from None
        return "\n\n".join(topics[key] for key in sorted(topics))
    if name == PYTHON_CODE:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        modules = sorted(stdlib.glob("*.py"))
        if not modules:
            raise DataError(f"no standard-library modules in {stdlib} (the python-code text); give a text file instead")
        return "\n\n".join(path.read_text(encoding="utf-8", errors="replace") for path in modules)
    raise DataError(f"unknown built-in text {name!r}; known: {', '.join(BUILTIN_TEXTS)}")


def parse_source(source: Source) -> tuple[Source, Optional[int]]:
    """(source, its window count or None) from `--calib` syntax: SOURCE or SOURCE:N."""
    text = str(source)
    name, colon, count = text.rpartition(":")
    if colon and count.isdigit() and name:
        if int(count) == 0:
            raise DataError(f"calibration source {text} asks for no windows")
        return (name if name in (SELF, *BUILTIN_TEXTS) else Path(name)), int(count)
    return source, None


def window_counts(sources: Sequence[Source], nsamples: int) -> tuple[list[Source], list[int]]:
    """The sources without counts, and the windows each gives: their own counts when every source has one
    (nsamples is then their sum), else nsamples split evenly (the remainder to the first)."""
    parsed = [parse_source(s) for s in sources]
    counted = [count for _, count in parsed if count is not None]
    if counted and len(counted) != len(parsed):
        raise DataError("give every calibration source a window count (SOURCE:N) or none")
    names = [source for source, _ in parsed]
    if counted:
        return names, counted
    if nsamples < len(sources):
        raise DataError(f"{nsamples} calibration windows cannot be split between {len(sources)} sources")
    return names, split_counts(nsamples, len(sources))


def self_windows(sources: Sequence[Source], nsamples: int) -> int:
    """How many of the windows these sources make are sampled from the model itself (window_counts)."""
    sources, counts = window_counts(sources, nsamples)
    return sum(count for source, count in zip(sources, counts) if str(source) == SELF)


def text_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, where: str = "the text") -> torch.Tensor:
    """`nsamples` random `seqlen`-token windows (seeded) of a token stream: LongTensor [nsamples, seqlen]."""
    if ids.numel() <= seqlen:
        raise DataError(f"{where} has {ids.numel()} tokens, fewer than one {seqlen}-token window")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def first_token_candidates(tokenizer, vocab_size: int) -> torch.Tensor:
    """Token ids a sampled sequence may start with: the whole vocabulary less the special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)
    if ids.numel() == 0:
        raise DataError("the tokenizer has no ordinary tokens to start a sampled sequence with")
    return ids


def sample_tokens(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of `logits` [n, vocab], drawn from its softmax (temperature 1) by inverse
    transform: a uniform u per row (from `gen`) picks the first token whose cumulative probability
    exceeds u (float64 sums). One random number a row: torch.multinomial draws an exponential for every
    token of the vocabulary, a sixth of the sampling time on SmolLM2."""
    probs = torch.softmax(logits.double().cpu(), dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    # side="right": the first token whose cdf exceeds u, never one of probability 0 (its cdf equals the previous)
    return torch.searchsorted(cdf, u, side="right")[:, 0].clamp_(max=probs.shape[1] - 1)


# Sequences sampled at once: 64 take 3.97 ms a token on SmolLM2 (2 cores, windows of 256 tokens), 32 take
# 5.23 ms; fewer where their KV cache (keys and values of every layer, in the sampler's dtype) would pass
# SAMPLING_CACHE_BYTES (a 16-bit 7B Llama at 512 tokens: 16; in fp32, 8).
SAMPLING_BATCH = 64
SAMPLING_CACHE_BYTES = 4 << 30


def cache_bytes_per_sequence(config, seqlen: int, dtype: torch.dtype = torch.float32) -> Optional[int]:
    """Keys and values of every layer for one sequence of `seqlen` tokens (None: the config does not say)."""
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(hidden, int) and heads > 0):
        return None
    per_layer = getattr(config, "per_layer_config", None)
    # transformers' heterogeneous configs (Gemma 4: a full layer's head size and key/value heads its own) refuse
    # the model-wide value of a size that varies: each layer's, summed
    each = [per_layer[i] for i in range(layers)] if per_layer is not None else [config] * layers
    total = 0
    for layer in each:
        kv_heads = getattr(layer, "num_key_value_heads", None) or heads
        head_dim = getattr(layer, "head_dim", None) or hidden // heads
        total += 2 * kv_heads * head_dim
    return total * seqlen * dtype.itemsize


def sampling_batch(config, seqlen: int, dtype: torch.dtype = torch.float32) -> int:
    """How many sequences sample_windows writes at once for a model of this config whose keys and values
    are `dtype` (1 to SAMPLING_BATCH)."""
    per_sequence = cache_bytes_per_sequence(config, seqlen, dtype)
    if per_sequence is None:
        return SAMPLING_BATCH
    return int(max(1, min(SAMPLING_BATCH, SAMPLING_CACHE_BYTES // max(per_sequence, 1))))


@torch.no_grad()
def sample_windows(model, first_tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int,
                   batch_size: Optional[int] = None, progress: Progress = no_progress) -> torch.Tensor:
    """`nsamples` sequences of `seqlen` tokens written by `model` itself (LLM-QAT's data-free generation).

    Each starts from a uniformly random first token and continues by plain sampling from the model's
    next-token distribution (temperature 1, no top-k/top-p; sample_tokens), with the KV cache,
    `batch_size` sequences at once (default: sampling_batch). The random stream is one seeded CPU
    generator, drawn batch after batch, so the result depends on the seed and the batch size, not on
    the device; the first n of a larger set are the set of n when n is a multiple of the batch size.
    """
    batch_size = batch_size or sampling_batch(model.config, seqlen, next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    # transformers 5 renamed past_key_values to cache; the cache is updated in place under either name
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    batches = [min(batch_size, nsamples - i) for i in range(0, nsamples, batch_size)]
    out = []
    steps = progress(range(len(batches) * (seqlen - 1)), "sample calibration text", len(batches) * (seqlen - 1))
    steps = iter(steps)
    for n in batches:
        tokens = torch.empty(n, seqlen, dtype=torch.long)
        tokens[:, 0] = first_tokens[torch.randint(0, first_tokens.numel(), (n,), generator=gen)]
        step_input, cache = tokens[:, :1].to(device), kv_cache(seqlen, model.config)
        for t in range(1, seqlen):
            result = model(step_input, use_cache=True, **({cache_arg: cache} if cache is not None else {}))
            if cache is None:  # the model made its own at the first step
                cache = result.past_key_values
            tokens[:, t] = sample_tokens(result.logits[:, -1], gen)
            step_input = tokens[:, t:t + 1].to(device)
            next(steps, None)
        out.append(tokens)
    for _ in steps:  # let a progress bar finish
        pass
    return torch.cat(out)


# layer types whose cache is keys and values (others, such as linear attention's recurrent state, are not)
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def kv_cache(capacity: int, config=None):
    """An empty KV cache for sequences of at most `capacity` tokens (of a model of `config`), or None where
    the model must make its own: layers of another kind (Qwen3.5's linear attention, Jamba's Mamba, MiniMax's
    lightning attention) keep a convolution or a recurrent state, in a cache class of the model's.

    transformers' DynamicCache grows by concatenation: every step copies all the keys and values so far,
    a sixth of the sampling time on SmolLM2 (32 windows of 512 tokens). Where transformers builds caches
    from layer classes (4.56+), each layer here writes into a buffer of `capacity` tokens and hands the
    attention a view of the part written: the same numbers, so the same samples (tests/test_calibration.py).
    """
    from transformers import DynamicCache

    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None) if config is not None else None
    if set(layer_types or ()) - set(ATTENTION_LAYER_TYPES):
        return None
    try:
        from transformers.cache_utils import Cache, DynamicLayer
    except ImportError:
        return DynamicCache()
    if "layer_class_to_replicate" not in inspect.signature(Cache.__init__).parameters:
        return DynamicCache()

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.written = 0
                shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
                self.key_buffer = key_states.new_empty(shape)
                self.value_buffer = value_states.new_empty((*shape[:-1], value_states.shape[-1]))
            end = self.written + key_states.shape[-2]
            if end > capacity:
                raise ValueError(f"the KV cache holds {capacity} tokens, not {end}")
            self.key_buffer[..., self.written:end, :] = key_states
            self.value_buffer[..., self.written:end, :] = value_states
            self.written = end
            self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
            return self.keys, self.values

    return Cache(layer_class_to_replicate=PreallocatedLayer)


def split_counts(nsamples: int, parts: int) -> list[int]:
    """nsamples split into `parts` near-equal counts, the remainder to the first ones."""
    each, extra = divmod(nsamples, parts)
    return [each + (1 if i < extra else 0) for i in range(parts)]


def describe(sources: Sequence[Source]) -> list[str]:
    return [SELF if str(s) == SELF else str(Path(s)) for s in sources]


def calibration_set(sources: Sequence[Source], tokenizer, load_model: Callable[[], torch.nn.Module],
                    nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                    progress: Progress = no_progress, vocab_size: Optional[int] = None) -> torch.Tensor:
    """LongTensor [windows, seqlen] from the given sources: `nsamples` split evenly between them, or the
    count each names (SOURCE:N; window_counts). A source is a file, `self` or a built-in text (BUILTIN_TEXTS).

    `load_model` is called only when a source is `self` (the full model is needed to sample from it).
    Each source draws from its own seed (seed + its position), so adding a source does not change the
    windows of the others.
    """
    if not sources:
        raise DataError("no calibration source given")
    sources, counts = window_counts(sources, nsamples)
    texts = {}  # every text read before the minutes of sampling, so a bad source fails first
    for position, source in enumerate(sources):
        if str(source) in BUILTIN_TEXTS:
            texts[position] = builtin_text(str(source))
        elif str(source) != SELF:
            path = Path(source)
            if not path.is_file():
                raise DataError(f"calibration source {path} is not a file; give a text/JSONL file, 'self', "
                                f"or one of {', '.join(BUILTIN_TEXTS)}")
            texts[position] = read_text(path)
    parts = []
    for position, (source, count) in enumerate(zip(sources, counts)):
        if position in texts:
            where = f"the {source} text" if str(source) in BUILTIN_TEXTS else str(source)
            parts.append(text_windows(tokenize_text(tokenizer, texts.pop(position)), count, seqlen, seed + position,
                                      where=where))
        else:
            model = load_model()
            vocab = vocab_size or model.get_output_embeddings().weight.shape[0]
            parts.append(sample_windows(model, first_token_candidates(tokenizer, vocab), count, seqlen,
                                        seed + position, progress=progress))
    return torch.cat(parts)
