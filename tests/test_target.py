"""--toward-source: GPTQ's target pulled toward the source layer's output (quantize/target.py, pipeline)."""
import copy

import pytest
import torch

from claq_convert.quantize.pipeline import QuantConfig, _group_hessians
from claq_convert.quantize.target import toward_source

from conftest import first_layer


def grams(tokens: int = 400, features: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randn(tokens, features, generator=g)
    # the source's inputs: a linear distortion of the quantized model's (what a weight can undo) and noise
    distortion = torch.eye(features) + 0.3 * torch.randn(features, features, generator=g)
    x_f = x_q @ distortion + 0.05 * torch.randn(tokens, features, generator=g)
    W = torch.randn(5, features, generator=g)
    return W, x_f, x_q, (2.0 / tokens) * x_f.T @ x_q, (2.0 / tokens) * x_q.T @ x_q


def test_the_full_pull_is_the_damped_least_squares_fit_of_the_source_output():
    W, x_f, x_q, C, H = grams()
    fitted = toward_source(W, C, H, pull=1.0, percdamp=0.01)
    damp = 0.01 * torch.diag(H).mean()
    # the normal equations of min ||V x_q - W x_f||^2 + damp ||V - W||^2: V (H + damp I) = W C + damp W
    assert torch.allclose(fitted @ (H + damp * torch.eye(H.shape[0])), W @ C + damp * W, atol=1e-4)
    # it maps the quantized model's inputs closer to the source output than W does
    assert torch.linalg.norm(x_q @ fitted.T - x_f @ W.T) < 0.5 * torch.linalg.norm(x_q @ W.T - x_f @ W.T)


def test_a_partial_pull_lies_that_share_of_the_way():
    W, _, _, C, H = grams(seed=1)
    full = toward_source(W, C, H, 1.0)
    assert torch.allclose(toward_source(W, C, H, 0.25), W + 0.25 * (full - W), atol=1e-5)


def test_no_pull_no_signal_or_no_input_error_keeps_the_weight():
    W, _, _, C, H = grams(seed=2)
    assert torch.equal(toward_source(W, C, H, 0.0), W)
    assert torch.allclose(toward_source(W, H, H, 1.0), W, atol=1e-5)  # the source's inputs are the model's
    silent = torch.zeros_like(H)
    assert torch.equal(toward_source(W, silent, silent, 0.5), W)


def test_group_hessians_with_a_source_sum_the_cross_products(tiny_model_dir):
    with torch.no_grad():
        calibration, arch, layer, states, kwargs = first_layer(tiny_model_dir)
        source_layer = copy.deepcopy(layer)
        g = torch.Generator().manual_seed(1)
        for parameter in layer.parameters():  # the quantized layer differs, so later groups' inputs differ too
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=g))
        source_states = [h + 0.1 * torch.randn(h.shape, generator=g) for h in states]
        inputs = {}

        def record(key, name):
            def hook(module, args):
                inputs[key, name] = args[0].reshape(-1, args[0].shape[-1]).float()
            return hook

        tokens = calibration.numel()
        for group in arch.family.groups:
            reference = {n: 0 for n in group}
            handles = [layer.get_submodule(n).register_forward_pre_hook(record("q", n)) for n in group]
            handles += [source_layer.get_submodule(n).register_forward_pre_hook(record("f", n)) for n in group]
            for h, h_f, kw in zip(states, source_states, kwargs):
                layer(h, **kw)
                source_layer(h_f, **kw)
                for n in group:
                    reference[n] = reference[n] + inputs["f", n].T @ inputs["q", n]
            for handle in handles:
                handle.remove()
            plain, none = _group_hessians(layer, {n: layer.get_submodule(n) for n in group}, states, kwargs)
            hessians, crosses = _group_hessians(layer, {n: layer.get_submodule(n) for n in group}, states, kwargs,
                                                source=(source_layer, source_states, None))
            assert none == {} and list(crosses) == list(group)
            for n in group:
                assert torch.equal(hessians[n], plain[n])  # H does not depend on the source pass
                assert torch.allclose(crosses[n], reference[n] * (2.0 / tokens), rtol=1e-4, atol=1e-5)
                assert not torch.allclose(crosses[n], hessians[n], rtol=1e-2)  # the source inputs did count


@pytest.mark.parametrize("fields, message", [
    (dict(toward_source=1.5), "share of the way"),
    (dict(toward_source=-0.1), "share of the way"),
    (dict(toward_source=0.25, method="kmeans"), "--method claq or gptq"),
])
def test_bad_pulls_are_refused_in_one_line(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**fields).validate()


def test_the_cli_refuses_a_pull_outside_the_way(tiny_model_dir):
    from click.testing import CliRunner

    from claq_convert.cli import convert_cmd

    result = CliRunner().invoke(convert_cmd, [str(tiny_model_dir), "--dry-run", "--toward-source", "2"])
    assert result.exit_code == 2 and "--toward-source" in result.output and "Traceback" not in result.output
