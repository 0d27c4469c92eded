"""The one place that knows the order: calibrate -> score -> allocate -> quantize -> pack -> swap.

`check_plan` runs before any weight is loaded (the model may be on the meta device) so that bad input fails early;
`quantize_model` does the work on a loaded model and returns the bit map and a summary. Expert sets are quantized
in model order, each one calibrated on the outputs of the already-quantized sets before it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import allocation, cost, quantize
from .calibration import (
    CalibrationDataError,
    StopForward,
    has_vision,
    hidden_states_argument,
    pre_hooks,
    to_device,
    vision_token_ids,
)
from .config import ModeConfig
from .experts import ExpertSet, UnsupportedModelError, decoder_layers, find_expert_sets
from .packed import PackedExperts
from .statistics import GROUPS, SetStatistics, accumulate, modality_masks, redundancy_filter

logger = logging.getLogger(__name__)
UNIFORM_LAYER_SLACK = 0.25  # bits: a layer_uniform budget that far above every reachable average is refused


@dataclass
class BatchMasks:
    """Token masks of one calibration batch, flattened to [T] in the order the expert sets see tokens."""

    text: torch.Tensor
    vision: torch.Tensor
    vision_2d: torch.Tensor  # [B, S], for the per-image redundancy filter


def check_plan(model: nn.Module, config: ModeConfig, batches: Sequence[dict] | None) -> list[ExpertSet]:
    """Everything that can be checked before weights load or calibration starts.

    Raises:
        UnsupportedModelError: no expert sets or an unknown layout.
        allocation.InfeasibleBudgetError: a budget the chosen scope cannot reach.
        CalibrationDataError: images in the data but no image-token id anywhere.
    """
    sets = find_expert_sets(model, config.modules_to_not_convert)
    allocation.check_budget(config.bits, config.avg_bits)
    if config.scope == "layer_uniform" and config.method != "uniform":
        params, set_index = _allocation_layout(sets)
        reachable = allocation.best_uniform_layer_average(params, set_index, config.bits, config.avg_bits)
        if config.avg_bits - reachable > UNIFORM_LAYER_SLACK:
            raise allocation.InfeasibleBudgetError(
                f"scope='layer_uniform' cannot use avg_bits={config.avg_bits}: with {len(sets)} expert sets each at "
                f"one width from {config.bits}, the best average within budget is {reachable:.3f}. Choose "
                f"avg_bits={reachable:.3f}, add widths to bits, or use scope='layer' or 'global'."
            )
    if batches and has_vision(batches) and not vision_token_ids(getattr(model, "config", None), config.processor):
        raise CalibrationDataError(
            "the calibration data has images, but neither the model config nor the processor names an image-token "
            "id (image_token_id / image_token_index): pass the model's processor."
        )
    return sets


def _allocation_layout(sets: Sequence[ExpertSet]) -> tuple[np.ndarray, np.ndarray]:
    params = np.concatenate([np.full(s.shape[0], s.params_per_expert) for s in sets])
    set_index = np.concatenate([np.full(s.shape[0], i) for i, s in enumerate(sets)])
    return params, set_index


def _masks(batch: dict, vision_ids: Sequence[int]) -> BatchMasks:
    text, vision = modality_masks(
        batch["input_ids"], batch.get("attention_mask"), batch.get("mm_token_type_ids"), vision_ids
    )
    return BatchMasks(text.reshape(-1), vision.reshape(-1), vision)


def _run(model: nn.Module, batch: dict) -> None:
    try:
        model(**to_device(batch, model.device), use_cache=False)
    except StopForward:
        pass


def _expert_fn(gate_up: torch.Tensor, down: torch.Tensor, activation: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def forward(x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(activation(F.linear(x.float(), gate_up[expert])), down[expert])  # [n, H]

    return forward


def _candidates(expert_set: ExpertSet, bits: Sequence[int], group_size: int) -> tuple[list, list, torch.Tensor]:
    """Reference fn, RTN fns at every width, and relative weight error [E, B] of one set."""
    gate_up, down = (w.detach().float() for w in expert_set.layout.weights(expert_set.module))
    activation = expert_set.layout.activation(expert_set.module)
    fns, errors = [], []
    for b in bits:
        q_gate_up, q_down = quantize.rtn(gate_up, b, group_size), quantize.rtn(down, b, group_size)
        w_gate_up, w_down = q_gate_up.dequantize(), q_down.dequantize()
        fns.append(_expert_fn(w_gate_up, w_down, activation))
        squared = (gate_up - w_gate_up).pow(2).sum((1, 2)) + (down - w_down).pow(2).sum((1, 2))  # [E]
        errors.append(squared / (gate_up.pow(2).sum((1, 2)) + down.pow(2).sum((1, 2))).clamp(min=1e-30))
    return _expert_fn(gate_up, down, activation), fns, torch.stack(errors, dim=1).double()


def gather_statistics(
    model: nn.Module, sets: Sequence[ExpertSet], batches: Sequence[dict], config: ModeConfig, vision_ids: Sequence[int]
) -> tuple[list[SetStatistics], list[torch.Tensor]]:
    """One pass over the calibration data with hooks on every expert set.

    Returns per-set statistics and per-set relative RTN weight errors [E, B].
    """
    with_sensitivity = config.method == "mode"
    candidates = [_candidates(s, config.bits, config.group_size) for s in sets]
    stats = [SetStatistics(s.shape[0], len(config.bits)) for s in sets]
    current: dict[str, torch.Tensor] = {}

    def on_first_layer(module: nn.Module, args: tuple, kwargs: dict) -> None:
        embeddings = hidden_states_argument(args, kwargs)  # [B, S, H]
        kept = redundancy_filter(embeddings, current["vision_2d"], config.redundancy_threshold).reshape(-1)
        current["groups"] = torch.stack([current["text"], kept, current["text"] | current["vision"]]).cpu()

    def on_set(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, top_k_index, top_k_weights = sets[index].layout.call_arguments(args, kwargs)
            groups = current["groups"]
            if hidden.shape[0] != groups.shape[1]:
                raise UnsupportedModelError(
                    f"{sets[index].name} saw {hidden.shape[0]} tokens for a batch of {groups.shape[1]}: the model "
                    "drops or reorders tokens before its experts, which mode-hf does not support."
                )
            reference, quantized_fns, _ = candidates[index]
            accumulate(stats[index], hidden, top_k_index, top_k_weights, groups, reference, quantized_fns if with_sensitivity else [])

        return hook

    first_layer = decoder_layers(model, sets[0].name)[0]
    hooks = [(first_layer, on_first_layer)] + [(s.module, on_set(i)) for i, s in enumerate(sets)]
    with pre_hooks(hooks), torch.no_grad():
        for batch in tqdm(batches, desc="mode-hf statistics", unit="batch"):
            masks = _masks(batch, vision_ids)
            current.update(text=masks.text, vision=masks.vision, vision_2d=masks.vision_2d)
            _run(model, batch)
    return stats, [errors for _, _, errors in candidates]


def score(stats: Sequence[SetStatistics], weight_errors: Sequence[torch.Tensor], config: ModeConfig) -> np.ndarray:
    """The cost matrix [J, B] over every expert of every set, for the configured method."""
    if config.method == "mode":
        per_set = [cost.mode_cost(s, config.text_weight, config.vision_weight, config.alpha) for s in stats]
    else:
        per_set = [cost.frequency_cost(s, e, config.alpha) for s, e in zip(stats, weight_errors)]
    costs = cost.with_tiebreak(torch.cat(per_set), torch.cat(list(weight_errors)), config.eta)
    return costs.numpy()


def allocate(sets: Sequence[ExpertSet], costs: np.ndarray | None, config: ModeConfig) -> tuple[list[np.ndarray], dict]:
    """Widths per set (uniform, or the MILP over `costs`) and a record of the solve."""
    params, set_index = _allocation_layout(sets)
    if config.method == "uniform":
        chosen, record = np.full(len(params), int(config.avg_bits)), {"solver": "none (uniform)"}
    else:
        guard = config.min_top_per_set if config.scope != "layer_uniform" else 0
        result = allocation.allocate(costs, params, set_index, config.bits, config.avg_bits, config.scope, guard)
        chosen = result.bits
        record = {"objective": result.objective, "solve_seconds": result.solve_seconds, "status": result.status}
    return [chosen[set_index == i] for i in range(len(sets))], record


def capture_inputs(
    model: nn.Module, expert_set: ExpertSet, batches: Sequence[dict], vision_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of one expert set over the calibration data, padding dropped.

    Returns (hidden [N, H] float32, top_k_index [N, k], is_text bool [N]); the forward stops after the set.
    """
    records: list[tuple[torch.Tensor, ...]] = []
    current: dict[str, BatchMasks] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, top_k_index, _ = expert_set.layout.call_arguments(args, kwargs)
        masks = current["masks"]
        valid = (masks.text | masks.vision).to(hidden.device)
        records.append((hidden[valid].float().cpu(), top_k_index[valid].cpu(), masks.text[valid.cpu()]))
        raise StopForward

    with pre_hooks([(expert_set.module, hook)]), torch.no_grad():
        for batch in batches:
            current["masks"] = _masks(batch, vision_ids)
            _run(model, batch)
    return tuple(torch.cat(parts) for parts in zip(*records))  # type: ignore[return-value]


