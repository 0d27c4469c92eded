"""The `mode-hf` command line: quantize, eval, report, demo, export.

    mode-hf quantize MODEL_DIR --avg-bits 3 --calib DATA --out DIR [--method ...] [--scope ...] [--push-to-hub REPO]
    mode-hf eval DIR                 # the bundled held-out tasks; results go into DIR's model card
    mode-hf report DIR               # PNGs in DIR/report, and the card showing them
    mode-hf demo                     # the main job on the bundled model
    mode-hf export DIR --format compressed-tensors --out OUT [--requantize-from BASE_MODEL --calib DATA]

DATA is `bundled` (the bundled task samples), a JSONL file of {"image": path, "text": ...} lines, or a `datasets`
directory saved with `save_to_disk` (`--image-column`, `--text-column`, `--split`). Options are checked before the
model is loaded or any calibration runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import methods
from .config import DENSE_BITS, SCOPES, ModeConfig
from .errors import ModeError, UsageError
from .hf import card
from .hf.checkpoint import already_quantized, auto_model_class, load_processor

logger = logging.getLogger("mode_hf.cli")


def _check_out(source: Path, out: Path) -> None:
    """Refuse an output directory that is the source, inside it or holds it: the save would replace the source."""
    source, out = source.resolve(), out.resolve()
    if out == source or source in out.parents or out in source.parents:
        relation = "is" if out == source else ("is inside" if source in out.parents else "contains")
        raise UsageError(f"--out {out} {relation} the source {source}: writing there would replace it. Choose another directory.")


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").exists():
        raise UsageError(f"{path} is not a model directory (no config.json): give a directory saved with save_pretrained.")


# ---------------------------------------------------------------------------------------------------- commands
def config_from_args(args: argparse.Namespace, **overrides: Any) -> ModeConfig:
    """ModeConfig from the quantize options (validated here, before anything is loaded)."""
    options = {
        "avg_bits": args.avg_bits, "bits": args.bits, "method": args.method, "quantizer": args.quantizer,
        "scope": args.scope, "group_size": args.group_size, "symmetric": args.symmetric, "dense_bits": args.dense_bits,
        "batch_size": args.batch_size, "seed": args.seed,
    }
    return ModeConfig(**{**options, **overrides})


def quantize(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize MODEL_DIR on load, save it with its processor, draw the report, write the card, maybe push."""
    from .calibrate.sources import load_calibration

    _check_model_dir(args.model)
    _check_out(args.model, args.out)
    if (json.loads((args.model / "config.json").read_text()).get("quantization_config") or {}).get("quant_method") == "mode":
        raise UsageError(already_quantized(args.model))
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / "config.json").exists():
        raise UsageError(f"--out {args.out} exists and is not a model directory: choose an empty or new directory.")
    clock = time.perf_counter()
    processor = load_processor(args.model)
    samples = load_calibration(args.calib, num_samples=args.samples, image_column=args.image_column,
                               text_column=args.text_column, split=args.split)
    config = config_from_args(args, calibration=samples, processor=processor)  # bad options fail here, before loading
    loading = time.perf_counter() - clock
    model = auto_model_class(args.model).from_pretrained(args.model, quantization_config=config)
    clock = time.perf_counter()
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    saving = time.perf_counter() - clock
    summary = dict(model.config.quantization_config.summary)
    summary["seconds"] = {"calibration data": round(loading, 3), **summary["seconds"], "save": round(saving, 3)}
    pictures = [] if args.no_report else draw_report(args.out)
    print(summary_table(summary, pictures))
    if args.push_to_hub:
        from .hf.hub import push_folder

        card.write_model_card(args.out, args.push_to_hub)
        print(f"pushed: {push_folder(args.out, args.push_to_hub)}")
    return summary


