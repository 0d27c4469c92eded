"""vLLM's Qwen3-VL(-MoE) without torchvision (vLLM's CPU build from the registry has no usable torchvision).

Two things stop it, both imports rather than computation:

1. vLLM's `qwen3_vl.py` imports `smart_resize` from transformers' `image_processing_qwen2_vl`, which imports
   torchvision at module level; transformers' PIL image processor module has the same `smart_resize`. That module
   name is pointed at the PIL one before vLLM imports the model.
2. vLLM builds the processor with `Qwen3VLProcessor.from_pretrained(model)`, which also builds a video processor
   (torchvision again, and a `video_preprocessor_config.json` that image-only checkpoints such as mode-hf's bundled
   model do not have). When that fails, the processing info gets an image-only `Qwen3VLProcessor` (the PIL image
   processor and the tokenizer) and reports images as the only modality; its dummy inputs for vLLM's memory
   profiling are images only (vLLM's builder asks the video processor even when no video is allowed).

`apply()` does both, once per process, and only where torchvision cannot be imported; it is called by the
plugin's `register` (every vLLM process). With torchvision present nothing changes.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

IMAGE_PROCESSOR_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_applied = False


def torchvision_missing() -> bool:
    try:
        importlib.import_module("torchvision")
    except Exception:  # absent, or a CUDA build that fails to import on this machine
        sys.modules.pop("torchvision", None)
        return True
    return False


def apply() -> bool:
    """Patch vLLM's Qwen3-VL processing for a machine without torchvision; returns whether it did."""
    global _applied
    if _applied:
        return True
    if not torchvision_missing():
        return False
    if IMAGE_PROCESSOR_MODULE not in sys.modules:
        sys.modules[IMAGE_PROCESSOR_MODULE] = importlib.import_module("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    _patch_processing_info()
    _applied = True
    return True


def _patch_processing_info() -> None:
    from typing import get_type_hints

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl import Qwen3VLProcessor
    from vllm.model_executor.models import qwen3_vl

    class ImageOnlyProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor without a video processor (ProcessorMixin does not insist on one)."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    info = qwen3_vl.Qwen3VLProcessingInfo
    get_hf_processor, get_limits = info.get_hf_processor, info.get_supported_mm_limits
    get_kwargs, get_max_tokens = info.get_supported_mm_processor_kwargs, info.get_mm_max_tokens_per_item

    def hf_processor(self: Any, **kwargs: Any) -> Any:
        if getattr(self, "_mode_image_only", None) is None:
            try:
                return get_hf_processor(self, **kwargs)
            except (OSError, ImportError, ValueError):
                model = self.ctx.model_config.model
                self._mode_image_only = ImageOnlyProcessor(Qwen2VLImageProcessorPil.from_pretrained(model), self.ctx.tokenizer)
        return self._mode_image_only

    def image_only(self: Any) -> bool:
        return isinstance(hf_processor(self), ImageOnlyProcessor)

    def limits(self: Any) -> Any:
        return {"image": None} if image_only(self) else get_limits(self)

    def processor_kwargs(self: Any) -> Any:
        if not image_only(self):
            return get_kwargs(self)
        processor = hf_processor(self)
        hints = get_type_hints(processor.valid_processor_kwargs)
        return {"text_kwargs": set(hints["text_kwargs"].__annotations__),
                "images_kwargs": set(processor.image_processor.valid_kwargs.__annotations__)}

    def max_tokens(self: Any, seq_len: int, mm_counts: Any) -> Any:
        return {"image": self.get_max_image_tokens()} if image_only(self) else get_max_tokens(self, seq_len, mm_counts)

    builder = qwen3_vl.Qwen3VLDummyInputsBuilder
    get_dummy_data = builder.get_dummy_mm_data

    def dummy_data(self: Any, seq_len: int, mm_counts: Any, mm_options: Any) -> Any:
        # vLLM's memory profiling builds a dummy video even when no video is allowed, through the video processor
        if not image_only(self.info):
            return get_dummy_data(self, seq_len, mm_counts, mm_options)
        width, height = self.info.get_image_size_with_most_features()
        return {"image": self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}

    builder.get_dummy_mm_data = dummy_data
    info.get_hf_processor = hf_processor
    info.get_supported_mm_limits = limits
    info.get_supported_mm_processor_kwargs = processor_kwargs
    info.get_mm_max_tokens_per_item = max_tokens
