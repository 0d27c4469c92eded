"""The one place that knows the order: calibrate -> score -> allocate -> quantize -> pack -> swap.

`check_plan` runs before any weight is loaded (the model may be on the meta device) so that bad input fails early;
`quantize_model` does the work on a loaded model and returns the bit map and a summary. Expert sets are quantized
in model order, each one calibrated on the outputs of the already-quantized sets before it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import allocation, cost, quantize
from .calibration import CalibrationDataError, has_vision, vision_token_ids, vision_token_source
from .config import ModeConfig
from .experts import (
    ExpertSet, UnsupportedModelError, decoder_layers_name, dense_linears, execution_device, find_expert_sets, find_router,
    gate_of, keep_loaded, router_module, weights_loaded,
)
from .layerwise import LayerwiseRunner
from .observe import capture_hessians, capture_inputs, float_weights, gather_statistics, layers_container
from .packed import PackedExperts, PackedLinear
from .statistics import GROUPS, SetStatistics, routed_inputs
from .training import finetune_routers, require_text

logger = logging.getLogger(__name__)
UNIFORM_LAYER_SLACK = 0.25  # bits: a layer_uniform budget that far above every reachable average is refused


def check_plan(model: nn.Module, config: ModeConfig, batches: Sequence[dict] | None) -> list[ExpertSet]:
    """Everything that can be checked before weights load or calibration starts.

    Raises:
        UnsupportedModelError: no expert sets, an unknown layout, or (router_finetune) no router beside a set.
        allocation.InfeasibleBudgetError: a budget the chosen scope cannot reach.
        CalibrationDataError: images in the data but no image-token id anywhere; a next-token loss is needed
            (fisher sensitivity, router fine-tuning) but no calibration text token carries one.
    """
    sets = find_expert_sets(model, config.modules_to_not_convert)
    allocation.check_budget(config.bits, config.avg_bits)
    dense_routed = [s.name for s in sets if s.layout.dense_routed]
    if config.sensitivity == "fisher" and dense_routed:
        raise UnsupportedModelError(
            f"sensitivity='fisher' is not supported for experts called with score-scaled inputs ({dense_routed[0]}, "
            "Llama4): use sensitivity='output'."
        )
    if config.scope == "layer_uniform" and config.method != "uniform":
        params, set_index = _allocation_layout(sets)
        reachable = allocation.best_uniform_layer_average(params, set_index, config.bits, config.avg_bits)
        if config.avg_bits - reachable > UNIFORM_LAYER_SLACK:
            raise allocation.InfeasibleBudgetError(
                f"scope='layer_uniform' cannot use avg_bits={config.avg_bits}: with {len(sets)} expert sets each at "
                f"one width from {config.bits}, the best average within budget is {reachable:.3f}. Choose "
                f"avg_bits={reachable:.3f}, add widths to bits, or use scope='layer' or 'global'."
            )
    vision_ids = vision_token_ids(getattr(model, "config", None), config.processor)
    typed = batches and all(b.get("mm_token_type_ids") is not None for b in batches if has_vision([b]))
    if batches and has_vision(batches) and not vision_ids and not typed:
        raise CalibrationDataError(
            "the calibration data has images, but no image-token id was found: the model config (image_token_id / "
            "image_token_index, at the top level, in text_config or in thinker_config) names none, and the processor "
            "(image_token_id, or image_token in its tokenizer) is missing or names none. Pass the model's processor, "
            "or processor outputs with mm_token_type_ids."
        )
    if config.needs_text_loss:
        require_text(batches or [], vision_ids, "sensitivity='fisher'" if config.sensitivity == "fisher" else "router_finetune")
    if config.router_finetune:
        for expert_set in sets:
            find_router(model, expert_set)
    return sets


def _allocation_layout(sets: Sequence[ExpertSet]) -> tuple[np.ndarray, np.ndarray]:
    params = np.concatenate([np.full(s.shape[0], s.params_per_expert) for s in sets])
    set_index = np.concatenate([np.full(s.shape[0], i) for i, s in enumerate(sets)])
    return params, set_index


def _set_costs(stats: SetStatistics, weight_error: torch.Tensor, config: ModeConfig) -> torch.Tensor:
    """One set's cost [E, B] for the configured method."""
    if config.method == "mode":
        relative = config.sensitivity == "output"  # fisher costs are in loss units, weight errors already relative
        return cost.mode_cost(
            stats, config.text_weight, config.vision_weight, config.alpha, relative=relative,
            modality_split=config.modality_split, weight_error=weight_error if config.sensitivity == "weight" else None,
        )
    if config.method == "pmq":
        return cost.pmq_cost(stats)
    if config.method == "gemq":
        return cost.gemq_cost(stats)
    return cost.frequency_cost(stats, weight_error, config.alpha)


