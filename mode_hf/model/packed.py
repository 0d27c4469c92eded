"""Packed modules: `PackedExperts`, a fused-experts module whose every expert is stored at its own bit-width, and
`PackedLinear`, a uniformly quantized `nn.Linear` (attention, shared experts, dense MLPs with `dense_bits`).

Checkpoint layout of one expert set (E experts, hidden H, intermediate I, expert widths `expert_bits[e]`), always in
the canonical output-major orientation whatever the family stores: for every width b present, with E_b experts at
that width in expert order,

    {proj}_qweight_{b}bit  uint8   [E_b, O, ceil(K / 8) * b]   packed codes (mode_hf.algo.packing layout)
    {proj}_scales_{b}bit   float16 [E_b, O, K / g]             per-group scales
    {proj}_zeros_{b}bit    uint8   [E_b, O, K / g]             per-group integer zero points
    {proj}_bias            float   [E, O]                      only for layouts with biases (GPT-OSS), 16-bit

for proj in (gate_up_proj: O = 2I, K = H; down_proj: O = H, K = I); W = (code - zero) * scale. gate_up rows keep the
family's order (GPT-OSS interleaves gate and up). A packed linear [O, K] holds `qweight`, `scales`, `zeros` the same
way (no expert dimension) and its `bias`. The widths (bit map, dense map) are stored in config.json, so the modules
can be rebuilt on the meta device before loading. No transformers import.
"""

from __future__ import annotations

import copy
import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import gpu
from ..algo.grouped import grouped_linear
from ..algo.packing import pack, packed_row_bytes, unpack
from ..algo.quantize import QuantizedWeight, dequantize, resolve_group_size
from . import native
from .layouts import ExpertLayout, gate_of

PROJECTIONS = ("gate_up_proj", "down_proj")
DEQUANTIZED_BYTES = 512 * 2**20  # float32 bytes of dequantized expert weights alive at once in a forward
WORKSPACE_BYTES = 16 * 2**20  # native CPU path: bytes of dequantized weights per chunk, in reused buffers
GEMV_ROWS_PER_EXPERT = 5  # native CPU path: packed matvecs while the routed rows per hit expert are at most this (measured crossover at 30B shapes, docs/performance.md)
GEMV_INT8_ROWS_PER_EXPERT = 24  # the same on int8 activations (MODE_HF_INT8_ACTIVATIONS), whose matvec is faster (docs/performance.md)
GEMV_BF16_ROWS_PER_EXPERT = 12  # the same for bfloat16 inputs where the bfloat16 matvec serves every width (docs/performance.md)
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


def _check_declared(name: str, declared: tuple[int, int], weight: QuantizedWeight) -> None:
    if (weight.bits, weight.group_size) != declared:
        raise ValueError(
            f"{name} is declared {declared[0]}-bit with group {declared[1]}, got {weight.bits}-bit with group {weight.group_size}"
        )


class _KeepsFloat16Scales(nn.Module):
    """Device moves apply to every buffer; dtype casts (`model.to(torch.bfloat16)`) never touch the float16 scales,
    which are part of the format (a bf16 scale would change every dequantized weight)."""

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        scales = {name: buffer for name, buffer in self._buffers.items() if name.startswith("scales") or "_scales_" in name}
        super()._apply(fn, recurse)
        for name, buffer in scales.items():
            moved = self._buffers[name]
            self._buffers[name] = buffer.to(device=moved.device) if moved.dtype != torch.float16 else moved
        return self


