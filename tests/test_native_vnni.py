"""The AVX-512 matvecs of the native CPU kernels: the opt-in int8-activation matvec (MODE_HF_INT8_ACTIVATIONS; VNNI
and VBMI builds) - the activation rounding against float64 math, the integer matvec against float64 math on the
quantizer's codes and the rounded activations, the packed modules on that path, the fallbacks where it cannot
serve - and the bfloat16 matvec (AVX512-BF16 builds; bfloat16 inputs, 2-4 bits), against float64 math."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from mode_hf.algo import quantize
from mode_hf.model import native
from mode_hf.model.layouts import GatedActivation
from mode_hf.model.packed import PackedExperts, PackedLinear

from test_native import packed_experts, random_packed_experts, routed_reference

needs_int8 = pytest.mark.skipif(
    shutil.which("cc") is None or not native.enabled() or not native.int8_available(),
    reason="no native kernels, or built for a CPU without AVX-512 VNNI/VBMI: no int8 matvec",
)


needs_bf16 = pytest.mark.skipif(
    shutil.which("cc") is None or not native.enabled() or not native.bf16_available(),
    reason="no native kernels, or built for a CPU without AVX512-BF16: no bfloat16 matvec",
)


def rounded(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 rounding as documented: (q [P, K] as float64, scale [P, K / group] as float64); the scale is
    max |x| / 127 in float32 (as stored), q = round-half-even(x / scale) of the float32 quotient (IEEE division)
    clamped to +-127, zero where the group is all zeros."""
    groups = x.float().view(x.shape[0], -1, group)
    scale = groups.abs().amax(-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[..., None] > 0, torch.round((groups / safe[..., None]).double()), 0.0).clamp(-127, 127)
    return q.view(x.shape).double(), scale.double()


@needs_int8
@pytest.mark.parametrize("group", [64, 24])  # vectorized (multiples of 16); scalar
def test_activation_rounding_matches_float64(group):
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 5)[:, None]
    x[1, group : 2 * group] = 0.0  # a group of zeros: scale 0, codes 0
    x[2, 0] = -x[2, :group].abs().max() * 2  # the largest magnitude negative: exactly -127
    x[3, 5] = x[3, :group].abs().max() * 0.5 + 0.5 * float(x[3, :group].abs().max()) / 127  # near a half step
    q, scale, sums = native.quantize_int8(x, group)
    expected_q, expected_scale = rounded(x, group)
    assert q.dtype == torch.int8 and torch.equal(q.double(), expected_q)
    assert torch.equal(scale.double(), expected_scale) and float(scale[1, 1]) == 0.0 and int(q[2, 0]) == -127
    assert torch.equal(sums.double(), expected_q.view(5, -1, group).sum(-1))
    # every element within half a step of its value (and the float32 quotient's rounding)
    step = scale.double().repeat_interleave(group, 1)
    assert bool(((q.double() * step - x.double()).abs() <= step * (0.5 + 1e-5)).all())


@needs_int8
def test_a_nan_or_infinity_makes_its_outputs_nan():
    qweight, scales, zeros, _ = packed_experts(3, 1, 8, 128, 64, seed=0)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    x[0, 5], x[1, 70], x[2, 100] = float("nan"), float("inf"), -float("inf")
    _, scale, _ = native.quantize_int8(x, 64)
    assert torch.isnan(scale[0, 0]) and torch.isnan(scale[1, 1]) and torch.isnan(scale[2, 1])
    assert not bool(torch.isnan(scale[:, 0][1:]).any())
    out = native.grouped_gemv(qweight, scales, zeros, 3, 64, [0], [0], [3], x, int8_activations=True)
    assert bool(torch.isnan(out).all())
    for group in (64, 8):  # the vectorized and the scalar rounding
        assert torch.isnan(native.quantize_int8(x, group)[1][0, 0])


