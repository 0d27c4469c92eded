"""Routing specialization measures (mode_hf.bench.routing) on counts where the answers are known by hand."""

from __future__ import annotations

import pytest
import torch

from mode_hf.algo.statistics import SetStatistics
from mode_hf.bench import routing


def stats_with(text: list[float], kept: list[float], all_tokens: list[float]) -> SetStatistics:
    stats = SetStatistics(len(text), 1)
    stats.counts = torch.tensor([text, kept, all_tokens], dtype=torch.float64)
    return stats


def test_disjoint_and_identical_routing():
    # 4 experts: text uses 0 and 1 only, vision 2 and 3 only (kept vision = a half of it, same experts)
    disjoint = routing.set_specialization(stats_with([3, 1, 0, 0], [0, 0, 2, 2], [3, 1, 4, 4]))
    assert disjoint["tv_kept"] == pytest.approx(1.0) and disjoint["tv_all"] == pytest.approx(1.0)
    assert disjoint["text_mass_on_rare_vision"] == pytest.approx(1.0) and disjoint["rare_vision_experts"] == 2
    usage = torch.tensor([3, 1, 4, 4], dtype=torch.float64) / 12
    assert disjoint["usage_cv"] == pytest.approx(float(usage.std(unbiased=False) / usage.mean()))
    assert disjoint["usage_max_share"] == pytest.approx(4 / 12)
    same = routing.set_specialization(stats_with([1, 1, 1, 1], [2, 2, 2, 2], [5, 5, 5, 5]))
    assert same["tv_kept"] == 0 and same["tv_all"] == 0 and same["text_mass_on_rare_vision"] == 0 and same["usage_cv"] == 0


def test_rare_threshold_and_mean():
    # vision shares: 0.05, 0.15, 0.4, 0.4 of 4 experts: below 0.25 / 4 = 0.0625 only expert 0
    stats = stats_with([1, 1, 1, 1], [1, 3, 8, 8], [1 + 1, 1 + 3, 1 + 8, 1 + 8])
    measures = routing.specialization([stats, stats], ["a", "b"])
    assert measures["a"]["rare_vision_experts"] == 1 and measures["a"]["text_mass_on_rare_vision"] == pytest.approx(0.25)
    assert measures["mean"] == pytest.approx(measures["a"])
