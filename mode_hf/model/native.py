"""Native CPU kernels for packed experts (`csrc/packed_cpu.c`), built on first use with the system C compiler.

The torch path unpacks and dequantizes every routed expert's weights into memory before the matmul; at decode (a
few tokens) that costs twenty times the bf16 matmul it replaces. `grouped_gemv` reads each packed row once,
unpacks it block by block in vector registers and multiplies up to four input rows with every block;
`dequantize_slots` writes bfloat16/float32 weights for the prefill matmul in one pass, into reused workspaces. The
library is compiled with `cc -O3 -march=native -fopenmp` (without OpenMP, single-threaded, where the compiler has
none) into a per-user cache (`$MODE_HF_CACHE`, else `~/.cache/mode_hf`), keyed by the source, the compiler, the
flags and the CPU's features, and loaded with ctypes (no Python headers). Without a compiler (a warning says so
once), or with `MODE_HF_NATIVE=0`, `library()` is None and `mode_hf.model.packed` keeps its torch path.

On AVX512-BF16 builds bfloat16 inputs to 2-4-bit weights take `gemv_bf16_prepared` (codes as bfloat16(1 + code /
2^bits), products exact, float32 sums: the float32 matvec's arithmetic up to the sums' rounding, several times faster). Opt-in int8 activations (`MODE_HF_INT8_ACTIVATIONS=1`, read at every forward): the decode matvec rounds each group of
every input row to int8 with its own scale (`quantize_int8`) and multiplies the packed codes by it exactly in int32
with AVX-512 VNNI (`gemv_int8_prepared`), several times faster than the float32 matvec, at the price of that
rounding (about 0.6% relative error on a Gaussian row, far below 2-4-bit weight error, but not zero: off by default).
Where the build lacks VNNI/VBMI or a group size is not a multiple of 64, a warning says so once and the float32
matvec runs. No transformers import.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..algo.packing import SUPPORTED_BITS

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "packed_cpu.c"
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c11")
NATIVE = ("-march=native",)  # dropped in the last attempt, for compilers that do not know it
WIDE_VECTORS = ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
OPENMP = ("-fopenmp",)
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_SIGNATURES = {
    "mode_gemv": [ctypes.c_int, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.c_int, ctypes.c_int],
    "mode_dequant": [ctypes.c_int, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int],
    "mode_quantize_int8": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR],
    "mode_int8_available": [],
    "mode_gemv_int8": [ctypes.c_int, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.c_int],
    "mode_bf16_available": [],
    "mode_gemv_bf16": [ctypes.c_int, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.c_int],
    "mode_moe_bf16": [_I64] * 7 + [_PTR] * 12 + [ctypes.c_int],
}
INT8_CHUNK = 64  # the int8 matvec's step: a group size must be a multiple of it
_int8_warned: set[str] = set()


def enabled() -> bool:
    """False when the environment variable MODE_HF_NATIVE is 0/false/no/off."""
    return os.environ.get("MODE_HF_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; None when disabled or when building fails."""
    global _library, _tried
    if _tried or not enabled():
        return _library if enabled() else None
    with _lock:
        if not _tried:
            try:
                _library = _load(_build())
            except (OSError, subprocess.SubprocessError, RuntimeError) as error:
                logger.warning(
                    "mode-hf: the native CPU kernels for packed experts could not be built (%s); packed experts use "
                    "the slower torch path. Install a C compiler with OpenMP (gcc), or set MODE_HF_NATIVE=0 to "
                    "silence this.", error,
                )
            _tried = True
    return _library


