"""A tiny Qwen3-VL-MoE with an offline processor and procedurally drawn calibration samples.

Everything here is built locally (no download): a character-level tokenizer made with the `tokenizers` library, a
PIL image processor, an image-only Qwen3-VL processor (the stock one needs torchvision for its video processor),
and scenes of coloured shapes on uniform backgrounds (so that many vision tokens are redundant). The tests and the
README's main job use it until the trained benchmark model is bundled.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!-+=*/()'\"\n"
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40), "white": (245, 245, 245)}
SHAPES = ("square", "circle")


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with Qwen-VL's special tokens."""
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )


def build_processor() -> ImageOnlyQwen3VLProcessor:
    """Processor for 64..96 px images: patch 8, merge 2 -> (side / 16)^2 vision tokens per image."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, temporal_patch_size=2, merge_size=2, min_pixels=32 * 32, max_pixels=96 * 96
    )
    return ImageOnlyQwen3VLProcessor(image_processor, build_tokenizer())


def tiny_config(
    num_layers: int = 2, num_experts: int = 8, hidden: int = 64, moe_intermediate: int = 32, vision_hidden: int = 32, vision_depth: int = 2
) -> Qwen3VLMoeConfig:
    """A Qwen3-VL-MoE config small enough for CPU tests (about 0.2M parameters with the defaults)."""
    tokenizer_size = len(SPECIAL_TOKENS) + len(CHARACTERS)
    text = dict(
        vocab_size=tokenizer_size, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=moe_intermediate,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        num_experts=num_experts, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        tie_word_embeddings=False, pad_token_id=1, eos_token_id=0,
    )
    vision = dict(
        depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2, in_channels=3, patch_size=8, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=144, deepstack_visual_indexes=[0],
    )
    ids = {token: SPECIAL_TOKENS.index(token) for token in SPECIAL_TOKENS}
    return Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def tiny_model(seed: int = 0, **config_kwargs: Any) -> Qwen3VLMoeForConditionalGeneration:
    """A randomly initialised tiny Qwen3-VL-MoE (float32, eval mode) whose generation stops at eos/pad."""
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(tiny_config(**config_kwargs)).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 1, 0
    return model


def draw_scene(rng: random.Random, size: int = 96) -> tuple[Image.Image, str]:
    """A shape on a uniform background (many duplicate patches) and a question/answer text about it."""
    background, colour = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    left, top = rng.randrange(0, size // 2), rng.randrange(0, size // 2)
    box = (left, top, left + size // 3, top + size // 3)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
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
