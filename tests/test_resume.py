"""--resume: a conversion interrupted anywhere continues from its checkpoint and writes the very same bytes."""
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from claq_convert.quantize import checkpoint as ckpt
from claq_convert.quantize import convert, pipeline
from claq_convert.format import gguf_ext
from claq_convert.quantize.checkpoint import Checkpoint, CheckpointError, checkpoint_dir, load_result, save_result
from claq_convert.cli import convert_cmd
from claq_convert.quantize.gptq import QuantizedWeight

from conftest import build_tiny_model

LINEARS_PER_LAYER = 7  # a Llama layer: q, k, v, o, gate, up, down
LAYERS = 2
QUANTIZED = LAYERS * LINEARS_PER_LAYER + 2  # and the head and the untied embedding


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # untied: the end of the conversion has two steps (head, then embedding) to interrupt between
    return build_tiny_model(tmp_path_factory.mktemp("resume-model"), family="llama-untied")


def args(model_dir, text_file, out, *extra):
    rule = [] if "--bpw" in extra else ["--bits", "3.1"]  # the fixed rule, unless the allocation is asked for
    return [str(model_dir), str(out), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            *rule, "--outlier-bits", "0.2", *extra]


@pytest.fixture(scope="module")
def reference(model_dir, text_file, tmp_path_factory):
    """Bytes of uninterrupted runs, .claq and .gguf."""
    directory = tmp_path_factory.mktemp("reference")
    out = {}
    for suffix in (".claq", ".gguf"):
        path = directory / f"model{suffix}"
        result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, path))
        assert result.exit_code == 0, result.output
        assert not checkpoint_dir(path).exists()  # removed once the output is written
        out[suffix] = path.read_bytes()
    return out


def interrupting(original, at: int, after: bool = False):
    """`original`, but its `at`-th call (from 1) raises KeyboardInterrupt, before it runs or (after) once it
    has run; `.calls` counts the calls. A plain function, so it binds as a method where it replaces one."""
    def wrapper(*a, **kw):
        wrapper.calls += 1
        if wrapper.calls == at and not after:
            raise KeyboardInterrupt
        value = original(*a, **kw)
        if wrapper.calls == at:
            raise KeyboardInterrupt
        return value

    wrapper.calls = 0
    return wrapper


def count_quantize_calls(monkeypatch):
    counter = interrupting(pipeline.quantize_weight, at=-1)
    monkeypatch.setattr(pipeline, "quantize_weight", counter)
    return counter


def leftovers(directory, out) -> list[str]:
    """Files beside the output other than the checkpoint: temporaries an interrupt failed to remove."""
    return sorted(p.name for p in directory.iterdir() if p.name != checkpoint_dir(out).name)


INTERRUPTS = {
    # name: (what to patch, its attribute, `interrupting` arguments, quantize_weight calls the resumed run makes)
    "after layer 0": (Checkpoint, "finish_layer", dict(at=1, after=True), QUANTIZED - LINEARS_PER_LAYER),
    "inside layer 0": (pipeline, "quantize_weight", dict(at=2), QUANTIZED),
    "inside layer 1": (pipeline, "quantize_weight", dict(at=LINEARS_PER_LAYER + 5), QUANTIZED - LINEARS_PER_LAYER),
    "during the head": (pipeline, "quantize_weight", dict(at=QUANTIZED - 1), 2),
    "between head and embedding": (pipeline, "quantize_weight", dict(at=QUANTIZED), 1),
    "while writing": (convert, "write_model_rest", dict(at=1), 0),
    "while translating to gguf": (gguf_ext, "_write_gguf", dict(at=1), 0),
}
POINTS = [(where, ".claq") for where in INTERRUPTS if "gguf" not in where] + [
    (where, ".gguf") for where in ("after layer 0", "while writing", "while translating to gguf")]


