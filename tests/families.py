"""Tiny, randomly initialised, offline fixtures for the Mixture-of-Experts families of transformers 5.24.

One `Family` per model type, in `FAMILIES`. Each builds, lazily and without any download:

* a tiny random model (float32, eval mode, `torch.manual_seed(0)`, generation stops at eos/pad),
* an offline processor where one can be built without torchvision (a character-level tokenizer made with the
  `tokenizers` library, the family's PIL image processor and the family's processor class, with the video
  processor left out because video processors need torchvision), the tokenizer alone for text-only families,
  or None (Llama4 and Kimi-K2.5, whose image processors need torchvision),
* calibration samples (raw `{"image", "text"}` dicts for families with a processor; processor-like dicts built
  by hand otherwise), and one two-row input batch for logits comparisons.

Images are procedural scenes (a coloured shape on a uniform background, `tiny.draw_scene`). Special
token ids are small and inside the tiny vocabularies; the model configs name the same ids as the tokenizers.
This module holds no tests; tests/test_families.py runs the matrix over it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from mode_hf.bench.processor import ImageOnlyQwen3VLProcessor, character_tokenizer, special_token_ids, vocab_size
from tiny import draw_scene

VOCAB_SIZE = 128  # model vocabulary; the tokenizers use 2 + (family specials) + len(CHARACTERS) < 128 of it
EOS, PAD = "<|endoftext|>", "<|pad|>"  # ids 0 and 1 in every tokenizer
EOS_ID, PAD_ID = 0, 1
TEXT_IDS = dict(pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)  # every language model config
QUESTIONS = ("what is here?", "which colour is the shape?", "describe it.", "where is it?", "name the shape.")


@dataclass
class Family:
    """One Mixture-of-Experts family: how to build its tiny model, processor, calibration data and inputs."""

    name: str
    multimodal: bool
    model_class: type  # what `.from_pretrained(path)` is called on
    make_model: Callable[[], Any]  # tiny random PreTrainedModel, float32, eval(), seeded
    make_processor: Callable[[], Any] | None  # offline processor / tokenizer; None where it needs torchvision
    calibration: Callable[[Any], list[dict]]  # processor (or None) -> calibration samples
    inputs: Callable[[Any], dict]  # processor (or None) -> one model-input batch of 2 rows
    pipeline: bool  # pipeline("image-text-to-text", model=saved_dir, processor=processor) works
    notes: str = ""  # family quirks a reader of the support table should know


# --------------------------------------------------------------------------------------------------------------
# Shared helpers: tokenizer, chat template, scenes, hand-made pixel inputs
# --------------------------------------------------------------------------------------------------------------


def build_tokenizer(specials: dict[str, str], padding_side: str = "left") -> Any:
    """The bundled models' character tokenizer (`mode_hf.bench.processor.character_tokenizer`) with `specials`:
    eos (id 0), pad (id 1), then `specials` in order, then `CHARACTERS`; left padding by default."""
    assert vocab_size(specials) <= VOCAB_SIZE
    return character_tokenizer(specials, padding_side)


def chat_template(image_placeholder: str) -> str:
    """A minimal jinja chat template: `role: content` lines, each image item rendered as `image_placeholder`."""
    return (
        "{%- for message in messages -%}{{ message['role'] }}: "
        "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}" + image_placeholder + "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}\n{%- endfor -%}"
        "{%- if add_generation_prompt -%}assistant: {%- endif -%}"
    )


def scene(seed: int, size: int = 64) -> Image.Image:
    """A procedural scene (a coloured square or circle on a uniform background), `size` x `size` pixels."""
    return draw_scene(random.Random(seed), size)[0]


def _text_only(seed: int) -> str:
    """A short arithmetic line (text-only calibration)."""
    rng = random.Random(1000 + seed)
    a, b = rng.randrange(10, 99), rng.randrange(10, 99)
    return f"{a}+{b}={a + b}"


def raw_calibration(placeholder: str = "", size: int = 64) -> list[dict]:
    """Six raw samples, images in four of them, text-only ones mixed in (so batches of 2 mix both kinds).

    `placeholder` (the family's full image prompt, e.g. start + image token + end) is put in front of the text of
    image samples; empty lets the library prepend `vision_start_token + image_token + vision_end_token` itself.
    """
    samples: list[dict] = []
    for i, with_image in enumerate((True, False, True, True, False, True)):
        if with_image:
            image, description = draw_scene(random.Random(i), size)
            samples.append({"image": image, "text": f"{placeholder}{QUESTIONS[i % len(QUESTIONS)]} {description}"})
        else:
            samples.append({"image": None, "text": _text_only(i)})
    return samples


def processed_inputs(processor: Any, placeholder: str, size: int = 64) -> dict:
    """The logits-comparison batch through the processor: row 0 an image and a question, row 1 text only."""
    texts = [f"{placeholder}{QUESTIONS[0]}", "no image in this row, only text."]
    return dict(processor(text=texts, images=[scene(100, size)], padding=True, return_tensors="pt"))


def text_inputs(tokenizer: Any) -> dict:
    """A two-row, padded text batch."""
    return dict(tokenizer(["the quick brown fox", "a b c"], padding=True, return_tensors="pt"))


def text_calibration() -> list[dict]:
    """Six raw text samples (the library runs a tokenizer on them like a processor with no images)."""
    return [{"text": f"{QUESTIONS[i % len(QUESTIONS)]} {_text_only(i)}"} for i in range(6)]


def pixels(image: Image.Image, size: int) -> torch.Tensor:
    """`image` resized to `size` x `size`, as a [3, size, size] float tensor normalised with mean 0.5, std 0.5."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1) - 0.5) / 0.5


def hand_batch(tokenizer: Any, rows: list[tuple[str, str]], pixel_values: torch.Tensor | None, **extra: Any) -> dict:
    """A left-padded batch from `(image prompt, text)` rows (the prompt's special tokens are already expanded)."""
    encoded = [tokenizer(prompt + text, add_special_tokens=False)["input_ids"] for prompt, text in rows]
    length = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    batch.update(extra)
    return batch


def _finish(model: Any) -> Any:
    """Eval mode and a generation config that pads with PAD and stops at EOS."""
    model.eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = None
    return model


# --------------------------------------------------------------------------------------------------------------
# Qwen3-VL-MoE
# --------------------------------------------------------------------------------------------------------------

QWEN3_VL_SPECIALS = {
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}
QWEN3_VL_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>"


def qwen3_vl_moe_model() -> Any:
    """Qwen3-VL-MoE: 2 MoE layers of 4 experts (top-2), a 2-block vision tower with deepstack at block 1."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    ids = special_token_ids(QWEN3_VL_SPECIALS)
    config = Qwen3VLMoeConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
            max_position_embeddings=512, **TEXT_IDS,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=8,
            temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[1],
        ),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"],
    )
    torch.manual_seed(0)
    return _finish(Qwen3VLMoeForConditionalGeneration(config))


def qwen3_vl_moe_processor() -> Any:
    """Qwen3-VL processor (image-only subclass) with the PIL Qwen2-VL image processor: 64 px -> 16 image tokens."""
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    )
    return ImageOnlyQwen3VLProcessor(image_processor, build_tokenizer(QWEN3_VL_SPECIALS), chat_template=chat_template(QWEN3_VL_PROMPT))


# --------------------------------------------------------------------------------------------------------------
# Qwen3-Omni-MoE (the thinker)
# --------------------------------------------------------------------------------------------------------------

QWEN3_OMNI_SPECIALS = {
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "audio_token": "<|audio_pad|>",
}
QWEN3_OMNI_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>"


def _qwen3_omni_processor_class() -> type:
    from transformers import Qwen3OmniMoeProcessor

    class ImageOnlyQwen3OmniMoeProcessor(Qwen3OmniMoeProcessor):
        """Qwen3-Omni's processor without the video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chat_template=None, **kwargs):
            # The parent's __init__ passes its four sub-processors positionally, but ProcessorMixin maps them onto
            # this signature's three: skip it and set what it sets.
            super(Qwen3OmniMoeProcessor, self).__init__(image_processor, feature_extractor, tokenizer, chat_template=chat_template)
            for name in ("image_token", "audio_token", "video_token", "image_token_id", "audio_token_id", "video_token_id",
                         "vision_bos_token", "vision_eos_token", "audio_bos_token", "audio_eos_token"):
                setattr(self, name, getattr(self.tokenizer, name))

        @property
        def model_input_names(self) -> list[str]:
            names = self.tokenizer.model_input_names + self.feature_extractor.model_input_names
            return list(dict.fromkeys(names + self.image_processor.model_input_names + ["feature_attention_mask"]))

    return ImageOnlyQwen3OmniMoeProcessor


def qwen3_omni_moe_model() -> Any:
    """Qwen3-Omni-MoE thinker: Qwen3-VL-like text/vision towers plus a 1-layer audio encoder (not exercised)."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    ids = special_token_ids(QWEN3_OMNI_SPECIALS)
    config = Qwen3OmniMoeThinkerConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
            max_position_embeddings=512, **TEXT_IDS,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1], "interleaved": True},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=8,
            temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[1],
        ),
        audio_config=dict(
            num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32, output_dim=32,
            downsample_hidden_size=8, n_window=8, n_window_infer=16, conv_chunksize=50, max_source_positions=64,
        ),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"], audio_token_id=ids["audio_token"],
        audio_start_token_id=ids["audio_bos_token"],
        # Not declared fields of the thinker config, but its M-RoPE index reads them (the hub configs carry them).
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
    )
    torch.manual_seed(0)
    return _finish(Qwen3OmniMoeThinkerForConditionalGeneration(config))


def qwen3_omni_moe_processor() -> Any:
    """Qwen3-Omni processor (image-only subclass), PIL Qwen2-VL image processor, a small Whisper feature extractor."""
    from transformers import Qwen2VLImageProcessorPil, WhisperFeatureExtractor

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    )
    feature_extractor = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, chunk_length=2, n_fft=400)
    return _qwen3_omni_processor_class()(
        image_processor, feature_extractor, build_tokenizer(QWEN3_OMNI_SPECIALS), chat_template=chat_template(QWEN3_OMNI_PROMPT)
    )


# --------------------------------------------------------------------------------------------------------------
# GLM-4.5V / 4.6V (glm4v_moe)
# --------------------------------------------------------------------------------------------------------------

GLM4V_SPECIALS = {
    "image_start_token": "<|begin_of_image|>",
    "image_end_token": "<|end_of_image|>",
    "image_token": "<|image|>",
    "video_start_token": "<|begin_of_video|>",
    "video_end_token": "<|end_of_video|>",
    "video_token": "<|video|>",
}
GLM4V_PROMPT = "<|begin_of_image|><|image|><|end_of_image|>"


def _glm4v_processor_class() -> type:
    from transformers import Glm4vProcessor

    class ImageOnlyGlm4vProcessor(Glm4vProcessor):
        """GLM-4V's processor without the video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyGlm4vProcessor


def glm4v_moe_model() -> Any:
    """GLM-4.5V: layer 0 dense, layer 1 MoE (4 routed experts top-2 + 1 shared), 2-block vision tower."""
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    ids = special_token_ids(GLM4V_SPECIALS)
    config = Glm4vMoeConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
            topk_group=1, first_k_dense_replace=1, n_shared_experts=1, max_position_embeddings=512, **TEXT_IDS,
            # head_dim 16 x partial_rotary_factor 0.5 / 2 = 4 = sum(mrope_section)
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8, image_size=64,
            temporal_patch_size=2, spatial_merge_size=2,
        ),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        image_start_token_id=ids["image_start_token"], image_end_token_id=ids["image_end_token"],
        video_start_token_id=ids["video_start_token"], video_end_token_id=ids["video_end_token"],
    )
    torch.manual_seed(0)
    return _finish(Glm4vMoeForConditionalGeneration(config))


