"""No silent wrong results: a wrong checkpoint, processor, config or path fails loudly and early, and nothing is
lost. One test (or more) per failure that used to pass silently."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, pipeline

import mode_hf
from mode_hf.hf import guard

EXPERT_SET = "model.language_model.layers.0.mlp.experts"


def quantize(base_dir, processor, samples, **options):
    config = mode_hf.ModeConfig(**{"avg_bits": 3.0, "group_size": 16, "calibration": samples[:4], "processor": processor,
                                   "quantizer": "rtn", **options})
    return AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)


@pytest.fixture(scope="module")
def saved(base_dir, processor, samples, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    processor.save_pretrained(path)
    quantize(base_dir, processor, samples).save_pretrained(path)
    return path


def without_mode(monkeypatch):
    """transformers as it is without `import mode_hf`: no "mode" quantization method."""
    from transformers.quantizers import auto

    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "mode")
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "mode")


def test_plain_load_without_mode_hf_fails(saved, processor, monkeypatch):
    without_mode(monkeypatch)
    with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
        AutoModelForImageTextToText.from_pretrained(saved)
    with pytest.raises(ValueError, match="automatic conversion of the weights"):  # the pipeline wraps it
        pipeline("image-text-to-text", model=str(saved), processor=processor)


PLAIN_LOAD = """
import sys
from transformers import AutoModelForImageTextToText
try:
    AutoModelForImageTextToText.from_pretrained(sys.argv[1])
except RuntimeError as error:
    print("REFUSED:", error)
assert "mode_hf" not in sys.modules
"""


def test_plain_load_in_a_fresh_interpreter_fails_and_its_report_names_the_fix(saved):
    """What a user without `import mode_hf` sees (no monkeypatching: a new Python): the load is refused, and the
    load report beside the error lists the hint tensor, whose name says to import mode_hf."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(saved)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED: We encountered some issues during automatic conversion of the weights" in run.stdout
    assert guard.HINT in run.stdout + run.stderr and "import_mode_hf" in guard.HINT


def load_report(load):
    """What transformers' logger writes while `load()` runs (its logger does not propagate to pytest's caplog)."""
    import io
    import logging as std_logging

    from transformers.utils import logging

    stream = io.StringIO()
    handler = std_logging.StreamHandler(stream)
    logging.add_handler(handler)
    try:
        result = load()
    finally:
        logging.remove_handler(handler)
    return result, stream.getvalue()


def test_guard_tensors_are_in_the_checkpoint_and_mode_hf_skips_them(saved, eval_batch):
    index = json.loads((saved / guard.INDEX_FILE).read_text())["weight_map"]
    assert index[f"{EXPERT_SET}.gate_up_proj"] == guard.GUARD_FILE and index[f"{EXPERT_SET}.down_proj"] == guard.GUARD_FILE
    assert index[guard.HINT] == guard.GUARD_FILE
    model, report = load_report(lambda: mode_hf.from_pretrained(saved))
    assert "UNEXPECTED" not in report and "MISSING" not in report, report  # the guard keys are expected
    with torch.no_grad():
        assert torch.isfinite(model(**eval_batch).logits).all()


