"""Inference speed of packed mixed-precision experts against the 16-bit experts, on this machine.

    python benchmarks/speed.py [--repeats 5] [--threads 2] [--skip-model] [--png docs/results/speed.png]

Tables, every ratio against a baseline measured in the same run (printed in the order 1, 4, 3, 5, 2):

1. One MoE layer at Qwen3-VL-30B-A3B shapes (hidden 2048, moe_intermediate 768, 128 experts, top-8), random
   weights: decode (1 and 8 tokens) and prefill (512 tokens) latency of `PackedExperts` at 2, 3, 4 bits and
   mixed (a third of the experts at each of 2, 3, 4: 3 bits on average), through the native CPU kernels
   (`mode_hf.model.native`; "native int8": with MODE_HF_INT8_ACTIVATIONS=1, where the build has AVX-512 VNNI) and
   through the torch path (`MODE_HF_NATIVE=0`), against the transformers bf16 module under
   the `eager` and `grouped_mm` experts implementations; bytes held by the experts; time against the bandwidth floor
   (bytes of the routed experts / this machine's measured copy bandwidth).
2. The whole bundled model (bf16 vs uniform 2/3/4-bit and mode-mixed 3-bit experts): prefill of 512 tokens, and
   decode per token after a 64-token prompt (greedy generate of 17 tokens minus generate of 1, over 16).
3. One dense linear at `dense_bits` 2/3/4 (2048 -> 4096, Qwen3-VL-30B-A3B's q_proj) against the bf16 linear.
5. End to end: a text MoE of a few decoder layers at those shapes (attention included), bf16 against uniform
   2/3/4-bit packed experts (also with int8 activations, and 3-bit experts with 4-bit attention, `dense_bits=4`):
   greedy `generate` tokens/s and peak memory, each variant in its own process.
4. Checkpoint bytes of the mixed layer's experts (saved with safetensors) against sum(bits x params) / 8 plus the
   float16 scale and uint8 zero of every group.

A picture of table 1 goes to --png. Latencies are medians over --repeats runs after one warm-up, in bfloat16, routing drawn at random (uniform over
experts, distinct per token) with a fixed seed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mode_hf  # noqa: E402
from mode_hf.algo import quantize  # noqa: E402
from mode_hf.bench import evaluation, tasks  # noqa: E402
from mode_hf.hf.checkpoint import load_processor  # noqa: E402
from mode_hf.model import native  # noqa: E402
from mode_hf.model.layouts import FUSED  # noqa: E402
from mode_hf.model.packed import PackedExperts, PackedLinear  # noqa: E402

DECODE_STEPS = 16
TOKENS = (1, 8, 512)  # decode of one sequence, decode of a batch of 8, prefill
SHAPES = {"hidden": 2048, "moe_intermediate": 768, "experts": 128, "top_k": 8}  # Qwen3-VL-30B-A3B text model


def forward_paths() -> list[str]:
    """The packed forward paths this machine has: "native" (when the kernels build), "native int8" (int8
    activations, where the kernels have them) and "torch"."""
    if native.library() is None:
        return ["torch"]
    return ["native", "native int8", "torch"] if native.int8_available() else ["native", "torch"]


@contextlib.contextmanager
def forward_path(name: str):
    """Within the block the packed modules take the torch path when the row `name` ends in "torch" or "torch path",
    else the native one (MODE_HF_NATIVE, read at every call), on int8 activations when `name` ends in "int8"
    (MODE_HF_INT8_ACTIVATIONS)."""
    os.environ["MODE_HF_NATIVE"] = "0" if name.endswith(("torch", "torch path")) else "1"
    os.environ["MODE_HF_INT8_ACTIVATIONS"] = "1" if name.endswith("int8") else "0"
    try:
        yield
    finally:
        os.environ.pop("MODE_HF_NATIVE")
        os.environ.pop("MODE_HF_INT8_ACTIVATIONS")


def median_ms(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def experts_module(implementation: str) -> Qwen3VLMoeTextExperts:
    config = Qwen3VLMoeTextConfig(
        hidden_size=SHAPES["hidden"], moe_intermediate_size=SHAPES["moe_intermediate"], num_experts=SHAPES["experts"],
        num_experts_per_tok=SHAPES["top_k"],
    )
    config._experts_implementation = implementation
    module = Qwen3VLMoeTextExperts(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in (module.gate_up_proj, module.down_proj):
            weight.normal_(0.0, 0.02)
    return module.to(torch.bfloat16).eval()


def packed_module(module: Qwen3VLMoeTextExperts, widths: list[int], group_size: int) -> PackedExperts:
    packed = PackedExperts(module, FUSED, widths, group_size)
    for proj in ("gate_up_proj", "down_proj"):
        weights = getattr(module, proj).detach().float()
        for expert, bits in enumerate(widths):
            packed.set_expert(proj, expert, quantize.rtn(weights[expert], bits, group_size))
    return packed.eval()


def expert_bytes(module: torch.nn.Module) -> int:
    if isinstance(module, PackedExperts):
        return sum(b.numel() * b.element_size() for b in module.buffers())
    return sum(p.numel() * p.element_size() for p in module.parameters())


def routing(tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = torch.randn(tokens, SHAPES["hidden"], generator=generator).to(torch.bfloat16)
    scores = torch.rand(tokens, SHAPES["experts"], generator=generator)
    weights, index = scores.topk(SHAPES["top_k"], dim=-1)  # distinct experts per token
    return hidden, index, (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)


def copy_bandwidth(size: int = 1 << 28) -> float:
    """This machine's memory bandwidth in bytes/s: the best of 5 copies of a 256 MiB buffer (read + write)."""
    source = torch.ones(size, dtype=torch.uint8)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