def glm4v_moe_processor() -> Any:
    """GLM-4V processor (image-only subclass) with the PIL GLM-4V image processor: 64 px -> 16 image tokens."""
    from transformers import Glm4vImageProcessorPil

    # GLM-4V's pixel budget counts the temporal patch (2 frames per image) too.
    image_processor = Glm4vImageProcessorPil(
        patch_size=8, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 2 * 32 * 32, "longest_edge": 2 * 64 * 64}
    )
    return _glm4v_processor_class()(image_processor, build_tokenizer(GLM4V_SPECIALS), chat_template=chat_template(GLM4V_PROMPT))


# --------------------------------------------------------------------------------------------------------------
# ERNIE-4.5-VL-MoE
# --------------------------------------------------------------------------------------------------------------

ERNIE_SPECIALS = {
    "image_start_token": "<|IMAGE_START|>",
    "image_end_token": "<|IMAGE_END|>",
    "image_token": "<|IMAGE_PLACEHOLDER|>",
    "video_start_token": "<|VIDEO_START|>",
    "video_end_token": "<|VIDEO_END|>",
    "video_token": "<|VIDEO_PLACEHOLDER|>",
}
ERNIE_PROMPT = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"


def _ernie_processor_class() -> type:
    from transformers import Ernie4_5_VLMoeProcessor, ProcessorMixin

    class ImageOnlyErnie4_5_VLMoeProcessor(Ernie4_5_VLMoeProcessor):
        """ERNIE-4.5-VL's processor without the video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
            # The parent copies the video processor's font file first; there is no video processor here.
            return ProcessorMixin.save_pretrained(self, save_directory, push_to_hub, **kwargs)

    return ImageOnlyErnie4_5_VLMoeProcessor


def ernie4_5_vl_moe_model() -> Any:
    """ERNIE-4.5-VL: layer 0 dense, layer 1 with a text and a vision expert set (4 experts top-2 each) + 1 shared."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    ids = special_token_ids(ERNIE_SPECIALS)
    config = Ernie4_5_VLMoeConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, moe_intermediate_size=[32, 16], moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
            mlp_layer_types=["dense", "sparse"], max_position_embeddings=512, **TEXT_IDS,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
            temporal_merge_size=2,
        ),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        image_start_token_id=ids["image_start_token"], image_end_token_id=ids["image_end_token"],
        video_start_token_id=ids["video_start_token"], video_end_token_id=ids["video_end_token"],
    )
    torch.manual_seed(0)
    return _finish(Ernie4_5_VLMoeForConditionalGeneration(config))


