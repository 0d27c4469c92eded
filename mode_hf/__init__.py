"""mode-hf: MODE expert-level mixed-precision quantization for Mixture-of-Experts (multimodal) LLMs, through the
transformers quantizer API.

    import mode_hf
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=mode_hf.ModeConfig(avg_bits=3.0, ...))

Importing the package registers the quantization method "mode" with transformers (idempotent); it must happen
before loading a mode checkpoint.
"""

from __future__ import annotations

from .allocation import InfeasibleBudgetError
from .calibration import CalibrationDataError
from .calibration_data import load_calibration
from .config import ModeConfig, ModeConfigError
from .experts import UnsupportedModelError
from .hf_quantizer import ModeHfQuantizer
from .hub import CheckpointError, from_pretrained, push_folder, push_to_hub, render_model_card, verify_quantized, write_model_card
from .packed import PackedExperts

__version__ = "0.1.0"
METHOD_NAME = "mode"


def register() -> None:
    """Register `ModeConfig` and `ModeHfQuantizer` under "mode" with transformers; safe to call repeatedly.

    Raises:
        RuntimeError: another library already registered a different quantization method called "mode".
    """
    from transformers.quantizers import auto

    for mapping, cls in ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, ModeConfig), (auto.AUTO_QUANTIZER_MAPPING, ModeHfQuantizer)):
        existing = mapping.get(METHOD_NAME)
        if existing is not None and not existing.__module__.startswith("mode_hf"):
            raise RuntimeError(f"quantization method {METHOD_NAME!r} is already registered by {existing.__module__}.")
        mapping[METHOD_NAME] = cls  # a re-imported mode_hf replaces its own stale class


register()

__all__ = [
    "CalibrationDataError",
    "CheckpointError",
    "InfeasibleBudgetError",
    "ModeConfig",
    "ModeConfigError",
    "ModeHfQuantizer",
    "PackedExperts",
    "UnsupportedModelError",
    "from_pretrained",
    "load_calibration",
    "push_folder",
    "push_to_hub",
    "register",
    "render_model_card",
    "verify_quantized",
    "write_model_card",
]
