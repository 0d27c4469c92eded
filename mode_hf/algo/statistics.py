"""Calibration statistics, as pure functions on tensors: modality masks, the redundancy filter, routing frequency
and per-modality sensitivity of every routed expert.

Token groups: every statistic is gathered for three groups of (non-padding) tokens, in this order:
`text`, `vision` (vision tokens KEPT by the redundancy filter) and `all` (every token, no filter: the input of the
`frequency` baseline). No transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

GROUPS = ("text", "vision", "all")


def modality_masks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    vision_token_ids: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and vision masks of a batch, padding excluded from both.

    Args:
        input_ids: int [B, S].
        attention_mask: int/bool [B, S] (0 = padding) or None.
        mm_token_type_ids: int [B, S] (0 text, 1 image, 2 video, 3 audio) or None; takes precedence over the ids.
            Audio tokens (Qwen3-Omni) belong to neither modality.
        vision_token_ids: image/video placeholder token ids, used when `mm_token_type_ids` is None.

    Returns:
        (text, vision): bool [B, S] each.
    """
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mm_token_type_ids is not None:
        text, vision = mm_token_type_ids == 0, (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    else:
        ids = torch.as_tensor(list(vision_token_ids), dtype=input_ids.dtype, device=input_ids.device)
        vision = torch.isin(input_ids, ids)
        text = ~vision
    return valid & text, valid & vision


def vision_runs(vision: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive vision tokens, one per image: (row, start, end) with end exclusive.

    Args:
        vision: bool [B, S].
    """
    padded = F.pad(vision.to(torch.int8), (1, 1))  # [B, S + 2]
    edges = padded[:, 1:] - padded[:, :-1]  # [B, S + 1]: +1 at a run start, -1 after its end
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
    return [(int(r), int(s), int(e)) for (r, s), (_, e) in zip(starts.tolist(), ends.tolist())]


def greedy_unique(vectors: torch.Tensor, threshold: float) -> torch.Tensor:
    """Duplicate-aware keep mask over vectors in order (raster order of one image's tokens).

    A vector is kept unless its cosine similarity to an already-kept vector is >= threshold.

    Args:
        vectors: float [N, H].
        threshold: tau in (0, 1].

    Returns:
        bool [N].
    """
    unit = F.normalize(vectors.float(), dim=-1)  # [N, H]
    keep = torch.zeros(unit.shape[0], dtype=torch.bool)
    kept = torch.empty(0, unit.shape[1])  # [K, H]
    for i in range(unit.shape[0]):
        if kept.shape[0] == 0 or float((kept @ unit[i]).max()) < threshold:
            keep[i] = True
            kept = torch.cat([kept, unit[i : i + 1]])
    return keep


def redundancy_filter(embeddings: torch.Tensor, vision: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Vision tokens kept by the duplicate-aware filter, image by image.

    Args:
        embeddings: float [B, S, H], the language model's input embeddings (after the vision merger).
        vision: bool [B, S].
        threshold: tau; None keeps every vision token.

    Returns:
        bool [B, S]: True for kept vision tokens, False elsewhere.
    """
    if threshold is None:
        return vision.clone()
    kept = torch.zeros_like(vision)
    for row, start, end in vision_runs(vision):
        kept[row, start:end] = greedy_unique(embeddings[row, start:end].detach().cpu(), threshold).to(kept.device)
    return kept


@dataclass
class SetStatistics:
    """Accumulated routing and sensitivity statistics of one expert set (float64 sums).

    counts [G, E]: tokens of group g routed to expert e; tokens [G]: tokens of group g;
    squared_error [G, E, B]: sum over routed tokens of ||w * (E_j(x) - Q_b(E_j)(x))||^2;
    energy [G]: sum over tokens of ||z||^2, z the set's output; routing_weight [G, E]: summed routing weights.
    """

    num_experts: int
    num_bits: int
    counts: torch.Tensor = field(init=False)
    tokens: torch.Tensor = field(init=False)
    squared_error: torch.Tensor = field(init=False)
    energy: torch.Tensor = field(init=False)
    routing_weight: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        groups = len(GROUPS)
        self.counts = torch.zeros(groups, self.num_experts, dtype=torch.float64)
        self.tokens = torch.zeros(groups, dtype=torch.float64)
        self.squared_error = torch.zeros(groups, self.num_experts, self.num_bits, dtype=torch.float64)
        self.energy = torch.zeros(groups, dtype=torch.float64)
        self.routing_weight = torch.zeros(groups, self.num_experts, dtype=torch.float64)

    def frequency(self) -> torch.Tensor:
        """f[g, e] = share of group-g tokens that route to e (0 for an empty group). [G, E]."""
        return self.counts / self.tokens.clamp(min=1)[:, None]

    def per_use_error(self) -> torch.Tensor:
        """q[g, e, b] = mean squared output change per routed use (0 where never routed). [G, E, B]."""
        return self.squared_error / self.counts.clamp(min=1)[:, :, None]

    def mean_energy(self) -> torch.Tensor:
        """Mean ||z||^2 per token of each group. [G]."""
        return self.energy / self.tokens.clamp(min=1)


ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [P, H], experts [P], ascending) -> [P, H]


def routed_inputs(inputs: torch.Tensor, token: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Inputs of (token, slot) pairs, [n, H]: from per-token inputs [T, H] or per-(token, slot) inputs [T, k, H]."""
    return inputs[token] if inputs.dim() == 2 else inputs[token, slot]


@torch.no_grad()
def accumulate(
    stats: SetStatistics,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    groups: torch.Tensor,
    reference: ExpertFn,
    quantized: Sequence[ExpertFn],
    output_weight: torch.Tensor | None = None,
    totals: torch.Tensor | None = None,
    experts: tuple[int, int] | None = None,
    output: torch.Tensor | None = None,
) -> None:
    """Add one batch of routed tokens to `stats` (in place: it is an accumulator).

    Args:
        hidden: [T, H] inputs of the expert set, or [T, k, H] when every (token, slot) has its own input.
        top_k_index: int [T, k] routed experts; top_k_weights: [T, k] routing weights.
        groups: bool [G, T] token membership of every group (padding belongs to none).
        reference: the original experts; quantized: the experts with weights at each candidate width, in bits order;
            each called once per batch on all routed (token, slot) pairs, sorted by expert.
        output_weight: [T, H] weight of every squared output error (the squared loss gradient at the set's output
            for the fisher sensitivity); None weighs all elements 1.
        totals: [G] tokens of each group in the whole batch, when the set sees only some of them (a set chosen by
            token type): frequencies and mean energies are then shares of the batch, comparable across sets.
            None: the set saw every token, totals = groups.sum(1).
        experts: (lo, hi): only the pairs routed to experts lo..hi-1 are taken (the fns then cover those experts
            and are called with ids relative to lo), their weighted reference outputs are added to `output`, and
            token counts and energies are left to `add_tokens_and_energy` once every range is in. None: all experts,
            everything added here.
        output: [T, H] float64 accumulator of the set's output (with `experts`).
    """
    lo, hi = (0, stats.num_experts) if experts is None else experts
    routed = (top_k_index >= lo) & (top_k_index < hi)  # out-of-range ids mark empty slots or other ranges
    token, slot = routed.nonzero(as_tuple=True)  # [P], [P]
    ids = top_k_index[token, slot]
    order = torch.argsort(ids, stable=True)  # pairs grouped by expert, for grouped matmuls
    token, slot, ids = token[order], slot[order], ids[order]
    weight = top_k_weights[token, slot].double()[:, None]  # [P, 1]
    inputs = routed_inputs(hidden, token, slot)  # [P, H]
    exact = reference(inputs, ids - lo).double()  # [P, H]
    if output is None:
        output = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float64)  # [T, H]
    output.index_add_(0, token.cpu(), (weight * exact).cpu())
    token, ids = token.cpu(), ids.cpu()
    groups_f = groups.to(torch.float64)  # [G, T]
    member = groups_f[:, token]  # [G, P]
    stats.counts.index_add_(1, ids, member)
    stats.routing_weight.index_add_(1, ids, member * weight[:, 0].cpu())
    scale = 1.0 if output_weight is None else output_weight[token].double()  # [P, H]
    for b, quantized_fn in enumerate(quantized):
        error = (scale * (weight * (exact - quantized_fn(inputs, ids - lo).double())).pow(2)).sum(dim=1)  # [P]
        per_expert = torch.zeros(groups.shape[0], stats.num_experts, dtype=torch.float64)
        stats.squared_error[:, :, b] += per_expert.index_add_(1, ids, member * error.cpu())
    if experts is None:
        add_tokens_and_energy(stats, groups, output, totals)


def add_tokens_and_energy(stats: SetStatistics, groups: torch.Tensor, output: torch.Tensor, totals: torch.Tensor | None = None) -> None:
    """Token counts and output energy of one batch, once its whole output [T, H] is known (see `accumulate`)."""
    groups_f = groups.to(torch.float64)  # [G, T]
    stats.tokens += groups_f.sum(dim=1) if totals is None else totals.to(torch.float64)
    stats.energy += groups_f @ output.pow(2).sum(dim=1)
