"""Quantize-on-load with accelerate offload (device_map with "disk" entries: the same hooks as GPU + CPU offload):
the result equals quantizing the model held whole in memory, for every quantizer path, and saves and reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

import mode_hf
import tiny
from mode_hf.calibrate.inputs import build_batches
from mode_hf.model.packed import PackedExperts, PackedLinear

pytest.importorskip("accelerate")

DEVICE_MAP = {  # the vision tower and the second decoder layer live on disk, weights loaded per forward
    "model.visual": "disk", "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "disk", "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu", "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("offload") / "base"
    tiny.tiny_model(num_layers=2, num_experts=4).save_pretrained(path)
    return path


def quantized(base: Path, options: dict, **load: object) -> torch.nn.Module:
    config = mode_hf.ModeConfig(
        avg_bits=3.0, group_size=32, calibration=tiny.calibration_samples(8, seed=1), processor=tiny.build_processor(),
        batch_size=4, gptq_min_tokens=4, **options,
    )
    return AutoModelForImageTextToText.from_pretrained(base, quantization_config=config, **load).eval()


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(
    "options",
    [{"quantizer": "rtn"}, {}, {"dense_bits": 8}, {"method": "gemq"}, {"router_finetune": True}, {"progressive": (3.5, 3.0)}],
    ids=["rtn", "gptq", "dense_bits", "fisher", "router_finetune", "progressive"],
)
def test_offloaded_quantization_equals_in_memory(options: dict, base: Path, tmp_path: Path) -> None:
    in_memory = quantized(base, options)
    offloaded = quantized(base, options, device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"))
    assert offloaded.config.quantization_config.bit_map == in_memory.config.quantization_config.bit_map
    assert offloaded.config.quantization_config.dense_map == in_memory.config.quantization_config.dense_map
    experts = offloaded.get_submodule("model.language_model.layers.1.mlp.experts")  # was on disk
    assert isinstance(experts, PackedExperts) and not any(b.is_meta for b in experts.buffers())
    if options.get("dense_bits"):
        assert isinstance(offloaded.get_submodule("model.language_model.layers.1.self_attn.q_proj"), PackedLinear)
    batch = build_batches(tiny.calibration_samples(4, seed=9), tiny.build_processor(), 4)[0]  # images and text
    assert batch.get("pixel_values") is not None
    expected = logits(in_memory, batch)
    assert torch.equal(logits(offloaded, batch), expected)

    offloaded.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]["bit_map"]
    assert torch.equal(logits(mode_hf.from_pretrained(tmp_path / "saved").eval(), batch), expected)


def test_a_mode_checkpoint_loads_with_offload(base: Path, tmp_path: Path) -> None:
    """Serving a quantized checkpoint bigger than memory: packed experts and packed linears under offload hooks."""
    model = quantized(base, {"quantizer": "rtn", "dense_bits": 8})
    model.save_pretrained(tmp_path / "saved")
    offloaded = mode_hf.from_pretrained(tmp_path / "saved", device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"))
    batch = build_batches(tiny.calibration_samples(4, seed=9), tiny.build_processor(), 4)[0]
    assert torch.equal(logits(offloaded.eval(), batch), logits(model, batch))
