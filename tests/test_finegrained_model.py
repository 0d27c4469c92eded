"""The second bundled model (`mode_hf/bench/assets/finegrained_model`: fine-grained experts, trained by
benchmarks/train_model.py --suite finegrained): small, recorded, trained on its own suite, loadable by vLLM's
config checks, and sensitive to expert quantization in the way the benchmark needs (2-bit experts move its answer
distributions far more than 4-bit ones)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

import mode_hf
from mode_hf.bench import evaluation, tasks
from mode_hf.hf.checkpoint import load_processor

MODEL = evaluation.BUNDLED_MODEL.parent / "finegrained_model"
PER_FAMILY = 20


@pytest.fixture(scope="module")
def processor():
    return load_processor(MODEL)


@pytest.fixture(scope="module")
def held_out():
    return evaluation.held_out(PER_FAMILY, suite_name="finegrained")


@pytest.fixture(scope="module")
def reference(processor, held_out):
    model = AutoModelForImageTextToText.from_pretrained(MODEL)
    return evaluation.evaluate(model, processor, held_out, keep_distributions=True)


def test_finegrained_model_is_small_recorded_and_fine_grained():
    assert sum(p.stat().st_size for p in MODEL.iterdir()) < 30 * 2**20
    record = json.loads((MODEL / "training.json").read_text())
    stages = record.get("stages", [record])  # a model trained in stages (--init-from) names its suite in the first
    assert "train_model.py" in stages[0]["command"] and "--suite finegrained" in stages[0]["command"] and stages[0]["seed"] == 0
    assert record["seconds"] <= 2 * 3600 and record["seconds"] == pytest.approx(sum(s["seconds"] for s in stages), abs=1)
    text = AutoConfig.from_pretrained(MODEL).text_config
    assert text.num_experts >= 32 and text.num_experts_per_tok >= 4 and text.num_hidden_layers >= 4
    assert evaluation.suite_of(AutoConfig.from_pretrained(MODEL)) == "finegrained"
    assert evaluation.knows_the_tables(AutoConfig.from_pretrained(MODEL))  # its fact/glyph questions are scored
    # the engines' checks (vLLM asserts the MRoPE sections sum to head_dim / 2 and reads norm_topk_prob)
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2 and text.norm_topk_prob is True


def test_finegrained_model_is_trained(reference):
    record = json.loads((MODEL / "training.json").read_text())["held_out"]["families"]
    for family in ("vision", "text"):
        assert reference["families"][family]["accuracy"] >= record[family]["accuracy"] - 0.2, family


def test_two_bit_experts_damage_it_far_more_than_four_bit(processor, held_out, reference):
    samples = tasks.calibration_samples(8, suite_name="finegrained")
    kl = {}
    for bits in (4, 2):
        config = mode_hf.ModeConfig(method="uniform", quantizer="rtn", avg_bits=bits, bits=(bits,), calibration=samples, processor=processor)
        model = AutoModelForImageTextToText.from_pretrained(MODEL, quantization_config=config)
        kl[bits] = evaluation.evaluate(model, processor, held_out, reference=reference["distributions"])["families"]
    for family in ("vision", "text"):
        assert kl[2][family]["kl"] > 10 * kl[4][family]["kl"] > 0, (family, kl)
    assert torch.isfinite(torch.tensor([kl[2][f]["kl"] for f in ("vision", "text")])).all()
