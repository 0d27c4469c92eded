"""The one place that knows the order: calibrate -> score -> allocate -> quantize -> pack -> swap.

    stage       module                                   data out
    plan        check_plan (here)                        the expert sets (before any weight loads)
    calibrate   calibrate.observe.gather_statistics      SetStatistics + weight errors [E, B] per set
    score       score (here; costs from methods.py)      costs [J, B] over every expert
    allocate    allocate (here; algo.allocation)         Allocated: widths per set
    quantize,   convert.quantize_all / quantize_dense    packed modules swapped into the model
    pack, swap
    report      results.build_summary                    QuantizationResult: bit map, dense map, summary

`check_plan` runs before any weight is loaded (the model may be on the meta device) so that bad input fails early;
`quantize_model` does the work on a loaded model. Expert sets are quantized in model order, each one calibrated on
the outputs of the already-quantized sets before it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import methods
from .algo import allocation, cost
from .algo.statistics import SetStatistics
from .calibrate.inputs import batch_masks, has_vision, vision_token_ids, vision_token_source
from .calibrate.losses import require_text
from .calibrate.observe import gather_statistics
from .calibrate.routers import finetune_routers
from .config import ModeConfig
from .convert import quantize_all, quantize_dense
from .errors import CalibrationDataError, InfeasibleBudgetError, UnsupportedModelError, WeightsError
from .model.offload import keep_loaded, weights_loaded
from .model.structure import ExpertSet, dense_linears, find_expert_sets, find_router, router_module
from .results import QuantizationResult, build_summary

logger = logging.getLogger(__name__)
UNIFORM_LAYER_SLACK = 0.25  # bits: a layer_uniform budget that far above every reachable average is refused


@dataclass
class Allocated:
    """The widths chosen at one budget: int64 [E] per expert set, in set order, and a record of the solve."""

    widths: list[np.ndarray]
    record: dict[str, Any]


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
    needs = methods.calibration_needs(config)
    no_gradients = [s for s in sets if not s.layout.gradient_sensitivity]
    if needs.gradients and no_gradients:
        raise UnsupportedModelError(
            f"sensitivity={config.sensitivity!r} weighs errors by the loss gradient, which is not supported for "
            f"{no_gradients[0].name} ({no_gradients[0].layout.description}): use sensitivity='output'."
        )
    if config.scope == "layer_uniform" and needs.statistics:
        params, set_index = _allocation_layout(sets)
        reachable = allocation.best_uniform_layer_average(params, set_index, config.bits, config.avg_bits)
        if config.avg_bits - reachable > UNIFORM_LAYER_SLACK:
            raise InfeasibleBudgetError(
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
    if needs.text_loss:
        require_text(batches or [], vision_ids, f"sensitivity={config.sensitivity!r}" if needs.gradients else "router_finetune")
    for index, batch in enumerate(batches or []):
        placeholders = int(batch_masks(batch, vision_ids).vision.sum()) if (vision_ids or typed) else 0
        if placeholders and not has_vision([batch]):
            raise CalibrationDataError(
                f"calibration batch {index} (raw samples come first, batch_size at a time, then each processed sample) "
                f"has {placeholders} vision placeholder tokens but no pixel_values: the vision "
                "tower would never see an image and the placeholders would be calibrated as vision tokens. Pass the "
                "processor's whole output (pixel_values, image_grid_thw, ...), or raw samples with the processor."
            )
    if config.router_finetune:
        for expert_set in sets:
            find_router(model, expert_set)
    return sets


def check_weights(model: nn.Module, sets: Sequence[ExpertSet], config: ModeConfig) -> None:
    """Raise WeightsError, naming the tensor and the expert, for NaN or inf in a routed expert's weights or biases
    (or, with `dense_bits`, in a dense linear's): a quantizer would turn them into NaN or 65504 scales."""
    for expert_set in sets:
        with weights_loaded(expert_set.module):
            tensors = zip(("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"),
                          expert_set.layout.weights(expert_set.module) + expert_set.layout.biases(expert_set.module))
            for name, tensor in tensors:
                if tensor is None:
                    continue
                bad = (~torch.isfinite(tensor.detach())).reshape(tensor.shape[0], -1).any(dim=1)  # [E]
                if bool(bad.any()):
                    experts = bad.nonzero().squeeze(1).tolist()
                    raise WeightsError(
                        f"{expert_set.name}.{name}: expert {experts[0]} ({len(experts)} experts in all) holds NaN or "
                        "inf weights; fix the checkpoint (or leave the set 16-bit with modules_to_not_convert)."
                    )
    if config.dense_bits is None:
        return
    for name in dense_linears(model, sets, config.modules_to_not_convert):
        linear = model.get_submodule(name)
        with weights_loaded(linear):
            if not bool(torch.isfinite(linear.weight.detach()).all()):
                raise WeightsError(f"{name}.weight holds NaN or inf weights; fix the checkpoint or drop dense_bits.")


def _allocation_layout(sets: Sequence[ExpertSet]) -> tuple[np.ndarray, np.ndarray]:
    params = np.concatenate([np.full(s.shape[0], s.params_per_expert) for s in sets])
    set_index = np.concatenate([np.full(s.shape[0], i) for i, s in enumerate(sets)])
    return params, set_index


def score(stats: Sequence[SetStatistics], weight_errors: Sequence[torch.Tensor], config: ModeConfig) -> np.ndarray:
    """The cost matrix [J, B] over every expert of every set, for the configured method."""
    per_set = [methods.set_costs(s, e, config) for s, e in zip(stats, weight_errors)]
    costs = cost.with_tiebreak(torch.cat(per_set), torch.cat(list(weight_errors)), config.eta)
    return costs.numpy()


def allocate(sets: Sequence[ExpertSet], costs: np.ndarray | None, config: ModeConfig, budget: float | None = None) -> Allocated:
    """Widths per set: every expert at avg_bits for a method that allocates nothing, else the MILP over `costs` at
    `budget` (default avg_bits) under the configured scope and guards."""
    params, set_index = _allocation_layout(sets)
    budget = config.avg_bits if budget is None else budget
    if not methods.METHODS[config.method].allocates:
        chosen, record = np.full(len(params), int(config.avg_bits)), {"solver": f"none ({config.method})"}
    else:
        required = methods.guards(config)
        guard_options = {"min_per_set": required} if required else {}
        result = allocation.allocate(costs, params, set_index, config.bits, budget, config.scope, **guard_options)
        chosen = result.bits
        record = {"objective": result.objective, "solve_seconds": result.solve_seconds, "status": result.status}
    return Allocated([chosen[set_index == i] for i in range(len(sets))], record)


def quantize_model(model: nn.Module, config: ModeConfig, batches: Sequence[dict]) -> QuantizationResult:
    """Quantize every routed-expert set of a loaded model in place (and, with `dense_bits`, its dense linears).

    With `config.progressive`, every budget in turn: statistics on the current (already quantized, router-tuned)
    model, a re-solve at that budget, re-quantization from the original weights.
    """
    sets = check_plan(model, config, batches)
    check_weights(model, sets, config)
    vision_ids, vision_source = vision_token_source(getattr(model, "config", None), config.processor)
    if config.router_finetune:
        for expert_set in sets:
            keep_loaded(router_module(model, expert_set))  # trained: accelerate must not reload it from its store
    routers = [find_router(model, s) for s in sets] if config.router_finetune else []
    needs = methods.calibration_needs(config)
    seconds = {"statistics": 0.0, "allocation": 0.0, "quantization": 0.0, "router_finetune": 0.0}
    steps: list[dict[str, Any]] = []
    stats = None
    for budget in config.progressive or [config.avg_bits]:
        clock = time.perf_counter()
        costs = None
        if needs.statistics:
            stats, weight_errors = gather_statistics(model, sets, batches, methods.observation(config), vision_ids)
            costs = score(stats, weight_errors, config)
        seconds["statistics"] += time.perf_counter() - clock
        clock = time.perf_counter()
        with tqdm(total=1, desc=f"mode-hf allocation ({config.scope}, {budget:g} bits)", unit="solve") as progress:
            allocated = allocate(sets, costs, config, budget)
            progress.update()
        seconds["allocation"] += time.perf_counter() - clock
        clock = time.perf_counter()
        fallbacks = quantize_all(model, sets, allocated.widths, batches, config, vision_ids)
        seconds["quantization"] += time.perf_counter() - clock
        clock = time.perf_counter()
        bit_map = {s.name: [int(b) for b in w] for s, w in zip(sets, allocated.widths)}
        step = {"avg_bits": budget, "allocation": allocated.record, "bit_map": bit_map}
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
    typed = any(b.get("mm_token_type_ids") is not None for b in batches)
    summary["vision_tokens"] = {"ids": vision_ids, "from": "mm_token_type_ids" if typed else vision_source}
    summary["router_finetune"] = steps[-1].get("router_finetune")
    if config.progressive:
        summary["progressive"] = steps
    return QuantizationResult(steps[-1]["bit_map"], dense_map, summary)