def score(stats: Sequence[SetStatistics], weight_errors: Sequence[torch.Tensor], config: ModeConfig) -> np.ndarray:
    """The cost matrix [J, B] over every expert of every set, for the configured method."""
    per_set = [_set_costs(s, e, config) for s, e in zip(stats, weight_errors)]
    costs = cost.with_tiebreak(torch.cat(per_set), torch.cat(list(weight_errors)), config.eta)
    return costs.numpy()


def guards(config: ModeConfig) -> dict[int, int]:
    """Minimum experts per set at given widths: the user's top-width guard, plus PMQ's top and second widths."""
    if config.scope == "layer_uniform":
        return {}
    widths = sorted(config.bits, reverse=True)
    required = {widths[0]: config.min_top_per_set} if config.min_top_per_set else {}
    if config.method == "pmq":
        required[widths[0]] = max(required.get(widths[0], 0), 1)
        if len(widths) > 1:
            required[widths[1]] = max(required.get(widths[1], 0), 1)
    return required


def allocate(
    sets: Sequence[ExpertSet], costs: np.ndarray | None, config: ModeConfig, budget: float | None = None
) -> tuple[list[np.ndarray], dict]:
    """Widths per set (uniform, or the MILP over `costs` at `budget`, default avg_bits) and a record of the solve."""
    params, set_index = _allocation_layout(sets)
    budget = config.avg_bits if budget is None else budget
    if config.method == "uniform":
        chosen, record = np.full(len(params), int(config.avg_bits)), {"solver": "none (uniform)"}
    else:
        required = guards(config)
        guard_options = {"min_per_set": required} if required else {}
        result = allocation.allocate(costs, params, set_index, config.bits, budget, config.scope, **guard_options)
        chosen = result.bits
        record = {"objective": result.objective, "solve_seconds": result.solve_seconds, "status": result.status}
    return [chosen[set_index == i] for i in range(len(sets))], record


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
    if config.quantizer == "rtn" or inputs is None or inputs.shape[0] < max(config.gptq_min_tokens, 1):
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
    if config.quantizer == "gptq":
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
        fallbacks += int(config.quantizer == "gptq" and not used_gptq)
        packed.set_expert("gate_up_proj", expert, q_gate_up)
        packed.set_expert("down_proj", expert, q_down)
    return fallbacks


def quantize_all(
    model: nn.Module, sets: Sequence[ExpertSet], widths: Sequence[np.ndarray], batches: Sequence[dict],
    config: ModeConfig, vision_ids: Sequence[int],
) -> int:
    """Quantize every set from its original weights, in model order, swapping each packed set in; returns the
    number of RTN fallbacks. GPTQ calibrates each set on the outputs of the quantized layers before it, layer at a
    time (`mode_hf.layerwise`): the passes for a set run only its layer, on the recorded outputs of the one before."""
    fallbacks = 0
    runner = LayerwiseRunner(model, layers_container(model, sets), batches) if config.quantizer == "gptq" else None
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
        if config.quantizer == "gptq" and batches:
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


