"""The full path on a tiny random Qwen3-VL-MoE: quantize on load from raw samples, compare with the dequantized
reference, save, reload, generate, pipeline, push to the Hub (captured offline), dequantize."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, pipeline

import mode_hf
import tiny
from mode_hf.hf import guard
from mode_hf.model.packed import PackedExperts

from conftest import max_abs

EXPERT_SETS = ["model.language_model.layers.0.mlp.experts", "model.language_model.layers.1.mlp.experts"]


def make_config(processor, samples, **overrides):
    options = dict(avg_bits=3.0, bits=(2, 3, 4), group_size=16, calibration=samples, processor=processor, batch_size=4)
    options.update(overrides)
    return mode_hf.ModeConfig(**options)


@pytest.fixture(scope="module")
def quantized(base_dir, processor, samples):
    return AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=make_config(processor, samples))


@pytest.fixture(scope="module")
def saved(quantized, processor, tmp_path_factory):
    path = tmp_path_factory.mktemp("quantized")
    processor.save_pretrained(path)
    quantized.save_pretrained(path)
    return path


def dequantized_reference(quantized_model, base_dir):
    """The original model class with the packed experts' dequantized weights written into its own experts."""
    reference = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    for name in EXPERT_SETS:
        packed = quantized_model.get_submodule(name)
        experts = reference.get_submodule(name)
        weights = packed.dequantized_weights()
        with torch.no_grad():
            experts.gate_up_proj.copy_(weights["gate_up_proj"])
            experts.down_proj.copy_(weights["down_proj"])
    return reference


def test_experts_are_packed_and_budget_holds(quantized, processor, samples):
    config = quantized.config.quantization_config
    assert sorted(config.bit_map) == EXPERT_SETS
    params_per_expert = 3 * 64 * 32
    total_bits = sum(b * params_per_expert for widths in config.bit_map.values() for b in widths)
    assert total_bits <= 3.0 * params_per_expert * 16 + 1e-6
    for name in EXPERT_SETS:
        module = quantized.get_submodule(name)
        assert isinstance(module, PackedExperts)
        assert module.expert_bits == config.bit_map[name]
    summary = config.summary
    inputs = [mode_hf.calibrate.inputs.build_batches([s], processor, 1)[0] for s in samples]
    vision = sum(int((b["input_ids"] == processor.image_token_id).sum()) for b in inputs)
    total = sum(int(b["attention_mask"].sum()) for b in inputs)
    kept = sum(kept_vision_tokens(quantized, b, processor.image_token_id, threshold=0.9) for b in inputs)
    assert summary["tokens"] == {"text": total - vision, "vision": vision, "vision_kept": kept}
    assert 0 < kept < vision  # the scenes' uniform backgrounds are redundant, their shapes are not
    assert summary["tokens"]["vision"] > summary["tokens"]["text"]  # images dominate the mix
    assert 0 < summary["keep_ratio"] <= 1
    assert summary["average_bits"] <= 3.0 + 1e-9
    assert summary["effective_bits"] > summary["average_bits"]
    assert config.calibration is None and config.processor is None


def kept_vision_tokens(model, batch, image_token_id, threshold):
    """Vision tokens the redundancy filter keeps, recomputed in float64: per image (one sample, one image), in
    raster order over the first decoder layer's input, a token is kept unless its cosine similarity to a token
    already kept is >= threshold."""
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().double()
        raise StopIteration  # the first layer's input is all that is needed

    handle = model.model.language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    except StopIteration:
        pass
    finally:
        handle.remove()
    vectors = seen["x"][0][batch["input_ids"][0] == image_token_id]  # [N, H] in raster order
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    kept: list[torch.Tensor] = []
    for v in unit:
        if not kept or max(float(k @ v) for k in kept) < threshold:
            kept.append(v)
    return len(kept)


def test_forward_matches_dequantized_reference(quantized, base_dir, eval_batch):
    reference = dequantized_reference(quantized, base_dir)
    with torch.no_grad():
        expected = reference(**eval_batch).logits
        got = quantized(**eval_batch).logits
    assert max_abs(got, expected) < 1e-4
    # and quantization changed something: the packed model is not the float model
    original = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    with torch.no_grad():
        assert max_abs(original(**eval_batch).logits, got) > 1e-4


