"""Scaling to 7B-class models: parallel group quantization changes nothing, the phase timer, the bench tool."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from claq_convert.format import spec
from claq_convert.quantize.convert import ConvertOptions, run_conversion, without_wall_clock
from claq_convert.quantize.pipeline import QuantConfig, quantize_group, quantize_model
from claq_convert.models.source import ModelSource
from claq_convert.timing import NO_TIMER, PhaseTimer

ROOT = Path(__file__).resolve().parents[1]
RESULT_FIELDS = ("bits", "codes", "column_codebooks", "codebook_levels", "codebook_grid", "outlier_counts",
                 "outlier_rows", "outlier_values", "scale", "zero", "group")


def header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    _, _, length = spec.PREAMBLE.unpack_from(raw)
    end = spec.PREAMBLE.size + length
    return json.loads(raw[spec.PREAMBLE.size:end]), raw[end:]


def test_parallel_and_sequential_group_quantization_write_the_same_file(tiny_model_dir, text_file, tmp_path):
    parts = {}
    for threads in (1, 3):
        out = tmp_path / f"threads{threads}.claq"
        run_conversion(ConvertOptions(model_dir=tiny_model_dir, out=out, quant=QuantConfig(bits=3, outlier_bits=0.3),
                                      calib=(text_file,), nsamples=4, seqlen=32, threads=threads))
        parts[threads] = header_and_data(out)
    (header_1, data_1), (header_3, data_3) = parts[1], parts[3]
    assert data_1 == data_3  # every section of every tensor and file, byte for byte
    assert header_1["tensors"] == header_3["tensors"] and header_1["files"] == header_3["files"]  # offsets, CRCs
    # the metadata differs only in the wall-clock times of the conversion record
    assert without_wall_clock(header_1["metadata"]) == without_wall_clock(header_3["metadata"])


def random_jobs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 192, generator=g) @ (torch.eye(192) + 0.2 * torch.randn(192, 192, generator=g))
    H = 2.0 / X.shape[0] * X.T @ X
    W = lambda rows: torch.randn(rows, 192, generator=g) * 0.02
    weights = torch.rand(160, generator=g).double().numpy() * 3
    return [("claq-ap-or", W(160), H, QuantConfig(bits=3.3, outlier_bits=0.2), None),
            ("claq-weighted", W(160), H, QuantConfig(bits=3), weights),
            ("kmeans", W(96), None, QuantConfig(method="kmeans", bits=2), None),
            ("gptq", W(128), H, QuantConfig(method="gptq", bits=4, group_size=64), None),
            ("claq-f16", W(64), H, QuantConfig(bits=6), None)]


def test_quantize_group_in_threads_gives_the_one_by_one_results_in_order():
    jobs = random_jobs()
    one_by_one = list(quantize_group(jobs, workers=1))
    parallel = list(quantize_group(jobs, workers=3))
    assert [name for name, _ in parallel] == [name for name, *_ in jobs] == [name for name, _ in one_by_one]
    for (_, a), (_, b) in zip(one_by_one, parallel):
        for field in RESULT_FIELDS:
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None and y is None) or np.array_equal(x, y), field
        assert a.loss == b.loss


def test_phase_timer_records_each_phase_of_each_layer(tiny_model_dir):
    source = ModelSource(tiny_model_dir)
    calibration = torch.randint(0, source.config().vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    timer = PhaseTimer()
    results = dict(quantize_model(source, calibration, QuantConfig(bits=3), batch_size=2, threads=1, timer=timer))
    report = timer.report()
    sections = report["sections"]
    assert list(sections) == ["inputs", "layer 0", "layer 1", "head"]
    for name in ("layer 0", "layer 1"):
        entry = sections[name]
        assert set(entry["phases"]) == {"load", "forward", "hessian", "plan", "cholesky", "kmeans", "gptq_update",
                                        "finish"}
        assert all(s > 0 for s in entry["phases"].values())
        assert sum(entry["phases"].values()) <= entry["seconds"] * 1.001  # one thread: phases are exclusive
        assert entry["peak_rss_bytes"] > 0
    assert report["peak_rss_bytes"] >= max(e["peak_rss_bytes"] for e in sections.values())
    untimed = dict(quantize_model(source, calibration, QuantConfig(bits=3), batch_size=2, threads=1))
    assert all(np.array_equal(untimed[n].codes, results[n].codes) for n in results)  # the timer changes nothing


def test_nested_phases_are_timed_exclusively_and_the_default_timer_keeps_nothing():
    timer = PhaseTimer()
    with timer.section("s"):
        with timer.phase("outer"):
            time.sleep(0.01)
            with timer.phase("inner"):
                time.sleep(0.05)
    phases = timer.report()["sections"]["s"]["phases"]
    assert phases["inner"] >= 0.05 and 0.01 <= phases["outer"] < 0.05
    assert NO_TIMER.phase("a") is NO_TIMER.section("b") and vars(NO_TIMER) == {}


def test_bench_scale_smoke_runs_end_to_end_without_gguf(tmp_path):
    out = tmp_path / "scale.json"
    # gguf blocked: the tool must run where only torch, transformers, numba, safetensors, numpy are installed
    code = ("import sys, runpy; sys.modules['gguf'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "tools" / "bench_scale.py"), "--smoke",
                           "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu"
    sections = report["timing"]["sections"]
    assert {"layer 0", "layer 1", "head", "embedding"} <= set(sections)
    assert {"kmeans", "hessian", "forward"} <= set(sections["layer 0"]["phases"])
    assert {"budget", "write"} <= set(sections)  # under --bpw the weights are counted, then written, after the layers
    projection = report["projection"]
    assert projection["layers"] == 32 and projection["total_seconds"] > 32 * projection["per_layer"]["seconds"]
    assert projection["head_and_embedding"]["head"]["rows"] == report["model"]["vocab_size"]
    assert report["group_speedup"]["identical"]
    # the CLI's default path: the Fisher pass and the allocation, measured and scaled to 32 layers
    assert report["settings"]["bpw"] is not None and {"sensitivity", "allocation"} <= set(sections)
    for name in ("sensitivity", "allocation"):
        assert projection["scaled_with_layers"][name]["seconds"] >= 16 * sections[name]["seconds"]


def test_bench_scale_smoke_converts_a_mixture_of_experts_with_its_experts_stored_apart(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_scale.py"), "--smoke", "--shape", "qwen3-30b-a3b",
                           "--no-speedup", "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["shape"] == "qwen3-30b-a3b" and report["projection"]["layers"] == 48
    assert {"layer 0", "layer 1", "sensitivity", "allocation"} <= set(report["timing"]["sections"])


def test_bench_sampling_smoke_times_both_depths_and_projects_the_default_self_windows(tmp_path):
    out = tmp_path / "sampling.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_sampling.py"), "--smoke", "--batches", "2,4",
                           "--out", str(out), "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {f"layers {d}, batch {b}" for d in (1, 2) for b in (2, 4)}
    assert all(seconds > 0 for seconds in report["runs"].values())
    assert report["settings"]["default_self_windows"] == 64 and report["sampler_dtype"] == "bfloat16"  # fp16 on disk, as the CLI loads it on the CPU
    for batch, p in report["projection"].items():
        per_batch = p["seconds_outside_layers_per_batch"] + 32 * p["seconds_per_layer_per_batch"]
        assert p["seconds"] == pytest.approx(64 // int(batch) * per_batch)
    assert report["projection"]["4"]["kv_cache_bytes"] == 2 * report["projection"]["2"]["kv_cache_bytes"]


def test_group_hessians_are_shared_between_linears_reading_one_input_and_equal_to_separate_sums(tiny_model_dir):
    from claq_convert.quantize.pipeline import _group_hessians

    from conftest import first_layer

    with torch.no_grad():
        calibration, arch, layer, states, kwargs = first_layer(tiny_model_dir)
        reference = {}

        def record(name):
            def hook(module, inputs, output):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                reference[name] = reference.get(name, 0) + x.T @ x
            return hook

        handles = [layer.get_submodule(n).register_forward_hook(record(n)) for n in arch.linears(0)]
        for h, kw in zip(states, kwargs):
            layer(h, **kw)
        for handle in handles:
            handle.remove()
        tokens = calibration.numel()
        for group in arch.family.groups:
            hessians, crosses = _group_hessians(layer, {n: layer.get_submodule(n) for n in group}, states, kwargs)
            assert list(hessians) == list(group) and crosses == {}  # no source model given
            assert all(hessians[n] is hessians[group[0]] for n in group)  # one input, one sum
            for n in group:
                assert torch.allclose(hessians[n], reference[n] * (2.0 / tokens), rtol=1e-5, atol=1e-6)
        # after the first batch showed q/k/v reading one tensor, the next stops before q_proj computes
        q, k, v = arch.family.groups[0]
        calls = []
        handle = layer.get_submodule(k).register_forward_hook(lambda *args: calls.append(1))
        _group_hessians(layer, {n: layer.get_submodule(n) for n in (q, k, v)}, states, kwargs)
        handle.remove()
        assert len(states) == 2 and len(calls) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="here the script would run the GPU checks")
def test_the_device_check_script_says_in_one_line_that_it_needs_a_gpu(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "tools" / "device_check.sh")], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "sees no CUDA GPU" in done.stderr
