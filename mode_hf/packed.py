"""`PackedExperts`: a fused-experts module whose every expert is stored packed at its own bit-width.

Checkpoint layout (one expert set, E experts, hidden H, intermediate I, expert widths `expert_bits[e]`):
for every width b present, with E_b experts at that width in expert order,

    {proj}_qweight_{b}bit  uint8   [E_b, O, ceil(K / 8) * b]   packed codes (mode_hf.packing layout)
    {proj}_scales_{b}bit   float16 [E_b, O, K / g]             per-group scales
    {proj}_zeros_{b}bit    uint8   [E_b, O, K / g]             per-group integer zero points

for proj in (gate_up_proj: O = 2I, K = H; down_proj: O = H, K = I); W = (code - zero) * scale. The width of every
expert (the bit map) is stored in config.json, so the module can be rebuilt on the meta device before loading.
No transformers import.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .packing import pack, packed_row_bytes, unpack
from .quantize import QuantizedWeight, dequantize, resolve_group_size

PROJECTIONS = ("gate_up_proj", "down_proj")
SCALE_BITS, ZERO_BITS = 16, 8  # storage of one group's scale (float16) and zero point (uint8)


def _meta_shell(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters live on the meta device (keeps class, activation and flags)."""
    shell = copy.copy(module)
    shell._parameters = {
        n: None if p is None else nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for n, p in module._parameters.items()
    }
    shell._buffers = {n: None if b is None else torch.empty_like(b, device="meta") for n, b in module._buffers.items()}
    shell._modules = dict(module._modules)
    return shell


