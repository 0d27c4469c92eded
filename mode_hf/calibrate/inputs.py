"""Calibration inputs: samples turned into model-input batches, the image/video placeholder ids found wherever the
family keeps them, and the text / vision token masks of a batch. No transformers import.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..algo.statistics import modality_masks
from ..errors import CalibrationDataError

logger = logging.getLogger(__name__)

VISION_ID_KEYS = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")
INPUT_KEYS_USED = ("input_ids", "attention_mask", "mm_token_type_ids")


def vision_token_ids(model_config: Any, processor: Any = None) -> list[int]:
    """The image/video placeholder token ids, wherever the family keeps them (see `vision_token_source`)."""
    return vision_token_source(model_config, processor)[0]


def vision_token_source(model_config: Any, processor: Any = None) -> tuple[list[int], str]:
    """The image/video placeholder token ids and where they were found (e.g. "config.thinker_config.image_token_id").

    The model config is authoritative: its top level, `text_config` and `thinker_config` (Qwen3-Omni), under
    `image_token_id` / `video_token_id` / `image_token_index` / `video_token_index` (Llama4, Aria). Only when the config
    names none is the processor asked: its `*_token_id` attributes, else its `image_token` / `video_token` strings
    looked up in its tokenizer. (Llama4's processor calls a one-per-image marker its image token; the config's
    `image_token_index` is the placeholder that image features replace.) ([], "") when nothing names one.
    """
    sources = {"config": model_config}
    sources.update({f"config.{key}": getattr(model_config, key, None) for key in ("text_config", "thinker_config")})
    found, where = _ids_from(sources)
    if found or processor is None:
        return found, where
    found, where = _ids_from({"processor": processor, "processor.tokenizer": getattr(processor, "tokenizer", None)})
    tokenizer = getattr(processor, "tokenizer", processor)
    for key in ("image_token", "video_token"):
        token = getattr(processor, key, None)
        if isinstance(token, str) and hasattr(tokenizer, "convert_tokens_to_ids"):
            value = tokenizer.convert_tokens_to_ids(token)
            if isinstance(value, int) and value != getattr(tokenizer, "unk_token_id", None) and value not in found:
                found.append(value)
                where = where or f"processor.{key}"
    return found, where


def _ids_from(sources: Mapping[str, Any]) -> tuple[list[int], str]:
    found: list[int] = []
    where = ""
    for prefix, source in sources.items():
        for key in VISION_ID_KEYS:
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, int) and value >= 0 and value not in found:
                found.append(value)
                where = where or f"{prefix}.{key}"
    return found, where


def _images_of(sample: Mapping[str, Any]) -> list[Any]:
    images = sample.get("image", sample.get("images"))
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _prompt(sample: Mapping[str, Any], processor: Any) -> str:
    """The sample's text with one image placeholder per image when the text has none."""
    text, images = sample["text"], _images_of(sample)
    image_token = getattr(processor, "image_token", None)
    if not images or (image_token and image_token in text):
        return text
    if image_token is None:
        raise CalibrationDataError("the processor has no `image_token`: put the image placeholders in the text yourself.")
    start, end = getattr(processor, "vision_start_token", ""), getattr(processor, "vision_end_token", "")
    return "".join(f"{start}{image_token}{end}" for _ in images) + text


def _no_pixels(processor: Any, first: int, last: int) -> CalibrationDataError:
    return CalibrationDataError(
        f"calibration samples {first}..{last} have images, but the processor ({type(processor).__name__}) produced "
        "no pixel_values: the images would never reach the vision tower. It is not the model's multimodal processor "
        "(AutoProcessor falls back to the tokenizer when it cannot build the processor class): pass the model's "
        "processor; for a model without a vision tower, calibrate on text-only samples (no image)."
    )