E2E_LAYERS, E2E_EXPERTS, E2E_NEW_TOKENS = 4, 32, 32


def end_to_end_worker(variant: str, folder: str, repeats: int) -> None:
    """In its own process (peak memory is per process): load the E2E model bf16 or quantized on load, time greedy
    generate of E2E_NEW_TOKENS tokens after a 16-token prompt; prints one JSON line."""
    import json
    import resource

    kwargs = {"dtype": torch.bfloat16}
    if variant != "bf16":  # "packed B-bit[ + dense D-bit][, int8]"
        bits = int(variant.split()[1].split("-")[0])
        dense = int(variant.split("dense ")[1].split("-")[0]) if "dense" in variant else None
        kwargs["quantization_config"] = mode_hf.ModeConfig(method="uniform", quantizer="rtn", avg_bits=bits, bits=(bits,), group_size=128,
                                                           dense_bits=dense)
    os.environ["MODE_HF_INT8_ACTIVATIONS"] = "1" if variant.endswith("int8") else "0"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    import gc

    gc.collect()
    resident = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024
    tensors = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # the model's own bytes
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        seconds = median_ms(lambda: model.generate(input_ids=prompt, max_new_tokens=E2E_NEW_TOKENS, min_new_tokens=E2E_NEW_TOKENS,
                                                   do_sample=False), repeats) / 1000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": variant, "tokens_per_s": E2E_NEW_TOKENS / seconds, "peak_bytes": peak, "resident_bytes": resident,
                      "tensor_bytes": tensors}))


def end_to_end_table(repeats: int) -> list[dict]:
    """A text MoE of E2E_LAYERS decoder layers at Qwen3-VL-30B-A3B layer shapes (attention 32 heads x 128, 4 KV heads;
    E2E_EXPERTS experts of 2048 x 768, top-8; random weights), saved once in bf16; each variant loads it in a
    process of its own."""
    with tempfile.TemporaryDirectory(prefix="mode-hf-speed-e2e-") as folder:  # 1.3 GB of bf16 weights: removed after
        return _end_to_end_rows(folder, repeats)


