"""Weights that accelerate keeps offloaded (device_map with "cpu" or "disk" entries): reading them for as long as
mode-hf needs them, keeping trained ones loaded, and where a module computes. Duck-typed: accelerate is imported
only where its hooks are already attached. No transformers import.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


def _offload_hook(module: nn.Module) -> Any:
    """The accelerate hook that keeps `module`'s own parameters offloaded (on CPU or disk, meta in the module), or
    None. Duck-typed (an `offload` flag and a `weights_map`), so accelerate is never imported here."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        if getattr(candidate, "offload", False) and getattr(candidate, "weights_map", None) is not None:
            return candidate
    return None


@contextlib.contextmanager
def weights_loaded(module: nn.Module) -> Iterator[None]:
    """Within the block `module`'s own parameters are real tensors on its execution device, also when accelerate
    offloads them (device_map with "cpu" or "disk" entries); re-entrant; nothing happens for a plain module."""
    hook = _offload_hook(module)
    if hook is None:
        yield
        return
    depth = getattr(module, "_mode_hf_loaded", 0)  # only the outermost block loads and offloads
    if not depth:
        hook.pre_forward(module)
    module._mode_hf_loaded = depth + 1
    try:
        yield
    finally:
        module._mode_hf_loaded = depth
        if not depth:
            hook.post_forward(module, None)


def keep_loaded(module: nn.Module) -> None:
    """Load `module`'s offloaded parameters onto its execution device for good and stop offloading them (for small
    modules that get trained, such as routers: an offload hook would reload the stored weights at every forward)."""
    hook = _offload_hook(module)
    if hook is None:
        return
    from accelerate.hooks import remove_hook_from_module  # only reached when accelerate hooks are attached

    hook.pre_forward(module)
    remove_hook_from_module(module)  # its detach keeps the loaded tensors (they were dispatched from meta)


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its offload hook's execution device, else the device of its first tensor."""
    hook = _offload_hook(module)
    if hook is not None:
        return torch.device(hook.execution_device)
    tensor = next(module.parameters(), None)
    tensor = next(module.buffers(), None) if tensor is None else tensor
    return torch.device("cpu") if tensor is None else tensor.device


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's execution device (`model.device` is the first
    parameter's device, "meta" when accelerate offloads that module)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)
