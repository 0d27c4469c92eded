"""The vLLM plugin: serve mode checkpoints (per-expert widths 2/3/4/8, as `save_pretrained` writes them) with
`vllm.LLM(model=<mode checkpoint>)`.

vLLM loads `register` from the `vllm.general_plugins` entry point in every process it starts. It registers the
quantization method "mode" (config.json's `quant_method`):

- `ModeVllmConfig` keeps the checkpoint's bit map and dense map, renamed to vLLM's module names
  (`apply_vllm_mapper`: Qwen3-VL's `model.language_model.` -> `language_model.model.`);
- `ModeMoEMethod` holds, for each routed-expert layer, this rank's experts in mode-hf's own `PackedExperts` (its
  buffers registered as the layer's parameters, filled from the checkpoint's `{proj}_{qweight,scales,zeros}_{b}bit`
  tensors by a loader of the layer's own) and computes the routed experts with it (`PackedExperts.expert_outputs`):
  the native CPU kernels on CPU, the Triton kernels of `mode_hf.gpu` on CUDA with triton installed, the torch path
  otherwise;
- `ModeLinearMethod` does the same for `dense_bits` linears (`PackedLinear`); other linears stay unquantized.

Tensor parallelism: each rank holds its slice of every expert's intermediate dimension (gate and up rows
`[r * I_p, (r + 1) * I_p)`, down's input columns, packed bytes and groups alike), which needs I_p to be a multiple
of 8 codes and of down's group size; expert parallelism (`enable_expert_parallel`): each rank holds its experts
whole (vLLM's expert map), routed ids outside it contribute nothing, and vLLM sums the partial outputs of the
ranks either way. EPLB (redundant experts) is refused.

vLLM pins transformers below the version mode-hf needs, so the plugin runs in vLLM's own environment with mode-hf
installed there without dependencies (`pip install --no-deps mode-hf`); `import mode_hf` works with vLLM's
transformers, and nothing here needs cvxpy.
"""

from __future__ import annotations

import re
import types
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, MoEActivation, RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.models.utils import WeightsMapper

from ..algo.quantize import resolve_group_size
from ..hf.guard import HINT_KEY
from ..model.layouts import FUSED, GatedActivation
from ..model.packed import PackedExperts, PackedLinear
from . import vllm_qwen3_vl

QUANT_METHOD = "mode"
FORMAT_VERSION = 2  # the newest checkpoint format this plugin reads (mode_hf.config.FORMAT_VERSION)
PACKED_EXPERT_TENSOR = re.compile(r"^(?P<proj>gate_up_proj|down_proj)_(?P<kind>qweight|scales|zeros)_(?P<bits>\d+)bit$")
GUARDS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")  # mode_hf.hf.guard: 1-D tensors for plain transformers
_registered = False
# this process's mode layers by key, for the custom ops below: vLLM compiles the model with torch.compile
# (fullgraph: a graph break is an error), and the packed forward (data-dependent routing, native kernels on raw
# pointers) is opaque to it only as a custom op
_LAYERS: dict[str, tuple[Any, nn.Module]] = {}


@torch.library.custom_op("mode_hf::vllm_routed_experts", mutates_args=())
def _routed_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, key: str) -> torch.Tensor:
    method, layer = _LAYERS[key]
    return method.forward(layer, x, topk_weights, topk_ids)


