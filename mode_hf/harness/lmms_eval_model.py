"""The lmms-eval model "mode_qwen3_vl" (registered by `mode_hf.harness.lmms_eval.manifests`); imports lmms-eval."""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.models.simple import qwen3_vl as stock
from transformers import AutoModelForImageTextToText


class ModeQwen3VL(stock.Qwen3_VL):
    """lmms-eval's Qwen3-VL wrapper for mode checkpoints (and 16-bit ones): the model class from the checkpoint's
    config, `dtype` an argument, CPU and no system prompt by default."""

    def __init__(self, pretrained: str, device: str = "cpu", device_map: str = "cpu", dtype: str = "float32",
                 system_prompt: str = "", **kwargs: Any) -> None:
        class Loader:  # what the stock wrapper calls `model_cls.from_pretrained(pretrained, dtype="bfloat16", ...)` on
            @staticmethod
            def from_pretrained(path: str, **options: Any) -> Any:
                return AutoModelForImageTextToText.from_pretrained(path, **{**options, "dtype": getattr(torch, dtype)})

        original = stock._resolve_model_class
        stock._resolve_model_class = lambda path, is_moe: (Loader, "dtype")
        try:
            super().__init__(pretrained=pretrained, device=device, device_map=device_map, system_prompt=system_prompt, **kwargs)
        finally:
            stock._resolve_model_class = original
