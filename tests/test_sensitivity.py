"""The column Fisher sums behind --allocation fisher, checked against autograd one window at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from claq_convert import allocation
from claq_convert.kernels import column_sse_by_width
from claq_convert.sensitivity import FISHER_WINDOWS, column_fisher, spread_windows


def _manual(model, name: str, windows: torch.Tensor, rows_axis: int) -> np.ndarray:
    weight = dict(model.named_parameters())[name]
    total = torch.zeros(weight.shape[1 - rows_axis], dtype=torch.float64)
    for window in windows:
        logits = model(window[None], use_cache=False).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
        (grad,) = torch.autograd.grad(loss, weight)
        total += grad.double().square().sum(dim=rows_axis)
    return total.numpy()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_column_fisher_is_the_squared_gradient_summed_down_each_column(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model
    from claq_convert.architectures import family_of

    directory = build_tiny_model(tmp_path / family, family=family)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    entry = family_of(model.config)
    names = [n for n, _ in model.named_parameters() if entry.transposed(n) or n.endswith("proj.weight")]
    assert names
    windows = torch.randint(2, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    fisher = column_fisher(model, names, windows, entry.transposed)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    for name in names[:3]:
        expected = _manual(model, name, windows, 1 if entry.transposed(name) else 0)
        assert fisher[name].shape == expected.shape and fisher[name].min() >= 0
        np.testing.assert_allclose(fisher[name], expected, rtol=1e-4, atol=1e-12)
    with pytest.raises(ValueError, match="no parameter"):
        column_fisher(model, ["not.a.weight"], windows)


def test_fisher_losses_are_in_one_unit_and_drive_the_choice():
    """A weight the loss is sensitive to gets more bits; the estimate is fisher * SSE / 2 rows, not relative."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 32)).astype(np.float32)
    energy = np.ones(32)
    flat, steep = np.full(32, 1e-2), np.full(32, 1e2)
    tables = {"flat": allocation.candidates(W, energy, fisher=flat), "steep": allocation.candidates(W, energy, fisher=steep)}
    for a, b in zip(tables["flat"], tables["steep"]):
        assert a.nbytes == b.nbytes and b.loss == pytest.approx(a.loss * 1e4)  # linear in the Fisher sums
    four = next(c for c in tables["flat"] if c.setting == allocation.Setting(4, 4, 0.0))
    sse = column_sse_by_width(np.ascontiguousarray(W.T), 4)[:, 3]
    assert four.loss == pytest.approx(float(np.sum(flat * sse) / (2 * 64)))
    budget = tables["flat"][1].nbytes + tables["flat"][3].nbytes
    choice = allocation.allocate(tables, budget)
    assert choice["steep"].setting.target > choice["flat"].setting.target


def test_fisher_allocation_converts_within_the_budget(tiny_model_dir, text_file, tmp_path):
    from claq_convert.convert import ConvertOptions, run_conversion
    from claq_convert.pipeline import QuantConfig

    record = run_conversion(ConvertOptions(model_dir=tiny_model_dir, out=tmp_path / "f.claq",
                                           quant=QuantConfig(bpw=3.4, head_bits=3, allocation="fisher"),
                                           calib=(text_file,), nsamples=4, seqlen=32))
    s, chosen = record["summary"], record["allocation"]
    assert s["stored_bytes"] == chosen["allocated_bytes"] <= chosen["budget_bytes"]
    assert 3.4 - 0.25 < s["honest_bpw"] <= 3.4
    for name, (low, high, _) in chosen["targets"].items():
        assert set(record["tensors"][name]["bits_histogram"]) <= {str(low), str(high)}


def test_the_cli_offers_every_allocation_and_defaults_to_fisher():
    from claq_convert.cli import convert_cmd
    from claq_convert.pipeline import ALLOCATIONS, QuantConfig

    option = next(p for p in convert_cmd.params if p.name == "allocation")
    assert set(option.type.choices) == set(ALLOCATIONS) and option.default == QuantConfig().allocation == "fisher"


def test_fisher_windows_are_spread_over_every_calibration_source():
    # 64 self-sampled windows, then 16 of docs and 16 of code, as the default calibration concatenates them
    calibration = torch.arange(96).repeat_interleave(4).reshape(96, 4)
    rows = spread_windows(calibration)[:, 0].tolist()
    assert len(rows) == FISHER_WINDOWS == len(set(rows))
    assert rows == [i * 6 for i in range(16)]
    assert any(64 <= r < 80 for r in rows) and any(r >= 80 for r in rows)
    small = calibration[:5]
    assert torch.equal(spread_windows(small), small)
