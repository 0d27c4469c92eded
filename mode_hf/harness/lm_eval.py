"""lm-evaluation-harness with mode checkpoints: `mode-hf-lm-eval ARGS` is `lm_eval ARGS` after `import mode_hf`.

    mode-hf-lm-eval --model hf --model_args pretrained=CKPT --tasks ...          # a text MoE checkpoint
    mode-hf-lm-eval --model mode-hf --model_args pretrained=CKPT --tasks ...     # also an image-text-to-text one

lm-eval 0.4.13 has no plug-in mechanism (its registry never reads entry points), and its `hf` model reads
config.json's quantization_config itself, so without mode-hf imported a mode checkpoint stops with "Unknown
quantization type, got mode". The model "mode-hf" is lm-eval's `HFLM` that loads a checkpoint whose config is
an image-text-to-text model (the bundled Qwen3-VL-MoE) with AutoModelForImageTextToText, for text tasks.
"""

from __future__ import annotations

import sys

MODEL_NAME = "mode-hf"


def register() -> None:
    """Register the quantization method (import mode_hf) and the model "mode-hf" with lm-eval; idempotent."""
    import lm_eval.models  # noqa: F401 - the built-in models first: lm-eval fills an empty registry lazily
    import transformers
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.models.huggingface import HFLM

    import mode_hf  # noqa: F401 - registers "mode" with transformers

    if MODEL_NAME in MODEL_REGISTRY:
        return

    @register_model(MODEL_NAME)
    class ModeHFLM(HFLM):
        """HFLM for mode checkpoints: AutoModelForImageTextToText where the config is an image-text-to-text model."""

        def __init__(self, pretrained: object, **kwargs: object) -> None:
            if isinstance(pretrained, str):
                config = transformers.AutoConfig.from_pretrained(pretrained)
                vision = type(config) in transformers.AutoModelForImageTextToText._model_mapping
                self.AUTO_MODEL_CLASS = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
            super().__init__(pretrained, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line, after `register()`."""
    register()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    result = cli_evaluate()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