def copy_checkpoint(saved, tmp_path, drop: str | None = None, nan: str | None = None):
    """A copy of a saved checkpoint with the tensor `drop` removed, or the float tensor `nan` set to NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    target = tmp_path / "broken"
    shutil.copytree(saved, target)
    index = json.loads((target / guard.INDEX_FILE).read_text())
    for file in set(index["weight_map"].values()):
        tensors = load_file(str(target / file))
        if drop in tensors:
            del tensors[drop]
            del index["weight_map"][drop]
        if nan in tensors:
            tensors[nan] = torch.full_like(tensors[nan], float("nan"))
        save_file(tensors, str(target / file), metadata={"format": "pt"})
    (target / guard.INDEX_FILE).write_text(json.dumps(index))
    return target


def test_a_missing_packed_tensor_fails_the_load(saved, tmp_path):
    name = f"{EXPERT_SET}.down_proj_scales_2bit"
    broken = copy_checkpoint(saved, tmp_path, drop=name)
    with pytest.raises(mode_hf.CheckpointError, match=r"down_proj_scales_2bit.*not in the checkpoint"):
        AutoModelForImageTextToText.from_pretrained(broken)
    with pytest.raises(mode_hf.CheckpointError, match="down_proj_scales_2bit"):
        mode_hf.from_pretrained(broken)


def test_non_finite_scales_fail_the_load(saved, tmp_path):
    broken = copy_checkpoint(saved, tmp_path, nan=f"{EXPERT_SET}.gate_up_proj_scales_3bit")
    with pytest.raises(mode_hf.CheckpointError, match=r"gate_up_proj_scales_3bit.*not finite"):
        mode_hf.from_pretrained(broken)


def test_an_expert_set_missing_from_the_bit_map_fails_the_load(saved, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["quantization_config"]["bit_map"][EXPERT_SET]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(mode_hf.CheckpointError, match=rf"{EXPERT_SET}.*not in the checkpoint's bit map"):
        AutoModelForImageTextToText.from_pretrained(broken)


def test_verify_quantized_catches_an_unloaded_set(saved):
    model = mode_hf.from_pretrained(saved)
    mode_hf.verify_quantized(model)
    model.get_submodule(EXPERT_SET).down_proj_scales_2bit.fill_(float("inf"))
    with pytest.raises(mode_hf.CheckpointError, match="not finite"):
        mode_hf.verify_quantized(model)


def test_a_tokenizer_as_processor_with_images_is_refused_before_calibration(base_dir, processor, samples, monkeypatch):
    monkeypatch.setattr("mode_hf.hf.quantizer.quantize_model", lambda *a, **k: pytest.fail("calibration started"))
    config = mode_hf.ModeConfig(calibration=samples[:4], processor=processor.tokenizer, quantizer="rtn")
    with pytest.raises(mode_hf.CalibrationDataError, match=rf"{type(processor.tokenizer).__name__}.*no pixel_values"):
        AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)


def test_processed_samples_without_pixels_are_refused_before_calibration(base_dir, processor, samples, monkeypatch):
    monkeypatch.setattr("mode_hf.hf.quantizer.quantize_model", lambda *a, **k: pytest.fail("calibration started"))
    image_sample = next(s for s in samples if s.get("image") is not None)
    batch = dict(processor(text=["<|vision_start|><|image_pad|><|vision_end|>" + image_sample["text"]], images=[image_sample["image"]], return_tensors="pt"))
    stripped = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    config = mode_hf.ModeConfig(calibration=[batch, stripped], quantizer="rtn")
    with pytest.raises(mode_hf.CalibrationDataError, match=r"calibration batch 1 .* \d+ vision placeholder tokens but no pixel_values"):
        AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)


def test_image_calibration_for_a_model_without_vision_is_refused(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    import families
    from mode_hf import cli

    family = families.FAMILIES["qwen3_moe"]
    family.make_model().save_pretrained(tmp_path / "text")
    family.make_processor().save_pretrained(tmp_path / "text")
    monkeypatch.setattr("mode_hf.hf.quantizer.quantize_model", lambda *a, **k: pytest.fail("calibration started"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", str(tmp_path / "text"), "--calib", "bundled", "--samples", "4", "--out", str(tmp_path / "q")])
    assert exit_info.value.code == 2
    assert "the images would never reach the vision tower" in capsys.readouterr().err  # names why, not a side error
    assert AutoModelForCausalLM is not None


def test_new_options_for_a_quantized_checkpoint_are_refused(saved, tmp_path, monkeypatch):
    from mode_hf import cli

    monkeypatch.setattr("mode_hf.hf.quantizer.quantize_model", lambda *a, **k: pytest.fail("calibration started"))
    again = mode_hf.ModeConfig(avg_bits=2.0, method="uniform", bits=(2, 3), quantizer="rtn")
    base = json.loads((saved / "config.json").read_text())["quantization_config"]["summary"]["base_model"]
    names_base = rf"already quantized with mode-hf \(3.0 bits, method 'mode'\).* Quantize the base model instead: {base}\."
    with pytest.raises(mode_hf.CheckpointError, match=names_base):  # transformers itself, mode_hf imported
        AutoModelForImageTextToText.from_pretrained(saved, quantization_config=again)
    with pytest.raises(ValueError, match=names_base):  # the pipeline wraps it, message included
        pipeline("image-text-to-text", model=str(saved), model_kwargs={"quantization_config": again})
    with pytest.raises(mode_hf.CheckpointError, match=names_base):
        mode_hf.from_pretrained(saved, quantization_config=again)
    reloaded = AutoModelForImageTextToText.from_pretrained(saved)  # the checkpoint's own config still loads
    assert reloaded.config.quantization_config.bit_map == json.loads((saved / "config.json").read_text())["quantization_config"]["bit_map"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", str(saved), "--avg-bits", "2.5", "--calib", "bundled", "--out", str(tmp_path / "q")])
    assert exit_info.value.code == 2
    assert isinstance(mode_hf.from_pretrained(saved).config.quantization_config, mode_hf.ModeConfig)


def test_non_finite_expert_weights_are_named_before_quantizing(tmp_path):
    import tiny

    model = tiny.tiny_model()
    with torch.no_grad():
        model.get_submodule(EXPERT_SET).gate_up_proj[3, 0, 0] = float("nan")
        model.get_submodule(EXPERT_SET).down_proj[5, 1, 1] = float("inf")
    model.save_pretrained(tmp_path / "nan")
    for options in (dict(method="uniform", quantizer="rtn"), dict(method="uniform", quantizer="rtn", avg_bits=4.0, bits=(4,))):
        config = mode_hf.ModeConfig(**{"avg_bits": 3.0, "bits": (3,), **options})
        with pytest.raises(mode_hf.WeightsError, match=rf"{EXPERT_SET}.gate_up_proj: expert 3 "):
            AutoModelForImageTextToText.from_pretrained(tmp_path / "nan", quantization_config=config)


def test_non_finite_pixels_name_their_sample_before_calibration(base_dir, processor, samples, monkeypatch):
    monkeypatch.setattr("mode_hf.hf.quantizer.quantize_model", lambda *a, **k: pytest.fail("calibration started"))
    image_sample = next(s for s in samples if s.get("image") is not None)
    batch = dict(processor(text=["<|vision_start|><|image_pad|><|vision_end|>" + image_sample["text"]], images=[image_sample["image"]], return_tensors="pt"))
    broken = {**batch, "pixel_values": batch["pixel_values"].clone()}
    broken["pixel_values"][0, 0] = float("nan")
    config = mode_hf.ModeConfig(calibration=[{"text": "12+30=42"}, batch, broken], processor=processor, quantizer="rtn")
    with pytest.raises(mode_hf.CalibrationDataError, match=r"calibration\[2\]: pixel_values holds NaN or inf"):
        AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)


def test_non_finite_hidden_states_name_their_batch(base_dir, processor, samples):
    """A model that diverges on one batch: the statistics pass stops at that batch, naming it and the set."""
    from mode_hf.calibrate.inputs import build_batches, vision_token_ids
    from mode_hf.calibrate.observe import gather_statistics
    from mode_hf.methods import observation
    from mode_hf.model.structure import find_expert_sets

    model = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    batches = build_batches(samples[:6], processor, 2)
    calls = {"n": 0}

    def diverge(module, args, output):  # the second batch's embeddings become inf
        calls["n"] += 1
        return torch.full_like(output, float("inf")) if calls["n"] == 2 else None

    handle = model.model.language_model.embed_tokens.register_forward_hook(diverge)
    try:
        with pytest.raises(mode_hf.CalibrationDataError, match=rf"calibration batch 1: the inputs of {EXPERT_SET} hold NaN or inf"):
            gather_statistics(model, find_expert_sets(model), batches, observation(mode_hf.ModeConfig(calibration=samples[:6], processor=processor)), vision_token_ids(model.config, processor))
    finally:
        handle.remove()


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_an_output_that_would_replace_the_source_is_refused(where, tmp_path, capsys):
    import tiny
    from mode_hf import cli

    source = tmp_path / "models" / "base"
    tiny.tiny_model().save_pretrained(source)
    tiny.build_processor().save_pretrained(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    out = {"same": source, "inside": source / "q", "parent": tmp_path / "models"}[where]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", str(source), "--method", "uniform", "--quantizer", "rtn", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "would replace it" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_an_interrupted_swap_is_recovered_and_a_load_says_where(saved, tmp_path):
    import shutil

    from mode_hf.hf import atomic

    target = tmp_path / "ckpt"
    shutil.copytree(saved, target)
    backup = tmp_path / ".ckpt.old-x"
    backup.mkdir()
    os_rename = __import__("os").replace
    os_rename(target, backup / "ckpt")  # killed between the two renames: the new copy never got in
    (tmp_path / ".ckpt.saving-y").mkdir()  # and an unfinished staging directory of another save
    with pytest.raises(mode_hf.CheckpointError, match=r"interrupted save left its previous copy at .*\.ckpt\.old-x/ckpt"):
        mode_hf.from_pretrained(target)
    assert atomic.recover(target) == "the previous copy from .ckpt.old-x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and mode_hf.from_pretrained(target) is not None
    staged = tmp_path / ".ckpt.saving-z"  # killed after the first rename, with the new copy complete
    shutil.copytree(saved, staged)
    (staged / atomic.COMPLETE).touch()
    (tmp_path / ".ckpt.old-w").mkdir()
    os_rename(target, tmp_path / ".ckpt.old-w" / "ckpt")
    assert atomic.recover(target) == "the complete new copy from .ckpt.saving-z"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and not (target / atomic.COMPLETE).exists()


def test_a_save_repairs_leftovers_and_writes_with_the_umask(saved, base_dir, processor, samples, tmp_path):
    import os
    import stat

    model = mode_hf.from_pretrained(saved)
    (tmp_path / ".ckpt.saving-stale").mkdir()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o777 & ~umask


def test_a_dequantized_model_saves_as_a_plain_model(saved, eval_batch, tmp_path, monkeypatch):
    model = mode_hf.from_pretrained(saved)
    model.dequantize()
    with torch.no_grad():
        expected = model(**eval_batch).logits
    model.save_pretrained(tmp_path / "plain")
    without_mode(monkeypatch)
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    with torch.no_grad():
        assert torch.allclose(plain(**eval_batch).logits, expected, atol=1e-5)


def test_the_bundled_model_answers_chat_messages_in_a_pipeline():
    """pipeline("image-text-to-text") with chat messages on the bundled model: its chat template puts the image
    placeholder where the model was trained to see it, so the pipeline answers as generate() does."""
    from mode_hf.bench import evaluation, tasks
    from mode_hf.bench.processor import IMAGE_PLACEHOLDER

    example = tasks.make_examples("vision", 1, seed=7)[0]
    pipe = pipeline("image-text-to-text", model=str(evaluation.BUNDLED_MODEL))
    messages = [{"role": "user", "content": [{"type": "image", "image": example.image}, {"type": "text", "text": example.prompt}]}]
    answer = pipe(text=messages, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    batch = dict(pipe.processor(text=[IMAGE_PLACEHOLDER + example.prompt], images=[example.image], return_tensors="pt"))
    tokens = pipe.model.generate(**batch, max_new_tokens=8, do_sample=False)[0, batch["input_ids"].shape[1]:]
    assert answer == pipe.processor.tokenizer.decode(tokens, skip_special_tokens=True) == example.answer
