"""Model cards of mode checkpoints: rendered from the template `model_card.md` beside this module, from a
checkpoint's config.json, its `report/` pictures and its `eval_results.json` (written by `mode-hf eval`).
A README that mode-hf did not write (no CARD_MARKER) is never overwritten.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

CARD_MARKER = "<!-- mode-hf model card -->"
REPORT_DIR = "report"  # pictures of a checkpoint, relative to it
EVAL_FILE = "eval_results.json"  # `mode-hf eval` results, read into the card
PICTURE_CAPTIONS = {
    "bits_heatmap.png": "Bits per expert (rows: MoE layers, columns: experts)",
    "frequency.png": "How often text and vision tokens select each expert",
    "bytes.png": "Bytes by module type",
}


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
    template = resources.files(__package__).joinpath("model_card.md").read_text(encoding="utf-8")
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
    if not is_own_card(card):
        return None
    options = json.loads((directory / "config.json").read_text())["quantization_config"]
    pictures = [p.relative_to(directory).as_posix() for p in sorted((directory / REPORT_DIR).glob("*.png"), key=_picture_order)]
    evaluation = json.loads((directory / EVAL_FILE).read_text()) if (directory / EVAL_FILE).exists() else None
    card.write_text(render_model_card(options, repo_id, pictures, evaluation), encoding="utf-8")
    return card


def _picture_order(path: Path) -> tuple[int, str]:
    names = list(PICTURE_CAPTIONS)
    return (names.index(path.name) if path.name in names else len(names), path.name)


def is_own_card(path: Path) -> bool:
    """Whether `path` is absent or a card mode-hf wrote (so that it may be rewritten)."""
    return not path.exists() or CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")
