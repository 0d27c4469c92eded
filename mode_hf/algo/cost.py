"""Allocation costs c[j, b] (the damage of putting expert j at width b), as pure functions on tensors.

`mode`:       c = sum_m lambda_m * (f^m)^alpha * q^m / mean_energy      (m in text, vision; vision = kept tokens)
              ablations: one group of text + kept vision (modality_split=False); q^m := weight error ("weight")
`frequency`:  c = (f^all)^alpha * ||W - Q_b(W)||^2 / ||W||^2           (total frequency, no split, no filter)
`pmq`:        c = f^all * (summed routing weight)^1.5 * ||Z - Z_q||_F    (MC-MoE, all tokens)
`gemq`:       c = sum_t sum_h (dL/dz_th)^2 (z_th - z^_th)^2                (statistics gathered with fisher weights)
Both get the tie-breaker eta * mean(c) * ||W - Q_b(W)||^2 / ||W||^2 over all sets, so that experts no calibration
token reached are still ordered by weight error. No transformers import.
"""

from __future__ import annotations

import torch

from .statistics import GROUPS, SetStatistics

TEXT, VISION, ALL = (GROUPS.index(g) for g in ("text", "vision", "all"))


def mode_cost(
    stats: SetStatistics,
    text_weight: float,
    vision_weight: float,
    alpha: float,
    relative: bool = True,
    modality_split: bool = True,
    weight_error: torch.Tensor | None = None,
) -> torch.Tensor:
    """Modality-decomposed cost of one expert set, float64 [E, B].

    Args:
        stats: the set's accumulated statistics (with squared errors for every candidate width).
        text_weight, vision_weight: lambda_text and lambda_vision of the cost.
        alpha: frequency exponent.
        relative: divide by the set's mean output energy over all tokens, so that sets are comparable in a global
            allocation.
        modality_split: False (ablation): one group of text + kept vision tokens, frequency and per-use damage
            over it, weight 1.
        weight_error: [E, B] relative weight error (ablation): used as the per-use damage of every group instead
            of the measured output change.
    """
    if modality_split:
        frequency, per_use = stats.frequency(), stats.per_use_error()  # [G, E], [G, E, B]
        terms = [(text_weight, frequency[TEXT], per_use[TEXT]), (vision_weight, frequency[VISION], per_use[VISION])]
    else:
        counts = stats.counts[TEXT] + stats.counts[VISION]  # [E]
        tokens = stats.tokens[TEXT] + stats.tokens[VISION]
        squared = stats.squared_error[TEXT] + stats.squared_error[VISION]  # [E, B]
        terms = [(1.0, counts / tokens.clamp(min=1), squared / counts.clamp(min=1)[:, None])]
    if weight_error is not None:
        terms = [(weight, frequency, weight_error.double()) for weight, frequency, _ in terms]
    cost = sum(weight * frequency[:, None].pow(alpha) * per_use for weight, frequency, per_use in terms)
    if relative:
        cost = cost / stats.mean_energy()[ALL].clamp(min=torch.finfo(torch.float64).tiny)
    return cost


def frequency_cost(stats: SetStatistics, weight_error: torch.Tensor, alpha: float) -> torch.Tensor:
    """The `frequency` baseline: total routing frequency times relative weight error, float64 [E, B]."""
    return stats.frequency()[ALL, :, None].pow(alpha) * weight_error.double()


def pmq_cost(stats: SetStatistics) -> torch.Tensor:
    """MC-MoE/PMQ: frequency x (summed routing weight)^1.5 x Frobenius norm of the output change, float64 [E, B]."""
    frequency, routing_weight = stats.frequency()[ALL], stats.routing_weight[ALL]  # [E], [E]
    return (frequency * routing_weight.pow(1.5))[:, None] * stats.squared_error[ALL].sqrt()


def gemq_cost(stats: SetStatistics) -> torch.Tensor:
    """GEMQ: the fisher-weighted squared output error summed over all tokens, float64 [E, B] (loss units).

    `stats` must have been gathered with squared loss gradients as output weights.
    """
    return stats.squared_error[ALL].clone()


def with_tiebreak(costs: torch.Tensor, weight_error: torch.Tensor, eta: float) -> torch.Tensor:
    """costs + eta * mean(costs) * weight_error, both [J, B] over every expert of the allocation.

    When every cost is zero (no calibration signal at all) the weight error alone orders the experts.
    """
    scale = costs.mean() if float(costs.mean()) > 0 else torch.tensor(1.0, dtype=torch.float64)
    return costs + eta * scale * weight_error.double()
