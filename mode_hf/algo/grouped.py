"""Grouped matmul of rows sorted by expert: `torch._grouped_mm` where it runs, a loop of `F.linear` elsewhere.
No transformers import."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of `x` [P, K] grouped by expert (group g ends at offsets[g]) times their expert's weight [n, O, K]^T,
    plus their expert's row of `bias` [n, O] when given."""
    if weights.shape[0] == 1:
        out = F.linear(x, weights[0])
    elif supports_grouped_mm(x, weights):
        out = torch._grouped_mm(x, weights.transpose(1, 2), offs=offsets)
    else:
        starts = [0] + offsets[:-1].tolist()
        out = torch.cat([F.linear(x[a:b], w) for a, b, w in zip(starts, offsets.tolist(), weights)])
    if bias is None:
        return out
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))  # rows of each group
    return out + bias.to(out.dtype).repeat_interleave(sizes, dim=0, output_size=out.shape[0])


def supports_grouped_mm(x: torch.Tensor, weights: torch.Tensor) -> bool:
    """torch._grouped_mm runs on CPU in float32/bfloat16/float16, on CUDA in bfloat16 from compute capability 8.0,
    with rows (K and O) that are multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or any(d * x.element_size() % 16 for d in weights.shape[1:]):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
