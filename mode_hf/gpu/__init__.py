"""The GPU path of the packed experts: Triton kernels (`triton_experts`) for one MoE layer of per-expert widths.

Nothing here imports triton until a forward asks for it, so a machine without CUDA (and without Triton's
interpreter in use) never imports it. `PackedExperts.expert_outputs` calls `use_triton(inputs)` first:

- CUDA inputs and triton installed (`pip install mode-hf[gpu]`): the Triton kernels;
- `MODE_HF_EXPERTS_KERNEL=triton`: the Triton kernels on any device (on CPU tensors this needs
  `TRITON_INTERPRET=1`: how the tests run them without a GPU);
- `MODE_HF_EXPERTS_KERNEL=torch`: never (the torch unpack + grouped-matmul path, also on CUDA);
- otherwise (CPU): the native CPU kernels or the torch path, as before.
"""

from __future__ import annotations

import importlib.util
import os

import torch

KERNEL_VARIABLE = "MODE_HF_EXPERTS_KERNEL"
KERNELS = ("auto", "triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (Triton kernels run on CPU tensors with numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_choice() -> str:
    choice = os.environ.get(KERNEL_VARIABLE, "auto")
    if choice not in KERNELS:
        raise ValueError(f"{KERNEL_VARIABLE}={choice!r}: use one of {', '.join(KERNELS)}.")
    return choice


def use_triton(inputs: torch.Tensor) -> bool:
    """Whether the routed experts of this forward run on the Triton kernels."""
    choice = kernel_choice()
    if choice == "torch" or inputs.dtype not in DTYPES:
        return False
    if choice == "triton":
        if not triton_installed():
            raise RuntimeError(f"{KERNEL_VARIABLE}=triton but triton is not installed: `pip install mode-hf[gpu]`.")
        if not inputs.is_cuda and not interpreting():
            raise RuntimeError(f"{KERNEL_VARIABLE}=triton on {inputs.device} tensors needs TRITON_INTERPRET=1 "
                               "(Triton compiles for GPUs only).")
        return True
    return inputs.is_cuda and triton_installed()


def expert_outputs(module, inputs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """`PackedExperts.expert_outputs` on the Triton kernels (imports triton)."""
    from . import triton_experts

    return triton_experts.packed_experts_outputs(module, inputs, experts, activation=triton_experts.activation_of(module))
