"""What a user would pick instead of mode-hf, on the same model, for benchmarks/quality.py: HQQ and optimum-quanto
in this process (below), and the peers that need their own environments (AutoRound, llm-compressor, GPTQModel,
transformers' GPTQConfig) through `run_in_venv` and `export_peer`.

Two ways each:
- through their transformers configs (`HqqConfig`, `QuantoConfig`): they replace `nn.Linear` modules, so the fused
  3-D experts stay in 16-bit; `linear_report` says what they quantized and the real bytes of the experts;
- applied directly to the expert weights at the same widths and group size (`quantize_experts`): every expert
  matrix goes through the library's own quantizer and is replaced by its dequantized values, and the bytes are
  those of the library's stored tensors (packed codes + its scales and zeros), so the comparison with mode-hf's
  packed experts is fair in accuracy and in bytes.

Benchmark code: the library never imports it. Needs `pip install mode-hf[peers]` (hqq, optimum-quanto).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..algo.quantize import resolve_group_size
from ..model.structure import find_expert_sets

LIBRARY_BITS = {"hqq": (2, 3, 4, 8), "quanto": (2, 4, 8)}  # optimum-quanto has no 3-bit integer type


def _hqq(matrix: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, int]:
    """HQQ (half-quadratic optimized zero and scale, its default) along the input dimension."""
    from hqq.core.quantize import Quantizer

    codes, meta = Quantizer.quantize(
        matrix.float(), nbits=bits, group_size=group_size, axis=1, optimize=True, device="cpu", compute_dtype=torch.float16
    )
    meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()  # HQQ stores them in its compute dtype
    meta["compute_dtype"] = torch.float32
    restored = Quantizer.dequantize(codes, meta)
    stored = codes.numel() * codes.element_size() + 2 * meta["scale"].numel() + 2 * meta["zero"].numel()
    return restored.to(matrix.dtype), stored


def _quanto(matrix: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, int]:
    """optimum-quanto's weight quantization as its QLinear does it (max optimizer, affine, grouped below 8 bits)."""
    from optimum.quanto import qint2, qint4, qint8
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    qtype = {2: qint2, 4: qint4, 8: qint8}[bits]
    weight = matrix.to(torch.bfloat16)
    if bits == 8:
        scale, shift, size = AbsmaxOptimizer()(weight, qtype=qtype, axis=0), None, None
    else:
        scale, shift = MaxOptimizer()(weight, qtype=qtype, axis=0, group_size=group_size)
        size = group_size
    quantized = quantize_weight(weight, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=size, optimized=False)
    data = getattr(quantized._data, "_data", quantized._data)  # below 8 bits: a PackedTensor over uint8 storage
    parts = [data, quantized._scale] + ([] if shift is None else [quantized._shift])
    stored = sum(p.numel() * p.element_size() for p in parts)
    return quantized.dequantize().to(matrix.dtype), stored


QUANTIZERS: dict[str, Callable[[torch.Tensor, int, int], tuple[torch.Tensor, int]]] = {"hqq": _hqq, "quanto": _quanto}


@torch.no_grad()
def quantize_experts(model: nn.Module, library: str, bits: int, group_size: int) -> dict:
    """Replace every routed expert matrix by `library`'s quantize -> dequantize at `bits`; returns its byte count.

    Expert parameters are [E, out, in] (gate_up and down of the fused layout); groups run along `in`.
    """
    if bits not in LIBRARY_BITS[library]:
        raise ValueError(f"{library} has no {bits}-bit weight type; it supports {LIBRARY_BITS[library]}.")
    quantize, stored, params = QUANTIZERS[library], 0, 0
    for expert_set in find_expert_sets(model):
        for weight in expert_set.layout.weights(expert_set.module):
            for expert in range(weight.shape[0]):
                # the group size mode-hf and the venv peers use (largest divisor of K up to group_size): optimum-quanto
                # refuses a group size that does not divide K ("Group size (128) must be a divisor of (32)")
                restored, size = quantize(weight[expert], bits, resolve_group_size(weight.shape[-1], group_size))
                weight[expert].copy_(restored)
                stored += size
            params += weight.numel()
    return {"expert_bytes": stored, "effective_bits": 8 * stored / params, "expert_params": params}


def transformers_config(library: str, bits: int):
    """The library's own transformers quantization config at `bits` (quanto: int2/int4/int8)."""
    from transformers import HqqConfig, QuantoConfig

    if library == "hqq":
        return HqqConfig(nbits=bits, group_size=32)
    return QuantoConfig(weights={2: "int2", 4: "int4", 8: "int8"}[bits])


def linear_report(model: nn.Module) -> dict:
    """What a transformers-config quantization touched: quantized Linear count, and the experts' real bytes."""
    quantized = [n for n, m in model.named_modules() if type(m).__name__ in ("HQQLinear", "QLinear")]
    expert_bytes = params = 0
    for expert_set in find_expert_sets(model):
        for weight in expert_set.layout.weights(expert_set.module):
            expert_bytes += weight.numel() * weight.element_size()
            params += weight.numel()
    return {
        "quantized_linear_modules": len(quantized),
        "expert_bytes": expert_bytes,
        "effective_bits": 8 * expert_bytes / params,
        "experts_quantized": False,
    }
