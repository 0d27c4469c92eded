"""The peers' checkpoints read back without their libraries (mode_hf.bench.peer_export): the int32 unpackings
against an independent packer written here, and `export_peer` on synthetic peer checkpoints of a tiny model (GPTQ
v1 with g_idx as GPTQModel writes it, GPTQ v2 as optimum writes it, compressed-tensors pack-quantized as
llm-compressor writes it, fused experts left dense as GPTQConfig leaves them) against float64 dequantization.
Offline, fast, no peer installed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402

from mode_hf.bench import peer_export as peers  # noqa: E402
from mode_hf.errors import CheckpointError  # noqa: E402
from mode_hf.hf.checkpoint import auto_model_class  # noqa: E402

GROUP = 32


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent packer: unsigned codes [..., n] -> int32 [..., ceil(n * bits / 32)]. Each row becomes one Python
    integer (code k at bit k * bits), cut into 32-bit words, least significant first (two's complement int32)."""
    n = codes.shape[-1]
    words = math.ceil(n * bits / 32)
    rows = []
    for row in codes.reshape(-1, n).tolist():
        assert all(0 <= c < 1 << bits for c in row)
        big = sum(int(c) << (k * bits) for k, c in enumerate(row))
        rows.append([(big >> (32 * w)) & 0xFFFFFFFF for w in range(words)])
    packed = torch.tensor(rows, dtype=torch.int64).reshape(*codes.shape[:-1], words)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def gptq_tensors(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, zero_offset: int) -> dict:
    """GPTQ layout of codes [out, in], zeros [G, out], scales [G, out]: qweight [in*b/32, out] (each column a bit
    stream along `in`), qzeros [G, out*b/32] holding zero - zero_offset."""
    return {"qweight": pack_bits(codes, bits).t().contiguous(), "qzeros": pack_bits(zeros - zero_offset, bits),
            "scales": scales.half()}


