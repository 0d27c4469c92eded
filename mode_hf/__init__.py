"""mode-hf: MODE expert-level mixed-precision quantization for Mixture-of-Experts (multimodal) LLMs, through the
transformers quantizer API.

    import mode_hf
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=mode_hf.ModeConfig(avg_bits=3.0, ...))

Importing the package registers the quantization method "mode" with transformers (idempotent); it must happen
before loading a mode checkpoint. It also registers the bundled models' image-only processor with AutoProcessor.

Layout (docs/architecture.md): `algo/` pure tensor algorithms, `model/` family adapters and packed modules,
`calibrate/` calibration passes, `methods.py` the method registry, `pipeline.py` the order of the stages,
`convert.py` quantize-pack-swap, `hf/` the transformers and Hub layer, `bench/` the bundled models and tasks.
"""

from __future__ import annotations

from .bench import processor as _bench_processor
from .calibrate.sources import load_calibration
from .config import ModeConfig, QuantizedModeConfig
from .errors import (
    CalibrationDataError, CheckpointError, ExportError, InfeasibleBudgetError, ModeConfigError, ModeError,
    UnsupportedModelError, UsageError, WeightsError,
)
from .hf.card import render_model_card, write_model_card
from .hf.checkpoint import from_pretrained, verify_quantized
from .hf.hub import push_folder, push_to_hub
from .hf.quantizer import ModeHfQuantizer, install_requantize_check
from .model.packed import PackedExperts, PackedLinear

__version__ = "0.1.0"
METHOD_NAME = "mode"


def register() -> None:
    """Register `QuantizedModeConfig` (what config.json's "mode" quantization_config becomes) and `ModeHfQuantizer`
    under "mode" with transformers, the check that refuses new options for a mode checkpoint naming its base model
    (`install_requantize_check`), and the bundled processor with AutoProcessor; safe to call repeatedly.

    Raises:
        RuntimeError: another library already registered a different quantization method called "mode".
    """
    from transformers.quantizers import auto

    for mapping, cls in ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QuantizedModeConfig), (auto.AUTO_QUANTIZER_MAPPING, ModeHfQuantizer)):
        existing = mapping.get(METHOD_NAME)
        if existing is not None and not existing.__module__.startswith("mode_hf"):
            raise RuntimeError(f"quantization method {METHOD_NAME!r} is already registered by {existing.__module__}.")
        mapping[METHOD_NAME] = cls  # a re-imported mode_hf replaces its own stale class
    install_requantize_check()
    _bench_processor.register()


register()

__all__ = [
    "CalibrationDataError",
    "CheckpointError",
    "ExportError",
    "InfeasibleBudgetError",
    "ModeConfig",
    "ModeConfigError",
    "ModeError",
    "ModeHfQuantizer",
    "PackedExperts",
    "PackedLinear",
    "UnsupportedModelError",
    "UsageError",
    "WeightsError",
    "from_pretrained",
    "load_calibration",
    "push_folder",
    "push_to_hub",
    "register",
    "render_model_card",
    "verify_quantized",
    "write_model_card",
]
