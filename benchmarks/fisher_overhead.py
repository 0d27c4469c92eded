"""Time and peak memory of the fisher (backward-pass) statistics relative to the forward-only statistics.

    python benchmarks/fisher_overhead.py [--samples 32] [--layers 4] [--repeats 3]

Each variant runs in its own subprocess so that peak RSS (ru_maxrss) belongs to one variant; the statistics pass
itself is timed inside the process (model building excluded). Prints a markdown table with ratios against the
forward-only pass measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"  # the tests' tiny random Qwen3-VL-MoE and its scenes


def measure(sensitivity: str, samples: int, layers: int) -> dict:
    import torch

    sys.path.insert(0, str(TESTS))
    import tiny
    from mode_hf import ModeConfig
    from mode_hf.calibrate.inputs import build_batches, vision_token_ids
    from mode_hf.model.structure import find_expert_sets
    from mode_hf.calibrate.observe import gather_statistics
    from mode_hf.methods import observation

    torch.set_num_threads(2)
    model = tiny.tiny_model(num_layers=layers, num_experts=8, hidden=128, moe_intermediate=64)
    processor, data = tiny.build_processor(), tiny.calibration_samples(samples, seed=1)
    config = ModeConfig(avg_bits=3, calibration=data, processor=processor, sensitivity=sensitivity)
    batches = build_batches(data, processor, config.batch_size)
    sets, ids = find_expert_sets(model), vision_token_ids(model.config, processor)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    gather_statistics(model, sets, batches, observation(config), ids)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("output", "fisher"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.samples, args.layers)))
        return
    results: dict[str, list[dict]] = {"output": [], "fisher": []}
    for _ in range(args.repeats):
        for variant in results:
            command = [sys.executable, __file__, "--child", variant, "--samples", str(args.samples), "--layers", str(args.layers)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[variant].append(json.loads(out))
    median = {v: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for v, runs in results.items()}
    base = median["output"]
    print(f"tiny Qwen3-VL-MoE, {args.layers} layers x 8 experts, hidden 128; {args.samples} samples; median of {args.repeats}")
    print("| statistics pass | seconds | x forward-only | peak RSS MB | RSS growth during pass MB |")
    print("|---|---|---|---|---|")
    for variant, row in median.items():
        print(f"| {variant} | {row['seconds']:.2f} | {row['seconds'] / base['seconds']:.2f} | {row['peak_rss_mb']:.0f} | {row['rss_growth_mb']:.1f} |")


if __name__ == "__main__":
    main()