def _end_to_end_rows(folder: str, repeats: int) -> list[dict]:
    import json
    import subprocess

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=SHAPES["hidden"], intermediate_size=6144,
                            moe_intermediate_size=SHAPES["moe_intermediate"], num_hidden_layers=E2E_LAYERS,
                            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=E2E_EXPERTS,
                            num_experts_per_tok=SHAPES["top_k"], norm_topk_prob=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    rows = []
    variants = ["bf16", "packed 2-bit", "packed 3-bit", "packed 4-bit"]
    if native.int8_available():
        variants += ["packed 2-bit, int8", "packed 3-bit, int8", "packed 4-bit, int8", "packed 3-bit + dense 4-bit, int8"]
    for variant in variants:
        done = subprocess.run([sys.executable, __file__, "--e2e-worker", variant, folder, "--repeats", str(repeats),
                               "--threads", str(torch.get_num_threads())], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"\nEnd to end: a text MoE of {E2E_LAYERS} decoder layers at Qwen3-VL-30B-A3B layer shapes ({E2E_EXPERTS} experts "
          f"per layer, top-{SHAPES['top_k']}, attention included), generate {E2E_NEW_TOKENS} tokens after 16, bfloat16, "
          f"{torch.get_num_threads()} threads, median of {repeats}, each in its own process:\n")
    print("| model | tokens/s | x bf16 | model tensors MB | x bf16 | resident MB after load | x bf16 | peak RSS MB (load included) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base['tokens_per_s']:.2f} | "
              f"{row['tensor_bytes'] / 2**20:.0f} | {row['tensor_bytes'] / base['tensor_bytes']:.2f} | "
              f"{row['resident_bytes'] / 2**20:.0f} | {row['resident_bytes'] / base['resident_bytes']:.2f} | {row['peak_bytes'] / 2**20:.0f} |")
    print("\n(resident: the process's RSS after load, libraries and the allocator's kept heap included)")
    return rows


