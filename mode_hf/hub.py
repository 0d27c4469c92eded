"""Saving, pushing and loading mode checkpoints safely.

- `save_pretrained` of a mode model is atomic: it writes into a staging directory beside the target and swaps it
  in only once complete, so a failed save never leaves a half-written checkpoint where a good one was. Files
  already in the target that the save does not produce (a processor saved there first) are kept. A model card
  from `model_cards/mode.md` is written unless the directory holds a README that mode-hf did not write.
- `push_to_hub` saves to a temporary directory (card included) and uploads it in one commit.
- `from_pretrained` loads a checkpoint and checks that it really came back quantized: transformers loads a mode
  checkpoint without `import mode_hf` as a plain model with random experts and only a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

CARD_MARKER = "<!-- mode-hf model card -->"
# Files a save_pretrained of the model owns; everything else already in the target directory is carried over.
MODEL_FILE_PREFIXES = ("model", "pytorch_model", "config.json", "generation_config.json")


class CheckpointError(RuntimeError):
    """A mode checkpoint that did not load as one."""


def render_model_card(quantization_config: Any, repo_id: str | None = None) -> str:
    """The model card of a quantized model, from the template `model_cards/mode.md`."""
    template = resources.files("mode_hf.model_cards").joinpath("mode.md").read_text(encoding="utf-8")
    options = quantization_config.to_dict()
    summary = options.get("summary") or {}
    histogram = summary.get("bits_histogram", {})
    total = sum(histogram.values()) or 1
    rows = "\n".join(f"| {b} | {n} | {100 * n / total:.1f}% |" for b, n in histogram.items())
    base = summary.get("base_model") or "unknown"
    fields = {
        "marker": CARD_MARKER,
        "base_model": base,
        "base_model_meta": f"base_model: {base}\n" if summary.get("base_model") else "",
        "repo_id": repo_id or "path/to/this/checkpoint",
        "method": options["method"],
        "quantizer": options["quantizer"],
        "scope": options["scope"],
        "avg_bits": options["avg_bits"],
        "bits": ", ".join(str(b) for b in options["bits"]),
        "group_size": options["group_size"],
        "average_bits": summary.get("average_bits", "n/a"),
        "effective_bits": summary.get("effective_bits", "n/a"),
        "bits_rows": rows or "| n/a | | |",
        "bf16_bytes": summary.get("expert_bytes", {}).get("bf16", "n/a"),
        "packed_bytes": summary.get("expert_bytes", {}).get("packed", "n/a"),
        "keep_ratio": summary.get("keep_ratio", "n/a"),
        "options_json": json.dumps({k: v for k, v in options.items() if k not in ("bit_map", "dense_map", "summary")}, indent=2, sort_keys=True),
    }
    return template.format(**fields)


def _carry_over(old: Path, new: Path) -> None:
    """Copy (never move: a failed swap must leave the old directory whole) what only the old directory has."""
    for entry in old.iterdir():
        owned = entry.name.startswith(MODEL_FILE_PREFIXES)
        if not owned and not (new / entry.name).exists():
            (shutil.copytree if entry.is_dir() else shutil.copy2)(str(entry), str(new / entry.name))


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, backup / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(backup / target.name, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _write_card(model: nn.Module, staging: Path, target: Path) -> None:
    existing = target / "README.md"
    if existing.exists() and CARD_MARKER not in existing.read_text(encoding="utf-8", errors="replace"):
        return  # the user's own card: leave it (it is carried over)
    card = render_model_card(model.config.quantization_config)
    (staging / "README.md").write_text(card, encoding="utf-8")


def atomic_save(model: nn.Module, original_save: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """Run transformers' save_pretrained into a staging directory, add the card, then swap it into place."""
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"save_pretrained target {target} exists and is not a directory.")
    if kwargs.get("push_to_hub"):
        kwargs.setdefault("repo_id", target.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        result = original_save(str(staging), *args, **kwargs)
        _write_card(model, staging, target)
        if target.exists():
            _carry_over(target, staging)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    **kwargs: Any,
) -> Any:
    """Save `model` (weights, config with bit map, model card) and upload it to `repo_id` in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        model.save_pretrained(folder, **{k: v for k, v in kwargs.items() if k == "max_shard_size"})
        (folder / "README.md").write_text(render_model_card(model.config.quantization_config, repo_id), encoding="utf-8")
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload mode-hf quantized model",
            revision=revision,
            create_pr=create_pr,
        )


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
    """Raise CheckpointError unless every expert set of the model's bit map is a loaded PackedExperts (and every
    linear of its dense map a loaded PackedLinear)."""
    from .packed import PackedExperts, PackedLinear

    config = getattr(getattr(model, "config", None), "quantization_config", None)
    bit_map = getattr(config, "bit_map", None) or (config.get("bit_map") if isinstance(config, dict) else None)
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
        _check_filled(name, module)
    dense_map = getattr(config, "dense_map", None) or (config.get("dense_map") if isinstance(config, dict) else None)
    for name, bits in (dense_map or {}).items():
        module = model.get_submodule(name)
        if not isinstance(module, PackedLinear) or module.bits != bits:
            raise CheckpointError(f"{name} is a {type(module).__name__}, not a {bits}-bit packed linear: import mode_hf first.")
        _check_filled(name, module)


def _check_filled(name: str, module: nn.Module) -> None:
    meta = [n for n, b in module.named_buffers() if b.is_meta]
    if meta:
        raise CheckpointError(f"{name} was not filled from the checkpoint (missing {meta[:3]}...).")


def from_pretrained(path: str | os.PathLike, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a mode checkpoint and check it came back quantized (packed experts, the right widths, no gaps).

    Args:
        path: a local directory or Hub repo id.
        model_class: a transformers auto class (default `AutoModelForImageTextToText`, falling back to
            `AutoModelForCausalLM` for text-only models).

    Raises:
        CheckpointError: the checkpoint is not a mode checkpoint or did not load as one.
    """
    import transformers

    if model_class is None:
        config = transformers.AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
        image_text = type(config) in transformers.AutoModelForImageTextToText._model_mapping
        model_class = transformers.AutoModelForImageTextToText if image_text else transformers.AutoModelForCausalLM
    model = model_class.from_pretrained(path, **kwargs)
    verify_quantized(model)
    return model
