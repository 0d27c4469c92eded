"""GEMQ and PMQ: the fisher cost against explicit float64 gradients, router fine-tuning, progressive budgets,
PMQ's per-layer budget and guards, and the bad input they bring."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText

import mode_hf
import tiny
from mode_hf import ModeConfig, ModeConfigError
from mode_hf.algo import cost, quantize
from mode_hf.calibrate.inputs import build_batches, vision_token_ids
from mode_hf.model.structure import find_expert_sets
from mode_hf.calibrate.observe import gather_statistics
from mode_hf.methods import observation
from mode_hf.calibrate.losses import calibration_loss, text_labels


def mlp(gate_up, down, x):
    """One SwiGLU expert in float64: down @ (silu(gate @ x) * (up @ x))."""
    gate, up = gate_up.chunk(2, dim=0)
    return down @ (torch.nn.functional.silu(gate @ x) * (up @ x))


def test_fisher_cost_equals_explicit_float64_gradients(processor, samples):
    model = tiny.tiny_model(seed=4)
    config = ModeConfig(method="gemq", avg_bits=3, group_size=16, calibration=samples[:4], processor=processor)
    batches = build_batches(samples[:4], processor, batch_size=2)
    sets = find_expert_sets(model)
    ids = vision_token_ids(model.config, processor)
    stats, _ = gather_statistics(model, sets, batches, observation(config), ids)
    got = torch.stack([cost.gemq_cost(s) for s in stats])  # [L, E, B]

    model64 = copy.deepcopy(model).double()
    model64.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    expected = torch.zeros_like(got)
    for batch in batches:
        records = {}
        hooks = [
            model64.get_submodule(s.name).register_forward_hook(
                lambda m, args, out, i=i: records.__setitem__(i, (args[0], args[1], args[2], out))
            )
            for i, s in enumerate(sets)
        ]
        inputs = {k: v.double() if k == "pixel_values" else v for k, v in batch.items()}
        loss = model64(**inputs, labels=text_labels(batch, ids), use_cache=False).loss
        grads = torch.autograd.grad(loss, [records[i][3] for i in range(len(sets))])
        for handle in hooks:
            handle.remove()
        valid = batch["attention_mask"].reshape(-1).bool()
        for i, expert_set in enumerate(sets):
            x, index, weight, _ = (t.detach() for t in records[i])
            gate_up, down = expert_set.module.gate_up_proj.detach(), expert_set.module.down_proj.detach()
            for b, bits in enumerate(config.bits):
                q_gate_up = quantize.rtn(gate_up, bits, 16).dequantize().double()
                q_down = quantize.rtn(down, bits, 16).dequantize().double()
                for t in valid.nonzero()[:, 0].tolist():
                    for slot in range(index.shape[1]):
                        e = int(index[t, slot])
                        exact = mlp(gate_up[e].double(), down[e].double(), x[t])
                        approx = mlp(q_gate_up[e], q_down[e], x[t])
                        expected[i, e, b] += (grads[i][t].pow(2) * (weight[t, slot] * (exact - approx)).pow(2)).sum()
    assert (expected > 0).sum() > expected.numel() // 2
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=1e-12)


def quantized_model(base_dir, processor, samples, **options):
    settings = dict(avg_bits=3.0, group_size=16, calibration=samples[:8], processor=processor, quantizer="rtn", batch_size=2)
    settings.update(options)
    return AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=ModeConfig(**settings))


def test_router_finetune_lowers_loss_and_touches_only_routers(base_dir, processor, samples, eval_batch, tmp_path):
    plain = quantized_model(base_dir, processor, samples)
    tuned = quantized_model(base_dir, processor, samples, router_finetune=True)
    assert plain.config.quantization_config.bit_map == tuned.config.quantization_config.bit_map
    record = tuned.config.quantization_config.summary["router_finetune"]
    assert record["loss_after"] < record["loss_before"] and record["steps"] == 4
    batches = build_batches(samples[:8], processor, 2)
    ids = vision_token_ids(tuned.config, processor)
    assert calibration_loss(tuned, batches, ids) < calibration_loss(plain, batches, ids)
    before, after = plain.state_dict(), tuned.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == [f"model.language_model.layers.{i}.mlp.gate.weight" for i in range(2)]
    tuned.save_pretrained(tmp_path / "tuned")
    reloaded = mode_hf.from_pretrained(tmp_path / "tuned")
    for name in changed:
        assert torch.equal(reloaded.state_dict()[name], after[name])
    with torch.no_grad():
        assert torch.equal(reloaded(**eval_batch).logits, tuned(**eval_batch).logits)


def test_progressive_budgets_hold_at_every_step(base_dir, processor, samples):
    model = quantized_model(base_dir, processor, samples, avg_bits=2.0, progressive=(3.0, 2.5, 2.0), router_finetune=True)
    config = model.config.quantization_config
    steps = config.summary["progressive"]
    assert [s["avg_bits"] for s in steps] == [3.0, 2.5, 2.0]
    for step in steps:
        widths = [b for w in step["bit_map"].values() for b in w]
        assert sum(widths) <= step["avg_bits"] * len(widths) + 1e-9
        assert step["router_finetune"]["steps"] == 4
    assert config.bit_map == steps[-1]["bit_map"]
    assert [m.expert_bits for m in model.modules() if isinstance(m, mode_hf.PackedExperts)] == list(config.bit_map.values())
    assert steps[0]["bit_map"] != steps[-1]["bit_map"]


def test_pmq_per_layer_budget_and_guards(base_dir, processor, samples):
    model = quantized_model(base_dir, processor, samples, method="pmq", avg_bits=2.5)
    config = model.config.quantization_config
    assert config.scope == "layer"
    for widths in config.bit_map.values():
        assert sum(widths) <= 2.5 * len(widths) + 1e-9
        assert 4 in widths and 3 in widths


def test_gemq_and_fisher_mode_quantize_and_reload(base_dir, processor, samples, eval_batch, tmp_path):
    for options in (dict(method="gemq"), dict(method="mode", sensitivity="fisher")):
        model = quantized_model(base_dir, processor, samples, **options)
        widths = [b for w in model.config.quantization_config.bit_map.values() for b in w]
        assert sum(widths) <= 3.0 * len(widths)
        model.save_pretrained(tmp_path / options["method"])
        reloaded = mode_hf.from_pretrained(tmp_path / options["method"])
        with torch.no_grad():
            assert torch.equal(reloaded(**eval_batch).logits, model(**eval_batch).logits)


def test_fisher_without_text_tokens_is_refused_before_calibration(base_dir, monkeypatch):
    monkeypatch.setattr("mode_hf.hf.quantizer.quantize_model", lambda *a, **k: pytest.fail("calibration started"))
    only_images = [{"input_ids": torch.full((1, 6), 4), "mm_token_type_ids": torch.ones(1, 6, dtype=torch.long)}]
    for options in (dict(method="gemq"), dict(sensitivity="fisher"), dict(router_finetune=True)):
        config = ModeConfig(calibration=only_images, **options)
        with pytest.raises(mode_hf.CalibrationDataError, match="next-token loss"):
            AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(progressive=(2.5, 3.0), avg_bits=3.0), "strictly decreasing"),
        (dict(progressive=(5.0, 3.0), avg_bits=3.0), "outside"),
        (dict(progressive=(3.5, 3.0), avg_bits=2.5), "must end at avg_bits"),
        (dict(progressive=(3.0,), avg_bits=3.0), "at least two"),
        (dict(method="pmq", scope="global"), "scope='layer'"),
        (dict(method="gemq", sensitivity="output"), "fisher"),
        (dict(method="frequency", sensitivity="fisher"), "applies to method"),
        (dict(method="pmq", sensitivity="weight"), "ablation of method='mode'"),
        (dict(method="frequency", modality_split=False), "no modality split to drop"),
        (dict(router_lr=0.0), "router_lr"),
    ],
)
def test_method_option_errors(options, message):
    with pytest.raises(ModeConfigError, match=message):
        ModeConfig(calibration=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}], **options)
