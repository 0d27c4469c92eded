"""The main job on the bundled default model: quantize on load, save, reload, generate.

    python -m mode_hf.demo [--avg-bits 3] [--out DIR]

Until the trained benchmark model is bundled, the default is a tiny random Qwen3-VL-MoE built from the bundled
config, with procedurally drawn calibration samples; nothing is downloaded.
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
from mode_hf import tiny


def _logit_gap(model_a: torch.nn.Module, model_b: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        return float((model_a(**batch).logits - model_b(**batch).logits).abs().max())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--avg-bits", type=float, default=3.0)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--method", default="mode", choices=("mode", "uniform", "frequency"))
    parser.add_argument("--quantizer", default="gptq", choices=("gptq", "rtn"))
    parser.add_argument("--scope", default="global", choices=("global", "layer", "layer_uniform"))
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--out", type=Path, default=None, help="where to save the quantized model (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("mode_hf.demo")

    work = Path(tempfile.mkdtemp(prefix="mode-hf-demo-"))
    base_dir, out_dir = work / "base", args.out or work / "quantized"
    processor = tiny.build_processor()
    tiny.tiny_model(num_layers=4, num_experts=8, hidden=128, moe_intermediate=64).save_pretrained(base_dir)
    log.info("base model (tiny Qwen3-VL-MoE, random weights) saved to %s", base_dir)

    config = mode_hf.ModeConfig(
        avg_bits=args.avg_bits, bits=args.bits, method=args.method, quantizer=args.quantizer, scope=args.scope,
        calibration=tiny.calibration_samples(args.samples, seed=1), processor=processor,
    )
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)
    log.info("quantized on load in %.1f s", time.perf_counter() - start)
    model.save_pretrained(out_dir)
    reloaded = mode_hf.from_pretrained(out_dir)

    image, _ = tiny.draw_scene(__import__("random").Random(7))
    batch = dict(processor(text=["<|vision_start|><|image_pad|><|vision_end|>what is in the picture?"], images=[image], return_tensors="pt"))
    generated = reloaded.generate(**batch, max_new_tokens=8, do_sample=False)
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
        "generated_tokens": generated[0, batch["input_ids"].shape[1]:].tolist(),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