def quantize_model(model: nn.Module, config: ModeConfig, batches: Sequence[dict]) -> tuple[dict, dict]:
    """Quantize every routed-expert set of a loaded model in place.

    With `config.progressive`, every budget in turn: statistics on the current (already quantized, router-tuned)
    model, a re-solve at that budget, re-quantization from the original weights. Returns (bit_map, summary):
    widths per expert set name, and the statistics of the run (JSON types).
    """
    sets = check_plan(model, config, batches)
    vision_ids, vision_source = vision_token_source(getattr(model, "config", None), config.processor)
    if config.router_finetune:
        for expert_set in sets:
            keep_loaded(router_module(model, expert_set))  # trained: accelerate must not reload it from its store
    routers = [find_router(model, s) for s in sets] if config.router_finetune else []
    seconds = {"statistics": 0.0, "allocation": 0.0, "quantization": 0.0, "router_finetune": 0.0}
    steps: list[dict[str, Any]] = []
    stats = None
    for budget in config.progressive or [config.avg_bits]:
        clock = time.perf_counter()
        costs = None
        if config.method != "uniform":
            stats, weight_errors = gather_statistics(model, sets, batches, config, vision_ids)
            costs = score(stats, weight_errors, config)
        seconds["statistics"] += time.perf_counter() - clock
        clock = time.perf_counter()
        with tqdm(total=1, desc=f"mode-hf allocation ({config.scope}, {budget:g} bits)", unit="solve") as progress:
            widths, solve = allocate(sets, costs, config, budget)
            progress.update()
        seconds["allocation"] += time.perf_counter() - clock
        clock = time.perf_counter()
        fallbacks = quantize_all(model, sets, widths, batches, config, vision_ids)
        seconds["quantization"] += time.perf_counter() - clock
        clock = time.perf_counter()
        step = {"avg_bits": budget, "allocation": solve, "bit_map": {s.name: [int(b) for b in w] for s, w in zip(sets, widths)}}
        if routers:
            step["router_finetune"] = finetune_routers(
                model, routers, batches, vision_ids, config.router_lr, config.router_weight_decay, config.router_epochs
            )
        seconds["router_finetune"] += time.perf_counter() - clock
        steps.append(step)
    dense_map = None
    if config.dense_bits is not None:
        clock = time.perf_counter()
        dense_map = quantize_dense(model, sets, batches, config, vision_ids)
        seconds["dense"] = time.perf_counter() - clock
    summary = build_summary(model, sets, stats, config, steps[-1]["allocation"], seconds, fallbacks)
    summary["dense_map"] = dense_map
    typed = any(b.get("mm_token_type_ids") is not None for b in batches)
    summary["vision_tokens"] = {"ids": vision_ids, "from": "mm_token_type_ids" if typed else vision_source}
    summary["router_finetune"] = steps[-1].get("router_finetune")
    if config.progressive:
        summary["progressive"] = steps
    return steps[-1]["bit_map"], summary


def build_summary(
    model: nn.Module,
    sets: Sequence[ExpertSet],
    stats: Sequence[SetStatistics] | None,
    config: ModeConfig,
    solve: dict,
    seconds: dict,
    fallbacks: int,
) -> dict[str, Any]:
    """JSON summary of a quantization run: sizes, bits, token counts, keep ratio, frequencies."""
    summary: dict[str, Any] = {"method": config.method, "quantizer": config.quantizer, "scope": config.scope}
    summary["layouts"] = sorted({s.layout.name for s in sets})
    summary.update(storage_summary(model))
    summary.update(allocation=solve, seconds={k: round(v, 3) for k, v in seconds.items()}, rtn_fallback_experts=fallbacks)
    if stats:
        tokens = stats[0].tokens.tolist()
        vision_total = tokens[GROUPS.index("all")] - tokens[GROUPS.index("text")]
        summary["tokens"] = {"text": int(tokens[0]), "vision": int(vision_total), "vision_kept": int(tokens[1])}
        summary["keep_ratio"] = round(tokens[1] / vision_total, 4) if vision_total else None
        summary["text_only_statistics"] = vision_total == 0
        if vision_total == 0:
            logger.warning("mode-hf: the calibration data has no vision tokens; allocation used text-only statistics.")
        summary["unreached_experts"] = int(sum(int((s.counts[GROUPS.index("all")] == 0).sum()) for s in stats))
        summary["frequency"] = {
            s.name: {g: [round(float(v), 5) for v in st.frequency()[GROUPS.index(g)]] for g in ("text", "vision")}
            for s, st in zip(sets, stats)
        }
    return summary


def storage_summary(model: nn.Module) -> dict[str, Any]:
    """Bits histogram, average and effective bits, and expert bytes of every PackedExperts in `model`."""
    packed = [m for m in model.modules() if isinstance(m, PackedExperts)]
    histogram: dict[str, int] = {}
    for module in packed:
        for b in module.expert_bits:
            histogram[str(b)] = histogram.get(str(b), 0) + 1
    totals = {"weights": 0, "overhead": 0, "params": 0}
    for module in packed:
        for key, value in module.storage_bits().items():
            totals[key] += value
    params = max(totals["params"], 1)
    summary = {
        "bits_histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
        "average_bits": round(totals["weights"] / params, 4),
        "effective_bits": round((totals["weights"] + totals["overhead"]) / params, 4),
        "expert_bytes": {"bf16": 2 * totals["params"], "packed": (totals["weights"] + totals["overhead"]) // 8},
    }
    dense = [m.storage_bits() for m in model.modules() if isinstance(m, PackedLinear)]
    if dense:
        bits = {key: sum(d[key] for d in dense) for key in ("weights", "overhead", "params")}
        summary["dense"] = {
            "linears": len(dense),
            "effective_bits": round((bits["weights"] + bits["overhead"]) / bits["params"], 4),
            "bytes": {"bf16": 2 * bits["params"], "packed": (bits["weights"] + bits["overhead"]) // 8},
        }
    return summary
