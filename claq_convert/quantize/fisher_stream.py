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
whose gradient is exactly that sum). A model may also compute layers' keywords from the lookup's output
(Gemma 4 projects it into every layer's per-layer input): the backward pass then also takes the gradient at
those keywords, and the surrogate adds their terms. Where a layer stores its keys and values for later
layers to attend over (Gemma 4's shared KV, pipeline.shared_mappings), the later layers read them as leaves
whose gradients add up over every reader, and the storing layer's backward takes that sum as the gradient
of what it stores. The sums are sensitivity.fisher_sums' up to float rounding (tests/test_sensitivity.py
compares them on every family).

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

from .pipeline import (_as_keywords, _first_layer_inputs, _layer_output, _materialise, _parameter_name, _release,
    _set_tensor, head_and_embedding_names, outside_modules, shared_mappings)
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
        self.keywords: dict = {}  # what the model called it with, after the hidden states
        self.output: Optional[torch.Tensor] = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the model's forward reads from its layers (an attention type)
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        if self.first:
            self.seen = hidden_states
        self.keywords = _as_keywords(self.layer.forward, args, kwargs)
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
    # a tied head: the keywords computed from the lookup's output, whose gradients its sums need too
    looked_up = tail.lookup_keywords(states[0], windows[0][None].to(device)) if head and tail.tied else None
    keyword_grads = [{} for _ in windows]  # window -> (layer, keyword) -> d loss / d keyword
    shared = [_SharedGradients(shared_mappings(kwargs, k)) for k in range(len(windows))]
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
            leaves = {n: kw[n].detach().requires_grad_(True) for n in (looked_up[index] if looked_up else ())}
            shared[k].watch()
            outputs = [_layer_output(layer(x, **{**kw, **leaves}))]
            stored, stored_grads = shared[k].stored()
            torch.autograd.backward(outputs + stored, [grads[k]] + stored_grads)
            grads[k] = x.grad
            keyword_grads[k].update({(index, n): leaf.grad for n, leaf in leaves.items()})
        for handle in handles:
            handle.remove()
        _release(layer)
        next(steps, None)
    for each in shared:
        each.clear()
    head_name = tail.head_sums(squares, states, windows, grads, keyword_grads) if head else None
    next(steps, None)
    order = [f"{family.layers}.{i}.{n}.weight" for i in range(len(layers)) for n in arch.linears(i)]
    return squares.sums(head_name, order + ([head_name] if head_name else []))


class _SharedGradients:
    """One window's shared mappings in the backward pass, layers last to first: before a layer runs, what the
    mappings hold becomes leaves (`watch`), so that every later layer reading a stored value adds its gradient
    there; when the layer that stored a value runs again, `stored()` hands its new value with the gradient its
    readers summed, for the layer's backward to carry on."""

    def __init__(self, mappings: list):
        self.mappings = mappings
        self.leaves: dict[tuple[int, object], tuple[torch.Tensor, ...]] = {}  # (mapping, key) -> leaves
        self.before: dict[tuple[int, object], int] = {}

    def watch(self) -> None:
        self.before.clear()
        for m, mapping in enumerate(self.mappings):
            for key, value in list(mapping.items()):
                if (m, key) not in self.leaves:
                    tensors = value if isinstance(value, tuple) else (value,)
                    leaves = tuple(t.detach().requires_grad_(True) for t in tensors)
                    self.leaves[(m, key)] = leaves
                    mapping[key] = leaves if isinstance(value, tuple) else leaves[0]
                self.before[(m, key)] = id(mapping[key])

    def stored(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the values the layer just run stored over watched ones, their readers' gradients)."""
        values, grads = [], []
        for m, mapping in enumerate(self.mappings):
            for key, value in mapping.items():
                if self.before.get((m, key)) == id(value) or (m, key) not in self.leaves:
                    continue
                tensors = value if isinstance(value, tuple) else (value,)
                for tensor, leaf in zip(tensors, self.leaves.pop((m, key))):
                    if leaf.grad is not None and tensor.requires_grad:
                        values.append(tensor)
                        grads.append(leaf.grad)
        return values, grads

    def clear(self) -> None:
        self.leaves.clear()
        for mapping in self.mappings:
            mapping.clear()


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

    def lookup_keywords(self, state: torch.Tensor, window: torch.Tensor) -> list[tuple[str, ...]]:
        """Per layer, the keywords the model computes from the input embedding's output (Gemma 4's per-layer
        inputs: a projection of it): found by one pass of the tail with the embedding's weight watched."""
        weight = self.model.get_input_embeddings().weight
        weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                self._loss(state.detach(), window)
            return [tuple(n for n, v in s.keywords.items() if isinstance(v, torch.Tensor) and v.requires_grad)
                    for s in self.stand_ins]
        finally:
            weight.requires_grad_(False)
            for s in self.stand_ins:
                s.keywords = {}

    def head_sums(self, squares: SquaredGradients, states: Sequence[torch.Tensor], windows: torch.Tensor,
                  first_grads: Sequence[torch.Tensor], keyword_grads: Optional[Sequence[dict]] = None) -> str:
        """Fold the head's squared gradients into `squares` (a tied head: plus its lookup's gradient,
        first_grads being d loss / d (the first layer's input), and keyword_grads per window d loss / d each
        keyword computed from the lookup's output, by (layer, keyword)); return the head's name."""
        handle = squares.watch(self.head_name, self.head.weight)
        try:
            for k, (state, window, grad) in enumerate(zip(states, windows, first_grads)):
                loss = self._loss(state.detach(), window[None].to(self.device))
                if self.tied:  # d/dE of <grad, embedding output> is what the lookup adds to E's gradient
                    loss = loss + (self.stand_ins[0].seen * grad).sum()
                    for (index, name), keyword_grad in (keyword_grads[k] if keyword_grads else {}).items():
                        loss = loss + (self.stand_ins[index].keywords[name] * keyword_grad).sum()
                loss.backward()
        finally:
            handle.remove()
            self.head.weight.requires_grad_(False)
        return self.head_name
