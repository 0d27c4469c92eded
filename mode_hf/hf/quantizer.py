"""`ModeHfQuantizer`: the thin transformers layer over the pipeline (`mode_hf.pipeline`).

From-scratch quantization (`from_pretrained(path, quantization_config=ModeConfig(...))`): the calibration data is
turned into model inputs and the plan is checked before any weight loads; the work itself runs in
`_process_model_after_weight_loading`, like transformers' own GPTQ. Loading a mode checkpoint: the packed experts
modules are built on the meta device from the bit map in config.json, and the loader fills them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from .. import methods
from ..calibrate.inputs import build_batches
from ..config import ModeConfig, QuantizedModeConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..model.packed import PackedExperts, PackedLinear
from ..model.structure import find_expert_sets
from ..pipeline import check_plan, quantize_model
from .checkpoint import (
    already_quantized_message, check_all_sets_packed, check_loaded_from_checkpoint, check_packed_values, install_save_hooks,
)
from .engines import set_engine_config_keys
from .guard import EXPERT_WEIGHTS, ignored_on_load

logger = logging.getLogger(__name__)


def install_requantize_check() -> None:
    """Make `from_pretrained(mode checkpoint, quantization_config=ModeConfig(...))` name the base model to start
    from. transformers merges the checkpoint's quantization_config with the one passed by comparing their class
    names (`AutoHfQuantizer.merge_quantization_configs`), which refuses the call (QuantizedModeConfig vs ModeConfig)
    but says nothing of what to do; this wraps that merge to raise CheckpointError with the base model recorded in
    the checkpoint's summary. Every other merge goes to transformers unchanged. Calling it again wraps
    transformers' own merge anew (a re-imported mode_hf replaces its stale wrapper, as `register` does its classes)."""
    from transformers.quantizers.auto import AutoHfQuantizer

    merge = AutoHfQuantizer.merge_quantization_configs
    original = getattr(merge, "_mode_hf_original", merge.__func__)

    def merge_or_refuse(cls: type, quantization_config: Any, quantization_config_from_args: Any) -> Any:
        stored = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
                  else getattr(quantization_config, "quant_method", None))
        passed = quantization_config_from_args
        if stored == "mode" and isinstance(passed, ModeConfig) and not isinstance(passed, QuantizedModeConfig):
            raise CheckpointError(already_quantized_message(quantization_config))
        return original(cls, quantization_config, quantization_config_from_args)

    merge_or_refuse._mode_hf_original = original  # type: ignore[attr-defined]
    AutoHfQuantizer.merge_quantization_configs = classmethod(merge_or_refuse)


class ModeHfQuantizer(HfQuantizer):
    """Quantize-on-load and load-quantized for MODE (per-expert mixed precision)."""

    requires_calibration = False

    def __init__(self, quantization_config: ModeConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            # Work on a copy: the user's config object stays reusable, and the result lands on this one.
            self.quantization_config = quantization_config.without_result()
        self._batches: list[dict] | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.pre_quantized:
            return
        import cvxpy

        if methods.METHODS[self.quantization_config.method].allocates and "HIGHS" not in cvxpy.installed_solvers():
            raise ImportError("mode-hf allocates bits with cvxpy's HiGHS MILP solver: pip install highspy")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        config = self.quantization_config
        if self.pre_quantized:
            if not config.bit_map:
                raise CheckpointError("this checkpoint's quantization_config has no bit_map: it is not a mode-hf checkpoint.")
            swap_in_packed(model, config)
            packed = [*config.bit_map, *(config.dense_map or {})]
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignored_on_load(packed)
            return model
        if config.calibration is not None:
            with torch.device("cpu"):  # the model is being built under a meta-device context
                self._batches = build_batches(
                    config.calibration, config.processor, config.batch_size, config.num_samples, config.seed
                )
        check_plan(model, config, self._batches)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        config = self.quantization_config
        if self.pre_quantized:
            for name, module in model.named_modules():
                if isinstance(module, (PackedExperts, PackedLinear)):
                    check_loaded_from_checkpoint(name, module)
                    check_packed_values(name, module)
        else:
            was_training = model.training
            model.eval()
            result = quantize_model(model, config, self._batches or [])
            model.train(was_training)
            result.summary["base_model"] = getattr(model.config, "_name_or_path", None) or None
            config.bit_map, config.dense_map, config.summary = result.bit_map, result.dense_map, result.summary
            config.calibration = config.processor = None  # drop runtime objects: nothing big stays referenced
            set_engine_config_keys(model.config)  # written by save_pretrained, read by vLLM (mode_hf.serve.vllm)
            self._batches = None
        install_save_hooks(model)
        return model

    def update_weight_conversions(self, weight_conversions: list, model: nn.Module) -> list:
        """Loading a mode checkpoint: the family's conversions of the fused expert weights (a transpose, a merge of
        per-expert tensors) have nothing to convert, since the packed tensors load as they are, and would trip over
        the guard tensors stored under those names: they are dropped."""
        if not self.pre_quantized:
            return super().update_weight_conversions(weight_conversions, model)
        targets = tuple(f"experts.{weight}" for weight in EXPERT_WEIGHTS)
        kept = [c for c in weight_conversions if not any(str(t).endswith(targets) for t in getattr(c, "_original_target_patterns", ()))]
        return super().update_weight_conversions(kept, model)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def _dequantize(self, model: nn.Module, dtype: Any = None) -> nn.Module:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # config.dtype may be a string
        for name, module in list(model.named_modules()):
            if isinstance(module, (PackedExperts, PackedLinear)):
                model.set_submodule(name, module.dequantize(dtype or model.dtype).to(model.device))
        return model


def swap_in_packed(model: nn.Module, config: ModeConfig) -> None:
    """Replace every expert set named in `config.bit_map` by an empty PackedExperts of the right shapes, and every
    linear named in `config.dense_map` by an empty PackedLinear.

    Raises:
        UnsupportedModelError: a bit-map entry names no expert set of this model, or the expert count differs;
            a dense-map entry names no linear.
    """
    sets = {s.name: s for s in find_expert_sets(model, skip=config.modules_to_not_convert)}
    for name, widths in config.bit_map.items():
        expert_set = sets.get(name)
        if expert_set is None or expert_set.shape[0] != len(widths):
            raise UnsupportedModelError(
                f"the checkpoint's bit map names expert set {name!r} with {len(widths)} experts, which this model "
                f"does not have (found: {sorted(sets)}): the checkpoint does not match this architecture."
            )
        packed = PackedExperts(expert_set.module, expert_set.layout, widths, config.group_size)
        model.set_submodule(name, packed.to_empty(device="meta"))
    for name, bits in (config.dense_map or {}).items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise UnsupportedModelError(
                f"the checkpoint's dense map names linear {name!r}, which this model does not have: the checkpoint "
                "does not match this architecture."
            )
        model.set_submodule(name, PackedLinear(linear, bits, config.group_size).to_empty(device="meta"))
    check_all_sets_packed(model, config.bit_map, config.modules_to_not_convert)