@pytest.mark.parametrize("where, suffix", POINTS)
def test_an_interrupted_conversion_resumes_to_the_same_bytes(where, suffix, model_dir, text_file, reference,
                                                             tmp_path, monkeypatch):
    out = tmp_path / f"model{suffix}"
    owner, attribute, how, remaining = INTERRUPTS[where]
    with monkeypatch.context() as patch:
        patch.setattr(owner, attribute, interrupting(getattr(owner, attribute), **how))
        result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out))
    assert result.exit_code == 130, result.output  # an interrupt is never a success
    assert "--resume" in result.output and "Traceback" not in result.output
    assert not out.exists() and leftovers(tmp_path, out) == []  # no partial output, no temporaries
    assert (checkpoint_dir(out) / "manifest.json").is_file()

    calls = count_quantize_calls(monkeypatch)
    result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert calls.calls == remaining  # only the unfinished work was done again
    assert out.read_bytes() == reference[suffix]
    assert not checkpoint_dir(out).exists() and leftovers(tmp_path, out) == [out.name]


def test_interrupting_a_resumed_run_and_resuming_again(model_dir, text_file, reference, tmp_path, monkeypatch):
    out = tmp_path / "model.claq"
    for at in (3, LINEARS_PER_LAYER + 2):  # inside layer 0, then inside layer 1 of the resumed run
        with monkeypatch.context() as patch:
            patch.setattr(pipeline, "quantize_weight", interrupting(pipeline.quantize_weight, at=at))
            result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, "--resume"))
        assert result.exit_code == 130, result.output
    result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == reference[".claq"]


def test_a_conversion_toward_the_source_resumes_to_the_same_bytes(model_dir, text_file, reference, tmp_path,
                                                                 monkeypatch):
    """The source model's hidden states are not in the checkpoint: a resumed run computes them again from the
    unquantized layers before its start, and must meet the very numbers the uninterrupted run carried."""
    pulled = ("--toward-source", "0.25")
    whole = tmp_path / "whole.claq"
    assert CliRunner().invoke(convert_cmd, args(model_dir, text_file, whole, *pulled)).exit_code == 0
    out = tmp_path / "model.claq"
    interrupted_checkpoint(model_dir, text_file, out, monkeypatch, *pulled)
    result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, *pulled, "--resume"))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == whole.read_bytes()


def test_sigterm_unwinds_like_ctrl_c(model_dir, text_file, reference, tmp_path, monkeypatch):
    out = tmp_path / "model.claq"
    original = Checkpoint.finish_layer
    handler = signal.getsignal(signal.SIGTERM)

    def finish_then_killed(self, index, states):
        original(self, index, states)
        os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "finish_layer", finish_then_killed)
        result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out))
    assert result.exit_code == 130 and not out.exists(), result.output
    assert signal.getsignal(signal.SIGTERM) is handler  # put back
    result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, "--resume"))
    assert result.exit_code == 0 and out.read_bytes() == reference[".claq"]


def interrupted_checkpoint(model_dir, text_file, out, monkeypatch, *extra):
    """A conversion (args plus `extra`) interrupted once layer 0 is saved: its checkpoint directory."""
    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "finish_layer", interrupting(Checkpoint.finish_layer, at=1, after=True))
        assert CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, *extra)).exit_code == 130
    return checkpoint_dir(out)


def test_resuming_with_other_settings_is_refused_in_one_line(model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "model.claq"
    place = interrupted_checkpoint(model_dir, text_file, out, monkeypatch)
    before = sorted(p.relative_to(place) for p in place.rglob("*"))
    calls = count_quantize_calls(monkeypatch)
    result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, "--resume", "--head-bits", "6"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "quant.head_bits: was None, now 6.0" in result.output
    result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, "--resume", "--seed", "1"))
    assert result.exit_code == 1 and "calibration.seed: was 0, now 1" in result.output
    assert calls.calls == 0 and not out.exists()
    assert sorted(p.relative_to(place) for p in place.rglob("*")) == before  # left as it was


def test_a_changed_model_file_is_refused(model_dir, text_file, tmp_path, monkeypatch):
    import shutil

    copy = shutil.copytree(model_dir, tmp_path / "copy")
    out = tmp_path / "model.claq"
    interrupted_checkpoint(copy, text_file, out, monkeypatch)
    os.utime(copy / "model.safetensors", ns=(0, 0))
    result = CliRunner().invoke(convert_cmd, args(copy, text_file, out, "--resume"))
    assert result.exit_code == 1 and "model.files.model.safetensors" in result.output


