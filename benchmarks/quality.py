"""Quality of every method at the same budgets, side by side, on the bundled trained benchmark model.

    python benchmarks/quality.py [--bits 4 3 2.5 2] [--methods ...] [--per-family 200] [--out docs/results]

For each average-bit budget and method: quantize on load (same calibration set, CALIBRATION_SEED), evaluate on
the fixed held-out sets (EVAL_SEED), and report text and vision accuracy, the average relative accuracy drop vs
the 16-bit model measured in the same run, effective bits (scales and zeros included) and expert bytes. Prints a
markdown table, writes it with the full results as JSON, and draws accuracy vs effective bits per method (PNG).
Uniform methods only run at budgets that are one of the candidate widths.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from transformers import AutoModelForImageTextToText

import mode_hf
from mode_hf import evaluation, tasks

METHODS = {
    "uniform-rtn": dict(method="uniform", quantizer="rtn"),
    "uniform-gptq": dict(method="uniform", quantizer="gptq"),
    "frequency": dict(method="frequency"),
    "pmq": dict(method="pmq"),
    "gemq": dict(method="gemq"),
    "mode": dict(method="mode"),
}


def relative_drop(result: dict, reference: dict) -> float:
    """Mean over families of (reference accuracy - accuracy) / reference accuracy."""
    drops = []
    for family, ref in reference["families"].items():
        if ref["accuracy"] > 0:
            drops.append((ref["accuracy"] - result["families"][family]["accuracy"]) / ref["accuracy"])
    return sum(drops) / len(drops)


def run_method(model_dir: Path, processor, name: str, avg_bits: float, args) -> dict | None:
    options = dict(METHODS[name])
    if options["method"] == "uniform" and avg_bits not in args.candidates:
        return None
    config = mode_hf.ModeConfig(
        avg_bits=avg_bits, bits=args.candidates, group_size=args.group_size, processor=processor,
        calibration=tasks.calibration_samples(args.calibration), **options,
    )
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, quantization_config=config)
    seconds = time.perf_counter() - start
    result = evaluation.evaluate(model, processor, evaluation.held_out(args.per_family), batch_size=args.batch_size)
    summary = model.config.quantization_config.summary
    result.update(method=name, avg_bits=avg_bits, seconds=seconds, effective_bits=summary["effective_bits"],
                  expert_bytes=summary["expert_bytes"]["packed"], keep_ratio=summary.get("keep_ratio"))
    return result


def table(rows: list[dict], reference: dict) -> str:
    lines = [
        "| bits | method | text acc | vision acc | avg rel. drop vs bf16 | effective bits | expert bytes |",
        "|---|---|---|---|---|---|---|",
        f"| 16 | bf16 | {100 * reference['families']['text']['accuracy']:.1f}% | "
        f"{100 * reference['families']['vision']['accuracy']:.1f}% | 0.0% | 16 | {reference['expert_bytes']} |",
    ]
    for r in rows:
        lines.append(
            f"| {r['avg_bits']:g} | {r['method']} | {100 * r['families']['text']['accuracy']:.1f}% | "
            f"{100 * r['families']['vision']['accuracy']:.1f}% | {100 * r['relative_drop']:.1f}% | "
            f"{r['effective_bits']:.3f} | {r['expert_bytes']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, family in zip(axes, ("text", "vision")):
        for method in METHODS:
            points = sorted((r["effective_bits"], r["families"][family]["accuracy"]) for r in rows if r["method"] == method)
            if points:
                axis.plot(*zip(*points), marker="o", label=method)
        axis.axhline(reference["families"][family]["accuracy"], color="black", linestyle="--", label="bf16")
        axis.set(title=f"{family} accuracy", xlabel="effective bits per expert weight (with scales and zeros)")
    axes[0].set_ylabel("exact-match accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=evaluation.BUNDLED_MODEL)
    parser.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.0, 2.5, 2.0])
    parser.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--per-family", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    processor = evaluation.load_processor(args.model)
    bf16 = AutoModelForImageTextToText.from_pretrained(args.model)
    reference = evaluation.evaluate(bf16, processor, evaluation.held_out(args.per_family), batch_size=args.batch_size)
    reference["expert_bytes"] = 2 * sum(
        s.params_per_expert * s.shape[0] for s in mode_hf.experts.find_expert_sets(bf16)
    )
    rows = []
    for avg_bits in args.bits:
        for name in args.methods:
            result = run_method(args.model, processor, name, avg_bits, args)
            if result is not None:
                result["relative_drop"] = relative_drop(result, reference)
                rows.append(result)
                print(table(rows[-1:], reference).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows, reference)
    print(text)
    (args.out / "quality.md").write_text(text + "\n")
    (args.out / "quality.json").write_text(json.dumps({"reference": reference, "rows": rows}, indent=2, default=str))
    plot(rows, reference, args.out / "quality.png")


if __name__ == "__main__":
    main()
