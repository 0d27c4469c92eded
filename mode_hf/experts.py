"""Finding routed-expert sets in a model, by structure, and the per-family adapters.

An *expert set* is one module holding the E routed experts of a layer as 3-D parameters `gate_up_proj` and
`down_proj`. Detection is structural: any module with two or more 3-D parameters sharing their first dimension is a
candidate, and a layout adapter from the `LAYOUTS` registry must claim it, or the model is refused with an error
naming the module, its class and what was expected. A new family with a known layout needs no code change.

Every layout presents its set in one canonical form to the rest of mode-hf:
- weights: gate_up [E, 2I, H] and down [E, H, I], output-major like `F.linear`, plus optional biases [E, 2I], [E, H];
- the gate: `[n, 2I] -> [n, I]` on gate_up outputs in their stored row order (the module's own `_apply_gate` when it
  has one: interleaved or clamped gates come for free);
- a call: `Routed(inputs, top_k_index [T, k], top_k_weights [T, k])`, where inputs are per token [T, H] or per
  (token, slot) [T, k, H] (Llama4 scales each expert's input by its routing score: weights are then 1).

`TOKEN_ROUTES` covers families that send each token to only one of several expert sets of a layer (Ernie4.5-VL's
`text_moe` / `vision_moe`). No transformers import: this module works on plain `torch.nn` structure.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model has no routed experts mode-hf can quantize, or a layout it does not know."""


class Routed(NamedTuple):
    """One call of an expert set in canonical form."""

    inputs: torch.Tensor  # [T, H] per token, or [T, k, H] per (token, slot)
    top_k_index: torch.Tensor  # int [T, k]; index E marks an empty slot
    top_k_weights: torch.Tensor  # [T, k]


class GatedActivation(nn.Module):
    """`act(gate) * up` on a fused `gate_up` output [n, 2I] -> [n, I] (gate first, then up: SwiGLU and friends)."""

    def __init__(self, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # [n, I] each
        return self.act_fn(gate) * up


class ModuleGate(nn.Module):
    """The experts module's own `_apply_gate` (interleaved, clamped, ...), bound to a weightless copy of it."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a submodule: its (meta) parameters must not be registered

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.owner._apply_gate(gate_up)


def gate_of(module: nn.Module) -> nn.Module:
    """The gate function of an experts module, as a module (bound to `module`: pass a weightless shell for anything
    that outlives the call, as PackedExperts does)."""
    if callable(getattr(module, "_apply_gate", None)):
        return ModuleGate(module)
    if callable(getattr(module, "act_fn", None)):
        return GatedActivation(module.act_fn)
    raise UnsupportedModelError(f"{type(module).__name__} has neither `_apply_gate` nor `act_fn`: its gate is unknown.")


def _bias(module: nn.Module, name: str) -> torch.Tensor | None:
    bias = getattr(module, name, None)
    return bias if isinstance(bias, torch.Tensor) else None


_CALL_NAMES = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))


def _standard_call(args: tuple, kwargs: dict) -> Routed:
    """`experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`, under either family's names."""
    values = list(args[:3])
    for names in _CALL_NAMES[len(values) :]:
        values.append(next(kwargs[n] for n in names if n in kwargs))
    return Routed(values[0], values[1], values[2])


def _dense_routed_call(num_experts: int, args: tuple, kwargs: dict) -> Routed:
    """Llama4: `experts(x [E * T, H])`, every expert's block of rows its routed tokens' inputs already scaled by the
    routing score, zero rows for tokens not routed to it."""
    x = args[0] if args else kwargs["hidden_states"]
    per_expert = x.reshape(num_experts, -1, x.shape[-1])  # [E, T, H]
    routed = per_expert.abs().amax(dim=-1).gt(0).T  # [T, E]
    k = max(int(routed.sum(dim=1).max()), 1) if routed.numel() else 1
    order = routed.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]  # [T, k]
    valid = routed.gather(1, order)  # [T, k]
    inputs = per_expert.transpose(0, 1).gather(1, order[:, :, None].expand(-1, -1, x.shape[-1]))  # [T, k, H]
    return Routed(inputs, torch.where(valid, order, num_experts), valid.to(x.dtype))


