"""Masks, the redundancy filter, routing statistics and costs, on inputs where the answer is known."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import tiny
from mode_hf import ModeConfig
from mode_hf.algo import cost
from mode_hf.calibrate.inputs import build_batches, vision_token_ids
from mode_hf.model.structure import find_expert_sets
from mode_hf.calibrate.observe import gather_statistics
from mode_hf.methods import observation
from mode_hf.pipeline import quantize_model, score
from mode_hf.algo.statistics import GROUPS, SetStatistics, accumulate, greedy_unique, modality_masks, redundancy_filter, vision_runs


def test_modality_masks_from_ids_and_padding():
    input_ids = torch.tensor([[5, 4, 4, 4, 6, 7], [4, 4, 8, 9, 1, 1]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    text, vision = modality_masks(input_ids, attention, None, vision_token_ids=[4])
    assert vision.tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert text.tolist() == [[1, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0]]


def test_modality_masks_prefer_token_types():
    input_ids = torch.tensor([[5, 4, 4, 6]])
    types = torch.tensor([[0, 0, 1, 2]])  # deliberately disagreeing with the ids
    text, vision = modality_masks(input_ids, None, types, vision_token_ids=[4])
    assert vision.tolist() == [[0, 0, 1, 1]] and text.tolist() == [[1, 1, 0, 0]]


def test_vision_runs_split_images():
    vision = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    assert vision_runs(vision) == [(0, 1, 3), (0, 4, 5), (1, 0, 4), (1, 5, 6)]


def test_greedy_unique_keeps_first_of_each_duplicate():
    base = torch.eye(4)
    vectors = torch.stack([base[0], 2 * base[0], base[1], base[0] + 0.01 * base[2], base[2], base[1] * 3, base[3]])
    assert greedy_unique(vectors, 0.9).tolist() == [True, False, True, False, True, False, True]
    assert greedy_unique(vectors, 1.0).tolist() == [True, False, True, True, True, False, True]


def test_redundancy_filter_on_images_with_duplicate_patches():
    # two images in one row, one in another; patches repeat a background vector except for one "object" patch
    background, other = torch.randn(8), torch.randn(8)
    embeddings = background.repeat(2, 10, 1)  # [2, 10, 8]
    embeddings[0, 3] = other
    embeddings[1, 2] = other
    vision = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    kept = redundancy_filter(embeddings, vision, 0.9)
    # per image: the first background patch and the object patch survive; duplicates across images are not merged
    assert kept.tolist()[0] == [0, 1, 0, 1, 0, 0, 1, 0, 0, 0]
    assert kept.tolist()[1] == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert torch.equal(redundancy_filter(embeddings, vision, None), vision)


def test_accumulate_against_float64_brute_force():
    torch.manual_seed(0)
    tokens, hidden, experts, k = 12, 6, 4, 2
    x = torch.randn(tokens, hidden)
    top_k_index = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    top_k_weights = torch.rand(tokens, k)
    groups = torch.stack([torch.arange(tokens) < 5, torch.arange(tokens) >= 7, torch.ones(tokens, dtype=torch.bool)])
    weights = torch.randn(experts, hidden, hidden)
    noise = [0.1 * torch.randn(experts, hidden, hidden), 0.01 * torch.randn(experts, hidden, hidden)]
    reference = lambda v, e: (weights[e] @ v[:, :, None])[:, :, 0]  # noqa: E731 - per (token, slot) pair
    quantized = [lambda v, e, n=n: ((weights[e] + n[e]) @ v[:, :, None])[:, :, 0] for n in noise]
    stats = SetStatistics(experts, len(noise))
    accumulate(stats, x, top_k_index, top_k_weights, groups, reference, quantized)

    counts = torch.zeros(3, experts, dtype=torch.float64)
    squared = torch.zeros(3, experts, 2, dtype=torch.float64)
    energy = torch.zeros(3, dtype=torch.float64)
    for t in range(tokens):
        z = torch.zeros(hidden, dtype=torch.float64)
        for slot in range(k):
            e, w = int(top_k_index[t, slot]), float(top_k_weights[t, slot])
            exact = x[t].double() @ weights[e].double().T
            z += w * exact
            for g in range(3):
                if groups[g, t]:
                    counts[g, e] += 1
                    for b in range(2):
                        approx = x[t].double() @ (weights[e] + noise[b][e]).double().T
                        squared[g, e, b] += (w * (exact - approx)).pow(2).sum()
        energy += groups[:, t].double() * z.pow(2).sum()
    assert torch.equal(stats.counts, counts)
    assert torch.equal(stats.tokens, groups.sum(1).double())
    torch.testing.assert_close(stats.squared_error, squared, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(stats.energy, energy, rtol=1e-5, atol=1e-8)


class TypeRouter(nn.Module):
    """A constructed router: vision tokens go to experts (0, 1), text tokens to (2, 3), weights (0.75, 0.25)."""

    def __init__(self, vision_mask: dict):
        super().__init__()
        self.vision_mask = vision_mask

    def forward(self, hidden_states):
        vision = self.vision_mask["flat"].to(hidden_states.device)  # [T]
        index = torch.where(vision[:, None], torch.tensor([0, 1]), torch.tensor([2, 3]))  # [T, 2]
        weights = torch.tensor([0.75, 0.25]).expand(index.shape[0], 2)
        return None, weights.to(hidden_states.dtype), index


def type_routed_model(processor):
    """The tiny model with every router replaced by TypeRouter (experts 4..7 are never used)."""
    model = tiny.tiny_model(seed=1)
    ids = vision_token_ids(model.config, processor)
    shared_mask: dict = {}
    for layer in model.model.language_model.layers:
        layer.mlp.gate = TypeRouter(shared_mask)
    original_forward = model.forward

    def forward_with_mask(**batch):
        shared_mask["flat"] = torch.isin(batch["input_ids"], torch.tensor(ids)).reshape(-1)
        return original_forward(**batch)

    model.forward = forward_with_mask
    return model, ids


def test_hooks_see_known_counts_per_expert_and_modality(processor):
    model, ids = type_routed_model(processor)
    samples = tiny.calibration_samples(6, seed=2, text_only_every=3)
    batches = build_batches(samples, processor, batch_size=3)
    config = ModeConfig(avg_bits=3, group_size=16, calibration=samples, processor=processor, redundancy_threshold=None)
    sets = find_expert_sets(model)
    stats, _ = gather_statistics(model, sets, batches, observation(config), ids)
    vision_tokens = sum(int(torch.isin(b["input_ids"], torch.tensor(ids)).sum()) for b in batches)
    text_tokens = sum(int(b["attention_mask"].sum()) for b in batches) - vision_tokens
    for layer_stats in stats:
        text, vision, everything = (GROUPS.index(g) for g in ("text", "vision", "all"))
        assert layer_stats.tokens.tolist() == [text_tokens, vision_tokens, text_tokens + vision_tokens]
        assert layer_stats.counts[vision].tolist() == [vision_tokens] * 2 + [0] * 6
        assert layer_stats.counts[text].tolist() == [0, 0] + [text_tokens] * 2 + [0] * 4
        assert layer_stats.frequency()[vision, 0] == 1.0 and layer_stats.frequency()[text, 2] == 1.0
        assert layer_stats.routing_weight[everything, 0] == pytest.approx(0.75 * vision_tokens)
        assert (layer_stats.squared_error[:, 4:] == 0).all()  # unrouted experts gather no error
        assert (layer_stats.squared_error[vision, 0] > 0).all()


def test_mode_cost_formula():
    stats = SetStatistics(num_experts=2, num_bits=2)
    stats.tokens = torch.tensor([10.0, 40.0, 50.0], dtype=torch.float64)
    stats.counts = torch.tensor([[5.0, 0.0], [10.0, 30.0], [15.0, 30.0]], dtype=torch.float64)
    stats.squared_error = torch.tensor(
        [[[5.0, 1.0], [0.0, 0.0]], [[20.0, 2.0], [60.0, 3.0]], [[25.0, 3.0], [60.0, 3.0]]], dtype=torch.float64
    )
    stats.energy = torch.tensor([0.0, 0.0, 100.0], dtype=torch.float64)  # mean energy 2.0
    got = cost.mode_cost(stats, text_weight=0.5, vision_weight=0.5, alpha=1.0)
    f_text, f_vision = torch.tensor([0.5, 0.0]), torch.tensor([0.25, 0.75])
    q_text = torch.tensor([[1.0, 0.2], [0.0, 0.0]])
    q_vision = torch.tensor([[2.0, 0.2], [2.0, 0.1]])
    expected = (0.5 * f_text[:, None] * q_text + 0.5 * f_vision[:, None] * q_vision) / 2.0
    torch.testing.assert_close(got, expected.double())
    squared_alpha = cost.mode_cost(stats, 1.0, 0.0, alpha=2.0, relative=False)
    torch.testing.assert_close(squared_alpha, (f_text[:, None] ** 2 * q_text).double())


def test_mode_cost_ablations():
    stats = SetStatistics(num_experts=2, num_bits=2)
    stats.tokens = torch.tensor([10.0, 40.0, 90.0], dtype=torch.float64)  # "all" counts filtered-out vision tokens too
    stats.counts = torch.tensor([[5.0, 0.0], [10.0, 30.0], [25.0, 60.0]], dtype=torch.float64)
    stats.squared_error = torch.tensor(
        [[[5.0, 1.0], [0.0, 0.0]], [[20.0, 2.0], [60.0, 3.0]], [[99.0, 9.0], [99.0, 9.0]]], dtype=torch.float64
    )
    stats.energy = torch.tensor([0.0, 0.0, 180.0], dtype=torch.float64)  # mean energy 2.0
    # no modality split: one group of the 50 text + kept vision tokens
    merged = cost.mode_cost(stats, 0.5, 0.5, alpha=1.0, modality_split=False)
    f = torch.tensor([15.0 / 50, 30.0 / 50])
    q = torch.tensor([[25.0 / 15, 3.0 / 15], [60.0 / 30, 3.0 / 30]])
    torch.testing.assert_close(merged, (f[:, None] * q / 2.0).double())
    # weight error instead of the output damage: modality-split frequency x relative weight error
    weight_error = torch.tensor([[0.3, 0.05], [0.2, 0.04]])
    by_weight = cost.mode_cost(stats, 0.5, 0.5, alpha=1.0, relative=False, weight_error=weight_error)
    f_text, f_vision = torch.tensor([0.5, 0.0]), torch.tensor([0.25, 0.75])
    torch.testing.assert_close(by_weight, ((0.5 * f_text + 0.5 * f_vision)[:, None] * weight_error).double())
    both = cost.mode_cost(stats, 0.5, 0.5, alpha=1.0, relative=False, modality_split=False, weight_error=weight_error)
    torch.testing.assert_close(both, (f[:, None] * weight_error).double())


def test_tiebreak_orders_unreached_experts():
    costs = torch.tensor([[4.0, 2.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    errors = torch.tensor([[0.1, 0.01], [0.2, 0.02], [0.4, 0.04]], dtype=torch.float64)
    got = cost.with_tiebreak(costs, errors, eta=1e-3)
    torch.testing.assert_close(got, costs + 1e-3 * 1.0 * errors)
    assert got[2, 0] > got[1, 0] > 0
    for a, b in itertools.combinations(range(3), 2):
        assert not torch.equal(got[a], got[b])


def test_unreached_experts_are_reported_and_ordered_by_weight_error(processor):
    model, ids = type_routed_model(processor)
    samples = tiny.calibration_samples(6, seed=2, text_only_every=3)
    config = ModeConfig(avg_bits=3, group_size=16, calibration=samples, processor=processor, quantizer="rtn")
    batches = build_batches(samples, processor, batch_size=3)
    sets = find_expert_sets(model)
    stats, errors = gather_statistics(model, sets, batches, observation(config), ids)
    costs = score(stats, errors, config)  # [J, B]
    unreached = [4, 5, 6, 7, 12, 13, 14, 15]
    expected = 1e-3 * costs.mean() / (1 + 1e-3 * torch.cat(errors).numpy().mean()) * torch.cat(errors).numpy()
    assert costs[unreached] == pytest.approx(expected[unreached], rel=1e-6)
    summary = quantize_model(model, config, batches).summary
    assert summary["unreached_experts"] == 8
