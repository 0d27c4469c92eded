"""Layer-at-a-time passes (`mode_hf.calibrate.layerwise`): every decoder layer sees exactly the input a full forward gives it,
in every supported family (Qwen3-VL's deepstack additions between layers, Ernie's token-type routing, GPT-OSS's
per-layer attention types included), the layers are always restored, and the statistics gathered layer at a time
equal those of one full pass."""

from __future__ import annotations

import pytest
import torch

import families
from mode_hf.calibrate import observe
from mode_hf.methods import observation
from mode_hf.calibrate.hooks import StopForward, hidden_states_argument, pre_hooks
from mode_hf.calibrate.inputs import build_batches, vision_token_ids
from mode_hf.config import ModeConfig
from mode_hf.model.structure import find_expert_sets
from mode_hf.calibrate.layerwise import LayerwiseRunner


def family_setup(name: str):
    family = families.FAMILIES[name]
    processor = family.make_processor() if family.make_processor else None
    model = family.make_model()
    batches = build_batches(family.calibration(processor), processor, batch_size=2)
    sets = find_expert_sets(model)
    return model, processor, batches, sets


def full_forward_inputs(model, layers, batches) -> list[list[torch.Tensor]]:
    """inputs[l][b]: hidden states entering layer l for batch b, from full forwards."""
    inputs = [[] for _ in layers]

    def capture(index):
        def hook(module, args, kwargs):
            inputs[index].append(hidden_states_argument(args, kwargs).detach().clone())

        return hook

    runner = LayerwiseRunner(model, None, batches)  # no replay: full forwards
    # stopped after the last layer: Llama4's own forward fails at its return in transformers 5.24
    with pre_hooks([(layer, capture(i)) for i, layer in enumerate(layers)], [(layers[-1], observe.stop_forward)]), torch.no_grad():
        for position, batch in enumerate(batches):
            runner.forward(position, batch)
    return inputs


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_every_layer_sees_the_full_forward_input(name):
    model, _, batches, sets = family_setup(name)
    container = observe.layers_container(model, sets)
    layers = model.get_submodule(container)
    reference = full_forward_inputs(model, layers, batches)
    originals = list(layers)
    runner = LayerwiseRunner(model, container, batches)
    last = max(runner.layer_index(s.name) for s in sets)
    for index in range(last + 1):
        captured = []

        def hook(module, args, kwargs):
            captured.append(hidden_states_argument(args, kwargs).detach())
            raise StopForward

        with runner.replaying(), pre_hooks([(layers[index], hook)]), torch.no_grad():
            for position, batch in enumerate(batches):
                runner.forward(position, batch)
        assert len(captured) == len(batches)
        for got, expected in zip(captured, reference[index]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} layer {index}: {m}")
        runner.advance()
        assert list(layers) == originals  # replays removed after every pass
    assert runner.index == last + 1


def test_layers_restored_when_a_pass_fails():
    model, _, batches, sets = family_setup("gpt_oss")
    container = observe.layers_container(model, sets)
    layers = model.get_submodule(container)
    originals = list(layers)
    runner = LayerwiseRunner(model, container, batches)
    runner.advance()
    with pytest.raises(RuntimeError, match="boom"):
        with runner.replaying():
            # a replay answers for its layer's plain attributes (some models read e.g. layer.attention_type)
            assert layers[0] is not originals[0] and layers[0].hidden_size == originals[0].hidden_size
            raise RuntimeError("boom")
    assert list(layers) == originals


@pytest.mark.parametrize("name", ["qwen3_vl_moe", "ernie4_5_vl_moe"])
def test_statistics_layer_at_a_time_and_by_expert_range_equal_one_full_pass(name, monkeypatch):
    model, processor, batches, sets = family_setup(name)
    config = ModeConfig(avg_bits=3.0, bits=(2, 3, 4), group_size=16, calibration=batches)
    vision_ids = vision_token_ids(model.config, processor)
    layered, layered_errors = observe.gather_statistics(model, sets, batches, observation(config), vision_ids)
    monkeypatch.setattr(observe, "layers_container", lambda model, sets: None)  # full passes instead
    full, full_errors = observe.gather_statistics(model, sets, batches, observation(config), vision_ids)
    for a, b in zip(layered, full):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.tokens, b.tokens)
        for field in ("squared_error", "energy", "routing_weight"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-9)
        assert float(a.squared_error.sum()) > 0
    for a, b in zip(layered_errors, full_errors):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(observe, "CANDIDATE_BYTES", 1)  # one expert's candidates at a time
    ranged, ranged_errors = observe.gather_statistics(model, sets, batches, observation(config), vision_ids)
    assert observe.expert_ranges(sets[0], 3) == [(e, e + 1) for e in range(sets[0].shape[0])]
    for a, b in zip(ranged, full):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.tokens, b.tokens)
        for field in ("squared_error", "energy", "routing_weight"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-9)
    for a, b in zip(ranged_errors, full_errors):
        torch.testing.assert_close(a, b)
