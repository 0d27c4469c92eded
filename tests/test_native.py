"""The native CPU kernels (mode_hf/model/csrc/packed_cpu.c) against float64 math on codes packed by mode_hf.algo.packing, their
input checks, and the fallback to the torch path when they cannot be built."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

from mode_hf.algo import packing, quantize
from mode_hf.model import native
from mode_hf.model import packed as packed_module
from mode_hf.model.layouts import FUSED
from mode_hf.model.packed import PackedExperts, PackedLinear

needs_native = pytest.mark.skipif(
    shutil.which("cc") is None or not native.enabled(), reason="no C compiler, or MODE_HF_NATIVE=0: no native kernels"
)


def packed_experts(bits: int, experts: int, out_dim: int, in_dim: int, group: int, seed: int):
    """Random codes, scales and zeros of `experts` experts, packed; and their float64 weights [E, O, K]."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (experts, out_dim, in_dim), generator=generator).to(torch.uint8)
    scales = (torch.rand(experts, out_dim, in_dim // group, generator=generator) * 0.05 + 1e-3).half()
    zeros = torch.randint(0, 2**bits, scales.shape, generator=generator).to(torch.uint8)
    grouped = codes.double().view(experts, out_dim, -1, group)
    weights = ((grouped - zeros.double()[..., None]) * scales.double()[..., None]).view(experts, out_dim, in_dim)
    return packing.pack(codes, bits), scales, zeros, weights


def random_packed_experts(widths: list[int], hidden: int, intermediate: int, generator: torch.Generator):
    """PackedExperts (Qwen3-VL-MoE layout, group 128) of random RTN-quantized experts, and their float64 weights
    {"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]} computed from the quantizer's codes."""
    config = Qwen3VLMoeTextConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=len(widths), num_experts_per_tok=2)
    module = Qwen3VLMoeTextExperts(config)
    packed = PackedExperts(module, FUSED, widths, 128)
    reference = {}
    for proj in ("gate_up_proj", "down_proj"):
        weights = torch.randn(getattr(module, proj).shape, generator=generator) * 0.1  # the module's own are uninitialized
        quantized = [quantize.rtn(weights[e], bits, 128) for e, bits in enumerate(widths)]
        for expert, q in enumerate(quantized):
            packed.set_expert(proj, expert, q)
        reference[proj] = torch.stack([q.dequantize(torch.float64) for q in quantized])
    return packed, reference


def routed_reference(reference: dict, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """float64 output of SiLU-gated experts `reference` (as from `random_packed_experts`) for tokens `hidden` [T, H]
    routed to `index` [T, k] with `weights` [T, k]: the sum over slots of weight x down(silu(gate) * up)."""
    expected = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            gate, up = (reference["gate_up_proj"][e] @ hidden[t].double()).chunk(2)
            expected[t] += float(weights[t, slot]) * (reference["down_proj"][e] @ (torch.nn.functional.silu(gate) * up))
    return expected


@needs_native
def test_library_builds_where_a_compiler_exists():
    assert native.library() is not None


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
# (256, 128): every width in blocked order; (256, 64) and (96, 32): some widths blocked, the others in natural order
# (a group smaller than a block); (44, 44): natural order, rows padded to whole runs of 8 codes
@pytest.mark.parametrize("in_dim, group", [(256, 128), (256, 64), (44, 44), (96, 32)])
def test_grouped_gemv_matches_float64(bits, in_dim, group):
    qweight, scales, zeros, weights = packed_experts(bits, 4, 24, in_dim, group, seed=bits)
    x = torch.randn(10, in_dim, generator=torch.Generator().manual_seed(1))
    slots, starts, counts = [3, 0, 3], [0, 2, 3], [2, 1, 6]  # 6 rows: 4 + 2 per unpacked block; row 9 routed nowhere
    out = torch.full((10, 24), 123.0)
    native.grouped_gemv(qweight, scales, zeros, bits, group, slots, starts, counts, x, out=out)
    expected = torch.cat([x[0:2].double() @ weights[3].T, x[2:3].double() @ weights[0].T, x[3:9].double() @ weights[3].T])
    assert torch.allclose(out[:9].double(), expected, rtol=0, atol=2e-6 * float(expected.abs().max()))
    assert torch.equal(out[9], torch.full((24,), 123.0))


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_dim, group", [(40, 8), (256, 128), (384, 192)])  # natural order; blocked order; 64-code steps
def test_dequantize_slots_is_exact_then_rounded_once(bits, in_dim, group):
    qweight, scales, zeros, weights = packed_experts(bits, 3, 16, in_dim, group, seed=10 + bits)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = native.dequantize_slots(qweight, scales, zeros, bits, group, in_dim, [2, 0], dtype)
        assert got.dtype == dtype
        assert torch.equal(got, weights[[2, 0]].to(dtype))  # float64 value, one rounding (exact in float32)
    assert torch.equal(
        native.dequantize_slots(qweight, scales, zeros, bits, group, in_dim, [1]),
        quantize.dequantize(packing.unpack(qweight[1:2], bits, in_dim), scales[1:2], zeros[1:2], group),
    )
    if native.fits_blocks(bits, group):  # blocked order along K: the columns permuted as `blocked` permutes x
        permuted = native.dequantize_slots(qweight, scales, zeros, bits, group, in_dim, [2], permuted=True)
        assert torch.equal(permuted[0], native.blocked(weights[2], bits).float())
        x = torch.randn(3, in_dim, dtype=torch.float64)
        assert torch.allclose(native.blocked(x, bits) @ permuted[0].double().T, x @ weights[2].T)
    else:
        with pytest.raises(ValueError, match="permuted order needs"):
            native.dequantize_slots(qweight, scales, zeros, bits, group, in_dim, [2], permuted=True)
    out = torch.full((4, 16, in_dim), 7.0, dtype=torch.bfloat16)  # written in place, at the targets only
    assert native.dequantize_slots(qweight, scales, zeros, bits, group, in_dim, [0, 2], out=out, targets=[3, 1]) is out
    assert torch.equal(out[3], weights[0].bfloat16()) and torch.equal(out[1], weights[2].bfloat16())
    assert bool((out[[0, 2]] == 7.0).all())


def test_workspace_is_reused_and_grown():
    first = native.workspace("test", (4, 8), torch.bfloat16)
    again = native.workspace("test", (2, 8), torch.float32)  # same bytes: the same memory
    assert again.data_ptr() == first.data_ptr() and again.shape == (2, 8) and again.dtype == torch.float32
    grown = native.workspace("test", (64, 64), torch.float32)
    assert grown.shape == (64, 64) and grown.is_contiguous()
    native.release_workspaces()


@needs_native
def test_inputs_that_do_not_fit_are_refused():
    qweight, scales, zeros, _ = packed_experts(4, 2, 8, 32, 16, seed=0)
    x = torch.randn(3, 32)
    with pytest.raises(ValueError, match="slots must lie in"):
        native.grouped_gemv(qweight, scales, zeros, 4, 16, [2], [0], [3], x)
    with pytest.raises(ValueError, match="row range"):
        native.grouped_gemv(qweight, scales, zeros, 4, 16, [0], [1], [3], x)
    with pytest.raises(ValueError, match="do not match"):
        native.grouped_gemv(qweight, scales, zeros, 3, 16, [0], [0], [3], x)  # 4-bit rows read as 3-bit
    with pytest.raises(ValueError, match="contiguous CPU"):
        native.dequantize_slots(qweight, scales.float(), zeros, 4, 16, 32, [0])
    with pytest.raises(ValueError, match="does not divide"):
        native.dequantize_slots(qweight, scales, zeros, 4, 24, 32, [0])
    with pytest.raises(ValueError, match="targets"):
        native.dequantize_slots(qweight, scales, zeros, 4, 16, 32, [0, 1], out=torch.zeros(1, 8, 32), targets=[0, 1])


def test_without_a_compiler_the_torch_path_serves_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("MODE_HF_NATIVE", "1")
    monkeypatch.setenv("CC", "no-such-compiler-mode-hf")
    monkeypatch.setenv("MODE_HF_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mode_hf.model.native"):
        assert native.library() is None
    assert "could not be built" in caplog.text and "no-such-compiler-mode-hf" in caplog.text
    assert not native.usable(torch.zeros(1))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("MODE_HF_NATIVE", "0")
    assert native.library() is None and native._tried is False  # disabled: not even tried


@needs_native
def test_build_is_cached_and_published_whole(monkeypatch, tmp_path):
    monkeypatch.setenv("MODE_HF_CACHE", str(tmp_path))
    built = native._build()
    assert built.parent == tmp_path / "native" and built.suffix == ".so"
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no staging directory left behind
    stamp = built.stat().st_mtime_ns
    assert native._build() == built and built.stat().st_mtime_ns == stamp  # second call: the cached file


@needs_native
@pytest.mark.parametrize("rows_per_expert_limit", [10**9, 0])  # every call through the matvec; through dequantization
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_packed_experts_forward_at_group_128_matches_float64(monkeypatch, rows_per_expert_limit, tokens):
    """Blocked order for every width (K = 256 and 128, group 128), 1 to 4+ rows per expert, against float64 math on
    the quantizer's own codes."""
    monkeypatch.setattr(packed_module, "GEMV_ROWS_PER_EXPERT", rows_per_expert_limit)
    widths = [2, 3, 4, 8, 3, 2, 4, 3]
    generator = torch.Generator().manual_seed(0)
    packed, reference = random_packed_experts(widths, 256, 128, generator)
    hidden = torch.randn(tokens, 256, generator=generator)
    weights, index = torch.rand(tokens, len(widths), generator=generator).topk(2, dim=-1)
    expected = routed_reference(reference, hidden, index, weights)
    with torch.no_grad():
        got = packed(hidden, index, weights)
    assert torch.allclose(got.double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@needs_native
@pytest.mark.parametrize("refused", ["-fopenmp", "-march=native"])
def test_a_compiler_refusing_a_flag_still_builds_working_kernels(monkeypatch, tmp_path, refused):
    wrapper = tmp_path / "cc-limited"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = {refused} ] && {{ echo "unknown {refused}" >&2; exit 1; }}; done\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("MODE_HF_CACHE", str(tmp_path / "cache"))
    lib = native._load(native._build())
    monkeypatch.setattr(native, "library", lambda: lib)
    qweight, scales, zeros, weights = packed_experts(3, 2, 8, 256, 128, seed=5)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    got = native.grouped_gemv(qweight, scales, zeros, 3, 128, [1], [0], [5], x)
    assert torch.allclose(got.double(), x.double() @ weights[1].T, rtol=0, atol=1e-5)
    for permuted in (False, True):  # without -march=native: the portable 3-bit unpack (no byte permutation)
        dequantized = native.dequantize_slots(qweight, scales, zeros, 3, 128, 256, [1], permuted=permuted)[0]
        assert torch.equal(dequantized, (native.blocked(weights[1], 3) if permuted else weights[1]).float())


@needs_native
@pytest.mark.parametrize("group", [128, 16])  # blocked order for every width; natural order for most
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_native_paths_match_float64(monkeypatch, group, bits, dtype):
    """PackedLinear (`dense_bits`): packed matvec for a few rows, workspace dequantization for many, and the
    dequantized weight, against float64 math on the quantizer's codes; the torch path agrees."""
    linear = torch.nn.Linear(256, 48)
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits)) * 0.1
    bias = torch.randn(48, generator=torch.Generator().manual_seed(1))
    q = quantize.rtn(weight, bits, group)
    packed = PackedLinear(linear, bits, group)
    packed.set_weight(q, bias)
    reference = q.dequantize(torch.float64)
    assert torch.equal(packed.dequantized_weight(), reference.float())
    for shape in ((1, 256), (2, 2, 256), (3, 7, 256)):  # 1, 4 and 21 rows
        x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)
        expected = x.double() @ reference.T + bias.double()
        with torch.no_grad():
            got = packed(x)
        assert got.shape == (*shape[:-1], 48) and got.dtype == dtype
        tolerance = (1e-5 if dtype == torch.float32 else 2e-2) * float(expected.abs().max())
        assert torch.allclose(got.double(), expected, rtol=0, atol=tolerance)
        with monkeypatch.context() as patch, torch.no_grad():
            patch.setenv("MODE_HF_NATIVE", "0")
            assert torch.allclose(packed(x).double(), got.double(), rtol=0, atol=tolerance)


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [3, 40])  # the packed matvec; the workspace path (native)
def test_torch_compile_runs_the_expert_computation_eagerly(monkeypatch, tokens, dtype, path):
    """Under torch.compile the expert computation and the native linear are never traced (data-dependent routing,
    raw pointers handed to C; tracing float32 `_grouped_mm` on CPU fails in torch's fake-tensor check): compiled
    outputs equal eager ones, on the native and on the torch path."""
    if path == "native" and (shutil.which("cc") is None or not native.enabled()):
        pytest.skip("no native kernels here")
    monkeypatch.setenv("MODE_HF_NATIVE", "1" if path == "native" else "0")
    torch._dynamo.reset()
    widths = [2, 3, 4, 8, 2, 3, 4, 3]
    generator = torch.Generator().manual_seed(tokens)
    packed, _ = random_packed_experts(widths, 128, 64, generator)
    linear = PackedLinear(torch.nn.Linear(128, 64), 3, 128)
    linear.set_weight(quantize.rtn(torch.randn(64, 128), 3, 128), torch.randn(64))
    hidden = torch.randn(tokens, 128, generator=generator).to(dtype)
    weights, index = torch.rand(tokens, len(widths), generator=generator).topk(2, dim=-1)
    with torch.no_grad():
        for module_, arguments in ((packed, (hidden, index, weights.to(dtype))), (linear, (hidden,))):
            eager = module_(*arguments)
            compiled = torch.compile(module_, backend="eager")(*arguments)
            assert bool(torch.isfinite(eager).all()) and torch.equal(compiled, eager)


@pytest.mark.parametrize("path", ["native", "torch"])
def test_nothing_routed_gives_empty_or_zero_outputs(monkeypatch, path):
    """No (token, expert) pair for this module (every slot marked empty, as under expert parallelism) or no token at
    all: zeros / empty outputs of the right shape on both paths; a packed linear takes zero rows."""
    monkeypatch.setenv("MODE_HF_NATIVE", "1" if path == "native" else "0")
    packed, _ = random_packed_experts([2, 3, 4, 8], 128, 64, torch.Generator().manual_seed(0))
    linear = PackedLinear(torch.nn.Linear(128, 64), 4, 128)
    with torch.no_grad():
        hidden = torch.randn(3, 128).bfloat16()
        assert torch.equal(packed(hidden, torch.full((3, 2), 4), torch.rand(3, 2).bfloat16()), torch.zeros(3, 128).bfloat16())
        assert packed(hidden[:0], torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2).bfloat16()).shape == (0, 128)
        assert linear(torch.randn(2, 0, 128)).shape == (2, 0, 64)
