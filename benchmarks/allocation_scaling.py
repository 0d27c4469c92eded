"""Build + solve time of mode_hf.algo.allocation.allocate (cvxpy + HiGHS) from ~1K binaries up to DeepSeek-V3 size.

Usage: python benchmarks/allocation_scaling.py [--avg-bits 2.5] [--repeats 3] [--params equal|random]

Prints a markdown table: one row per (size, scope) with the median wall time of allocate() (validation, building
the cvxpy problem, HiGHS, rounding and budget check), the cvxpy status and the reached average width.
Costs mimic the project's cost signal: an expert importance spread over six orders of magnitude (log-uniform)
times a quantization error that falls about 4x per extra bit, with +-30% noise, sorted to decrease in bits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mode_hf.algo.allocation import SCOPES, allocate  # noqa: E402

# (sets, experts per set): 1K ... 58 x 256 (DeepSeek-V3: 58 MoE layers of 256 routed experts)
SIZES = ((4, 96), (8, 128), (16, 256), (32, 256), (58, 256))
DEEPSEEK_EXPERT_PARAMS = 3 * 7168 * 2048  # gate, up, down projections of one routed expert


def make_costs(rng: np.random.Generator, n_experts: int, widths: np.ndarray) -> np.ndarray:
    """float64 [J, K]: importance [J, 1] (1e-3..1e3) x error 4^-b with noise, decreasing in bits."""
    importance = 10.0 ** rng.uniform(-3, 3, size=(n_experts, 1))
    error = 4.0 ** -widths[None, :].astype(np.float64) * rng.uniform(0.7, 1.3, size=(n_experts, widths.size))
    return importance * np.sort(error, axis=1)[:, ::-1]


def make_params(rng: np.random.Generator, n_experts: int, kind: str) -> np.ndarray:
    """float64 [J]: DeepSeek-V3 expert size for every expert, or +-50% random sizes (harder knapsack)."""
    spread = {"equal": 0.0, "random": 0.5}[kind]
    return DEEPSEEK_EXPERT_PARAMS * rng.uniform(1 - spread, 1 + spread, size=n_experts)


def time_case(args: argparse.Namespace, n_sets: int, per_set: int, scope: str) -> tuple[float, str, float]:
    """Median allocate() seconds over args.repeats random instances, last status, last average bits."""
    widths = np.asarray(args.bits)
    seconds, result = [], None
    for repeat in range(args.repeats):
        rng = np.random.default_rng(args.seed + repeat)
        n_experts = n_sets * per_set
        costs = make_costs(rng, n_experts, widths)
        params = make_params(rng, n_experts, args.params)
        set_index = np.repeat(np.arange(n_sets), per_set)
        result = allocate(costs, params, set_index, args.bits, args.avg_bits, scope, args.min_top, args.time_limit)
        seconds.append(result.solve_seconds)
    return statistics.median(seconds), result.status, result.average_bits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="candidate widths")
    parser.add_argument("--avg-bits", type=float, default=2.5, help="budget in average bits per weight")
    parser.add_argument("--repeats", type=int, default=3, help="random instances per row (median reported)")
    parser.add_argument("--params", choices=("equal", "random"), default="equal", help="expert sizes")
    parser.add_argument("--min-top", type=int, default=0, help="min_top_per_set guard (not for layer_uniform)")
    parser.add_argument("--time-limit", type=float, default=None, help="HiGHS time limit in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print(f"avg_bits={args.avg_bits} bits={tuple(args.bits)} params={args.params} min_top={args.min_top} "
          f"repeats={args.repeats}\n")
    print("| sets x experts | binaries (J*K) | scope | median s | status | average bits |")
    print("|---|---:|---|---:|---|---:|")
    for n_sets, per_set in SIZES:
        for scope in args.scopes:
            min_top = 0 if scope == "layer_uniform" else args.min_top
            run_args = argparse.Namespace(**{**vars(args), "min_top": min_top})
            seconds, status, average = time_case(run_args, n_sets, per_set, scope)
            binaries = n_sets * per_set * len(args.bits)
            print(f"| {n_sets} x {per_set} | {binaries:,} | {scope} | {seconds:.2f} | {status} | {average:.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
