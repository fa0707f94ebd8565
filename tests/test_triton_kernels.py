"""The Triton stream kernels against the NumPy reference (spec.unpack_codes): decode bit for bit, the LUT
product to fp32 rounding. On a machine without CUDA they run in Triton's interpreter."""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # @triton.jit reads this when the kernels module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from claq_convert.format import spec  # noqa: E402
from claq_convert.kernels import triton_lut as kt  # noqa: E402

# interpreted kernels take CPU tensors, compiled ones CUDA tensors
if os.environ.get("TRITON_INTERPRET") == "1":
    DEVICES = ["cpu"]
elif torch.cuda.is_available():
    DEVICES = ["cuda"]
else:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton kernels cannot run here", allow_module_level=True)
EPS32 = 2.0 ** -24


class Stream:
    """One random stream of a weight with C input columns: packed words, codebooks and its reference W^T rows."""

    def __init__(self, rng, bits: int, rows: int, columns: np.ndarray):
        self.bits, self.rows, self.columns = bits, rows, np.asarray(columns, np.int64)
        n = self.columns.size
        self.words = spec.pack_codes(rng.integers(0, 1 << bits, n * rows), bits)
        self.tables = np.sort(rng.standard_normal((n, 1 << bits)).astype(np.float32), axis=1)
        self.codes = spec.unpack_codes(self.words, bits, n * rows).reshape(n, rows).astype(np.int64)

    @property
    def values(self) -> np.ndarray:
        """[n, rows]: the rows `columns` of W^T."""
        return np.take_along_axis(self.tables, self.codes, 1)

    def tensors(self, device):
        return (torch.from_numpy(self.words.view(np.int32)).to(device), self.bits,
                torch.from_numpy(self.tables).to(device), torch.from_numpy(self.columns).to(device), self.rows)


def mixed_weight(seed: int, rows: int, C: int, allowed=spec.ALLOWED_BITS):
    """A weight whose C columns take random widths among `allowed`: one Stream per width in use, and W^T."""
    rng = np.random.default_rng(seed)
    widths = rng.choice(allowed, C)
    streams = [Stream(rng, b, rows, spec.columns_of_width(widths, b)) for b in np.unique(widths)]
    Wt = np.zeros((C, rows), np.float32)
    for s in streams:
        Wt[s.columns] = s.values
    return streams, Wt


