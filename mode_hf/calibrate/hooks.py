"""Scoped forward hooks for calibration passes: registered for the duration of a block and always removed, and
the exception that ends a pass once the layer of interest has been seen. No transformers import.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def pre_hooks(
    hooks: Sequence[tuple[nn.Module, Callable[..., Any]]],
    post: Sequence[tuple[nn.Module, Callable[..., Any]]] = (),
) -> Iterator[None]:
    """Register `(module, fn(module, args, kwargs))` forward pre-hooks, and `post` forward hooks
    `fn(module, args, kwargs, output)`, for the duration of the block; they are always removed."""
    handles = [module.register_forward_pre_hook(fn, with_kwargs=True) for module, fn in hooks]
    handles += [module.register_forward_hook(fn, with_kwargs=True) for module, fn in post]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been seen."""


def hidden_states_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with (first positional or `hidden_states=`)."""
    return args[0] if args else kwargs["hidden_states"]


def stop_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """A forward hook that ends the pass after its module: what follows (up to the LM head) would be wasted work."""
    raise StopForward