class PackedExperts(nn.Module):
    """Routed experts at per-expert widths; a drop-in for a fused `...Experts` module.

    Args:
        original: the experts module being replaced (any device, meta included); kept as a weightless shell for
            `dequantize()` and to copy its activation.
        activation: the module's gate function, `[n, 2I] -> [n, I]`.
        expert_bits: width of every expert, length E, values in (2, 3, 4, 8).
        hidden, intermediate: H and I.
        group_size: requested quantization group size (resolved per projection for small dims).
    """

    def __init__(
        self,
        original: nn.Module,
        activation: nn.Module,
        expert_bits: Sequence[int],
        hidden: int,
        intermediate: int,
        group_size: int,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_template", _meta_shell(original))
        self.activation = activation
        self.expert_bits = [int(b) for b in expert_bits]
        self.num_experts = len(self.expert_bits)
        self.hidden_dim, self.intermediate_dim = hidden, intermediate
        self.group_size = group_size
        self.dims = {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate)}  # (O, K)
        self.group_sizes = {proj: resolve_group_size(k, group_size) for proj, (_, k) in self.dims.items()}
        self.slot = [self.expert_bits[:e].count(b) for e, b in enumerate(self.expert_bits)]
        for bits in sorted(set(self.expert_bits)):
            self._allocate(bits, self.expert_bits.count(bits))

    def _allocate(self, bits: int, count: int) -> None:
        for proj, (out_dim, in_dim) in self.dims.items():
            groups = in_dim // self.group_sizes[proj]
            self.register_buffer(f"{proj}_qweight_{bits}bit", torch.zeros(count, out_dim, packed_row_bytes(in_dim, bits), dtype=torch.uint8))
            self.register_buffer(f"{proj}_scales_{bits}bit", torch.zeros(count, out_dim, groups, dtype=torch.float16))
            self.register_buffer(f"{proj}_zeros_{bits}bit", torch.zeros(count, out_dim, groups, dtype=torch.uint8))

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def set_expert(self, proj: str, expert: int, weight: QuantizedWeight) -> None:
        """Pack `weight` (codes [O, K]) into the slot of `expert` for projection `proj`.

        Raises:
            ValueError: the width or group size differs from what this module declared for that expert.
        """
        bits, slot = self.expert_bits[expert], self.slot[expert]
        if weight.bits != bits or weight.group_size != self.group_sizes[proj]:
            raise ValueError(
                f"expert {expert} of {proj} is declared {bits}-bit with group {self.group_sizes[proj]}, "
                f"got {weight.bits}-bit with group {weight.group_size}"
            )
        getattr(self, f"{proj}_qweight_{bits}bit")[slot] = pack(weight.codes, bits)
        getattr(self, f"{proj}_scales_{bits}bit")[slot] = weight.scales.to(torch.float16)
        getattr(self, f"{proj}_zeros_{bits}bit")[slot] = weight.zeros.to(torch.uint8)

    # ------------------------------------------------------------------ reading
    def expert_weight(self, proj: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight of one expert, [O, K] in `dtype` (output-major, as `F.linear` takes it)."""
        bits, slot = self.expert_bits[expert], self.slot[expert]
        in_dim = self.dims[proj][1]
        codes = unpack(getattr(self, f"{proj}_qweight_{bits}bit")[slot], bits, in_dim)  # [O, K]
        scales = getattr(self, f"{proj}_scales_{bits}bit")[slot]  # [O, K / g]
        zeros = getattr(self, f"{proj}_zeros_{bits}bit")[slot]  # [O, K / g]
        return dequantize(codes, scales, zeros, self.group_sizes[proj], dtype=dtype)

    def dequantized_weights(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """All experts dequantized: {"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]}."""
        return {
            proj: torch.stack([self.expert_weight(proj, e, dtype) for e in range(self.num_experts)])
            for proj in PROJECTIONS
        }

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Same contract as the fused experts: [T, H], [T, k], [T, k] -> [T, H]. Only routed experts are unpacked."""
        output = torch.zeros_like(hidden_states)  # [T, H]
        flat_experts = top_k_index.reshape(-1)  # [T * k]
        flat_tokens = torch.arange(hidden_states.shape[0], device=hidden_states.device).repeat_interleave(top_k_index.shape[1])
        flat_weights = top_k_weights.reshape(-1)  # [T * k]
        for expert in flat_experts.unique().tolist():
            if not 0 <= expert < self.num_experts:
                continue  # padding index used by some routers (expert-parallel masking)
            chosen = flat_experts == expert
            tokens = flat_tokens[chosen]  # [n]
            states = hidden_states[tokens]  # [n, H]
            gate_up = F.linear(states, self.expert_weight("gate_up_proj", expert, states.dtype))  # [n, 2I]
            expert_out = F.linear(self.activation(gate_up), self.expert_weight("down_proj", expert, states.dtype))
            expert_out = expert_out * flat_weights[chosen, None].to(expert_out.dtype)  # [n, H]
            output.index_add_(0, tokens, expert_out.to(output.dtype))
        return output

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Device moves apply to every buffer; dtype casts (`model.to(torch.bfloat16)`) never touch the float16
        scales, which are part of the format (a bf16 scale would change every dequantized weight)."""
        scales = {name: buffer for name, buffer in self._buffers.items() if "_scales_" in name}
        super()._apply(fn, recurse)
        for name, buffer in scales.items():
            moved = self._buffers[name]
            self._buffers[name] = buffer.to(device=moved.device) if moved.dtype != torch.float16 else moved
        return self

    # ------------------------------------------------------------------ accounting
    def storage_bits(self) -> dict[str, int]:
        """Bits held: {"weights": packed codes, "overhead": scales + zeros, "params": number of weights}."""
        weights = overhead = params = 0
        for proj, (out_dim, in_dim) in self.dims.items():
            groups = in_dim // self.group_sizes[proj]
            for bits in self.expert_bits:
                weights += out_dim * packed_row_bytes(in_dim, bits) * 8
                overhead += out_dim * groups * (SCALE_BITS + ZERO_BITS)
                params += out_dim * in_dim
        return {"weights": weights, "overhead": overhead, "params": params}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A module of the original class holding the dequantized weights (what `model.dequantize()` returns)."""
        restored = copy.copy(self._template)
        restored._parameters = dict(restored._parameters)
        for proj, weight in self.dequantized_weights(dtype).items():
            restored._parameters[proj] = nn.Parameter(weight, requires_grad=False)
        return restored

    def extra_repr(self) -> str:
        histogram = {b: self.expert_bits.count(b) for b in sorted(set(self.expert_bits))}
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, bits={histogram}"