@needs_int8
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
# group 64: one VNNI step per group; 128 and 192: several; out_dim 14 leaves 2 rows after the blocks of 4
@pytest.mark.parametrize("in_dim, group, out_dim", [(256, 64, 16), (256, 128, 14), (384, 192, 13)])
def test_int8_gemv_matches_float64(bits, in_dim, group, out_dim):
    qweight, scales, zeros, weights = packed_experts(bits, 4, out_dim, in_dim, group, seed=bits)
    x = torch.randn(12, in_dim, generator=torch.Generator().manual_seed(1))
    # 1 row, 6 rows (4 + 2 per step), an expert with no rows, 3 rows; row 11 routed nowhere
    slots, starts, counts = [3, 0, 1, 3], [0, 1, 7, 7], [1, 6, 0, 4]
    out = torch.full((12, out_dim), 123.0)
    native.grouped_gemv(qweight, scales, zeros, bits, group, slots, starts, counts, x, out=out, int8_activations=True)
    q, scale = rounded(x, group)
    xq = (q.view(12, -1, group) * scale[..., None]).view(12, in_dim)  # the activations the kernel multiplies
    expected = torch.cat([xq[0:1] @ weights[3].T, xq[1:7] @ weights[0].T, xq[7:11] @ weights[3].T])
    assert torch.allclose(out[:11].double(), expected, rtol=0, atol=2e-6 * float(expected.abs().max()))
    assert torch.equal(out[11], torch.full((out_dim,), 123.0))
    exact = torch.cat([x[0:1].double() @ weights[3].T, x[1:7].double() @ weights[0].T, x[7:11].double() @ weights[3].T])
    assert float((out[:11].double() - exact).norm() / exact.norm()) < 0.02  # the price of the rounding: small


@needs_int8
def test_int8_gemv_refuses_a_group_it_cannot_step_through():
    qweight, scales, zeros, _ = packed_experts(4, 1, 8, 96, 32, seed=0)
    with pytest.raises(ValueError, match="multiple of 64"):
        native.grouped_gemv(qweight, scales, zeros, 4, 32, [0], [0], [1], torch.randn(1, 96), int8_activations=True)


@needs_int8
@pytest.mark.parametrize("tokens", [1, 3, 40])  # 40 tokens: 10 rows per expert, still the int8 matvec
def test_packed_experts_take_the_int8_path_when_asked(monkeypatch, tokens):
    """The decode forward with MODE_HF_INT8_ACTIVATIONS=1: within the rounding's error of float64 math on the
    quantizer's codes, and not the float32 path's numbers (so the int8 path ran)."""
    widths = [2, 3, 4, 8, 3, 2, 4, 3]
    generator = torch.Generator().manual_seed(0)
    packed, reference = random_packed_experts(widths, 256, 128, generator)
    hidden = torch.randn(tokens, 256, generator=generator)
    weights, index = torch.rand(tokens, len(widths), generator=generator).topk(2, dim=-1)
    expected = routed_reference(reference, hidden, index, weights)
    with torch.no_grad():
        monkeypatch.setenv("MODE_HF_INT8_ACTIVATIONS", "0")
        float_path = packed(hidden, index, weights)
        monkeypatch.setenv("MODE_HF_INT8_ACTIVATIONS", "1")
        got = packed(hidden, index, weights)
    assert not torch.equal(got, float_path)
    assert float((got.double() - expected).norm() / expected.norm()) < 0.02


@needs_int8
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [3, 16])  # 16: beyond the float32 matvec's limit, within the int8 one's
def test_packed_linear_takes_the_int8_path_when_asked(monkeypatch, bits, rows):
    linear = torch.nn.Linear(256, 20)
    weight = torch.randn(20, 256, generator=torch.Generator().manual_seed(bits)) * 0.1
    q = quantize.rtn(weight, bits, 128)
    packed = PackedLinear(linear, bits, 128)
    packed.set_weight(q, None)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("MODE_HF_INT8_ACTIVATIONS", "1")
    with torch.no_grad():
        got = packed(x)
    codes, scale = rounded(x, 128)
    xq = (codes.view(rows, -1, 128) * scale[..., None]).view(rows, 256)
    expected = xq @ q.dequantize(torch.float64).T
    assert torch.allclose(got.double(), expected, rtol=0, atol=2e-6 * float(expected.abs().max()))


@needs_int8
def test_a_request_the_kernels_cannot_serve_warns_once_and_runs_float32(monkeypatch, caplog):
    monkeypatch.setattr(native, "_int8_warned", set())
    monkeypatch.setenv("MODE_HF_INT8_ACTIVATIONS", "1")
    linear = torch.nn.Linear(96, 8)
    packed = PackedLinear(linear, 4, 32)  # group 32: not a multiple of the 64-code step
    packed.set_weight(quantize.rtn(torch.randn(8, 96), 4, 32), None)
    x = torch.randn(1, 96)
    with caplog.at_level(logging.WARNING, logger="mode_hf.model.native"), torch.no_grad():
        got, again = packed(x), packed(x)
    assert caplog.text.count("MODE_HF_INT8_ACTIVATIONS=1 is ignored") == 1 and "group size 32" in caplog.text
    assert torch.allclose(got.double(), x.double() @ packed.dequantized_weight(torch.float64).T, rtol=0, atol=1e-5)
    assert torch.equal(got, again)
    monkeypatch.setenv("MODE_HF_INT8_ACTIVATIONS", "0")
    assert not native.use_int8(128)


