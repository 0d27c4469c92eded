"""Quality of every method at the same budgets, side by side, on the bundled trained benchmark model.

    python benchmarks/quality.py [--bits 4 3 2.5 2] [--methods ...] [--per-family 200] [--out docs/results]

For each average-bit budget and method: quantize (same calibration set, CALIBRATION_SEED), evaluate on the fixed
held-out sets (EVAL_SEED), and report text and vision accuracy and answer NLL, the average relative accuracy drop
vs the 16-bit model measured in the same run, effective bits of the experts (scales and zeros included) and their
bytes. Rows:
- mode-hf methods: uniform RTN / GPTQ, frequency, pmq, gemq, mode (all through ModeConfig, quantize on load);
- ablations of mode: no redundancy filter, no per-modality sensitivity (modality-split frequency x weight error),
  no modality split (total frequency + sensitivity), text tokens weighted x4 in the GPTQ Hessian;
- peers (benchmarks/peers.py): HQQ and optimum-quanto through their transformers configs (they leave the fused
  experts in 16-bit) and applied directly to the expert weights at the same width and group size.
Uniform methods and peers only run at integer budgets their library supports. Prints a markdown table, writes it
with the full results as JSON, and draws accuracy vs effective bits per method (PNG).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

import mode_hf  # noqa: E402
from mode_hf.bench import evaluation, tasks  # noqa: E402
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
    "mode-freq-split": dict(method="mode", sensitivity="weight"),
    "mode-no-split": dict(method="mode", modality_split=False),
    "mode-text-hessian": dict(method="mode", text_hessian_weight=4.0),
}
PEERS = ["hqq-experts", "quanto-experts", "hqq-transformers", "quanto-transformers"]
ALL = list(MODE_METHODS) + list(ABLATIONS) + PEERS


def relative_drop(result: dict, reference: dict) -> float:
    """Mean over families of (reference accuracy - accuracy) / reference accuracy."""
    drops = []
    for family, ref in reference["families"].items():
        if ref["accuracy"] > 0:
            drops.append((ref["accuracy"] - result["families"][family]["accuracy"]) / ref["accuracy"])
    return sum(drops) / len(drops)


def load(model_dir: Path, args, **options):
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=args.dtype, **options)


def quantize(name: str, avg_bits: float, processor, args) -> tuple[torch.nn.Module, dict] | None:
    """The model quantized by `name` at `avg_bits`, and its expert-size record; None where it does not apply."""
    if name in PEERS:
        library, how = name.split("-")
        if avg_bits != int(avg_bits) or int(avg_bits) not in peers.LIBRARY_BITS[library]:
            return None
        if how == "transformers":
            model = load(args.model, args, quantization_config=peers.transformers_config(library, int(avg_bits)))
            return model, peers.linear_report(model)
        model = load(args.model, args)
        return model, peers.quantize_experts(model, library, int(avg_bits), args.group_size)
    options = dict(MODE_METHODS.get(name) or ABLATIONS[name])
    if options["method"] == "uniform" and avg_bits not in args.candidates:
        return None
    config = mode_hf.ModeConfig(
        avg_bits=avg_bits, bits=args.candidates, group_size=args.group_size, processor=processor,
        calibration=tasks.calibration_samples(args.calibration), **options,
    )
    model = load(args.model, args, quantization_config=config)
    summary = model.config.quantization_config.summary
    record = {"effective_bits": summary["effective_bits"], "expert_bytes": summary["expert_bytes"]["packed"],
              "keep_ratio": summary.get("keep_ratio"), "histogram": summary["bits_histogram"],
              "bit_map": model.config.quantization_config.bit_map, "frequency": summary.get("frequency"),
              "tokens": summary.get("tokens")}
    return model, record


def table(rows: list[dict], reference: dict) -> str:
    def cells(r: dict) -> str:
        text, vision = r["families"]["text"], r["families"]["vision"]
        return (f"{100 * text['accuracy']:.1f}% | {100 * vision['accuracy']:.1f}% | {text['nll']:.3f} | "
                f"{vision['nll']:.3f} | {100 * r['relative_drop']:.1f}% | {r['effective_bits']:.3f} | {r['expert_bytes']:,} |")

    lines = [
        "| bits | method | text acc | vision acc | text NLL | vision NLL | avg rel. drop | effective bits | expert bytes |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| 16 | {reference['method']} | " + cells(reference),
    ]
    lines += [f"| {r['avg_bits']:g} | {r['method']} | " + cells(r) for r in rows]
    return "\n".join(lines)


def routing_diagnostics(rows: list[dict]) -> str:
    """Why methods differ: how modality-specialized the routing is, and the bits each modality's tokens meet.

    Specialization per layer: total-variation distance between the text and the kept-vision routing distributions
    (0: identical, 1: disjoint experts), from the routing statistics recorded by the first row that gathers them
    (the same calibration set and redundancy filter for every method). Bits a modality meets: sum over experts of its routing frequency x the expert's width / sum of frequencies.
    """
    measured = [r for r in rows if r.get("frequency")]
    if not measured:
        return ""
    frequency, tokens = measured[0]["frequency"], measured[0]["tokens"]
    lines = [
        f"Calibration tokens: {tokens['text']} text, {tokens['vision']} vision "
        f"({tokens['vision'] / max(tokens['text'], 1):.1f}x text), {tokens['vision_kept']} vision kept by the filter.",
        "",
        "| expert set | TV(text, vision) | top text experts | top vision experts |",
        "|---|---|---|---|",
    ]
    for name, f in frequency.items():
        text, vision = torch.tensor(f["text"]), torch.tensor(f["vision"])
        distance = 0.5 * (text / text.sum() - vision / vision.sum()).abs().sum()
        top = lambda v: ", ".join(str(i) for i in v.argsort(descending=True)[:3].tolist())  # noqa: E731
        lines.append(f"| {name} | {distance:.2f} | {top(text)} | {top(vision)} |")
    lines += ["", "| bits | method | bits text tokens meet | bits vision tokens meet |", "|---|---|---|---|"]
    for r in rows:
        if not r.get("bit_map"):
            continue
        met = {}
        for modality in ("text", "vision"):
            weights = torch.cat([torch.tensor(frequency[n][modality]) for n in r["bit_map"]])
            widths = torch.cat([torch.tensor(r["bit_map"][n], dtype=torch.float64) for n in r["bit_map"]])
            met[modality] = float((weights * widths).sum() / weights.sum())
        lines.append(f"| {r['avg_bits']:g} | {r['method']} | {met['text']:.2f} | {met['vision']:.2f} |")
    return "\n".join(lines)


def paired_comparison(rows: list[dict], baseline: str = "frequency", resamples: int = 2000) -> str:
    """Each allocation method against `baseline` at the same budget, on the same held-out questions: the mean
    per-question difference in answer NLL per family with a 95% paired bootstrap interval (negative: lower loss
    than the baseline), and the exact-match answers it gets right where the baseline is wrong, and the reverse.
    Paired differences are far less noisy than the two accuracies side by side (both models see the same questions)."""
    generator = torch.Generator().manual_seed(0)
    lines = [
        f"| bits | method | text NLL - {baseline} [95% CI] | vision NLL - {baseline} [95% CI] | text right/wrong vs {baseline} | vision right/wrong vs {baseline} |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next((b for b in rows if b["method"] == baseline and b["avg_bits"] == row["avg_bits"]), None)
        if base is None or row is base or not row.get("bit_map") or row["method"].startswith("uniform"):
            continue
        if row["bit_map"] == base["bit_map"] and row["examples"] == base["examples"]:  # same widths, same quantizer
            lines.append(f"| {row['avg_bits']:g} | {row['method']} | same allocation | | | |")
            continue
        intervals, answers = [], []
        for family in ("text", "vision"):
            pairs = [(a, b) for a, b in zip(row["examples"], base["examples"]) if a["family"] == family]
            difference = torch.tensor([a["nll"] - b["nll"] for a, b in pairs], dtype=torch.float64)
            means = difference[torch.randint(len(difference), (resamples, len(difference)), generator=generator)].mean(dim=1)
            low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
            intervals.append(f"{difference.mean():+.4f} [{low:+.4f}, {high:+.4f}]")
            answers.append(f"{sum(a['correct'] and not b['correct'] for a, b in pairs)} / {sum(b['correct'] and not a['correct'] for a, b in pairs)}")
        cells = intervals + answers
        lines.append(f"| {row['avg_bits']:g} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def without_experts(model: torch.nn.Module, processor, held_out, batch_size: int) -> dict:
    """Accuracy of the 16-bit model with every routed expert set's output replaced by zeros: how much of the
    accuracy rides on the experts at all (shared layers, attention and the residual stream keep the rest)."""
    from mode_hf.model.structure import find_expert_sets

    handles = [
        model.get_submodule(s.name).register_forward_hook(lambda module, args, output: torch.zeros_like(output))
        for s in find_expert_sets(model)
    ]
    try:
        return evaluation.evaluate(model, processor, held_out, batch_size=batch_size)
    finally:
        for handle in handles:
            handle.remove()


def plot(rows: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)  # own y-scale per panel: the families differ
    names = [n for n in ALL if n not in ABLATIONS and not n.endswith("-transformers")]
    for row, (metric, label) in enumerate((("accuracy", "accuracy (exact match)"), ("nll", "answer NLL (lower is better)"))):
        for axis, family in zip(axes[row], ("text", "vision")):
            for name in names:
                points = sorted((r["effective_bits"], r["families"][family][metric]) for r in rows if r["method"] == name)
                if points:
                    style = "--" if name in PEERS else "-"
                    axis.plot(*zip(*points), style, marker="o", label=name, linewidth=2.5 if name == "mode" else 1.2)
            axis.axhline(reference["families"][family][metric], color="black", linestyle=":", label=reference["method"])
            axis.set(title=f"{family}: {label}, held-out")
            axis.grid(alpha=0.3)
        axes[row][0].set_ylabel(label)
    for axis in axes[1]:
        axis.set_xlabel("effective bits per expert weight (incl. scales, zeros)")
    axes[0][1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=evaluation.BUNDLED_MODEL)
    parser.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.0, 2.5, 2.0])
    parser.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=ALL, choices=ALL)
    parser.add_argument("--group-size", type=int, default=128, help="the library default; with hidden 128 one group per row")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--per-family", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype of every model")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--plot-only", action="store_true", help="redraw quality.png from the quality.json in --out")
    args = parser.parse_args()
    if args.plot_only:
        document = json.loads((args.out / "quality.json").read_text())
        plot(document["rows"], document["reference"], args.out / "quality.png")
        return
    args.dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    logging.disable(logging.WARNING)
    processor = load_processor(args.model)
    held_out = evaluation.held_out(args.per_family)
    unquantized = load(args.model, args)
    reference = evaluation.evaluate(unquantized, processor, held_out, batch_size=args.batch_size)
    zeroed = without_experts(unquantized, processor, held_out, args.batch_size)
    reliance = (
        "Routed experts zeroed (16-bit model, every expert set's output replaced by 0): "
        + ", ".join(f"{f} accuracy {100 * zeroed['families'][f]['accuracy']:.1f}% (NLL {zeroed['families'][f]['nll']:.3f})" for f in ("text", "vision"))
        + "."
    )
    print(reliance, flush=True)
    reference.update(method=str(args.dtype).removeprefix("torch."), relative_drop=0.0, **peers.linear_report(unquantized))
    rows, skipped = [], []
    for avg_bits in args.bits:
        for name in args.methods:
            start = time.perf_counter()
            try:
                quantized = quantize(name, avg_bits, processor, args)
            except (NotImplementedError, mode_hf.InfeasibleBudgetError) as error:
                # a peer's transformers integration that this version lacks; a guard the budget cannot meet (pmq at 2)
                skipped.append({"method": name, "avg_bits": avg_bits, "error": f"{type(error).__name__}: {error}"})
                print(f"skipped {name} at {avg_bits:g} bits: {error}", flush=True)
                continue
            if quantized is None:
                continue
            model, record = quantized
            seconds = time.perf_counter() - start
            result = evaluation.evaluate(model, processor, held_out, batch_size=args.batch_size)
            result.update(record, method=name, avg_bits=avg_bits, quantize_seconds=round(seconds, 1))
            result["relative_drop"] = relative_drop(result, reference)
            rows.append(result)
            print(table(rows[-1:], reference).splitlines()[-1], flush=True)
            save_json(args, reference, rows, skipped)  # after every row: a crash late in the run loses nothing
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows, reference)
    text += "".join(f"\n\nNot run: {s['method']} at {s['avg_bits']:g} bits ({s['error']})." for s in skipped)
    print(text)
    paired = paired_comparison(rows)
    diagnostics = reliance + "\n\n" + (paired + "\n\n" if paired else "") + routing_diagnostics(rows)
    print(diagnostics)
    (args.out / "quality.md").write_text(text + "\n\n" + diagnostics + "\n")
    save_json(args, reference, rows, skipped)
    plot(rows, reference, args.out / "quality.png")


def save_json(args, reference: dict, rows: list[dict], skipped: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    strip = lambda r: {k: v for k, v in r.items() if k != "examples"}  # noqa: E731
    options = {k: str(v) for k, v in vars(args).items()}
    document = {"options": options, "reference": strip(reference), "rows": [strip(r) for r in rows], "skipped": skipped}
    (args.out / "quality.json").write_text(json.dumps(document, indent=2, default=str))


if __name__ == "__main__":
    main()
