"""Finding routed-expert sets in a model, by structure, and the per-layout adapters.

An *expert set* is one module holding the E routed experts of a layer as 3-D parameters, called as
`experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`. Detection is structural: any module with
two or more 3-D parameters sharing their first dimension is a candidate, and a layout adapter (found through the
`LAYOUTS` registry) must claim it, or the model is refused with an error naming the module. No transformers import:
this module works on plain `torch.nn` structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model has no routed experts mode-hf can quantize, or a layout it does not know."""


class GatedActivation(nn.Module):
    """`act(gate) * up` on a fused `gate_up` output [n, 2I] -> [n, I] (SwiGLU and friends)."""

    def __init__(self, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # [n, I] each
        return self.act_fn(gate) * up


@dataclass(frozen=True)
class ExpertLayout:
    """How one family of fused-experts modules stores and applies its weights."""

    name: str
    matches: Callable[[nn.Module], bool]
    weights: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]  # gate_up [E, 2I, H], down [E, H, I]
    activation: Callable[[nn.Module], nn.Module]
    call_arguments: Callable[[tuple, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _fused_matches(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False)
        and getattr(module, "gate_up_proj_bias", None) is None
        and hasattr(module, "act_fn")
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]
        and gate_up.shape[2] == down.shape[1]
    )


def _positional_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args) :]]
    return values[0], values[1], values[2]


FUSED_GATE_UP = ExpertLayout(
    name="fused_gate_up",
    matches=_fused_matches,
    weights=lambda module: (module.gate_up_proj, module.down_proj),
    activation=lambda module: GatedActivation(module.act_fn),
    call_arguments=_positional_call,
)

# The registry: the first layout that matches a candidate module adapts it.
LAYOUTS: list[ExpertLayout] = [FUSED_GATE_UP]


@dataclass
class ExpertSet:
    """One routed-expert set found in a model."""

    name: str
    module: nn.Module
    layout: ExpertLayout

    @property
    def shape(self) -> tuple[int, int, int]:
        """(num_experts, hidden, intermediate)."""
        gate_up, down = self.layout.weights(self.module)
        return gate_up.shape[0], down.shape[1], down.shape[2]

    @property
    def params_per_expert(self) -> int:
        """Weights of one expert (gate + up + down)."""
        _, hidden, intermediate = self.shape
        return 3 * hidden * intermediate


def _is_candidate(module: nn.Module) -> bool:
    cubes = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    return len(cubes) >= 2 and len({p.shape[0] for p in cubes}) == 1


def _skipped(name: str, patterns: Sequence[str]) -> bool:
    dotted = f".{name}."
    return any(f".{p}." in dotted or name.startswith(f"{p}.") or name == p for p in patterns)


def find_expert_sets(model: nn.Module, skip: Sequence[str] = ()) -> list[ExpertSet]:
    """All routed-expert sets of `model`, in module order.

    Args:
        model: any torch module (typically a transformers model, possibly on the meta device).
        skip: module-name patterns (a dotted component or a prefix) whose expert sets are left alone.

    Raises:
        UnsupportedModelError: no expert set at all, or a candidate no layout adapter understands.
    """
    found: list[ExpertSet] = []
    for name, module in model.named_modules():
        if not _is_candidate(module) or _skipped(name, skip):
            continue
        layout = next((layout for layout in LAYOUTS if layout.matches(module)), None)
        if layout is None:
            shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}) holds 3-D expert weights {shapes} in a layout mode-hf "
                f"does not support; expected fused experts with gate_up_proj [E, 2I, H], down_proj [E, H, I] and "
                f"an act_fn (known layouts: {[layout.name for layout in LAYOUTS]})."
            )
        found.append(ExpertSet(name, module, layout))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no routed Mixture-of-Experts layers mode-hf can quantize (looked for "
            "modules holding 3-D per-expert weights, e.g. `mlp.experts.gate_up_proj [E, 2I, H]`)."
        )
    return found


def decoder_layers(model: nn.Module, expert_set_name: str) -> nn.ModuleList:
    """The ModuleList of decoder layers that contains `expert_set_name` (e.g. `...language_model.layers`)."""
    parts = expert_set_name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if parts[end].isdigit():
            container = model.get_submodule(".".join(parts[:end]))
            if isinstance(container, nn.ModuleList):
                return container
    raise UnsupportedModelError(f"expert set {expert_set_name!r} is not inside a ModuleList of decoder layers.")


def find_router(model: nn.Module, expert_set: ExpertSet) -> nn.Parameter:
    """The router weight [E, H] of an expert set: a sibling module's 2-D `weight` with E rows.

    Raises:
        UnsupportedModelError: no such sibling (the router is fused elsewhere or has another shape).
    """
    parent_name, _, own = expert_set.name.rpartition(".")
    parent = model.get_submodule(parent_name)
    num_experts, hidden, _ = expert_set.shape
    for name, child in parent.named_children():
        weight = getattr(child, "weight", None)
        if name != own and isinstance(weight, nn.Parameter) and tuple(weight.shape) == (num_experts, hidden):
            return weight
    raise UnsupportedModelError(
        f"no router found beside {expert_set.name!r}: expected a sibling module with a weight of shape "
        f"({num_experts}, {hidden})."
    )
