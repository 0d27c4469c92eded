"""The packed experts' forward: grouped by width, only routed experts dequantized (each once per call), chunked
grouped matmuls or the native packed matvec, against a float64 reference computed from the quantizer's codes (not
from the packed bytes)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

from mode_hf.model import packed as packed_module
from mode_hf.algo import grouped, quantize
from mode_hf.model import native
from mode_hf.model.layouts import FUSED
from mode_hf.model.packed import PackedExperts

WIDTHS = [2, 3, 4, 8, 3, 2]
HIDDEN, INTERMEDIATE, GROUP = 32, 16, 16


@pytest.fixture(scope="module")
def experts():
    config = Qwen3VLMoeTextConfig(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, num_experts=len(WIDTHS), num_experts_per_tok=2)
    config._experts_implementation = "eager"
    module = Qwen3VLMoeTextExperts(config)
    torch.manual_seed(0)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.2)
        module.down_proj.normal_(0, 0.2)
    packed = PackedExperts(module, FUSED, WIDTHS, GROUP)
    reference = {}
    for proj in ("gate_up_proj", "down_proj"):
        weights = getattr(module, proj).detach()
        quantized = [quantize.rtn(weights[e], bits, GROUP) for e, bits in enumerate(WIDTHS)]
        for expert, q in enumerate(quantized):
            packed.set_expert(proj, expert, q)
        reference[proj] = torch.stack([_float64(q) for q in quantized])
    return module, packed, reference


def _float64(q: quantize.QuantizedWeight) -> torch.Tensor:
    codes = q.codes.double().reshape(q.codes.shape[0], -1, GROUP)
    return ((codes - q.zeros.double()[..., None]) * q.scales.half().double()[..., None]).reshape(q.codes.shape)


def reference_forward(reference, act_fn, hidden, index, weights) -> torch.Tensor:
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            gate, up = (reference["gate_up_proj"][e] @ hidden[t].double()).chunk(2)
            out[t] += float(weights[t, slot]) * (reference["down_proj"][e] @ (act_fn(gate) * up))
    return out


def routing(tokens: int, seed: int, experts_hit: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=generator)
    scores = torch.rand(tokens, experts_hit or len(WIDTHS), generator=generator)
    weights, index = scores.topk(2, dim=-1)
    return hidden, index, weights / weights.sum(-1, keepdim=True)


def use_path(monkeypatch, path: str) -> None:
    """Force one forward path: "native" (packed matvec for every call), "native dequantize" (native dequantization
    into reused workspaces, one expert per chunk, then matmuls) or a torch path (native kernels off)."""
    if path == "triton":  # mode_hf.gpu's kernels, on CPU tensors through Triton's interpreter (tests/conftest.py)
        pytest.importorskip("triton", reason="the Triton path needs triton: pip install mode-hf[gpu]")
        monkeypatch.setenv("MODE_HF_EXPERTS_KERNEL", "triton")
        return
    if path.startswith("native"):
        if native.library() is None:
            pytest.skip("no C compiler: the native kernels cannot be built here")
        monkeypatch.setattr(packed_module, "GEMV_ROWS_PER_EXPERT", 0 if path == "native dequantize" else 10**9)
        monkeypatch.setattr(packed_module, "WORKSPACE_BYTES", 1)
    else:
        monkeypatch.setenv("MODE_HF_NATIVE", "0")


@pytest.mark.parametrize("tokens, experts_hit", [(1, None), (40, None), (25, 3)])
@pytest.mark.parametrize("path", ["grouped_mm", "loop", "one expert per chunk", "native", "native dequantize", "triton"])
def test_forward_matches_float64_reference(experts, monkeypatch, tokens, experts_hit, path):
    module, packed, reference = experts
    use_path(monkeypatch, path)
    if path == "loop":
        monkeypatch.setattr(grouped, "supports_grouped_mm", lambda x, w: False)
    if path == "one expert per chunk":
        monkeypatch.setattr(packed_module, "DEQUANTIZED_BYTES", 1)
    hidden, index, weights = routing(tokens, seed=tokens, experts_hit=experts_hit)
    assert grouped.supports_grouped_mm(hidden, reference["down_proj"].float()) == (path != "loop")
    if path == "triton":  # the kernels run, not a fallback
        monkeypatch.setattr(PackedExperts, "routed_weights", lambda *a, **k: pytest.fail("torch path used"))
    expected = reference_forward(reference, module.act_fn, hidden, index, weights)
    with torch.no_grad():
        got = packed(hidden, index, weights)
    assert got.dtype == hidden.dtype
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("path", ["torch", "native", "native dequantize"])
def test_only_routed_experts_are_dequantized_once(experts, monkeypatch, path):
    _, packed, _ = experts
    use_path(monkeypatch, path)
    requested = []
    original, original_gemv = PackedExperts.routed_weights, native.gemv_prepared

    def spy(self, proj, chosen, dtype=torch.float32, exact=True):
        requested.append((proj, list(chosen)))
        return original(self, proj, chosen, dtype, exact)

    def spy_gemv(lib, storage, bits, group, slots, *args):  # slots of one width -> experts
        proj = "gate_up_proj" if storage[1].shape[2] == HIDDEN // GROUP else "down_proj"  # K = H or I
        by_slot = {packed.slot[e]: e for e, b in enumerate(WIDTHS) if b == bits}
        requested.append((proj, [by_slot[int(s)] for s in slots]))
        return original_gemv(lib, storage, bits, group, slots, *args)

    original_dequantize = native.dequantize_slots

    def spy_dequantize(qweight, scales, zeros, bits, group, in_dim, slots, *args, **kwargs):
        proj = "gate_up_proj" if in_dim == HIDDEN else "down_proj"
        by_slot = {packed.slot[e]: e for e, b in enumerate(WIDTHS) if b == bits}
        requested.append((proj, [by_slot[int(s)] for s in slots]))
        return original_dequantize(qweight, scales, zeros, bits, group, in_dim, slots, *args, **kwargs)

    monkeypatch.setattr(PackedExperts, "routed_weights", spy)
    monkeypatch.setattr(native, "gemv_prepared", spy_gemv)
    monkeypatch.setattr(native, "dequantize_slots", spy_dequantize)
    hidden, index, weights = routing(9, seed=3, experts_hit=3)  # experts 0..2 only
    with torch.no_grad():
        packed(hidden, index, weights)
    hit = sorted(set(index.flatten().tolist()))
    for proj in ("gate_up_proj", "down_proj"):
        asked = [e for p, chosen in requested if p == proj for e in chosen]
        assert sorted(asked) == hit  # every routed expert, once; nothing else


@pytest.mark.parametrize("path", ["torch", "native", "native dequantize", "triton"])
def test_bfloat16_forward_close_to_reference(experts, monkeypatch, path):
    module, packed, reference = experts
    use_path(monkeypatch, path)
    hidden, index, weights = routing(16, seed=7)
    expected = reference_forward(reference, module.act_fn, hidden.bfloat16().double(), index, weights)
    with torch.no_grad():
        got = packed(hidden.bfloat16(), index, weights.bfloat16())
    assert got.dtype == torch.bfloat16
    assert float((got.double() - expected).abs().max()) <= 0.03 * float(expected.abs().max())


def test_fast_dequantize_is_exact_in_float16_and_within_one_bfloat16_ulp():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 8, 64), dtype=torch.uint8, generator=generator)
    zeros = torch.randint(0, 16, (3, 8, 4), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(3, 8, 4, generator=generator) * 0.1).half()
    exact = ((codes.double().reshape(3, 8, 4, 16) - zeros.double()[..., None]) * scales.double()[..., None]).reshape(3, 8, 64)
    half = quantize.dequantize(codes, scales, zeros, 16, torch.float16, exact=False)
    assert torch.equal(half, exact.half())
    brain = quantize.dequantize(codes, scales, zeros, 16, torch.bfloat16, exact=False).double()
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs()  # one unit in the last place at that magnitude (upper bound)
    assert bool(((brain - exact).abs() <= ulp + 1e-12).all())
    assert not torch.equal(brain, exact.bfloat16().double())  # the fast path really computes in bfloat16


def test_the_triton_kernel_choice_is_explicit(experts, monkeypatch):
    """MODE_HF_EXPERTS_KERNEL=triton on CPU tensors without the interpreter, or a misspelled choice, is an error
    that says what to do; "torch" keeps CUDA-less machines (and CUDA ones) on the torch path."""
    from mode_hf import gpu

    _, packed, _ = experts
    hidden, index, weights = routing(3, seed=1)
    monkeypatch.setenv("MODE_HF_EXPERTS_KERNEL", "trition")
    with pytest.raises(ValueError, match="use one of auto, triton, torch"):
        packed(hidden, index, weights)
    monkeypatch.setenv("MODE_HF_EXPERTS_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if gpu.triton_installed():
        with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
            packed(hidden, index, weights)
    monkeypatch.setenv("MODE_HF_EXPERTS_KERNEL", "torch")
    assert not gpu.use_triton(hidden.cuda() if torch.cuda.is_available() else hidden)
    monkeypatch.setenv("MODE_HF_EXPERTS_KERNEL", "auto")
    assert not gpu.use_triton(hidden)  # CPU: the native kernels or the torch path, never the interpreter by itself
