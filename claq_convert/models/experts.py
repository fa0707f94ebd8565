"""Mixture-of-experts layers as one linear per expert matrix: what quantization, the file and the runtime see.

transformers 5 keeps a layer's experts stacked in 3-D parameters and multiplies slices of them; most
checkpoints store one [out, in] matrix per expert and matrix (experts.{e}.gate_proj / up_proj /
down_proj), which transformers stacks on load, and some store the stacks themselves (gpt-oss, GraniteMoE,
a mixture saved in that layout: source.py reads those as the same per-expert matrices). `ExpertLinears`
puts the matrices back as one linear each, named as per-expert checkpoints name them, and routes tokens
with the very arithmetic of transformers' loop. So each expert's linears see exactly the tokens routed
to them (the calibration hooks give each its own Hessian), the file stores one quantized matrix per expert
and matrix, and load() puts a ClaqLinear in each one's place.

How a family's module stacks its experts (`Stacking`: axes, the gate/up order, biases, the expert's
activation) is the family table's knowledge (architectures.py); a module is unstacked only where its
parameters are exactly that layout's, each entry tested against transformers' own forward on a tiny model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

STACKED = ("gate_up_proj", "down_proj")  # the matrices of a stacked experts module
BIASES = ("gate_up_proj_bias", "down_proj_bias")
MATRICES = ("gate_proj", "up_proj", "down_proj")  # an expert's linears
UNGATED = ("up_proj", "down_proj")  # the stacks, and an expert's linears, of experts without a gate


def expert_shapes(hidden: int, inner: int) -> dict[str, tuple[int, int]]:
    """[out, in] of each of an expert's matrices."""
    return {"gate_proj": (inner, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner)}


