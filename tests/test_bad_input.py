"""Bad input gets a clear error that says what to change, before any calibration."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

import mode_hf
import tiny
from mode_hf import ModeConfig, ModeConfigError
from mode_hf.calibrate.inputs import build_batches
from mode_hf.pipeline import check_plan


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(avg_bits=1.5), r"outside \[min\(bits\), max\(bits\)\]"),
        (dict(avg_bits=4.5), r"outside"),
        (dict(bits=(2, 5)), r"not supported: choose widths from"),
        (dict(bits=(3, 3)), r"duplicates"),
        (dict(bits=()), r"bits is empty"),
        (dict(method="gptq"), r"method='gptq' is unknown"),
        (dict(scope="model"), r"scope='model' is unknown"),
        (dict(quantizer="awq"), r"quantizer='awq' is unknown"),
        (dict(method="uniform", avg_bits=2.5), r"must be one of bits"),
        (dict(group_size=0), r"group_size=0"),
        (dict(redundancy_threshold=1.5), r"redundancy_threshold"),
        (dict(text_weight=0.0, vision_weight=0.0), r"not both 0"),
        (dict(num_samples=0), r"num_samples"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(ModeConfigError, match=message):
        ModeConfig(**{"calibration": [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], **options})


def test_raw_samples_need_a_processor():
    with pytest.raises(ModeConfigError, match="pass processor="):
        ModeConfig(calibration=[{"text": "hello"}])


def test_calibration_required_except_uniform_rtn():
    with pytest.raises(ModeConfigError, match="needs calibration data"):
        ModeConfig(avg_bits=3)
    assert ModeConfig(avg_bits=3, method="uniform", quantizer="rtn").calibration is None


def test_malformed_samples():
    with pytest.raises(ModeConfigError, match=r"calibration\[1\] has neither"):
        ModeConfig(calibration=[{"input_ids": torch.ones(1, 3)}, {"pixels": 1}])
    with pytest.raises(ModeConfigError, match="non-empty list"):
        ModeConfig(calibration=[])


def test_config_round_trips_through_json_without_runtime_objects(processor):
    config = ModeConfig(avg_bits=2.5, bits=(2, 3, 4, 8), calibration=[{"text": "hi"}], processor=processor)
    data = config.to_dict()
    assert "processor" not in data and "calibration" not in data and data["quant_method"] == "mode"
    assert config.to_json_string()  # serializable
    again = ModeConfig.from_dict({**data, "bit_map": {"a.experts": [2, 3]}})
    assert again.bits == [2, 3, 4, 8] and again.avg_bits == 2.5 and again.bit_map == {"a.experts": [2, 3]}


def test_dense_model_is_refused_before_calibration(tmp_path, processor, monkeypatch):
    LlamaForCausalLM(LlamaConfig(vocab_size=90, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    monkeypatch.setattr("mode_hf.hf.quantizer.quantize_model", lambda *a, **k: pytest.fail("calibration started"))
    config = ModeConfig(calibration=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}])
    with pytest.raises(mode_hf.UnsupportedModelError, match="no routed Mixture-of-Experts"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)


def test_unreachable_layer_uniform_budget_is_refused_early(base_dir, processor, samples, monkeypatch):
    monkeypatch.setattr("mode_hf.hf.quantizer.quantize_model", lambda *a, **k: pytest.fail("calibration started"))
    config = ModeConfig(avg_bits=4, bits=(2, 8), scope="layer_uniform", calibration=samples[:2], processor=processor)
    with pytest.raises(mode_hf.InfeasibleBudgetError, match="best average within budget is 2.000"):
        AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)


def test_bad_sample_names_its_index(base_dir, processor):
    samples = [{"text": "fine"}, {"text": "two images, one placeholder", "image": ["not an image"]}]
    config = ModeConfig(calibration=samples, processor=processor, batch_size=1)
    with pytest.raises(mode_hf.CalibrationDataError, match="samples 1..1"):
        AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)


def test_images_without_image_token_id(processor, samples):
    model = tiny.tiny_model()
    model.config = types.SimpleNamespace()  # a config that names no image-token id
    config = ModeConfig(calibration=samples[:2], processor=processor)
    batches = build_batches(samples[:2], processor, 2)
    config.processor = None
    check_plan(model, config, batches)  # mm_token_type_ids marks the vision tokens: no id needed
    for batch in batches:
        batch.pop("mm_token_type_ids")
    with pytest.raises(mode_hf.CalibrationDataError, match="no image-token id was found"):
        check_plan(model, config, batches)


def test_text_only_calibration_warns_and_says_so(base_dir, processor, caplog):
    samples = [{"text": f"{a}+{a}={2 * a}"} for a in range(10, 18)]
    config = ModeConfig(avg_bits=3, group_size=16, calibration=samples, processor=processor, quantizer="rtn")
    with caplog.at_level(logging.WARNING, logger="mode_hf"):
        model = AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)
    summary = model.config.quantization_config.summary
    assert summary["text_only_statistics"] is True and summary["tokens"]["vision"] == 0
    assert "no vision tokens" in caplog.text


def test_unsupported_expert_layout_names_the_module():
    class OddExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.zeros(4, 8, 16))
            self.w2 = torch.nn.Parameter(torch.zeros(4, 16, 8))

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].experts = OddExperts()
    with pytest.raises(mode_hf.UnsupportedModelError, match=r"'layers.0.experts' \(OddExperts\).*w1"):
        mode_hf.model.structure.find_expert_sets(model)


def test_unknown_options_are_refused_with_the_nearest_name():
    with pytest.raises(ModeConfigError, match=r"'avg_bit' \(did you mean 'avg_bits'\?\), 'symetric' \(did you mean 'symmetric'\?\)"):
        ModeConfig(symetric=True, avg_bit=2.5, method="uniform", quantizer="rtn")
    with pytest.raises(ModeConfigError, match=r"unknown ModeConfig option 'colour_depth':"):
        ModeConfig(colour_depth=3, method="uniform", quantizer="rtn")
    with pytest.raises(ModeConfigError, match="quant_method='gptq'"):
        ModeConfig(quant_method="gptq", method="uniform", quantizer="rtn")


# Every key a quantized config.json has held, format versions 1 and 2 (no key was ever renamed or removed).
WRITTEN_KEYS = {
    1: ("alpha", "avg_bits", "batch_size", "bit_map", "bits", "damp", "eta", "format_version", "gptq_min_tokens",
        "group_size", "method", "min_top_per_set", "modules_to_not_convert", "num_samples", "quant_method", "quantizer",
        "redundancy_threshold", "scope", "seed", "summary", "text_hessian_weight", "text_weight", "vision_weight"),
    2: ("dense_bits", "dense_map", "modality_split", "progressive", "router_epochs", "router_finetune", "router_lr",
        "router_weight_decay", "sensitivity", "symmetric"),
}


def test_every_key_a_checkpoint_holds_loads():
    written = ModeConfig(method="uniform", quantizer="rtn", bit_map={"a.experts": [3, 3]}).to_dict()
    assert set(written) == set(WRITTEN_KEYS[1]) | set(WRITTEN_KEYS[2])
    version_1 = {k: v for k, v in written.items() if k in WRITTEN_KEYS[1]} | {"format_version": 1}
    assert ModeConfig.from_dict(version_1).bit_map == {"a.experts": [3, 3]}
    assert ModeConfig.from_dict(written).to_dict() == written


def test_every_error_has_one_base():
    errors = [mode_hf.ModeConfigError, mode_hf.CalibrationDataError, mode_hf.UnsupportedModelError,
              mode_hf.InfeasibleBudgetError, mode_hf.CheckpointError, mode_hf.ExportError, mode_hf.UsageError]
    assert all(issubclass(error, mode_hf.ModeError) for error in errors)
    with pytest.raises(mode_hf.ModeError):
        ModeConfig(avg_bits=9, method="uniform", quantizer="rtn")


def test_auto_processor_loads_the_bundled_processor():
    from transformers import AutoProcessor

    from mode_hf.bench.evaluation import BUNDLED_MODEL
    from mode_hf.bench.processor import ImageOnlyQwen3VLProcessor

    processor = AutoProcessor.from_pretrained(BUNDLED_MODEL)
    assert type(processor) is ImageOnlyQwen3VLProcessor
    image = tiny.draw_scene(__import__("random").Random(0), 160)[0]
    batch = processor(text=["<|vision_start|><|image_pad|><|vision_end|>color?"], images=[image], return_tensors="pt")
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 100 and "pixel_values" in batch
