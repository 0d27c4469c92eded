"""The main job on the bundled default model: quantize on load, save, reload, generate, evaluate.

    mode-hf demo [--avg-bits 3] [--out DIR] [--eval-per-family 100]      (or python -m mode_hf.bench.demo ...)

The default model is the bundled trained benchmark model (`mode_hf/bench/assets/bench_model`, a small
Qwen3-VL-MoE trained by `benchmarks/train_model.py`), calibrated on bundled task samples and evaluated on the
held-out tasks before and after quantization. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

import mode_hf
from mode_hf import methods
from mode_hf.config import SCOPES

from ..hf.checkpoint import load_processor
from . import evaluation, tasks
from .processor import IMAGE_PLACEHOLDER


def _logit_gap(model_a: torch.nn.Module, model_b: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        return float((model_a(**batch).logits - model_b(**batch).logits).abs().max())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="mode-hf demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--avg-bits", type=float, default=3.0)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--method", default="mode", choices=tuple(methods.METHODS))
    parser.add_argument("--quantizer", default="gptq", choices=tuple(methods.QUANTIZERS))
    parser.add_argument("--scope", default=None, choices=SCOPES, help="default: the method's own")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--out", type=Path, default=None, help="where to save the quantized model (default: a temp dir)")
    parser.add_argument("--eval-per-family", type=int, default=100, help="held-out examples per family (0: skip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("mode_hf.bench.demo")

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="mode-hf-demo-")) / "quantized"  # kept: the summary names it
    base_dir, processor = evaluation.BUNDLED_MODEL, load_processor(evaluation.BUNDLED_MODEL)
    calibration = tasks.calibration_samples(args.samples)
    log.info("base model: the bundled trained benchmark model %s", base_dir)

    config = mode_hf.ModeConfig(
        avg_bits=args.avg_bits, bits=args.bits, method=args.method, quantizer=args.quantizer, scope=args.scope,
        group_size=32, calibration=calibration, processor=processor,
    )
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)
    log.info("quantized on load in %.1f s", time.perf_counter() - start)
    model.save_pretrained(out_dir)
    reloaded = mode_hf.from_pretrained(out_dir)

    example = tasks.make_examples("vision", 1, seed=7)[0]
    prompt = tasks.model_text(example, IMAGE_PLACEHOLDER)
    batch = dict(processor(text=[prompt], images=[example.image], return_tensors="pt"))
    generated = reloaded.generate(**batch, max_new_tokens=16, do_sample=False)
    summary = reloaded.config.quantization_config.summary
    report = {
        "saved_to": str(out_dir),
        "bits_histogram": summary["bits_histogram"],
        "average_bits": summary["average_bits"],
        "effective_bits": summary["effective_bits"],
        "expert_bytes": summary["expert_bytes"],
        "keep_ratio": summary.get("keep_ratio"),
        "tokens": summary.get("tokens"),
        "seconds": summary["seconds"],
        "reload_max_logit_difference": _logit_gap(model, reloaded, batch),
        "example": {"prompt": example.prompt, "answer": example.answer,
                    "generated": processor.tokenizer.decode(generated[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)},
    }
    if args.eval_per_family:
        held_out = evaluation.held_out(args.eval_per_family)
        base = AutoModelForImageTextToText.from_pretrained(base_dir)
        for name, candidate in (("unquantized", base), ("quantized", reloaded)):
            families = evaluation.evaluate(candidate, processor, held_out)["families"]
            report[f"accuracy_{name}"] = {f: round(r["accuracy"], 4) for f, r in families.items()}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