class Expert(torch.nn.Module):
    """One expert's MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, gate_proj: torch.nn.Linear, up_proj: torch.nn.Linear, down_proj: torch.nn.Linear, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    @classmethod
    def of(cls, stacked: torch.nn.Module, gate_proj, up_proj, down_proj) -> "Expert":
        return cls(gate_proj, up_proj, down_proj, stacked.act_fn)

    @staticmethod
    def fits(stacked: torch.nn.Module) -> bool:
        """Whether the stacked module holds what `of` takes from it."""
        return callable(getattr(stacked, "act_fn", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UngatedExpert(torch.nn.Module):
    """One expert's MLP without a gate: down(act(up(x))) (Nemotron-H's, with relu^2)."""

    def __init__(self, up_proj: torch.nn.Linear, down_proj: torch.nn.Linear, act_fn):
        super().__init__()
        self.up_proj, self.down_proj = up_proj, down_proj
        self.act_fn = act_fn

    @classmethod
    def of(cls, stacked: torch.nn.Module, up_proj, down_proj) -> "UngatedExpert":
        return cls(up_proj, down_proj, stacked.act_fn)

    fits = staticmethod(Expert.fits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


class ClampedSwigluExpert(torch.nn.Module):
    """gpt-oss's expert: gate clamped above, up clamped both ways at `limit`, then
    down((up + 1) * gate * sigmoid(alpha * gate)), as transformers' GptOssExperts computes it."""

    def __init__(self, gate_proj: torch.nn.Linear, up_proj: torch.nn.Linear, down_proj: torch.nn.Linear,
                 alpha: float, limit: float):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.alpha, self.limit = alpha, limit

    @classmethod
    def of(cls, stacked: torch.nn.Module, gate_proj, up_proj, down_proj) -> "ClampedSwigluExpert":
        return cls(gate_proj, up_proj, down_proj, stacked.alpha, stacked.limit)

    @staticmethod
    def fits(stacked: torch.nn.Module) -> bool:
        return all(isinstance(getattr(stacked, a, None), (int, float)) for a in ("alpha", "limit"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(min=None, max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


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


class ScaledInputExperts(ExpertLinears):
    """Llama 4's experts: called with E blocks of the layer's T tokens, block e each token times its router
    score for expert e (0 where the router did not pick e), and returning E blocks of outputs. A row of
    zeros goes to zeros through an expert without biases, so each expert runs on its nonzero rows only:
    the tokens routed to it, as transformers' batched product computes them, and what its calibration sees."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        blocks = hidden_states.view(len(self), -1, hidden_states.shape[-1])
        out = torch.zeros_like(blocks)
        for index, expert in enumerate(self):
            rows = blocks[index].any(dim=-1).nonzero()[:, 0]
            if rows.numel():
                out[index, rows] = expert(blocks[index, rows]).to(out.dtype)
        return out.view(-1, hidden_states.shape[-1])


@dataclass(frozen=True)
class Stacking:
    """How a transformers experts module stacks E experts of hidden size H and inner size I.

    Default (most families): gate_up_proj [E, 2I, H] holding an expert's gate rows, then its up rows;
    down_proj [E, H, I]; no biases. gpt-oss: both stored [E, in, out] (x @ W), gate and up outputs
    alternating, a bias beside each matrix, its own activation. Experts without a gate (Nemotron-H's):
    up_proj [E, I, H] and down_proj [E, H, I].
    """
    transposed: bool = False   # matrices stored [E, in, out]
    interleaved: bool = False  # gate_up's outputs alternate gate, up (else all gates, then all ups)
    biases: bool = False       # gate_up_proj_bias [E, 2I], down_proj_bias [E, H]
    gated: bool = True         # gate_up_proj (else up_proj) beside down_proj
    expert: type = Expert      # one expert's MLP
    linears: type = ExpertLinears  # the module holding them, called as the model calls its experts

    @property
    def stacks(self) -> tuple[str, str]:
        """The stacked matrices: the one reading the expert's input, then down_proj."""
        return STACKED if self.gated else UNGATED

    @property
    def matrices(self) -> tuple[str, ...]:
        """An expert's linears, in the order its expert class takes them."""
        return MATRICES if self.gated else UNGATED

    @property
    def parameters(self) -> tuple[str, ...]:
        return self.stacks + (BIASES if self.biases else ())

    def split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) of one expert's gate_up matrix as [2I, H] (`oriented`), or of its gate_up bias [2I]."""
        return (gate_up[0::2], gate_up[1::2]) if self.interleaved else gate_up.chunk(2)

    def oriented(self, matrix: torch.Tensor) -> torch.Tensor:
        """One expert's stored matrix as [out, in]."""
        return matrix.T if self.transposed else matrix

    def shapes(self, gate_up_shape, down_shape) -> tuple[int, int, int]:
        """(E, H, I) of stacked matrices of these shapes (gate_up's, or up's where there is no gate), or
        ValueError where they do not fit this layout."""
        if len(gate_up_shape) != 3 or len(down_shape) != 3 or gate_up_shape[0] != down_shape[0]:
            raise ValueError(f"stacked experts of shapes {list(gate_up_shape)} and {list(down_shape)}")
        experts, *gate_up_out_in = gate_up_shape
        _, *down_out_in = down_shape
        if self.transposed:
            gate_up_out_in, down_out_in = gate_up_out_in[::-1], down_out_in[::-1]
        (two_inner, hidden), (hidden_down, inner) = gate_up_out_in, down_out_in
        if two_inner != (2 if self.gated else 1) * inner or hidden != hidden_down:
            raise ValueError(f"stacked experts of shapes {list(gate_up_shape)} and {list(down_shape)}")
        return experts, hidden, inner




PLAIN = Stacking()
GPT_OSS = Stacking(transposed=True, interleaved=True, biases=True, expert=ClampedSwigluExpert)
UNGATED_PLAIN = Stacking(gated=False, expert=UngatedExpert)
# Llama 4: [E, in, out] stacks, gate then up; the model scales each token by its router score before the
# experts and hands them every token, E blocks of them
LLAMA4 = Stacking(transposed=True, linears=ScaledInputExperts)


def is_stacked(module: torch.nn.Module, stacking: Stacking = PLAIN) -> bool:
    """Whether `module` holds experts stacked as `stacking` lays them out, and nothing else."""
    params = dict(module.named_parameters(recurse=False))
    act_fn = getattr(module, "act_fn", None)
    if sorted(params) != sorted(stacking.parameters) or any(child is not act_fn for child in module.children()):
        return False
    try:
        experts, hidden, inner = stacking.shapes(*(params[name].shape for name in stacking.stacks))
    except ValueError:
        return False
    biases_fit = not stacking.biases or (params["gate_up_proj_bias"].shape == (experts, 2 * inner)
                                         and params["down_proj_bias"].shape == (experts, hidden))
    return biases_fit and stacking.expert.fits(module)


def unstacked(module: torch.nn.Module, stacking: Stacking = PLAIN) -> ExpertLinears:
    """The per-expert linears of a stacked experts module: on the meta device where its parameters are, else
    with their values (slices copied)."""
    gate_up = getattr(module, stacking.stacks[0])  # up_proj alone where the experts have no gate
    experts, hidden, inner = stacking.shapes(gate_up.shape, module.down_proj.shape)
    shapes = expert_shapes(hidden, inner)

    def expert(e: int):
        gate, up = stacking.split(stacking.oriented(gate_up[e])) if stacking.gated else (None, stacking.oriented(gate_up[e]))
        values = {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": stacking.oriented(module.down_proj[e])}
        if stacking.biases:
            gate_bias, up_bias = stacking.split(module.gate_up_proj_bias[e])
            values.update({"gate_proj.bias": gate_bias, "up_proj.bias": up_bias,
                           "down_proj.bias": module.down_proj_bias[e]})
        linears = []
        for matrix in stacking.matrices:
            rows, columns = shapes[matrix]
            made = torch.nn.Linear(columns, rows, bias=stacking.biases, device=gate_up.device, dtype=gate_up.dtype)
            for name, param in made.named_parameters():
                if not param.is_meta:
                    with torch.no_grad():
                        param.copy_(values[f"{matrix}.{name}"])
                param.requires_grad_(gate_up.requires_grad)
            linears.append(made)
        return stacking.expert.of(module, *linears)

    return stacking.linears(expert(e) for e in range(experts))


def unstack_experts(layers: torch.nn.ModuleList, path: str, stacking: Stacking = PLAIN) -> None:
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
        if not is_stacked(module, stacking):
            raise ValueError(f"layer {index}'s {path} is a {type(module).__name__}, not experts stacked as "
                             f"{' and '.join(stacking.parameters)} in the layout its family names")
        owner, _, leaf = path.rpartition(".")
        setattr(layer.get_submodule(owner) if owner else layer, leaf, unstacked(module, stacking))