@_routed_experts.register_fake
def _(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, key: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("mode_hf::vllm_packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, key: str) -> torch.Tensor:
    return _LAYERS[key][1].mode_packed(x)


@_packed_linear.register_fake
def _(x: torch.Tensor, key: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _LAYERS[key][1].mode_packed.out_features))


def register() -> None:
    """The `vllm.general_plugins` entry point: register quantization method "mode", and let Qwen3-VL models run
    where torchvision cannot be imported (`mode_hf.serve.vllm_qwen3_vl`); idempotent."""
    global _registered
    if not _registered:
        register_quantization_config(QUANT_METHOD)(ModeVllmConfig)
        vllm_qwen3_vl.apply()
        _registered = True


def _tail(name: str) -> str:
    """`name` from its decoder-layer index on (`layers.3.self_attn.q_proj`): the same in transformers' and vLLM's
    module names, whatever prefix each puts before it."""
    index = name.find("layers.")
    return name[index:] if index >= 0 else name


class ModeVllmConfig(QuantizationConfig):
    """A mode checkpoint's quantization_config, as vLLM sees it: the bit map and dense map in vLLM's names."""

    def __init__(self, bit_map: dict[str, list[int]], group_size: int, dense_map: dict[str, int] | None) -> None:
        super().__init__()
        self.bit_map = {k: [int(b) for b in v] for k, v in bit_map.items()}
        self.group_size = int(group_size)
        self.dense_map = {k: int(v) for k, v in (dense_map or {}).items()}

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModeVllmConfig":
        version = int(config.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise ValueError(f"this mode checkpoint has format_version {version}; the plugin reads up to "
                             f"{FORMAT_VERSION}: upgrade mode-hf in vLLM's environment.")
        if not config.get("bit_map"):
            raise ValueError("the checkpoint's quantization_config has no bit_map: it is not a mode-hf checkpoint.")
        return cls(config["bit_map"], config["group_size"], config.get("dense_map"))

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        # transformers' module names -> vLLM's; called once per SupportsQuant model class (twice for VL models),
        # so it must be idempotent: a name already in vLLM's form maps to itself
        rename = lambda name: hf_to_vllm_mapper.map_name(name) or name  # noqa: E731
        self.bit_map = {rename(k): v for k, v in self.bit_map.items()}
        self.dense_map = {rename(k): v for k, v in self.dense_map.items()}

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:
        """Checkpoint tensors vLLM must not load: the guard tensors under the replaced weights' names, and the hint."""
        dense = {re.compile(rf"{re.escape(_tail(name))}\.weight$"): None for name in self.dense_map}
        return WeightsMapper(orig_to_new_regex={GUARDS: None, HINT_KEY: None, **dense},
                             orig_to_new_suffix={".g_idx": None})

    def get_quant_method(self, layer: nn.Module, prefix: str) -> Any:
        if isinstance(layer, RoutedExperts):
            if prefix not in self.bit_map:
                raise ValueError(f"mode: the bit map has no entry for vLLM's MoE layer {prefix!r} (it names "
                                 f"{sorted(self.bit_map)[:2]}...): the checkpoint does not match this model.")
            return ModeMoEMethod(layer.moe_config, self.bit_map[prefix], self.group_size, prefix)
        if isinstance(layer, LinearBase):
            width = _fused_width(prefix, self.dense_map, self.packed_modules_mapping or {})
            return UnquantizedLinearMethod() if width is None else ModeLinearMethod(width, self.group_size, prefix)
        return None


def _fused_width(prefix: str, dense_map: dict[str, int], packed_modules: dict[str, list[str]]) -> int | None:
    """The `dense_bits` width of vLLM linear `prefix` (a fused qkv_proj / gate_up_proj takes its members'), or None
    for a linear the checkpoint keeps 16-bit.

    Raises:
        ValueError: the members of a fused linear are not all packed at one width.
    """
    parent, _, name = prefix.rpartition(".")
    members = [f"{parent}.{m}" for m in packed_modules.get(name, [name])]
    widths = {dense_map.get(m) for m in members}
    if widths == {None}:
        return None
    if None in widths or len(widths) > 1:
        raise ValueError(f"mode: vLLM fuses {members} into {prefix}, but the checkpoint packs them at {widths}.")
    return widths.pop()


def _shell(num_experts: int, hidden: int, intermediate: int) -> nn.Module:
    """A weightless stand-in for a fused SiLU experts module of this rank's shape, for `PackedExperts`."""
    shell = nn.Module()
    shell.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, device="meta"), requires_grad=False)
    shell.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate, device="meta"), requires_grad=False)
    shell.act_fn = F.silu
    return shell