@dataclass(frozen=True)
class ExpertLayout:
    """How one family of fused-experts modules stores and is called with its weights (an adapter)."""

    name: str
    description: str
    transposed: bool  # stored input-major: gate_up [E, H, 2I], down [E, I, H]
    dense_routed: bool  # Llama4 calling convention (see `_dense_routed_call`): forward takes the hidden states only

    def matches(self, module: nn.Module) -> bool:
        """Whether this layout adapts `module`: its weights' orientation, a known gate, and its calling convention."""
        oriented = _input_major(module) if self.transposed else _output_major(module)
        return oriented and _has_gate(module) and _takes_routing(module) != self.dense_routed

    def weights(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Canonical (gate_up [E, 2I, H], down [E, H, I]) views of the module's weights."""
        gate_up, down = module.gate_up_proj, module.down_proj
        return (gate_up.transpose(1, 2), down.transpose(1, 2)) if self.transposed else (gate_up, down)

    def biases(self, module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(gate_up bias [E, 2I], down bias [E, H]), None where the module has none."""
        return _bias(module, "gate_up_proj_bias"), _bias(module, "down_proj_bias")

    def native(self, gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """Canonical weights back in the module's own storage layout (for `dequantize()`)."""
        if self.transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        return {"gate_up_proj": gate_up.contiguous(), "down_proj": down.contiguous()}

    def call(self, module: nn.Module, args: tuple, kwargs: dict) -> Routed:
        """The canonical form of one call of `module`."""
        if self.dense_routed:
            return _dense_routed_call(module.gate_up_proj.shape[0], args, kwargs)
        return _standard_call(args, kwargs)


def _shapes(module: nn.Module) -> tuple[torch.Size, torch.Size] | None:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)) or gate_up.dim() != 3 or down.dim() != 3:
        return None
    return gate_up.shape, down.shape


def _output_major(module: nn.Module) -> bool:
    shapes = _shapes(module)
    if shapes is None or getattr(module, "is_transposed", False):
        return False
    (e1, two_i, h), (e2, h2, i) = shapes
    return e1 == e2 and two_i == 2 * i and h == h2


def _input_major(module: nn.Module) -> bool:
    shapes = _shapes(module)
    if shapes is None or getattr(module, "is_transposed", True) is False:
        return False
    (e1, h, two_i), (e2, i, h2) = shapes
    return e1 == e2 and two_i == 2 * i and h == h2


