"""Quantize, pack and swap: the chosen widths applied to a model, expert set by expert set (and, with
`dense_bits`, decoder layer by decoder layer for the dense linears), each calibrated on the outputs of the layers
already quantized before it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .algo import quantize
from .algo.statistics import routed_inputs
from .calibrate.layerwise import LayerwiseRunner
from .calibrate.observe import capture_hessians, capture_inputs, float_weights
from .config import ModeConfig
from .methods import QUANTIZERS
from .model.layouts import gate_of
from .model.offload import execution_device, weights_loaded
from .model.packed import PackedExperts, PackedLinear
from .model.structure import ExpertSet, decoder_layers_name, dense_linears, layers_container


def quantize_expert(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: nn.Module,
    bits: int,
    config: ModeConfig,
    inputs: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    gate_up_bias: torch.Tensor | None = None,
) -> tuple[quantize.QuantizedWeight, quantize.QuantizedWeight, bool]:
    """One expert: (gate_up, down, used_gptq). GPTQ on gate_up, then on down_proj fed by the quantized gate_up.

    inputs: [n, H] tokens routed to this expert (None or too few: RTN); token_weight: [n] Hessian weights;
    gate_up_bias: [2I] (layouts with biases).
    """
    if not QUANTIZERS[config.quantizer].hessians or inputs is None or inputs.shape[0] < max(config.gptq_min_tokens, 1):
        return (
            quantize.rtn(gate_up, bits, config.group_size, config.symmetric),
            quantize.rtn(down, bits, config.group_size, config.symmetric),
            False,
        )
    weighted = inputs * token_weight[:, None]  # [n, H]
    q_gate_up = quantize.gptq(gate_up, weighted.T @ inputs, bits, config.group_size, config.damp, symmetric=config.symmetric)
    hidden = activation(F.linear(inputs, q_gate_up.dequantize(), gate_up_bias))  # [n, I]
    hessian = (hidden * token_weight[:, None]).T @ hidden  # [I, I]
    q_down = quantize.gptq(down, hessian, bits, config.group_size, config.damp, symmetric=config.symmetric)
    return q_gate_up, q_down, True


def quantize_set(
    model: nn.Module, expert_set: ExpertSet, bits: np.ndarray, batches: Sequence[dict], config: ModeConfig,
    vision_ids: Sequence[int], runner: LayerwiseRunner | None = None,
) -> tuple[PackedExperts, int]:
    """Quantize and pack one expert set; returns the packed module and how many experts fell back to RTN.
    GPTQ inputs come from passes starting at the runner's current layer (the set's) when a runner is given."""
    activation = gate_of(expert_set.module)
    packed = PackedExperts(expert_set.module, expert_set.layout, bits.tolist(), config.group_size)
    inputs = top_k_index = token_weight = None
    if QUANTIZERS[config.quantizer].hessians:
        inputs, top_k_index, is_text = capture_inputs(model, expert_set, batches, vision_ids, runner)
        token_weight = torch.where(is_text, config.text_hessian_weight, 1.0)  # [N]
    with weights_loaded(expert_set.module):  # once for the whole set when accelerate offloads it
        biases = expert_set.layout.biases(expert_set.module)
        packed.set_biases(*(None if b is None else b.detach().float().cpu() for b in biases))
        fallbacks = _quantize_experts(expert_set, packed, activation, bits, config, inputs, top_k_index, token_weight)
    return packed.to(execution_device(expert_set.module)), fallbacks


def _quantize_experts(
    expert_set: ExpertSet, packed: PackedExperts, activation: nn.Module, bits: np.ndarray, config: ModeConfig,
    inputs: torch.Tensor | None, top_k_index: torch.Tensor | None, token_weight: torch.Tensor | None,
) -> int:
    """Quantize every expert of a set into `packed`; returns the number of RTN fallbacks."""
    fallbacks = 0
    for expert in range(expert_set.shape[0]):
        expert_inputs = expert_weight = None
        if inputs is not None:
            token, slot = (top_k_index == expert).nonzero(as_tuple=True)  # [n], [n]
            expert_inputs, expert_weight = routed_inputs(inputs, token, slot), token_weight[token]
        # one expert's float32 weights at a time, not the whole set's
        gate_up, down, gate_up_bias, _ = (None if w is None else w[0].cpu() for w in float_weights(expert_set, (expert, expert + 1)))
        q_gate_up, q_down, used_gptq = quantize_expert(
            gate_up, down, activation, int(bits[expert]), config, expert_inputs, expert_weight, gate_up_bias
        )
        fallbacks += int(QUANTIZERS[config.quantizer].hessians and not used_gptq)
        packed.set_expert("gate_up_proj", expert, q_gate_up)
        packed.set_expert("down_proj", expert, q_down)
    return fallbacks


def quantize_all(
    model: nn.Module, sets: Sequence[ExpertSet], widths: Sequence[np.ndarray], batches: Sequence[dict],
    config: ModeConfig, vision_ids: Sequence[int],
) -> int:
    """Quantize every set from its original weights, in model order, swapping each packed set in; returns the
    number of RTN fallbacks. GPTQ calibrates each set on the outputs of the quantized layers before it, layer at a
    time (`mode_hf.calibrate.layerwise`): the passes for a set run only its layer, on the recorded outputs of the one before."""
    fallbacks = 0
    runner = LayerwiseRunner(model, layers_container(model, sets), batches) if QUANTIZERS[config.quantizer].hessians else None
    for expert_set, bits in zip(tqdm(sets, desc="mode-hf quantize", unit="layer"), widths):
        if runner is not None:
            runner.advance_to(runner.layer_index(expert_set.name))
        packed, set_fallbacks = quantize_set(model, expert_set, bits, batches, config, vision_ids, runner)
        model.set_submodule(expert_set.name, packed)
        fallbacks += set_fallbacks
    return fallbacks


def quantize_dense(
    model: nn.Module, sets: Sequence[ExpertSet], batches: Sequence[dict], config: ModeConfig, vision_ids: Sequence[int]
) -> dict[str, int]:
    """Quantize the dense linears of the decoder layers (`dense_bits`) uniformly, one decoder layer at a time, each
    calibrated on the outputs of the layers already quantized; returns {linear name: bits}."""
    names = dense_linears(model, sets, config.modules_to_not_convert)
    by_layer: dict[str, list[str]] = {}
    for name in names:
        container = decoder_layers_name(model, name)
        layer = f"{container}.{name[len(container) + 1 :].split('.')[0]}"
        by_layer.setdefault(layer, []).append(name)
    runner = LayerwiseRunner(model, layers_container(model, sets), batches)
    for layer, layer_names in tqdm(by_layer.items(), desc="mode-hf dense", unit="layer"):
        linears = {name: model.get_submodule(name) for name in layer_names}
        hessians = None
        if QUANTIZERS[config.quantizer].hessians and batches:
            runner.advance_to(runner.layer_index(layer))
            hessians = capture_hessians(
                model, model.get_submodule(layer), linears, batches, vision_ids, config.text_hessian_weight, runner
            )
        for name, linear in linears.items():
            with weights_loaded(linear):
                weight = linear.weight.detach().float().cpu()
                bias = None if linear.bias is None else linear.bias.detach().float().cpu()
            packed = PackedLinear(linear, config.dense_bits, config.group_size)
            if hessians is not None and float(hessians[name].diagonal().sum()) > 0:
                q = quantize.gptq(weight, hessians[name], config.dense_bits, packed.group_size, config.damp, symmetric=config.symmetric)
            else:
                q = quantize.rtn(weight, config.dense_bits, packed.group_size, config.symmetric)
            packed.set_weight(q, bias)
            model.set_submodule(name, packed.to(execution_device(linear)))
    return {name: int(config.dense_bits) for name in names}


