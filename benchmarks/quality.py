"""Quality of every method and peer at the same budgets, side by side, on one bundled model.

    python benchmarks/quality.py --model mode_hf/bench/assets/finegrained_model --out docs/results/finegrained
    python benchmarks/quality.py --model mode_hf/bench/assets/bench_model --out docs/results/bench

For each candidate set (default {2, 3, 4} and {2, 3}) and average-bit budget (default 4, 3, 2.5, 2.25) in its
range, and for uniform rows and peers at each width (default 4, 3, 2): quantize (same calibration samples, CALIBRATION_SEED), evaluate on the fixed held-out sets of the model's
suite (EVAL_SEED), and report per family exact-match accuracy, answer NLL and KL(bf16 || quantized) over the answer
positions with a 95% bootstrap interval, the average relative accuracy drop against the bf16 model of the same run,
effective bits of the experts (scales and zeros included) and their bytes. Rows:
- mode-hf methods: uniform RTN / GPTQ (integer budgets of the candidates), frequency, pmq, gemq, mode;
- ablations of mode: no redundancy filter, weight error instead of per-modality output damage, no modality split,
  text tokens weighted x4 in the GPTQ Hessian, Fisher (gradient-weighted) damage instead of output damage;
- peers (mode_hf.bench.peers) at the integer widths they support, same group size, routed experts only: HQQ and
  optimum-quanto applied to the expert weights in this process (and through their transformers configs, which leave
  fused experts in 16-bit); AutoRound, llm-compressor GPTQ, GPTQModel and transformers' GPTQConfig each in its own
  virtual environment (`--peer-venvs`, built on first use by benchmarks/peers/setup.sh), their checkpoints
  dequantized into a 16-bit model and scored here. A peer that cannot install or run gets a "Not run" line with its
  error.
An allocation that comes out as an earlier row's model (same fingerprint) is scored once. Prints the table, the paired
comparison against frequency and pmq, and the routing specialization; writes quality.md, quality.json and
quality.png (accuracy and KL against effective bits) into --out, after every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mode_hf  # noqa: E402
from mode_hf.bench import compare, evaluation, peer_export, peers, routing, tasks  # noqa: E402
from mode_hf.hf.checkpoint import load_processor  # noqa: E402

MODE_METHODS = {
    "uniform-rtn": dict(method="uniform", quantizer="rtn"),
    "uniform-gptq": dict(method="uniform", quantizer="gptq"),
    "frequency": dict(method="frequency"),
    "pmq": dict(method="pmq"),
    "gemq": dict(method="gemq"),
    "mode": dict(method="mode"),
}
ABLATIONS = {
    "mode-no-filter": dict(method="mode", redundancy_threshold=None),
    "mode-weight-error": dict(method="mode", sensitivity="weight"),
    "mode-no-split": dict(method="mode", modality_split=False),
    "mode-text-hessian": dict(method="mode", text_hessian_weight=4.0),
    "mode-fisher": dict(method="mode", sensitivity="fisher"),  # gemq's loss-aware damage inside mode's split cost
}
IN_PROCESS_PEERS = ["hqq-experts", "quanto-experts", "hqq-transformers", "quanto-transformers"]
ALL_PEERS = IN_PROCESS_PEERS + list(peer_export.VENV_PEERS)
ALL = list(MODE_METHODS) + list(ABLATIONS) + ALL_PEERS
TRANSFORMERS_CONFIG_BITS = 4  # configs that leave fused experts 16-bit: one row shows it


def load(model_dir: Path, args, **options):
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=args.dtype, **options).eval()


def candidate_label(candidates: tuple[int, ...]) -> str:
    return "{" + ",".join(str(b) for b in candidates) + "}"


def plan(args) -> list[tuple[str, float, tuple[int, ...]]]:
    """(method, budget, candidates) of every row to run. Allocations run at every budget (`--bits`) inside a
    candidate set's range, but not at the top of a narrower set (every expert at its widest width: a uniform row);
    uniform rows and peers once per width (`--widths`)."""
    widest = max(args.candidates, key=max)
    runs = []
    for avg_bits in args.bits:
        for candidates in args.candidates:
            inside = min(candidates) <= avg_bits <= max(candidates)
            if inside and not (avg_bits == max(candidates) and candidates != widest):
                runs += [(m, avg_bits, candidates) for m in args.methods if m in ABLATIONS or m in MODE_METHODS and not m.startswith("uniform")]
    for width in args.widths:
        home = next((c for c in args.candidates if width in c), (width,))
        runs += [(m, float(width), home) for m in args.methods if m.startswith("uniform")]
        for name in args.methods:
            library = name.split("-")[0]
            if name in IN_PROCESS_PEERS and width in peers.LIBRARY_BITS[library]:
                if not name.endswith("-transformers") or width == TRANSFORMERS_CONFIG_BITS:
                    runs.append((name, float(width), (width,)))
            if name in peer_export.VENV_PEERS and width in peer_export.VENV_PEERS[name].bits:
                if peer_export.VENV_PEERS[name].experts or width == TRANSFORMERS_CONFIG_BITS:
                    runs.append((name, float(width), (width,)))
    return runs


def quantize(name: str, avg_bits: float, candidates: tuple[int, ...], processor, args, work: Path):
    """The model quantized by `name` at `avg_bits`, and its record (effective bits, bytes, bit map, ...)."""
    if name in IN_PROCESS_PEERS:
        library, how = name.split("-")
        if how == "transformers":
            model = load(args.model, args, quantization_config=peers.transformers_config(library, int(avg_bits)))
            return model, peers.linear_report(model)
        model = load(args.model, args)
        return model, peers.quantize_experts(model, library, int(avg_bits), args.group_size)
    if name in peer_export.VENV_PEERS:
        exported = peer_export.run_in_venv(name, args.model, args.calibration_file, int(avg_bits), args.group_size,
                                           work / f"{name}-{int(avg_bits)}", args.peer_venvs, iters=args.autoround_iters)
        experts = exported["experts"]
        record = {"effective_bits": experts["payload_bits"], "expert_bytes": experts["payload_bytes"],  # codes, scales, zeros
                  "stored_bits": experts["effective_bits"], "stored_bytes": experts["stored_bytes"],  # + g_idx etc.
                  "quantized": exported["quantized"], "peer": exported.get("peer")}
        return load(exported["out"], args), record
    options = dict(MODE_METHODS.get(name) or ABLATIONS[name])
    config = mode_hf.ModeConfig(avg_bits=avg_bits, bits=candidates, group_size=args.group_size, processor=processor,
                                calibration=args.samples, **options)
    model = load(args.model, args, quantization_config=config)
    summary = model.config.quantization_config.summary
    record = {"effective_bits": summary["effective_bits"], "expert_bytes": summary["expert_bytes"]["packed"],
              "keep_ratio": summary.get("keep_ratio"), "histogram": summary["bits_histogram"],
              "bit_map": model.config.quantization_config.bit_map, "frequency": summary.get("frequency"),
              "tokens": summary.get("tokens"), "seconds": summary.get("seconds")}
    return model, record


def bits_met_table(rows: list[dict]) -> str:
    """The width each modality's tokens meet, per allocation row (frequencies of the row's own calibration pass)."""
    lines = ["| bits | candidates | method | bits text tokens meet | bits vision tokens meet |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("bit_map") and r.get("frequency"):
            met = compare.bits_met(r["bit_map"], r["frequency"])
            lines.append(f"| {r['avg_bits']:g} | {r['candidates']} | {r['method']} | {met['text']:.2f} | {met['vision']:.2f} |")
    return "\n".join(lines)


def specialization_table(measured: dict) -> str:
    tokens = measured["tokens"]
    lines = [
        f"Calibration tokens: {tokens['text']:.0f} text, {tokens['vision']:.0f} vision ({tokens['vision'] / max(tokens['text'], 1):.1f}x "
        f"text), {tokens['vision_kept']:.0f} vision kept by the redundancy filter ({tokens['vision_kept'] / max(tokens['vision'], 1):.1%}).",
        "",
        "| expert set | TV(text, kept vision) | TV(text, all vision) | text mass on experts vision rarely picks | usage CV | largest expert share |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in measured["sets"].items():
        lines.append(f"| {name} | {m['tv_kept']:.2f} | {m['tv_all']:.2f} | {m['text_mass_on_rare_vision']:.2f} | {m['usage_cv']:.2f} | {m['usage_max_share']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], reference: dict, path: Path, dtype: object = "bfloat16") -> None:
    """Accuracy and KL against effective bits, per family; one line per method (candidates {2,3,4} and uniform);
    the unquantized reference named by its compute `dtype`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    widest = max((r["candidates"] for r in rows), key=len, default="")
    shown = [n for n in ALL if n not in ABLATIONS and not n.endswith("-transformers") and n != "gptqconfig"]
    reference_label = "float32" if str(dtype).endswith("float32") else "bf16"  # "float32" or torch.float32
    for row, (metric, label) in enumerate((("accuracy", "accuracy (exact match)"), ("kl", f"KL({reference_label} || quantized), answer positions"))):
        for axis, family in zip(axes[row], compare.FAMILIES):
            for name in shown:
                points = sorted((r["effective_bits"], r["families"][family].get(metric, 0.0)) for r in rows
                                if r["method"] == name and (r["candidates"] == widest or name.startswith("uniform") or name in ALL_PEERS))
                if points:
                    style = "--" if name in ALL_PEERS else "-"
                    axis.plot(*zip(*points), style, marker="o", label=name, linewidth=2.5 if name == "mode" else 1.2)
            if metric == "accuracy":
                axis.axhline(reference["families"][family]["accuracy"], color="black", linestyle=":", label=reference_label)
            else:
                axis.set_yscale("log")
            axis.set(title=f"{family}: {label}")
            axis.grid(alpha=0.3)
        axes[row][0].set_ylabel(label)
    for axis in axes[1]:
        axis.set_xlabel("effective bits per expert weight (incl. scales, zeros)")
    axes[0][1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(args, reference: dict, rows: list[dict], skipped: list[dict], measured: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("distributions",)}  # noqa: E731
    options = {k: str(v) for k, v in vars(args).items() if k not in ("samples",)}
    document = {"options": options, "reference": strip(reference), "rows": [strip(r) for r in rows], "skipped": skipped,
                "routing": measured}
    (args.out / "quality.json").write_text(json.dumps(document, indent=2, default=str))


def report(args, reference: dict, rows: list[dict], skipped: list[dict], measured: dict) -> str:
    text = compare.table(rows, reference)
    text += "".join(f"\n\nNot run: {s['method']} at {s['avg_bits']:g} bits: {s['error']}" for s in skipped)
    for baseline in ("frequency", "pmq", "mode"):  # against mode: what its ablations and gemq change
        paired = compare.paired_table(rows, baseline, methods=["mode", "gemq", "frequency", "pmq", *ABLATIONS])
        if paired:
            text += f"\n\nPaired against {baseline} (same budget and candidates, same questions):\n\n" + paired
    text += "\n\n" + bits_met_table(rows) + "\n\n" + specialization_table(measured)
    return text


def parse_candidates(text: str) -> tuple[int, ...]:
    return tuple(sorted(int(b) for b in text.split(",")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=evaluation.BUNDLED_MODEL.parent / "finegrained_model")
    parser.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.0, 2.5, 2.25], help="budgets of the allocations")
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 3, 2], help="widths of the uniform rows and peers")
    parser.add_argument("--candidates", type=parse_candidates, nargs="+", default=[(2, 3, 4), (2, 3)], metavar="B,B,...")
    parser.add_argument("--methods", nargs="+", default=ALL, choices=ALL)
    parser.add_argument("--group-size", type=int, default=128, help="the library default, for every method and peer")
    parser.add_argument("--calibration", type=int, default=64, help="calibration samples (the same for every method and peer)")
    parser.add_argument("--per-family", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype of every model")
    parser.add_argument("--peer-venvs", type=Path, default=Path.home() / ".cache" / "mode_hf" / "peer-venvs")
    parser.add_argument("--autoround-iters", type=int, default=200, help="AutoRound's SignRound steps per block (its default)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/finegrained"))
    parser.add_argument("--work", type=Path, help="peers' checkpoints and the calibration file (default: "
                        "~/.cache/mode-hf/quality/<out's name>; kept out of --out, which holds what is committed)")
    parser.add_argument("--plot-only", action="store_true", help="redraw quality.png from the quality.json in --out")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite quality.md (and redraw quality.png) from the quality.json in --out")
    args = parser.parse_args()
    if args.plot_only or args.report_only:
        document = json.loads((args.out / "quality.json").read_text())
        if args.report_only:
            text = report(args, document["reference"], document["rows"], document["skipped"], document["routing"])
            (args.out / "quality.md").write_text(text + "\n")
        plot(document["rows"], document["reference"], args.out / "quality.png", document["options"].get("dtype", "bfloat16"))
        return
    args.dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    logging.disable(logging.WARNING)
    work = args.work or Path.home() / ".cache" / "mode-hf" / "quality" / args.out.name
    processor = load_processor(args.model)
    unquantized = load(args.model, args)
    suite = evaluation.suite_of(unquantized)
    held_out = evaluation.held_out(args.per_family, suite_name=suite)
    args.samples = tasks.calibration_samples(args.calibration, suite_name=suite)
    args.calibration_file = peer_export.write_calibration(args.samples, work / "calibration")
    reference = evaluation.evaluate(unquantized, processor, held_out, batch_size=args.batch_size, keep_distributions=True)
    distributions = reference.pop("distributions")
    reference.update(method=str(args.dtype).removeprefix("torch."), relative_drop=0.0, **peers.linear_report(unquantized))
    measured = routing.measure(unquantized, processor, args.samples)
    print(specialization_table(measured), flush=True)
    rows, skipped, scored = [], [], {}
    for name, avg_bits, candidates in plan(args):
        start = time.perf_counter()
        try:
            model, record = quantize(name, avg_bits, candidates, processor, args, work)
        except (NotImplementedError, mode_hf.InfeasibleBudgetError, peer_export.PeerError) as error:
            # a peer that cannot install or run here; a guard the budget cannot meet (pmq at 2)
            skipped.append({"method": name, "avg_bits": avg_bits, "error": f"{type(error).__name__}: {error}"})
            print(f"not run: {name} at {avg_bits:g} bits: {error}", flush=True)
            continue
        seconds = time.perf_counter() - start
        digest = compare.fingerprint(model)
        if digest in scored:  # the same model as an earlier row: its scores, not a re-run
            result = {k: v for k, v in scored[digest].items() if k in ("families", "tasks", "examples")}
        else:
            result = evaluation.evaluate(model, processor, held_out, batch_size=args.batch_size, reference=distributions)
            scored[digest] = result
        result.update(record, method=name, avg_bits=avg_bits, candidates=candidate_label(candidates),
                      quantize_seconds=round(seconds, 1), fingerprint=digest)
        result["relative_drop"] = compare.relative_drop(result, reference)
        rows.append(result)
        print(compare.table(rows[-1:], reference).splitlines()[-1], flush=True)
        save(args, reference, rows, skipped, measured)  # after every row: a crash late in the run loses nothing
        del model
    text = report(args, reference, rows, skipped, measured)
    print(text)
    (args.out / "quality.md").write_text(text + "\n")
    save(args, reference, rows, skipped, measured)
    plot(rows, reference, args.out / "quality.png", args.dtype)


if __name__ == "__main__":
    main()