def summary_table(summary: dict[str, Any], pictures: Sequence[Path] = ()) -> str:
    """The end-of-run table: bits histogram, effective bits, bytes before/after, time per stage."""
    histogram = summary["bits_histogram"]
    total = sum(histogram.values()) or 1
    expert_bytes = summary["expert_bytes"]
    rows = [("experts per width", "  ".join(f"{b}-bit: {n} ({100 * n / total:.0f}%)" for b, n in histogram.items())),
            ("average bits (bit map)", f"{summary['average_bits']:.3f}"),
            ("effective bits (+ scales, zeros)", f"{summary['effective_bits']:.3f}"),
            ("expert bytes 16-bit -> packed", f"{expert_bytes['bf16'] / 1e6:,.2f} MB -> {expert_bytes['packed'] / 1e6:,.2f} MB "
             f"({100 * expert_bytes['packed'] / max(expert_bytes['bf16'], 1):.1f}%)")]
    if summary.get("dense"):
        dense = summary["dense"]["bytes"]
        rows.append(("dense linear bytes 16-bit -> packed", f"{dense['bf16'] / 1e6:,.2f} MB -> {dense['packed'] / 1e6:,.2f} MB"))
    if summary.get("tokens"):
        tokens = summary["tokens"]
        rows.append(("calibration tokens", f"text {tokens['text']:,}, vision {tokens['vision']:,} (kept {tokens['vision_kept']:,})"))
    rows += [(f"time: {stage}", f"{seconds:.1f} s") for stage, seconds in summary["seconds"].items() if seconds]
    rows += [("picture", str(p)) for p in pictures]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The bundled held-out tasks on a checkpoint; the families' results go into its model card."""
    from .bench import evaluation

    _check_model_dir(args.checkpoint)
    result = evaluation.evaluate_checkpoint(args.checkpoint, args.processor, args.per_family, batch_size=args.batch_size)
    print(evaluation.format_table(result))
    if result["quantized"]:
        kept = {k: result[k] for k in ("families", "tasks", "checkpoint")}
        (args.checkpoint / card.EVAL_FILE).write_text(json.dumps(kept, indent=2))
        card.write_model_card(args.checkpoint)
    return result


def draw_report(checkpoint: Path, out: Path | None = None) -> list[Path]:
    """The report PNGs of a mode checkpoint in `out` (default CHECKPOINT/report, and then the card shows them)."""
    from .hf.report import write_report  # matplotlib: only when drawing

    written = write_report(checkpoint, out or checkpoint / card.REPORT_DIR)
    if out is None:
        card.write_model_card(checkpoint)
    return written


def report(args: argparse.Namespace) -> list[Path]:
    """`mode-hf report`: draw the pictures and list them."""
    _check_model_dir(args.checkpoint)
    written = draw_report(args.checkpoint, args.out)
    print("\n".join(str(p) for p in written))
    return written


def export(args: argparse.Namespace) -> dict[str, Any]:
    """compressed-tensors export; with --requantize-from, first re-solve layer-uniform (symmetric) at the budget of
    DIR's allocation and quantize BASE_MODEL with it."""
    from .hf.export import export_compressed_tensors

    _check_model_dir(args.checkpoint)
    _check_out(args.checkpoint, args.out)
    if args.requantize_from:
        _check_out(args.requantize_from, args.out)
    source = args.checkpoint
    if args.requantize_from:
        options = json.loads((args.checkpoint / "config.json").read_text())["quantization_config"]
        keep = ("avg_bits", "bits", "method", "quantizer", "group_size", "dense_bits", "batch_size", "seed")
        requantized = args.out.parent / f"{args.out.name}.mode-layer-uniform"
        quantize_args = argparse.Namespace(
            model=args.requantize_from, out=requantized, calib=args.calib, samples=args.samples,
            image_column=args.image_column, text_column=args.text_column, split=args.split,
            push_to_hub=None, no_report=True, **{k: options[k] for k in keep}, scope="layer_uniform", symmetric=True,
        )
        print(f"re-solving layer-uniform at {options['avg_bits']} bits from {args.requantize_from} -> {requantized}")
        quantize(quantize_args)
        source = requantized
    result = export_compressed_tensors(source, args.out)
    print(json.dumps(result, indent=2))
    return result


