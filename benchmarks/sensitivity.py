"""Is a bundled model sensitive to quantization, and is its routing modality-specialized? Measured before any
method comparison (issue: a benchmark that can tell methods apart).

    python benchmarks/sensitivity.py [--model mode_hf/bench/assets/finegrained_model] [--per-family 400] [--json out.json] [--dtype float32]

Uniform RTN of the routed experts at 4, 3 and 2 bits (the library's group size): accuracy, answer NLL and
KL(bf16 || quantized) per family, the KL with its 95% bootstrap interval, and the relative accuracy drop; per task the
accuracies, the 16-bit answer margins (`evaluation.margins`) and how far the lowest width moves them (which says
why a task survives rounding: its margins are wider than the shift); then the routing specialization per MoE layer
on the calibration samples (mode_hf.bench.routing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mode_hf  # noqa: E402
from mode_hf.bench import evaluation, routing, tasks  # noqa: E402
from mode_hf.hf.checkpoint import load_processor  # noqa: E402

FINEGRAINED = evaluation.BUNDLED_MODEL.parent / "finegrained_model"


def families_row(name: str, result: dict, reference: dict | None) -> dict:
    row = {"name": name}
    for family, summary in result["families"].items():
        row[family] = {k: summary[k] for k in ("accuracy", "nll")}
        if reference is not None:
            kls = [e["kl"] for e in result["examples"] if e["family"] == family]
            row[family]["kl"] = evaluation.mean_interval(kls)
            base = reference["families"][family]["accuracy"]
            row[family]["relative_drop"] = (base - summary["accuracy"]) / base if base else 0.0
    return row


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def task_rows(reference: dict, results: dict[int, dict]) -> list[dict]:
    """Per task: accuracy of the reference and of every width; the reference's answer margins (`evaluation.margins`:
    how many nats the logits must move to change an answer; > 0 where it is right) as p10/p50/p90; and, at the
    lowest width, how far rounding moved them (|margin change| p50/p90) and the answers it flipped each way."""
    lowest = min(results)
    rows = []
    family = {e["task"]: e["family"] for e in reference["examples"]}
    for task in sorted(family, key=lambda t: (family[t], t)):
        index = [i for i, e in enumerate(reference["examples"]) if e["task"] == task]
        ref = [reference["examples"][i] for i in index]
        low = [results[lowest]["examples"][i] for i in index]
        margins = [e["margin"] for e in ref]
        shifts = [abs(b["margin"] - a["margin"]) for a, b in zip(ref, low)]
        rows.append({
            "task": f"{family[task]}/{task}", "count": len(ref),
            "accuracy": {"reference": sum(e["correct"] for e in ref) / len(ref),
                         **{bits: sum(results[bits]["examples"][i]["correct"] for i in index) / len(ref) for bits in results}},
            "margin": [quantile(margins, q) for q in (0.1, 0.5, 0.9)],
            "shift": [quantile(shifts, q) for q in (0.5, 0.9)], "lowest": lowest,
            "lost": sum(a["correct"] and not b["correct"] for a, b in zip(ref, low)),
            "gained": sum(b["correct"] and not a["correct"] for a, b in zip(ref, low)),
        })
    return rows


def routing_table(model, processor, samples: int, suite: str) -> dict:
    return routing.measure(model, processor, tasks.calibration_samples(samples, suite_name=suite))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=FINEGRAINED)
    parser.add_argument("--per-family", type=int, default=400)
    parser.add_argument("--calibration", type=int, default=64, help="calibration samples for the routing statistics")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype of every model")
    args = parser.parse_args()
    processor = load_processor(args.model)
    dtype = getattr(torch, args.dtype)
    base = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
    suite = evaluation.suite_of(base)
    held_out = evaluation.held_out(args.per_family, suite_name=suite)
    reference = evaluation.evaluate(base, processor, held_out, batch_size=32, keep_distributions=True)
    reference_name = "float32" if dtype == torch.float32 else "bf16"
    rows, results = [families_row(reference_name, reference, None)], {}
    for bits in args.bits:
        config = mode_hf.ModeConfig(avg_bits=bits, bits=(bits,), method="uniform", quantizer="rtn")
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, quantization_config=config)
        results[bits] = evaluation.evaluate(model, processor, held_out, batch_size=32, reference=reference["distributions"])
        rows.append(families_row(f"uniform-rtn {bits}", results[bits], reference))
    print("| model | text acc | vision acc | text rel. drop | vision rel. drop | text KL [95% CI] | vision KL [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{100 * row[f]['accuracy']:.1f}%" for f in ("text", "vision")]
        cells += [f"{100 * row[f]['relative_drop']:.1f}%" if "kl" in row[f] else "" for f in ("text", "vision")]
        cells += [("{:.4f} [{:.4f}, {:.4f}]".format(*row[f]["kl"]) if "kl" in row[f] else "") for f in ("text", "vision")]
        print(f"| {row['name']} | " + " | ".join(cells) + " |")
    tasks_rows = task_rows(reference, results)
    lowest = min(results)
    print(f"\nPer task: accuracy, {reference_name} answer margins (nats the logits must move to change the answer; > 0 where "
          f"right) and what {lowest}-bit RTN did to them:\n")
    print(f"| task | n | {reference_name} | " + " | ".join(f"RTN {b}" for b in results)
          + f" | margin p10 / p50 / p90 | RTN {lowest}: margin change p50 / p90 | RTN {lowest}: right -> wrong / wrong -> right |")
    print("|---|---:|---:|" + "---:|" * len(results) + "---|---|---|")
    for row in tasks_rows:
        cells = [f"{100 * row['accuracy'][key]:.0f}%" for key in ("reference", *results)]
        print(f"| {row['task']} | {row['count']} | " + " | ".join(cells) + " | " + " / ".join(f"{m:.1f}" for m in row["margin"])
              + " | " + " / ".join(f"{m:.1f}" for m in row["shift"]) + f" | {row['lost']} / {row['gained']} |")
    specialization = routing_table(base, processor, args.calibration, suite)
    print(f"\ncalibration tokens: {specialization['tokens']}")
    print("| expert set | TV(text, kept vision) | TV(text, all vision) | text mass on experts vision rarely picks | usage CV | max usage share |")
    print("|---|---|---|---|---|---|")
    for name, m in specialization["sets"].items():
        print(f"| {name} | {m['tv_kept']:.2f} | {m['tv_all']:.2f} | {m['text_mass_on_rare_vision']:.2f} | {m['usage_cv']:.2f} | {m['usage_max_share']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows, "tasks": tasks_rows, "routing": specialization}, indent=2))


if __name__ == "__main__":
    main()