def test_generate_matches_dequantized_reference(quantized, base_dir, eval_batch):
    reference = dequantized_reference(quantized, base_dir)
    expected = reference.generate(**eval_batch, max_new_tokens=6, do_sample=False)
    got = quantized.generate(**eval_batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


def test_reload_gives_identical_logits(quantized, saved, eval_batch):
    reloaded = mode_hf.from_pretrained(saved)
    assert reloaded.config.quantization_config.bit_map == quantized.config.quantization_config.bit_map
    with torch.no_grad():
        assert torch.equal(reloaded(**eval_batch).logits, quantized(**eval_batch).logits)
    generated = reloaded.generate(**eval_batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, quantized.generate(**eval_batch, max_new_tokens=5, do_sample=False))


def test_checkpoint_bytes_match_bit_map(saved):
    config = json.loads((saved / "config.json").read_text())
    bit_map, group_size = config["quantization_config"]["bit_map"], config["quantization_config"]["group_size"]
    expected = 0
    for widths in bit_map.values():
        for b in widths:
            for out_dim, in_dim in ((64, 64), (64, 32)):  # gate_up [2I, H], down [H, I]
                groups = in_dim // min(group_size, in_dim)
                expected += out_dim * in_dim * b // 8 + out_dim * groups * 3  # packed codes + fp16 scale + uint8 zero
    stored, files = 0, guard.checkpoint_keys(saved)
    for key, file in files.items():
        if ".mlp.experts." in key and file != guard.GUARD_FILE:
            with safe_open(str(saved / file), "pt") as handle:
                stored += handle.get_tensor(key).numel() * handle.get_tensor(key).element_size()
    assert stored == expected
    guards = [k for k, file in files.items() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(guards) == 2 * len(bit_map) and all(files[k] == guard.GUARD_FILE for k in guards)  # only the guards


def test_model_card_written(saved):
    card = (saved / "README.md").read_text()
    assert mode_hf.hf.card.CARD_MARKER in card and "import mode_hf" in card
    histogram = json.loads((saved / "config.json").read_text())["quantization_config"]["summary"]["bits_histogram"]
    total = sum(histogram.values())
    rows = [f"| {bits} | {count} | {100 * count / total:.1f}% |" for bits, count in histogram.items()]
    assert total == 16 and all(row in card for row in rows)  # every width's row, with the experts the bit map has


def test_pipeline_from_saved_checkpoint(saved, processor, quantized, eval_batch):
    pipe = pipeline("image-text-to-text", model=str(saved), processor=processor)
    for name in EXPERT_SETS:  # the pipeline holds the saved packed experts, buffer for buffer
        loaded, expected = pipe.model.get_submodule(name), quantized.get_submodule(name)
        assert isinstance(loaded, PackedExperts)
        assert all(torch.equal(b, dict(expected.named_buffers())[n]) for n, b in loaded.named_buffers())
    image, _ = tiny.draw_scene(__import__("random").Random(5))
    prompt = "<|vision_start|><|image_pad|><|vision_end|>what?"
    out = pipe(images=image, text=prompt, max_new_tokens=8, do_sample=False, return_full_text=False)
    batch = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    tokens = quantized.generate(**batch, max_new_tokens=8, do_sample=False)[0, batch["input_ids"].shape[1]:]
    expected = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(tokens) == 8 and out[0]["generated_text"] == expected  # the pipeline ran the packed model


def test_pipeline_quantizes_on_load(base_dir, processor, samples):
    config = make_config(processor, samples[:4], quantizer="rtn")
    pipe = pipeline("image-text-to-text", model=str(base_dir), processor=processor, model_kwargs={"quantization_config": config})
    assert all(isinstance(pipe.model.get_submodule(n), PackedExperts) for n in EXPERT_SETS)


def test_push_to_hub_commit_loads(quantized, eval_batch, tmp_path, monkeypatch):
    captured = {}

    class FakeRepo:
        repo_id = "someone/tiny-mode"

    def create_repo(self, repo_id, **kwargs):
        return FakeRepo()

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        captured["repo_id"], captured["message"] = repo_id, commit_message
        for operation in operations:
            target = tmp_path / "hub" / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(operation.path_or_fileobj).read_bytes())
        return "commit-url"

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", create_repo)
    monkeypatch.setattr("huggingface_hub.HfApi.create_commit", create_commit)
    assert quantized.push_to_hub("someone/tiny-mode") == "commit-url"
    uploaded = tmp_path / "hub"
    assert {"config.json", guard.INDEX_FILE, guard.GUARD_FILE, guard.PACKED_FILE, "README.md"} <= {p.name for p in uploaded.iterdir()}
    pictures = sorted(p.name for p in (uploaded / "report").iterdir())
    assert pictures == ["bits_heatmap.png", "bytes.png", "frequency.png"]
    card = (uploaded / "README.md").read_text()
    assert "someone/tiny-mode" in card and "effective bits" in card
    assert all(f"](report/{name})" in card for name in pictures)  # the card shows the uploaded pictures
    reloaded = mode_hf.from_pretrained(uploaded)
    with torch.no_grad():
        assert torch.equal(reloaded(**eval_batch).logits, quantized(**eval_batch).logits)


def test_failed_save_keeps_previous_checkpoint(quantized, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    quantized.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mode_hf.hf.checkpoint._write_card", broken_write)
    with pytest.raises(OSError, match="disk full"):
        quantized.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left behind


def test_failed_swap_keeps_previous_checkpoint_and_processor(quantized, processor, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    processor.save_pretrained(target)
    quantized.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_replace(staging, destination):
        raise OSError("rename failed")

    monkeypatch.setattr("mode_hf.hf.atomic._replace_directory", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        quantized.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert "tokenizer.json" in before


def test_save_keeps_processor_files(saved):
    assert (saved / "tokenizer.json").exists() and (saved / "processor_config.json").exists()


def test_dequantize_returns_original_class(quantized, base_dir, eval_batch):
    model = copy.deepcopy(quantized)
    with torch.no_grad():
        expected = model(**eval_batch).logits
    model.dequantize()
    experts = model.get_submodule(EXPERT_SETS[0])
    assert type(experts).__name__ == "Qwen3VLMoeTextExperts"
    with torch.no_grad():
        assert max_abs(model(**eval_batch).logits, expected) < 1e-4


def test_loading_without_mode_is_detected(saved):
    config = json.loads((saved / "config.json").read_text())
    plain = AutoModelForImageTextToText.from_config(
        AutoModelForImageTextToText.from_pretrained(saved).config.__class__.from_dict(
            {k: v for k, v in config.items() if k != "quantization_config"}
        )
    )
    plain.config.quantization_config = config["quantization_config"]  # what transformers keeps without mode_hf
    with pytest.raises(mode_hf.CheckpointError, match="import mode_hf"):
        mode_hf.verify_quantized(plain)


def test_dtype_casts_keep_float16_scales(saved, quantized, eval_batch):
    reloaded = mode_hf.from_pretrained(saved, dtype=torch.bfloat16)
    packed = reloaded.get_submodule(EXPERT_SETS[0])
    scales = [b for n, b in packed.named_buffers() if "_scales_" in n]
    assert scales and all(b.dtype == torch.float16 for b in scales)
    assert torch.equal(packed.expert_weight("down_proj", 0), quantized.get_submodule(EXPERT_SETS[0]).expert_weight("down_proj", 0))
    cast = copy.deepcopy(quantized).to(torch.bfloat16)  # a cast after loading: same rule
    assert all(b.dtype == torch.float16 for n, b in cast.named_buffers() if "_scales_" in n)
    assert all(b.dtype == torch.uint8 for n, b in cast.named_buffers() if "_qweight_" in n)
    with torch.no_grad():
        low = reloaded(**eval_batch).logits.float()
        high = quantized(**eval_batch).logits
    assert max_abs(low, high) < 0.1 * float(high.abs().max())  # bf16 activations only
