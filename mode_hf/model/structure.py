"""Structure queries on a model: its routed-expert sets (found by structure, adapted by `layouts`), the decoder
layers that hold them, their routers and the dense linears around them.

An *expert set* is one module holding the E routed experts of a layer as 3-D parameters `gate_up_proj` and
`down_proj`. Detection is structural: any module with two or more 3-D parameters sharing their first dimension is a
candidate, and a layout adapter from `layouts.LAYOUTS` must claim it, or the model is refused with an error naming
the module, its class and what was expected. A new family with a known layout needs no code change. No
transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .layouts import LAYOUTS, TOKEN_ROUTES, ExpertLayout, TokenRoute


@dataclass
class ExpertSet:
    """One routed-expert set found in a model."""

    name: str
    module: nn.Module
    layout: ExpertLayout
    route: TokenRoute | None = None
    route_key: str = ""

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

    def tokens(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """bool [B * S]: which tokens of `batch` this set sees (None: all of them)."""
        return self.route.select(batch, self.route_key) if self.route else None


def _is_candidate(module: nn.Module) -> bool:
    """Two or more 3-D parameters sharing a first dimension of at least 2 (E experts; a [1, n, d] pair is an
    embedding table such as a class token and position embeddings, not experts)."""
    cubes = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    return len(cubes) >= 2 and len({p.shape[0] for p in cubes}) == 1 and cubes[0].shape[0] >= 2


def name_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether module `name` falls under one of `patterns` (a dotted component of the name, or a prefix)."""
    dotted = f".{name}."
    return any(f".{p}." in dotted or name.startswith(f"{p}.") or name == p for p in patterns)


def _route_of(model: nn.Module, name: str) -> tuple[TokenRoute | None, str]:
    parts = name.split(".")
    if len(parts) < 3:
        return None, ""
    block, child = model.get_submodule(".".join(parts[:-2])), parts[-2]
    route = next((r for r in TOKEN_ROUTES if r.matches(block, child)), None)
    return route, child if route else ""


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
        if not _is_candidate(module) or name_matches(name, skip):
            continue
        layout = next((layout for layout in LAYOUTS if layout.matches(module)), None)
        if layout is None:
            shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
            known = "; ".join(f"{layout.name}: {layout.description}" for layout in LAYOUTS)
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}) holds 3-D expert weights {shapes} in a layout mode-hf "
                f"does not support. Expected parameters gate_up_proj and down_proj (fused gate|up, 2I = twice the "
                f"down projection's intermediate size) and an `act_fn` or `_apply_gate`, in one of the known "
                f"layouts ({known}). Leave it 16-bit with modules_to_not_convert=[{name!r}]."
            )
        route, key = _route_of(model, name)
        found.append(ExpertSet(name, module, layout, route, key))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no routed Mixture-of-Experts layers mode-hf can quantize (looked for "
            "modules holding 3-D per-expert weights, e.g. `mlp.experts.gate_up_proj [E, 2I, H]`)."
        )
    return found


def decoder_layers(model: nn.Module, expert_set_name: str) -> nn.ModuleList:
    """The ModuleList of decoder layers that contains `expert_set_name` (e.g. `...language_model.layers`)."""
    prefix = decoder_layers_name(model, expert_set_name)
    return model.get_submodule(prefix)


def decoder_layers_name(model: nn.Module, expert_set_name: str) -> str:
    """The name of the ModuleList of decoder layers that contains `expert_set_name`."""
    parts = expert_set_name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if parts[end].isdigit():
            name = ".".join(parts[:end])
            if isinstance(model.get_submodule(name), nn.ModuleList):
                return name
    raise UnsupportedModelError(f"expert set {expert_set_name!r} is not inside a ModuleList of decoder layers.")


def find_router(model: nn.Module, expert_set: ExpertSet) -> nn.Parameter:
    """The router weight [E, H] of an expert set: a sibling module's 2-D `weight` with E rows.

    Raises:
        UnsupportedModelError: no such sibling (the router is fused elsewhere or has another shape).
    """
    module = router_module(model, expert_set)
    if module is None:
        num_experts, hidden, _ = expert_set.shape
        raise UnsupportedModelError(
            f"no router found beside {expert_set.name!r}: expected a sibling module with a weight of shape "
            f"({num_experts}, {hidden})."
        )
    return module.weight


def router_module(model: nn.Module, expert_set: ExpertSet) -> nn.Module | None:
    """The sibling module holding the router weight [E, H] of an expert set, or None."""
    parent_name, _, own = expert_set.name.rpartition(".")
    parent = model.get_submodule(parent_name)
    num_experts, hidden, _ = expert_set.shape
    for name, child in parent.named_children():
        weight = getattr(child, "weight", None)
        if name != own and isinstance(weight, nn.Parameter) and tuple(weight.shape) == (num_experts, hidden):
            return child
    return None


def dense_linears(model: nn.Module, sets: Sequence[ExpertSet], skip: Sequence[str] = ()) -> list[str]:
    """Names of the plain `nn.Linear` modules of the decoder layers that hold expert sets: attention, shared experts,
    dense MLPs; not routers (a Linear beside an expert set with E outputs), not scalar gates (1 output), not the
    vision tower or the LM head (outside the decoder layers), not `skip` patterns. In module order."""
    containers = sorted({decoder_layers_name(model, s.name) for s in sets})
    routers = {id(router_module(model, s)) for s in sets}
    found = []
    for container in containers:
        for name, module in model.get_submodule(container).named_modules():
            full = f"{container}.{name}"
            if (
                isinstance(module, nn.Linear)
                and id(module) not in routers
                and module.out_features > 1
                and not name_matches(full, skip)
            ):
                found.append(full)
    return found



def layers_container(model: nn.Module, sets: Sequence[ExpertSet]) -> str | None:
    """The one ModuleList of decoder layers holding every set (layer-at-a-time passes), or None (full passes)."""
    names = {decoder_layers_name(model, s.name) for s in sets}
    return names.pop() if len(names) == 1 else None
