"""Router fine-tuning after quantization (GEMQ): only the router weights train, on the next-token loss of the
calibration text; everything else is frozen for the duration and restored after.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .losses import batch_loss, calibration_loss, count_loss_tokens, only_trainable

logger = logging.getLogger(__name__)


def finetune_routers(
    model: nn.Module,
    routers: Sequence[nn.Parameter],
    batches: Sequence[dict],
    vision_ids: Sequence[int],
    lr: float,
    weight_decay: float,
    epochs: int,
) -> dict[str, float]:
    """Train only `routers` with AdamW on the next-token loss of the calibration text.

    Returns {"loss_before", "loss_after", "steps"} (losses averaged over the calibration batches).
    """
    usable = [b for b in batches if count_loss_tokens([b], vision_ids)]
    before = calibration_loss(model, usable, vision_ids)
    optimizer = torch.optim.AdamW(routers, lr=lr, weight_decay=weight_decay)
    was_training, steps = model.training, 0
    with only_trainable(model, routers):
        model.train()
        for _ in range(epochs):
            for batch in tqdm(usable, desc="mode-hf router fine-tuning", unit="batch"):
                optimizer.zero_grad(set_to_none=True)
                batch_loss(model, batch, vision_ids).backward()
                optimizer.step()
                steps += 1
        model.train(was_training)
    after = calibration_loss(model, usable, vision_ids)
    logger.info("router fine-tuning: calibration loss %.4f -> %.4f in %d steps", before, after, steps)
    return {"loss_before": round(before, 6), "loss_after": round(after, 6), "steps": steps}