def _process_raw(samples: Sequence[Mapping[str, Any]], processor: Any, first_index: int) -> dict[str, torch.Tensor]:
    images = [image for sample in samples for image in _images_of(sample)]
    last = first_index + len(samples) - 1
    if images and getattr(processor, "image_processor", None) is None:
        raise _no_pixels(processor, first_index, last)
    texts = [_prompt(sample, processor) for sample in samples]
    try:
        batch = dict(processor(text=texts, images=images or None, padding=True, return_tensors="pt"))
    except Exception as error:  # the processor's own message is the useful part
        raise CalibrationDataError(f"the processor failed on calibration samples {first_index}..{last}: {error}") from error
    if images and not has_vision([batch]):
        raise _no_pixels(processor, first_index, last)
    return batch


def build_batches(
    samples: Sequence[Mapping[str, Any]],
    processor: Any,
    batch_size: int,
    num_samples: int | None = None,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Model-input batches from calibration samples.

    Raw samples (`{"image": ..., "text": ...}`) are grouped `batch_size` at a time and run through the processor
    (padding on). Processor outputs (dicts with `input_ids`) are used as they are, one batch each. When
    `num_samples` is smaller than the data, a seeded random subset is taken.

    Raises:
        CalibrationDataError: a sample the processor rejects, or a processed sample with malformed tensors.
    """
    order = list(range(len(samples)))
    if num_samples is not None and num_samples < len(order):
        order = sorted(random.Random(seed).sample(order, num_samples))
    batches: list[dict[str, torch.Tensor]] = []
    raw = [i for i in order if "text" in samples[i]]
    for start in tqdm(range(0, len(raw), batch_size), desc="mode-hf calibration samples", unit="batch", disable=not raw):
        chunk = raw[start : start + batch_size]
        batches.append(_process_raw([samples[i] for i in chunk], processor, chunk[0]))
    for i in order:
        if "text" not in samples[i]:
            batches.append(_as_batch(samples[i], i))
    for batch, where in zip(batches, _batch_sources(samples, order, batch_size)):
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CalibrationDataError(f"{where}: {key} holds NaN or inf; fix or drop that sample.")
    return batches


def _batch_sources(samples: Sequence[Mapping[str, Any]], order: Sequence[int], batch_size: int) -> list[str]:
    """Which samples each batch of `build_batches` holds, for messages: raw ones batch_size at a time, then each
    processed one."""
    raw = [i for i in order if "text" in samples[i]]
    sources = [f"calibration samples {raw[s]}..{raw[min(s + batch_size, len(raw)) - 1]}" for s in range(0, len(raw), batch_size)]
    return sources + [f"calibration[{i}]" for i in order if "text" not in samples[i]]


def _as_batch(sample: Mapping[str, Any], index: int) -> dict[str, torch.Tensor]:
    batch = {k: torch.as_tensor(v) if not isinstance(v, torch.Tensor) and k in INPUT_KEYS_USED else v for k, v in sample.items()}
    if batch["input_ids"].dim() == 1:
        batch = {k: v.unsqueeze(0) if isinstance(v, torch.Tensor) and k in INPUT_KEYS_USED else v for k, v in batch.items()}
    if batch["input_ids"].dim() != 2:
        raise CalibrationDataError(f"calibration[{index}]['input_ids'] must be [batch, seq], got {tuple(batch['input_ids'].shape)}.")
    return batch


def has_vision(batches: Sequence[Mapping[str, torch.Tensor]]) -> bool:
    """Whether any batch carries image or video inputs."""
    return any(batch.get("pixel_values") is not None or batch.get("pixel_values_videos") is not None for batch in batches)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of `batch` moved to `device`."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class BatchMasks:
    """Token masks of one calibration batch, flattened to [T] in the order the expert sets see tokens."""

    text: torch.Tensor
    vision: torch.Tensor
    vision_2d: torch.Tensor  # [B, S], for the per-image redundancy filter


def batch_masks(batch: dict, vision_ids: Sequence[int]) -> BatchMasks:
    """The token masks of a model-input batch."""
    text, vision = modality_masks(batch["input_ids"], batch.get("attention_mask"), batch.get("mm_token_type_ids"), vision_ids)
    return BatchMasks(text.reshape(-1), vision.reshape(-1), vision)
