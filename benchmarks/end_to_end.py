"""End-to-end quantization time of the bundled tiny model, per method, with time per stage.

    python benchmarks/end_to_end.py [--samples 32] [--layers 4]

Prints a markdown table: load + quantize wall time, the summary's statistics / allocation / quantization seconds,
average and effective bits, and expert bytes packed vs 16-bit. The 16-bit load of the same checkpoint is measured
in the same run as the baseline.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import sys
import time
from pathlib import Path

from transformers import AutoModelForImageTextToText

import mode_hf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny  # noqa: E402  (the tests' tiny random Qwen3-VL-MoE and its scenes)

RUNS = [
    ("uniform rtn", dict(method="uniform", quantizer="rtn")),
    ("uniform gptq", dict(method="uniform", quantizer="gptq")),
    ("frequency gptq", dict(method="frequency", quantizer="gptq")),
    ("mode rtn", dict(method="mode", quantizer="rtn")),
    ("mode gptq", dict(method="mode", quantizer="gptq")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--avg-bits", type=float, default=3.0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    base = tempfile.mkdtemp(prefix="mode-hf-bench-")
    tiny.tiny_model(num_layers=args.layers, num_experts=8, hidden=128, moe_intermediate=64).save_pretrained(base)
    processor, samples = tiny.build_processor(), tiny.calibration_samples(args.samples, seed=1)

    start = time.perf_counter()
    AutoModelForImageTextToText.from_pretrained(base)
    baseline = time.perf_counter() - start
    print(f"tiny Qwen3-VL-MoE: {args.layers} layers x 8 experts, hidden 128, moe_intermediate 64; {args.samples} samples; avg_bits {args.avg_bits}")
    print(f"16-bit load (baseline): {baseline:.2f} s\n")
    print("| run | load+quantize s | x 16-bit load | statistics s | allocation s | quantization s | avg bits | effective bits | expert bytes packed / 16-bit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, options in RUNS:
        config = mode_hf.ModeConfig(avg_bits=args.avg_bits, calibration=samples, processor=processor, **options)
        start = time.perf_counter()
        model = AutoModelForImageTextToText.from_pretrained(base, quantization_config=config)
        wall = time.perf_counter() - start
        s = model.config.quantization_config.summary
        sec = s["seconds"]
        ratio = s["expert_bytes"]["packed"] / s["expert_bytes"]["bf16"]
        print(
            f"| {name} | {wall:.2f} | {wall / baseline:.1f} | {sec['statistics']:.2f} | {sec['allocation']:.2f} | "
            f"{sec['quantization']:.2f} | {s['average_bits']:.3f} | {s['effective_bits']:.3f} | {ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
