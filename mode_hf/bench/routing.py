"""How modality-specialized a model's routing is, from the routing statistics of a calibration pass
(`mode_hf.algo.statistics.SetStatistics`: token counts per group text / kept vision / all, per expert).

Per expert set:
- `tv_kept`, `tv_all`: total-variation distance between the text and the vision routing distributions (0: the same
  experts in the same proportions, 1: disjoint experts), vision = the tokens the redundancy filter kept, or all;
- `text_mass_on_rare_vision`: the share of text routing mass on experts that vision tokens rarely choose (an expert
  whose share of all vision routing is below RARE_SHARE of the uniform share 1/E);
- `usage_cv`: the coefficient of variation of expert usage over all tokens (0: perfectly balanced);
- `usage_max_share`: the largest expert's share of all routing (1/E when balanced).
Pure tensor math; no model is run here.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..algo.statistics import GROUPS, SetStatistics

TEXT, KEPT, ALL = (GROUPS.index(g) for g in ("text", "vision", "all"))
RARE_SHARE = 0.25  # an expert vision tokens "rarely choose": below a quarter of the uniform share 1/E
DEFAULT_TAU = 0.9  # the redundancy filter's threshold, as ModeConfig's default


def _distribution(counts: torch.Tensor) -> torch.Tensor:
    return counts / counts.sum().clamp(min=1e-30)


def set_specialization(stats: SetStatistics) -> dict[str, float]:
    """The specialization measures of one expert set (see the module docstring)."""
    text = _distribution(stats.counts[TEXT])  # [E]
    kept = _distribution(stats.counts[KEPT])
    vision = _distribution(stats.counts[ALL] - stats.counts[TEXT])  # every vision token, filtered or not
    usage = _distribution(stats.counts[ALL])
    rare = vision < RARE_SHARE / stats.num_experts
    return {
        "tv_kept": float(0.5 * (text - kept).abs().sum()),
        "tv_all": float(0.5 * (text - vision).abs().sum()),
        "text_mass_on_rare_vision": float(text[rare].sum()),
        "rare_vision_experts": int(rare.sum()),
        "usage_cv": float(usage.std(unbiased=False) / usage.mean()),
        "usage_max_share": float(usage.max()),
    }


def specialization(stats: Sequence[SetStatistics], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """{expert-set name: its measures}, and "mean" over the sets."""
    per_set = {name: set_specialization(s) for name, s in zip(names, stats)}
    keys = next(iter(per_set.values())).keys()
    per_set["mean"] = {k: sum(v[k] for v in per_set.values()) / len(names) for k in keys}
    return per_set


def measure(model: Any, processor: Any, samples: Sequence[dict], batch_size: int = 4) -> dict[str, Any]:
    """Routing statistics of `model` on calibration `samples` (one pass, no damage measured): the token counts
    (text, vision, vision kept by the redundancy filter at the library's default tau) and `specialization`."""
    from ..calibrate.inputs import build_batches, vision_token_ids
    from ..calibrate.observe import Observation, gather_statistics
    from ..model.structure import find_expert_sets

    sets = find_expert_sets(model)
    batches = build_batches(samples, processor, batch_size)
    observation = Observation(bits=(4,), group_size=128, symmetric=False, redundancy_threshold=DEFAULT_TAU,
                              output_damage=False, gradients=False)
    stats, _ = gather_statistics(model, sets, batches, observation, vision_token_ids(model.config, processor))
    text, kept, everything = stats[0].tokens.tolist()
    return {"tokens": {"text": text, "vision": everything - text, "vision_kept": kept},
            "sets": specialization(stats, [s.name for s in sets])}
