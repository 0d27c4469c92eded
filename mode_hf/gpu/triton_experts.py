"""Triton kernels for the routed experts of one MoE layer whose experts each have their own bit width (2, 3, 4, 8),
reading mode-hf's packed format directly (no repack). Imported only on the GPU path (`mode_hf.gpu`), never on a
machine that has neither CUDA nor Triton's interpreter in use. Design, block sizes, the interpreter's limits and
the mutation check: docs/gpu.md.

Format (mode_hf/algo/packing.py, docs/checkpoint_format.md): for every width b present,

    {proj}_qweight_{b}bit uint8   [E_b, O, ceil(K / 8) * b]   row = little-endian bit stream, code k at bits b*k ..
    {proj}_scales_{b}bit  float16 [E_b, O, K / g]
    {proj}_zeros_{b}bit   uint8   [E_b, O, K / g]             W[o, k] = (code[o, k] - zero[o, k // g]) * scale[o, k // g]

Expert e (width expert_bits[e]) is slot slot[e] of its width's buffers. gate_up_proj: O = 2I (gate rows 0..I-1, up
rows I..2I-1), K = H; down_proj: O = H, K = I.

One kernel, `_packed_moe_kernel`, specialized at compile time by width (BITS), group size (GROUP), how it reads the
stream (UNPACK: "expand" = the bytes viewed as int32 words, a free view, each word loaded once and expanded in
registers; "bytes" = one uint8 gather per code, always valid), decode or prefill (USE_DOT), split-K and the fused
gated activation. It is launched once per width present among the routed experts of a projection.

Arithmetic: the codes minus the zero point are integers in [-255, 255], exact in fp16/bf16/fp32, so every K-chunk
is a dot of the input tile with exact integer weights (tensor cores for fp16/bf16), summed over one group in
float32, then multiplied by that group's float32 scale: the only roundings are the float32 accumulation and the
final cast to the input dtype (plus, for gate_up with a fused activation, the activation in float32).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Mapping, Sequence

import torch
import triton
import triton.language as tl

PROJECTIONS = ("gate_up_proj", "down_proj")
ACTIVATIONS = {"none": 0, "silu": 1, "gelu_tanh": 2}  # fused gated activations: act(gate) * up
DECODE_MAX_ROWS = 4  # at most this many rows per routed expert (of one width): the matvec-like variant
DECODE_TILE_ELEMS = 8192  # decode: BLOCK_M * BLOCK_K * BLOCK_N of the broadcast product (registers on a GPU)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors with numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _unpack_codes(row_ptrs, offs_k, mask, BITS: tl.constexpr, WORD: tl.constexpr):
    """Codes at columns `offs_k` [BK] of the packed rows `row_ptrs` [BN] (pointers to each row's first word), as an
    int32 tile [BK, BN]. The row is one little-endian bit stream: bit j of code k is stream bit BITS * k + j, and
    stream bit p is bit p % WORD of word p // WORD (WORD = 8: uint8 bytes; WORD = 32: the same bytes as int32, which
    is the same stream since the bytes are little-endian). A code straddles two words only when BITS does not
    divide WORD (3 bits): its high bits come from the next word. Masked-off lanes read 0."""
    bit = offs_k * BITS  # [BK] stream position of each code's bit 0
    word = bit // WORD
    shift = bit % WORD
    ptrs = row_ptrs[None, :] + word[:, None]  # [BK, BN]
    if WORD == 32:
        lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    else:
        lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32)
    val = lo >> shift[:, None]
    if WORD % BITS != 0:  # 3 bits: a run straddles a word boundary when fewer than BITS bits are left in the word
        straddle = shift > WORD - BITS  # [BK]
        hi_mask = mask & straddle[:, None]
        if WORD == 32:
            hi = tl.load(ptrs + 1, mask=hi_mask, other=0).to(tl.uint32, bitcast=True)
        else:
            hi = tl.load(ptrs + 1, mask=hi_mask, other=0).to(tl.uint32)
        up = ((WORD - shift) % WORD)[:, None]  # in [1, WORD - 1] where straddling; never a shift by WORD
        val = val | tl.where(hi_mask, hi << up, 0)
    return (val & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _unpack_expand(row_ptrs, k_start, valid, n_mask, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes k_start .. k_start + BLOCK_K - 1 of the rows `row_ptrs` [BN] (int32 word pointers) as int32 [BK, BN],
    every word loaded once (contiguous along K: vectorizable) and expanded in registers. Needs k_start and BLOCK_K
    multiples of the codes per word unit, CPW = 32 // BITS (2, 4, 8 bits) or 32 (3 bits: 3 words hold 32 codes);
    only the first `valid` codes are meaningful (whole words past them are not loaded: they read 0)."""
    if BITS == 3:
        NT: tl.constexpr = BLOCK_K // 32  # word triples
        t = tl.arange(0, NT)
        tmask = (t * 32 < valid)[:, None] & n_mask[None, :]  # [NT, BN]
        base = row_ptrs[None, :] + ((k_start // 32) + t)[:, None] * 3  # [NT, BN]: first word of each triple
        w0 = tl.load(base, mask=tmask, other=0).to(tl.uint32, bitcast=True)[:, None, :]  # [NT, 1, BN]
        w1 = tl.load(base + 1, mask=tmask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        w2 = tl.load(base + 2, mask=tmask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        bit = tl.arange(0, 32) * 3  # [32] position of code j's bit 0 in the 96-bit triple
        seg = (bit // 32)[None, :, None]  # which word holds bit 0
        sh = (bit % 32)[None, :, None]
        lo = tl.where(seg == 0, w0, tl.where(seg == 1, w1, w2))  # [NT, 32, BN]
        hi = tl.where(seg == 0, w1, w2)  # the next word (codes 10 and 21 straddle: sh = 30, 31)
        up = (32 - sh) % 32
        val = (lo >> sh) | tl.where(sh > 29, hi << up, 0)
        codes = tl.reshape(val & 7, (BLOCK_K, row_ptrs.shape[0]))
    else:
        CPW: tl.constexpr = 32 // BITS
        NW: tl.constexpr = BLOCK_K // CPW
        j = tl.arange(0, NW)
        wmask = (j * CPW < valid)[:, None] & n_mask[None, :]  # [NW, BN]
        words = tl.load(row_ptrs[None, :] + ((k_start // CPW) + j)[:, None], mask=wmask, other=0)
        words = words.to(tl.uint32, bitcast=True)[:, None, :]  # [NW, 1, BN]
        sh = (tl.arange(0, CPW) * BITS)[None, :, None]  # code i of a word sits at bits BITS * i
        codes = tl.reshape((words >> sh) & ((1 << BITS) - 1), (BLOCK_K, row_ptrs.shape[0]))
    return codes.to(tl.int32)


@triton.jit
def _unpack_kernel(q_ptr, out_ptr, O, K, row_words, BITS: tl.constexpr, UNPACK: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Debug/test kernel: codes [O, K] (int32) of one packed matrix [O, row_words] through the kernel's unpackers."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < O)
    if UNPACK == 2:
        codes = _unpack_expand(q_ptr + offs_n * row_words, k_start, K - k_start, offs_n < O, BITS, BLOCK_K)
    else:
        codes = _unpack_codes(q_ptr + offs_n * row_words, offs_k, mask, BITS, 32 if UNPACK == 1 else 8)
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], codes, mask=mask)


@triton.jit
def _gated(gate, up, ACT: tl.constexpr):
    """act(gate) * up in float32 (ACT 1: SiLU, 2: GELU tanh approximation)."""
    if ACT == 1:
        g = gate / (1.0 + tl.exp(-gate))
    else:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2 / pi) * (...)
        g = gate / (1.0 + tl.exp(-2.0 * inner))  # 0.5 * x * (1 + tanh(y)) == x * sigmoid(2y)
    return g * up


@triton.jit
def _group_dot(x_ptr, stride_xm, offs_m, m_mask, row_ptrs, n_mask, k_base,
               BITS: tl.constexpr, UNPACK: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
               PRECISION: tl.constexpr, zero):
    """sum over the GROUP inputs k_base .. k_base + GROUP - 1 of x[m, k] * (code[n, k] - zero[n]), float32 [BM, BN]."""
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in tl.static_range(0, GROUP, BLOCK_K):
        in_group = kk + tl.arange(0, BLOCK_K)
        k_mask = in_group < GROUP  # the last chunk of a group whose size is not a multiple of BLOCK_K
        offs_k = k_base + in_group
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        if UNPACK == 2:  # whole int32 words, expanded in registers
            codes = _unpack_expand(row_ptrs, k_base + kk, GROUP - kk, n_mask, BITS, BLOCK_K)  # [BK, BN]
        else:  # one gather per code from bytes (0) or int32 words (1)
            codes = _unpack_codes(row_ptrs, offs_k, k_mask[:, None] & n_mask[None, :], BITS,
                                  32 if UNPACK == 1 else 8)  # [BK, BN]
        w = codes - zero[None, :]  # exact integers in [-255, 255]; 0 on masked lanes (x is 0 there too)
        if USE_DOT:
            part += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=PRECISION)
        else:  # matvec-like: few rows, a broadcast product reduced over K
            part += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return part


@triton.jit
def _packed_moe_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    tile_slot_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    N_OUT, UP_OFFSET, O, G, row_words, stride_xm, stride_om,
    BITS: tl.constexpr, UNPACK: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * W_e[n, k] (+ bias[e, n]) for the rows m of one tile of one expert e.

    Grid: (tiles, cdiv(N_OUT, BLOCK_N), SPLIT_K). Tile t covers rows tile_start[t] .. tile_end[t] - 1 of x (at most
    BLOCK_M, all routed to expert tile_expert[t], which sits at slot tile_slot[t] of this width's buffers).
    ACT > 0: gated activation fused, out[m, n] = act(W[n] x) * (W[n + UP_OFFSET] x), N_OUT = UP_OFFSET = O / 2.
    SPLIT_K > 1: the groups are shared among SPLIT_K programs that atomically add float32 partials into out (zeroed;
    no activation). x: [P, K] (K contiguous); q: [E_b, O, row_words] (uint8 or int32 words); s, z: [E_b, O, G].
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(tile_slot_ptr + pid_t).to(tl.int64)
    row_start = tl.load(tile_start_ptr + pid_t)
    row_end = tl.load(tile_end_ptr + pid_t)

    offs_m = row_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    rows = slot * O + offs_n  # [BN] int64: row index into the [E_b * O, ...] buffers
    q_rows = q_ptr + rows * row_words
    sz_rows = rows * G
    if ACT > 0:
        q_rows_up = q_rows + UP_OFFSET * row_words
        sz_rows_up = sz_rows + UP_OFFSET * G

    per_split = tl.cdiv(G, SPLIT_K)
    g_start = pid_k * per_split
    g_end = tl.minimum(g_start + per_split, G)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACT > 0:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for grp in range(g_start, g_end):
        zero = tl.load(z_ptr + sz_rows + grp, mask=n_mask, other=0).to(tl.int32)
        scale = tl.load(s_ptr + sz_rows + grp, mask=n_mask, other=0.0).to(tl.float32)
        part = _group_dot(x_ptr, stride_xm, offs_m, m_mask, q_rows, n_mask, grp * GROUP, BITS, UNPACK, GROUP,
                          BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE, PRECISION, zero)
        acc += part * scale[None, :]
        if ACT > 0:
            zero_up = tl.load(z_ptr + sz_rows_up + grp, mask=n_mask, other=0).to(tl.int32)
            scale_up = tl.load(s_ptr + sz_rows_up + grp, mask=n_mask, other=0.0).to(tl.float32)
            part_up = _group_dot(x_ptr, stride_xm, offs_m, m_mask, q_rows_up, n_mask, grp * GROUP, BITS, UNPACK,
                                 GROUP, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE, PRECISION, zero_up)
            acc_up += part_up * scale_up[None, :]

    if HAS_BIAS:
        expert = tl.load(tile_expert_ptr + pid_t).to(tl.int64)
        bias = tl.load(bias_ptr + expert * O + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)
        acc += bias[None, :]
        if ACT > 0:
            acc_up += tl.load(bias_ptr + expert * O + UP_OFFSET + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACT > 0:
        acc = _gated(acc, acc_up, ACT)

    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------------------- helpers
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


UNPACK_MODES = {"bytes": 0, "words": 1, "expand": 2}


def codes_per_unit(bits: int) -> int:
    """Codes in the smallest whole number of int32 words: 32 // bits, or 32 for 3 bits (3 words)."""
    return 32 if bits == 3 else 32 // bits


def _can_view_words(qweight: torch.Tensor) -> bool:
    return qweight.shape[-1] % 4 == 0 and qweight.is_contiguous() and qweight.data_ptr() % 4 == 0


def choose_unpack(qweight: torch.Tensor, bits: int, group: int, block_k: int, unpack: str | None = None) -> str:
    """How a launch reads the packed stream. "expand" (int32 words, each loaded once and expanded in registers) when
    the row is a whole number of int32 words and every K-chunk starts on a word unit (group and BLOCK_K multiples
    of codes_per_unit); else "bytes" (one uint8 gather per code, always valid). "words" (one int32 gather per code)
    is equivalent to "bytes" and kept for tests: on sm_90 its per-code gathers get pipelined through shared memory
    ([BLOCK_K, BLOCK_N] int32 per stage, docs/gpu.md). `unpack` forces a mode (ValueError where impossible)."""
    cpu = codes_per_unit(bits)
    possible = {"bytes": True, "words": _can_view_words(qweight),
                "expand": _can_view_words(qweight) and group % cpu == 0 and block_k % cpu == 0}
    if unpack is not None:
        if not possible[unpack]:
            raise ValueError(f"unpack={unpack!r} impossible for {bits}-bit rows of {qweight.shape[-1]} bytes, "
                             f"group {group}, BLOCK_K {block_k}")
        return unpack
    return "expand" if possible["expand"] else "bytes"


def reader(qweight: torch.Tensor, unpack: str) -> torch.Tensor:
    """The packed codes as the kernel reads them: the bytes, or an int32 view of the same bytes (no copy)."""
    return qweight.contiguous() if unpack == "bytes" else qweight.view(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int, k: int, unpack: str = "bytes", block_k: int = 64) -> torch.Tensor:
    """Codes [O, K] int32 of one packed matrix [O, ceil(K / 8) * bits] through the kernel's unpackers (tests)."""
    qweight = qweight.contiguous()
    if (unpack != "bytes" and not _can_view_words(qweight)) or (unpack == "expand" and block_k % codes_per_unit(bits)):
        raise ValueError(f"unpack={unpack!r} impossible for {bits}-bit rows of {qweight.shape[-1]} bytes")
    q = reader(qweight, unpack)
    out_dim = q.shape[0]
    out = torch.empty(out_dim, k, dtype=torch.int32, device=q.device)
    block_n = 16
    grid = (triton.cdiv(out_dim, block_n), triton.cdiv(k, block_k))
    _unpack_kernel[grid](q, out, out_dim, k, q.shape[-1], BITS=bits, UNPACK=UNPACK_MODES[unpack],
                         BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def choose_blocks(max_rows: int, group: int, n_out: int, fused: bool) -> dict:
    """Block sizes for one launch from the most rows any routed expert of that width has (docs/gpu.md)."""
    if max_rows <= DECODE_MAX_ROWS:  # decode: matvec-like, one weight tile serves the (few) rows of an expert
        block_m = _next_pow2(max_rows)
        block_k = min(64, _next_pow2(group))
        block_n = DECODE_TILE_ELEMS // (block_m * block_k)
        if fused:
            block_n //= 2  # two accumulators (gate and up)
        block_n = max(16, min(block_n, _next_pow2(n_out)))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=False, num_warps=4, num_stages=2)
    block_m = 16 if max_rows <= 16 else 32 if max_rows <= 32 else 64  # tl.dot needs >= 16 in every dim
    block_k = max(16, min(64, _next_pow2(group)))
    block_n = max(16, min(64, _next_pow2(n_out)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=True, num_warps=4, num_stages=3)


def _auto_split_k(programs: int, groups: int, device: torch.device) -> int:
    """Split-K for decode launches too small to fill the GPU (1 off CUDA: the interpreter gains nothing)."""
    if device.type != "cuda" or groups < 2:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(groups, 8, triton.cdiv(2 * sms, programs)))


def _tile_table(experts: Sequence[int], slot: Sequence[int], starts: Sequence[int], counts: Sequence[int],
                block_m: int, device: torch.device) -> torch.Tensor:
    """int32 [4, tiles]: (slot, expert, first row, end row) of every BLOCK_M-row tile of the given routed experts."""
    table = []
    for e in experts:
        for first in range(starts[e], starts[e] + counts[e], block_m):
            table.append((slot[e], e, first, min(first + block_m, starts[e] + counts[e])))
    return torch.tensor(table, dtype=torch.int32).T.contiguous().to(device)


def projection(
    x: torch.Tensor,
    counts: Sequence[int],
    storage: Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    slot: Sequence[int],
    expert_bits: Sequence[int],
    group_size: int,
    activation: str = "none",
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    split_k: int | None = None,
    unpack: str | None = None,
    blocks: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One projection for rows `x` [P, K] sorted by expert (`counts` [E] rows each): [P, O] (activation "none") or
    [P, O / 2] (a fused gated activation: gate rows first, then up rows). One launch per width present among the
    routed experts. `storage[b]` = (qweight [E_b, O, ceil(K/8) b] uint8, scales [E_b, O, K/g] fp16, zeros [E_b, O,
    K/g] uint8); `bias` [E, O] or None. `split_k` None: automatic (CUDA decode only); `unpack`/`blocks` force the
    unpack mode (choose_unpack) / block sizes (tests). `out`: optional [P, n_out] destination in `out_dtype` (any row stride, unit
    column stride; not with split-K), e.g. a reused workspace."""
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"inputs must be float16, bfloat16 or float32, got {x.dtype}")
    act = ACTIVATIONS[activation]
    x = x.contiguous()
    rows, in_dim = x.shape
    out_dim = next(iter(storage.values()))[0].shape[1]
    groups = in_dim // group_size
    if groups * group_size != in_dim:
        raise ValueError(f"group size {group_size} does not divide K={in_dim}")
    n_out = out_dim // 2 if act else out_dim
    out_dtype = out_dtype or x.dtype
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    if starts[-1] + counts[-1] != rows:
        raise ValueError(f"counts sum to {starts[-1] + counts[-1]} but there are {rows} rows")
    by_width: dict[int, list[int]] = {}
    for e, c in enumerate(counts):
        if c:
            by_width.setdefault(expert_bits[e], []).append(e)
    if split_k not in (None, 1) and act:
        raise ValueError("split-K adds float32 partials: it cannot fuse the activation")
    launches = []
    for bits, experts in sorted(by_width.items()):
        cfg = dict(blocks) if blocks else choose_blocks(max(counts[e] for e in experts), group_size, n_out, bool(act))
        table = _tile_table(experts, slot, starts, counts, cfg["BLOCK_M"], x.device)
        grid_n = triton.cdiv(n_out, cfg["BLOCK_N"])
        split = split_k if split_k is not None else (1 if act else _auto_split_k(table.shape[1] * grid_n, groups, x.device))
        launches.append((bits, cfg, table, grid_n, max(1, min(split, groups))))
    any_split = any(s > 1 for *_, s in launches)
    # Split-K launches accumulate with atomics into a zeroed float32 buffer; rows of every routed expert are
    # written by exactly one width's launch, so one buffer serves all widths.
    if out is not None:
        if any_split or tuple(out.shape) != (rows, n_out) or out.stride(1) != 1 or out.dtype != out_dtype:
            raise ValueError(f"out must be [{rows}, {n_out}] {out_dtype} with unit column stride, without split-K")
    elif any_split:
        out = torch.zeros(rows, n_out, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(rows, n_out, dtype=out_dtype, device=x.device)
    dot_dtype = _TL_DTYPES[x.dtype]
    if interpreting() and x.dtype == torch.bfloat16:
        dot_dtype = tl.float32  # the interpreter's tl.dot multiplies bf16 bit patterns (triton#11584); exact anyway
    precision = "ieee" if x.dtype == torch.float32 else None  # fp32 inputs: no TF32 rounding of x
    for bits, cfg, table, grid_n, split in launches:
        qweight, scales, zeros = storage[bits]
        mode = choose_unpack(qweight, bits, group_size, cfg["BLOCK_K"], unpack)
        q = reader(qweight, mode)
        scales, zeros = scales.contiguous(), zeros.contiguous()
        target = out  # with split-K anywhere: float32, zeroed; a width without split-K stores its rows in it
        num_warps, num_stages = cfg.get("num_warps", 4), cfg.get("num_stages", 2)
        grid = (table.shape[1], grid_n, split)
        _packed_moe_kernel[grid](
            x, q, scales, zeros, bias if bias is not None else scales, target,
            table[0], table[1], table[2], table[3],
            n_out, n_out, out_dim, groups, q.shape[-1], x.stride(0), target.stride(0),
            BITS=bits, UNPACK=UNPACK_MODES[mode], GROUP=group_size,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            USE_DOT=cfg["USE_DOT"], DOT_DTYPE=dot_dtype, PRECISION=precision,
            SPLIT_K=split if any_split else 1, ACT=act, HAS_BIAS=bias is not None,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out.to(out_dtype) if any_split else out


def triton_expert_outputs(
    inputs: torch.Tensor,
    counts: torch.Tensor | Sequence[int],
    storage: Mapping[str, Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    slot: Sequence[int],
    expert_bits: Sequence[int],
    group_sizes: Mapping[str, int],
    activation: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
    biases: Mapping[str, torch.Tensor | None] | None = None,
    split_k: int | None = None,
    unpack: str | None = None,
    blocks: Mapping[str, dict] | None = None,
) -> torch.Tensor:
    """Unweighted expert outputs of rows sorted by expert: inputs [P, H] -> [P, H] in the input dtype.

    Args:
        inputs: [P, H] float16/bfloat16/float32, rows grouped by expert in expert order.
        counts: [E] rows per expert (tensor or list; a tensor is read on the host once).
        storage: storage[proj][bits] = (qweight, scales, zeros), proj in PROJECTIONS (PackedExperts._storage).
        slot, expert_bits: per expert, as PackedExperts has them.
        group_sizes: {"gate_up_proj": g_H, "down_proj": g_I}.
        activation: "silu" or "gelu_tanh" (fused into gate_up: act(gate rows) * up rows, gate first), or any
            callable [P, 2I] -> [P, I] (e.g. GPT-OSS's interleaved, clamped gate), applied to gate_up's output
            in the input dtype.
        biases: optional {"gate_up_proj": [E, 2I] or None, "down_proj": [E, H] or None}.
        split_k: force split-K for down_proj (None: automatic, CUDA decode only).
        unpack, blocks: force the unpack mode (choose_unpack) / per-projection block sizes (tests).

    Returns:
        [P, H] in inputs.dtype; rows of experts with count 0 do not exist (P = sum(counts)).
    """
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else [int(c) for c in counts]
    if not len(inputs):
        return torch.empty_like(inputs)
    biases = biases or {}
    blocks = blocks or {}
    fused = isinstance(activation, str)
    gate_up = projection(
        inputs, counts, storage["gate_up_proj"], slot, expert_bits, group_sizes["gate_up_proj"],
        activation=activation if fused else "none", bias=biases.get("gate_up_proj"), unpack=unpack,
        blocks=blocks.get("gate_up_proj"), split_k=None if fused else split_k,
    )
    hidden = gate_up if fused else activation(gate_up).to(inputs.dtype)
    return projection(
        hidden, counts, storage["down_proj"], slot, expert_bits, group_sizes["down_proj"],
        bias=biases.get("down_proj"), split_k=split_k, unpack=unpack, blocks=blocks.get("down_proj"),
    )


def storage_of(module) -> dict:
    """(storage, slot, expert_bits, group_sizes, biases) of a mode_hf PackedExperts, for triton_expert_outputs."""
    widths = sorted(set(module.expert_bits))
    storage = {proj: {b: module._storage(proj, b) for b in widths} for proj in PROJECTIONS}
    biases = {proj: module.bias(proj) for proj in PROJECTIONS}
    return dict(storage=storage, slot=list(module.slot), expert_bits=list(module.expert_bits),
                group_sizes=dict(module.group_sizes), biases=biases)


def activation_of(module) -> str | Callable[[torch.Tensor], torch.Tensor]:
    """"silu" (fused into the gate_up launch) for a PackedExperts whose activation is SiLU(gate) * up with gate rows
    first; otherwise the module's own activation, applied between the two launches."""
    from ..model.layouts import GatedActivation

    act = module.activation
    if isinstance(act, GatedActivation) and (act.act_fn is torch.nn.functional.silu or type(act.act_fn) is torch.nn.SiLU
                                              or type(act.act_fn).__name__ == "SiLUActivation"):
        return "silu"
    return act


def packed_experts_outputs(module, inputs: torch.Tensor, experts: torch.Tensor, activation="silu") -> torch.Tensor:
    """Drop-in for PackedExperts.expert_outputs(inputs [P, H], experts [P]) on the Triton path: sorts the pairs by
    expert (stable), runs the kernels, restores the order. `activation`: "silu" for SwiGLU families (gate rows
    first), or `module.activation` (a callable) for anything else."""
    if not len(inputs):
        return torch.empty_like(inputs)
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=module.num_experts)
    out = triton_expert_outputs(inputs[order], counts, activation=activation, **storage_of(module))
    return torch.empty_like(out).index_copy_(0, order, out)