def _cpu_features() -> str:
    """What -march=native depends on: the CPU flags line on Linux, else the processor's name."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler() -> str:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC)")
    return compiler


def _build() -> Path:
    """Compile the kernels unless the cache already holds this build; returns the shared library's path. Tries with
    OpenMP first, then without (a compiler without OpenMP, such as Apple clang: one thread), then without the x86
    vector-width hint, then without -march=native (portable code)."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    cache = Path(os.environ.get("MODE_HF_CACHE", Path.home() / ".cache" / "mode_hf")) / "native"
    errors = []
    for flags in ((*FLAGS, *NATIVE, *WIDE_VECTORS, *OPENMP), (*FLAGS, *NATIVE, *WIDE_VECTORS), (*FLAGS, *NATIVE), FLAGS):
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), _cpu_features()]).encode()).hexdigest()
        target = cache / f"packed_cpu-{platform.machine()}-{key[:16]}.so"
        if target.exists():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as staging:  # concurrent builds each publish a whole file
            built = Path(staging) / target.name
            result = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE)], capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                os.replace(built, target)
                logger.info("mode-hf: built the native CPU kernels into %s (%s)", target, " ".join(flags))
                return target
        errors.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-1000:]}")
    raise RuntimeError("; ".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, arguments in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, ctypes.c_int
    return lib


def int8_requested() -> bool:
    """True when the environment variable MODE_HF_INT8_ACTIVATIONS is 1/true/yes/on (read at every call)."""
    return os.environ.get("MODE_HF_INT8_ACTIVATIONS", "0").strip().lower() in ("1", "true", "yes", "on")


def int8_available() -> bool:
    """Whether the built kernels have the int8 matvec (the compiler targeted AVX-512 VNNI and VBMI)."""
    lib = library()
    return lib is not None and bool(lib.mode_int8_available())


def bf16_available() -> bool:
    """Whether the built kernels have the bfloat16 matvec (AVX512-BF16 besides VNNI/VBMI)."""
    lib = library()
    return lib is not None and bool(lib.mode_bf16_available())


def use_bf16(bits: int, group: int) -> bool:
    """Whether bfloat16 inputs to `bits`-wide weights of group size `group` go through the bfloat16 matvec
    (`gemv_bf16_prepared`): built, 2-4 bits, `group` a multiple of INT8_CHUNK. Same arithmetic as float32: the
    products of codes and bfloat16 inputs are exact, the sums float32."""
    return bits != 8 and group % INT8_CHUNK == 0 and bf16_available()


def _int8_refusal(group: int) -> str | None:
    """Why the int8 matvec cannot serve weights of group size `group` (None: it can)."""
    if not int8_available():
        return "the native kernels were built without AVX-512 VNNI/VBMI (or are not available)"
    if group % INT8_CHUNK:
        return f"group size {group} is not a multiple of {INT8_CHUNK}"
    return None


def use_int8(group: int) -> bool:
    """Whether the decode matvec runs on int8 activations for weights of group size `group`: requested, built, and
    `group` a multiple of INT8_CHUNK. A request that cannot be served warns once per reason and returns False."""
    if not int8_requested():
        return False
    reason = _int8_refusal(group)
    if reason is None:
        return True
    if reason not in _int8_warned:
        _int8_warned.add(reason)
        logger.warning("mode-hf: MODE_HF_INT8_ACTIVATIONS=1 is ignored where %s; the float32 matvec runs there", reason)
    return False


def usable(tensor: torch.Tensor) -> bool:
    """Whether the kernels can serve a forward on `tensor`'s device and dtype (CPU, float32/bfloat16/float16)."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16) and library() is not None


def _pointer(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def _check_storage(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, in_dim: int, group: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not one of {SUPPORTED_BITS}")
    if in_dim % group:
        raise ValueError(f"group size {group} does not divide the input dim {in_dim}")
    for name, tensor, dtype in (("qweight", qweight, torch.uint8), ("scales", scales, torch.float16), ("zeros", zeros, torch.uint8)):
        if tensor.device.type != "cpu" or tensor.dtype != dtype or not tensor.is_contiguous() or tensor.dim() != 3:
            raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor [slots, O, ...], got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    if qweight.shape[2] != (in_dim + 7) // 8 * bits or scales.shape[2] != in_dim // group or zeros.shape != scales.shape:
        raise ValueError(f"packed shapes {tuple(qweight.shape)}, {tuple(scales.shape)}, {tuple(zeros.shape)} do not match K={in_dim}, group {group}, {bits} bits")


LANES = 16  # the kernel's block: 16 bytes at 2, 4 and 8 bits, 16 runs of 3 bytes at 3 bits


def block_codes(bits: int) -> int:
    """Codes in one block of the kernel's blocked order at `bits`: 64, 128, 32 or 16 for 2, 3, 4, 8 bits."""
    return LANES * 8 if bits == 3 else LANES * (8 // bits)


def blocked(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows of `x` [P, K] in the kernel's blocked order at `bits` (K a multiple of `block_codes(bits)`): within
    every block, first the codes sitting first in their byte (3 bits: in their run of 8), then those sitting
    second, ... Contiguous, in the dtype of `x`."""
    rows, in_dim = x.shape
    per = 8 if bits == 3 else 8 // bits  # codes per byte (per run of 3 bytes at 3 bits)
    return x.reshape(rows, in_dim // block_codes(bits), LANES, per).transpose(2, 3).contiguous().view(rows, in_dim)


def _slots(slots: torch.Tensor | list[int], count: int) -> torch.Tensor:
    slots = torch.as_tensor(slots, dtype=torch.int64).contiguous()
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= count):
        raise ValueError(f"slots must lie in [0, {count}), got {slots.tolist()}")
    return slots


def grouped_gemv(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int,
    slots: torch.Tensor | list[int], starts: torch.Tensor | list[int], counts: torch.Tensor | list[int],
    x: torch.Tensor, out: torch.Tensor | None = None, int8_activations: bool = False,
) -> torch.Tensor:
    """out[p] = W_{slots[i]} x[p] for the rows p in [starts[i], starts[i] + counts[i]) of `x` [P, K], every item i:
    float32 [P, O], computed in float32 (bfloat16 `x` where `use_bf16`: through `gemv_bf16_prepared`, the same
    arithmetic; with `int8_activations`: on `quantize_int8(x, group)`, through `gemv_int8_prepared`); rows of `out`
    outside those ranges are left as they are (pass `out` to fill it width by width). Callers that build the
    arguments themselves use `gemv_prepared` (at decode these checks cost as much as a small layer's kernel).

    Raises:
        ValueError: shapes, dtypes, slots or row ranges that do not fit; RuntimeError: no native library.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available (see mode_hf.model.native.library)")
    rows, in_dim = x.shape
    slots, starts, counts = (torch.as_tensor(v, dtype=torch.int64).contiguous() for v in (slots, starts, counts))
    out_dim = qweight.shape[1]
    _check_storage(qweight, scales, zeros, bits, in_dim, group)
    _slots(slots, qweight.shape[0])
    if counts.shape != slots.shape or starts.shape != slots.shape or bool((counts < 0).any() | (starts < 0).any() | (starts + counts > rows).any()):
        raise ValueError(f"starts {starts.tolist()} and counts {counts.tolist()} must give one row range of x (P={rows}) per slot")
    if out is not None and (out.shape != (rows, out_dim) or out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu"):
        raise ValueError(f"out must be a contiguous CPU float32 tensor {(rows, out_dim)}, got {out.dtype} {tuple(out.shape)}")
    if out is None:
        out = torch.empty(rows, out_dim, dtype=torch.float32)
    if x.dtype == torch.bfloat16 and not int8_activations and use_bf16(bits, group):
        x = x.contiguous()
        gemv_bf16_prepared(lib, (qweight, scales, zeros), bits, group, slots, starts, counts, x, group_sums(x.float(), group), out)
        return out
    x = x.to(torch.float32).contiguous()
    if int8_activations:
        if (reason := _int8_refusal(group)) is not None:
            raise ValueError(f"int8 activations need the VNNI build and a group size that is a multiple of {INT8_CHUNK}: {reason}")
        gemv_int8_prepared(lib, (qweight, scales, zeros), bits, group, slots, starts, counts, quantize_int8(x, group), out)
        return out
    gemv_prepared(lib, (qweight, scales, zeros), bits, group, slots, starts, counts, matvec_order(x, bits, group), group_sums(x, group), out)
    return out


def quantize_int8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the contiguous float32 `x` [P, K] as int8 per group of `group`: (q int8 [P, K], scale float32
    [P, K / group], sums float32 [P, K / group]) with scale = max |x_group| / 127, q = round-half-even(x / scale)
    clamped to [-127, 127] (all zero where the group is), sums = the sum of each group of q; a group holding a NaN
    or an infinity gets a NaN scale (its outputs become NaN, as in float32)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available (see mode_hf.model.native.library)")
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() or x.device.type != "cpu" or x.shape[1] % group:
        raise ValueError(f"x must be a contiguous CPU float32 [P, K] with K a multiple of {group}, got {x.dtype} {tuple(x.shape)}")
    rows, in_dim = x.shape
    q = torch.empty(rows, in_dim, dtype=torch.int8)
    scale, sums = (torch.empty(rows, in_dim // group, dtype=torch.float32) for _ in range(2))
    lib.mode_quantize_int8(rows, in_dim, group, _pointer(x), _pointer(q), _pointer(scale), _pointer(sums))
    return q, scale, sums


def gemv_int8_prepared(
    lib: ctypes.CDLL, storage: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int, group: int,
    slots: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor], out: torch.Tensor,
) -> None:
    """`gemv_prepared` on int8 activations (`quantize_int8` of the natural-order rows, the same at every width):
    out[p] = sum_g scale_w * scale_x * (sum code * q - zero * sum q) per group, the code sums exact in int32. Needs
    `int8_available()` and a group size that is a multiple of INT8_CHUNK (`use_int8`)."""
    qweight, scales, zeros = storage
    q, scale, sums = quantized
    status = lib.mode_gemv_int8(
        bits, qweight.shape[1], q.shape[1], group, _pointer(qweight), _pointer(scales), _pointer(zeros), slots.numel(),
        _pointer(slots), _pointer(starts), _pointer(counts), _pointer(q), _pointer(scale), _pointer(sums), _pointer(out),
        torch.get_num_threads(),
    )
    if status:
        raise RuntimeError("mode_gemv_int8: this build of the native kernels has no int8 matvec (see int8_available)")


def gemv_bf16_prepared(
    lib: ctypes.CDLL, storage: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int, group: int,
    slots: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, x: torch.Tensor, xsum: torch.Tensor, out: torch.Tensor,
) -> None:
    """`gemv_prepared` on contiguous bfloat16 rows `x` [P, K] in natural order (at every width), `xsum` their float32
    `group_sums`: codes as bfloat16(1 + code / 2^bits) multiplied with AVX512-BF16 (products exact, sums float32). Needs
    `use_bf16(bits, group)`."""
    qweight, scales, zeros = storage
    status = lib.mode_gemv_bf16(
        bits, qweight.shape[1], x.shape[1], group, _pointer(qweight), _pointer(scales), _pointer(zeros), slots.numel(),
        _pointer(slots), _pointer(starts), _pointer(counts), _pointer(x), _pointer(xsum), _pointer(out), torch.get_num_threads(),
    )
    if status:
        raise RuntimeError(f"mode_gemv_bf16 returned {status}: no bfloat16 matvec for {bits}-bit weights in this build (see use_bf16)")


def moe_bf16(
    lib: ctypes.CDLL, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert_bits: torch.Tensor,
    expert_slot: torch.Tensor, storage: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    inter: int, groups: dict[str, int],
) -> torch.Tensor:
    """One MoE block at decode in one call (`mode_moe_bf16`): bfloat16 hidden states x [T, H], routing
    (top_k_index int64 [T, k], top_k_weights float32 [T, k]; ids outside [0, E) are empty slots), the experts' widths
    and slots (int64 [E]) and the packed storage of each projection per width (2-4 bits; group sizes multiples of
    INT8_CHUNK): gate/up, silu(gate) * up rounded to bfloat16, down, each expert's output rounded to bfloat16 and
    summed with its routing weight in float32. Returns [T, H] bfloat16."""
    out = torch.empty_like(x)
    pointers = []
    for proj in ("gate_up_proj", "down_proj"):
        for part in range(3):
            table = (ctypes.c_void_p * 5)()
            for bits, parts in storage[proj].items():
                table[bits] = parts[part].data_ptr()
            pointers.append(table)
    tokens, top_k = top_k_index.shape
    status = lib.mode_moe_bf16(
        tokens, top_k, x.shape[1], inter, expert_bits.numel(), groups["gate_up_proj"], groups["down_proj"], _pointer(x),
        _pointer(top_k_index), _pointer(top_k_weights), _pointer(expert_bits), _pointer(expert_slot), *pointers,
        _pointer(out), torch.get_num_threads(),
    )
    if status:
        raise RuntimeError(f"mode_moe_bf16 returned {status} (-1: out of memory, -2: no bfloat16 matvec in this build)")
    return out


def fits_blocks(bits: int, group: int) -> bool:
    """Whether groups of `group` codes are whole blocks at `bits` (the default group 128 always is): then the
    kernels work in blocked order (the matvec's inputs, `permuted` dequantization), else in natural order."""
    return group % block_codes(bits) == 0


def matvec_order(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Rows of `x` in the order the matvec (and `permuted` weights) read them at `bits` and `group`: blocked where
    `fits_blocks`, else natural."""
    return blocked(x, bits) if fits_blocks(bits, group) else x


def permuted_workspace(bits: int, group: int) -> bool:
    """Whether `workspace_weights` writes K in blocked order: where the group fits the kernel's blocks, unless the
    build has the wide (VBMI) dequantizer and the group is a multiple of INT8_CHUNK, which writes natural order as
    fast."""
    return fits_blocks(bits, group) and not (int8_available() and group % INT8_CHUNK == 0)


def workspace_inputs(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Rows of `x` in the K order of `workspace_weights(..., bits, group, ...)`."""
    return blocked(x, bits) if permuted_workspace(bits, group) else x


def workspace_weights(
    name: str, storage: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int, group: int, in_dim: int,
    slots: torch.Tensor | list[int], dtype: torch.dtype,
) -> torch.Tensor:
    """The weights of `slots` [n, O, K] dequantized into this thread's workspace `name` (float32 or bfloat16),
    K in blocked order where `permuted_workspace`: multiply them by `workspace_inputs(x, bits, group)`, which leaves
    every product as in natural order."""
    qweight, scales, zeros = storage
    weights = workspace(name, (len(slots), qweight.shape[1], in_dim), dtype)
    return dequantize_slots(qweight, scales, zeros, bits, group, in_dim, slots, out=weights, permuted=permuted_workspace(bits, group))


def group_sums(x: torch.Tensor, group: int) -> torch.Tensor:
    """float32 [P, K / group]: the sum of each group of every row of the contiguous float32 `x` [P, K]."""
    return x.view(x.shape[0], x.shape[1] // group, group).sum(-1).contiguous()


def gemv_prepared(
    lib: ctypes.CDLL, storage: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int, group: int,
    slots: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, x: torch.Tensor, xsum: torch.Tensor, out: torch.Tensor,
) -> None:
    """`grouped_gemv` on arguments already prepared and checked: contiguous int64 slots/starts/counts, float32 x
    in blocked order when `fits_blocks(bits, group)` (else natural), its `group_sums` (of the natural order; the
    same numbers), float32 out [P, O]. For callers that reuse x across widths (`PackedExperts`)."""
    qweight, scales, zeros = storage
    status = lib.mode_gemv(
        bits, qweight.shape[1], x.shape[1], group, _pointer(qweight), _pointer(scales), _pointer(zeros), slots.numel(),
        _pointer(slots), _pointer(starts), _pointer(counts), _pointer(x), _pointer(xsum), _pointer(out),
        int(fits_blocks(bits, group)), torch.get_num_threads(),
    )
    if status:
        raise MemoryError("mode_gemv could not allocate its row buffers")


def dequantize_slots(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int, in_dim: int,
    slots: torch.Tensor | list[int], dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
    targets: torch.Tensor | list[int] | None = None, permuted: bool = False,
) -> torch.Tensor:
    """The weights of `slots`, [n, O, K] in `dtype`: (code - zero) * scale in float32, rounded once to `dtype`
    (float32 and bfloat16 written by the kernel; other dtypes converted from float32). With `out` (contiguous
    float32 or bfloat16 [m, O, K]) slot i is written to out[targets[i]] (default i) and `out` is returned: a buffer
    written again and again costs no page faults, which otherwise take most of the time. With `permuted` the K
    columns come in `blocked(..., bits)` order (faster to write; multiply by `blocked(x, bits)`); needs a group size
    that is a multiple of `block_codes(bits)`.

    Raises:
        ValueError: shapes, dtypes, slots or targets that do not fit; RuntimeError: no native library.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available (see mode_hf.model.native.library)")
    _check_storage(qweight, scales, zeros, bits, in_dim, group)
    slots = _slots(slots, qweight.shape[0])
    out_dim = qweight.shape[1]
    if out is None:
        kernel_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        result = torch.empty(slots.numel(), out_dim, in_dim, dtype=kernel_dtype)
    else:
        result = out
        if out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous() or out.device.type != "cpu" or out.shape[1:] != (out_dim, in_dim):
            raise ValueError(f"out must be a contiguous CPU float32/bfloat16 tensor [m, {out_dim}, {in_dim}], got {out.dtype} {tuple(out.shape)}")
    fast = fits_blocks(bits, group)
    if permuted and not fast:
        raise ValueError(f"permuted order needs a group size that is a multiple of {block_codes(bits)} codes at {bits} bits, got {group}")
    targets = torch.arange(slots.numel()) if targets is None else torch.as_tensor(targets, dtype=torch.int64).contiguous()
    if targets.shape != slots.shape or (targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= result.shape[0])):
        raise ValueError(f"targets {targets.tolist()} must give one index of out (m={result.shape[0]}) per slot")
    status = lib.mode_dequant(
        bits, out_dim, in_dim, group, _pointer(qweight), _pointer(scales), _pointer(zeros), slots.numel(), _pointer(slots),
        _pointer(targets), _pointer(result), int(result.dtype == torch.bfloat16), int(fast), int(permuted), torch.get_num_threads(),
    )
    if status:
        raise MemoryError("mode_dequant could not allocate its row buffers")
    return result if out is not None else result.to(dtype)


_workspaces = threading.local()


def workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of `shape` and `dtype` backed by this thread's buffer `name`, kept between calls and grown when
    needed (freshly allocated memory costs a page fault per 4 KiB on first write, more than the dequantization
    itself). Its contents are whatever the last user left. `release_workspaces()` frees them."""
    buffers = _workspaces.__dict__.setdefault("buffers", {})
    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if name not in buffers or buffers[name].numel() < size:
        buffers[name] = torch.empty(size, dtype=torch.uint8)
    return buffers[name][:size].view(dtype).view(shape)


def release_workspaces() -> None:
    """Free this thread's workspaces (they are rebuilt on demand)."""
    _workspaces.__dict__.pop("buffers", None)
