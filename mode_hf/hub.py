"""Saving, pushing and loading mode checkpoints safely.

- `save_pretrained` of a mode model is atomic: it writes into a staging directory beside the target and swaps it
  in only once complete, so a failed save never leaves a half-written checkpoint where a good one was. Files
  already in the target that the save does not produce (a processor saved there first) are kept. A model card
  from `model_cards/mode.md` is written unless the directory holds a README that mode-hf did not write.
- `push_to_hub` saves to a temporary directory, draws the report pictures (`mode_hf.report`), writes the card
  showing them, and uploads it all in one commit; `push_folder` uploads an already saved directory the same way
  (the command line's `--push-to-hub`).
- `write_model_card(directory)` (re)writes the card of a saved checkpoint from its config.json, its `report/`
  pictures and its `eval_results.json` (written by `mode-hf eval`).
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
from typing import Any, Mapping, Sequence

from torch import nn

CARD_MARKER = "<!-- mode-hf model card -->"
REPORT_DIR = "report"  # pictures of a checkpoint, relative to it
EVAL_FILE = "eval_results.json"  # `mode-hf eval` results, read into the card
PICTURE_CAPTIONS = {
    "bits_heatmap.png": "Bits per expert (rows: MoE layers, columns: experts)",
    "frequency.png": "How often text and vision tokens select each expert",
    "bytes.png": "Bytes by module type",
}
# Files a save_pretrained of the model owns; everything else already in the target directory is carried over.
MODEL_FILE_PREFIXES = ("model", "pytorch_model", "config.json", "generation_config.json")


class CheckpointError(RuntimeError):
    """A mode checkpoint that did not load as one."""


def render_model_card(
    quantization_config: Any,
    repo_id: str | None = None,
    pictures: Sequence[str] = (),
    evaluation: Mapping[str, Any] | None = None,
) -> str:
    """The model card of a quantized model, from the template `model_cards/mode.md`.

    Args:
        quantization_config: the model's ModeConfig (or its dict).
        repo_id: where the card will live (its usage snippet loads from there).
        pictures: PNG paths relative to the card, shown with captions (see `PICTURE_CAPTIONS`).
        evaluation: an `evaluation.evaluate` result (families with accuracy and answer NLL), shown as a table.
    """
    template = resources.files("mode_hf.model_cards").joinpath("mode.md").read_text(encoding="utf-8")
    options = quantization_config if isinstance(quantization_config, Mapping) else quantization_config.to_dict()
    summary = options.get("summary") or {}
    histogram = summary.get("bits_histogram", {})
    total = sum(histogram.values()) or 1
    rows = "\n".join(f"| {b} | {n} | {100 * n / total:.1f}% |" for b, n in histogram.items())
    base = summary.get("base_model") or "unknown"
    fields = {
        "marker": CARD_MARKER,
        "base_model": base,
        "base_model_meta": f"base_model: {base}\nbase_model_relation: quantized\n" if summary.get("base_model") else "",
        "repo_id": repo_id or "path/to/this/checkpoint",
        "method": options["method"],
        "quantizer": options["quantizer"],
        "scope": options["scope"],
        "symmetric": "symmetric" if options.get("symmetric") else "asymmetric (zero points)",
        "avg_bits": options["avg_bits"],
        "bits": ", ".join(str(b) for b in options["bits"]),
        "group_size": options["group_size"],
        "average_bits": summary.get("average_bits", "n/a"),
        "effective_bits": summary.get("effective_bits", "n/a"),
        "bits_rows": rows or "| n/a | | |",
        "bf16_bytes": _megabytes(summary.get("expert_bytes", {}).get("bf16")),
        "packed_bytes": _megabytes(summary.get("expert_bytes", {}).get("packed")),
        "keep_ratio": "n/a" if summary.get("keep_ratio") is None else f"{100 * summary['keep_ratio']:.1f}%",
        "pictures": "\n\n".join(f"![{PICTURE_CAPTIONS.get(Path(p).name, Path(p).stem)}]({p})" for p in pictures)
        or "No report pictures were made for this checkpoint (`mode-hf report DIR` draws them).",
        "evaluation": _evaluation_table(evaluation),
        "options_json": json.dumps({k: v for k, v in options.items() if k not in ("bit_map", "dense_map", "summary")}, indent=2, sort_keys=True),
    }
    return template.format(**fields)


def _megabytes(count: int | None) -> str:
    return "n/a" if count is None else f"{count / 1e6:,.2f} MB"


def _evaluation_table(evaluation: Mapping[str, Any] | None) -> str:
    if not evaluation or not evaluation.get("families"):
        return "Not evaluated (`mode-hf eval DIR` runs the bundled held-out tasks and adds them here)."
    rows = ["| task family | exact match | answer NLL | examples |", "|---|---|---|---|"]
    for name, r in evaluation["families"].items():
        rows.append(f"| {name} | {100 * r['accuracy']:.1f}% | {r['nll']:.3f} | {r['count']} |")
    return "\n".join(rows)


def write_model_card(directory: str | os.PathLike, repo_id: str | None = None) -> Path | None:
    """(Re)write README.md of a saved mode checkpoint from its config.json, the pictures in its `report/` and its
    `eval_results.json`. A README that mode-hf did not write is left alone (returns None)."""
    directory = Path(directory)
    card = directory / "README.md"
    if card.exists() and CARD_MARKER not in card.read_text(encoding="utf-8", errors="replace"):
        return None
    options = json.loads((directory / "config.json").read_text())["quantization_config"]
    pictures = [p.relative_to(directory).as_posix() for p in sorted((directory / REPORT_DIR).glob("*.png"), key=_picture_order)]
    evaluation = json.loads((directory / EVAL_FILE).read_text()) if (directory / EVAL_FILE).exists() else None
    card.write_text(render_model_card(options, repo_id, pictures, evaluation), encoding="utf-8")
    return card


def _picture_order(path: Path) -> tuple[int, str]:
    names = list(PICTURE_CAPTIONS)
    return (names.index(path.name) if path.name in names else len(names), path.name)


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


def push_folder(
    directory: str | os.PathLike,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload every file of a saved checkpoint directory (weights, config, processor, card, report pictures) to
    `repo_id` in one commit; hidden files are skipped."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(directory)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or "Upload mode-hf quantized model",
        revision=revision,
        create_pr=create_pr,
    )


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
    """Save `model` (weights, config with bit map), draw its report pictures, write the card showing them, and
    upload it all to `repo_id` in one commit."""
    from .report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        model.save_pretrained(folder, **{k: v for k, v in kwargs.items() if k == "max_shard_size"})
        write_report(folder, folder / REPORT_DIR)
        write_model_card(folder, repo_id)
        return push_folder(folder, repo_id, commit_message, private, token, revision, create_pr)


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