def ernie4_5_vl_moe_processor() -> Any:
    """ERNIE processor (image-only subclass) with the PIL ERNIE image processor: 64 px -> 16 image tokens.

    It returns `mm_token_type_ids` (M-RoPE) and `moe_mm_token_type_ids` (routes image tokens, and the image
    start/end tokens, to the vision expert set).
    """
    from transformers import Ernie4_5_VLMoeImageProcessorPil

    image_processor = Ernie4_5_VLMoeImageProcessorPil(
        patch_size=8, merge_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    )
    return _ernie_processor_class()(image_processor, build_tokenizer(ERNIE_SPECIALS), chat_template=chat_template(ERNIE_PROMPT))


# --------------------------------------------------------------------------------------------------------------
# Aria
# --------------------------------------------------------------------------------------------------------------

ARIA_SPECIALS = {"image_token": "<|img|>"}
ARIA_PATCH, ARIA_IMAGE_SIZE, ARIA_QUERIES = 140, 980, 4  # AriaProcessor resizes to 980 px (490 only when asked per call)


def aria_model() -> Any:
    """Aria: 2 MoE layers (4 experts top-2 + 1 shared); 980 px / 140 px patches -> 49 patches -> 4 query tokens."""
    from transformers import AriaConfig, AriaForConditionalGeneration

    ids = special_token_ids(ARIA_SPECIALS)
    patches = (ARIA_IMAGE_SIZE // ARIA_PATCH) ** 2
    config = AriaConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1,
            max_position_embeddings=512, **TEXT_IDS,
        ),
        vision_config=dict(
            model_type="idefics3_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, image_size=ARIA_IMAGE_SIZE, patch_size=ARIA_PATCH,
        ),
        projector_patch_to_query_dict={patches: ARIA_QUERIES}, image_token_index=ids["image_token"],
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(0)
    return _finish(AriaForConditionalGeneration(config))


