"""Bad input and faults: one clear line and exit 1, before the expensive work, and no file left behind."""
import json
import shutil

import pytest
from click.testing import CliRunner

from claq_convert.format import gguf_ext
from claq_convert.cli import convert_cmd, eval_cmd
from claq_convert.models.source import SourceError, resolve_model


def one_line_failure(result, *needles):
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output


def copy_model(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_truncated_weights_fail_before_any_work(tiny_model_dir, text_file, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = CliRunner().invoke(convert_cmd, [str(model), str(tmp_path / "x.claq"), "--calib", str(text_file)])
    one_line_failure(result, "truncated", "re-download")
    assert not list(tmp_path.glob("*.claq*")) and not list(tmp_path.glob(".x.claq*"))


@pytest.mark.parametrize("option", [["--outlier-bits", "nan"], ["--bits", "inf"], ["--bpw", "nan"]])
def test_non_finite_numbers_are_refused(tiny_model_dir, tmp_path, option):
    result = CliRunner().invoke(convert_cmd, [str(tiny_model_dir), str(tmp_path / "x.claq"), *option])
    one_line_failure(result, "finite")


def test_the_fixed_rule_and_the_allocation_are_not_mixed(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(convert_cmd, [str(tiny_model_dir), str(tmp_path / "x.claq"), "--bits", "4",
                                              "--bpw", "4.6"])
    one_line_failure(result, "give one of them")
    assert not list(tmp_path.glob("*.claq*"))


def test_missing_output_directory_is_not_created(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(convert_cmd, [str(tiny_model_dir), str(tmp_path / "no" / "such" / "x.claq")])
    one_line_failure(result, "does not exist")
    assert not (tmp_path / "no").exists()


def test_hub_ids_resolve_from_the_local_cache_only(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="not in the local Hugging Face cache"):
        resolve_model("someone/tiny-model")
    repo = cache / "models--someone--tiny-model"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    assert (resolve_model("someone/tiny-model") / "config.json").is_file()
    with pytest.raises(SourceError, match="no such model directory"):
        resolve_model("not-a-dir")
    result = CliRunner().invoke(eval_cmd, ["nobody/nothing"])
    one_line_failure(result, "not in the local Hugging Face cache")


def test_a_tokenizer_gguf_py_cannot_read_is_stored_whole(tiny_model_dir, text_file, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["decoder"] = None  # a ByteLevel BPE without a decoder: gguf-py's BpeVocab raises TypeError
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(convert_cmd, [str(model), str(out), "--calib", str(text_file), "--nsamples", "2",
                                              "--seqlen", "32"])
    assert result.exit_code == 0, result.output
    with gguf_ext.GgufClaqFile(out) as g:
        assert json.loads(g.file("tokenizer.json")) == tokenizer


def test_an_interrupted_gguf_write_leaves_nothing(tiny_model_dir, text_file, tmp_path, monkeypatch):
    from claq_convert.quantize.convert import ConvertOptions, run_conversion
    from claq_convert.quantize.pipeline import QuantConfig

    claq = tmp_path / "m.claq"
    run_conversion(ConvertOptions(model_dir=tiny_model_dir, out=claq, quant=QuantConfig(bits=3), calib=(text_file,),
                                  nsamples=2, seqlen=32))

    def interrupted(gguf, cf, config, base, tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_ext, "_write_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf_ext.claq_to_gguf(claq, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.claq"]


@pytest.mark.parametrize("short_of", ["weights", "cache"])
def test_self_sampling_that_would_not_fit_in_memory_is_refused_with_what_to_do(tiny_model_dir, tmp_path, monkeypatch,
                                                                               short_of):
    from claq_convert.quantize import convert, replay

    weights = (tiny_model_dir / "model.safetensors").stat().st_size
    loads, load = [], convert.load_sampler
    monkeypatch.setattr(convert, "load_sampler", lambda *args: loads.append(1) or load(*args))
    # free memory as asked before loading, then after: the weights fit exactly where the KV cache is what is short
    free = iter([weights - 1] if short_of == "weights" else [weights, 1])
    monkeypatch.setattr(replay, "free_bytes", lambda device: next(free))
    result = CliRunner().invoke(convert_cmd, [str(tiny_model_dir), str(tmp_path / "x.claq"), "--calib", "self",
                                              "--nsamples", "2", "--seqlen", "16"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    error = result.output.strip().splitlines()[-1]  # after transformers' own bar where the weights were loaded
    for needle in ("--calib python-docs", "MiB free", "its weights" if short_of == "weights" else "of 2 sequences"):
        assert needle in error, result.output
    assert loads == ([] if short_of == "weights" else [1])  # the weights are refused before they are loaded
    assert not list(tmp_path.iterdir())
