"""Group-wise uniform (asymmetric, or symmetric on request) weight quantization along the input dimension: RTN and GPTQ.

A weight W [..., O, K] is cut along K into groups of g consecutive inputs. Every (row, group) has a float16 scale s
and an integer zero point z in [0, 2**b - 1]; a weight is stored as a code q in [0, 2**b - 1] and reconstructed as

    W_r[o, k] = (q[o, k] - z[o, k // g]) * s[o, k // g]

Group parameters follow the min-max rule of GPTQ with the range widened to include 0:
xmin = min(min(w), 0), xmax = max(max(w), 0), s = (xmax - xmin) / (2**b - 1) (1 if that is 0), rounded *up* to the
next float16 value *before* z = clamp(round(-xmin / s)) and q = clamp(round(w / s) + z) are computed, so that the
stored float16 scale reproduces exactly what the quantizer meant. Rounding up (not to nearest) keeps the grid wide
enough to cover [xmin, xmax], so RTN's error is at most s / 2 for every weight; to nearest, the top code could be
clamped and the error reach 0.6 s at 8 bits. Arithmetic is float32; `round` is round-half-to-even (torch.round).

GPTQ (Frantar et al., 2022, arXiv:2210.17323) quantizes one input column at a time and spreads each column's error
over the columns not yet quantized, using the upper Cholesky factor of the inverse Hessian H = sum_t x_t x_t^T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import SUPPORTED_BITS, check_bits

FP16_MAX = torch.finfo(torch.float16).max
FP16_MIN_SUBNORMAL = 2.0**-24  # smallest positive float16; a smaller scale would round to 0
CHOLESKY_RETRIES = 4  # attempts at damp, 10 damp, 100 damp, 1000 damp before giving up


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes and group parameters of one quantized weight.

    Attributes:
        codes: uint8 [..., O, K], values in [0, 2**bits - 1].
        scales: float16 [..., O, K // group_size].
        zeros: uint8 [..., O, K // group_size], integer zero points in [0, 2**bits - 1].
        bits: width, one of SUPPORTED_BITS.
        group_size: inputs per group; divides K.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reconstruction W_r [..., O, K] in `dtype`."""
        return dequantize(self.codes, self.scales, self.zeros, self.group_size, dtype)


def resolve_group_size(k: int, group_size: int) -> int:
    """The group size actually used for K = `k` inputs.

    `group_size` if it divides k; k if k <= group_size; otherwise the largest divisor of k below group_size.

    Raises:
        ValueError: `k` or `group_size` is not positive.
    """
    if k < 1 or group_size < 1:
        raise ValueError(f"k={k} and group_size={group_size} must both be >= 1")
    return next(d for d in range(min(group_size, k), 0, -1) if k % d == 0)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    exact: bool = True,
) -> torch.Tensor:
    """W_r[..., o, k] = (codes[..., o, k] - zeros[..., o, k // g]) * scales[..., o, k // g], cast to `dtype`.

    Computed in float32 whatever `dtype` is (the float32 product is exact; one rounding to `dtype`). With
    exact=False and a 16-bit `dtype`, computed in `dtype` (2.5x faster on CPU, no float32 buffer): identical for
    float16, which holds the scale exactly; for bfloat16 the scale is rounded first, so a weight may differ by one
    bfloat16 unit in the last place (2**-8 relative), far below any quantization step.

    Args:
        codes: integer [..., O, K].
        scales: float [..., O, K // group_size].
        zeros: integer [..., O, K // group_size].

    Returns:
        [..., O, K] in `dtype`.

    Raises:
        ValueError: the shapes of codes, scales and zeros do not agree with `group_size`.
    """
    groups = _check_group_shapes(codes.shape, scales.shape, zeros.shape, group_size)
    compute = dtype if not exact and dtype in (torch.float16, torch.bfloat16) else torch.float32
    weight = codes.reshape(*codes.shape[:-1], groups, group_size).to(compute, copy=True)  # [..., O, G, g]
    weight.sub_(zeros.to(compute).unsqueeze(-1)).mul_(scales.to(compute).unsqueeze(-1))  # in place: one buffer
    return weight.reshape(codes.shape).to(dtype)  # [..., O, K]


def rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization.

    Args:
        weight: float [..., O, K]; leading dims are independent (e.g. [E, O, K] for all experts at once).
        bits: width, one of SUPPORTED_BITS.
        group_size: requested group size, passed through `resolve_group_size(K, group_size)`.
        symmetric: zero point fixed at 2**(bits - 1) (see `_group_params`).

    Returns:
        QuantizedWeight with codes [..., O, K], scales/zeros [..., O, K // g]. `weight` is left untouched.

    Raises:
        ValueError: unsupported `bits`, or `weight` is not a floating tensor with at least 2 dims.
    """
    check_bits(bits)
    _check_weight(weight, min_dims=2)
    g = resolve_group_size(weight.shape[-1], group_size)
    W = weight.float().reshape(*weight.shape[:-1], -1, g)  # [..., O, G, g]
    scale, zero = _group_params(W, _max_code(bits), symmetric)  # [..., O, G]
    codes = _quantize(W, scale.unsqueeze(-1), zero.unsqueeze(-1), _max_code(bits))  # [..., O, G, g]
    return _pack_result(codes.reshape(weight.shape), scale, zero, bits, g)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    symmetric: bool = False,
) -> QuantizedWeight:
    """GPTQ quantization of one linear weight (no act-order).

    Dead inputs (H[k, k] == 0) get H[k, k] = 1 and W[:, k] = 0; `damp * mean(diag(H))` is added to the diagonal.
    Columns are processed in lazy batches; group parameters are taken from the error-updated weights when the
    column loop reaches the first column of each group. The batch length is adjusted to the group size (a multiple
    of g, or a divisor of g when g > block_size) so that a group's columns are all up to date at that moment.

    Args:
        weight: float [O, K].
        hessian: float [K, K], sum over calibration tokens of x x^T (any positive scaling).
        bits: width, one of SUPPORTED_BITS.
        group_size: requested group size, passed through `resolve_group_size(K, group_size)`.
        damp: relative dampening of the diagonal.
        block_size: columns per lazy batch update.
        symmetric: zero point fixed at 2**(bits - 1) (see `_group_params`).

    Returns:
        QuantizedWeight whose `dequantize()` is exactly the GPTQ reconstruction. Inputs are left untouched.

    Raises:
        ValueError: unsupported `bits`, wrong shapes or dtypes, non-positive damp or block_size.
        RuntimeError: H + damping is not positive definite even after raising the damping 1000x.
    """
    check_bits(bits)
    _check_gptq_args(weight, hessian, damp, block_size)
    g = resolve_group_size(weight.shape[1], group_size)
    W, H = weight.float().clone(), hessian.float().clone()  # [O, K], [K, K]
    dead = torch.diagonal(H) == 0  # [K]
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_hessian_factor(H, damp)  # [K, K] upper triangular
    codes, scale, zero = _gptq_columns(W, Hinv, _max_code(bits), g, _lazy_block(block_size, g), symmetric)
    return _pack_result(codes, scale, zero, bits, g)


def quantization_error(weight: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """Relative squared error ||W - W_r||^2 / ||W||^2 over the last two dims.

    Args:
        weight: float [..., O, K]; q: its quantization.

    Returns:
        float32 [...] (0-dim for a 2-D weight); nan where W is all zeros.
    """
    W = weight.float()
    error = (W - q.dequantize(torch.float32)).pow(2).sum((-2, -1))  # [...]
    return error / W.pow(2).sum((-2, -1))  # [...]


# ---------------------------------------------------------------------------------------------------------- kernels
def _gptq_columns(
    W: torch.Tensor, Hinv: torch.Tensor, maxq: int, g: int, block: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ column loop. W [O, K] float32 is consumed (updated in place); Hinv [K, K] upper Cholesky of H^-1.

    Returns (codes float32 [O, K], scale float32 [O, G], zero float32 [O, G]).
    """
    O, K = W.shape
    codes = torch.zeros_like(W)  # [O, K]
    scale = torch.zeros(O, K // g, dtype=W.dtype, device=W.device)  # [O, G]
    zero = torch.zeros_like(scale)  # [O, G]
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()  # [O, B]
        Err1 = torch.zeros_like(W1)  # [O, B]
        Hinv1 = Hinv[i1:i2, i1:i2]  # [B, B]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # group start: its columns are all in W1 (g <= B) or this is the block start (g > B)
                group = W1[:, i : i + g] if i + g <= i2 - i1 else W[:, col : col + g]  # [O, g]
                scale[:, col // g], zero[:, col // g] = _group_params(group, maxq, symmetric)
            s, z = scale[:, col // g], zero[:, col // g]  # [O]
            codes[:, col] = _quantize(W1[:, i], s, z, maxq)  # [O]
            Err1[:, i] = (W1[:, i] - (codes[:, col] - z) * s) / Hinv1[i, i]  # [O]
            W1[:, i:] -= Err1[:, i : i + 1] * Hinv1[i : i + 1, i:]  # [O, B - i]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # [O, K - i2]: lazy batch update of the columns still to come
    return codes, scale, zero


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + d I)^-1, d = damp * mean(diag(H)), retrying at 10x damping on failure.

    H: float32 [K, K] symmetric. Returns float32 [K, K] upper triangular. Raises RuntimeError when all attempts fail.
    """
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)  # [K, K]
    for attempt in range(CHOLESKY_RETRIES):
        factor = _try_inverse_factor(H + (damp * 10**attempt) * mean_diag * eye)  # [K, K] or None
        if factor is not None:
            return factor
    largest = damp * 10 ** (CHOLESKY_RETRIES - 1)
    raise RuntimeError(
        f"GPTQ: the Hessian [{H.shape[0]}, {H.shape[0]}] is not positive definite even with damp={largest:g} "
        "(relative to its mean diagonal); check it for nan/inf or raise `damp`"
    )


def _try_inverse_factor(H: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of H^-1 [K, K], or None if a factorization fails or gives non-finite values."""
    L, info = torch.linalg.cholesky_ex(H)  # [K, K] lower
    if info.item() != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)  # [K, K] upper
    if info.item() != 0 or not bool(torch.isfinite(U).all()):
        return None
    return U


def _group_params(W: torch.Tensor, maxq: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point over the last dim.

    Symmetric: the range is [-m, m], m = max |W|, and the zero point is (maxq + 1) / 2 = 2**(bits - 1), so codes
    minus zero are the signed integers [-2**(bits-1), 2**(bits-1) - 1] that symmetric formats (compressed-tensors,
    GPTQ sym) store without a zero point; the largest positive value clamps to 2**(bits-1) - 1 steps.

    W: float32 [..., n]. Returns (scale, zero), float32 [...]: scale exactly representable in float16, zero an
    integer in [0, maxq].
    """
    xmin = W.amin(-1).clamp(max=0.0)  # [...]
    xmax = W.amax(-1).clamp(min=0.0)  # [...]
    if symmetric:
        xmax = torch.maximum(xmax, -xmin)  # [...]
        xmin = -xmax
    scale = (xmax - xmin) / maxq  # [...]
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # [...]
    scale = _ceil_to_fp16(scale.clamp(FP16_MIN_SUBNORMAL, FP16_MAX))  # [...] what the checkpoint will hold
    zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-xmin / scale).clamp(0, maxq)  # [...]
    return scale, zero


def _ceil_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= x, as float32. x: positive float32 [...] <= FP16_MAX."""
    nearest = x.half()  # [...]
    above = (nearest.view(torch.int16) + 1).view(torch.float16)  # [...] next float16 up (x > 0)
    return torch.where(nearest.float() < x, above, nearest).float()  # [...]


def _quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes clamp(round(W / scale) + zero, 0, maxq) as float32, broadcasting scale/zero against W."""
    codes = W / scale  # a new tensor: the rest works in place on it
    return codes.round_().add_(zero).clamp_(0, maxq)


def _pack_result(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, g: int) -> QuantizedWeight:
    """float32 codes [..., O, K], scale and zero [..., O, G] -> QuantizedWeight with storage dtypes."""
    return QuantizedWeight(
        codes=codes.to(torch.uint8), scales=scale.half(), zeros=zero.to(torch.uint8), bits=bits, group_size=g
    )


def _lazy_block(block_size: int, g: int) -> int:
    """Columns per lazy batch: a multiple of g when g <= block_size, else the largest divisor of g <= block_size."""
    return (block_size // g) * g if g <= block_size else resolve_group_size(g, block_size)


def _max_code(bits: int) -> int:
    return (1 << bits) - 1


# ------------------------------------------------------------------------------------------------------- validation
def _check_weight(weight: torch.Tensor, min_dims: int) -> None:
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor, got {weight.dtype}")
    if weight.dim() < min_dims or weight.shape[-1] == 0:
        raise ValueError(f"weight must be [..., O, K] with K >= 1, got shape {tuple(weight.shape)}")


def _check_gptq_args(weight: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int) -> None:
    _check_weight(weight, min_dims=2)
    k = weight.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"gptq takes one weight [O, K], got shape {tuple(weight.shape)}; loop over leading dims")
    if tuple(hessian.shape) != (k, k) or not hessian.is_floating_point():
        raise ValueError(
            f"hessian must be a float [{k}, {k}] for weight [O, {k}], got {hessian.dtype} {tuple(hessian.shape)}"
        )
    if damp <= 0 or block_size < 1:
        raise ValueError(f"damp={damp} must be > 0 and block_size={block_size} >= 1")


def _check_group_shapes(codes: torch.Size, scales: torch.Size, zeros: torch.Size, group_size: int) -> int:
    """Number of groups G; raises ValueError unless codes [..., O, G * g] and scales == zeros == [..., O, G]."""
    groups = codes[-1] // group_size if group_size > 0 else 0
    expected = (*codes[:-1], groups)
    if group_size < 1 or groups * group_size != codes[-1] or tuple(scales) != expected or tuple(zeros) != expected:
        raise ValueError(
            f"codes {tuple(codes)} with group_size={group_size} need scales and zeros of shape {expected}, "
            f"got {tuple(scales)} and {tuple(zeros)}"
        )
    return groups
