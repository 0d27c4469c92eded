"""Observing a model on calibration data: per-set statistics (one pass with hooks on every expert set) and the
inputs of one expert set (for GPTQ). Hooks attach to whatever module currently sits at each expert set's name, so
the same code observes the original model and a partly or fully quantized one (progressive budgets); the
reference weights always come from the original experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import quantize
from .calibration import StopForward, hidden_states_argument, pre_hooks
from .config import ModeConfig
from .grouped import grouped_linear
from .experts import ExpertSet, UnsupportedModelError, decoder_layers, decoder_layers_name, gate_of, weights_loaded
from .layerwise import LayerwiseRunner
from .statistics import SetStatistics, accumulate, add_tokens_and_energy, modality_masks, redundancy_filter
from .training import batch_loss, count_loss_tokens, only_trainable

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BatchMasks:
    """Token masks of one calibration batch, flattened to [T] in the order the expert sets see tokens."""

    text: torch.Tensor
    vision: torch.Tensor
    vision_2d: torch.Tensor  # [B, S], for the per-image redundancy filter


def batch_masks(batch: dict, vision_ids: Sequence[int]) -> BatchMasks:
    """The token masks of a model-input batch."""
    text, vision = modality_masks(batch["input_ids"], batch.get("attention_mask"), batch.get("mm_token_type_ids"), vision_ids)
    return BatchMasks(text.reshape(-1), vision.reshape(-1), vision)


def stop_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """A forward hook that ends the pass after its module: what follows (up to the LM head) would be wasted work."""
    raise StopForward


def expert_fn(
    gate_up: torch.Tensor, down: torch.Tensor, activation: nn.Module,
    gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
) -> ExpertFn:
    """The experts' MLPs from canonical fused weights (and biases): (x [P, H], experts [P] ascending) -> [P, H]
    float32, as grouped matmuls over all experts at once."""

    def forward(x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        offsets = torch.bincount(experts, minlength=gate_up.shape[0]).cumsum(0).to(torch.int32)  # [E]
        hidden = activation(grouped_linear(x.float(), gate_up, offsets, gate_up_bias))  # [P, I]
        return grouped_linear(hidden, down, offsets, down_bias)  # [P, H]

    return forward


def float_weights(
    expert_set: ExpertSet, experts: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Canonical float32 copies of a set's (gate_up [E, 2I, H], down [E, H, I], gate_up bias, down bias), of the
    experts lo..hi-1 only when `experts` is given."""
    lo, hi = experts or (0, expert_set.shape[0])
    with weights_loaded(expert_set.module):  # offloaded by accelerate: read for the copy only
        weights = expert_set.layout.weights(expert_set.module) + expert_set.layout.biases(expert_set.module)
        return tuple(None if w is None else w[lo:hi].detach().float() for w in weights)  # type: ignore[return-value]


CANDIDATE_BYTES = 1 << 30  # float32 bytes of the reference and candidate weights of the experts observed at once


