"""Is a bundled model sensitive to quantization, and is its routing modality-specialized? Measured before any
method comparison (issue: a benchmark that can tell methods apart).

    python benchmarks/sensitivity.py [--model mode_hf/bench/assets/finegrained_model] [--per-family 400] [--json out.json] [--dtype float32]

Uniform RTN of the routed experts at 4, 3 and 2 bits (the library's group size): accuracy, answer NLL and
KL(bf16 || quantized) per family, the KL with its 95% bootstrap interval, and the relative accuracy drop; then the
routing specialization per MoE layer on the calibration samples (mode_hf.bench.routing).
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
    rows = [families_row("bf16", reference, None)]
    for bits in args.bits:
        config = mode_hf.ModeConfig(avg_bits=bits, bits=(bits,), method="uniform", quantizer="rtn")
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, quantization_config=config)
        rows.append(families_row(f"uniform-rtn {bits}", evaluation.evaluate(model, processor, held_out, batch_size=32,
                                                                        reference=reference["distributions"]), reference))
    print("| model | text acc | vision acc | text rel. drop | vision rel. drop | text KL [95% CI] | vision KL [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{100 * row[f]['accuracy']:.1f}%" for f in ("text", "vision")]
        cells += [f"{100 * row[f]['relative_drop']:.1f}%" if "kl" in row[f] else "" for f in ("text", "vision")]
        cells += [("{:.4f} [{:.4f}, {:.4f}]".format(*row[f]["kl"]) if "kl" in row[f] else "") for f in ("text", "vision")]
        print(f"| {row['name']} | " + " | ".join(cells) + " |")
    specialization = routing_table(base, processor, args.calibration, suite)
    print(f"\ncalibration tokens: {specialization['tokens']}")
    print("| expert set | TV(text, kept vision) | TV(text, all vision) | text mass on experts vision rarely picks | usage CV | max usage share |")
    print("|---|---|---|---|---|---|")
    for name, m in specialization["sets"].items():
        print(f"| {name} | {m['tv_kept']:.2f} | {m['tv_all']:.2f} | {m['text_mass_on_rare_vision']:.2f} | {m['usage_cv']:.2f} | {m['usage_max_share']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows, "routing": specialization}, indent=2))


if __name__ == "__main__":
    main()
