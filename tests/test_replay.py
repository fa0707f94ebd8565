"""A layer's finished parts are replayed, not recomputed: the same numbers, less work."""
import numpy as np
import pytest
import torch

from claq_convert.quantize import replay
from claq_convert.quantize.pipeline import QuantConfig, quantize_model
from claq_convert.quantize.replay import LayerReplay
from claq_convert.models.source import ModelSource
from conftest import FAMILY_CONFIGS, build_tiny_model


class CountingLinear(torch.nn.Linear):
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = CountingLinear(4, 4)

    def forward(self, x):
        return self.a(x)


class Toy(torch.nn.Module):
    """inner (its linear a) then b; the caller adds to inner's output in place, which a kept copy must survive."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = Inner()
        self.b = CountingLinear(4, 4)

    def forward(self, x):
        y = self.inner(x)
        y += 1.0
        return self.b(y)


def passes(toy, states, rep, times):
    outs = []
    for _ in range(times):
        with rep.passing():
            outs.append([toy(h) for h, _ in rep.batches(states, [{}] * len(states))])
    return outs


def test_a_finished_module_runs_once_per_batch_and_in_place_writes_do_not_leak():
    toy, states = Toy(), [torch.randn(3, 4) for _ in range(2)]
    with torch.no_grad():
        expected = [toy(h) for h in states]
        toy.inner.a.calls = 0
        rep = LayerReplay(toy, ["inner.a", "b"], states)
        rep.finished(["inner.a"])
        outs = passes(toy, states, rep, 3)
    assert toy.inner.a.calls == 2 and toy.b.calls == 2 + 6  # a: once per batch; b: not finished, every pass
    for out in outs:
        assert all(torch.equal(o, e) for o, e in zip(out, expected))
    assert set(rep.kept) == {"inner"}  # a's own outputs let go: inner's stand for them
    assert "forward" not in toy.inner.__dict__ and "forward" not in toy.inner.a.__dict__  # patched within a pass


def test_inner_outputs_are_let_go_once_the_outer_module_holds_every_batch():
    toy, states = Toy(), [torch.randn(3, 4) for _ in range(2)]
    with torch.no_grad():
        rep = LayerReplay(toy, ["inner.a", "b"], states)
        rep.finished(["inner.a"])
        passes(toy, states, rep, 1)
        assert set(rep.kept) == {"inner", "inner.a"} and all(len(v) == 2 for v in rep.kept.values())
        rep.finished(["b"])  # the whole layer is finished: the layer itself is never kept
        passes(toy, states, rep, 2)
    assert toy.inner.a.calls == 2 and toy.b.calls == 2 + 2 and set(rep.kept) == {"inner", "b"}
    rep.close()
    assert rep.kept == {} and rep.kept_bytes == 0


def test_a_container_never_called_leaves_its_children_to_keep_theirs():
    toy, states = Toy(), [torch.randn(3, 4) for _ in range(2)]
    toy.forward = lambda x: toy.b(toy.inner.a(x))  # inner is skipped, as a ModuleList is
    with torch.no_grad():
        rep = LayerReplay(toy, ["inner.a", "b"], states)
        rep.finished(["inner.a"])
        passes(toy, states, rep, 3)
    assert toy.inner.a.calls == 2 and set(rep.kept) == {"inner", "inner.a"} and rep.kept["inner"] == {}


def test_nothing_is_kept_past_the_budget(monkeypatch):
    monkeypatch.setattr(replay, "BUDGET_PER_STATE", 1)
    toy, states = Toy(), [torch.randn(3, 4) for _ in range(2)]
    with torch.no_grad():
        rep = LayerReplay(toy, ["inner.a", "b"], states)
        rep.finished(["inner.a"])
        passes(toy, states, rep, 2)
    # the first batch's outputs of inner and of a fill the budget (the inputs' 2 x 48 bytes)
    assert {n: list(v) for n, v in rep.kept.items()} == {"inner": [(0, 0)], "inner.a": [(0, 0)]}
    assert rep.kept_bytes == rep.budget_bytes == 2 * 3 * 4 * 4
    assert toy.inner.a.calls == 3  # the batch that did not fit ran again


def _results(model_dir, calibration, qc):
    return {name: r.dequantize() for name, r in quantize_model(ModelSource(model_dir), calibration, qc, batch_size=2)}


@pytest.mark.parametrize("pull", [0.0, 0.25])  # --toward-source: the source layer replays as well
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_replayed_conversion_equals_the_recomputed_one(family, pull, tmp_path, monkeypatch):
    model_dir = build_tiny_model(tmp_path / family, family=family)
    calibration = torch.randint(2, 200, (5, 24), generator=torch.Generator().manual_seed(1))
    qc = QuantConfig(bits=3.0, toward_source=pull)
    replayed = _results(model_dir, calibration, qc)
    monkeypatch.setattr(replay, "BUDGET_PER_STATE", 0)  # nothing kept: every pass computes everything
    recomputed = _results(model_dir, calibration, qc)
    assert list(replayed) == list(recomputed)  # the head/embedding too: they see the last layer's outputs
    assert all(np.array_equal(replayed[n], recomputed[n]) for n in replayed)


def test_each_block_linear_runs_once_per_batch_on_llama(tmp_path, monkeypatch):
    """Recomputed, q/k/v would run in four passes, o in three, gate/up in two."""
    from claq_convert.quantize import pipeline

    model_dir = build_tiny_model(tmp_path / "llama")
    calibration = torch.randint(2, 200, (4, 16), generator=torch.Generator().manual_seed(2))
    calls: dict[str, int] = {}
    linear_forward = torch.nn.Linear.forward
    materialise = pipeline._materialise

    def counted(self, x):
        name = getattr(self, "counted_as", None)
        if name is not None:
            calls[name] = calls.get(name, 0) + 1
        return linear_forward(self, x)

    def named(module, prefix, source, device):  # name each layer's linears as the layer is loaded
        materialise(module, prefix, source, device)
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Linear):
                m.counted_as = name
                calls.setdefault(name, 0)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    monkeypatch.setattr(pipeline, "_materialise", named)
    list(quantize_model(ModelSource(model_dir), calibration, QuantConfig(bits=3.0, quantize_embeddings=False),
                        batch_size=2))
    # two layers x two batches, once each; a group's pass also runs the linears before its last on the
    # first batch (it learns there that they read one input, then stops before the first)
    once = {"self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"}
    assert calls == {**{n: 2 * 2 for n in once}, **{n: 2 * 3 for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                      "mlp.gate_proj")}}


def test_a_module_called_twice_keeps_each_call_and_changed_inputs_compute_afresh():
    toy, states = Toy(), [torch.randn(3, 4) for _ in range(2)]
    pre = CountingLinear(4, 4)
    toy.forward = lambda x: toy.b(toy.inner(toy.inner(pre(x)) * 2.0))  # inner twice; pre feeds it
    with torch.no_grad():
        rep = LayerReplay(toy, ["inner.a", "b"], states)
        rep.finished(["inner.a"])
        passes(toy, states, rep, 2)
        assert toy.inner.a.calls == 4 and sorted(rep.kept["inner"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        pre.weight.mul_(1.5)  # what a table listing a module before its feeder would do to it
        (out,) = passes(toy, states, rep, 1)
        expected = [toy.b(toy.inner.a(toy.inner.a(pre(h)) * 2.0)) for h in states]
    assert toy.inner.a.calls == 4 + 4 + 4 and all(torch.equal(o, e) for o, e in zip(out, expected))


def test_the_budget_is_at_most_half_the_free_memory(monkeypatch):
    states = [torch.randn(3, 4) for _ in range(2)]
    assert LayerReplay(Toy(), ["inner.a", "b"], states).budget_bytes == replay.BUDGET_PER_STATE * 2 * 48
    monkeypatch.setattr(replay, "free_bytes", lambda device: 100)
    assert LayerReplay(Toy(), ["inner.a", "b"], states).budget_bytes == 50


def test_the_source_layers_replay_and_the_quantized_ones_split_the_free_memory(tmp_path, monkeypatch):
    """--toward-source runs two replays a layer: together they keep at most FREE_MEMORY_SHARE of it."""
    from claq_convert.quantize import pipeline

    budgets: list[int] = []

    class Recorded(LayerReplay):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            budgets.append(self.budget_bytes)

    monkeypatch.setattr(replay, "free_bytes", lambda device: 1000)
    monkeypatch.setattr(pipeline, "LayerReplay", Recorded)
    model_dir = build_tiny_model(tmp_path / "llama")
    calibration = torch.randint(2, 200, (4, 16), generator=torch.Generator().manual_seed(3))
    for pull, each in ((0.0, 500), (0.25, 250)):
        budgets.clear()
        list(quantize_model(ModelSource(model_dir), calibration,
                            QuantConfig(bits=3.0, quantize_embeddings=False, toward_source=pull), batch_size=2))
        assert budgets == [each] * (2 if pull else 1) * 2  # two layers


def test_return_freed_memory_hands_the_heaps_free_pages_back():
    """Freed blocks below glibc's mmap threshold stay in its heap (resident) until trimmed: the pipeline
    trims after each layer, as each layer frees its transients."""
    from claq_convert.timing import rss_bytes

    if replay._malloc_trim() is None or not rss_bytes():
        pytest.skip("malloc_trim is glibc's; RSS is read from Linux's /proc")
    blocks = [np.ones(64 * 1024 // 8) for _ in range(4096)]  # 256 MiB in 64 KiB blocks, from the heap
    last = blocks[-1]  # the heap's top stays in use, so free() alone cannot shrink the heap
    del blocks
    before = rss_bytes()
    replay.return_freed_memory()
    assert before - rss_bytes() > 128 * 2**20
    assert last.sum() == last.size
