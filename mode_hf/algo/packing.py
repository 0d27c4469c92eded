"""Bit-packing of integer quantization codes: `bits` bits per code, no wasted bits. This is the checkpoint format.

Layout of one row of K codes at width b (b in SUPPORTED_BITS), as pseudocode:

    K8 = ceil(K / 8) * 8
    c  = codes + [0] * (K8 - K)                      # pad the row with zero codes
    for n in range(K8 // 8):                         # every run of 8 consecutive codes ...
        word = sum(c[8n + i] << (b * i) for i in range(8))       # ... is one (8 * b)-bit integer
        packed[b * n : b * (n + 1)] = word.to_bytes(b, "little") # ... stored as b little-endian bytes

so a row takes ceil(K / 8) * b bytes. Equivalently the row is one little-endian bit stream in which bit j of code i
is stream bit b * i + j, and stream bit p is bit (p % 8) of byte p // 8. Leading dims are independent rows.
For b = 8 the packed row is the codes themselves; for b = 4 code 2m sits in the low nibble of byte m.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
CODES_PER_RUN = 8  # a run of 8 codes at b bits fills exactly b bytes, whatever b is


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes one packed row of `k` codes takes at width `bits`: ceil(k / 8) * bits.

    Raises:
        ValueError: `bits` is not in SUPPORTED_BITS or `k` is negative.
    """
    check_bits(bits)
    if k < 0:
        raise ValueError(f"row length k={k} must be >= 0")
    return -(-k // CODES_PER_RUN) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes `bits` bits each (layout in the module docstring).

    Args:
        codes: uint8 [..., K], every value < 2**bits; any number of leading dims.
        bits: width, one of SUPPORTED_BITS.

    Returns:
        uint8 [..., packed_row_bytes(K, bits)], on the device of `codes`.

    Raises:
        ValueError: unsupported `bits`, `codes` not uint8 or 0-dim, or a code >= 2**bits.
    """
    check_bits(bits)
    _check_codes(codes, bits)
    k = codes.shape[-1]
    padded = F.pad(codes, (0, packed_row_bytes(k, bits) // bits * CODES_PER_RUN - k))  # [..., K8]
    planes = (padded.unsqueeze(-1) >> _bit_positions(bits, codes.device)) & 1  # [..., K8, b]: bit j of code i
    row_bytes = padded.shape[-1] * bits // 8
    stream = planes.reshape(*codes.shape[:-1], row_bytes, 8)  # [..., R, 8]: stream bit p at [p // 8, p % 8]
    return _weighted_bit_sum(stream)  # [..., ceil(K / 8) * b]


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`.

    Args:
        packed: uint8 [..., packed_row_bytes(k, bits)].
        bits: the width the codes were packed at.
        k: number of codes per row before padding.

    Returns:
        uint8 [..., k], every value < 2**bits.

    Raises:
        ValueError: unsupported `bits`, `packed` not uint8 or 0-dim, or its last dim is not packed_row_bytes(k, bits).
    """
    row_bytes = packed_row_bytes(k, bits)
    _check_uint8(packed, "packed")
    if packed.shape[-1] != row_bytes:
        raise ValueError(
            f"packed rows hold {packed.shape[-1]} bytes but k={k} codes at {bits} bits take {row_bytes} "
            "(ceil(k / 8) * bits): check k and bits against the checkpoint"
        )
    if bits == 8:
        return packed[..., :k]
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 2 and 4 bits: every byte holds 8 // bits whole codes, the first in its low bits
        codes = (packed.unsqueeze(-1) >> (_bit_positions(8 // bits, packed.device) * bits)) & mask  # [..., R, 8 / b]
    else:  # 3 bits: every run of 3 bytes holds 8 codes, two of them straddling a byte boundary
        runs = packed.reshape(*packed.shape[:-1], row_bytes // 3, 3)
        b0, b1, b2 = runs[..., 0], runs[..., 1], runs[..., 2]  # [..., n]
        codes = torch.stack(
            [b0 & 7, (b0 >> 3) & 7, (b0 >> 6) | ((b1 & 1) << 2), (b1 >> 1) & 7,
             (b1 >> 4) & 7, (b1 >> 7) | ((b2 & 3) << 1), (b2 >> 2) & 7, b2 >> 5],
            dim=-1,
        )  # [..., n, 8] uint8
    return codes.reshape(*packed.shape[:-1], -1)[..., :k]  # [..., k] uint8


def _bit_positions(count: int, device: torch.device) -> torch.Tensor:
    """uint8 [count]: 0, 1, ..., count - 1."""
    return torch.arange(count, dtype=torch.uint8, device=device)


def _weighted_bit_sum(bit_planes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n, w] of 0/1 -> uint8 [..., n], the integer sum_j bit[j] << j (w <= 8)."""
    shifted = bit_planes << _bit_positions(bit_planes.shape[-1], bit_planes.device)  # [..., n, w]
    return shifted.sum(-1, dtype=torch.int16).to(torch.uint8)  # [..., n]; disjoint bits, so sum == OR <= 255


def check_bits(bits: int) -> None:
    """Raise ValueError unless `bits` is one of SUPPORTED_BITS."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported: choose one of {SUPPORTED_BITS}")


def _check_uint8(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype != torch.uint8:
        raise ValueError(f"{name} must be torch.uint8, got {tensor.dtype}")
    if tensor.dim() == 0:
        raise ValueError(f"{name} must have at least one dim [..., K], got a 0-dim tensor")


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    _check_uint8(codes, "codes")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes hold {int(codes.max())}, out of range for {bits} bits (must be < {1 << bits})")