def expert_ranges(expert_set: ExpertSet, num_bits: int) -> list[tuple[int, int]]:
    """Consecutive expert ranges whose reference + candidate float32 weights fit in CANDIDATE_BYTES (>= 1 expert)."""
    num_experts = expert_set.shape[0]
    per_expert = 4 * (1 + num_bits) * expert_set.params_per_expert
    step = max(1, min(num_experts, CANDIDATE_BYTES // per_expert))
    return [(lo, min(lo + step, num_experts)) for lo in range(0, num_experts, step)]


def candidates(
    expert_set: ExpertSet, bits: Sequence[int], group_size: int, experts: tuple[int, int] | None = None,
    symmetric: bool = False,
) -> tuple[ExpertFn, list[ExpertFn], torch.Tensor]:
    """Reference fn, RTN fns at every width, and relative weight error [n, B] of the experts lo..hi-1 of one
    (original) set (all experts when `experts` is None); the fns take expert ids relative to lo."""
    gate_up, down, gate_up_bias, down_bias = float_weights(expert_set, experts)
    activation = gate_of(expert_set.module)
    fns, errors = [], []
    for b in bits:
        w_gate_up = quantize.rtn(gate_up, b, group_size, symmetric).dequantize()  # [n, 2I, H]
        w_down = quantize.rtn(down, b, group_size, symmetric).dequantize()  # [n, H, I]
        fns.append(expert_fn(w_gate_up, w_down, activation, gate_up_bias, down_bias))
        squared = (gate_up - w_gate_up).pow(2).sum((1, 2)) + (down - w_down).pow(2).sum((1, 2))  # [n]
        errors.append(squared / (gate_up.pow(2).sum((1, 2)) + down.pow(2).sum((1, 2))).clamp(min=1e-30))
    return expert_fn(gate_up, down, activation, gate_up_bias, down_bias), fns, torch.stack(errors, dim=1).double()


@dataclass
class _Record:
    hidden: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    output: torch.Tensor | None = None  # the set's output during a fisher pass (its gradient is read)
    output_weight: torch.Tensor | None = None  # [T, H] squared loss gradient (fisher), recorded for the statistics


def layers_container(model: nn.Module, sets: Sequence[ExpertSet]) -> str | None:
    """The one ModuleList of decoder layers holding every set (layer-at-a-time passes), or None (full passes)."""
    names = {decoder_layers_name(model, s.name) for s in sets}
    return names.pop() if len(names) == 1 else None


def gather_statistics(
    model: nn.Module, sets: Sequence[ExpertSet], batches: Sequence[dict], config: ModeConfig, vision_ids: Sequence[int]
) -> tuple[list[SetStatistics], list[torch.Tensor]]:
    """Per-set statistics over the calibration data, and per-set relative RTN weight errors [E, B].

    Layer at a time (`mode_hf.layerwise`): one pass per decoder layer holding expert sets, each running only that
    layer on the recorded outputs of the one before; the candidate (RTN) weights of one layer's sets exist at a time.
    With `config.sensitivity == "fisher"` every batch takes a backward pass of the next-token loss on its text
    tokens through the whole model (nothing of the model trains), so that pass covers all layers at once and holds
    every set's candidates; squared output errors are weighted by the squared gradient at each set's output.
    """
    stats = [SetStatistics(s.shape[0], len(config.bits)) for s in sets]
    errors: list[torch.Tensor | None] = [None] * len(sets)
    if config.sensitivity == "fisher":
        _statistics_pass(model, sets, range(len(sets)), batches, config, vision_ids, stats, errors, None)
        return stats, errors  # type: ignore[return-value]
    runner = LayerwiseRunner(model, layers_container(model, sets), batches)
    by_layer: dict[int | None, list[int]] = {}
    for index, expert_set in enumerate(sets):
        by_layer.setdefault(runner.layer_index(expert_set.name), []).append(index)
    for layer, indices in tqdm(by_layer.items(), desc="mode-hf statistics", unit="layer"):
        runner.advance_to(layer)
        _statistics_pass(model, sets, indices, batches, config, vision_ids, stats, errors, runner)
    return stats, errors  # type: ignore[return-value]


def _statistics_pass(
    model: nn.Module, sets: Sequence[ExpertSet], indices: Sequence[int], batches: Sequence[dict], config: ModeConfig,
    vision_ids: Sequence[int], stats: list[SetStatistics], errors: list, runner: LayerwiseRunner | None,
) -> None:
    """One pass over the batches recording the inputs and routing of sets[indices] (all in the runner's current
    layer, or, without a runner, anywhere: a full forward, with backward for fisher); then their statistics,
    expert range by expert range (`expert_ranges`), so that only one range's candidate weights exist at a time."""
    fisher = config.sensitivity == "fisher"
    current: dict = {}
    recorded: dict[int, list] = {i: [] for i in indices}  # per set, per batch: (record or None, groups, totals)

    def on_first_layer(module: nn.Module, args: tuple, kwargs: dict) -> None:
        embeddings = hidden_states_argument(args, kwargs).detach()  # [B, S, H]
        kept = redundancy_filter(embeddings, current["masks"].vision_2d, config.redundancy_threshold).reshape(-1)
        masks = current["masks"]
        current["groups"] = torch.stack([masks.text, kept.cpu(), masks.text | masks.vision]).cpu()

    def on_input(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, top_k_index, top_k_weights = sets[index].layout.call(module, args, kwargs)
            current["records"][index] = _Record(hidden.detach(), top_k_index.detach(), top_k_weights.detach())

        return hook

    def on_output(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.retain_grad()
            else:
                output.requires_grad_()  # a leaf: nothing upstream of the first set needs gradients
            current["records"][index].output = output

        return hook

    runner = runner or LayerwiseRunner(model, None, batches)
    with runner.replaying(), only_trainable(model, []):
        first_layer = decoder_layers(model, sets[0].name)[0]  # the replay standing in for it sees the embeddings too
        modules = {i: model.get_submodule(sets[i].name) for i in indices}
        hooks = [(first_layer, on_first_layer)] + [(m, on_input(i)) for i, m in modules.items()]
        if fisher:
            post = [(m, on_output(i)) for i, m in modules.items()]
        else:
            post = [runner.record_outputs() or (modules[indices[-1]], stop_forward)]
        with pre_hooks(hooks, post):
            for position, batch in enumerate(tqdm(batches, desc="  batches", unit="batch", leave=False)):
                current.update(masks=batch_masks(batch, vision_ids), records={})
                if fisher and count_loss_tokens([batch], vision_ids):
                    with torch.enable_grad():
                        batch_loss(model, batch, vision_ids).backward()
                else:
                    with torch.no_grad():
                        runner.forward(position, batch)
                for index in indices:
                    recorded[index].append(_record_batch(sets[index], current, batch, fisher, index))
    if not fisher:
        runner.finish_layer()
    with_sensitivity = config.method in ("mode", "pmq", "gemq") and config.sensitivity != "weight"
    for index in indices:
        errors[index] = _set_statistics(sets[index], stats[index], recorded.pop(index), config, with_sensitivity)


def _record_batch(expert_set: ExpertSet, current: dict, batch: dict, fisher: bool, index: int) -> tuple:
    """(record or None when the batch never reached the set, the set's token groups [G, T_set], batch totals)."""
    groups = current["groups"]  # [G, B * S]
    seen = expert_set.tokens(batch)  # bool [B * S] or None (every token)
    record = current["records"].get(index)
    if record is None:  # a set this batch never reached (chosen by token type)
        return None, groups, None
    set_groups = groups if seen is None else groups[:, seen]
    _check_token_count(expert_set, record.hidden, set_groups)
    if fisher:
        record = _Record(record.hidden, record.top_k_index, record.top_k_weights, output_weight=_fisher_weight(record))
    return record, set_groups, None if seen is None else groups.sum(dim=1)


def _set_statistics(expert_set: ExpertSet, stats: SetStatistics, recorded: list, config: ModeConfig, with_sensitivity: bool) -> torch.Tensor:
    """Statistics of one set from its recorded batches, expert range by expert range; returns its weight errors."""
    outputs = [None if r is None else torch.zeros(r.hidden.shape[0], r.hidden.shape[-1], dtype=torch.float64) for r, _, _ in recorded]
    with weights_loaded(expert_set.module):  # once for all ranges when accelerate offloads the set
        errors = _range_statistics(expert_set, stats, recorded, config, with_sensitivity, outputs)
    for (record, groups, totals), output in zip(recorded, outputs):
        if record is None:
            stats.tokens += groups.to(torch.float64).sum(dim=1)
        else:
            add_tokens_and_energy(stats, groups, output, totals)
    return torch.cat(errors)


def _range_statistics(
    expert_set: ExpertSet, stats: SetStatistics, recorded: list, config: ModeConfig, with_sensitivity: bool, outputs: list
) -> list[torch.Tensor]:
    errors = []
    for experts in expert_ranges(expert_set, len(config.bits)):
        reference, quantized_fns, range_errors = candidates(expert_set, config.bits, config.group_size, experts, config.symmetric)
        errors.append(range_errors)
        for (record, groups, totals), output in zip(recorded, outputs):
            if record is not None:
                accumulate(
                    stats, record.hidden, record.top_k_index, record.top_k_weights, groups, reference,
                    quantized_fns if with_sensitivity else [], output_weight=record.output_weight, totals=totals,
                    experts=experts, output=output,
                )
    return errors


def _fisher_weight(record: _Record) -> torch.Tensor:
    """Squared loss gradient at the set's output; zero for a batch without text to take a loss on."""
    if record.output is None or record.output.grad is None:
        return torch.zeros_like(record.hidden)
    return record.output.grad.detach().pow(2)  # [T, H]


def _check_token_count(expert_set: ExpertSet, hidden: torch.Tensor, groups: torch.Tensor) -> None:
    if hidden.shape[0] != groups.shape[1]:
        raise UnsupportedModelError(
            f"{expert_set.name} saw {hidden.shape[0]} tokens for a batch of {groups.shape[1]}: the model drops or "
            "reorders tokens before its experts, which mode-hf does not support."
        )


def capture_inputs(
    model: nn.Module, expert_set: ExpertSet, batches: Sequence[dict], vision_ids: Sequence[int],
    runner: LayerwiseRunner | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of one expert set over the calibration data, padding dropped.

    Returns (inputs [N, H] or [N, k, H] float32, top_k_index [N, k], is_text bool [N]); each forward stops at
    the set, and starts at the runner's current layer (which must be the set's) when a runner is given.
    """
    records: list[tuple[torch.Tensor, ...]] = []
    current: dict = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, top_k_index, _ = expert_set.layout.call(module, args, kwargs)
        masks, seen = current["masks"], current["seen"]
        valid, text = masks.text | masks.vision, masks.text
        if seen is not None:
            valid, text = valid[seen], text[seen]
        _check_token_count(expert_set, hidden, valid[None])
        records.append((hidden[valid.to(hidden.device)].float().cpu(), top_k_index[valid.to(hidden.device)].cpu(), text[valid]))
        raise StopForward

    runner = runner or LayerwiseRunner(model, None, batches)
    with runner.replaying(), pre_hooks([(model.get_submodule(expert_set.name), hook)]), torch.no_grad():
        for position, batch in enumerate(batches):
            current.update(masks=batch_masks(batch, vision_ids), seen=expert_set.tokens(batch))
            runner.forward(position, batch)
    if not records:  # a set no calibration token reaches (e.g. a vision set with text-only data)
        _, hidden_size, _ = expert_set.shape
        return torch.empty(0, hidden_size), torch.empty(0, 1, dtype=torch.long), torch.empty(0, dtype=torch.bool)
    return tuple(torch.cat(parts) for parts in zip(*records))  # type: ignore[return-value]


def capture_hessians(
    model: nn.Module, layer: nn.Module, linears: dict[str, nn.Linear], batches: Sequence[dict], vision_ids: Sequence[int],
    text_weight: float = 1.0, runner: LayerwiseRunner | None = None,
) -> dict[str, torch.Tensor]:
    """GPTQ Hessians sum_t w_t x_t x_t^T [K, K] (float32) of the linears of one decoder layer; each forward stops after
    the layer, and starts at the runner's current layer (which must be this one) when a runner is given. Rows are
    the layer's non-padding tokens when a linear sees [B, S, K] inputs (w_t = text_weight for text tokens, else 1),
    every row otherwise (the linear sees a subset of tokens)."""
    hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
    current: dict = {}

    def on_input(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = (args[0] if args else kwargs["input"]).detach().float()
            x = x.reshape(-1, x.shape[-1]).cpu()  # [N, K]
            masks = current["masks"]
            if x.shape[0] == masks.text.shape[0]:
                valid = masks.text | masks.vision
                weight = torch.where(masks.text, text_weight, 1.0)[valid]
                x = x[valid]
            else:
                weight = torch.ones(x.shape[0])
            hessians[name] += (x * weight[:, None]).T @ x

        return hook

    hooks = [(module, on_input(name)) for name, module in linears.items()]
    runner = runner or LayerwiseRunner(model, None, batches)
    with runner.replaying(), pre_hooks(hooks, [(layer, stop_forward)]), torch.no_grad():
        for position, batch in enumerate(batches):
            current["masks"] = batch_masks(batch, vision_ids)
            runner.forward(position, batch)
    return hessians
