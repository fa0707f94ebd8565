"""The Fisher sums of sensitivity.py with one decoder layer in memory at a time, so that measuring them
costs a model of any size what a layer of the conversion costs.

The gradient of one window's loss with respect to a layer's weights needs only the layer's input and the
gradient arriving at its output. So: a forward pass layer by layer keeps each layer's inputs (for every
window); the part after the layers (final norm, head, any logit scaling: the model's own code, with its
layers replaced by stand-ins that replay the stored states) gives the gradient at the last layer's
output; then the layers, last to first, are loaded again and run backward one window at a time, each
turning the gradient at its output into the one at its input and its weights' squared gradients into
the sums. A tied embedding is also the head: its gradient is the head's plus the one its lookup
receives, so it is taken last, from the model's tail with the lookup's gradient added (a surrogate loss
whose gradient is exactly that sum). The sums are sensitivity.fisher_sums' up to float rounding
(tests/test_sensitivity.py compares them on every family).

Memory: one layer, the inputs of one layer, and the embedding and head while the tail runs. Each
layer's inputs (windows x seqlen x hidden floats: 134 MB for a 7B layer at the 16 default windows of 512
tokens, 4.3 GB for its 32 layers) wait in a temporary file, removed when the pass ends or fails, until
the backward pass reaches the layer: disk for memory, bit for bit the same values.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from .pipeline import (_first_layer_inputs, _layer_output, _materialise, _parameter_name, _release, _set_tensor,
    head_and_embedding_names, outside_modules)
from ..models.architectures import resolve, skeleton
from ..models.source import ModelSource
from ..progress import Progress, no_progress
from .sensitivity import FisherSums, SquaredGradients, window_loss


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer while the model's tail runs: the first remembers its input (the
    embedding's output), the last returns a stored final state; the others pass their input on."""

    def __init__(self, layer: torch.nn.Module, as_tuple: bool):
        super().__init__()
        self.layer = layer
        self.as_tuple = as_tuple
        self.first = self.last = False
        self.seen: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the model's forward reads from its layers (an attention type)
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        if self.first:
            self.seen = hidden_states
        out = self.output if self.last else hidden_states
        return (out,) if self.as_tuple else out


class _SpilledInputs:
    """Every layer's inputs in a file of its own in `folder`, from the forward pass to the backward one."""

    def __init__(self, folder: str, device):
        self.folder, self.device = Path(folder), device

    def put(self, index: int, states: Sequence[torch.Tensor]) -> None:
        torch.save(torch.cat(list(states)).cpu(), self.folder / f"layer-{index}.pt")

    def take(self, index: int) -> list[torch.Tensor]:
        """The states put for layer `index`, one per window; the file is removed."""
        path = self.folder / f"layer-{index}.pt"
        states = torch.load(path, map_location=self.device, weights_only=True)
        path.unlink()
        return list(states.split(1))


def streamed_fisher_sums(source: ModelSource, windows: torch.Tensor, device="cpu", head: bool = False,
                         progress: Progress = no_progress) -> FisherSums:
    """sensitivity.FisherSums of every decoder-layer linear (and with `head` of the weight quantized as the
    output head: a tied embedding's own name) over `windows` [n, seqlen], one window's loss a term."""
    with tempfile.TemporaryDirectory(prefix="claq-fisher-") as folder:
        return _fisher_sums(source, windows, device, head, progress, _SpilledInputs(folder, device))


