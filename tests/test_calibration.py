"""Calibration sources: text windows, JSONL, self-sampled sequences, and their mix."""
import json

import pytest
import torch

from claq_convert.quantize import calibration
from claq_convert.data import DataError


class CharTokenizer:
    all_special_ids = [0, 1]

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % 256 for c in text]}


def no_model():
    raise AssertionError("text sources must not load the model")


def test_text_windows_are_seeded_slices_of_the_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    a = calibration.calibration_set([path], CharTokenizer(), no_model, nsamples=6, seqlen=100, seed=1)
    b = calibration.calibration_set([path], CharTokenizer(), no_model, nsamples=6, seqlen=100, seed=1)
    c = calibration.calibration_set([path], CharTokenizer(), no_model, nsamples=6, seqlen=100, seed=2)
    assert a.shape == (6, 100) and torch.equal(a, b) and not torch.equal(a, c)
    for row in a:  # each window is a contiguous slice
        assert torch.all((row[1:] - row[:-1]) % 26 == 1)


def test_jsonl_text_fields_are_read_and_bad_lines_named(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": "x" * 300, "id": i}) for i in range(3)) + "\n\n")
    assert calibration.read_text(path) == "\n\n".join(["x" * 300] * 3)
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:2 .*text"):
        calibration.read_text(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"t.jsonl:1 is not a JSON object"):
        calibration.read_text(path)


def test_short_or_missing_text_is_a_clear_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc")
    with pytest.raises(DataError, match="fewer than one"):
        calibration.calibration_set([path], CharTokenizer(), no_model, nsamples=1, seqlen=10)
    with pytest.raises(DataError, match="not a file"):
        calibration.calibration_set([tmp_path / "none.txt"], CharTokenizer(), no_model, nsamples=1, seqlen=10)
    with pytest.raises(DataError, match="cannot be split"):
        calibration.calibration_set([path, path, path], CharTokenizer(), no_model, nsamples=2, seqlen=1)


def test_split_counts_cover_every_window():
    assert calibration.split_counts(7, 3) == [3, 2, 2] and sum(calibration.split_counts(128, 2)) == 128


def test_self_sampling_is_seeded_and_starts_from_ordinary_tokens(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    first = calibration.first_token_candidates(tokenizer, model.config.vocab_size)
    assert not set(first.tolist()) & set(tokenizer.all_special_ids)
    a = calibration.sample_windows(model, first, nsamples=5, seqlen=12, seed=3, batch_size=2)
    b = calibration.sample_windows(model, first, nsamples=5, seqlen=12, seed=3, batch_size=2)
    assert a.shape == (5, 12) and torch.equal(a, b)
    assert set(a[:, 0].tolist()) <= set(first.tolist()) and int(a.max()) < model.config.vocab_size
    assert not torch.equal(a, calibration.sample_windows(model, first, 5, 12, seed=4, batch_size=2))


def test_sampled_tokens_follow_the_softmax_and_never_an_impossible_one():
    logits = torch.tensor([[2.0, 0.0, float("-inf"), -1.0, 1.0]])
    draws = calibration.sample_tokens(logits.expand(40000, 5), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert counts[2] == 0 and int(draws.max()) < 5
    torch.testing.assert_close(counts, torch.softmax(logits[0].double(), 0), atol=0.01, rtol=0)
    again = calibration.sample_tokens(logits.expand(40000, 5), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_the_sampling_batch_keeps_the_kv_cache_bounded():
    from transformers import LlamaConfig

    small = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    large = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32)
    assert calibration.sampling_batch(small, 512) == calibration.SAMPLING_BATCH == 64
    assert calibration.sampling_batch(large, 512) == 8  # 537 MB of fp32 keys and values a sequence, 4 GiB in all
    assert calibration.sampling_batch(large, 512, torch.bfloat16) == 16  # a 16-bit sampler's cache is half that
    assert calibration.sampling_batch(object(), 512) == calibration.SAMPLING_BATCH  # no shapes to go by


def test_the_default_batch_counts_the_cache_in_the_samplers_dtype(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).eval()
    first = torch.arange(2, model.config.vocab_size)
    per_sequence_fp32 = calibration.cache_bytes_per_sequence(model.config, 10)
    monkeypatch.setattr(calibration, "SAMPLING_CACHE_BYTES", 2 * per_sequence_fp32)  # fp32: 2 at once; bf16: 4
    assert calibration.sampling_batch(model.config, 10) == 2
    assert calibration.sampling_batch(model.config, 10, torch.bfloat16) == 4
    default = calibration.sample_windows(model, first, nsamples=4, seqlen=10, seed=3)
    assert torch.equal(default, calibration.sample_windows(model, first, nsamples=4, seqlen=10, seed=3, batch_size=4))
    assert not torch.equal(default, calibration.sample_windows(model, first, nsamples=4, seqlen=10, seed=3, batch_size=2))


def test_the_first_batches_of_a_larger_sample_are_the_smaller_sample(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    first = torch.arange(2, model.config.vocab_size)
    six = calibration.sample_windows(model, first, nsamples=6, seqlen=10, seed=1, batch_size=3)
    assert torch.equal(six[:3], calibration.sample_windows(model, first, nsamples=3, seqlen=10, seed=1, batch_size=3))


def test_the_preallocated_kv_cache_samples_what_the_growing_one_samples(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    first = torch.arange(2, model.config.vocab_size)
    try:  # transformers 4.56+: the preallocated layers are what is tested here
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        DynamicLayer = None
    if DynamicLayer is not None:
        assert issubclass(calibration.kv_cache(40).layer_class_to_replicate, DynamicLayer)
    preallocated = calibration.sample_windows(model, first, nsamples=6, seqlen=40, seed=5, batch_size=3)
    monkeypatch.setattr(calibration, "kv_cache", lambda capacity, config=None: DynamicCache())
    assert torch.equal(preallocated, calibration.sample_windows(model, first, nsamples=6, seqlen=40, seed=5,
                                                                batch_size=3))


@pytest.mark.parametrize("family", ["qwen3_5_text", "jamba", "minimax", "mamba", "mamba2", "granitemoehybrid",
                                    "falcon_h1", "lfm2", "nemotron_h"])
def test_a_model_with_recurrent_layers_samples_with_a_cache_of_its_own(family, tmp_path):
    """Linear-attention, Mamba and short-convolution layers keep a convolution or a recurrent state, not keys and values:
    sampling lets the model make its own cache (MiniMax refuses any other class), and the samples are
    the ones a full forward at every step would draw."""
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model, full_forward_samples

    directory = build_tiny_model(tmp_path / family, family=family)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    assert calibration.kv_cache(16, model.config) is None
    first = torch.arange(2, model.config.vocab_size)
    tokens = calibration.sample_windows(model, first, nsamples=3, seqlen=16, seed=0)
    assert tokens.shape == (3, 16) and 0 <= int(tokens.min()) and int(tokens.max()) < model.config.vocab_size
    assert torch.equal(tokens, full_forward_samples(model, first, nsamples=3, seqlen=16, seed=0))


def test_the_preallocated_kv_cache_refuses_more_than_it_holds():
    cache = calibration.kv_cache(4)
    if getattr(cache, "layer_class_to_replicate", None) is None:
        pytest.skip("this transformers has no cache layer classes: the growing cache is used")
    keys = torch.zeros(1, 2, 3, 8)
    cache.update(keys, keys, 0)
    with pytest.raises(ValueError, match="holds 4 tokens, not 6"):
        cache.update(keys, keys, 0)


def test_sources_mix_evenly_and_self_loads_the_model_once(tiny_model_dir, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    loads = []

    def load():
        loads.append(1)
        return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()

    mixed = calibration.calibration_set([calibration.SELF, text_file], tokenizer, load, nsamples=5, seqlen=16, seed=0)
    text_only = calibration.calibration_set([text_file], tokenizer, no_model, nsamples=2, seqlen=16, seed=1)
    assert mixed.shape == (5, 16) and len(loads) == 1
    assert torch.equal(mixed[3:], text_only)  # the text part: the same windows as that text alone at its seed


def test_builtin_texts_come_from_this_python():
    code, docs = calibration.builtin_text(calibration.PYTHON_CODE), calibration.builtin_text(calibration.PYTHON_DOCS)
    assert "def " in code and "import " in code and len(code) > 100_000
    assert "statement" in docs and len(docs) > 100_000
    with pytest.raises(DataError, match="unknown built-in"):
        calibration.builtin_text("python-poetry")


def test_sources_may_name_their_window_counts(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    assert calibration.parse_source("self:64") == ("self", 64)
    assert calibration.parse_source(f"{path}:3") == (path, 3)
    assert calibration.parse_source("python-code") == ("python-code", None)
    assert calibration.window_counts(["self:5", f"{path}:2"], 64) == (["self", path], [5, 2])
    assert calibration.window_counts(["self", path], 5) == (["self", path], [3, 2])
    with pytest.raises(DataError, match="every calibration source"):
        calibration.window_counts(["self:5", path], 64)
    with pytest.raises(DataError, match="no windows"):
        calibration.parse_source("self:0")
    windows = calibration.calibration_set([f"{path}:3", "python-code:2"], CharTokenizer(), no_model, nsamples=64,
                                          seqlen=50)
    assert windows.shape == (5, 50)  # the counts, not nsamples
    assert torch.all((windows[:3, 1:] - windows[:3, :-1]) % 26 == 1)  # the file's part first


def test_a_bad_source_fails_before_the_model_is_sampled(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        calibration.calibration_set([calibration.SELF, tmp_path / "missing.txt"], CharTokenizer(), no_model,
                                    nsamples=4, seqlen=8)


@pytest.mark.parametrize("stored, expected", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.bfloat16)])
def test_the_sampler_keeps_the_checkpoints_size(tiny_model_dir, tmp_path, stored, expected):
    """Self-sampling holds the whole model: in the checkpoint's own dtype, never upcast (fp16 as bfloat16 on
    the CPU, the same size); and it samples ordinary tokens in that dtype."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from claq_convert.quantize.convert import load_sampler

    directory = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=stored).save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, directory / name)
    model = load_sampler(directory, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {expected}
    first = calibration.first_token_candidates(AutoTokenizer.from_pretrained(str(directory)), model.config.vocab_size)
    windows = calibration.sample_windows(model, first, nsamples=2, seqlen=8, seed=0)
    assert windows.shape == (2, 8) and int(windows.min()) >= 0 and int(windows.max()) < model.config.vocab_size