def test_an_existing_checkpoint_is_not_overwritten_without_resume(model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "model.claq"
    place = interrupted_checkpoint(model_dir, text_file, out, monkeypatch)
    result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out))
    assert result.exit_code == 1 and "--resume" in result.output and "delete" in result.output
    assert (place / "layer-00000").is_dir() and not out.exists()


def test_resume_without_a_checkpoint_starts_from_the_beginning(model_dir, text_file, reference, tmp_path):
    out = tmp_path / "model.claq"
    result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, "--resume"))
    assert result.exit_code == 0 and "starting from the beginning" in result.output
    assert out.read_bytes() == reference[".claq"]


def test_an_error_before_any_work_leaves_no_checkpoint(model_dir, tmp_path):
    out = tmp_path / "model.claq"
    short = tmp_path / "short.txt"
    short.write_text("too short")
    result = CliRunner().invoke(convert_cmd, [str(model_dir), str(out), "--calib", str(short), "--seqlen", "32"])
    assert result.exit_code == 1 and not checkpoint_dir(out).exists() and not out.exists()


def test_the_checkpoint_keeps_only_the_newest_hidden_states(model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "model.claq"
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "quantize_weight", interrupting(pipeline.quantize_weight, at=QUANTIZED - 1))
        CliRunner().invoke(convert_cmd, args(model_dir, text_file, out))
    place = checkpoint_dir(out)
    assert [p.parent.name for p in place.rglob("states.npz")] == [f"layer-{LAYERS - 1:05d}"]
    finished = Checkpoint.open(place, convert.fingerprint(_options(model_dir, text_file, out)), resume=True).finished()
    assert finished.layers == LAYERS and finished.ends == ()
    assert len(finished.states) == 1 and finished.states[0].shape == (4, 32, 64)  # one batch of 4 windows


def _options(model_dir, text_file, out):
    from claq_convert.models.source import ModelSource

    ModelSource(model_dir)
    return convert.ConvertOptions(model_dir=model_dir, out=out, quant=pipeline.QuantConfig(bits=3.1, outlier_bits=0.2),
                                  calib=(text_file,), nsamples=4, seqlen=32)


# --------------------------------------------------------------------------- results saved field by field
def random_result(uniform: bool = False) -> QuantizedWeight:
    rng = np.random.default_rng(0)
    rows, cols = 6, 5
    return QuantizedWeight(
        shape=(rows, cols), method="uniform" if uniform else "codebook",
        bits=rng.integers(1, 5, cols).astype(np.uint8), codes=rng.integers(0, 16, (rows, cols)).astype(np.uint8),
        column_codebooks=rng.standard_normal((cols, 256)).astype(np.float32),
        outlier_counts=np.array([1, 0, 2, 0, 0]), outlier_rows=np.array([3, 0, 5]),
        outlier_values=rng.standard_normal(3).astype(np.float16),
        scale=rng.standard_normal((1, rows)).astype(np.float32) if uniform else None,
        zero=rng.standard_normal((1, rows)).astype(np.float32) if uniform else None,
        group=np.zeros(cols, np.int64) if uniform else None,
        codebook_levels=rng.integers(0, 255, (cols, 256)).astype(np.uint8),
        codebook_grid=rng.standard_normal((cols, 2)).astype(np.float16),
        loss=0.1 + 0.2, relative_error=float("nan"),
        info={"seconds": 1 / 3, "nested": {"pair": (1, 2.5), "list": [np.float32(0.7), None, "x"]}})


def assert_same(a, b):
    if isinstance(a, np.ndarray) or isinstance(a, np.generic):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert type(a) is type(b) and a == b


