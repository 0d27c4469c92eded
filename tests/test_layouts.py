"""Layout adapters, token routes and dense_bits on small hand-built modules and the tiny Qwen3-VL-MoE: canonical
views against the stored tensors, the Llama4 calling convention against its definition, refusals that name the
module, and packed linears against an independent float64 round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText

import mode_hf
import tiny
from mode_hf.model import layouts as experts
from mode_hf.model import structure
from mode_hf.model.packed import PackedExperts, PackedLinear
from mode_hf.algo.quantize import rtn

from conftest import max_abs


class Llama4StyleExperts(nn.Module):
    """Llama4's convention: transposed weights, called with x [E * T, H] whose rows are score-scaled inputs."""

    def __init__(self, num_experts: int = 4, hidden: int = 8, intermediate: int = 6) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, hidden, 2 * intermediate))
        self.down_proj = nn.Parameter(torch.randn(num_experts, intermediate, hidden))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.view(self.gate_up_proj.shape[0], -1, self.gate_up_proj.shape[1])  # [E, T, H]
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(up * self.act_fn(gate), self.down_proj).view(-1, x.shape[-1])


class StrangeExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(4, 8, 6))
        self.w2 = nn.Parameter(torch.zeros(4, 6, 8))


def routed_input(num_experts: int, tokens: int, hidden: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator)
    logits = torch.randn(tokens, num_experts, generator=generator)
    top = logits.topk(k, dim=1)
    scores = torch.zeros_like(logits).scatter(1, top.indices, torch.sigmoid(top.values))  # [T, E], 0 off the top-k
    return h, scores, h.repeat(num_experts, 1) * scores.T.reshape(-1, 1)  # x [E * T, H]


@pytest.mark.parametrize("k", [1, 2])
def test_dense_routed_call_recovers_the_routing(k):
    module = Llama4StyleExperts()
    (found,) = structure.find_expert_sets(nn.ModuleDict({"experts": module}))
    assert found.layout is experts.DENSE_ROUTED and found.shape == (4, 8, 6)
    h, scores, x = routed_input(4, 5, 8, k)
    inputs, index, weights = found.layout.call(module, (x,), {})
    assert index.shape == (5, k) and torch.equal(weights, torch.ones(5, k))
    for t in range(5):
        assert sorted(index[t].tolist()) == sorted(scores[t].nonzero().squeeze(1).tolist())
        for slot, e in enumerate(index[t].tolist()):
            torch.testing.assert_close(inputs[t, slot], scores[t, e] * h[t])


def test_canonical_weights_of_transposed_layouts():
    module = Llama4StyleExperts()
    gate_up, down = experts.DENSE_ROUTED.weights(module)
    assert torch.equal(gate_up[2], module.gate_up_proj[2].T) and torch.equal(down[1], module.down_proj[1].T)
    native = experts.DENSE_ROUTED.native(gate_up, down)
    assert torch.equal(native["gate_up_proj"], module.gate_up_proj) and torch.equal(native["down_proj"], module.down_proj)


