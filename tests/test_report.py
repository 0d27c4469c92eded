"""Report pictures of a checkpoint: bytes per module type from safetensors headers, row order, what each plot drew."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mode_hf.errors import CheckpointError
from mode_hf.hf.report import (
    bytes_by_module_type,
    expert_set_rows,
    load_report_data,
    plot_bits_heatmap,
    plot_bytes,
    plot_frequency,
    write_report,
)

# matplotlib is an optional dependency (the "bench" extra); tests that draw need it, byte counting does not.
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")

LAYERS = (10, 2, 0, 1)  # inserted out of order: "layers.10." sorts before "layers.2." as a string
EXPERTS = 8


def set_name(layer: int, kind: str = "experts") -> str:
    return f"model.language_model.layers.{layer}.mlp.{kind}"


SHARED_MLP = "shared experts / dense MLP"
# name -> (shape, dtype, the module type it should count as); sizes come from numel * element_size.
TENSORS = {
    f"{set_name(0)}.gate_up_proj_qweight_3bit": ((3, 16, 6), torch.uint8, "routed experts"),
    f"{set_name(0)}.gate_up_proj_scales_3bit": ((3, 16, 2), torch.float16, "routed experts"),
    f"{set_name(0)}.gate_up_proj_zeros_3bit": ((3, 16, 2), torch.uint8, "routed experts"),
    f"{set_name(10)}.down_proj_qweight_2bit": ((5, 8, 4), torch.uint8, "routed experts"),
    "model.visual.blocks.0.attn.qkv.weight": ((24, 8), torch.float32, "vision tower"),
    "model.visual.patch_embed.proj.weight": ((8, 3, 2, 2), torch.bfloat16, "vision tower"),
    "model.language_model.embed_tokens.weight": ((32, 8), torch.bfloat16, "embeddings"),
    "lm_head.weight": ((32, 8), torch.bfloat16, "lm head"),
    "model.language_model.layers.0.self_attn.q_proj.weight": ((8, 8), torch.bfloat16, "attention"),
    "model.language_model.layers.0.self_attn.o_proj.weight": ((8, 8), torch.bfloat16, "attention"),
    "model.language_model.layers.0.mlp.gate.weight": ((EXPERTS, 8), torch.float32, "routers"),
    "model.language_model.layers.1.mlp.shared_expert.down_proj.weight": ((8, 16), torch.bfloat16, SHARED_MLP),
    "model.language_model.layers.0.input_layernorm.weight": ((8,), torch.float32, "norms and other"),
    "model.language_model.norm.weight": ((8,), torch.bfloat16, "norms and other"),
}
MODULE_TYPE_ORDER = [
    "routed experts", "vision tower", "embeddings", "lm head", "attention", "routers", SHARED_MLP, "norms and other",
]


def expected_bytes() -> dict[str, int]:
    """Independent reference: bytes per module type from the tensors' numel and element size."""
    totals: dict[str, int] = {}
    for shape, dtype, module_type in TENSORS.values():
        tensor = torch.zeros(shape, dtype=dtype)
        totals[module_type] = totals.get(module_type, 0) + tensor.numel() * tensor.element_size()
    return totals


def make_bit_map(layers: tuple[int, ...], experts: int, seed: int = 0) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {set_name(layer): rng.choice([2, 3, 4, 8], size=experts).tolist() for layer in layers}


def make_frequency(bit_map: dict[str, list[int]], seed: int = 1) -> dict[str, dict[str, list[float]]]:
    rng = np.random.default_rng(seed)
    frequency = {}
    for name, widths in bit_map.items():
        vision = rng.uniform(0.01, 0.5, len(widths))
        vision[0] = 0.0  # an expert no vision token selected
        frequency[name] = {"text": rng.uniform(0.01, 0.5, len(widths)).tolist(), "vision": vision.tolist()}
    return frequency