# ------------------------------------------------------------------------------------------------ unpacking


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [32, 64, 50])
def test_int32_stream_unpacks_the_independent_packing(bits, count):
    codes = torch.randint(0, 1 << bits, (5, count), generator=torch.Generator().manual_seed(bits * count))
    assert torch.equal(peers.unpack_int32_stream(pack_bits(codes, bits), bits, count), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zero_offset", [1, 0])  # GPTQ v1 (stored zero - 1), v2
def test_gptq_qweight_and_qzeros_unpack(bits, zero_offset):
    g = torch.Generator().manual_seed(bits)
    out_features, in_features = 48, 96
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=g)
    zeros = torch.randint(zero_offset, 1 << bits, (in_features // GROUP, out_features), generator=g)  # any zero
    packed = gptq_tensors(codes, zeros, torch.ones(zeros.shape), bits, zero_offset)
    assert packed["qweight"].shape == (in_features * bits // 32, out_features)
    assert torch.equal(peers.unpack_gptq_qweight(packed["qweight"], bits, in_features), codes)
    assert torch.equal(peers.unpack_gptq_qzeros(packed["qzeros"], bits, out_features, zero_offset), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_quantized_unpacks(bits):
    g = torch.Generator().manual_seed(10 + bits)
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (40, 70), generator=g)  # 70: a partial last word
    packed = pack_bits(signed + (1 << (bits - 1)), bits)
    assert packed.shape == (40, math.ceil(70 * bits / 32))
    assert torch.equal(peers.unpack_pack_quantized(packed, bits, 70), signed)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_quantized_matches_compressed_tensors_own_packing(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (16, 96), generator=torch.Generator().manual_seed(bits))
    packed = helpers.pack_to_int32(signed.to(torch.int8), bits)
    assert torch.equal(peers.unpack_pack_quantized(packed, bits, 96), signed)


def test_dequantize_gptq_uses_g_idx():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (8, 64), generator=g)
    zeros = torch.full((2, 8), 4)
    scales = torch.rand(2, 8, generator=g, dtype=torch.float64) + 0.5
    g_idx = torch.randint(0, 2, (64,), generator=g)  # act-order style: groups not contiguous
    packed = gptq_tensors(codes, zeros, scales, 3, 1)
    got = peers.dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], 3, GROUP, 1, g_idx)
    want = (codes - zeros[g_idx].t()).double() * packed["scales"].double()[g_idx].t()
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny Qwen3-VL-MoE (2 layers x 8 experts, hidden 64, experts' intermediate 32) with its processor."""
    path = tmp_path_factory.mktemp("peers-original")
    tiny.tiny_model(seed=1).save_pretrained(path)
    tiny.build_processor().save_pretrained(path)
    return path


def expert_names(original_dir: Path) -> list[tuple[str, int, int, int]]:
    """(set name, experts, hidden, intermediate) of every fused expert set in the saved original."""
    state = load_file(str(original_dir / "model.safetensors"))
    sets = []
    for key, value in state.items():
        if key.endswith(".experts.gate_up_proj"):
            count, two_inter, hidden = value.shape
            sets.append((key[: -len(".gate_up_proj")], count, hidden, two_inter // 2))
    return sorted(sets)


def write_peer(original_dir: Path, path: Path, layout: str, bits: int = 3, quantize_attention: bool = False) -> dict:
    """A synthetic peer checkpoint of the original: every expert matrix as random codes + fp16/bf16 scales in
    `layout`; returns {module name: float64 dequantized weight [out, in]} for the test to compare with."""
    g = torch.Generator().manual_seed(7)
    state = load_file(str(original_dir / "model.safetensors"))
    config = json.loads((original_dir / "config.json").read_text())
    expected: dict[str, torch.Tensor] = {}

    def add(prefix: str, out_features: int, in_features: int) -> None:
        groups = in_features // GROUP
        codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=g)
        zero = 1 << (bits - 1)  # symmetric
        if layout == "pack-quantized":
            scale = (torch.rand(out_features, groups, generator=g) / 8 + 1e-3).to(torch.bfloat16)
            state[f"{prefix}.weight_packed"] = pack_bits(codes, bits)
            state[f"{prefix}.weight_scale"] = scale
            state[f"{prefix}.weight_shape"] = torch.tensor([out_features, in_features])
            expected[prefix] = (codes - zero).double() * scale.double().repeat_interleave(GROUP, dim=1)
        else:
            scale = (torch.rand(groups, out_features, generator=g) / 8 + 1e-3).half()
            offset = 1 if layout == "gptq" else 0
            zeros = torch.full((groups, out_features), zero)
            state.update({f"{prefix}.{k}": v for k, v in gptq_tensors(codes, zeros, scale, bits, offset).items()})
            if layout == "gptq":  # GPTQModel also stores g_idx
                state[f"{prefix}.g_idx"] = (torch.arange(in_features) // GROUP).to(torch.int32)
            expected[prefix] = (codes - zero).double() * scale.double().repeat_interleave(GROUP, dim=0).t()

    if layout != "dense-fused":
        for name, count, hidden, inter in expert_names(original_dir):
            del state[f"{name}.gate_up_proj"], state[f"{name}.down_proj"]
            for e in range(count):
                add(f"{name}.{e}.gate_proj", inter, hidden)
                add(f"{name}.{e}.up_proj", inter, hidden)
                add(f"{name}.{e}.down_proj", hidden, inter)
    if quantize_attention:
        prefix = "model.language_model.layers.0.self_attn.q_proj"
        out_features, in_features = state.pop(f"{prefix}.weight").shape
        add(prefix, out_features, in_features)
    if layout == "pack-quantized":
        weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}
        quant = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                 "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    else:
        quant = {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "sym": True, "desc_act": False,
                 "checkpoint_format": "gptq" if layout == "gptq" else "gptq_v2"}
    config["quantization_config"] = quant
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return expected


def fused_reference(original_dir: Path, expected: dict) -> dict[str, torch.Tensor]:
    """The fused [E, 2I, H] / [E, H, I] tensors the export must hold, from the float64 dequantization."""
    out = {}
    for name, count, _, _ in expert_names(original_dir):
        out[f"{name}.gate_up_proj"] = torch.stack(
            [torch.cat([expected[f"{name}.{e}.gate_proj"], expected[f"{name}.{e}.up_proj"]]) for e in range(count)])
        out[f"{name}.down_proj"] = torch.stack([expected[f"{name}.{e}.down_proj"] for e in range(count)])
    return out


@pytest.mark.parametrize("layout", ["gptq", "gptq_v2", "pack-quantized"])
def test_export_holds_the_float64_dequantization_in_the_fused_layout(original, tmp_path, layout):
    expected = write_peer(original, tmp_path / "peer", layout, quantize_attention=layout == "gptq_v2")
    report = peers.export_peer(tmp_path / "peer", original, tmp_path / "out", 3, GROUP)
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    reference = fused_reference(original, expected)
    assert len(reference) == 4
    for key, want in reference.items():
        assert exported[key].dtype == torch.float32  # the original's dtype
        assert torch.equal(exported[key], want.float()), key
    originals = load_file(str(original / "model.safetensors"))
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    for key, value in originals.items():  # every other weight is the original's (attention: the peer's, dequantized)
        if key not in reference:
            want = expected[q_proj[: -len(".weight")]].float() if layout == "gptq_v2" and key == q_proj else value
            assert torch.equal(exported[key], want), key
    # the model loads back with transformers as the original's class, processor files along
    model = auto_model_class(tmp_path / "out").from_pretrained(str(tmp_path / "out"))
    assert torch.equal(model.model.language_model.layers[1].mlp.experts.down_proj, reference[
        "model.language_model.layers.1.mlp.experts.down_proj"].float())
    assert (tmp_path / "out" / "processor_config.json").exists() and (tmp_path / "out" / "tokenizer.json").exists()
    # bits: payload = codes + scales (16-bit) + zero points; stored also counts g_idx / weight_shape
    experts = report["experts"]
    assert experts["experts"] == 16 and experts["matrices"] == 48 and experts["params"] == 16 * 3 * 64 * 32
    if layout == "pack-quantized":
        assert experts["payload_bits"] == pytest.approx(3 + 16 / GROUP)
        assert experts["stored_bytes"] - experts["payload_bytes"] == 48 * 2 * 8  # weight_shape int64 [2]
    else:
        assert experts["payload_bits"] == pytest.approx(3 + 16 / GROUP + 3 / GROUP)
        g_idx_bytes = 16 * 4 * (64 + 64 + 32) if layout == "gptq" else 0
        assert experts["stored_bytes"] - experts["payload_bytes"] == g_idx_bytes
    assert report["other_quantized"]["count"] == (1 if layout == "gptq_v2" else 0)
    assert json.loads((tmp_path / "out" / "peer_export.json").read_text())["experts"]["payload_bytes"] == experts["payload_bytes"]


def test_fused_experts_left_dense_are_copied(original, tmp_path):
    expected = write_peer(original, tmp_path / "peer", "dense-fused", quantize_attention=True)
    report = peers.export_peer(tmp_path / "peer", original, tmp_path / "out", 3, GROUP)
    exported, originals = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(original / "model.safetensors"))
    for name, *_ in expert_names(original):
        assert torch.equal(exported[f"{name}.gate_up_proj"], originals[f"{name}.gate_up_proj"])
    assert report["experts"]["kinds"] == {"dense (fused)": 48} and report["experts"]["payload_bits"] == 32
    q_proj = "model.language_model.layers.0.self_attn.q_proj"
    assert torch.equal(exported[f"{q_proj}.weight"], expected[q_proj].float())


@pytest.mark.parametrize("layout", ["gptq", "pack-quantized"])
def test_a_missing_expert_raises_and_writes_nothing(original, tmp_path, layout):
    write_peer(original, tmp_path / "peer", layout)
    state = load_file(str(tmp_path / "peer" / "model.safetensors"))
    last = "model.language_model.layers.1.mlp.experts.7.down_proj."
    save_file({k: v for k, v in state.items() if not k.startswith(last)}, str(tmp_path / "peer" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts: 1 of 24 expert matrices are missing .*experts\.7\.down_proj"):
        peers.export_peer(tmp_path / "peer", original, tmp_path / "out", 3, GROUP)
    assert not (tmp_path / "out").exists()


def test_wrong_width_or_group_or_extra_experts_raise(original, tmp_path):
    write_peer(original, tmp_path / "peer", "gptq")
    with pytest.raises(CheckpointError, match=r"declares .*\(3, 32\).*not \(4, 32\)"):
        peers.export_peer(tmp_path / "peer", original, tmp_path / "out", 4, GROUP)
    state = load_file(str(tmp_path / "peer" / "model.safetensors"))
    first = "model.language_model.layers.0.mlp.experts.0.gate_proj."
    state.update({k.replace(".experts.0.", ".experts.8."): v.clone() for k, v in list(state.items()) if k.startswith(first)})
    save_file(state, str(tmp_path / "peer" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts \[8\] but the original model has 8"):
        peers.export_peer(tmp_path / "peer", original, tmp_path / "out", 3, GROUP)


def test_a_v1_checkpoint_read_as_v2_is_caught(original, tmp_path):
    """The symmetric zero-point check catches the GPTQ version (zero offset) being wrong."""
    write_peer(original, tmp_path / "peer", "gptq")
    config = json.loads((tmp_path / "peer" / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (tmp_path / "peer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="symmetric zero points are not all 4"):
        peers.export_peer(tmp_path / "peer", original, tmp_path / "out", 3, GROUP)


# ------------------------------------------------------------------------------------------------ run_in_venv


def fake_venv(root: Path, name: str, body: str) -> None:
    """A venv that setup.sh takes as built (its marker file) whose python is a bash script standing in for the peer."""
    (root / name / "bin").mkdir(parents=True)
    (root / name / ".peer-ready").write_text("peer=fake\n")
    python = root / name / "bin" / "python"
    python.write_text("#!/usr/bin/env bash\n" + body)
    python.chmod(0o755)


def test_run_in_venv_exports_what_the_peer_saved(original, tmp_path, monkeypatch):
    expected = write_peer(original, tmp_path / "made", "gptq")
    fake_venv(tmp_path / "venvs", "gptqmodel", 'while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done\n'
              'mkdir -p "$out" && cp "$FAKE_PEER"/* "$out"/ && echo \'{"peer": "gptqmodel"}\' > "$out/peer_run.json"\n')
    monkeypatch.setenv("FAKE_PEER", str(tmp_path / "made"))
    calibration = peers.write_calibration(tiny.calibration_samples(4, text_only_every=2), tmp_path / "calibration")
    lines = [json.loads(line) for line in calibration.read_text().splitlines()]
    assert [line["image"] is None for line in lines] == [False, True, False, True] and Path(lines[0]["image"]).exists()
    report = peers.run_in_venv("gptqmodel", original, calibration, 3, GROUP, tmp_path / "run", tmp_path / "venvs")
    assert report["out"] == str(tmp_path / "run" / "export") and report["peer_run"] == {"peer": "gptqmodel"}
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(load_file(str(tmp_path / "run" / "export" / "model.safetensors"))[key],
                       fused_reference(original, expected)[key].float())


def test_run_in_venv_raises_the_peers_own_error(original, tmp_path):
    fake_venv(tmp_path / "venvs", "autoround", 'echo "ValueError: the peer says why" >&2; exit 3\n')
    with pytest.raises(peers.PeerError, match=r"(?s)exit 3.*ValueError: the peer says why"):
        peers.run_in_venv("autoround", original, tmp_path / "c.jsonl", 3, GROUP, tmp_path / "run", tmp_path / "venvs")
    (tmp_path / "not-a-dir").write_text("")  # setup.sh cannot make its venv root: it fails before any install
    with pytest.raises(peers.PeerError, match=r"(?s)setup.sh failed \(exit 1\).*not-a-dir"):
        peers.run_in_venv("autoround", original, tmp_path / "c.jsonl", 3, GROUP, tmp_path / "run", tmp_path / "not-a-dir")
    with pytest.raises(peers.PeerError, match="no venv peer 'hqq'"):
        peers.run_in_venv("hqq", original, tmp_path / "c.jsonl", 3, GROUP, tmp_path / "run", tmp_path / "venvs")


def test_the_peer_runner_resolves_group_sizes_as_mode_hf_does():
    """benchmarks/peers/run_peer.py runs in the peers' venvs without mode-hf and carries its own copy of the group
    size fallback (llm-compressor needs it given explicitly): it must give the groups mode-hf gives."""
    import importlib.util

    from mode_hf.algo.quantize import resolve_group_size

    spec = importlib.util.spec_from_file_location("run_peer", Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "run_peer.py")
    run_peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_peer)
    for k in (20, 32, 96, 128, 768, 2048, 7):
        for group in (16, 32, 64, 128):
            assert run_peer.resolve_group_size(k, group) == resolve_group_size(k, group), (k, group)