@pytest.mark.parametrize("uniform", [False, True])
def test_a_result_round_trips_exactly(uniform, tmp_path):
    result = random_result(uniform)
    save_result(tmp_path / "r.npz", "some.weight", result)
    name, back = load_result(tmp_path / "r.npz")
    assert name == "some.weight"
    for field in dataclasses.fields(QuantizedWeight):
        assert_same(getattr(result, field.name), getattr(back, field.name))
    assert np.array_equal(back.dequantize(), result.dequantize())
    assert list(tmp_path.iterdir()) == [tmp_path / "r.npz"]  # no temporary left


def test_fields_added_to_the_result_travel_without_changes(tmp_path, monkeypatch):
    Extended = dataclasses.make_dataclass(
        "Extended", [("refined", np.ndarray, dataclasses.field(default=None)),
                     ("iterations", int, dataclasses.field(default=0))], bases=(QuantizedWeight,))
    monkeypatch.setattr(ckpt, "QuantizedWeight", Extended)
    result = Extended(**{f.name: getattr(random_result(), f.name) for f in dataclasses.fields(QuantizedWeight)},
                      refined=np.arange(4, dtype=np.float64) / 3, iterations=7)
    save_result(tmp_path / "r.npz", "w", result)
    _, back = load_result(tmp_path / "r.npz")
    assert type(back) is Extended and back.iterations == 7
    assert_same(back.refined, result.refined)
    monkeypatch.setattr(ckpt, "QuantizedWeight", QuantizedWeight)  # an older version cannot read them
    with pytest.raises(CheckpointError, match="refined"):
        load_result(tmp_path / "r.npz")


def test_an_unsavable_field_is_named():
    result = random_result()
    result.info = {"handle": object()}
    with pytest.raises(TypeError, match="object"):
        save_result("/nonexistent/never-written.npz", "w", result)



def test_a_measured_allocation_is_kept_and_not_measured_again(model_dir, text_file, tmp_path, monkeypatch):
    bpw = ("--bpw", "3.5", "--outlier-bits", "0")
    whole = tmp_path / "whole.claq"
    assert CliRunner().invoke(convert_cmd, args(model_dir, text_file, whole, *bpw)).exit_code == 0
    out = tmp_path / "model.claq"
    interrupted_checkpoint(model_dir, text_file, out, monkeypatch, *bpw)
    assert (checkpoint_dir(out) / "allocation.json").is_file()
    allocations = interrupting(convert.allocate_bits, at=-1)
    monkeypatch.setattr(convert, "allocate_bits", allocations)
    result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, *bpw, "--resume"))
    assert result.exit_code == 0, result.output
    assert allocations.calls == 0 and out.read_bytes() == whole.read_bytes()


# --------------------------------------------------------------------------- the budget pass reads the checkpoint
def test_saved_results_are_read_from_their_files_and_narrowed_ones_kept_apart(tmp_path):
    place = tmp_path / "out.claq.resume"
    checkpoint = Checkpoint.open(place, {"x": 1}, resume=False)
    first, second = random_result(), dataclasses.replace(random_result(), loss=2.0)
    checkpoint.save_result("layers.0.w", first)
    checkpoint.finish_layer(0, [torch.zeros(1, 2, 3)])
    checkpoint.save_result("head", second, end=True)
    saved = checkpoint.saved_results()
    assert list(saved) == ["layers.0.w", "head"] and len(saved) == 2
    assert_same(saved["head"].codes, second.codes) and saved["head"].loss == 2.0
    assert saved["head"] is not saved["head"]  # read again at each ask: nothing is held
    for loss in (3.0, 4.0):  # narrowed twice: the newer replaces the older
        saved["layers.0.w"] = dataclasses.replace(first, loss=loss)
        assert saved["layers.0.w"].loss == loss
        assert [p.name for p in (place / "budget").iterdir()] == [f"{int(loss) - 3:04d}.npz"]
    assert [name for name, result in checkpoint.results()] == ["layers.0.w", "head"]  # the layer's own file stays
    assert next(checkpoint.results())[1].loss == first.loss
    Checkpoint.open(place, {"x": 1}, resume=True)  # a resumed run makes the budget pass again
    assert not (place / "budget").exists()


