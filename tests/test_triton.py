"""The Triton kernels of `mode_hf.gpu.triton_experts`, on CPU through Triton's interpreter (TRITON_INTERPRET=1, set
here before triton is imported), and the dispatch of `PackedExperts` to them and to the torch path.

References are float64 math on the quantizer's codes (mode_hf's rtn on random weights), never on the packed bytes;
the packed buffers come from mode_hf's own `pack`. Shapes are tiny (the interpreter runs every program in Python).

Tolerances (|out - ref| <= rtol * scale, elementwise, scale = |W| @ |x| + |ref| for one projection, |W_down| @ |h|
+ |ref| for the whole layer): the kernel's weights are exact integers times float32 scales, so the only roundings
are the float32 accumulation (K <= 96 terms here: < 96 * 2**-24 * scale, about 6e-6, usually far less), the
activation in float32, and one cast to the input dtype of the hidden activations h and of the output (unit
roundoff u = 2**-11 for fp16, 11 significant bits; 2**-8 for bf16, 8 significant bits). rtol = 4u for the 16-bit
types (two roundings, with margin) and 2e-5 for float32 (the accumulation bound, with margin). A single wrong code
moves an output by scale_g * |x_k|, about 1 / (K * mean|code - zero|) of `scale`: 1e-2 at 2 bits down to 2e-4 at
8 bits for K = 96, 10x above the float32 tolerance, so the float32 tests see any unpacking error.

Device: CPU under TRITON_INTERPRET=1 (the default set here); with TRITON_INTERPRET=0 on a CUDA machine the same
tests run compiled on the GPU (references stay float64 on the CPU): `benchmarks/gpu_check.py` does that.
Skipped, saying so, where triton is not installed (`pip install mode-hf[gpu]`; the test extra installs it).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors, numpy

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernel tests need triton: pip install mode-hf[gpu]")

from mode_hf.algo import packing, quantize  # noqa: E402
from mode_hf.gpu import triton_experts as te  # noqa: E402

DEVICE = torch.device("cpu") if te.interpreting() else torch.device("cuda")
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # unit roundoff
RTOL = {torch.float32: 2e-5, torch.float16: 4 * U[torch.float16], torch.bfloat16: 4 * U[torch.bfloat16]}


# ------------------------------------------------------------------------------------------------------- fixtures
def make_layer(widths, hidden, intermediate, group, seed=0, bias=False):
    """A layer of len(widths) experts quantized with rtn: packed storage (mode_hf layout) + float64 references."""
    gen = torch.Generator().manual_seed(seed)
    E = len(widths)
    weights = {
        "gate_up_proj": torch.randn(E, 2 * intermediate, hidden, generator=gen) * 0.2,
        "down_proj": torch.randn(E, hidden, intermediate, generator=gen) * 0.2,
    }
    slot = [widths[:e].count(b) for e, b in enumerate(widths)]
    storage, reference, group_sizes = {}, {}, {}
    for proj, w in weights.items():
        g = quantize.resolve_group_size(w.shape[-1], group)
        group_sizes[proj] = g
        qs = [quantize.rtn(w[e], bits, group) for e, bits in enumerate(widths)]
        reference[proj] = torch.stack([_float64(q) for q in qs])  # [E, O, K] from the codes
        storage[proj] = {}
        for b in sorted(set(widths)):
            of_width = [q for q, wb in zip(qs, widths) if wb == b]  # slot order
            storage[proj][b] = (
                torch.stack([packing.pack(q.codes, b) for q in of_width]).to(DEVICE),
                torch.stack([q.scales for q in of_width]).to(DEVICE),
                torch.stack([q.zeros for q in of_width]).to(DEVICE),
            )
    biases = None
    if bias:
        biases = {p: (torch.randn(E, weights[p].shape[1], generator=gen) * 0.1).to(DEVICE) for p in weights}
    return dict(storage=storage, slot=slot, expert_bits=list(widths), group_sizes=group_sizes,
                reference=reference, biases=biases)


def _float64(q) -> torch.Tensor:
    g = q.group_size
    codes = q.codes.double().reshape(*q.codes.shape[:-1], -1, g)
    return ((codes - q.zeros.double()[..., None]) * q.scales.double()[..., None]).reshape(q.codes.shape)


def rows_for(counts, hidden, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(counts), hidden, generator=gen).to(dtype).to(DEVICE)


def expert_of_rows(counts):
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def reference_projection(layer, proj, x, counts, bias=None):
    """float64 [P, O] and the error scale |x| @ |W|^T."""
    W = layer["reference"][proj][expert_of_rows(counts)]  # [P, O, K]
    xd = x.cpu().double()
    ref = torch.einsum("pok,pk->po", W, xd)
    scale = torch.einsum("pok,pk->po", W.abs(), xd.abs())
    if bias is not None:
        ref = ref + bias.cpu()[expert_of_rows(counts)].double()
    return ref, scale


def act_torch(name):
    if name == "silu":
        return torch.nn.functional.silu
    return lambda t: torch.nn.functional.gelu(t, approximate="tanh")


def reference_layer(layer, x, counts, activation="silu"):
    """float64 [P, H] and the error scale |W_down| @ |h| + |ref|."""
    biases = layer["biases"] or {}
    gate_up, _ = reference_projection(layer, "gate_up_proj", x, counts, biases.get("gate_up_proj"))
    gate, up = gate_up.chunk(2, dim=-1)
    h = act_torch(activation)(gate) * up
    W = layer["reference"]["down_proj"][expert_of_rows(counts)]
    ref = torch.einsum("pok,pk->po", W, h)
    if biases.get("down_proj") is not None:
        ref = ref + biases["down_proj"].cpu()[expert_of_rows(counts)].double()
    scale = torch.einsum("pok,pk->po", W.abs(), h.abs()) + ref.abs()
    return ref, scale


def assert_within(out, ref, scale, rtol, what=""):
    out = out.cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = (out.double() - ref).abs()
    bound = rtol * scale + 1e-30
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert torch.isfinite(out.double()).all(), f"{what}: non-finite output"
    if os.environ.get("SHOW_MARGINS"):
        print(f"\n{what}: max err / bound = {worst:.3g}")
    assert (err <= bound).all(), f"{what}: max err / bound = {worst:.3g} (rtol {rtol:.3g})"


def run_layer(layer, x, counts, **kw):
    keys = ("storage", "slot", "expert_bits", "group_sizes", "biases")
    return te.triton_expert_outputs(x, counts, **{k: layer[k] for k in keys}, **kw)


# ----------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [96, 20, 40])  # 20: a row not a multiple of 8 codes; 40: 5 runs (3-bit straddles)
def test_unpack_matches_quantizer_codes(bits, k):
    """The kernel's unpackers return exactly the quantizer's codes: byte gathers always, int32-word gathers and
    expanded whole words wherever the row is a whole number of int32 words (expand with BLOCK_K 32 and 64: chunks
    ending inside, and past, the row)."""
    gen = torch.Generator().manual_seed(bits * 100 + k)
    q = quantize.rtn(torch.randn(24, k, generator=gen), bits, 32)
    packed = packing.pack(q.codes, bits).to(DEVICE)
    whole_words = packed.shape[-1] % 4 == 0
    modes = [("bytes", 64)] + ([("words", 64), ("expand", 32), ("expand", 64)] if whole_words else [])
    for unpack, block_k in modes:
        codes = te.unpack_codes(packed, bits, k, unpack=unpack, block_k=block_k)
        assert torch.equal(codes.cpu(), q.codes.to(torch.int32)), f"{unpack} BLOCK_K={block_k}"
    if not whole_words:
        for unpack in ("words", "expand"):
            with pytest.raises(ValueError):
                te.unpack_codes(packed, bits, k, unpack=unpack)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_no_access_outside_routed_rows_and_outputs(mode):
    """Inputs and outputs are views into larger buffers with guard rows below and guard columns right (NaN in the
    output): the kernel must leave every guard untouched (the interpreter does no bounds checking, so an escaped
    mask would otherwise show only as corrupted memory or a crash). gate_up fused (O=2I=40: padded N tiles) and
    down, mixed widths, an empty expert."""
    layer = make_layer([4, 2, 3, 8], hidden=64, intermediate=20, group=32, seed=19)
    counts = [3, 0, 2, 1] if mode == "decode" else [17, 0, 20, 3]
    blocks = None if mode == "decode" else dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, USE_DOT=True)
    P, guard = sum(counts), 16
    x_buf = rows_for([P + guard], 64, torch.float32)
    x = x_buf[:P]
    ref, _ = reference_layer(layer, x, counts)
    hidden = None
    for proj, n_out, act in (("gate_up_proj", 20, "silu"), ("down_proj", 64, "none")):
        out_buf = torch.full((P + guard, n_out + guard), float("nan"), device=DEVICE)
        out = out_buf[:P, :n_out]
        te.projection(x if hidden is None else hidden, counts, layer["storage"][proj], layer["slot"],
                      layer["expert_bits"], layer["group_sizes"][proj], activation=act, blocks=blocks, out=out)
        assert out_buf[P:].isnan().all() and out_buf[:, n_out:].isnan().all(), f"{proj}: a guard was written"
        assert not out.isnan().any(), f"{proj}: a routed output was not written"
        hidden = out
    assert_within(hidden, ref, reference_layer(layer, x, counts)[1], RTOL[torch.float32], "guarded")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_projection_each_width_float32(bits, mode):
    """One projection (no activation) per width: K=96 with g=32 (3 groups), O=40 (padded N tile), an empty expert,
    decode (matvec variant) and prefill (tl.dot variant, experts spanning several BLOCK_M tiles)."""
    layer = make_layer([bits, bits, bits], hidden=96, intermediate=20, group=32, seed=bits)
    counts = [2, 0, 3] if mode == "decode" else [20, 0, 17]
    x = rows_for(counts, 96, torch.float32)
    blocks = None if mode == "decode" else dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, USE_DOT=True)
    out = te.projection(x, counts, layer["storage"]["gate_up_proj"], layer["slot"], layer["expert_bits"],
                        layer["group_sizes"]["gate_up_proj"], blocks=blocks)
    ref, scale = reference_projection(layer, "gate_up_proj", x, counts)
    assert_within(out, ref, scale + ref.abs(), RTOL[torch.float32], f"{bits}-bit {mode}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_layer_mixed_widths(dtype, mode):
    """Whole layer (gate_up with fused SwiGLU, then down) with 2/3/4/8-bit experts in one call, empty experts,
    H=96 (g=32: 3 groups), I=40 (g resolves to 20: groups not a multiple of BLOCK_K), in every dtype."""
    widths = [3, 8, 2, 4, 3, 2, 4]
    layer = make_layer(widths, hidden=96, intermediate=40, group=32, seed=7)
    assert layer["group_sizes"] == {"gate_up_proj": 32, "down_proj": 20}
    counts = [1, 2, 0, 4, 1, 0, 3] if mode == "decode" else [18, 5, 0, 33, 1, 0, 9]
    x = rows_for(counts, 96, dtype)
    out = run_layer(layer, x, counts)
    assert out.dtype == dtype
    ref, scale = reference_layer(layer, x, counts)
    assert_within(out, ref, scale, RTOL[dtype], f"{dtype} {mode}")


def test_single_token_top1():
    """One row routed to one expert of a layer (decode at batch 1, BLOCK_M = 1)."""
    layer = make_layer([4, 3, 2], hidden=64, intermediate=24, group=32, seed=3)
    counts = [0, 1, 0]
    x = rows_for(counts, 64, torch.bfloat16)
    ref, scale = reference_layer(layer, x, counts)
    assert_within(run_layer(layer, x, counts), ref, scale, RTOL[torch.bfloat16], "single token")


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_unpack_modes_agree(mode):
    """Byte gathers, int32-word gathers and expanded int32 words give the same outputs, bit for bit (rows of
    16/24/32/64 bytes: whole words at every width; g=32: K-chunks start on word units, 3-bit included)."""
    layer = make_layer([2, 3, 4, 8], hidden=64, intermediate=32, group=32, seed=5)
    counts = [3, 2, 1, 2] if mode == "decode" else [17, 2, 20, 5]
    x = rows_for(counts, 64, torch.float16)
    outs = {u: run_layer(layer, x, counts, unpack=u) for u in ("bytes", "words", "expand")}
    assert torch.equal(outs["bytes"], outs["words"]) and torch.equal(outs["bytes"], outs["expand"])
    assert torch.equal(outs["expand"], run_layer(layer, x, counts))  # the automatic choice here is expand
    ref, scale = reference_layer(layer, x, counts)
    assert_within(outs["expand"], ref, scale, RTOL[torch.float16], f"unpack modes {mode}")


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_down_proj(split_k):
    """Decode down_proj with split-K (atomic float32 adds over groups; 3 groups split 2+1 or 1+1+1), biases."""
    layer = make_layer([3, 4, 2], hidden=48, intermediate=96, group=32, seed=11, bias=True)
    assert layer["group_sizes"]["down_proj"] == 32  # K=96: 3 groups
    counts = [2, 1, 1]
    x = rows_for(counts, 48, torch.float32)
    out = run_layer(layer, x, counts, split_k=split_k)
    ref, scale = reference_layer(layer, x, counts)
    assert_within(out, ref, scale, RTOL[torch.float32], f"split {split_k}")


@pytest.mark.parametrize("block_k", [16, 32])
def test_group_not_multiple_of_block_k_prefill(block_k):
    """down_proj K=40 with g=20 under tl.dot: BLOCK_K=16 (2 chunks a group, the second 4 wide) and 32 (one masked
    chunk), BLOCK_N=16 over O=48 (3 tiles), a 20-row expert over two BLOCK_M=16 tiles."""
    layer = make_layer([4, 8], hidden=48, intermediate=40, group=32, seed=13)
    counts = [20, 6]
    x = rows_for(counts, 40, torch.float32)
    blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, USE_DOT=True)
    out = te.projection(x, counts, layer["storage"]["down_proj"], layer["slot"], layer["expert_bits"], 20,
                        blocks=blocks)
    ref, scale = reference_projection(layer, "down_proj", x, counts)
    assert_within(out, ref, scale + ref.abs(), RTOL[torch.float32], f"BLOCK_K={block_k}")


def test_gelu_bias_and_callable_activation():
    """Fused GELU-tanh gate with biases, and an unfused callable activation (GPT-OSS style hook), fp16."""
    layer = make_layer([8, 2, 3], hidden=32, intermediate=16, group=32, seed=17, bias=True)
    counts = [2, 3, 1]
    x = rows_for(counts, 32, torch.float16)
    ref, scale = reference_layer(layer, x, counts, activation="gelu_tanh")
    assert_within(run_layer(layer, x, counts, activation="gelu_tanh"), ref, scale, RTOL[torch.float16], "gelu")

    def gate(t):  # a callable sees gate_up [P, 2I] in the input dtype: one more fp16 rounding before act
        g, u = t.float().chunk(2, dim=-1)
        return torch.nn.functional.gelu(g, approximate="tanh") * u

    out = run_layer(layer, x, counts, activation=gate)
    assert_within(out, ref, scale, 2 * RTOL[torch.float16], "callable")


def test_empty_inputs_and_bad_counts():
    layer = make_layer([2, 4], hidden=32, intermediate=16, group=32)
    x = torch.empty(0, 32, dtype=torch.bfloat16, device=DEVICE)
    assert run_layer(layer, x, [0, 0]).shape == (0, 32)
    with pytest.raises(ValueError):
        run_layer(layer, torch.zeros(3, 32, device=DEVICE), [1, 1])