def write_checkpoint(directory: Path, summary: dict, shards: int = 1) -> dict[str, list[int]]:
    """A mode checkpoint's config.json and safetensors file(s) with the TENSORS above; returns its bit map."""
    bit_map = make_bit_map(LAYERS, EXPERTS)
    options = {"quant_method": "mode", "bit_map": bit_map, "summary": summary}
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe", "quantization_config": options}))
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype, _) in TENSORS.items()}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return bit_map
    names, weight_map = sorted(tensors), {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::shards]}
        save_file(part, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return bit_map


def full_summary(bit_map: dict[str, list[int]]) -> dict:
    return {
        "method": "mode", "scope": "global", "average_bits": 3.25, "keep_ratio": 0.375,
        "expert_bytes": {"bf16": 4_000_000, "packed": 1_100_000}, "frequency": make_frequency(bit_map),
        "tokens": {"text": 100, "vision": 80, "vision_kept": 30},
    }


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    write_checkpoint(tmp_path, full_summary(make_bit_map(LAYERS, EXPERTS)))
    return tmp_path


def layer_order_matrix(bit_map: dict[str, list[int]], layers: list[int]) -> np.ndarray:
    """The expected heatmap rows: the bit map's widths by ascending layer index. [R, E]."""
    return np.array([bit_map[set_name(layer)] for layer in sorted(layers)], dtype=float)


@pytest.mark.parametrize("shards", [1, 3])
def test_bytes_by_module_type_matches_tensor_sizes(tmp_path: Path, shards: int) -> None:
    bit_map = write_checkpoint(tmp_path, {}, shards=shards)
    by_type = bytes_by_module_type(tmp_path, bit_map)
    assert list(by_type) == MODULE_TYPE_ORDER
    assert {name: size for name, size in by_type.items() if size} == expected_bytes()


def test_bytes_by_module_type_without_safetensors_raises(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="safetensors"):
        bytes_by_module_type(tmp_path, {})


def test_rows_follow_numeric_layer_order_with_one_row_per_set() -> None:
    names = [set_name(10), set_name(2, "vision_experts"), set_name(0), set_name(2, "text_experts")]
    ordered, labels = expert_set_rows(names)
    assert ordered == [set_name(0), set_name(2, "text_experts"), set_name(2, "vision_experts"), set_name(10)]
    assert labels == ["L0", "L2 text_experts", "L2 vision_experts", "L10"]


def test_load_report_data_without_bit_map_names_the_config(tmp_path: Path) -> None:
    config = {"model_type": "qwen3_vl_moe", "quantization_config": {"quant_method": "gptq"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*bit_map"):
        load_report_data(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_report_data(tmp_path)


def test_load_report_data_returns_the_quantization_config(checkpoint: Path) -> None:
    options = load_report_data(checkpoint)
    assert options["bit_map"] == make_bit_map(LAYERS, EXPERTS)
    assert options["summary"]["keep_ratio"] == 0.375


def assert_png_size(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert all(300 < side <= 2000 for side in image.size), image.size


@needs_matplotlib
def test_small_bits_heatmap_draws_the_bit_map_with_cell_labels(tmp_path: Path) -> None:
    bit_map = make_bit_map(LAYERS, EXPERTS)
    fig = plot_bits_heatmap(bit_map, tmp_path / "bits.png", average_bits=3.25)
    ax = fig.axes[0]
    expected = layer_order_matrix(bit_map, list(LAYERS))  # [4, 8]
    np.testing.assert_array_equal(np.ma.getdata(ax.images[0].get_array()), expected)
    assert [int(t.get_text()) for t in ax.texts] == expected.astype(int).ravel().tolist()  # drawn row by row
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L0", "L1", "L2", "L10"]
    widths_present = sorted({int(b) for b in expected.ravel()})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [str(b) for b in widths_present]
    assert "3.25" in ax.get_title()
    assert_png_size(tmp_path / "bits.png")


@needs_matplotlib
def test_large_bits_heatmap_is_readable(tmp_path: Path) -> None:
    layers = list(np.random.default_rng(2).permutation(48))
    bit_map = make_bit_map(tuple(int(layer) for layer in layers), 128)
    ax = plot_bits_heatmap(bit_map, tmp_path / "bits.png").axes[0]
    np.testing.assert_array_equal(np.ma.getdata(ax.images[0].get_array()), layer_order_matrix(bit_map, layers))
    assert not ax.texts  # no per-cell labels at 48 x 128
    assert 4 <= len(ax.get_yticks()) <= 16 and 4 <= len(ax.get_xticks()) <= 16
    assert ax.get_yticklabels()[1].get_text() == f"L{int(ax.get_yticks()[1])}"
    assert_png_size(tmp_path / "bits.png")


@needs_matplotlib
def test_frequency_panels_draw_text_and_vision_with_keep_ratio(tmp_path: Path) -> None:
    bit_map = make_bit_map(LAYERS, EXPERTS)
    frequency = make_frequency(bit_map)
    fig = plot_frequency(frequency, 0.375, tmp_path / "frequency.png")
    text_ax, vision_ax = fig.axes[:2]
    for ax, group in ((text_ax, "text"), (vision_ax, "vision")):
        expected = np.array([frequency[set_name(layer)][group] for layer in sorted(LAYERS)])  # [4, 8]
        drawn = ax.images[0].get_array()
        np.testing.assert_array_equal(drawn.mask, expected == 0)  # never-selected experts are masked (grey)
        np.testing.assert_allclose(drawn.compressed(), expected[expected > 0])
    assert "37.5%" in vision_ax.get_title()
    assert_png_size(tmp_path / "frequency.png")
    assert "n/a" in plot_frequency(frequency, None, tmp_path / "no_ratio.png").axes[1].get_title()


@needs_matplotlib
@pytest.mark.parametrize("frequency", [None, {}])
def test_frequency_without_statistics_draws_nothing(tmp_path: Path, frequency: dict | None) -> None:
    assert plot_frequency(frequency, None, tmp_path / "frequency.png") is None
    assert not (tmp_path / "frequency.png").exists()


@needs_matplotlib
def test_bytes_bars_equal_module_sizes_and_expert_comparison(tmp_path: Path) -> None:
    by_type = dict.fromkeys(MODULE_TYPE_ORDER, 0) | expected_bytes()
    fig = plot_bytes(by_type, tmp_path / "bytes.png", {"bf16": 4_000_000, "packed": 1_100_000})
    types_ax, experts_ax = fig.axes
    sizes = expected_bytes()
    present = [name for name in MODULE_TYPE_ORDER if name in sizes]  # 0-byte types are left out
    assert [t.get_text() for t in types_ax.get_yticklabels()] == present
    np.testing.assert_allclose([bar.get_width() for bar in types_ax.patches], [sizes[name] / 1e6 for name in present])
    np.testing.assert_allclose([bar.get_width() for bar in experts_ax.patches], [4.0, 1.1])
    assert "27.5%" in experts_ax.get_title()
    assert len(plot_bytes(by_type, tmp_path / "bytes_only.png").axes) == 1
    assert_png_size(tmp_path / "bytes.png")


@needs_matplotlib
def test_write_report_writes_every_picture(checkpoint: Path) -> None:
    paths = write_report(checkpoint)
    assert paths == [checkpoint / "report" / name for name in ("bits_heatmap.png", "frequency.png", "bytes.png")]
    for path in paths:
        assert_png_size(path)


@needs_matplotlib
def test_write_report_of_uniform_method_skips_frequency(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    write_checkpoint(checkpoint, {"method": "uniform", "average_bits": 3.0, "keep_ratio": None})
    paths = write_report(checkpoint, tmp_path / "out")
    assert [p.name for p in paths] == ["bits_heatmap.png", "bytes.png"]
    assert not (tmp_path / "out" / "frequency.png").exists()