def _fisher_sums(source: ModelSource, windows: torch.Tensor, device, head: bool, progress: Progress,
                 inputs: _SpilledInputs) -> FisherSums:
    with torch.no_grad():
        _, config, arch, states, kwargs = _first_layer_inputs(source, windows, device, batch_size=1)
    family, layers = arch.family, list(arch.layers)  # the tail swaps stand-ins into arch.layers
    as_tuple = False
    steps = iter(progress(range(2 * len(layers) + 2), "measure sensitivity", 2 * len(layers) + 2))
    with torch.no_grad():
        for index, layer in enumerate(layers):
            _materialise(layer, f"{family.layers}.{index}.", source, device)
            inputs.put(index, states)
            outputs = [layer(h, **kw) for h, kw in zip(states, kwargs[index])]
            as_tuple = isinstance(outputs[0], tuple)
            states = [_layer_output(out) for out in outputs]
            _release(layer)
            next(steps, None)

    squares = SquaredGradients(family.transposed)
    tail = _Tail(config, source, device, as_tuple)
    grads = [tail.gradient(state, window[None].to(device)) for state, window in zip(states, windows)]
    next(steps, None)
    for index in reversed(range(len(layers))):
        layer = layers[index]
        prefix = f"{family.layers}.{index}."
        _materialise(layer, prefix, source, device)
        handles = [squares.watch(prefix + n + ".weight", layer.get_submodule(n).weight) for n in arch.linears(index)]
        handles += [squares.count(prefix + n + ".weight", layer.get_submodule(n))
                    for n in arch.linears(index) if n in arch.routed]
        for k, (x, kw) in enumerate(zip(inputs.take(index), kwargs[index])):
            x = x.detach().requires_grad_(True)
            torch.autograd.backward(_layer_output(layer(x, **kw)), grads[k])
            grads[k] = x.grad
        for handle in handles:
            handle.remove()
        _release(layer)
        next(steps, None)
    head_name = tail.head_sums(squares, states, windows, grads) if head else None
    next(steps, None)
    order = [f"{family.layers}.{i}.{n}.weight" for i in range(len(layers)) for n in arch.linears(i)]
    return squares.sums(head_name, order + ([head_name] if head_name else []))


class _Tail:
    """The model's own code after the decoder layers (and its embedding, for a tied head), run on stored
    final states: the layers are _Replay stand-ins while it runs."""

    def __init__(self, config, source: ModelSource, device, as_tuple: bool):
        self.model = model = skeleton(config, device)  # fresh: the first pass left its buffers on meta
        self.device = device
        arch = resolve(model, config)
        self.head_name, _ = head_and_embedding_names(model, config, set(source.names()))
        self.tied = self.head_name == _parameter_name(model, model.get_input_embeddings())
        self.stand_ins = [_Replay(layer, as_tuple) for layer in arch.layers]
        self.stand_ins[0].first = True
        self.stand_ins[-1].last = True
        for i, stand_in in enumerate(self.stand_ins):
            arch.layers[i] = stand_in
        for name, module in outside_modules(model, arch):
            _materialise(module, name + ".", source, device)
        self.head = model.get_output_embeddings()
        if self.tied:
            self.head.weight = model.get_input_embeddings().weight
        else:
            _set_tensor(self.head, "weight", source.tensor(self.head_name).float().to(device))
        head_prefix = self.head_name[: -len("weight")]
        for name, _ in list(self.head.named_parameters()):
            if name != "weight":
                _set_tensor(self.head, name, source.tensor(head_prefix + name).float().to(device))

    def _loss(self, state: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        self.stand_ins[-1].output = state
        return window_loss(self.model(window, use_cache=False).logits, window)

    def gradient(self, state: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """d loss / d (the last layer's output) for one window."""
        state = state.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self._loss(state, window), state)
        return grad

    def head_sums(self, squares: SquaredGradients, states: Sequence[torch.Tensor], windows: torch.Tensor,
                  first_grads: Sequence[torch.Tensor]) -> str:
        """Fold the head's squared gradients into `squares` (a tied head: plus its lookup's gradient,
        first_grads being d loss / d (the first layer's input)); return the head's name."""
        handle = squares.watch(self.head_name, self.head.weight)
        try:
            for state, window, grad in zip(states, windows, first_grads):
                loss = self._loss(state.detach(), window[None].to(self.device))
                if self.tied:  # d/dE of <grad, embedding output> is what the lookup adds to E's gradient
                    loss = loss + (self.stand_ins[0].seen * grad).sum()
                loss.backward()
        finally:
            handle.remove()
            self.head.weight.requires_grad_(False)
        return self.head_name