def aria_processor() -> Any:
    """Aria processor with the PIL Aria image processor (980 px, no splitting): 4 image tokens per image."""
    from transformers import AriaImageProcessorPil, AriaProcessor

    image_processor = AriaImageProcessorPil(max_image_size=ARIA_IMAGE_SIZE, min_image_size=ARIA_IMAGE_SIZE, split_image=False)
    return AriaProcessor(
        image_processor, build_tokenizer(ARIA_SPECIALS), chat_template=chat_template(ARIA_SPECIALS["image_token"]),
        size_conversion={490: ARIA_QUERIES, 980: ARIA_QUERIES},
    )


# --------------------------------------------------------------------------------------------------------------
# Llama 4 (no offline processor)
# --------------------------------------------------------------------------------------------------------------

LLAMA4_SPECIALS = {
    "image_start_token": "<|image_start|>",
    "image_end_token": "<|image_end|>",
    "image_token": "<|image|>",
    "patch_token": "<|patch|>",
}
LLAMA4_IMAGE_SIZE, LLAMA4_TOKENS_PER_IMAGE = 56, 4  # (56 / 14)^2 = 16 patches, pixel shuffle 0.5 -> 4 tokens


def llama4_model() -> Any:
    """Llama 4: layer 0 dense, layer 1 MoE (4 experts top-1 + shared expert); a 1-layer vision tower."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    ids = special_token_ids(LLAMA4_SPECIALS)
    config = Llama4Config(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=16, intermediate_size_mlp=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=2, attention_chunk_size=16, max_position_embeddings=512, **TEXT_IDS,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            image_size=LLAMA4_IMAGE_SIZE, patch_size=14, vision_output_dim=32, projector_input_dim=32,
            projector_output_dim=32,
        ),
        # Image features replace the <|patch|> tokens, so those are the placeholders (not <|image|>).
        image_token_index=ids["patch_token"], boi_token_index=ids["image_start_token"], eoi_token_index=ids["image_end_token"],
    )
    torch.manual_seed(0)
    return _finish(Llama4ForConditionalGeneration(config))


def _llama4_prompt() -> str:
    """Llama 4's prompt for a single-tile image."""
    return "<|image_start|><|image|>" + "<|patch|>" * LLAMA4_TOKENS_PER_IMAGE + "<|image_end|>"


