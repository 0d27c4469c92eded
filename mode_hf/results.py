"""What a quantization run produces: the bit map, the dense map and the summary (`QuantizationResult`), and the
summary's contents (sizes, bits, token counts, keep ratio, frequencies).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .algo.statistics import GROUPS, SetStatistics
from .config import ModeConfig
from .model.packed import PackedExperts, PackedLinear
from .model.structure import ExpertSet

logger = logging.getLogger(__name__)


@dataclass
class QuantizationResult:
    """The result of quantizing a model, stored in its config (`ModeConfig.bit_map`, `dense_map`, `summary`).

    bit_map: {expert-set name: [width of every expert]}; dense_map: {linear name: width} (`dense_bits`) or None;
    summary: statistics of the run, JSON types (`build_summary`).
    """

    bit_map: dict[str, list[int]]
    dense_map: dict[str, int] | None
    summary: dict[str, Any]


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
