"""Every method and scope quantizes on load, respects its budget, saves and reloads with identical logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

import mode_hf
from mode_hf.model.packed import PackedExperts

PARAMS_PER_EXPERT = 3 * 64 * 32  # every set of the tiny model has equal experts


@pytest.mark.parametrize(
    "options",
    [
        dict(method="mode", scope="layer", quantizer="rtn"),
        dict(method="mode", scope="layer_uniform", quantizer="rtn", avg_bits=3.0),
        dict(method="frequency", scope="global", quantizer="gptq", avg_bits=2.5),
        dict(method="uniform", quantizer="rtn", avg_bits=4.0, calibration=None, processor=None),
        dict(method="mode", bits=(2, 4, 8), avg_bits=3.0, quantizer="gptq", min_top_per_set=1, text_hessian_weight=4.0),
        dict(method="pmq", quantizer="gptq", avg_bits=2.5),
        dict(method="gemq", quantizer="rtn", min_top_per_set=1),
        dict(method="mode", quantizer="rtn", sensitivity="weight", modality_split=False, redundancy_threshold=None),
    ],
    ids=[
        "mode-layer", "mode-layer_uniform", "frequency-2.5", "uniform-rtn-no-data", "mode-2-4-8-guard", "pmq",
        "gemq-guard", "mode-ablations",
    ],
)
def test_method_budget_and_reload(options, base_dir, processor, samples, eval_batch, tmp_path):
    settings = dict(avg_bits=3.0, group_size=16, calibration=samples[:8], processor=processor)
    settings.update(options)
    config = mode_hf.ModeConfig(**settings)
    model = AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)
    bit_map = model.config.quantization_config.bit_map
    widths = [b for set_widths in bit_map.values() for b in set_widths]
    assert set(widths) <= set(config.bits)
    assert sum(widths) <= config.avg_bits * len(widths) + 1e-9
    if config.scope == "layer":
        assert all(sum(w) <= config.avg_bits * len(w) + 1e-9 for w in bit_map.values())
    if config.scope == "layer_uniform":
        assert all(len(set(w)) == 1 for w in bit_map.values())
    if config.method == "uniform":
        assert set(widths) == {int(config.avg_bits)}
    if config.min_top_per_set:
        assert all(max(config.bits) in w for w in bit_map.values())
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = mode_hf.from_pretrained(tmp_path / "ckpt")
    assert all(isinstance(reloaded.get_submodule(n), PackedExperts) for n in bit_map)
    with torch.no_grad():
        assert torch.equal(reloaded(**eval_batch).logits, model(**eval_batch).logits)


def test_processor_outputs_as_calibration(base_dir, processor, samples, eval_batch):
    processed = [dict(processor(text=["<|vision_start|><|image_pad|><|vision_end|>" + s["text"]], images=[s["image"]], return_tensors="pt"))
                 for s in samples[:4] if "image" in s]
    processed.append({"input_ids": processor.tokenizer("12+30=42")["input_ids"]})  # a plain list, 1-D
    raw = [s for s in samples[:4] if "image" in s] + [{"text": "12+30=42"}]
    by_outputs = AutoModelForImageTextToText.from_pretrained(
        base_dir, quantization_config=mode_hf.ModeConfig(avg_bits=3.0, group_size=16, calibration=processed, quantizer="rtn")
    )
    by_raw = AutoModelForImageTextToText.from_pretrained(
        base_dir, quantization_config=mode_hf.ModeConfig(avg_bits=3.0, group_size=16, calibration=raw, processor=processor, quantizer="rtn", batch_size=1)
    )
    assert by_outputs.config.quantization_config.summary["tokens"] == by_raw.config.quantization_config.summary["tokens"]
    assert by_outputs.config.quantization_config.bit_map == by_raw.config.quantization_config.bit_map


def test_a_method_is_one_registry_entry(base_dir, processor, samples, monkeypatch):
    """A method added to the registry is accepted by the config and drives the allocation: a cost that makes
    width 4 free and the others dear puts every expert at 4 bits within the 4-bit budget, and at 3 bits the MILP
    optimum (brute force: the cheapest experts to demote are the ones with the smallest gap)."""
    import numpy as np

    from mode_hf import methods

    gaps = {}

    def prefer_wide(stats, weight_error, options):  # [E, B]: cost 0 at the widest width, 1 + e below it
        widths = len(options.bits)
        costs = torch.ones(stats.num_experts, widths, dtype=torch.float64) + torch.arange(stats.num_experts)[:, None]
        costs[:, -1] = 0.0
        gaps[len(gaps)] = costs[:, -2].clone()
        return costs

    monkeypatch.setitem(methods.METHODS, "prefer-wide", methods.Method("prefer-wide", "a test method", prefer_wide))
    config = mode_hf.ModeConfig(method="prefer-wide", bits=(3, 4), avg_bits=3.5, group_size=16, quantizer="rtn", eta=0.0,
                                calibration=samples[:4], processor=processor)
    model = AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)
    widths = np.concatenate([np.array(w) for w in model.config.quantization_config.bit_map.values()])
    demote = np.concatenate([g.numpy() for g in gaps.values()])
    expected = np.where(np.argsort(np.argsort(demote, kind="stable"), kind="stable") < len(widths) // 2, 3, 4)
    assert widths.tolist() == expected.tolist()  # half the experts at 3 bits: those whose demotion costs least
