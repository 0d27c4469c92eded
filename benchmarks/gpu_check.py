"""One-shot GPU check: on a machine with a CUDA GPU, `pip install -e .[gpu,test]` then

    python benchmarks/gpu_check.py [--json gpu_check.json]          # about 5 minutes on an H100/H200

1. runs the Triton kernel tests compiled on the GPU (tests/test_triton.py with TRITON_INTERPRET=0);
2. quantizes the bundled model on load with device_map="cuda" (mode, 3 bits, bundled calibration), saves it,
   reloads it on the GPU, generates, and compares the reloaded model's logits on the GPU (Triton kernels) with the
   same checkpoint on the CPU (native kernels) and with the torch path on the GPU (MODE_HF_EXPERTS_KERNEL=torch);
3. times one MoE layer at Qwen3-VL-30B-A3B shapes (hidden 2048, moe_intermediate 768, 128 experts, top-8, group
   128, bf16) for decode (1 and 8 tokens) and prefill (512 and 4096 tokens) at 2, 3, 4 bits and mixed 2/3/4,
   against bf16 torch._grouped_mm on the same routed pairs and against the bandwidth floor (packed bytes of the
   routed experts / measured device-to-device copy bandwidth); prints one table and writes it as JSON.

Without a GPU, `python benchmarks/gpu_check.py --tiny` runs the same three steps end to end on CPU through Triton's
interpreter (TRITON_INTERPRET=1, set here) with tiny shapes: it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN3_VL_30B = dict(hidden=2048, intermediate=768, experts=128, top_k=8, group=128)
TINY = dict(hidden=64, intermediate=32, experts=8, top_k=2, group=32)
WIDTH_MIXES = {"2-bit": {2: 1.0}, "3-bit": {3: 1.0}, "4-bit": {4: 1.0}, "mixed 2/3/4": {2: 0.3, 3: 0.6, 4: 0.1}}


def run_tests(interpreted: bool) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpreted else "0"}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton.py"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"passed": run.returncode == 0, "summary": summary, "seconds": round(time.perf_counter() - start, 1),
            "output_tail": "" if run.returncode == 0 else (run.stdout + run.stderr)[-3000:]}


def end_to_end(device: str, interpreted: bool) -> dict:
    """Quantize the bundled model on load on `device`, save, reload, generate; logits against the CPU path and the
    torch path."""
    import torch
    from transformers import AutoModelForImageTextToText

    import mode_hf
    from mode_hf.bench import tasks
    from mode_hf.bench.evaluation import BUNDLED_MODEL
    from mode_hf.hf.checkpoint import load_processor

    processor = load_processor(BUNDLED_MODEL)
    config = mode_hf.ModeConfig(avg_bits=3.0, calibration=tasks.calibration_samples(8 if interpreted else 32),
                                processor=processor, group_size=32)
    placement = {"device_map": device} if device != "cpu" else {}
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(BUNDLED_MODEL, quantization_config=config, dtype=torch.bfloat16, **placement)
    quantize_seconds = time.perf_counter() - start
    example = tasks.make_examples("text", 1, seed=3)[0]
    inputs = processor.tokenizer(example.prompt, return_tensors="pt")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        reloaded = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, **placement).eval()
        on_cpu = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits = reloaded(**inputs.to(device)).logits[0, -1].float().cpu()
            generated = reloaded.generate(**inputs.to(device), max_new_tokens=4, do_sample=False)
            chosen = os.environ.get("MODE_HF_EXPERTS_KERNEL", "auto")
            os.environ["MODE_HF_EXPERTS_KERNEL"] = "auto"  # CPU tensors: the native kernels
            cpu_logits = on_cpu(**inputs.to("cpu")).logits[0, -1].float()
            os.environ["MODE_HF_EXPERTS_KERNEL"] = "torch"  # on `device`: the torch unpack + grouped-matmul path
            torch_logits = reloaded(**inputs.to(device)).logits[0, -1].float().cpu()
            os.environ["MODE_HF_EXPERTS_KERNEL"] = chosen
    scale = float(cpu_logits.abs().max())
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:].cpu())
    return {"device": device, "quantize_seconds": round(quantize_seconds, 1), "prompt": example.prompt,
            "expected": example.answer, "generated": answer,
            "max_logit_diff_vs_cpu": float((logits - cpu_logits).abs().max()),
            "max_logit_diff_vs_torch_path": float((logits - torch_logits).abs().max()), "logit_scale": scale,
            "same_argmax_as_cpu": int(logits.argmax()) == int(cpu_logits.argmax())}


def make_layer(shape: dict, mix: dict[int, float], device, seed: int = 0):
    """Random packed storage of one layer in mode-hf's layout (random bytes are valid codes at every width)."""
    import torch

    from mode_hf.algo.packing import packed_row_bytes

    experts, rng = shape["experts"], random.Random(seed)
    counts = {b: round(share * experts) for b, share in mix.items()}
    counts[max(counts)] += experts - sum(counts.values())
    expert_bits = [b for b, n in sorted(counts.items()) for _ in range(n)]
    rng.shuffle(expert_bits)
    slot = [expert_bits[:e].count(b) for e, b in enumerate(expert_bits)]
    generator = torch.Generator().manual_seed(seed)
    dims = {"gate_up_proj": (2 * shape["intermediate"], shape["hidden"]), "down_proj": (shape["hidden"], shape["intermediate"])}
    storage = {}
    for proj, (rows, k) in dims.items():
        storage[proj] = {}
        for b in sorted(set(expert_bits)):
            n, groups = expert_bits.count(b), k // shape["group"]
            storage[proj][b] = (
                torch.randint(0, 256, (n, rows, packed_row_bytes(k, b)), dtype=torch.uint8, generator=generator).to(device),
                (torch.rand(n, rows, groups, generator=generator) * 0.004 + 0.001).half().to(device),
                torch.randint(0, 1 << b, (n, rows, groups), dtype=torch.uint8, generator=generator).to(device),
            )
    return dict(storage=storage, slot=slot, expert_bits=expert_bits, group_sizes={p: shape["group"] for p in dims})


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of a few 1 GiB copies."""
    import torch

    size = 1 << 30 if device.type == "cuda" else 1 << 24
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, interpreted: bool) -> float:
    """Milliseconds: triton.testing.do_bench (median) on a GPU; one call under the interpreter."""
    if interpreted:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def kernel_table(shape: dict, tokens: list[int], device, interpreted: bool) -> list[dict]:
    import torch
    from tqdm import tqdm

    from mode_hf.algo.grouped import grouped_linear
    from mode_hf.algo.packing import unpack
    from mode_hf.algo.quantize import dequantize
    from mode_hf.gpu import triton_experts

    bandwidth = copy_bandwidth(device)
    rows = []
    for name, mix in tqdm(WIDTH_MIXES.items(), desc="kernel timings", unit="width mix"):
        layer = make_layer(shape, mix, device)
        dense = {}  # bf16 weights of every expert, dequantized once: the unquantized baseline reads these
        for proj, by_width in layer["storage"].items():
            k = shape["hidden"] if proj == "gate_up_proj" else shape["intermediate"]
            per_expert = []
            for e, b in enumerate(layer["expert_bits"]):
                q, s, z = (t[layer["slot"][e]] for t in by_width[b])
                per_expert.append(dequantize(unpack(q, b, k), s, z, shape["group"], dtype=torch.bfloat16))
            dense[proj] = torch.stack(per_expert)
        for t in tokens:
            generator = torch.Generator().manual_seed(t)
            index = torch.randn(t, shape["experts"], generator=generator).topk(shape["top_k"], dim=-1).indices.reshape(-1)
            order = torch.argsort(index, stable=True)
            counts = torch.bincount(index, minlength=shape["experts"])
            x = (torch.randn(len(index), shape["hidden"], generator=generator) * 0.5)[order].to(device, torch.bfloat16)
            hit = counts.nonzero().squeeze(1).tolist()
            offsets = counts[hit].cumsum(0).to(torch.int32).to(device)
            w_gate_up, w_down = dense["gate_up_proj"][hit], dense["down_proj"][hit]

            def packed():
                return triton_experts.triton_expert_outputs(x, counts, **layer)

            def bf16():
                gate_up = grouped_linear(x, w_gate_up, offsets)
                gate, up = gate_up.chunk(2, dim=-1)
                return grouped_linear((torch.nn.functional.silu(gate) * up).to(x.dtype), w_down, offsets)

            routed_bytes = sum(tensor[layer["slot"][e]].numel() * tensor.element_size()
                               for proj in layer["storage"] for e in hit for tensor in layer["storage"][proj][layer["expert_bits"][e]])
            floor_ms = routed_bytes / bandwidth * 1e3  # bandwidth counts bytes moved; the kernel reads each byte once
            ms, ms_bf16 = timed(packed, device, interpreted), timed(bf16, device, interpreted)
            rows.append({"widths": name, "tokens": t, "experts_hit": len(hit), "triton_ms": ms, "bf16_grouped_mm_ms": ms_bf16,
                         "vs_bf16": ms / ms_bf16, "floor_ms": floor_ms, "vs_floor": ms / floor_ms,
                         "routed_MB": routed_bytes / 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="no GPU: tiny shapes on CPU through Triton's interpreter")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts to time (default 1 8 512 4096; tiny: 1 8 64)")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        os.environ["MODE_HF_EXPERTS_KERNEL"] = "triton"  # CPU tensors through the kernels, not the native path
    import torch

    sys.path.insert(0, str(REPO))
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run `python benchmarks/gpu_check.py --tiny` (interpreter, tiny shapes) instead")
    device = torch.device("cpu" if args.tiny else "cuda")
    report = {"device": "CPU (Triton interpreter)" if args.tiny else torch.cuda.get_device_name(),
              "torch": torch.__version__}
    import triton

    report["triton"] = triton.__version__
    print("1/3 kernel tests", flush=True)
    report["tests"] = run_tests(interpreted=args.tiny)
    print(f"    {report['tests']['summary']}", flush=True)
    print("2/3 quantize on load, save, reload, generate", flush=True)
    report["end_to_end"] = end_to_end(device.type, interpreted=args.tiny)
    print(f"    {json.dumps(report['end_to_end'])}", flush=True)
    print("3/3 kernel timings", flush=True)
    tokens = args.tokens or ([1, 8, 64] if args.tiny else [1, 8, 512, 4096])
    report["shape"] = TINY if args.tiny else QWEN3_VL_30B
    report["kernels"] = kernel_table(report["shape"], tokens, device, interpreted=args.tiny)
    print(f"\n{report['device']}, shapes {report['shape']}, bf16 activations; ms (median of triton.testing.do_bench"
          f"{'; one interpreted call: not a speed' if args.tiny else ''})")
    print("| widths | tokens | experts hit | Triton ms | bf16 grouped_mm ms | vs bf16 | floor ms | vs floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in report["kernels"]:
        print(f"| {row['widths']} | {row['tokens']} | {row['experts_hit']} | {row['triton_ms']:.3f} | {row['bf16_grouped_mm_ms']:.3f} | "
              f"{row['vs_bf16']:.2f}x | {row['floor_ms']:.3f} | {row['vs_floor']:.2f}x |")
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.json}")
    failed = not report["tests"]["passed"] or not report["end_to_end"]["same_argmax_as_cpu"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