@needs_int8
def test_a_build_without_vnni_has_no_int8_matvec(monkeypatch, tmp_path, caplog):
    """Without -march=native the int8 kernel is not compiled: the library says so, a direct call is refused, and a
    request falls back to float32 with a warning."""
    wrapper = tmp_path / "cc-portable"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && { echo "unknown -march=native" >&2; exit 1; }; done\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("MODE_HF_CACHE", str(tmp_path / "cache"))
    lib = native._load(native._build())
    assert lib.mode_int8_available() == 0
    monkeypatch.setattr(native, "library", lambda: lib)
    monkeypatch.setattr(native, "_int8_warned", set())
    monkeypatch.setenv("MODE_HF_INT8_ACTIVATIONS", "1")
    with caplog.at_level(logging.WARNING, logger="mode_hf.model.native"):
        assert not native.use_int8(128)
    assert "without AVX-512 VNNI" in caplog.text
    qweight, scales, zeros, _ = packed_experts(3, 1, 8, 128, 64, seed=0)
    with pytest.raises(ValueError, match="VNNI build"):
        native.grouped_gemv(qweight, scales, zeros, 3, 64, [0], [0], [1], torch.randn(1, 128), int8_activations=True)
    quantized = native.quantize_int8(torch.randn(1, 128), 64)
    slots = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="no int8 matvec"):
        native.gemv_int8_prepared(lib, (qweight, scales, zeros), 3, 64, slots, slots, torch.ones(1, dtype=torch.int64),
                                  quantized, torch.empty(1, 8))