def forced_narrowing(monkeypatch):
    """Coded levels priced as free, so the allocation overspends and the budget pass must narrow."""
    from claq_convert.quantize import allocation

    monkeypatch.setattr(allocation, "coded_level_bits", lambda W, max_bits, **_: np.zeros(max_bits))


def test_the_budget_pass_reads_the_checkpoint_and_writes_what_memory_would(model_dir, text_file, tmp_path,
                                                                           monkeypatch):
    from claq_convert.quantize import budget

    bpw = ("--bpw", "3.4", "--outlier-bits", "0")
    forced_narrowing(monkeypatch)
    passes, within_budget, held_results = [], budget.within_budget, convert.held_results
    with monkeypatch.context() as patch:  # every result held in memory, as without a checkpoint
        patch.setattr(convert, "held_results", lambda stream, checkpoint: dict(stream))
        patch.setattr(budget, "within_budget", lambda results, *a, **k: passes.append(
            (type(results), *within_budget(results, *a, **k))) or passes[-1][1:])
        in_memory = tmp_path / "memory.claq"
        assert CliRunner().invoke(convert_cmd, args(model_dir, text_file, in_memory, *bpw)).exit_code == 0
        out = tmp_path / "model.claq"
        patch.setattr(convert, "held_results", held_results)
        result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, out, *bpw))
        assert result.exit_code == 0, result.output
    assert [kind for kind, _, _ in passes] == [dict, ckpt.SavedResults]
    assert passes[0][2] == passes[1][2] and passes[1][2]["narrowed_columns"] > 0
    assert out.read_bytes() == in_memory.read_bytes()

    # interrupted while writing, with narrowed weights under budget/: resumed to the same bytes
    again = tmp_path / "again.claq"
    with monkeypatch.context() as patch:
        patch.setattr(convert, "write_model_rest", interrupting(convert.write_model_rest, at=1))
        assert CliRunner().invoke(convert_cmd, args(model_dir, text_file, again, *bpw)).exit_code == 130
    assert any((checkpoint_dir(again) / "budget").iterdir())
    loads = interrupting(Checkpoint.results, at=-1)
    monkeypatch.setattr(Checkpoint, "results", loads)
    result = CliRunner().invoke(convert_cmd, args(model_dir, text_file, again, *bpw, "--resume"))
    assert result.exit_code == 0, result.output
    assert loads.calls == 0  # the saved results are read back by the budget pass, not loaded on the way
    assert again.read_bytes() == in_memory.read_bytes() and not checkpoint_dir(again).exists()


@pytest.mark.parametrize("rule", [("--bpw", "3.4", "--outlier-bits", "0"), ()])
def test_eval_of_a_written_conversion_reads_the_results_back(rule, model_dir, text_file, tmp_path, monkeypatch):
    """--eval scores what the file holds: read back from the checkpoint one at a time (narrowed weights
    too), the same numbers as a --dry-run, which holds its results in memory."""
    forced_narrowing(monkeypatch)
    kinds, apply_dequantized = [], convert.apply_dequantized
    monkeypatch.setattr(convert, "apply_dequantized",
                        lambda model, results: kinds.append(type(results)) or apply_dequantized(model, results))
    records = []
    quant = rule or ("--bits", "3.1", "--outlier-bits", "0.2")
    for where in (["--dry-run"], [str(tmp_path / "model.claq")]):
        out = tmp_path / f"run{len(records)}.json"
        result = CliRunner().invoke(convert_cmd, [str(model_dir), *where, "--calib", str(text_file), "--nsamples",
                                                  "4", "--seqlen", "32", *quant, "--eval", "--json", str(out)])
        assert result.exit_code == 0, result.output
        records.append(json.loads(out.read_text()))
    assert kinds == [dict, ckpt.SavedResults]
    scores = [{text: (r["ppl"], r["nll"], r["tokens"]) for text, r in record["ppl_after"].items()} for record in records]
    assert scores[0] == scores[1] and records[0]["tensors"].keys() == records[1]["tensors"].keys()
    if rule:
        assert records[1]["budget"]["narrowed_columns"] > 0