class PackedExperts(_KeepsFloat16Scales):
    """Routed experts at per-expert widths; a drop-in for a fused `...Experts` module of any supported layout.

    Args:
        original: the experts module being replaced (any device, meta included); kept as a weightless shell for
            `dequantize()`, its gate function and its calling convention.
        layout: the set's layout adapter (`mode_hf.model.layouts.LAYOUTS`).
        expert_bits: width of every expert, length E, values in (2, 3, 4, 8).
        group_size: requested quantization group size (resolved per projection for small dims).
    """

    def __init__(self, original: nn.Module, layout: ExpertLayout, expert_bits: Sequence[int], group_size: int) -> None:
        super().__init__()
        object.__setattr__(self, "_template", _meta_shell(original))
        object.__setattr__(self, "layout", layout)
        _, down = layout.weights(original)  # [E, H, I]
        hidden, intermediate = down.shape[1], down.shape[2]
        self.activation = gate_of(self._template)
        self.expert_bits = [int(b) for b in expert_bits]
        self.num_experts = len(self.expert_bits)
        self.hidden_dim, self.intermediate_dim = hidden, intermediate
        self.group_size = group_size
        self.dims = {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate)}  # (O, K)
        self.group_sizes = {proj: resolve_group_size(k, group_size) for proj, (_, k) in self.dims.items()}
        self.slot = [self.expert_bits[:e].count(b) for e, b in enumerate(self.expert_bits)]
        for bits in sorted(set(self.expert_bits)):
            self._allocate(bits, self.expert_bits.count(bits))
        for proj, bias in zip(PROJECTIONS, layout.biases(original)):
            if bias is not None:  # kept in 16-bit, like every bias
                self.register_buffer(f"{proj}_bias", torch.zeros(self.num_experts, self.dims[proj][0]))

    def _allocate(self, bits: int, count: int) -> None:
        for proj, (out_dim, in_dim) in self.dims.items():
            groups = in_dim // self.group_sizes[proj]
            self.register_buffer(f"{proj}_qweight_{bits}bit", torch.zeros(count, out_dim, packed_row_bytes(in_dim, bits), dtype=torch.uint8))
            self.register_buffer(f"{proj}_scales_{bits}bit", torch.zeros(count, out_dim, groups, dtype=torch.float16))
            self.register_buffer(f"{proj}_zeros_{bits}bit", torch.zeros(count, out_dim, groups, dtype=torch.uint8))

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """The replaced module's weight as a weightless meta tensor (its own shape): for model code that touches
        `experts.gate_up_proj` of a loaded model (Qwen3-Omni's `_init_weights`). The packed buffers hold the values."""
        return self._template.gate_up_proj

    @property
    def down_proj(self) -> torch.Tensor:
        """See `gate_up_proj`."""
        return self._template.down_proj

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def set_expert(self, proj: str, expert: int, weight: QuantizedWeight) -> None:
        """Pack `weight` (codes [O, K]) into the slot of `expert` for projection `proj`.

        Raises:
            ValueError: the width or group size differs from what this module declared for that expert.
        """
        bits, slot = self.expert_bits[expert], self.slot[expert]
        _check_declared(f"expert {expert} of {proj}", (bits, self.group_sizes[proj]), weight)
        getattr(self, f"{proj}_qweight_{bits}bit")[slot] = pack(weight.codes, bits)
        getattr(self, f"{proj}_scales_{bits}bit")[slot] = weight.scales.to(torch.float16)
        getattr(self, f"{proj}_zeros_{bits}bit")[slot] = weight.zeros.to(torch.uint8)

    @torch.no_grad()
    def set_biases(self, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None) -> None:
        """Copy the original biases ([E, 2I], [E, H]) in (both None for bias-free layouts)."""
        for proj, bias in zip(PROJECTIONS, (gate_up_bias, down_bias)):
            if bias is not None:
                getattr(self, f"{proj}_bias").copy_(bias)

    def bias(self, proj: str) -> torch.Tensor | None:
        """The bias [E, O] of a projection, or None."""
        return getattr(self, f"{proj}_bias", None)

    # ------------------------------------------------------------------ reading
    def routed_weights(self, proj: str, experts: Sequence[int], dtype: torch.dtype = torch.float32, exact: bool = True) -> torch.Tensor:
        """The dequantized weights of `experts`, in that order, [n, O, K] in `dtype` (output-major, as `F.linear`
        takes them); the experts of one width are unpacked together, in one vectorized call (the native kernel on
        CPU). `exact`: see `mode_hf.algo.quantize.dequantize` (the torch path of the forward passes False: bfloat16
        weights within one unit in the last place; the native kernel is always exact)."""
        out_dim, in_dim = self.dims[proj]
        device = next(self.buffers()).device
        weights = torch.empty(len(experts), out_dim, in_dim, dtype=dtype, device=device)
        widths = [self.expert_bits[e] for e in experts]
        for bits in sorted(set(widths)):
            positions = [i for i, b in enumerate(widths) if b == bits]
            slots = torch.tensor([self.slot[experts[i]] for i in positions], device=device)
            qweight, scales, zeros = self._storage(proj, bits)
            if native.usable(weights):  # one pass, float32 arithmetic and one rounding: exact in every dtype
                group = self.group_sizes[proj]
                if weights.dtype in (torch.float32, torch.bfloat16):  # written in place
                    native.dequantize_slots(qweight, scales, zeros, bits, group, in_dim, slots, out=weights, targets=positions)
                else:
                    weights[positions] = native.dequantize_slots(qweight, scales, zeros, bits, group, in_dim, slots, dtype)
                continue
            codes = unpack(qweight[slots], bits, in_dim)  # [n_b, O, K]
            weights[positions] = dequantize(codes, scales[slots], zeros[slots], self.group_sizes[proj], dtype=dtype, exact=exact)
        return weights

    def _storage(self, proj: str, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, zeros) of the experts at width `bits` (contiguous)."""
        return tuple(getattr(self, f"{proj}_{part}_{bits}bit").contiguous() for part in ("qweight", "scales", "zeros"))  # type: ignore[return-value]

    def expert_weight(self, proj: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight of one expert, [O, K] in `dtype`."""
        return self.routed_weights(proj, [expert], dtype)[0]

    def dequantized_weights(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """All experts dequantized, canonical: {"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]}."""
        return {proj: self.routed_weights(proj, range(self.num_experts), dtype) for proj in PROJECTIONS}

    @torch.compiler.disable  # data-dependent routing and native calls on raw pointers: runs eagerly under torch.compile
    def expert_outputs(self, inputs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs of (input, expert) pairs, [P, H] -> [P, H].

        Only routed experts are dequantized, each once per call. On CPU with the native kernels (`mode_hf.model.native`)
        and outside autograd: few rows per routed expert (decode) go through the packed matvec, which dequantizes
        nothing into memory; more rows (prefill) through native dequantization into reused workspaces, expert
        chunk by expert chunk of one width, then matmuls. On CUDA with triton installed, the Triton kernels
        (`mode_hf.gpu`; `MODE_HF_EXPERTS_KERNEL` chooses). Otherwise (float64, no compiler, gradients) the torch
        path: vectorized unpacks width by width and one grouped matmul per chunk of experts (chunks bound the
        dequantized weights alive at once by DEQUANTIZED_BYTES, which matters for prefill, where most experts are
        hit).
        """
        if not len(inputs):  # nothing routed here (an empty batch, or experts of another shard)
            return torch.empty_like(inputs)
        differentiable = torch.is_grad_enabled() and inputs.requires_grad  # router fine-tuning backpropagates
        if not differentiable and gpu.use_triton(inputs):  # CUDA with triton installed (or forced): mode_hf.gpu
            return gpu.expert_outputs(self, inputs, experts)
        if not differentiable and native.usable(inputs):
            int8 = {group: native.use_int8(group) for group in set(self.group_sizes.values())}
            if all(int8.values()):
                limit = GEMV_INT8_ROWS_PER_EXPERT
            elif inputs.dtype == torch.bfloat16 and all(
                native.use_bf16(bits, group) for bits in set(self.expert_bits) for group in self.group_sizes.values()
            ):
                limit = GEMV_BF16_ROWS_PER_EXPERT
            else:
                limit = GEMV_ROWS_PER_EXPERT
            routed = experts.tolist()  # Python ints: at decode every tensor op costs as much as a kernel call
            if len(routed) <= limit * len(set(routed)):
                return self._native_outputs(inputs, routed, int8)
            if inputs.dtype in (torch.float32, torch.bfloat16):
                return self._native_chunked_outputs(inputs, experts, torch.bincount(experts, minlength=self.num_experts))
        counts = torch.bincount(experts, minlength=self.num_experts)  # [E]
        order = torch.argsort(experts, stable=True)
        hit = counts.nonzero().squeeze(1).tolist()
        states = inputs[order]  # [P, H], grouped by expert
        output = torch.empty_like(states)
        per_expert = 4 * sum(o * k for o, k in self.dims.values())  # float32 bytes while dequantizing
        chunk = max(1, DEQUANTIZED_BYTES // per_expert)
        start = 0
        for first in range(0, len(hit), chunk):
            chosen = hit[first : first + chunk]
            sizes = counts[chosen]
            stop = start + int(sizes.sum())
            x, offsets = states[start:stop], sizes.cumsum(0).to(torch.int32)
            bias = {p: None if self.bias(p) is None else self.bias(p)[chosen] for p in PROJECTIONS}
            weights = {p: self.routed_weights(p, chosen, x.dtype, exact=False) for p in PROJECTIONS}
            gate_up = grouped_linear(x, weights["gate_up_proj"], offsets, bias["gate_up_proj"])
            down = grouped_linear(self.activation(gate_up), weights["down_proj"], offsets, bias["down_proj"])
            output[start:stop] = down.to(output.dtype)
            start = stop
        return torch.empty_like(output).index_copy_(0, order, output)

    def _native_chunked_outputs(self, inputs: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`expert_outputs` for many rows per expert on CPU (float32/bfloat16): pairs sorted by (width, expert); per
        chunk of experts of one width (WORKSPACE_BYTES), the native kernel dequantizes into this thread's reused
        workspaces, with K in the kernel's blocked order where the group size allows (no interleaving; the inputs
        are permuted the same way, which leaves every product unchanged), then one grouped matmul per projection."""
        widths = torch.tensor(self.expert_bits, device=experts.device)
        order = torch.argsort(widths[experts] * self.num_experts + experts, stable=True)
        states = inputs[order]  # [P, H], grouped by (width, expert)
        hit = sorted(counts.nonzero().squeeze(1).tolist(), key=lambda e: (self.expert_bits[e], e))
        output = torch.empty_like(states)
        chunk = max(1, WORKSPACE_BYTES // (states.element_size() * sum(o * k for o, k in self.dims.values())))
        start, rows = 0, counts.tolist()  # Python ints from here on: per chunk every tensor op costs
        for bits in sorted(set(self.expert_bits[e] for e in hit)):
            of_width = [e for e in hit if self.expert_bits[e] == bits]
            for first in range(0, len(of_width), chunk):
                chosen = of_width[first : first + chunk]
                ends = list(itertools.accumulate(rows[e] for e in chosen))
                stop = start + ends[-1]
                x, offsets = states[start:stop], torch.tensor(ends, dtype=torch.int32)
                slots = torch.tensor([self.slot[e] for e in chosen])
                for proj in PROJECTIONS:
                    group, in_dim = self.group_sizes[proj], self.dims[proj][1]
                    weights = native.workspace_weights(proj, self._storage(proj, bits), bits, group, in_dim, slots, x.dtype)
                    bias = None if self.bias(proj) is None else self.bias(proj)[chosen]
                    y = grouped_linear(native.workspace_inputs(x, bits, group), weights, offsets, bias)
                    x = self.activation(y) if proj == "gate_up_proj" else y
                output[start:stop] = x.to(output.dtype)
                start = stop
        return torch.empty_like(output).index_copy_(0, order, output)

    def _native_outputs(self, inputs: torch.Tensor, routed: list[int], int8: dict[int, bool]) -> torch.Tensor:
        """`expert_outputs` through the native packed matvec (`mode_hf.model.native`): pairs (row of `inputs`
        [P, H], expert `routed[p]`) sorted by expert (Python ints; a stable sort), every packed row read once,
        nothing dequantized into memory; per projection the inputs are either rounded to int8 once (`int8[group]`,
        MODE_HF_INT8_ACTIVATIONS) or summed per group, then taken as they are by the bfloat16 matvec (bfloat16
        inputs, 2-4-bit widths, `native.use_bf16`) or as float32 in each width's order by the float32 one. The
        activation between the projections is rounded to the dtype of `inputs`, as the 16-bit module computes it;
        the result in that dtype, in the order of `inputs`."""
        lib = native.library()
        order = sorted(range(len(routed)), key=routed.__getitem__)
        rows: dict[int, int] = {}
        for e in routed:
            rows[e] = rows.get(e, 0) + 1
        by_width: dict[int, list[list[int]]] = {}  # per width: slots, first rows, row counts of its routed experts
        first = 0
        for e in sorted(rows):
            entry = by_width.setdefault(self.expert_bits[e], [[], [], []])
            entry[0].append(self.slot[e]), entry[1].append(first), entry[2].append(rows[e])
            first += rows[e]
        items = {bits: torch.tensor(entry, dtype=torch.int64).unbind(0) for bits, entry in by_width.items()}
        index = torch.tensor(order)
        bf16 = inputs.dtype == torch.bfloat16
        x16 = inputs[index].contiguous()  # the input of each projection in the dtype of `inputs`
        x = x16.float()
        for proj in PROJECTIONS:
            group = self.group_sizes[proj]
            out = torch.empty(len(x), self.dims[proj][0], dtype=torch.float32)
            if int8[group]:  # one int8 rounding serves every width
                quantized = native.quantize_int8(x, group)
                for bits, (slots, starts, counts) in items.items():
                    native.gemv_int8_prepared(lib, self._storage(proj, bits), bits, group, slots, starts, counts, quantized, out)
            else:
                xsum, ordered = native.group_sums(x, group), {}
                for bits, (slots, starts, counts) in items.items():
                    if bf16 and native.use_bf16(bits, group):  # bfloat16 inputs as they are
                        native.gemv_bf16_prepared(lib, self._storage(proj, bits), bits, group, slots, starts, counts, x16, xsum, out)
                        continue
                    key = bits if native.fits_blocks(bits, group) else 0  # the input order this width reads
                    if key not in ordered:
                        ordered[key] = native.matvec_order(x, bits, group)
                    native.gemv_prepared(lib, self._storage(proj, bits), bits, group, slots, starts, counts, ordered[key], xsum, out)
            if self.bias(proj) is not None:
                out += self.bias(proj)[torch.tensor(sorted(routed))].float()
            if proj == "gate_up_proj":  # the activation in the dtype of `inputs`, as the 16-bit module computes it
                x16 = self.activation(out).to(inputs.dtype).contiguous()
                x = x16.float()
            else:
                x = out
        return torch.empty_like(inputs).index_copy_(0, index, x.to(inputs.dtype))

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """Same contract as the module it replaces (its layout's calling convention, `ExpertLayout.apply`); only
        routed experts are unpacked."""
        fused = self._fused_decode(args, kwargs)
        if fused is not None:
            return fused
        return self.layout.apply(self._template, args, kwargs, self.expert_outputs)

    @torch.compiler.disable  # data-dependent routing and a native call on raw pointers
    def _fused_decode(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The whole block in one native call (`native.moe_bf16`) where it computes what the pair path computes:
        bfloat16 hidden states on CPU outside autograd, the standard call, 2-4-bit experts on the bfloat16 matvec
        (no int8 activations requested), no biases, the gate silu(gate) * up, and decode-sized routing (rows per hit
        expert within GEMV_BF16_ROWS_PER_EXPERT). It differs from the pair path only in summing the experts' outputs
        per token in float32 before one rounding (the pair path rounds each product and each sum to bfloat16). None
        otherwise."""
        if self.layout.dense_routed or any(self.bias(proj) is not None for proj in PROJECTIONS):
            return None
        inputs, top_k_index, top_k_weights = self.layout.call(self._template, args, kwargs)
        if inputs.dim() != 2 or inputs.dtype != torch.bfloat16 or not native.usable(inputs) or native.int8_requested():
            return None
        if torch.is_grad_enabled() and inputs.requires_grad:
            return None
        widths = set(self.expert_bits)
        if not all(native.use_bf16(b, g) for b in widths for g in self.group_sizes.values()):  # 2-4 bits, built
            return None
        routed = [e for e in top_k_index.reshape(-1).tolist() if 0 <= e < self.num_experts]
        if not routed or len(routed) > GEMV_BF16_ROWS_PER_EXPERT * len(set(routed)) or not self._silu_gate():
            return None
        if getattr(self, "_expert_tables", None) is None:
            self._expert_tables = (torch.tensor(self.expert_bits, dtype=torch.int64), torch.tensor(self.slot, dtype=torch.int64))
        storage = {proj: {b: self._storage(proj, b) for b in widths} for proj in PROJECTIONS}
        return native.moe_bf16(
            native.library(), inputs.contiguous(), top_k_index.to(torch.int64).contiguous(),
            top_k_weights.float().contiguous(), *self._expert_tables, storage, self.dims["down_proj"][1], self.group_sizes,
        )

    def _silu_gate(self) -> bool:
        """Whether the gate is silu(gate) * up on [gate | up] halves (probed once on random values)."""
        if getattr(self, "_is_silu_gate", None) is None:
            inter = self.dims["down_proj"][1]
            probe = torch.randn(3, 2 * inter, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                self._is_silu_gate = self.dims["gate_up_proj"][0] == 2 * inter and torch.equal(
                    self.activation(probe), F.silu(probe[:, :inter]) * probe[:, inter:]
                )
        return self._is_silu_gate

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
        """A module of the original class, in its own layout, holding the dequantized weights (and the biases)."""
        restored = copy.copy(self._template)
        restored._parameters = dict(restored._parameters)
        weights = self.dequantized_weights(dtype)
        native = self.layout.native(weights["gate_up_proj"], weights["down_proj"])
        for proj in PROJECTIONS:
            restored._parameters[proj] = nn.Parameter(native[proj], requires_grad=False)
            if self.bias(proj) is not None:
                restored._parameters[f"{proj}_bias"] = nn.Parameter(self.bias(proj).to(dtype), requires_grad=False)
        return restored

    def extra_repr(self) -> str:
        histogram = {b: self.expert_bits.count(b) for b in sorted(set(self.expert_bits))}
        return (
            f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"layout={self.layout.name}, bits={histogram}"
        )


class PackedLinear(_KeepsFloat16Scales):
    """An `nn.Linear` stored at one width (`dense_bits`); a drop-in with the same forward.

    Args:
        original: the linear being replaced (any device, meta included); kept as a weightless shell for `dequantize()`.
        bits: width, one of (2, 3, 4, 8).
        group_size: requested group size along the input dimension.
    """

    def __init__(self, original: nn.Linear, bits: int, group_size: int) -> None:
        super().__init__()
        object.__setattr__(self, "_template", _meta_shell(original))
        self.out_features, self.in_features = original.out_features, original.in_features
        self.bits = int(bits)
        self.group_size = resolve_group_size(self.in_features, group_size)
        groups = self.in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(self.out_features, packed_row_bytes(self.in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(self.out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(self.out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", None if original.bias is None else torch.zeros(self.out_features))

    @torch.no_grad()
    def set_weight(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        """Pack `weight` (codes [O, K]) in and copy the original bias."""
        _check_declared("the linear", (self.bits, self.group_size), weight)
        self.qweight.copy_(pack(weight.codes, self.bits))
        self.scales.copy_(weight.scales.to(torch.float16))
        self.zeros.copy_(weight.zeros.to(torch.uint8))
        if bias is not None:
            self.bias.copy_(bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight [O, K] in `dtype` (traceable torch ops under torch.compile)."""
        if not torch.compiler.is_compiling() and native.usable(self.scales.new_empty(0, dtype=dtype)):
            return native.dequantize_slots(*self._storage(), self.bits, self.group_size, self.in_features, [0], dtype)[0]
        codes = unpack(self.qweight, self.bits, self.in_features)
        return dequantize(codes, self.scales, self.zeros, self.group_size, dtype=dtype)

    def _storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, zeros) as one slot [1, O, ...] of the native kernels."""
        return tuple(b.unsqueeze(0).contiguous() for b in (self.qweight, self.scales, self.zeros))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if (torch.is_grad_enabled() and x.requires_grad) or not native.usable(x):
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        return self._native_forward(x, bias)

    @torch.compiler.disable  # native calls on raw pointers: never traced (a graph break under torch.compile)
    def _native_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`forward` through the native kernels (CPU, outside autograd)."""
        rows = x.reshape(-1, self.in_features)
        bits, group = self.bits, self.group_size
        if native.use_int8(group):  # opt-in (MODE_HF_INT8_ACTIVATIONS)
            matvec, limit = "int8", GEMV_INT8_ROWS_PER_EXPERT
        elif x.dtype == torch.bfloat16 and native.use_bf16(bits, group):
            matvec, limit = "bf16", GEMV_BF16_ROWS_PER_EXPERT
        else:
            matvec, limit = "float32", GEMV_ROWS_PER_EXPERT
        if len(rows) <= limit:  # decode: the packed matvec, nothing dequantized into memory
            x32 = rows.float().contiguous()
            y = torch.empty(len(rows), self.out_features, dtype=torch.float32)
            one, count = torch.zeros(1, dtype=torch.int64), torch.tensor([len(rows)])  # slot 0, first row 0
            if matvec == "int8":
                native.gemv_int8_prepared(native.library(), self._storage(), bits, group, one, one, count, native.quantize_int8(x32, group), y)
            elif matvec == "bf16":
                native.gemv_bf16_prepared(native.library(), self._storage(), bits, group, one, one, count, rows.contiguous(),
                                          native.group_sums(x32, group), y)
            else:
                native.gemv_prepared(
                    native.library(), self._storage(), bits, group, one, one, count,
                    native.matvec_order(x32, bits, group), native.group_sums(x32, group), y,
                )
        else:  # dequantized into a reused workspace, then one matmul
            dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
            weight = native.workspace_weights("linear", self._storage(), bits, group, self.in_features, [0], dtype)
            y = F.linear(native.workspace_inputs(rows.to(dtype), bits, group), weight[0])
        y = y.to(x.dtype) if bias is None else (y + bias).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def storage_bits(self) -> dict[str, int]:
        """Bits held: {"weights": packed codes, "overhead": scales + zeros, "params": number of weights}."""
        groups = self.in_features // self.group_size
        return {
            "weights": self.out_features * packed_row_bytes(self.in_features, self.bits) * 8,
            "overhead": self.out_features * groups * (SCALE_BITS + ZERO_BITS),
            "params": self.out_features * self.in_features,
        }

    def dequantize(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A module of the original class holding the dequantized weight (and the bias)."""
        restored = copy.copy(self._template)
        restored._parameters = dict(restored._parameters)
        restored._parameters["weight"] = nn.Parameter(self.dequantized_weight(dtype), requires_grad=False)
        if self.bias is not None:
            restored._parameters["bias"] = nn.Parameter(self.bias.to(dtype), requires_grad=False)
        return restored

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={self.group_size}"