def quantize_expert(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: nn.Module,
    bits: int,
    config: ModeConfig,
    inputs: torch.Tensor | None,
    token_weight: torch.Tensor | None,
) -> tuple[quantize.QuantizedWeight, quantize.QuantizedWeight, bool]:
    """One expert: (gate_up, down, used_gptq). GPTQ on gate_up, then on down_proj fed by the quantized gate_up.

    inputs: [n, H] tokens routed to this expert (None or too few: RTN); token_weight: [n] Hessian weights.
    """
    if config.quantizer == "rtn" or inputs is None or inputs.shape[0] < max(config.gptq_min_tokens, 1):
        return quantize.rtn(gate_up, bits, config.group_size), quantize.rtn(down, bits, config.group_size), False
    weighted = inputs * token_weight[:, None]  # [n, H]
    q_gate_up = quantize.gptq(gate_up, weighted.T @ inputs, bits, config.group_size, config.damp)
    hidden = activation(F.linear(inputs, q_gate_up.dequantize()))  # [n, I]
    q_down = quantize.gptq(down, (hidden * token_weight[:, None]).T @ hidden, bits, config.group_size, config.damp)
    return q_gate_up, q_down, True


def quantize_set(
    model: nn.Module, expert_set: ExpertSet, bits: np.ndarray, batches: Sequence[dict], config: ModeConfig, vision_ids: Sequence[int]
) -> tuple[PackedExperts, int]:
    """Quantize and pack one expert set; returns the packed module and how many experts fell back to RTN."""
    gate_up, down = (w.detach().float().cpu() for w in expert_set.layout.weights(expert_set.module))
    num_experts, hidden_dim, intermediate = expert_set.shape
    activation = expert_set.layout.activation(expert_set.module)
    packed = PackedExperts(expert_set.module, activation, bits.tolist(), hidden_dim, intermediate, config.group_size)
    inputs = top_k_index = token_weight = None
    if config.quantizer == "gptq":
        inputs, top_k_index, is_text = capture_inputs(model, expert_set, batches, vision_ids)
        token_weight = torch.where(is_text, config.text_hessian_weight, 1.0)  # [N]
    fallbacks = 0
    for expert in range(num_experts):
        routed = None if inputs is None else (top_k_index == expert).any(dim=1)  # [N]
        q_gate_up, q_down, used_gptq = quantize_expert(
            gate_up[expert], down[expert], activation, int(bits[expert]), config,
            None if routed is None else inputs[routed], None if routed is None else token_weight[routed],
        )
        fallbacks += int(config.quantizer == "gptq" and not used_gptq)
        packed.set_expert("gate_up_proj", expert, q_gate_up)
        packed.set_expert("down_proj", expert, q_down)
    device = next(expert_set.module.parameters()).device
    return packed.to(device), fallbacks