def layer_table(repeats: int, group_size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    inputs = {tokens: routing(tokens, generator) for tokens in TOKENS}
    eager = experts_module("eager")
    modules: dict[str, torch.nn.Module] = {"bf16 eager": eager}
    grouped = experts_module("grouped_mm")
    grouped.load_state_dict(eager.state_dict())
    modules["bf16 grouped_mm"] = grouped
    count = SHAPES["experts"]
    mixed = [(2, 3, 4)[i % 3] for i in torch.randperm(count, generator=generator).tolist()]
    for name, widths in (("packed 2-bit", [2] * count), ("packed 3-bit", [3] * count), ("packed 4-bit", [4] * count), ("packed mixed 2/3/4", mixed)):
        module = packed_module(eager, widths, group_size)
        for path in forward_paths():
            modules[f"{name}, {path}"] = module
    bandwidth = copy_bandwidth()
    rows = []
    with torch.inference_mode():
        for name, module in modules.items():
            row = {"module": name, "bytes": expert_bytes(module)}
            with forward_path(name):
                for tokens, (hidden, index, weights) in inputs.items():
                    row[tokens] = median_ms(lambda: module(hidden, index, weights), repeats)
                    hit = index.unique().numel()  # routed experts: what a forward must read
                    row[f"floor {tokens}"] = 1000 * row["bytes"] * hit / SHAPES["experts"] / bandwidth
            rows.append(row)
    base = rows[0]
    print(
        f"\nOne MoE layer at Qwen3-VL-30B-A3B shapes (hidden {SHAPES['hidden']}, moe_intermediate "
        f"{SHAPES['moe_intermediate']}, {SHAPES['experts']} experts, top-{SHAPES['top_k']}), bfloat16, group {group_size}, "
        f"{torch.get_num_threads()} threads, median of {repeats}:\n"
    )
    print(
        "| module | decode ms (1 token) | x bf16 eager | x floor | 8 tokens ms | x bf16 eager | x floor | prefill ms (512 tokens) "
        "| x bf16 eager | expert MB | x bf16 bytes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['module']} | {row[1]:.2f} | {row[1] / base[1]:.2f} | {row[1] / row['floor 1']:.1f} | {row[8]:.2f} | "
            f"{row[8] / base[8]:.2f} | {row[8] / row['floor 8']:.1f} | {row[512]:.1f} | {row[512] / base[512]:.2f} | "
            f"{row['bytes'] / 2**20:.1f} | {row['bytes'] / base['bytes']:.3f} |"
        )
    print(f"\nx floor: time / (bytes of the routed experts / {bandwidth / 1e9:.1f} GB/s, this machine's copy bandwidth "
          "measured in the same run, read + write counted)")
    checkpoint_bytes(modules["packed mixed 2/3/4, torch"])
    return rows


def linear_table(repeats: int, group_size: int) -> list[dict]:
    """`PackedLinear` (`dense_bits`: attention, shared experts) at Qwen3-VL-30B-A3B's q_proj shape (2048 -> 4096)
    against the bf16 `nn.Linear`, native kernels and torch path."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(SHAPES["hidden"], 4096, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=generator)
    inputs = {tokens: torch.randn(tokens, SHAPES["hidden"], generator=generator).to(torch.bfloat16) for tokens in TOKENS}
    modules: dict[str, torch.nn.Module] = {"bf16 nn.Linear": linear.to(torch.bfloat16)}
    for bits in (2, 3, 4):
        packed = PackedLinear(linear, bits, group_size)
        packed.set_weight(quantize.rtn(linear.weight.detach().float(), bits, group_size), None)
        for path in forward_paths():
            modules[f"packed {bits}-bit, {path}"] = packed
    rows = []
    with torch.inference_mode():
        for name, module in modules.items():
            with forward_path(name):
                rows.append({"module": name, **{t: median_ms(lambda: module(x), repeats) for t, x in inputs.items()}})
    base = rows[0]
    print(f"\nOne dense linear (`dense_bits`) 2048 -> 4096, bfloat16, group {group_size}, median of {repeats}:\n")
    print("| module | 1 token ms | x bf16 | 8 tokens ms | x bf16 | 512 tokens ms | x bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + row["module"] + " | " + " | ".join(f"{row[t]:.3f} | {row[t] / base[t]:.2f}" for t in TOKENS) + " |")
    return rows


def checkpoint_bytes(packed: PackedExperts) -> None:
    """Bytes of the saved expert tensors vs the formula: sum(bits x params) / 8 + 3 bytes per group."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "experts.safetensors"
        save_file({k: v.contiguous() for k, v in packed.state_dict().items()}, str(path))
        with safe_open(str(path), "pt") as handle:
            tensors = [handle.get_tensor(k) for k in handle.keys()]
        stored = sum(t.numel() * t.element_size() for t in tensors)
        file_bytes = path.stat().st_size
    codes = sum(b * o * k for b in packed.expert_bits for o, k in packed.dims.values()) / 8
    groups = sum(o * (k // packed.group_sizes[p]) for p, (o, k) in packed.dims.items()) * packed.num_experts
    expected = codes + 3 * groups
    print(
        f"\nCheckpoint of the mixed layer: {stored:,} tensor bytes ({file_bytes:,} file bytes with the safetensors "
        f"header) vs formula {expected:,.0f} = codes {codes:,.0f} + scales/zeros {3 * groups:,}: "
        f"{100 * (stored / expected - 1):+.3f}%"
    )


def model_table(repeats: int) -> list[dict]:
    processor = load_processor(evaluation.BUNDLED_MODEL)
    calibration = tasks.calibration_samples(32)
    variants: dict[str, dict | None] = {"bf16 eager": None, "bf16 grouped_mm": None}
    for bits in (2, 3, 4):
        variants[f"uniform {bits}-bit"] = dict(method="uniform", quantizer="rtn", avg_bits=bits, bits=(2, 3, 4))
    variants["mode mixed 3-bit"] = dict(method="mode", quantizer="rtn", avg_bits=3, bits=(2, 3, 4))
    variants["mode mixed 3-bit, torch path"] = variants["mode mixed 3-bit"]  # MODE_HF_NATIVE=0
    generator = torch.Generator().manual_seed(0)
    vocab = len(processor.tokenizer)
    prompt = torch.randint(6, vocab, (1, 64), generator=generator)
    long = torch.randint(6, vocab, (1, 512), generator=generator)
    rows = []
    for name, options in variants.items():
        kwargs = {"dtype": torch.bfloat16}
        if options is None:
            kwargs["experts_implementation"] = name.split()[-1]
        else:
            kwargs["quantization_config"] = mode_hf.ModeConfig(group_size=128, calibration=calibration, processor=processor, **options)
        model = AutoModelForImageTextToText.from_pretrained(evaluation.BUNDLED_MODEL, **kwargs).eval()
        with torch.inference_mode(), forward_path(name):
            # decode: (generate 1 + DECODE_STEPS tokens - generate 1 token) / DECODE_STEPS, after the 64-token prompt
            def generate(new_tokens: int):
                return model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

            first, longer = median_ms(lambda: generate(1), repeats), median_ms(lambda: generate(1 + DECODE_STEPS), repeats)
            row = {"model": name, "decode": (longer - first) / DECODE_STEPS, "prefill": median_ms(lambda: model(input_ids=long), repeats)}
        experts = [m for m in model.modules() if isinstance(m, PackedExperts)] or [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
        row["bytes"] = sum(expert_bytes(m) for m in experts)
        rows.append(row)
    base = rows[0]
    print(f"\nThe bundled model (4 layers x 8 experts, hidden 128), bfloat16, median of {repeats}:\n")
    print("| model | decode ms per token (64-token prompt) | x bf16 eager | prefill ms (512 tokens) | x bf16 eager | expert KB |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | {row['decode']:.2f} | {row['decode'] / base['decode']:.2f} | {row['prefill']:.1f} | "
            f"{row['prefill'] / base['prefill']:.2f} | {row['bytes'] / 1024:.0f} |"
        )
    return rows


def plot_layer(rows: list[dict], path: Path) -> None:
    """Bars of the 30B-shape layer table: time relative to bf16 eager for decode, a batch of 8 and prefill, per
    module (log scale, so that the torch path fits beside the native one), with the 1.0 and 1.5 lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]
    labels = [row["module"] for row in rows]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.27
    for i, (tokens, name) in enumerate(zip(TOKENS, ("decode (1 token)", "decode (8 tokens)", "prefill (512 tokens)"))):
        ax.bar([x + (i - 1) * width for x in range(len(rows))], [row[tokens] / base[tokens] for row in rows], width, label=name)
    for level, style, label in ((1.0, "-", "bf16"), (1.5, "--", "1.5x bf16 (the prefill target)")):
        ax.axhline(level, color="black", linestyle=style, linewidth=0.8, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("time / bf16 eager (log)")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"One MoE layer at Qwen3-VL-30B-A3B shapes, {torch.get_num_threads()} CPU threads (lower is faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\npicture: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--skip-model", action="store_true", help="only the single-layer table")
    parser.add_argument("--png", type=Path, default=Path("docs/results/speed.png"), help="picture of the layer table")
    parser.add_argument("--only", choices=("layer", "e2e"), help="one table only")
    parser.add_argument("--e2e-worker", nargs=2, metavar=("VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.e2e_worker:
        return end_to_end_worker(*args.e2e_worker, args.repeats)
    if args.only == "e2e":
        return end_to_end_table(args.repeats)
    plot_layer(layer_table(args.repeats, args.group_size), args.png)
    if args.only == "layer":
        return
    linear_table(args.repeats, args.group_size)
    end_to_end_table(args.repeats)
    if not args.skip_model:
        model_table(args.repeats)


if __name__ == "__main__":
    main()