def decoded(stream: Stream, C: int, dtype, device, fill=0.0) -> torch.Tensor:
    out = torch.full((C, stream.rows), fill, dtype=dtype, device=device)
    kt.decode_stream(*stream.tensors(device), out)
    return out.cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_of_the_spec_example(device):
    # spec.pack_codes' example: 3-bit codes 5, 1, 7 are the word 0x1CD; one column of 3 rows
    words = torch.tensor([0x1CD], dtype=torch.int32, device=device)
    tables = torch.arange(8, dtype=torch.float32, device=device)[None, :] * 10
    out = torch.zeros(2, 3, device=device)
    kt.decode_stream(words, 3, tables, torch.tensor([1], device=device), 3, out)
    assert torch.equal(out.cpu(), torch.tensor([[0.0, 0, 0], [50, 10, 70]]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [29, 33, 64])
@pytest.mark.parametrize("bits", list(spec.ALLOWED_BITS))
def test_decode_is_bit_exact_for_every_width(device, bits, rows):
    rng = np.random.default_rng(100 * bits + rows)
    C = 40
    for columns in (np.arange(C), np.sort(rng.choice(C, 23, replace=False)), [C - 1]):
        stream = Stream(rng, bits, rows, columns)
        out = decoded(stream, C, torch.float32, device, fill=-1.0)
        expected = np.full((C, rows), -1.0, np.float32)  # columns of other streams are left untouched
        expected[stream.columns] = stream.values
        assert np.array_equal(out.numpy(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_decode_is_the_cast_of_fp32(device, dtype):
    for seed, bits, rows in ((0, 3, 29), (1, 4, 64), (2, 7, 33)):
        rng = np.random.default_rng(seed)
        stream = Stream(rng, bits, rows, np.sort(rng.choice(30, 17, replace=False)))
        stream.tables *= np.float32(1e-4)  # many below 2**-14: fp16 subnormals, where rounding is easiest to get wrong
        # exact ties of bf16 (7 fraction bits) and of fp16 (10), to the even neighbour below and above
        stream.tables[:, :2] = np.float32([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8])
        stream.tables[:, -2:] = np.float32([-(1 + 2.0 ** -11), 1 + 3 * 2.0 ** -11])
        fp32 = decoded(stream, 30, torch.float32, device)
        assert torch.equal(decoded(stream, 30, dtype, device), fp32.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_of_a_mixed_width_weight_and_small_tiles(device):
    streams, Wt = mixed_weight(7, 37, 50)
    for blocks in ({}, dict(block_c=4, block_r=8)):  # many programs per stream, partial tiles on both sides
        out = torch.full((50, 37), float("nan"), device=device)
        for s in streams:
            kt.decode_stream(*s.tensors(device), out, **blocks)
        assert np.array_equal(out.cpu().numpy(), Wt)


def assert_product(y: torch.Tensor, y0: np.ndarray, x: torch.Tensor, Wt: np.ndarray):
    """y = y0 + x @ W^T to fp32 accumulation error: |error| <= 2 * C * 2**-24 * (|x| @ |W|^T + |y0|)."""
    xs = x.cpu().double().numpy()
    expected = y0 + xs @ Wt.astype(np.float64)
    magnitude = np.abs(xs) @ np.abs(Wt.astype(np.float64)) + np.abs(y0)
    error = np.abs(y.cpu().numpy().astype(np.float64) - expected)
    assert np.all(error <= 2 * Wt.shape[0] * EPS32 * magnitude + 1e-30), float((error / magnitude).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("rows", [29, 64])
def test_lut_product_of_a_mixed_weight_accumulates_into_y(device, M, rows):
    streams, Wt = mixed_weight(M + rows, rows, 70, allowed=(3, 4))  # ~35 columns a stream: 3 blocks of 16
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 70, generator=g).to(device)
    y0 = torch.randn(M, rows, generator=g).numpy()
    # the default launch, one program per row block, and three whose partial sums meet by atomic adds
    for split, block_c in ((None, None), (1, 16), (3, 16)):
        y = torch.from_numpy(y0.copy()).to(device)
        for s in streams:
            kt.lut_matmul_stream(*s.tensors(device), x, y, split=split, block_c=block_c)
        assert_product(y, y0, x, Wt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", list(spec.ALLOWED_BITS))
def test_lut_product_for_every_width(device, bits):
    rng = np.random.default_rng(bits)
    C, rows = 45, 33
    stream = Stream(rng, bits, rows, np.sort(rng.choice(C, 38, replace=False)))
    Wt = np.zeros((C, rows), np.float32)
    Wt[stream.columns] = stream.values
    x = torch.randn(3, C, generator=torch.Generator().manual_seed(bits)).to(device)
    for M in (1, 3):
        y = torch.zeros(M, rows, device=device)
        kt.lut_matmul_stream(*stream.tensors(device), x[:M], y, split=2, block_c=16, block_r=16)
        assert_product(y, np.zeros((M, rows)), x[:M], Wt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", list(spec.ALLOWED_BITS))
def test_gemv_for_every_width_and_launch_setting(device, bits):
    """The batch-1 kernel on word-aligned columns: whole units, a partial last unit (40 rows of 4 or 8
    bits: 5 or 10 words), tiles of one unit and of more rows than the weight, several column slices."""
    rng = np.random.default_rng(20 + bits)
    C = 45
    for rows in (r for r in (32, 96, 40) if r * bits % 32 == 0):
        stream = Stream(rng, bits, rows, np.sort(rng.choice(C, 38, replace=False)))
        Wt = np.zeros((C, rows), np.float32)
        Wt[stream.columns] = stream.values
        x = torch.randn(1, C, generator=torch.Generator().manual_seed(bits + rows)).to(device)
        y0 = rng.standard_normal((1, rows)).astype(np.float32)
        for tuning in ({}, dict(block_rows=1, block_c=2, split=5, prefetch=1),
                       dict(block_rows=256, block_c=64, warps=1, prefetch=2)):
            y = torch.from_numpy(y0.copy()).to(device)
            kt.lut_gemv_stream(*stream.tensors(device), x, y, **tuning)
            assert_product(y, y0, x, Wt)


def test_gemv_refuses_unaligned_columns_and_batches():
    stream = Stream(np.random.default_rng(0), 3, 10, [0, 2])
    with pytest.raises(ValueError, match="word-aligned"):
        kt.lut_gemv_stream(*stream.tensors("cpu"), torch.ones(1, 3), torch.zeros(1, 10))
    stream = Stream(np.random.default_rng(0), 4, 8, [0, 2])
    with pytest.raises(ValueError, match=r"x must be a \[1, C\]"):
        kt.lut_gemv_stream(*stream.tensors("cpu"), torch.ones(2, 3), torch.zeros(2, 8))


def one_launch_streams(streams, device):
    return [(w, b, tables, columns) for w, b, tables, columns, _ in (s.tensors(device) for s in streams)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [32, 96])
def test_one_launch_gemv_over_every_width(device, rows):
    """All eight widths of a weight in one launch: tiles of one unit and of more rows than the weight,
    one program for everything and many small slices, a strided half-precision x; y accumulated into."""
    streams, Wt = mixed_weight(30 + rows, rows, 70)
    assert len(streams) == 8
    rng = np.random.default_rng(rows)
    x32 = torch.randn(1, 70, generator=torch.Generator().manual_seed(rows))
    y0 = rng.standard_normal((1, rows)).astype(np.float32)
    for tuning in ({}, dict(rows_one_word=32, rows_multi_word=32, c_one_word=2, c_multi_word=4, programs_per_sm=64,
                            prefetch=0),
                   dict(rows_one_word=256, rows_multi_word=512, c_one_word=64, c_multi_word=32, warps=1,
                        programs_per_sm=1, prefetch=2)):
        for x in (x32.to(device), x32.half().T.contiguous().T.to(device)):
            y = torch.from_numpy(y0.copy()).to(device)
            kt.lut_gemv_streams(one_launch_streams(streams, device), rows, x, y, **tuning)
            assert_product(y, y0, x.float(), Wt)


@pytest.mark.parametrize("device", DEVICES)
def test_a_gemv_plan_is_checked_once_and_called_again(device):
    """GemvPlan: the streams checked and the launch built once, then each call takes a new x and y."""
    streams, Wt = mixed_weight(7, 64, 30)
    plan = kt.GemvPlan(one_launch_streams(streams, device), 64)
    for seed in (1, 2):
        x = torch.randn(1, 30, generator=torch.Generator().manual_seed(seed)).to(device)
        y = torch.zeros(1, 64, device=device)
        plan(x, y)
        assert_product(y, np.zeros((1, 64)), x.float(), Wt)
    with pytest.raises(ValueError, match=r"y must be a contiguous float32 \[1, 64\]"):
        plan(x, torch.zeros(1, 63, device=device))
    with pytest.raises(ValueError, match=r"x must be a float32/float16/bfloat16 \[1, C\]"):
        plan(x.double(), torch.zeros(1, 64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_schedule_covers_each_code_once(device):
    """Every (width, unit block, column) of the weight in exactly one program's slice, slices of about
    the same number of codes whatever the width."""
    counts = {1: 9, 3: 70, 4: 33, 6: 5}
    rows = 64
    config = kt.gemv_widths_config(rows_one_word=32, rows_multi_word=64, c_one_word=4, c_multi_word=2,
                                   programs_per_sm=8)
    schedule = kt.gemv_schedule(counts, rows, device, config).cpu().numpy()
    covered = {b: np.zeros((-(-rows // (config["rows_one_word"] if b in (1, 2, 4, 8) else config["rows_multi_word"])),
                            n), int) for b, n in counts.items()}
    for b, block, first, count in schedule:
        assert count > 0 and first % config["c_one_word" if b in (1, 2, 4, 8) else "c_multi_word"] == 0
        covered[int(b)][block, first:first + count] += 1
    assert all(np.all(c == 1) for c in covered.values())
    codes = [count * (config["rows_one_word"] if b in (1, 2, 4, 8) else config["rows_multi_word"])
             for b, _, _, count in schedule]
    assert max(codes) <= 2 * np.median(codes)


def test_one_launch_gemv_refuses_what_it_cannot_take():
    aligned, unaligned = Stream(np.random.default_rng(0), 4, 16, [0, 2]), Stream(np.random.default_rng(0), 3, 16, [1])
    x, y = torch.ones(1, 3), torch.zeros(1, 16)
    with pytest.raises(ValueError, match="word-aligned 3-bit"):
        kt.lut_gemv_streams(one_launch_streams([aligned, unaligned], "cpu"), 16, x, y)
    with pytest.raises(ValueError, match="one stream a width"):
        kt.lut_gemv_streams(one_launch_streams([aligned, aligned], "cpu"), 16, x, y)
    with pytest.raises(ValueError, match=r"x must be a float32/float16/bfloat16 \[1, C\]"):
        kt.lut_gemv_streams(one_launch_streams([aligned], "cpu"), 16, torch.ones(2, 3), torch.zeros(2, 16))
    with pytest.raises(ValueError, match="power of two >= 32"):
        kt.lut_gemv_streams(one_launch_streams([aligned], "cpu"), 16, x, y, rows_one_word=16)
    with pytest.raises(ValueError, match="prefetch must be 0, 1 or 2"):
        kt.lut_gemv_streams(one_launch_streams([aligned], "cpu"), 16, x, y, prefetch=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lut_product_takes_half_inputs_and_strided_and_large_batches(device, dtype):
    streams, Wt = mixed_weight(3, 40, 36)
    x = torch.randn(36, 20, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype).T  # strided
    y = torch.zeros(20, 40, device=device)  # 20 > MAX_BATCH: two launches of 16 and 4
    for s in streams:
        kt.lut_matmul_stream(*s.tensors(device), x, y)
    assert_product(y, np.zeros((20, 40)), x.float(), Wt)


@pytest.mark.parametrize("device", DEVICES)
def test_an_empty_stream_is_a_no_op(device):
    empty = (torch.zeros(0, dtype=torch.int32, device=device), 4, torch.zeros(0, 16, device=device),
             torch.zeros(0, dtype=torch.int64, device=device), 8)
    out, y = torch.ones(3, 8, device=device), torch.ones(2, 8, device=device)
    kt.decode_stream(*empty, out)
    kt.lut_matmul_stream(*empty, torch.ones(2, 3, device=device), y)
    assert torch.equal(out.cpu(), torch.ones(3, 8)) and torch.equal(y.cpu(), torch.ones(2, 8))


def test_bad_arguments_are_refused_with_the_reason():
    stream = Stream(np.random.default_rng(0), 3, 10, [0, 2])
    words, bits, tables, columns, rows = stream.tensors("cpu")
    with pytest.raises(ValueError, match="bits must be one of"):
        kt.decode_stream(words, 9, tables, columns, rows, torch.zeros(3, 10))
    with pytest.raises(ValueError, match="cannot hold"):
        kt.decode_stream(words[:1], bits, tables, columns, rows, torch.zeros(3, 10))
    with pytest.raises(ValueError, match="tables must be"):
        kt.decode_stream(words, bits, tables.double(), columns, rows, torch.zeros(3, 10))
    with pytest.raises(ValueError, match="words must be"):
        kt.decode_stream(words.long(), bits, tables, columns, rows, torch.zeros(3, 10))
    with pytest.raises(ValueError, match="out_t must be a contiguous"):
        kt.decode_stream(words, bits, tables, columns, rows, torch.zeros(10, 3).T)
    with pytest.raises(ValueError, match="y must be"):
        kt.lut_matmul_stream(words, bits, tables, columns, rows, torch.ones(2, 3), torch.zeros(3, 10))
    with pytest.raises(ValueError, match="power of two"):
        kt.lut_matmul_stream(words, bits, tables, columns, rows, torch.ones(2, 3), torch.zeros(2, 10), block_c=8)


@pytest.mark.parametrize("grid, rows", [(False, 48), (True, 48), (False, 64)])
@pytest.mark.parametrize("device", DEVICES)
def test_claq_linear_triton_path_matches_the_reference_decoder(device, grid, rows, monkeypatch):
    """ClaqLinear with the Triton kernels: decode bit for bit (outliers scattered in), products (outliers
    as a sparse correction) to fp32 rounding, for batches served by the LUT kernel (batch 1: one launch a
    stream at 48 rows, where 3- and 5-bit columns end inside a word; one launch at 64) and by decode + matmul."""
    from claq_convert.runtime import modules
    from claq_convert.format import reader

    monkeypatch.setattr(modules, "TRITON_PRODUCT_MAX_ROWS", 16)  # batch 5 through the tile kernel too
    from claq_convert.quantize.convert import encode_result
    from claq_convert.quantize.gptq import GPTQ

    cols = 40
    rng = np.random.default_rng(11 + grid)
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(11))
    r = GPTQ(W, None).quantize(rng.choice([2, 3, 4, 5], cols), rng.integers(0, 3, cols), grid=grid)
    sections = encode_result(r)
    assert r.outlier_counts.sum() > 0
    expected = torch.from_numpy(reader.decode_claq(rows, sections))
    layer = modules.ClaqLinear(rows, sections, device=device, kernels="triton")
    assert torch.equal(layer.decode().cpu(), expected)
    plan = layer._gemv_plan()
    assert (plan is None) == (rows == 48)
    if plan is not None:  # made once, and again when the buffers move
        assert layer._gemv_plan() is plan
        for name, buffer in list(layer._buffers.items()):
            layer._buffers[name] = buffer.clone()
        assert layer._gemv_plan() is not plan
    with torch.no_grad():
        for batch in (1, 5, 20):  # 20 > TRITON_PRODUCT_MAX_ROWS: decode + matmul
            x = torch.randn(batch, cols)
            y = layer(x.to(device)).cpu().double()
            reference = x.double() @ expected.double().T
            scale = x.abs().double() @ expected.abs().double().T
            assert torch.all((y - reference).abs() <= 1e-5 * scale + 1e-6)


def load_tool(name: str):
    """The module tools/<name>.py (the tools are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec_ = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the smoke run is for the interpreter")
def test_the_cuda_benchmark_runs_end_to_end_in_the_interpreter(tmp_path):
    """tools/bench_decode_cuda.py --smoke --sweep: every kernel checked against the reference, JSON written."""
    import json

    bench = load_tool("bench_decode_cuda")
    out = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--sweep", "--sweep-widths", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failures"] == [] and report["smoke"] is True
    assert all(case["best"] is not None and len(case["settings"]) == 2 for case in report["sweep"])
    assert all("lut_tiles" in case["batches"]["1"]["us"] for case in report["cases"])
    widths = report["sweep_widths"]
    assert widths["settings"] == bench.SMOKE_WIDTHS_GRID and widths["chosen"] in widths["settings"]
    assert report["one_launch_settings"] == dict(widths["chosen"])
    assert all(case["first_again_graph_us"] > 0 for case in widths["cases"])
    assert json.loads((tmp_path / "smoke-sweep.json").read_text())["sweep_widths"] == widths
    aligned = [case for case in report["cases"] if case["rows"] % 32 == 0]  # the 64-row smoke shape
    assert aligned and all(set(case["graph"]["us"]) == {"fp16_linear", "lut", "lut_one_launch"} for case in aligned)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the stubbed launch is timed on the CPU")
def test_the_launch_host_benchmark_times_both_paths_and_restores_the_kernel(tmp_path):
    """tools/bench_launch_host.py: both paths timed per shape, JSON written, the real kernel put back."""
    import json

    bench = load_tool("bench_launch_host")
    kernel = kt._gemv_widths_kernel
    out = tmp_path / "host.json"
    bench.main(["--calls", "20", "--rounds", "2", "--out", str(out)], standalone_mode=False)
    report = json.loads(out.read_text())
    assert set(report["cases"]) == set(bench.SHAPES) and report["device"] == "cpu"
    for case in report["cases"].values():
        assert all(len(case["rounds_us"][name]) == 2 and case["us"][name] > 0 for name in ("lut_gemv_streams", "gemv_plan"))
    assert kt._gemv_widths_kernel is kernel
