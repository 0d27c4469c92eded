"""The bundled models' processor: a character-level tokenizer (made with the `tokenizers` library) and Qwen3-VL's
processor without its video processor (which needs torchvision), built offline.

`register()` (called by `import mode_hf`) makes `AutoProcessor.from_pretrained(<bundled model>)` return it: the
processor's class name in `processor_config.json` is looked up among the classes registered with AutoProcessor.
It is registered under a key of its own, so that no transformers model type is remapped.
"""

from __future__ import annotations

from typing import Any, Sequence

from transformers import PretrainedConfig, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

EOS, PAD = "<|endoftext|>", "<|pad|>"  # ids 0 and 1 of every character tokenizer
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!-+=*/()'\"\n"
QWEN3_VL_SPECIALS = {  # attribute name -> token; ids 2.. in this order
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"  # what one image stands for in a prompt
PATCH, TEMPORAL_PATCH, MERGE = 8, 2, 2  # every bundled model: 16 x 16 pixels per vision token
# Chat messages as the bundled models were trained: each image item becomes IMAGE_PLACEHOLDER, text items follow
# as they are, no roles; an assistant turn ends with eos. `pipeline("image-text-to-text")` with messages uses it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}" + IMAGE_PLACEHOLDER + "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}" + EOS + "{%- endif -%}"
    "{%- endfor -%}"
)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class _ProcessorKey(PretrainedConfig):
    """The key `ImageOnlyQwen3VLProcessor` is registered under with AutoProcessor (no model has this config)."""

    model_type = "mode_hf_image_only_qwen3_vl"


def register() -> None:
    """Register `ImageOnlyQwen3VLProcessor` with AutoProcessor; safe to call repeatedly."""
    from transformers import AutoProcessor

    AutoProcessor.register(_ProcessorKey, ImageOnlyQwen3VLProcessor, exist_ok=True)


def character_tokenizer(specials: dict[str, str], padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: eos (id 0), pad (id 1), then `specials` in order, then `CHARACTERS`.

    `specials` maps attribute names to tokens (e.g. {"image_token": "<|image_pad|>"}); each becomes a special token
    the tokenizer never splits, with `tokenizer.<name>` and `tokenizer.<name>_id` (processors read those).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([EOS, PAD, *specials.values(), *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=PAD, padding_side=padding_side, extra_special_tokens=dict(specials)
    )


def special_token_ids(specials: Sequence[str] | dict[str, str]) -> dict[str, int]:
    """The ids `character_tokenizer(specials)` gives each named special token (for model configs)."""
    return {name: 2 + i for i, name in enumerate(specials)}


def vocab_size(specials: Sequence[str] | dict[str, str] = QWEN3_VL_SPECIALS) -> int:
    """Tokens of `character_tokenizer(specials)`."""
    return 2 + len(specials) + len(CHARACTERS)


def build_processor(min_side: int, max_side: int) -> ImageOnlyQwen3VLProcessor:
    """The bundled models' processor for images of `min_side` to `max_side` pixels a side (resized within those
    areas): patch 8, merge 2, so (side / 16)^2 vision tokens per image."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE,
        min_pixels=min_side * min_side, max_pixels=max_side * max_side,
    )
    return ImageOnlyQwen3VLProcessor(image_processor, character_tokenizer(QWEN3_VL_SPECIALS), chat_template=CHAT_TEMPLATE)
