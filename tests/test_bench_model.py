"""The bundled trained benchmark model: it loads offline, it is actually trained (held-out accuracy well above
chance), quantization damage is measurable on it, and calibration samples differ from the evaluation set."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

import mode_hf
from mode_hf.bench import evaluation, tasks
from mode_hf.bench.processor import IMAGE_PLACEHOLDER  # noqa: E402
from mode_hf.hf.checkpoint import load_processor  # noqa: E402

PER_FAMILY = 20  # 20 vision + 20 text held-out examples: a few seconds per evaluation on 2 cores


@pytest.fixture(scope="module")
def processor():
    return load_processor(evaluation.BUNDLED_MODEL)


@pytest.fixture(scope="module")
def bf16_result(processor):
    model = AutoModelForImageTextToText.from_pretrained(evaluation.BUNDLED_MODEL)
    return evaluation.evaluate(model, processor, evaluation.held_out(PER_FAMILY))


def test_bundled_model_is_small_and_recorded():
    size = sum(p.stat().st_size for p in evaluation.BUNDLED_MODEL.iterdir())
    assert size < 20 * 2**20
    record = json.loads((evaluation.BUNDLED_MODEL / "training.json").read_text())
    assert record["held_out"]["families"]["vision"]["count"] >= 200 and "train_model.py" in record["command"]


def test_bundled_model_is_trained(bf16_result):
    # chance is at most 1/3 for the easiest task (shape); floors sit well below the recorded accuracy on 400 examples
    record = json.loads((evaluation.BUNDLED_MODEL / "training.json").read_text())["held_out"]["families"]
    for family in ("vision", "text"):
        assert bf16_result["families"][family]["accuracy"] >= record[family]["accuracy"] - 0.2, family
        assert bf16_result["families"][family]["accuracy"] >= 0.6, family


def test_bundled_config_is_one_engines_accept(processor):
    # vLLM asserts sum(mrope_section) == head_dim / 2 and reads text_config.norm_topk_prob; transformers reads only
    # sections 1 and 2 of an interleaved MRoPE, so the old [2, 3, 3] and the shipped [10, 3, 3] give the same logits
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(evaluation.BUNDLED_MODEL).text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2 and text.norm_topk_prob is True
    examples = tasks.make_examples("vision", 3, seed=5) + tasks.make_examples("text", 3, seed=5)
    out = []
    for section in ([2, 3, 3], text.rope_parameters["mrope_section"]):
        config = AutoConfig.from_pretrained(evaluation.BUNDLED_MODEL)
        config.text_config.rope_parameters = {**config.text_config.rope_parameters, "mrope_section": section}
        model = AutoModelForImageTextToText.from_pretrained(evaluation.BUNDLED_MODEL, config=config).eval()
        out.append(logits(model, processor, examples))
    assert torch.equal(out[0], out[1])


def quantize(processor, **options):
    config = mode_hf.ModeConfig(group_size=32, calibration=tasks.calibration_samples(16), processor=processor, **options)
    return AutoModelForImageTextToText.from_pretrained(evaluation.BUNDLED_MODEL, quantization_config=config)


def logits(model, processor, examples) -> torch.Tensor:
    texts = [tasks.model_text(e, IMAGE_PLACEHOLDER) + e.answer for e in examples]
    with torch.no_grad():
        return model(**evaluation.processor_inputs(processor, examples, texts, "right")).logits.double()


def test_quantization_damage_is_measurable(processor, bf16_result):
    held_out = evaluation.held_out(PER_FAMILY)
    four_bit = quantize(processor, method="uniform", quantizer="rtn", avg_bits=4, bits=(2, 4))
    two_bit = quantize(processor, method="uniform", quantizer="rtn", avg_bits=2, bits=(2, 4))
    four, two = evaluation.evaluate(four_bit, processor, held_out), evaluation.evaluate(two_bit, processor, held_out)
    for family in ("vision", "text"):
        assert four["families"][family]["accuracy"] >= bf16_result["families"][family]["accuracy"] - 0.15, family
    assert two["families"]["text"]["nll"] > four["families"]["text"]["nll"] > 0
    # answer NLL of the vision family is dominated by the few wrong digits and moves either way under noise; the
    # distance of the logits from the 16-bit model's grows with the quantization noise in both families
    reference = AutoModelForImageTextToText.from_pretrained(evaluation.BUNDLED_MODEL)
    for family in ("vision", "text"):
        examples = [e for e in held_out if e.family == family][:8]
        exact = logits(reference, processor, examples)
        error = {bits: (logits(model, processor, examples) - exact).abs().mean() for bits, model in ((4, four_bit), (2, two_bit))}
        assert error[2] > 3 * error[4] > 0, (family, error)


def test_demo_main_job_on_bundled_model(tmp_path):
    from mode_hf.bench import demo

    report = demo.main(["--samples", "8", "--eval-per-family", "10", "--quantizer", "rtn", "--out", str(tmp_path / "q")])
    assert report["reload_max_logit_difference"] == 0.0
    assert sum(report["bits_histogram"].values()) == 32 and report["average_bits"] <= 3.0 + 1e-9
    assert set(report["accuracy_quantized"]) == {"text", "vision"}
    assert (tmp_path / "q" / "model.safetensors.index.json").exists()