def quantize_model(model: nn.Module, config: ModeConfig, batches: Sequence[dict]) -> tuple[dict, dict]:
    """Quantize every routed-expert set of a loaded model in place.

    Returns:
        (bit_map, summary): widths per expert set name, and the statistics of the run (JSON types).
    """
    seconds: dict[str, float] = {}
    sets = check_plan(model, config, batches)
    vision_ids = vision_token_ids(getattr(model, "config", None), config.processor)
    stats = costs = None
    start = time.perf_counter()
    if config.method != "uniform":
        stats, weight_errors = gather_statistics(model, sets, batches, config, vision_ids)
        costs = score(stats, weight_errors, config)
    seconds["statistics"] = time.perf_counter() - start
    start = time.perf_counter()
    widths, solve = allocate(sets, costs, config)
    seconds["allocation"] = time.perf_counter() - start
    start = time.perf_counter()
    fallbacks = 0
    for expert_set, bits in zip(tqdm(sets, desc="mode-hf quantize", unit="layer"), widths):
        packed, set_fallbacks = quantize_set(model, expert_set, bits, batches, config, vision_ids)
        model.set_submodule(expert_set.name, packed)
        fallbacks += set_fallbacks
    seconds["quantization"] = time.perf_counter() - start
    bit_map = {s.name: [int(b) for b in w] for s, w in zip(sets, widths)}
    summary = build_summary(model, sets, stats, config, solve, seconds, fallbacks)
    return bit_map, summary


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
    return {
        "bits_histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
        "average_bits": round(totals["weights"] / params, 4),
        "effective_bits": round((totals["weights"] + totals["overhead"]) / params, 4),
        "expert_bytes": {"bf16": 2 * totals["params"], "packed": (totals["weights"] + totals["overhead"]) // 8},
    }