@needs_bf16
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("in_dim, group, out_dim", [(256, 64, 16), (256, 128, 14), (384, 192, 13)])
def test_bf16_gemv_matches_float64(bits, in_dim, group, out_dim):
    assert native.use_bf16(bits, group) and not native.use_bf16(8, group) and not native.use_bf16(bits, 32)
    qweight, scales, zeros, weights = packed_experts(bits, 4, out_dim, in_dim, group, seed=bits)
    x = torch.randn(12, in_dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    slots, starts, counts = [3, 0, 1, 3], [0, 1, 7, 7], [1, 6, 0, 4]
    out = torch.full((12, out_dim), 123.0)
    native.grouped_gemv(qweight, scales, zeros, bits, group, slots, starts, counts, x, out=out)
    x64 = x.double()  # the bfloat16 values exactly
    expected = torch.cat([x64[0:1] @ weights[3].T, x64[1:7] @ weights[0].T, x64[7:11] @ weights[3].T])
    assert torch.allclose(out[:11].double(), expected, rtol=0, atol=2e-6 * float(expected.abs().max()))
    assert torch.equal(out[11], torch.full((out_dim,), 123.0))
    direct = torch.full((12, out_dim), 123.0)  # the kernel itself, not a fallback
    as_tensors = [torch.tensor(v, dtype=torch.int64) for v in (slots, starts, counts)]
    native.gemv_bf16_prepared(native.library(), (qweight, scales, zeros), bits, group, *as_tensors, x.contiguous(),
                              native.group_sums(x.float(), group), direct)
    assert torch.equal(direct, out)


@needs_bf16
def test_bf16_gemv_refuses_8_bit_weights():
    qweight, scales, zeros, _ = packed_experts(8, 1, 8, 128, 64, seed=0)
    one = torch.zeros(1, dtype=torch.int64)
    x = torch.randn(1, 128).bfloat16()
    with pytest.raises(RuntimeError, match="no bfloat16 matvec for 8-bit"):
        native.gemv_bf16_prepared(native.library(), (qweight, scales, zeros), 8, 64, one, one, torch.ones(1, dtype=torch.int64),
                                  x, native.group_sums(x.float(), 64), torch.empty(1, 8))


@needs_bf16
@pytest.mark.parametrize("tokens", [1, 3])
def test_packed_experts_in_bfloat16_match_float64(tokens):
    """Mixed widths (2/3/4 through the bfloat16 matvec, 8 through the float32 one), bfloat16 inputs, the activation
    rounded to bfloat16 as the 16-bit module computes it: within bfloat16 rounding of float64 math."""
    widths = [2, 3, 4, 8, 3, 2, 4, 3]
    generator = torch.Generator().manual_seed(0)
    packed, reference = random_packed_experts(widths, 256, 128, generator)
    hidden = torch.randn(tokens, 256, generator=generator).bfloat16()
    weights, index = torch.rand(tokens, len(widths), generator=generator).topk(2, dim=-1)
    expected = routed_reference(reference, hidden, index, weights)
    with torch.no_grad():
        got = packed(hidden, index, weights.bfloat16())
    assert got.dtype == torch.bfloat16
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-2


@needs_bf16
def test_bfloat16_decode_of_up_to_12_rows_per_expert_takes_the_bfloat16_matvec(monkeypatch):
    """Up to 12 rows per hit expert in bfloat16: the whole block in one native call (`moe_bf16`); with that call
    declined, the pair path's bfloat16 matvec at every width; float32 inputs: neither (dequantization here)."""
    calls, blocks = [], []
    original, block = native.gemv_bf16_prepared, native.moe_bf16
    monkeypatch.setattr(native, "gemv_bf16_prepared", lambda *args: calls.append(args[2]) or original(*args))
    monkeypatch.setattr(native, "moe_bf16", lambda *args: blocks.append(args[1].shape[0]) or block(*args))
    generator = torch.Generator().manual_seed(0)
    packed, _ = random_packed_experts([2, 3, 4, 3], 256, 128, generator)
    weights, index = torch.rand(20, 4, generator=generator).topk(2, dim=-1)  # 40 pairs: 10 rows per expert
    hidden = torch.randn(20, 256, generator=generator).bfloat16()
    with torch.no_grad():
        fused = packed(hidden, index, weights.bfloat16())
    assert blocks == [20] and calls == []
    monkeypatch.setattr(PackedExperts, "_fused_decode", lambda *args: None)
    with torch.no_grad():
        pairs = packed(hidden, index, weights.bfloat16())
    assert sorted(set(calls)) == [2, 3, 4] and blocks == [20]
    assert float((fused.double() - pairs.double()).norm() / pairs.double().norm()) < 1e-2
    calls.clear()
    with torch.no_grad():  # float32 inputs: the float32 matvec up to 5 rows per expert, here dequantization
        packed(hidden.float(), index, weights)
    assert calls == []


@needs_bf16
@pytest.mark.parametrize("tokens", [1, 3])
def test_fused_decode_block_matches_float64(monkeypatch, tokens):
    """One native call for the block (routing, gate/up, silu(gate) * up, down, the weighted sum per token) against
    float64 math on the quantizer's codes, mixed widths, an empty slot (expert id E: expert parallelism) skipped."""
    blocks = []
    block = native.moe_bf16
    monkeypatch.setattr(native, "moe_bf16", lambda *args: blocks.append(1) or block(*args))
    monkeypatch.setattr(PackedExperts, "expert_outputs", lambda *a: pytest.fail("the pair path ran"))
    generator = torch.Generator().manual_seed(tokens)
    widths = [2, 3, 4, 3, 2, 4]
    packed, reference = random_packed_experts(widths, 256, 128, generator)
    weights, index = torch.rand(tokens, len(widths), generator=generator).topk(3, dim=-1)
    index[0, 2] = len(widths)  # an empty slot
    hidden = torch.randn(tokens, 256, generator=generator).bfloat16()
    weights = (weights / weights.sum(-1, keepdim=True)).bfloat16()
    kept = index < len(widths)
    expected = torch.zeros(tokens, 256, dtype=torch.float64)
    for t in range(tokens):
        expected[t] = routed_reference(reference, hidden[t : t + 1], index[t : t + 1][:, kept[t]], weights[t : t + 1][:, kept[t]])[0]
    with torch.no_grad():
        got = packed(hidden, index, weights)
    assert blocks == [1] and got.dtype == torch.bfloat16 and got.shape == (tokens, 256)
    assert float((got.double() - expected).norm() / expected.norm()) < 5e-3


@needs_bf16
def test_fused_decode_block_declines_what_it_does_not_compute(monkeypatch):
    """int8 activations requested, another gate than silu(gate) * up, or more rows per expert than the matvec's limit:
    the pair path runs."""
    monkeypatch.setattr(native, "moe_bf16", lambda *a: pytest.fail("the fused block ran"))
    generator = torch.Generator().manual_seed(3)
    packed, reference = random_packed_experts([2, 3, 4, 3], 256, 128, generator)
    hidden = torch.randn(40, 256, generator=generator).bfloat16()
    weights, index = torch.rand(40, 4, generator=generator).topk(2, dim=-1)  # 20 rows per expert
    with torch.no_grad():
        packed(hidden, index, weights.bfloat16())
        monkeypatch.setenv("MODE_HF_INT8_ACTIVATIONS", "1")
        packed(hidden[:1], index[:1], weights[:1].bfloat16())
        monkeypatch.setenv("MODE_HF_INT8_ACTIVATIONS", "0")
        packed._is_silu_gate = None
        packed.activation = GatedActivation(torch.nn.GELU())  # not the gate the kernel computes (probed once)
        packed(hidden[:1], index[:1], weights[:1].bfloat16())
    assert packed._is_silu_gate is False
