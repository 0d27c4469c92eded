"""Saving and loading mode checkpoints safely.

- `save_pretrained` of a mode model is atomic (`atomic.atomic_directory`): it writes into a staging directory beside
  the target and swaps it in only once complete, so a failed save never leaves a half-written checkpoint where a
  good one was. Files already in the target that the save does not produce (a processor saved there first) are
  kept. Guard tensors (`guard.py`) make a load without `import mode_hf` fail. A model card (`card.py`) is written
  unless the directory holds a README that mode-hf did not write.
- `from_pretrained` loads a checkpoint and checks that it really came back quantized (`verify_quantized`):
  transformers loads a mode checkpoint without `import mode_hf` as a plain model with random experts and only a
  warning.
"""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedModelError, UsageError
from ..model.packed import PackedExperts, PackedLinear
from .atomic import COMPLETE, atomic_directory, interrupted_copy
from .card import is_own_card, render_model_card
from .guard import write_guard
from .hub import push_to_hub

# Files a save_pretrained of the model owns; everything else already in the target directory is carried over.
MODEL_FILE_PREFIXES = ("model", "pytorch_model", "config.json", "generation_config.json")


def _carry_over(old: Path, new: Path) -> None:
    """Copy (never move: a failed swap must leave the old directory whole) what only the old directory has."""
    for entry in old.iterdir():
        owned = entry.name.startswith(MODEL_FILE_PREFIXES) or entry.name == COMPLETE
        if not owned and not (new / entry.name).exists():
            (shutil.copytree if entry.is_dir() else shutil.copy2)(str(entry), str(new / entry.name))


def _write_card(model: nn.Module, staging: Path, target: Path) -> None:
    if not is_own_card(target / "README.md"):
        return  # the user's own card: leave it (it is carried over)
    card = render_model_card(model.config.quantization_config)
    (staging / "README.md").write_text(card, encoding="utf-8")


