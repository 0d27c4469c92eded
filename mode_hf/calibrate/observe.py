"""Observing a model on calibration data: per-set statistics (one pass with hooks on every expert set of a layer)
and the inputs of one expert set or one layer's linears (for GPTQ). Hooks attach to whatever module currently sits
at each expert set's name, so the same code observes the original model and a partly or fully quantized one
(progressive budgets); the reference weights always come from the original experts.

What a pass records is typed: `Routing` (what one set was called with on one batch), `BatchRecord` (one batch as
one set saw it: its routing, token groups and batch totals), `ExpertInputs` (the GPTQ inputs of one set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algo import quantize
from ..algo.grouped import grouped_linear
from ..algo.statistics import SetStatistics, accumulate, add_tokens_and_energy, redundancy_filter
from ..errors import CalibrationDataError, UnsupportedModelError
from ..model.layouts import gate_of
from ..model.offload import weights_loaded
from ..model.structure import ExpertSet, decoder_layers, layers_container
from .hooks import StopForward, hidden_states_argument, pre_hooks, stop_forward
from .inputs import BatchMasks, batch_masks
from .layerwise import LayerwiseRunner
from .losses import batch_loss, count_loss_tokens, only_trainable

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Observation:
    """What a statistics pass measures; built from the config by the method registry (`mode_hf.methods`).

    bits, group_size, symmetric: the candidate widths and how the RTN candidates are quantized.
    redundancy_threshold: tau of the redundancy filter (None keeps every vision token).
    output_damage: measure every expert's output change at every candidate width (False: routing only).
    gradients: weigh squared output errors by the squared next-token-loss gradient at each set's output (fisher):
        one full pass with backward per batch instead of layer-at-a-time passes.
    """

    bits: tuple[int, ...]
    group_size: int
    symmetric: bool
    redundancy_threshold: float | None
    output_damage: bool
    gradients: bool


@dataclass
class Routing:
    """What one expert set was called with on one batch, in canonical form (and, in a fisher pass, its output)."""

    hidden: torch.Tensor  # [T, H], or [T, k, H] per (token, slot)
    top_k_index: torch.Tensor  # int [T, k]
    top_k_weights: torch.Tensor  # [T, k]
    output: torch.Tensor | None = None  # the set's output during a fisher pass (its gradient is read)
    output_weight: torch.Tensor | None = None  # [T, H] squared loss gradient (fisher), recorded for the statistics


@dataclass
class BatchRecord:
    """One calibration batch as one expert set saw it."""

    routing: Routing | None  # None: the batch never reached the set (a set chosen by token type)
    groups: torch.Tensor  # bool [G, T_set]: group membership of the tokens the set saw
    totals: torch.Tensor | None  # [G] tokens of each group in the whole batch when the set sees only some, else None


class ExpertInputs(NamedTuple):
    """The calibration inputs of one expert set, padding dropped."""

    inputs: torch.Tensor  # float32 [N, H], or [N, k, H] per (token, slot)
    top_k_index: torch.Tensor  # int [N, k]
    is_text: torch.Tensor  # bool [N]


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


def gather_statistics(
    model: nn.Module, sets: Sequence[ExpertSet], batches: Sequence[dict], observation: Observation,
    vision_ids: Sequence[int],
) -> tuple[list[SetStatistics], list[torch.Tensor]]:
    """Per-set statistics over the calibration data, and per-set relative RTN weight errors [E, B].

    Layer at a time (`mode_hf.calibrate.layerwise`): one pass per decoder layer holding expert sets, each running
    only that layer on the recorded outputs of the one before; the candidate (RTN) weights of one layer's sets exist
    at a time. With `observation.gradients` (fisher) every batch takes a backward pass of the next-token loss on its
    text tokens through the whole model (nothing of the model trains), so that pass covers all layers at once and
    holds every set's candidates; squared output errors are weighted by the squared gradient at each set's output.
    """
    stats = [SetStatistics(s.shape[0], len(observation.bits)) for s in sets]
    errors: list[torch.Tensor | None] = [None] * len(sets)
    if observation.gradients:
        recorded = _record_pass(model, sets, range(len(sets)), batches, observation, vision_ids, None)
        for index, records in recorded.items():
            errors[index] = _set_statistics(sets[index], stats[index], records, observation)
        return stats, errors  # type: ignore[return-value]
    runner = LayerwiseRunner(model, layers_container(model, sets), batches)
    by_layer: dict[int | None, list[int]] = {}
    for index, expert_set in enumerate(sets):
        by_layer.setdefault(runner.layer_index(expert_set.name), []).append(index)
    for layer, indices in tqdm(by_layer.items(), desc="mode-hf statistics", unit="layer"):
        runner.advance_to(layer)
        recorded = _record_pass(model, sets, indices, batches, observation, vision_ids, runner)
        runner.finish_layer()
        for index, records in recorded.items():
            errors[index] = _set_statistics(sets[index], stats[index], records, observation)
    return stats, errors  # type: ignore[return-value]


class _StatisticsPass:
    """What one statistics pass shares between its hooks: the batch at hand's masks and token groups, and what each
    observed set was called with; and, batch after batch, the `BatchRecord` of every observed set."""

    def __init__(self, sets: Sequence[ExpertSet], indices: Sequence[int], threshold: float | None) -> None:
        self.sets, self.threshold = sets, threshold
        self.recorded: dict[int, list[BatchRecord]] = {i: [] for i in indices}
        self.masks: BatchMasks | None = None
        self.groups: torch.Tensor | None = None  # bool [G, B * S]: text, kept vision, all
        self.routings: dict[int, Routing] = {}

    def start_batch(self, batch: dict, vision_ids: Sequence[int]) -> None:
        self.masks, self.routings = batch_masks(batch, vision_ids), {}

    def on_first_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the first decoder layer: the redundancy filter on its input (the LM input embeddings)."""
        embeddings = hidden_states_argument(args, kwargs).detach()  # [B, S, H]
        kept = redundancy_filter(embeddings, self.masks.vision_2d, self.threshold).reshape(-1)
        self.groups = torch.stack([self.masks.text, kept.cpu(), self.masks.text | self.masks.vision]).cpu()

    def on_input(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, top_k_index, top_k_weights = self.sets[index].layout.call(module, args, kwargs)
            self.routings[index] = Routing(hidden.detach(), top_k_index.detach(), top_k_weights.detach())

        return hook

    def on_output(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.retain_grad()
            else:
                output.requires_grad_()  # a leaf: nothing upstream of the first set needs gradients
            self.routings[index].output = output

        return hook

    def finish_batch(self, batch: dict, gradients: bool) -> None:
        for index, records in self.recorded.items():
            records.append(self._batch_record(index, batch, gradients))

    def _batch_record(self, index: int, batch: dict, gradients: bool) -> BatchRecord:
        expert_set, groups = self.sets[index], self.groups  # groups: [G, B * S]
        seen = expert_set.tokens(batch)  # bool [B * S] or None (every token)
        routing = self.routings.get(index)
        if routing is None:  # a set this batch never reached (chosen by token type)
            return BatchRecord(None, groups, None)
        set_groups = groups if seen is None else groups[:, seen]
        _check_token_count(expert_set, routing.hidden, set_groups)
        if not bool(torch.isfinite(routing.hidden).all()):
            raise CalibrationDataError(
                f"calibration batch {len(self.recorded[index])}: the inputs of {expert_set.name} hold NaN or inf (the "
                "model diverges on these samples, or on these weights); drop the samples or fix the model."
            )
        if gradients:
            routing = Routing(routing.hidden, routing.top_k_index, routing.top_k_weights, output_weight=_fisher_weight(routing))
        return BatchRecord(routing, set_groups, None if seen is None else groups.sum(dim=1))


def _record_pass(
    model: nn.Module, sets: Sequence[ExpertSet], indices: Sequence[int], batches: Sequence[dict],
    observation: Observation, vision_ids: Sequence[int], runner: LayerwiseRunner | None,
) -> dict[int, list[BatchRecord]]:
    """One pass over the batches recording the inputs and routing of sets[indices] (all in the runner's current
    layer, recording its outputs for the next; or, without a runner, anywhere: a full forward, with backward for
    fisher). Returns every observed set's `BatchRecord` per batch."""
    gradients = observation.gradients
    state = _StatisticsPass(sets, indices, observation.redundancy_threshold)
    runner = runner or LayerwiseRunner(model, None, batches)
    with runner.replaying(), only_trainable(model, []):
        first_layer = decoder_layers(model, sets[0].name)[0]  # the replay standing in for it sees the embeddings too
        modules = {i: model.get_submodule(sets[i].name) for i in indices}
        hooks = [(first_layer, state.on_first_layer)] + [(m, state.on_input(i)) for i, m in modules.items()]
        if gradients:
            post = [(m, state.on_output(i)) for i, m in modules.items()]
        else:
            post = [runner.record_outputs() or (modules[indices[-1]], stop_forward)]
        with pre_hooks(hooks, post):
            for position, batch in enumerate(tqdm(batches, desc="  batches", unit="batch", leave=False)):
                state.start_batch(batch, vision_ids)
                if gradients and count_loss_tokens([batch], vision_ids):
                    with torch.enable_grad():
                        batch_loss(model, batch, vision_ids).backward()
                else:
                    with torch.no_grad():
                        runner.forward(position, batch)
                state.finish_batch(batch, gradients)
    return state.recorded


def _set_statistics(expert_set: ExpertSet, stats: SetStatistics, records: list[BatchRecord], observation: Observation) -> torch.Tensor:
    """Statistics of one set from its recorded batches, expert range by expert range; returns its weight errors."""
    outputs = [None if r.routing is None else torch.zeros(r.routing.hidden.shape[0], r.routing.hidden.shape[-1], dtype=torch.float64) for r in records]
    with weights_loaded(expert_set.module):  # once for all ranges when accelerate offloads the set
        errors = _range_statistics(expert_set, stats, records, observation, outputs)
    for record, output in zip(records, outputs):
        if record.routing is None:
            stats.tokens += record.groups.to(torch.float64).sum(dim=1)
        else:
            add_tokens_and_energy(stats, record.groups, output, record.totals)
    return torch.cat(errors)


def _range_statistics(
    expert_set: ExpertSet, stats: SetStatistics, records: list[BatchRecord], observation: Observation, outputs: list
) -> list[torch.Tensor]:
    errors = []
    for experts in expert_ranges(expert_set, len(observation.bits)):
        reference, quantized_fns, range_errors = candidates(
            expert_set, observation.bits, observation.group_size, experts, observation.symmetric
        )
        errors.append(range_errors)
        for record, output in zip(records, outputs):
            routing = record.routing
            if routing is not None:
                accumulate(
                    stats, routing.hidden, routing.top_k_index, routing.top_k_weights, record.groups, reference,
                    quantized_fns if observation.output_damage else [], output_weight=routing.output_weight,
                    totals=record.totals, experts=experts, output=output,
                )
    return errors


def _fisher_weight(routing: Routing) -> torch.Tensor:
    """Squared loss gradient at the set's output; zero for a batch without text to take a loss on."""
    if routing.output is None or routing.output.grad is None:
        return torch.zeros_like(routing.hidden)
    return routing.output.grad.detach().pow(2)  # [T, H]


def _check_token_count(expert_set: ExpertSet, hidden: torch.Tensor, groups: torch.Tensor) -> None:
    if hidden.shape[0] != groups.shape[1]:
        raise UnsupportedModelError(
            f"{expert_set.name} saw {hidden.shape[0]} tokens for a batch of {groups.shape[1]}: the model drops or "
            "reorders tokens before its experts, which mode-hf does not support."
        )


@dataclass
class _Capture:
    """The batch at hand of a capture pass, for its hooks."""

    masks: BatchMasks | None = None
    seen: torch.Tensor | None = None  # bool [B * S]: the tokens the captured set sees (None: all)
    records: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def capture_inputs(
    model: nn.Module, expert_set: ExpertSet, batches: Sequence[dict], vision_ids: Sequence[int],
    runner: LayerwiseRunner | None = None,
) -> ExpertInputs:
    """Inputs of one expert set over the calibration data, padding dropped; each forward stops at the set, and
    starts at the runner's current layer (which must be the set's) when a runner is given."""
    capture = _Capture()

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, top_k_index, _ = expert_set.layout.call(module, args, kwargs)
        valid, text = capture.masks.text | capture.masks.vision, capture.masks.text
        if capture.seen is not None:
            valid, text = valid[capture.seen], text[capture.seen]
        _check_token_count(expert_set, hidden, valid[None])
        at = valid.to(hidden.device)
        capture.records.append((hidden[at].float().cpu(), top_k_index[at].cpu(), text[valid]))
        raise StopForward

    runner = runner or LayerwiseRunner(model, None, batches)
    with runner.replaying(), pre_hooks([(model.get_submodule(expert_set.name), hook)]), torch.no_grad():
        for position, batch in enumerate(batches):
            capture.masks, capture.seen = batch_masks(batch, vision_ids), expert_set.tokens(batch)
            runner.forward(position, batch)
    if not capture.records:  # a set no calibration token reaches (e.g. a vision set with text-only data)
        _, hidden_size, _ = expert_set.shape
        return ExpertInputs(torch.empty(0, hidden_size), torch.empty(0, 1, dtype=torch.long), torch.empty(0, dtype=torch.bool))
    return ExpertInputs(*(torch.cat(parts) for parts in zip(*capture.records)))


def capture_hessians(
    model: nn.Module, layer: nn.Module, linears: dict[str, nn.Linear], batches: Sequence[dict], vision_ids: Sequence[int],
    text_weight: float = 1.0, runner: LayerwiseRunner | None = None,
) -> dict[str, torch.Tensor]:
    """GPTQ Hessians sum_t w_t x_t x_t^T [K, K] (float32) of the linears of one decoder layer; each forward stops after
    the layer, and starts at the runner's current layer (which must be this one) when a runner is given. Rows are
    the layer's non-padding tokens when a linear sees [B, S, K] inputs (w_t = text_weight for text tokens, else 1),
    every row otherwise (the linear sees a subset of tokens)."""
    hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
    capture = _Capture()

    def on_input(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = (args[0] if args else kwargs["input"]).detach().float()
            x = x.reshape(-1, x.shape[-1]).cpu()  # [N, K]
            masks = capture.masks
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
            capture.masks = batch_masks(batch, vision_ids)
            runner.forward(position, batch)
    return hessians
