"""Mixture-of-experts layers as one linear per expert matrix: what quantization, the file and the runtime see.

transformers 5 keeps a layer's experts stacked in two 3-D parameters, gate_up_proj [E, 2I, H] (each
expert's gate rows, then its up rows) and down_proj [E, H, I], and multiplies slices of them; checkpoints
store one [out, in] matrix per expert and matrix (experts.{e}.gate_proj / up_proj / down_proj), which
transformers stacks on load. `ExpertLinears` puts those matrices back as one linear each, named as the
checkpoint names them, and routes tokens with the very arithmetic of transformers' loop. So each expert's
linears see exactly the tokens routed to them (the calibration hooks give each its own Hessian), the file
stores one quantized matrix per expert and matrix, and load() puts a ClaqLinear in each one's place.

Only the stacked layout with no other parameters is unstacked (checked per module); which families use
it, with which gate/up order and activation, is the family table's knowledge (architectures.py), each
entry tested against transformers' own forward on a tiny model.
"""
from __future__ import annotations

import torch

STACKED = ("gate_up_proj", "down_proj")  # the parameters of a stacked experts module, and nothing else


class Expert(torch.nn.Module):
    """One expert's MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, gate_proj: torch.nn.Linear, up_proj: torch.nn.Linear, down_proj: torch.nn.Linear, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(torch.nn.ModuleList):
    """The experts of one layer, expert e at index e; called as transformers calls its stacked module."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():  # index E marks a slot routed nowhere, as in transformers
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        for index in hit:
            if index == len(self):
                continue
            position, tokens = torch.where(mask[index])
            out = self[index](hidden_states[tokens]) * top_k_weights[tokens, position, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final


def is_stacked(module: torch.nn.Module) -> bool:
    """Whether `module` holds experts in transformers' stacked layout, and only them."""
    params = dict(module.named_parameters(recurse=False))
    act_fn = getattr(module, "act_fn", None)
    if sorted(params) != sorted(STACKED) or any(child is not act_fn for child in module.children()):
        return False
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    return (gate_up.dim() == down.dim() == 3 and gate_up.shape[0] == down.shape[0]
            and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
            and callable(act_fn))


def unstacked(module: torch.nn.Module) -> ExpertLinears:
    """The per-expert linears of a stacked experts module: on the meta device where its parameters are, else
    with their values (slices copied)."""
    gate_up, down = module.gate_up_proj, module.down_proj
    experts, hidden, inner = down.shape

    def linear(rows: int, columns: int, values) -> torch.nn.Linear:
        made = torch.nn.Linear(columns, rows, bias=False, device=gate_up.device, dtype=gate_up.dtype)
        if not made.weight.is_meta:
            with torch.no_grad():
                made.weight.copy_(values)
        made.weight.requires_grad_(gate_up.requires_grad)
        return made

    return ExpertLinears(Expert(linear(inner, hidden, gate_up[e, :inner]), linear(inner, hidden, gate_up[e, inner:]),
                                linear(hidden, inner, down[e]), module.act_fn) for e in range(experts))


def unstack_experts(layers: torch.nn.ModuleList, path: str) -> None:
    """Every layer's stacked experts module at `path` replaced by its ExpertLinears (in place); a layer
    whose module at `path` is already unstacked, or that has none (a dense layer of the mixture), is left
    as it is."""
    for index, layer in enumerate(layers):
        try:
            module = layer.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, ExpertLinears):
            continue
        if not is_stacked(module):
            raise ValueError(f"layer {index}'s {path} is a {type(module).__name__}, not experts stacked as "
                             f"{' and '.join(STACKED)} [E, out, in]")
        owner, _, leaf = path.rpartition(".")
        setattr(layer.get_submodule(owner) if owner else layer, leaf, unstacked(module))