def atomic_save(model: nn.Module, original_save: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """Run transformers' save_pretrained into a staging directory, add the card, then swap it into place."""
    target = Path(save_directory).resolve()
    if kwargs.get("push_to_hub"):
        kwargs.setdefault("repo_id", target.name)
    quantized = getattr(getattr(model.config, "quantization_config", None), "bit_map", None) is not None
    with atomic_directory(target, "saving") as staging:
        result = original_save(str(staging), *args, **kwargs)
        if quantized:  # not after `model.dequantize()`: then it is a plain 16-bit model
            write_guard(staging)  # a load without `import mode_hf` must fail, not give random experts
            _write_card(model, staging, target)
        if target.exists():
            _carry_over(target, staging)
    return result


def install_save_hooks(model: nn.Module) -> None:
    """Make `model.save_pretrained` atomic with a model card and `model.push_to_hub` upload the card too."""
    if getattr(model, "_mode_hf_hooks", False):
        return
    original_save = model.save_pretrained

    def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        return atomic_save(self, original_save, save_directory, *args, **kwargs)

    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.push_to_hub = types.MethodType(push_to_hub, model)
    model._mode_hf_hooks = True


def verify_quantized(model: nn.Module) -> None:
    """Raise CheckpointError unless every expert set of the model is a PackedExperts at the widths of the bit map
    (sets left out by `modules_to_not_convert` aside), every linear of its dense map a PackedLinear, and every
    packed tensor holds data with finite scales and biases."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    options = config if isinstance(config, dict) else getattr(config, "__dict__", {})
    bit_map = options.get("bit_map")
    if not bit_map:
        raise CheckpointError("the model has no mode-hf bit map: it was not quantized with mode-hf.")
    for name, widths in bit_map.items():
        module = model.get_submodule(name)
        if not isinstance(module, PackedExperts):
            raise CheckpointError(
                f"{name} is a {type(module).__name__}, not packed experts: the checkpoint was loaded without "
                "`import mode_hf` (transformers then fills the experts with random weights). Import mode_hf first."
            )
        if module.expert_bits != list(widths):
            raise CheckpointError(f"{name} holds widths {module.expert_bits}, the bit map says {widths}.")
        check_packed_values(name, module)
    for name, bits in (options.get("dense_map") or {}).items():
        module = model.get_submodule(name)
        if not isinstance(module, PackedLinear) or module.bits != bits:
            raise CheckpointError(f"{name} is a {type(module).__name__}, not a {bits}-bit packed linear: import mode_hf first.")
        check_packed_values(name, module)
    check_all_sets_packed(model, bit_map, options.get("modules_to_not_convert") or ())


def check_all_sets_packed(model: nn.Module, bit_map: Mapping[str, Any], skip: Sequence[str]) -> None:
    """Raise CheckpointError for an expert set of `model` (outside `skip`) that the bit map does not name: it would
    run as random 16-bit experts."""
    from ..model.structure import find_expert_sets

    try:
        unpacked = [s.name for s in find_expert_sets(model, skip) if s.name not in bit_map]
    except UnsupportedModelError:  # no unpacked expert set left at all: every one is packed
        return
    if unpacked:
        raise CheckpointError(
            f"expert set {unpacked[0]} ({len(unpacked)} in all) is not in the checkpoint's bit map: it would load as "
            "randomly initialised 16-bit experts. The checkpoint is incomplete or was edited: re-save it from the "
            "quantized model, or re-quantize the base model."
        )


def check_packed_values(name: str, module: nn.Module) -> None:
    """Raise CheckpointError if a packed module's tensor holds no data (meta) or non-finite scales or biases."""
    for buffer_name, buffer in module.named_buffers():
        if buffer.is_meta:
            raise CheckpointError(f"{name}.{buffer_name} was not filled from the checkpoint: it is not in the checkpoint.")
        if buffer.is_floating_point() and not bool(torch.isfinite(buffer).all()):
            raise CheckpointError(
                f"{name}.{buffer_name} holds values that are not finite (NaN or inf): the checkpoint is corrupt; "
                "re-save it from the quantized model."
            )


def check_loaded_from_checkpoint(name: str, module: nn.Module) -> None:
    """Raise CheckpointError if a packed module's tensor did not come from the checkpoint file (transformers marks
    what it loads; a tensor it did not find is left uninitialised memory)."""
    missing = [n for n, b in module.named_buffers() if not getattr(b, "_is_hf_initialized", False)]
    if missing:
        raise CheckpointError(
            f"{name}.{missing[0]} ({len(missing)} tensors of {name}) is not in the checkpoint: the checkpoint is "
            "incomplete (a shard missing or edited); re-save it from the quantized model."
        )


def already_quantized(path: str | os.PathLike) -> str:
    """The message for new quantization options given to a checkpoint that is already mode-quantized: which base
    model to start from (its summary records it)."""
    import transformers

    options = getattr(transformers.AutoConfig.from_pretrained(str(path)), "quantization_config", None) or {}
    return already_quantized_message(options, str(path))


def already_quantized_message(options: Any, checkpoint: str = "this checkpoint") -> str:
    """`already_quantized` from the checkpoint's quantization_config (a dict or a config object)."""
    options = options if isinstance(options, dict) else options.to_dict()
    base = (options.get("summary") or {}).get("base_model") or "the 16-bit model it was quantized from"
    return (
        f"{checkpoint} is already quantized with mode-hf ({options.get('avg_bits')} bits, method "
        f"{options.get('method')!r}); new quantization options would be ignored. Quantize the base model instead: {base}."
    )


def auto_model_class(path: str | os.PathLike, **hub_options: Any) -> Any:
    """The transformers auto class a checkpoint loads with: AutoModelForImageTextToText for multimodal models,
    AutoModelForCausalLM otherwise (`hub_options`: revision, token)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), **hub_options)
    image_text = type(config) in transformers.AutoModelForImageTextToText._model_mapping
    return transformers.AutoModelForImageTextToText if image_text else transformers.AutoModelForCausalLM


def load_processor(path: str | os.PathLike) -> Any:
    """The processor saved with a model (`AutoProcessor`; the bundled models' own class is registered by `import
    mode_hf`), or its tokenizer for text-only models.

    Raises:
        UsageError: neither a processor nor a tokenizer can be loaded from `path`.
    """
    import transformers

    for loader in (transformers.AutoProcessor, transformers.AutoTokenizer):
        try:
            return loader.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise UsageError(f"no processor or tokenizer could be loaded from {path}: save the model's processor there.")


def from_pretrained(path: str | os.PathLike, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a mode checkpoint and check it came back quantized (packed experts, the right widths, no gaps).

    Args:
        path: a local directory or Hub repo id.
        model_class: a transformers auto class (default `auto_model_class(path)`).

    Raises:
        CheckpointError: the checkpoint is not a mode checkpoint or did not load as one.
    """
    previous = interrupted_copy(path)  # None for a Hub repo id: nothing of it lies here
    if previous is not None:
        raise CheckpointError(
            f"{path} does not exist, but an interrupted save left its previous copy at {previous}: move it back to "
            f"{path}, or save to {path} again (which restores or replaces it)."
        )
    if kwargs.get("quantization_config") is not None:
        raise CheckpointError(already_quantized(path))
    if model_class is None:
        model_class = auto_model_class(path, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
    model = model_class.from_pretrained(path, **kwargs)
    verify_quantized(model)
    return model
