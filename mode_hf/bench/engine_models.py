"""Checkpoints for serving-engine tests and benchmarks, built from the bundled benchmark model (no downloads).

- `text_moe`: the bundled model's language model as a text-only Qwen3-MoE (the same trained weights; for text
  tokens the interleaved MRoPE is the plain RoPE, so it gives the VLM's text logits);
- `mode_checkpoint`: a mode checkpoint of either, per-expert mixed widths by default;
- `compressed_tensors`: a layer-uniform symmetric mode checkpoint exported for vLLM's own kernels;
- `wrong_bit_map`: a copy of a mode checkpoint whose bit map swaps two experts' widths in every set (the width
  counts stay the same, so it loads; its outputs are wrong): the negative control of engine comparisons;
- `vllm_unquantized`: the 16-bit model with its fused experts transposed into the orientation vLLM 0.32 reads
  (transformers 5 saves Qwen3-VL-MoE experts as [E, 2I, H] and [E, H, I]; vLLM reads the original release's
  [E, H, 2I] and [E, I, H], and would read a square layout wrong without an error).

    python -m mode_hf.bench.engine_models OUT_DIR     # all of them, for benchmarks/vllm_throughput.py
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import tasks
from .evaluation import BUNDLED_MODEL

MIXED = {"method": "mode", "avg_bits": 4.5, "bits": (2, 3, 4, 8)}  # all four widths on the bundled model
CALIBRATION_SAMPLES = 16


def text_moe(out: Path, source: Path = BUNDLED_MODEL) -> Path:
    """The bundled VLM's language model as a Qwen3MoeForCausalLM checkpoint with its tokenizer."""
    from transformers import AutoConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from ..hf.checkpoint import load_processor

    text = AutoConfig.from_pretrained(source).text_config
    config = Qwen3MoeConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        moe_intermediate_size=text.moe_intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim, num_experts=text.num_experts, num_experts_per_tok=text.num_experts_per_tok,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"]},
        tie_word_embeddings=False, pad_token_id=text.pad_token_id, eos_token_id=text.eos_token_id, bos_token_id=None,
    )
    weights = {}
    for path in sorted(source.glob("*.safetensors")):
        for key, value in load_file(path).items():
            if key.startswith("model.language_model."):
                weights["model." + key.removeprefix("model.language_model.")] = value
            elif key == "lm_head.weight":
                weights[key] = value
    model = Qwen3MoeForCausalLM(config)
    model.load_state_dict(weights, strict=True)
    model.save_pretrained(out)
    load_processor(source).tokenizer.save_pretrained(out)
    return out


def mode_checkpoint(base: Path, out: Path, text_only: bool, **options: Any) -> Path:
    """A mode checkpoint of `base` (the bundled VLM or `text_moe`), calibrated on the bundled samples (text ones
    for a text model); options: ModeConfig's (default: per-expert mixed widths, `MIXED`)."""
    import mode_hf
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from ..hf.checkpoint import load_processor

    processor = load_processor(BUNDLED_MODEL)
    samples = tasks.calibration_samples(CALIBRATION_SAMPLES)
    if text_only:
        samples, processor = [s for s in samples if "image" not in s] + [{"text": e.prompt + e.answer} for e in tasks.make_examples("text", 12, seed=7)], processor.tokenizer
    config = mode_hf.ModeConfig(group_size=32, calibration=samples, processor=processor, **{**MIXED, **options})
    model_class = AutoModelForCausalLM if text_only else AutoModelForImageTextToText
    model = model_class.from_pretrained(base, quantization_config=config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def compressed_tensors(base: Path, out: Path, text_only: bool, bits: int = 4) -> Path:
    """A layer-uniform symmetric `bits`-bit mode checkpoint of `base` (kept beside `out` as `<out>-mode`, the
    reference the export must reproduce), exported as compressed-tensors to `out`."""
    from ..hf.export import export_compressed_tensors

    source = mode_checkpoint(base, out.with_name(out.name + "-mode"), text_only, method="uniform", avg_bits=bits, bits=(bits,), symmetric=True)
    export_compressed_tensors(source, out)
    return out


def wrong_bit_map(source: Path, out: Path) -> Path:
    """A copy of mode checkpoint `source` whose bit map swaps the widths of the first two experts of different
    widths in every set."""
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    for widths in config["quantization_config"]["bit_map"].values():
        other = next(i for i, b in enumerate(widths) if b != widths[0])
        widths[0], widths[other] = widths[other], widths[0]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def vllm_unquantized(source: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The 16-bit `source` in `dtype`, its Qwen3-VL-MoE fused experts transposed to vLLM 0.32's orientation."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    weights = {}
    for path in sorted(source.glob("*.safetensors")):
        weights.update(load_file(path))
    for key in list(weights):
        value = weights[key].to(dtype) if weights[key].is_floating_point() else weights[key]
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            value = value.transpose(1, 2)
        weights[key] = value.contiguous()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def build_all(out: Path) -> dict[str, Path]:
    """Every checkpoint of this module under `out`: {name: directory}."""
    out.mkdir(parents=True, exist_ok=True)
    made = {"text_moe": text_moe(out / "text_moe")}
    made["text_mixed"] = mode_checkpoint(made["text_moe"], out / "text_mixed", text_only=True, dense_bits=8)
    made["text_ct4"] = compressed_tensors(made["text_moe"], out / "text_ct4", text_only=True)
    made["vl_bf16"] = vllm_unquantized(BUNDLED_MODEL, out / "vl_bf16")
    made["vl_mixed"] = mode_checkpoint(BUNDLED_MODEL, out / "vl_mixed", text_only=False)
    made["vl_ct4"] = compressed_tensors(BUNDLED_MODEL, out / "vl_ct4", text_only=False)
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    for name, path in build_all(parser.parse_args(argv).out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
