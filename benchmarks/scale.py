"""Calibration at real Qwen3-VL-30B-A3B layer shapes: time per layer and peak memory against depth.

    python benchmarks/scale.py [--layers 1 2 4] [--samples 4] [--tokens 256] [--quantizer gptq] [--offload]

The text model of Qwen3-VL-30B-A3B has 48 decoder layers of 128 experts (top-8), hidden 2048, moe_intermediate
768, 32 query / 4 key-value heads of 128. This builds Qwen3-MoE language models with those layer shapes (a small
vocabulary: the embeddings are not what is measured), random bfloat16 weights, at a few depths, each saved one
layer at a time by its own process (building needs one layer's memory whatever the depth), and quantizes them with
mode-hf in another process (avg_bits 3, candidates 2/3/4, text-only random calibration tokens).
Per depth: seconds per stage and per layer, the process's peak RSS, the RSS of the loaded model before
quantization, and their difference: what calibration and quantization add on top of the model. With layer-at-a-time
calibration that difference should not grow with depth; the model itself is fully loaded, so its bytes do.
Anonymous memory (RssAnon: tensors, heap) is reported apart from RSS, which also counts pages of memory-mapped
files (the checkpoint, accelerate's offload files) that the kernel drops under pressure. With `--offload` every
decoder layer is left on disk (accelerate offload through `device_map`, weights read per forward): then the
working memory should stay about constant with depth (the packed result still grows, 0.23 GB per layer at 3 bits).
Disk: the checkpoint plus, with --offload, about as much again (transformers copies the offloaded expert weights
into the offload folder). The last line extrapolates time per layer to 48 layers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = dict(
    hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, intermediate_size=6144, vocab_size=1024, decoder_sparse_step=1,
)
FULL_DEPTH = 48


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process in MB: VmRSS (all), RssAnon (heap, tensors) or RssFile (mapped files, such
    as safetensors pages: clean, and dropped by the kernel under memory pressure)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakAnon:
    """The largest RssAnon seen, sampled every 20 ms on a thread (getrusage's peak counts mapped file pages too)."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = rss_mb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_mb("RssAnon"))


def build(layers: int) -> Path:
    """Save a random bfloat16 model of `layers` layers, one layer at a time (run in its own process: its memory is
    not measured). Every layer comes from a one-layer model built from the same config (the model's own init, its
    own seed), renamed and written as its own safetensors shard, so that building needs one layer's memory
    whatever the depth; embeddings, final norm and LM head come from the first."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    directory = Path(f"/tmp/mode_hf_scale_{layers}")
    directory.mkdir(exist_ok=True)
    Qwen3MoeConfig(num_hidden_layers=layers, **SHAPES).save_pretrained(directory)
    weight_map: dict[str, str] = {}
    total = 0
    for layer in range(layers):
        torch.manual_seed(layer)
        model = Qwen3MoeForCausalLM._from_config(Qwen3MoeConfig(num_hidden_layers=1, **SHAPES), dtype=torch.bfloat16)
        state = model.state_dict()
        tensors = {name.replace("model.layers.0.", f"model.layers.{layer}."): t.contiguous() for name, t in state.items() if name.startswith("model.layers.0.")}
        if layer == 0:
            tensors.update({name: t.contiguous() for name, t in state.items() if not name.startswith("model.layers.")})
        shard = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del model, state, tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def disk_map(layers: int) -> dict[str, str]:
    """Every decoder layer on disk; embeddings, final norm, rotary embedding and LM head in memory."""
    in_memory = {name: "cpu" for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")}
    return {**in_memory, **{f"model.layers.{i}": "disk" for i in range(layers)}}


def run_one(layers: int, samples: int, tokens: int, quantizer: str, offload: bool = False) -> dict:
    """Quantize the saved model of `layers` layers on load and measure (in this process)."""
    import torch
    from transformers import AutoModelForCausalLM

    import mode_hf
    from mode_hf.hf import quantizer as hf_quantizer

    generator = torch.Generator().manual_seed(1)
    calibration = [
        {"input_ids": torch.randint(0, SHAPES["vocab_size"], (1, tokens), generator=generator), "attention_mask": torch.ones(1, tokens, dtype=torch.long)}
        for _ in range(samples)
    ]
    loaded: dict[str, float] = {}
    quantize_model = hf_quantizer.quantize_model

    def measured(model, config, batches):  # RSS when the loaded 16-bit model is handed over for quantization
        loaded["rss"], loaded["anon"] = rss_mb(), rss_mb("RssAnon")
        loaded["model"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        return quantize_model(model, config, batches)

    hf_quantizer.quantize_model = measured
    quant = mode_hf.ModeConfig(avg_bits=3.0, bits=(2, 3, 4), group_size=128, quantizer=quantizer, calibration=calibration)
    start, anon = time.perf_counter(), PeakAnon()
    placement = {"device_map": disk_map(layers), "offload_folder": f"/tmp/mode_hf_scale_{layers}_offload"} if offload else {}
    model = AutoModelForCausalLM.from_pretrained(
        f"/tmp/mode_hf_scale_{layers}", dtype=torch.bfloat16, quantization_config=quant, **placement
    )
    seconds = time.perf_counter() - start
    peak, peak_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, anon.stop()
    return {
        "layers": layers, "seconds": round(seconds, 1), "stages": model.config.quantization_config.summary["seconds"],
        "peak_rss_mb": round(peak), "loaded_model_rss_mb": round(loaded["rss"]), "model_bytes_mb": round(loaded["model"]),
        "peak_anon_mb": round(peak_anon), "loaded_anon_mb": round(loaded["anon"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--quantizer", choices=("gptq", "rtn"), default="gptq")
    parser.add_argument("--offload", action="store_true", help="leave every decoder layer on disk (accelerate)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one depth, print JSON
    parser.add_argument("--build", type=int, help=argparse.SUPPRESS)  # internal: save the model of one depth
    args = parser.parse_args()
    if args.build is not None:
        build(args.build)
        return
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args.one, args.samples, args.tokens, args.quantizer, args.offload)))
        return
    rows = []
    for layers in args.layers:
        subprocess.run([sys.executable, __file__, "--build", str(layers)], check=True, capture_output=True)
        command = [sys.executable, __file__, "--one", str(layers), "--samples", str(args.samples), "--tokens", str(args.tokens), "--quantizer", args.quantizer]
        command += ["--offload"] if args.offload else []
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:]))
        print(f"depth {layers}: {rows[-1]}", flush=True)
    print(
        f"\nmode-hf quantize-on-load at Qwen3-VL-30B-A3B layer shapes, quantizer={args.quantizer}, "
        f"{'decoder layers offloaded to disk, ' if args.offload else ''}"
        f"{args.samples} x {args.tokens} calibration tokens, bfloat16 weights:\n"
    )
    print(
        "| layers | model MB (bf16) | RSS with the model loaded MB | peak RSS MB | peak - loaded MB | loaded anon MB | "
        "peak anon MB | statistics s | allocation s | quantization s | total s | s per layer |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        stages = row["stages"]
        print(
            f"| {row['layers']} | {row['model_bytes_mb']:,} | {row['loaded_model_rss_mb']:,} | {row['peak_rss_mb']:,} | "
            f"{row['peak_rss_mb'] - row['loaded_model_rss_mb']:,} | {row['loaded_anon_mb']:,} | {row['peak_anon_mb']:,} | "
            f"{stages.get('statistics', 0):.1f} | "
            f"{stages.get('allocation', 0):.2f} | {stages.get('quantization', 0):.1f} | {row['seconds']:.1f} | "
            f"{row['seconds'] / row['layers']:.1f} |"
        )
    last = rows[-1]
    print(
        f"\nExtrapolated to {FULL_DEPTH} layers from the deepest run: {last['seconds'] / last['layers'] * FULL_DEPTH / 60:.0f} "
        f"minutes on this machine (statistics and quantization are per layer; the allocation stays under 5 s at "
        f"48 x 128 experts, docs/performance.md)."
    )


if __name__ == "__main__":
    main()
