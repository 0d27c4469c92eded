"""compressed-tensors export: transformers loads it back with the mode model's logits; every exported linear
decompresses (by compressed-tensors' own code, under the config group that targets it) to the mode weight; bad
checkpoints are refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mode_hf
from mode_hf.hf import export, guard
from mode_hf.model.packed import PackedExperts, PackedLinear

import families

pytest.importorskip("compressed_tensors")


def quantize_family(name: str, tmp_path: Path, **options) -> tuple[torch.nn.Module, Path, families.Family]:
    family = families.FAMILIES[name]
    processor = family.make_processor() if family.make_processor else None
    base = tmp_path / "base"
    family.make_model().save_pretrained(base)
    if processor is not None:
        processor.save_pretrained(base)
    options = {"avg_bits": 4.0, "bits": (2, 4), "scope": "layer_uniform", "symmetric": True, **options}
    config = mode_hf.ModeConfig(
        group_size=16, calibration=family.calibration(processor), processor=processor, batch_size=2, gptq_min_tokens=4,
        **options,
    )
    model = family.model_class.from_pretrained(base, quantization_config=config).eval()
    model.save_pretrained(tmp_path / "mode")
    return model, tmp_path / "mode", family


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _reloads_in_transformers(family: families.Family) -> bool:
    with torch.device("meta"):
        model = family.make_model()
    try:
        return export.expert_names(model).transformers_loads
    except export.ExportError:
        return False


LOADS_BACK = [name for name, family in families.FAMILIES.items() if _reloads_in_transformers(family)]
assert "qwen3_moe" in LOADS_BACK and "qwen3_vl_moe" not in LOADS_BACK


@pytest.mark.parametrize("name, dense_bits", [(n, 8 if n == "qwen3_moe" else None) for n in LOADS_BACK])
def test_transformers_loads_the_export_back(name: str, dense_bits: int | None, tmp_path: Path) -> None:
    model, checkpoint, family = quantize_family(name, tmp_path, dense_bits=dense_bits)
    result = export.export_compressed_tensors(checkpoint, tmp_path / "ct")
    assert result["transformers_loads"] and result["layer_widths"] == [4]
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"

    loaded = family.model_class.from_pretrained(tmp_path / "ct").eval()  # transformers' compressed-tensors path
    processor = family.make_processor() if family.make_processor else None
    inputs = family.inputs(processor)
    expected = logits(model, inputs)
    assert torch.allclose(logits(loaded, inputs), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    for module_name, module in model.named_modules():
        if isinstance(module, PackedExperts):  # fused by transformers' conversion, bit for bit
            weights = module.dequantized_weights()
            assert torch.equal(loaded.get_submodule(module_name).gate_up_proj, weights["gate_up_proj"])
            assert torch.equal(loaded.get_submodule(module_name).down_proj, weights["down_proj"])


def test_each_layer_decompresses_under_its_own_config_group(tmp_path: Path) -> None:
    """Widths differ between layers: every exported linear, decompressed by compressed-tensors with the scheme of
    the group whose targets match its name, equals the mode model's weight."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file

    model, checkpoint, _ = quantize_family("qwen3_moe", tmp_path, avg_bits=3.0, dense_bits=4)
    widths = {n: w[0] for n, w in model.config.quantization_config.bit_map.items()}
    assert sorted(set(widths.values())) == [2, 4]  # the test needs two widths
    result = export.export_compressed_tensors(checkpoint, tmp_path / "ct")
    assert not result["transformers_loads"] and result["layer_widths"] == [2, 4]

    config = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"])
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {k: v for f in set(index.values()) for k, v in load_file(tmp_path / "ct" / f).items()}
    with pytest.raises(RuntimeError):  # transformers would decompress every layer with one scheme: it must not load
        families.FAMILIES["qwen3_moe"].model_class.from_pretrained(tmp_path / "ct")
    expected: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedExperts):
            weights = module.dequantized_weights()
            inter = module.intermediate_dim
            for e in range(module.num_experts):
                expected[f"{name}.{e}.gate_proj"] = weights["gate_up_proj"][e, :inter]
                expected[f"{name}.{e}.up_proj"] = weights["gate_up_proj"][e, inter:]
                expected[f"{name}.{e}.down_proj"] = weights["down_proj"][e]
        elif isinstance(module, PackedLinear):
            expected[name] = module.dequantized_weight()
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    for linear, weight in expected.items():
        schemes = [s for s in config.config_groups.values() if is_match(linear, torch.nn.Linear(1, 1), s.targets)]
        assert len(schemes) == 1, linear
        state = {k.removeprefix(f"{linear}."): v for k, v in tensors.items() if k.startswith(f"{linear}.weight_")}
        got = compressor.decompress(state, schemes[0])["weight"]
        assert torch.equal(got.float(), weight), linear
    assert not any("qweight" in k for k in tensors)


