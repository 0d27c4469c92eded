"""Bit-packing: exact round trips, the documented byte layout, storage size, safetensors, errors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from mode_hf.algo.packing import SUPPORTED_BITS, pack, packed_row_bytes, unpack

ROW_LENGTHS = (1, 7, 8, 9, 13, 64, 100)
LEADING_SHAPES = ((), (4,), (3, 5))


def random_codes(shape: tuple[int, ...], bits: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=generator, dtype=torch.uint8)


def reference_pack_row(row: list[int], bits: int) -> list[int]:
    """Independent reference: the docstring's pseudocode with Python integers."""
    padded = row + [0] * (-len(row) % 8)
    packed = []
    for start in range(0, len(padded), 8):
        word = sum(code << (bits * i) for i, code in enumerate(padded[start : start + 8]))
        packed.extend(word.to_bytes(bits, "little"))
    return packed


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("k", ROW_LENGTHS)
@pytest.mark.parametrize("leading", LEADING_SHAPES)
def test_round_trip_is_exact(bits: int, k: int, leading: tuple[int, ...]) -> None:
    codes = random_codes((*leading, k), bits, seed=k)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*leading, math.ceil(k / 8) * bits)
    assert torch.equal(unpack(packed, bits, k), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("k", ROW_LENGTHS)
def test_matches_python_integer_reference(bits: int, k: int) -> None:
    codes = random_codes((6, k), bits, seed=100 + k)
    expected = torch.tensor([reference_pack_row(row, bits) for row in codes.tolist()], dtype=torch.uint8)
    assert torch.equal(pack(codes, bits), expected)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_storage_is_bits_per_weight(bits: int) -> None:
    # 1024 codes at b bits take exactly 1024 * b / 8 bytes: no padding of 3-bit codes to 4 bits.
    codes = random_codes((1024,), bits)
    assert pack(codes, bits).numel() == 128 * bits == packed_row_bytes(1024, bits)
    assert [packed_row_bytes(k, bits) for k in (0, 1, 8, 9, 16)] == [0, bits, bits, 2 * bits, 2 * bits]


def test_hand_computed_layout() -> None:
    # 3 bits: word = 1 + 2<<3 + 3<<6 + 4<<9 + 5<<12 + 6<<15 + 7<<18 = 2054353 = 0x1F58D1, little-endian.
    three = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack(three, 3).tolist() == [0xD1, 0x58, 0x1F]
    # 4 bits: code 0 in the low nibble of byte 0; the row is padded with zero codes to 8 codes = 4 bytes.
    assert pack(torch.tensor([0x1, 0x2, 0xF], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F, 0, 0]
    # 2 bits, K = 9: a second run holds only code 8.
    two = torch.tensor([3, 0, 0, 1, 0, 0, 0, 2, 1], dtype=torch.uint8)
    assert pack(two, 2).tolist() == [0b01000011, 0b10000000, 0b00000001, 0]
    # 8 bits: the packed row is the codes themselves.
    eight = torch.tensor([[0, 255, 17]], dtype=torch.uint8)
    assert pack(eight, 8).tolist() == [[0, 255, 17, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_round_trip_through_safetensors(bits: int, tmp_path) -> None:
    codes = random_codes((3, 5, 13), bits, seed=bits)
    path = tmp_path / "packed.safetensors"
    save_file({"qweight": pack(codes, bits)}, str(path))
    loaded = load_file(str(path))["qweight"]
    assert loaded.dtype == torch.uint8
    assert torch.equal(unpack(loaded, bits, 13), codes)


def test_empty_tensors() -> None:
    assert pack(torch.zeros(0, 5, dtype=torch.uint8), 4).shape == (0, 4)
    assert unpack(torch.zeros(2, 0, dtype=torch.uint8), 3, 0).shape == (2, 0)


def test_inputs_untouched() -> None:
    codes = random_codes((4, 9), 3)
    before = codes.clone()
    packed = pack(codes, 3)
    packed_before = packed.clone()
    unpack(packed, 3, 9)
    assert torch.equal(codes, before) and torch.equal(packed, packed_before)


@pytest.mark.parametrize("bits", (0, 1, 5, 6, 16))
def test_unsupported_bits_raise(bits: int) -> None:
    codes = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not supported"):
        pack(codes, bits)
    with pytest.raises(ValueError, match="not supported"):
        unpack(codes, bits, 8)
    with pytest.raises(ValueError, match="not supported"):
        packed_row_bytes(8, bits)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_out_of_range_codes_raise(bits: int) -> None:
    codes = torch.zeros(2, 9, dtype=torch.uint8)
    codes[1, 8] = 1 << bits
    with pytest.raises(ValueError, match="out of range"):
        pack(codes, bits)


def test_bad_dtype_and_length_raise() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pack(torch.zeros(8, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack(torch.zeros(4, dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match="at least one dim"):
        pack(torch.tensor(1, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="take 6"):
        unpack(torch.zeros(3, 3, dtype=torch.uint8), 3, 9)  # 9 codes at 3 bits take 6 bytes, not 3
