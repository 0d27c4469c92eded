"""Test fixtures: a tiny random Qwen3-VL-MoE built from the bundled models' config, its offline processor, and
procedurally drawn calibration scenes (a shape on a uniform background, so that many vision tokens are
redundant). Nothing is downloaded.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from PIL import Image, ImageDraw
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from mode_hf.bench import tasks
from mode_hf.bench.models import EOS_ID, PAD_ID, qwen3_vl_moe_config
from mode_hf.bench.processor import CHARACTERS, ImageOnlyQwen3VLProcessor, build_processor as _bundled_processor

__all__ = ["CHARACTERS", "ImageOnlyQwen3VLProcessor", "build_processor", "calibration_samples", "draw_scene", "tiny_config", "tiny_model"]

PALETTE = {**tasks.COLOURS, "white": tasks.BACKGROUNDS["white"]}  # shape colours and backgrounds of the scenes
SHAPES = ("square", "circle")


def build_processor() -> ImageOnlyQwen3VLProcessor:
    """Processor for 32..96 px images: patch 8, merge 2 -> (side / 16)^2 vision tokens per image."""
    return _bundled_processor(32, 96)


def tiny_config(**kwargs: Any) -> Qwen3VLMoeConfig:
    """A Qwen3-VL-MoE config small enough for CPU tests (`mode_hf.bench.models.qwen3_vl_moe_config`)."""
    return qwen3_vl_moe_config(**kwargs)


def tiny_model(seed: int = 0, **config_kwargs: Any) -> Qwen3VLMoeForConditionalGeneration:
    """A randomly initialised tiny Qwen3-VL-MoE (float32, eval mode) whose generation stops at eos/pad."""
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(tiny_config(**config_kwargs)).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD_ID, EOS_ID
    return model


def draw_scene(rng: random.Random, size: int = 96) -> tuple[Image.Image, str]:
    """A shape on a uniform background (many duplicate patches) and a question/answer text about it."""
    background, colour = rng.sample(sorted(PALETTE), 2)
    shape = rng.choice(SHAPES)
    image = Image.new("RGB", (size, size), PALETTE[background])
    draw = ImageDraw.Draw(image)
    left, top = rng.randrange(0, size // 2), rng.randrange(0, size // 2)
    box = (left, top, left + size // 3, top + size // 3)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=PALETTE[colour])
    return image, f"a {colour} {shape} on {background}."


def calibration_samples(count: int = 16, seed: int = 0, text_only_every: int = 4) -> list[dict[str, Any]]:
    """Raw calibration samples: mostly images with questions, every `text_only_every`-th a text-only sample."""
    rng = random.Random(seed)
    samples: list[dict[str, Any]] = []
    for index in range(count):
        if text_only_every and index % text_only_every == text_only_every - 1:
            a, b = rng.randrange(10, 99), rng.randrange(10, 99)
            samples.append({"text": f"{a}+{b}={a + b}"})
        else:
            image, text = draw_scene(rng)
            samples.append({"image": image, "text": text})
    return samples