def test_packed_dense_routed_matches_the_module_with_quantized_weights():
    module = Llama4StyleExperts()
    (found,) = structure.find_expert_sets(nn.ModuleDict({"experts": module}))
    bits = [2, 3, 4, 8]
    packed = PackedExperts(module, found.layout, bits, group_size=4)
    gate_up, down = found.layout.weights(module)
    for e, b in enumerate(bits):
        packed.set_expert("gate_up_proj", e, rtn(gate_up[e].detach(), b, 4))
        packed.set_expert("down_proj", e, rtn(down[e].detach(), b, 4))
    reference = packed.dequantize()
    assert type(reference) is Llama4StyleExperts and reference.gate_up_proj.shape == module.gate_up_proj.shape
    _, _, x = routed_input(4, 7, 8, 1, seed=2)
    with torch.no_grad():
        expected = reference(x)
        got = packed(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.abs().sum() > 0


def test_unknown_layout_names_module_class_and_expectation():
    model = nn.ModuleDict({"block": nn.ModuleDict({"experts": StrangeExperts()})})
    with pytest.raises(mode_hf.UnsupportedModelError) as error:
        structure.find_expert_sets(model)
    message = str(error.value)
    assert "'block.experts'" in message and "StrangeExperts" in message and "gate_up_proj" in message
    assert "modules_to_not_convert" in message


def test_dense_bits_rejects_other_widths():
    with pytest.raises(mode_hf.ModeConfigError, match="dense_bits=3"):
        mode_hf.ModeConfig(dense_bits=3, method="uniform", avg_bits=4, quantizer="rtn")


@pytest.fixture(scope="module")
def dense_quantized(base_dir, processor, samples):
    config = mode_hf.ModeConfig(
        avg_bits=3.0, group_size=16, calibration=samples, processor=processor, batch_size=4, dense_bits=8, quantizer="rtn"
    )
    return AutoModelForImageTextToText.from_pretrained(base_dir, quantization_config=config)


def test_dense_bits_quantizes_attention_with_rtn(dense_quantized, base_dir):
    original = AutoModelForImageTextToText.from_pretrained(base_dir)
    dense_map = dense_quantized.config.quantization_config.dense_map
    attention = [n for n, m in original.named_modules() if isinstance(m, nn.Linear) and ".self_attn." in n and "visual" not in n]
    assert sorted(dense_map) == sorted(attention) and set(dense_map.values()) == {8}
    for name in attention:
        packed, linear = dense_quantized.get_submodule(name), original.get_submodule(name)
        assert isinstance(packed, PackedLinear)
        weight = linear.weight.detach().double()
        # float64 round-to-nearest with the same group parameters: every weight within half a step of the original
        groups = weight.reshape(weight.shape[0], -1, packed.group_size)
        step = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 255  # [O, G]
        error = (packed.dequantized_weight(torch.float64) - weight).reshape_as(groups).abs()
        assert bool((error <= step[..., None] * 0.5 + 1e-3 * step[..., None] + 1e-12).all())
    for name in ("lm_head", "model.language_model.layers.0.mlp.gate"):
        assert not isinstance(dense_quantized.get_submodule(name), PackedLinear)
    summary = dense_quantized.config.quantization_config.summary
    assert summary["dense"]["linears"] == len(attention) and 8 < summary["dense"]["effective_bits"] < 10


def test_dense_bits_save_reload_and_dequantize(dense_quantized, eval_batch, tmp_path):
    dense_quantized.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = dense_quantized(**eval_batch).logits
        reloaded = mode_hf.from_pretrained(tmp_path)
        assert max_abs(reloaded(**eval_batch).logits, expected) == 0.0
        restored = reloaded.dequantize()
        assert not any(isinstance(m, (PackedLinear, PackedExperts)) for m in restored.modules())
        assert max_abs(restored(**eval_batch).logits, expected) < 1e-4


def test_reload_refuses_missing_dense_linear(dense_quantized, tmp_path):
    config = dense_quantized.config.quantization_config
    broken = mode_hf.ModeConfig.from_dict({**config.to_dict(), "dense_map": {"model.language_model.layers.0.nope": 8}})
    model = tiny.tiny_model()
    from mode_hf.hf.quantizer import swap_in_packed

    with pytest.raises(mode_hf.UnsupportedModelError, match="layers.0.nope"):
        swap_in_packed(model, broken)


class NewFamilyExperts(nn.Module):
    """A family mode-hf has never seen, in the standard fused layout: found and packed with no code change."""

    def __init__(self, num_experts: int = 3, hidden: int = 8, intermediate: int = 4) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden, intermediate))
        self.act_fn = nn.GELU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        output = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for slot, e in enumerate(top_k_index[t].tolist()):
                gate, up = (self.gate_up_proj[e] @ hidden_states[t]).chunk(2)
                output[t] += top_k_weights[t, slot] * (self.down_proj[e] @ (self.act_fn(gate) * up))
        return output


def test_a_new_family_in_the_standard_layout_needs_no_code_change():
    module = NewFamilyExperts()
    (found,) = structure.find_expert_sets(nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"experts": module})])}))
    assert found.layout is experts.FUSED and found.name == "layers.0.experts"
    packed = PackedExperts(module, found.layout, [8, 8, 8], group_size=8)
    for e in range(3):
        packed.set_expert("gate_up_proj", e, rtn(module.gate_up_proj[e].detach(), 8, 8))
        packed.set_expert("down_proj", e, rtn(module.down_proj[e].detach(), 8, 8))
    x, index = torch.randn(5, 8), torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    weights = torch.rand(5, 2)
    with torch.no_grad():
        torch.testing.assert_close(packed(x, index, weights), packed.dequantize()(x, index, weights), rtol=1e-5, atol=1e-5)
        assert max_abs(packed(x, index, weights), module(x, index, weights)) < 0.05 * module(x, index, weights).abs().max()