class ModeMoEMethod(FusedMoEMethodBase):
    """One routed-expert layer: this rank's experts in a `PackedExperts` whose buffers are the layer's parameters."""

    def __init__(self, moe: Any, bits: list[int], group_size: int, prefix: str) -> None:
        super().__init__(moe)
        self.bits, self.group_size, self.prefix = [int(b) for b in bits], group_size, prefix

    def create_weights(self, layer: Any, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        moe = self.moe
        if len(self.bits) != moe.num_logical_experts:
            raise ValueError(f"mode: {self.prefix} has {moe.num_logical_experts} experts, its bit map {len(self.bits)}.")
        if moe.num_experts != moe.num_logical_experts:
            raise NotImplementedError("mode: redundant experts (EPLB) are not supported; turn EPLB off.")
        if layer.activation != MoEActivation.SILU:
            raise NotImplementedError(f"mode: MoE activation {layer.activation} (only SiLU-gated experts are supported).")
        full, part = moe.intermediate_size, intermediate_size_per_partition
        down_group = resolve_group_size(full, self.group_size)
        if part != full and (part % 8 or part % down_group):
            raise ValueError(f"mode: {self.prefix}: the intermediate size per tensor-parallel rank ({part}) must be a "
                             f"multiple of 8 and of the down projection's group size {down_group}; use fewer ranks.")
        self.full, self.part, self.rank = full, part, moe.moe_parallel_config.tp_rank
        local = [int(e) for e in layer.expert_map_manager.get_local_expert_ids()]  # global ids, in local order
        self.packed = PackedExperts(_shell(len(local), hidden_size, part), FUSED, [self.bits[e] for e in local], self.group_size)
        self.packed.activation = GatedActivation(F.silu)
        if self.packed.group_sizes["down_proj"] != down_group:
            raise ValueError(f"mode: {self.prefix}: a rank's down projection would group by "
                             f"{self.packed.group_sizes['down_proj']}, the checkpoint by {down_group}; use fewer ranks.")
        for name, buffer in self.packed.named_buffers():  # the same memory: vLLM sees and places them
            layer.register_parameter(f"mode_{name}", nn.Parameter(buffer, requires_grad=False))
        self.key = f"{self.prefix}@{id(self)}"
        _LAYERS[self.key] = (self, layer)
        # checkpoint row j of a width-b tensor is the j-th expert of width b, in global order
        self.rows = {b: [e for e, w in enumerate(self.bits) if w == b] for b in set(self.bits)}
        self.position = {e: i for i, e in enumerate(local)}
        self.loaded: set[str] = set()
        original, method = layer.load_weights, self

        def load_weights(self_layer: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[str]:
            rest = []
            for name, tensor in weights:
                match = PACKED_EXPERT_TENSOR.match(name.rpartition(".")[2])
                if match is None:
                    rest.append((name, tensor))
                else:
                    yield method.load(match["proj"], match["kind"], int(match["bits"]), tensor)
            if rest:
                yield from original(rest)

        # RoutedExperts.load_weights would take `gate_up_proj_qweight_4bit` for a fused 16-bit tensor (a substring
        # match), transpose and chunk it: this layer gets a loader of its own for the packed tensors
        layer.load_weights = types.MethodType(load_weights, layer)

    def load(self, proj: str, kind: str, bits: int, tensor: torch.Tensor) -> str:
        """Copy this rank's slice of every local expert of a checkpoint tensor [E_b, O, ...] into place."""
        name = f"{proj}_{kind}_{bits}bit"
        rows = self.rows.get(bits, [])
        if tensor.shape[0] != len(rows):
            raise ValueError(f"mode: {self.prefix}.{name} holds {tensor.shape[0]} experts, the bit map {len(rows)}: "
                             "the checkpoint does not match its config.")
        target = getattr(self.packed, name, None)  # None: no expert of this width on this rank
        for j, expert in enumerate(rows):
            if target is not None and expert in self.position:
                target[self.packed.slot[self.position[expert]]].copy_(self._slice(proj, kind, bits, tensor[j]))
        self.loaded.add(name)
        return f"mode_{name}"

    def _slice(self, proj: str, kind: str, bits: int, expert: torch.Tensor) -> torch.Tensor:
        """This tensor-parallel rank's part of one expert's tensor (all of it without TP)."""
        if self.part == self.full:
            return expert
        lo, hi = self.rank * self.part, (self.rank + 1) * self.part
        if proj == "gate_up_proj":  # gate rows [0, I), up rows [I, 2I): rank r takes [lo, hi) of each half
            return torch.cat([expert[lo:hi], expert[self.full + lo : self.full + hi]])
        if kind == "qweight":  # down's K is the intermediate dim: 8 codes take `bits` bytes
            return expert[:, lo // 8 * bits : hi // 8 * bits]
        group = self.packed.group_sizes["down_proj"]
        return expert[:, lo // group : hi // group]

    def process_weights_after_loading(self, layer: Any) -> None:
        _share_parameters(self.packed, layer, "mode_")
        expected = {f"{proj}_{kind}_{b}bit" for proj in ("gate_up_proj", "down_proj") for kind in ("qweight", "scales", "zeros")
                    for b in self.rows}
        if expected - self.loaded:  # vLLM does not check what a quantized model loaded
            raise ValueError(f"mode: {self.prefix} is missing checkpoint tensors {sorted(expected - self.loaded)}.")

    def get_fused_moe_quant_config(self, layer: Any) -> None:
        return None

    def apply(self, layer: Any, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts: Any = None, shared_experts_input: Any = None) -> torch.Tensor:
        """This rank's routed output [T, H] (vLLM sums the ranks' and adds shared experts)."""
        return torch.ops.mode_hf.vllm_routed_experts(x, topk_weights, topk_ids, self.key)

    def forward(self, layer: Any, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """`apply`'s computation, run eagerly inside the custom op."""
        expert_map = layer.expert_map
        local = topk_ids.long() if expert_map is None else expert_map[topk_ids.long()].long()  # [T, k]; -1: another rank
        token, slot = (local >= 0).nonzero(as_tuple=True)  # [P]
        weight = topk_weights[token, slot].to(torch.float32)[:, None]  # [P, 1]
        states = x[token]  # [P, H]
        if layer.apply_router_weight_on_input:
            states, weight = (states.float() * weight).to(x.dtype), torch.ones_like(weight)
        routed = self.packed.expert_outputs(states, local[token, slot]).float() * weight  # [P, H]
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, routed).to(x.dtype)


class ModeLinearMethod(LinearMethodBase):
    """One `dense_bits` linear (vLLM's fused qkv_proj / gate_up_proj included): a `PackedLinear` of this rank's
    rows and columns, its buffers the layer's parameters, loaded by vLLM's own loaders."""

    def __init__(self, bits: int, group_size: int, prefix: str) -> None:
        self.bits, self.group_size, self.prefix = bits, group_size, prefix

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        group = resolve_group_size(input_size, self.group_size)
        part = input_size_per_partition
        if part != input_size and (part % 8 or part % group):
            raise ValueError(f"mode: {self.prefix}: the input size per tensor-parallel rank ({part}) must be a multiple "
                             f"of 8 and of its group size {group}; use fewer ranks.")
        packed = PackedLinear(nn.Linear(part, sum(output_partition_sizes), bias=False, device="meta"), self.bits, group)
        object.__setattr__(layer, "mode_packed", packed)  # not a submodule: its buffers are the layer's parameters
        self.key = f"{self.prefix}@{id(self)}"
        _LAYERS[self.key] = (self, layer)
        for name, buffer in packed.named_buffers():
            parameter = nn.Parameter(buffer, requires_grad=False)
            parameter.output_dim, parameter.input_dim = 0, 1  # vLLM's v1 loaders narrow and place rows by these
            parameter.weight_loader = extra_weight_attrs["weight_loader"]
            layer.register_parameter(name, parameter)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _share_parameters(layer.mode_packed, layer, "")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ops.mode_hf.vllm_packed_linear(x, self.key)
        return y if bias is None else y + bias


def _share_parameters(packed: nn.Module, layer: nn.Module, prefix: str) -> None:
    """Point `packed`'s buffers at the layer's loaded parameters of the same names (they share memory from
    `create_weights` on; this keeps it so if vLLM moved or replaced a parameter in between)."""
    for name, _ in list(packed.named_buffers(recurse=False)):
        packed._buffers[name] = getattr(layer, prefix + name).data
