"""Next-token losses on calibration text (the fisher sensitivity's gradients, router fine-tuning).

Labels are the inputs themselves with vision positions and padding masked (-100), so the loss is taken on text
tokens only. `only_trainable` freezes everything but the given parameters for the duration of a block.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn

from ..algo.statistics import modality_masks
from ..errors import CalibrationDataError
from ..model.offload import input_device
from .inputs import to_device

IGNORE_INDEX = -100


def text_labels(batch: dict, vision_ids: Sequence[int]) -> torch.Tensor:
    """Next-token labels [B, S]: input_ids on text tokens, -100 on vision tokens and padding."""
    text, _ = modality_masks(batch["input_ids"], batch.get("attention_mask"), batch.get("mm_token_type_ids"), vision_ids)
    return torch.where(text, batch["input_ids"], torch.full_like(batch["input_ids"], IGNORE_INDEX))


def count_loss_tokens(batches: Sequence[dict], vision_ids: Sequence[int]) -> int:
    """Text tokens that have a next-token loss (a text label after the first position)."""
    return sum(int((text_labels(b, vision_ids)[:, 1:] != IGNORE_INDEX).sum()) for b in batches)


def require_text(batches: Sequence[dict], vision_ids: Sequence[int], why: str) -> None:
    """Raise CalibrationDataError when no calibration text token can carry a next-token loss."""
    if count_loss_tokens(batches, vision_ids) == 0:
        raise CalibrationDataError(
            f"{why} takes a next-token loss on calibration text tokens, but the calibration data has none: add text "
            "to the samples (text-only samples or image questions with answers)."
        )


@contextlib.contextmanager
def only_trainable(model: nn.Module, parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Within the block, `parameters` (possibly none) require grad and nothing else of `model` does. Flags are
    restored by name: accelerate's offload hooks replace parameter objects during a forward."""
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    chosen = {id(p) for p in parameters}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(previous.get(name, p.requires_grad))


def batch_loss(model: nn.Module, batch: dict, vision_ids: Sequence[int]) -> torch.Tensor:
    """The model's next-token loss on the text tokens of one batch (a scalar with graph when grads are on)."""
    device = input_device(model)
    inputs = to_device(batch, device)
    labels = text_labels(batch, vision_ids).to(device)
    return model(**inputs, labels=labels, use_cache=False).loss


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence[dict], vision_ids: Sequence[int]) -> float:
    """Mean next-token loss over batches that have text labels."""
    losses = [float(batch_loss(model, b, vision_ids)) for b in batches if count_loss_tokens([b], vision_ids)]
    return sum(losses) / len(losses) if losses else math.nan