def _llama4_batch(rows: list[tuple[Image.Image | None, str]]) -> dict:
    tokenizer = build_tokenizer(LLAMA4_SPECIALS)
    images = [pixels(image, LLAMA4_IMAGE_SIZE) for image, _ in rows if image is not None]
    pixel_values = torch.stack(images) if images else None
    return hand_batch(tokenizer, [(_llama4_prompt() if image is not None else "", text) for image, text in rows], pixel_values)


def llama4_calibration(_processor: Any = None) -> list[dict]:
    """Six processed samples (one row each): four with a 56 px single-tile image, two text only."""
    return [
        _llama4_batch([(sample["image"], sample["text"])]) for sample in raw_calibration(size=LLAMA4_IMAGE_SIZE)
    ]


def llama4_inputs(_processor: Any = None) -> dict:
    """Row 0 an image and a question, row 1 text only (left-padded)."""
    return _llama4_batch([(scene(100, LLAMA4_IMAGE_SIZE), QUESTIONS[0]), (None, "no image in this row, only text.")])


# --------------------------------------------------------------------------------------------------------------
# InternVL 3.5 with a Qwen3-MoE language model
# --------------------------------------------------------------------------------------------------------------

INTERNVL_SPECIALS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
INTERNVL_IMAGE_SIZE, INTERNVL_TOKENS_PER_IMAGE = 56, 4  # 16 patches of 14 px, pixel shuffle 0.5 -> 4 tokens


