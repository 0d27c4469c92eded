"""Family adapters for fused routed-experts modules: how each family stores its experts and calls them.

Every layout presents its set in one canonical form to the rest of mode-hf:
- weights: gate_up [E, 2I, H] and down [E, H, I], output-major like `F.linear`, plus optional biases [E, 2I], [E, H];
- the gate: `[n, 2I] -> [n, I]` on gate_up outputs in their stored row order (the module's own `_apply_gate` when it
  has one: interleaved or clamped gates come for free);
- a call: `Routed(inputs, top_k_index [T, k], top_k_weights [T, k])`, where inputs are per token [T, H] or per
  (token, slot) [T, k, H] (Llama4 scales each expert's input by its routing score: weights are then 1);
- a forward (`ExpertLayout.apply`): a call turned into (input, expert) pairs, their outputs combined back into the
  module's own output form, so that a packed replacement needs to know nothing of the family.

`LAYOUTS` is the registry (the first layout that matches a module adapts it); `TOKEN_ROUTES` covers families that
send each token to only one of several expert sets of a layer (Ernie4.5-VL's `text_moe` / `vision_moe`). Every
family quirk lives here. No transformers import: this module works on plain `torch.nn` structure.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn

from ..errors import UnsupportedModelError

PairOutputs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs [P, H], experts [P]) -> [P, H]


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
    # Whether a next-token-loss gradient at the set's output weighs each expert's error as it should (fisher
    # sensitivity): not for experts called with score-scaled inputs, whose routing weight is inside the input.
    gradient_sensitivity: bool = True

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

    def apply(self, module: nn.Module, args: tuple, kwargs: dict, pair_outputs: PairOutputs) -> torch.Tensor:
        """One forward of `module` (called with `args`, `kwargs`), computed by `pair_outputs`, which maps the routed
        (input [P, H], expert [P]) pairs to the experts' unweighted outputs [P, H]; returned in the module's own
        output form (the standard call: [T, H], routing weights applied, summed per token)."""
        if self.dense_routed:  # Llama4: x [E * T, H]; output row e * T + t = expert e on input row e * T + t
            x = args[0] if args else kwargs["hidden_states"]
            num_experts = module.gate_up_proj.shape[0]
            rows = x.abs().amax(dim=-1).gt(0).nonzero().squeeze(1)  # [P] routed (expert, token) rows
            output = torch.zeros_like(x)
            output[rows] = pair_outputs(x[rows], rows // (x.shape[0] // num_experts))
            return output
        inputs, top_k_index, top_k_weights = _standard_call(args, kwargs)
        tokens, k = top_k_index.shape
        flat_experts = top_k_index.reshape(-1)  # [T * k]
        valid = (flat_experts >= 0) & (flat_experts < module.gate_up_proj.shape[0])  # E: an empty slot (expert parallelism)
        flat_tokens = torch.arange(tokens, device=inputs.device).repeat_interleave(k)[valid]  # [P]
        states = inputs[flat_tokens]  # [P, H]
        weights = top_k_weights.reshape(-1)[valid, None].to(states.dtype)  # [P, 1]
        routed = pair_outputs(states, flat_experts[valid]) * weights  # [P, H]
        output = torch.zeros(tokens, inputs.shape[-1], dtype=inputs.dtype, device=inputs.device)
        return output.index_add_(0, flat_tokens, routed.to(output.dtype))


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
    gradient_sensitivity=False,
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