def test_refuses_per_expert_widths_and_zero_points_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "ct"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier export")
    _, per_expert, _ = quantize_family("qwen3_moe", tmp_path / "a", avg_bits=3.0, bits=(2, 4), scope="global", quantizer="rtn")
    with pytest.raises(export.ExportError, match="layer_uniform"):
        export.export_compressed_tensors(per_expert, out)
    _, asymmetric, _ = quantize_family("qwen3_moe", tmp_path / "b", symmetric=False, quantizer="rtn")
    with pytest.raises(export.ExportError, match="symmetric"):
        export.export_compressed_tensors(asymmetric, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failing_export_leaves_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, checkpoint, _ = quantize_family("qwen3_moe", tmp_path, quantizer="rtn")
    export.export_compressed_tensors(checkpoint, tmp_path / "ct")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ct").iterdir()}
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full")
        return original(*args, **kwargs)

    original = export.compress
    monkeypatch.setattr(export, "compress", failing)
    with pytest.raises(OSError, match="disk full"):
        export.export_compressed_tensors(checkpoint, tmp_path / "ct")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ct").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_families_without_per_expert_checkpoints_are_refused() -> None:
    with torch.device("meta"):
        model = families.FAMILIES["gpt_oss"].make_model()
    with pytest.raises(export.ExportError, match="gpt_oss"):
        export.expert_names(model)
    with torch.device("meta"):
        mixtral = families.FAMILIES["mixtral"].make_model()
    assert export.expert_names(mixtral) == export.ExpertNames("w1", "w3", "w2", transformers_loads=True)


def test_large_exports_are_sharded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards are written as they fill (one in memory); transformers loads the sharded export through its index."""
    model, checkpoint, family = quantize_family("qwen3_moe", tmp_path, quantizer="rtn")
    monkeypatch.setattr(export, "SHARD_BYTES", 16 * 1024)
    export.export_compressed_tensors(checkpoint, tmp_path / "ct")
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    shards = sorted((tmp_path / "ct").glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert not list((tmp_path / "ct").glob("*.tmp"))
    inputs = family.inputs(family.make_processor())
    loaded = family.model_class.from_pretrained(tmp_path / "ct").eval()
    expected = logits(model, inputs)
    assert torch.allclose(logits(loaded, inputs), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


def test_an_export_transformers_cannot_convert_back_fails_to_load(tmp_path: Path) -> None:
    """Qwen3-VL-MoE exports per-expert linears (what serving engines read), which transformers cannot fold back
    into its fused experts: a plain load must fail, not run random experts. The real weights are in the index's
    shards, which is what vLLM reads; transformers reads the single-file decoy first."""
    _, saved, family = quantize_family("qwen3_vl_moe", tmp_path)
    result = export.export_compressed_tensors(saved, tmp_path / "ct")
    assert not result["transformers_loads"]
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    assert "model.safetensors" not in set(index["weight_map"].values())
    with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
        family.model_class.from_pretrained(tmp_path / "ct")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as decoy:
        assert guard.HINT in decoy.keys()  # named in the refused load's report


def test_targets_survive_engine_renaming_and_config_has_engine_keys(tmp_path: Path) -> None:
    """vLLM serves Qwen3-VL's `model.language_model.layers.N...` as `language_model.model.layers.N...` and matches
    `re:` targets against its own names without mapping them: every target must match its linears under both
    spellings, and nothing else of the checkpoint. transformers no longer writes text_config.norm_topk_prob, which
    vLLM's Qwen3-MoE block reads: the export and the mode checkpoint both carry it."""
    import re

    _, saved, _ = quantize_family("qwen3_vl_moe", tmp_path)
    saved_config = json.loads((saved / "config.json").read_text())
    assert saved_config["text_config"].pop("norm_topk_prob") is True
    (saved / "config.json").write_text(json.dumps(saved_config))  # as a checkpoint of an earlier mode-hf has it
    export.export_compressed_tensors(saved, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["text_config"]["norm_topk_prob"] is True
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    modules = {key.rpartition(".")[0] for key in index["weight_map"]}
    experts = {m for m in modules if re.search(r"\.experts\.\d+\.(gate|up|down)_proj$", m)}
    assert experts and all(m.startswith("model.language_model.layers.") for m in experts)
    targets = [t.removeprefix("re:") for g in config["quantization_config"]["config_groups"].values() for t in g["targets"]]
    for spelling in (lambda m: m, lambda m: m.replace("model.language_model.", "language_model.model.", 1)):
        matched = {m for m in modules if any(re.match(t, spelling(m)) for t in targets)}
        assert matched == experts


def test_an_ambiguous_target_tail_falls_back_to_the_exact_name() -> None:
    modules = {"model.language_model.layers.0.mlp.experts.0.up_proj", "model.visual.layers.0.mlp.experts.0.up_proj"}
    target = export.engine_target("model.language_model.layers.0.mlp.experts", r"\.\d+\.up_proj", modules)
    assert target == r"re:^model\.language_model\.layers\.0\.mlp\.experts\.\d+\.up_proj$"
    modules.discard("model.visual.layers.0.mlp.experts.0.up_proj")
    target = export.engine_target("model.language_model.layers.0.mlp.experts", r"\.\d+\.up_proj", modules)
    assert target == r"re:^(?:.*\.)?layers\.0\.mlp\.experts\.\d+\.up_proj$"


@pytest.mark.parametrize("moe, dense, cpu, gpu", [
    ({4}, set(), True, True),
    ({8}, set(), False, True),  # vLLM-CPU has int4 MoE kernels only
    ({3}, set(), False, False),
    ({4}, {8}, False, True),  # no 8-bit dense kernel on CPU
])
def test_vllm_support_names_the_devices_that_cannot_serve_an_export(moe, dense, cpu, gpu) -> None:
    from mode_hf.hf.engines import vllm_support

    lines = dict(zip(["GPU", "CPU"], vllm_support(moe, dense)))
    assert ("has no kernel" not in lines["CPU"]) == cpu and ("has no kernel" not in lines["GPU"]) == gpu
    for line in lines.values():
        assert ("plugin" in line) == ("has no kernel" in line)  # a refusal points at the plugin