def internvl_model() -> Any:
    """InternVL with a Qwen3-MoE language model (2 MoE layers, 4 experts top-2) and a 1-layer vision tower."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    ids = special_token_ids(INTERNVL_SPECIALS)
    config = InternVLConfig(
        text_config=dict(
            model_type="qwen3_moe", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512, **TEXT_IDS,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=INTERNVL_IMAGE_SIZE, patch_size=14,
        ),
        image_token_id=ids["context_image_token"], image_seq_length=INTERNVL_TOKENS_PER_IMAGE,
    )
    torch.manual_seed(0)
    return _finish(InternVLForConditionalGeneration(config))


def _internvl_processor_class() -> type:
    from transformers import InternVLProcessor

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        """InternVL's processor without the video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length, chat_template=chat_template, **kwargs)

    return ImageOnlyInternVLProcessor


def internvl_processor() -> Any:
    """InternVL processor (image-only subclass) with the PIL GOT-OCR2 image processor, one 56 px tile per image."""
    from transformers import GotOcr2ImageProcessorPil

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_IMAGE_SIZE, "width": INTERNVL_IMAGE_SIZE}, crop_to_patches=False, max_patches=1
    )
    return _internvl_processor_class()(
        image_processor, build_tokenizer(INTERNVL_SPECIALS), image_seq_length=INTERNVL_TOKENS_PER_IMAGE,
        chat_template=chat_template(INTERNVL_SPECIALS["context_image_token"]),
    )


# --------------------------------------------------------------------------------------------------------------
# Kimi-K2.5 (DeepSeek-V3 language model; no offline processor)
# --------------------------------------------------------------------------------------------------------------

KIMI_SPECIALS = {
    "media_begin_token": "<|media_begin|>",
    "media_content_token": "<|media_content|>",
    "media_end_token": "<|media_end|>",
    "image_token": "<|media_pad|>",
    "video_token": "<|kimi_k25_video_placeholder|>",
}
KIMI_PATCH, KIMI_IMAGE_SIZE = 14, 56  # a 4 x 4 patch grid, merged 2 x 2 -> 4 image tokens


def kimi_k25_model() -> Any:
    """Kimi-K2.5: DeepSeek-V3 LM (layer 0 dense, layer 1 MoE: 4 routed experts top-2 + 1 shared), MoonViT tower."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    ids = special_token_ids(KIMI_SPECIALS)
    config = Kimi_K25Config(
        text_config=dict(
            model_type="deepseek_v3", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
            n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=512, **TEXT_IDS,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=KIMI_PATCH,
            pos_emb_height=8, pos_emb_width=8, pos_emb_time=2,
        ),
        projection_hidden_size=32,  # must equal vision_config.hidden_size
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["media_begin_token"], vision_end_token_id=ids["media_end_token"],
    )
    torch.manual_seed(0)
    return _finish(Kimi_K25ForConditionalGeneration(config))


def _kimi_patches(image: Image.Image) -> tuple[torch.Tensor, list[int]]:
    """Kimi's pixel layout: row-major [grid_h * grid_w, 3, patch, patch] patches and the [t, h, w] grid."""
    grid = KIMI_IMAGE_SIZE // KIMI_PATCH
    image_tensor = pixels(image, KIMI_IMAGE_SIZE)  # [3, H, W]
    patches = image_tensor.reshape(3, grid, KIMI_PATCH, grid, KIMI_PATCH).permute(1, 3, 0, 2, 4)
    return patches.reshape(grid * grid, 3, KIMI_PATCH, KIMI_PATCH), [1, grid, grid]