def write_tasks(args: argparse.Namespace) -> dict:
    """mode-hf tasks: the bundled held-out tasks as lm-eval and lmms-eval task folders."""
    from .bench import tasks as bench_tasks
    from .harness import tasks as harness_tasks

    if args.suite not in bench_tasks.SUITES:
        raise UsageError(f"--suite {args.suite!r}: one of {', '.join(bench_tasks.SUITES)}")
    written = harness_tasks.write(args.out, suite=args.suite, per_family=args.per_family)
    out = args.out.resolve()
    print(f"lm-eval:   mode-hf-lm-eval --model mode-hf --model_args pretrained=CKPT --include_path {out / 'lm_eval'} --tasks modehf_text")
    print(f"lmms-eval: lmms-eval --model mode_qwen3_vl --model_args pretrained=CKPT --include_path {out / 'lmms_eval'} --tasks modehf_text,modehf_vision")
    return written


# ---------------------------------------------------------------------------------------------------- parser
def _add_calibration_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--calib", default="bundled", required=required,
                        help="'bundled', a JSONL file of {\"image\": path, \"text\": ...}, or a datasets directory")
    parser.add_argument("--samples", type=int, default=None, help="use the first N calibration samples")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict (default: train)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mode-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="quantize a model directory and save it")
    q.add_argument("model", type=Path, help="model directory (saved with save_pretrained, processor included)")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--avg-bits", type=float, default=3.0)
    q.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    q.add_argument("--method", default="mode", choices=tuple(methods.METHODS))
    q.add_argument("--quantizer", default="gptq", choices=tuple(methods.QUANTIZERS))
    q.add_argument("--scope", default=None, choices=SCOPES, help="default: the method's own")
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--symmetric", action="store_true", help="symmetric quantization (needed by export)")
    q.add_argument("--dense-bits", type=int, default=None, choices=[b for b in DENSE_BITS if b is not None])
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--push-to-hub", default=None, metavar="REPO")
    q.add_argument("--no-report", action="store_true", help="skip the PNG report")
    _add_calibration_options(q, required=False)
    q.set_defaults(run=quantize)

    e = commands.add_parser("eval", help="exact match and answer NLL on the bundled held-out tasks")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--processor", type=Path, default=None)
    e.add_argument("--per-family", type=int, default=200)
    e.add_argument("--batch-size", type=int, default=16)
    e.set_defaults(run=evaluate)

    r = commands.add_parser("report", help="PNG pictures of a mode checkpoint")
    r.add_argument("checkpoint", type=Path)
    r.add_argument("--out", type=Path, default=None, help="default: CHECKPOINT/report (and the card shows them)")
    r.set_defaults(run=report)

    commands.add_parser("demo", help="the main job on the bundled model (its options: mode-hf demo --help)")

    x = commands.add_parser("export", help="write a checkpoint serving engines load")
    x.add_argument("checkpoint", type=Path)
    x.add_argument("--format", default="compressed-tensors", choices=("compressed-tensors",))
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--requantize-from", type=Path, default=None, metavar="BASE_MODEL",
                   help="re-solve layer-uniform at the checkpoint's budget from this 16-bit model first")
    _add_calibration_options(x, required=False)
    x.set_defaults(run=export)

    t = commands.add_parser("tasks", help="write the bundled tasks as lm-eval and lmms-eval task folders")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--suite", default="bench", help="the bundled model's suite: bench or finegrained")
    t.add_argument("--per-family", type=int, default=200, help="held-out questions per family (mode-hf eval's)")
    t.set_defaults(run=write_tasks)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: run a command; exit status 2 with a one-line message for bad input."""
    run(argv)


def run(argv: Sequence[str] | None = None) -> Any:
    """Run a command and return its result (what tests and scripts use)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # its options are the demo's own (mode-hf demo --help lists them)
        from .bench import demo as demo_module

        return demo_module.main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except ModeError as error:
        print(f"mode-hf {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