def _takes_routing(module: nn.Module) -> bool:
    """Whether the module's forward takes routing arguments (the standard call) or only the hidden states."""
    try:
        parameters = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return True
    positional = [p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4 or any(p.kind == p.VAR_POSITIONAL for p in parameters.values())


def _has_gate(module: nn.Module) -> bool:
    return callable(getattr(module, "_apply_gate", None)) or callable(getattr(module, "act_fn", None))


FUSED = ExpertLayout(
    name="fused",
    description="gate_up_proj [E, 2I, H], down_proj [E, H, I], called with (hidden, top_k_index, top_k_weights)",
    transposed=False,
    dense_routed=False,
)
TRANSPOSED = ExpertLayout(
    name="transposed",
    description="gate_up_proj [E, H, 2I], down_proj [E, I, H] (Aria; GPT-OSS with biases and an interleaved clamped gate)",
    transposed=True,
    dense_routed=False,
)
DENSE_ROUTED = ExpertLayout(
    name="dense_routed",
    description="transposed weights called as experts(x [E*T, H]) with score-scaled inputs (Llama4)",
    transposed=True,
    dense_routed=True,
)

# The registry: the first layout that matches a candidate module adapts it.
LAYOUTS: list[ExpertLayout] = [FUSED, TRANSPOSED, DENSE_ROUTED]


@dataclass(frozen=True)
class TokenRoute:
    """A family whose layer sends each token to one of several expert sets (chosen by token type, not a router).

    `matches(block, child)`: whether the MoE block holding the set under the child name `child` is of this kind;
    `select(batch, child)`: bool [B * S] of the batch's tokens that set sees, in order (None: every token).
    """

    name: str
    description: str
    matches: Callable[[nn.Module, str], bool]
    select: Callable[[Mapping[str, Any], str], torch.Tensor | None]


def _by_token_type(batch: Mapping[str, Any], child: str) -> torch.Tensor | None:
    """Ernie4.5-VL: `moe_mm_token_type_ids` > 0 goes to `vision_moe`, the rest to `text_moe`; without the ids (or
    without any vision token in the batch) every token goes to `text_moe`."""
    types = batch.get("moe_mm_token_type_ids")
    if types is None or not bool(types.bool().any()):
        everything = torch.ones(batch["input_ids"].numel(), dtype=torch.bool)
        return everything if child == "text_moe" else ~everything
    vision = types.bool().reshape(-1).cpu()
    return vision if child == "vision_moe" else ~vision


TOKEN_ROUTES: list[TokenRoute] = [
    TokenRoute(
        name="token_type",
        description="text_moe / vision_moe per layer, chosen by moe_mm_token_type_ids (Ernie4.5-VL-MoE)",
        matches=lambda block, child: child in ("text_moe", "vision_moe") and hasattr(block, "text_moe") and hasattr(block, "vision_moe"),
        select=_by_token_type,
    )
]


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


def _skipped(name: str, patterns: Sequence[str]) -> bool:
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
        if not _is_candidate(module) or _skipped(name, skip):
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
                and not _skipped(full, skip)
            ):
                found.append(full)
    return found


# ------------------------------------------------------------------------------------------------ offloaded weights
def _offload_hook(module: nn.Module) -> Any:
    """The accelerate hook that keeps `module`'s own parameters offloaded (on CPU or disk, meta in the module), or
    None. Duck-typed (an `offload` flag and a `weights_map`), so accelerate is never imported here."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        if getattr(candidate, "offload", False) and getattr(candidate, "weights_map", None) is not None:
            return candidate
    return None


@contextlib.contextmanager
def weights_loaded(module: nn.Module) -> Iterator[None]:
    """Within the block `module`'s own parameters are real tensors on its execution device, also when accelerate
    offloads them (device_map with "cpu" or "disk" entries); re-entrant; nothing happens for a plain module."""
    hook = _offload_hook(module)
    if hook is None:
        yield
        return
    depth = getattr(module, "_mode_hf_loaded", 0)  # only the outermost block loads and offloads
    if not depth:
        hook.pre_forward(module)
    module._mode_hf_loaded = depth + 1
    try:
        yield
    finally:
        module._mode_hf_loaded = depth
        if not depth:
            hook.post_forward(module, None)


def keep_loaded(module: nn.Module) -> None:
    """Load `module`'s offloaded parameters onto its execution device for good and stop offloading them (for small
    modules that get trained, such as routers: an offload hook would reload the stored weights at every forward)."""
    hook = _offload_hook(module)
    if hook is None:
        return
    from accelerate.hooks import remove_hook_from_module  # only reached when accelerate hooks are attached

    hook.pre_forward(module)
    remove_hook_from_module(module)  # its detach keeps the loaded tensors (they were dispatched from meta)


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its offload hook's execution device, else the device of its first tensor."""
    hook = _offload_hook(module)
    if hook is not None:
        return torch.device(hook.execution_device)
    tensor = next(module.parameters(), None)
    tensor = next(module.buffers(), None) if tensor is None else tensor
    return torch.device("cpu") if tensor is None else tensor.device


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's execution device (`model.device` is the first
    parameter's device, "meta" when accelerate offloads that module)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)