def _kimi_batch(rows: list[tuple[Image.Image | None, str]]) -> dict:
    tokenizer = build_tokenizer(KIMI_SPECIALS)
    tokens_per_image = (KIMI_IMAGE_SIZE // KIMI_PATCH) ** 2 // 4
    prompt = "<|media_begin|>image<|media_content|>" + "<|media_pad|>" * tokens_per_image + "<|media_end|>"
    patches, grids = [], []
    for image, _ in rows:
        if image is not None:
            values, grid = _kimi_patches(image)
            patches.append(values)
            grids.append(grid)
    extra = {"image_grid_thw": torch.tensor(grids)} if grids else {}
    return hand_batch(
        tokenizer, [(prompt if image is not None else "", text) for image, text in rows],
        torch.cat(patches) if patches else None, **extra,
    )


def kimi_k25_calibration(_processor: Any = None) -> list[dict]:
    """Six processed samples (one row each): four with a 56 px image (16 patches, 4 tokens), two text only."""
    return [_kimi_batch([(sample["image"], sample["text"])]) for sample in raw_calibration(size=KIMI_IMAGE_SIZE)]


def kimi_k25_inputs(_processor: Any = None) -> dict:
    """Row 0 an image and a question, row 1 text only (left-padded)."""
    return _kimi_batch([(scene(100, KIMI_IMAGE_SIZE), QUESTIONS[0]), (None, "no image in this row, only text.")])


# --------------------------------------------------------------------------------------------------------------
# Text-only families
# --------------------------------------------------------------------------------------------------------------


def text_tokenizer() -> Any:
    """The character-level tokenizer with no special tokens besides eos/pad (the text-only families' processor)."""
    return build_tokenizer({})


def qwen3_moe_model() -> Any:
    """Qwen3-MoE: 2 MoE layers, 4 experts top-2, no shared experts."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=512, **TEXT_IDS,
    )
    torch.manual_seed(0)
    return _finish(Qwen3MoeForCausalLM(config))


def mixtral_model() -> Any:
    """Mixtral: 2 MoE layers, 4 experts top-2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        **TEXT_IDS,
    )
    torch.manual_seed(0)
    return _finish(MixtralForCausalLM(config))


def olmoe_model() -> Any:
    """OLMoE: 2 MoE layers, 4 experts top-2."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=512, **TEXT_IDS,
    )
    torch.manual_seed(0)
    return _finish(OlmoeForCausalLM(config))


def deepseek_v3_model() -> Any:
    """DeepSeek-V3: layer 0 dense, layer 1 MoE with 8 routed experts in 4 groups (top-2 groups, top-2 experts) + 1 shared."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=512, **TEXT_IDS,
    )
    torch.manual_seed(0)
    return _finish(DeepseekV3ForCausalLM(config))


