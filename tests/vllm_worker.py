"""Runs in vLLM's own environment (tests/test_vllm.py starts it): serve one checkpoint offline with `vllm.LLM` and
write greedy tokens and first-token log-probs of the given prompts.

    python tests/vllm_worker.py REQUEST.json RESULT.json

REQUEST: {"model": dir, "dtype": "bfloat16", "max_tokens": 8, "logprobs": 5, "llm": {extra vllm.LLM kwargs},
          "prompts": [{"token_ids": [...]} | {"text": "...", "image": "x.png"}]}
RESULT:  {"outputs": [{"prompt_token_ids": [...], "tokens": [...], "first_logprobs": {"id": logprob}}],
          "seconds": {"load": s, "generate": s}, "quantization": "..."}
         or {"error": "Type: message"} when the engine cannot be built (the caller decides whether that is a skip).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU otherwise sizes it from the machine's memory


def main(request_path: str, result_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(open(request_path).read())
    start = time.perf_counter()
    try:
        llm = LLM(model=request["model"], dtype=request.get("dtype", "bfloat16"), max_model_len=512, seed=0,
                  **{"enforce_eager": True, **request.get("llm", {})})
    except Exception as error:  # noqa: BLE001 - reported to the caller, which fails or skips on it
        json.dump({"error": f"{type(error).__name__}: {error}"}, open(result_path, "w"))
        return
    loaded = time.perf_counter()
    prompts = []
    for prompt in request["prompts"]:
        if "token_ids" in prompt:
            prompts.append(TokensPrompt(prompt_token_ids=prompt["token_ids"]))
        else:
            prompts.append({"prompt": prompt["text"], "multi_modal_data": {"image": Image.open(prompt["image"]).convert("RGB")}})
    params = SamplingParams(temperature=0.0, max_tokens=request.get("max_tokens", 8), logprobs=request.get("logprobs", 5), ignore_eos=True)
    results = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    outputs = []
    for result in results:
        completion = result.outputs[0]
        first = completion.logprobs[0]
        outputs.append({
            "prompt_token_ids": list(result.prompt_token_ids),
            "tokens": list(completion.token_ids),
            "first_logprobs": {str(token): float(entry.logprob) for token, entry in first.items()},
        })
    quantization = llm.llm_engine.vllm_config.model_config.quantization
    json.dump({"outputs": outputs, "seconds": {"load": loaded - start, "generate": done - loaded}, "quantization": quantization},
              open(result_path, "w"))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process: the guard is required
    main(sys.argv[1], sys.argv[2])