def gpt_oss_model() -> Any:
    """GPT-OSS: 2 MoE layers (4 experts top-2, biased, interleaved gate/up), sliding + full attention with sinks."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        **TEXT_IDS,
    )
    torch.manual_seed(0)
    model = GptOssForCausalLM(config)
    with torch.no_grad():  # the init zeroes the expert biases: make them matter, and large enough that the gate's
        for layer in model.model.layers:  # clamp at swiglu_limit (7) cuts some values
            layer.mlp.experts.gate_up_proj_bias.normal_(0.0, 4.0)
            layer.mlp.experts.down_proj_bias.normal_(0.0, 0.1)
    return _finish(model)


# --------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------


def _multimodal(name: str, model_class: str, make_model: Callable, make_processor: Callable, prompt: str, *, size: int = 64,
                library_prompt: bool = False, notes: str = "") -> Family:
    """A multimodal family with an offline processor: raw calibration samples and a processed input batch.

    `library_prompt`: let the library prepend the image placeholder (its `vision_start_token + image_token +
    vision_end_token` is the family's prompt); otherwise the samples carry `prompt` themselves.
    """
    import transformers

    return Family(
        name=name, multimodal=True, model_class=getattr(transformers, model_class), make_model=make_model,
        make_processor=make_processor,
        calibration=lambda processor: raw_calibration("" if library_prompt else prompt, size),
        inputs=lambda processor: processed_inputs(processor, prompt, size), pipeline=True, notes=notes,
    )


def _text(name: str, model_class: str, make_model: Callable, notes: str = "") -> Family:
    """A text-only family: the tokenizer is its processor; raw text samples."""
    import transformers

    return Family(
        name=name, multimodal=False, model_class=getattr(transformers, model_class), make_model=make_model,
        make_processor=text_tokenizer, calibration=lambda processor: text_calibration(),
        inputs=lambda processor: text_inputs(processor), pipeline=False, notes=notes,
    )


def _build_families() -> dict[str, Family]:
    import transformers

    families = [
        _multimodal("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", qwen3_vl_moe_model, qwen3_vl_moe_processor,
                    QWEN3_VL_PROMPT, library_prompt=True,
                    notes="Image inputs need `mm_token_type_ids` (M-RoPE), which the processor returns."),
        _multimodal("qwen3_omni_moe", "Qwen3OmniMoeThinkerForConditionalGeneration", qwen3_omni_moe_model,
                    qwen3_omni_moe_processor, QWEN3_OMNI_PROMPT,
                    notes="The thinker only; its config must name `vision_start_token_id` (not a declared field) for "
                    "M-RoPE, and the processor calls the vision markers `vision_bos_token`/`vision_eos_token`."),
        _multimodal("glm4v_moe", "Glm4vMoeForConditionalGeneration", glm4v_moe_model, glm4v_moe_processor, GLM4V_PROMPT,
                    notes="`mrope_section` sums to head_dim * partial_rotary_factor / 2; layer 0 is dense."),
        _multimodal("ernie4_5_vl_moe", "Ernie4_5_VLMoeForConditionalGeneration", ernie4_5_vl_moe_model,
                    ernie4_5_vl_moe_processor, ERNIE_PROMPT,
                    notes="Image tokens reach the vision expert set only with `moe_mm_token_type_ids` (the processor "
                    "returns it); without it every token goes to the text experts."),
        _multimodal("aria", "AriaForConditionalGeneration", aria_model, aria_processor, ARIA_SPECIALS["image_token"],
                    size=64, library_prompt=True,
                    notes="AriaProcessor resizes every image to 980 px (its image processor takes only 490 or 980), so the "
                    "projector's patch-to-query map is keyed by the 980 px patch count; the router is `mlp.router`."),
        Family(
            name="llama4", multimodal=True, model_class=transformers.Llama4ForConditionalGeneration, make_model=llama4_model,
            make_processor=None, calibration=llama4_calibration, inputs=llama4_inputs, pipeline=False,
            notes="No processor (its image processor needs torchvision); `Llama4ForConditionalGeneration.forward` raises "
            "AttributeError ('image_outputs') at its return in transformers 5.24 (upstream bug), so the top-level "
            "forward and generate fail, with or without images; `model.language_model` alone works.",
        ),
        _multimodal("internvl", "InternVLForConditionalGeneration", internvl_model, internvl_processor,
                    INTERNVL_SPECIALS["context_image_token"], size=64, library_prompt=True,
                    notes="The language model is a Qwen3-MoE built from `text_config`."),
        Family(
            name="kimi_k25", multimodal=True, model_class=transformers.Kimi_K25ForConditionalGeneration,
            make_model=kimi_k25_model, make_processor=None, calibration=kimi_k25_calibration, inputs=kimi_k25_inputs,
            pipeline=False,
            notes="No processor (its image processor needs torchvision); `projection_hidden_size` must equal the vision "
            "hidden size.",
        ),
        _text("qwen3_moe", "Qwen3MoeForCausalLM", qwen3_moe_model),
        _text("mixtral", "MixtralForCausalLM", mixtral_model),
        _text("olmoe", "OlmoeForCausalLM", olmoe_model),
        _text("deepseek_v3", "DeepseekV3ForCausalLM", deepseek_v3_model,
              notes="Group-limited routing: 8 experts in 4 groups; layer 0 is dense."),
        _text("gpt_oss", "GptOssForCausalLM", gpt_oss_model,
              notes="Experts are transposed, biased and gate/up interleaved; the router is `mlp.router`."),
    ]
    return {family.name: family for family in families}


FAMILIES: dict[str, Family] = _build_families()
