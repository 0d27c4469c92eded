"""Export a mode checkpoint as a compressed-tensors "pack-quantized" checkpoint, the format vLLM and SGLang serve.

Serving engines run one kernel per MoE layer, so all experts of a layer must share a width (widths may differ
between layers): the export takes checkpoints allocated with `scope="layer_uniform"` and refuses per-expert
allocations. It also needs `symmetric=True`: compressed-tensors' symmetric int format stores codes minus zero
point as signed integers without a zero point, which is what transformers' loader decompresses for fused experts
and what vLLM's WNA16 MoE kernels take. The values are copied, not re-quantized: every exported weight dequantizes
to exactly the mode model's weight (scales stay float16, or float32 for a float32 model).

Layout written (names as the model's own checkpoints spell them; experts unfused, one linear per expert):

    <experts prefix>.<e>.<gate>.weight_packed   int32 [O, ceil(K * bits / 32)]   dense little-endian bit stream
    <experts prefix>.<e>.<gate>.weight_scale    float16 [O, K / group_size]
    <experts prefix>.<e>.<gate>.weight_shape    int64 [2] = (O, K)
    ... the same for <up> and <down>; dense linears quantized with `dense_bits` the same way (+ their bias).

`<gate>/<up>/<down>` come from the model's transformers conversion mapping (`gate_proj`/`up_proj`/`down_proj`,
Mixtral's `w1`/`w3`/`w2`); config.json's quantization_config has one config group per (width, group size) whose
`re:` targets name the layers (their tails from the decoder layers on, which survive engines' renaming:
`engine_target`); config keys engines need are added (`mode_hf.hf.engines`). compressed-tensors is an optional dependency (`pip install mode-hf[export]`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..algo.packing import unpack
from ..algo.quantize import resolve_group_size
from ..errors import ExportError
from ..model.structure import find_expert_sets
from .atomic import atomic_directory
from .engines import add_engine_config_keys, vllm_support
from .guard import EXPERT_WEIGHTS, write_decoy

logger = logging.getLogger(__name__)
FORMATS = ("compressed-tensors",)
SHARD_BYTES = 4 << 30
PACKED_KEY = re.compile(r"^(?P<prefix>.+)\.gate_up_proj_qweight_(?P<bits>\d)bit$")
WEIGHT_FILES = re.compile(r"^(model|pytorch_model).*\.(safetensors|bin|json)$")
# Families whose checkpoints store fused experts, where serving engines read per-expert linears with these names
# (transformers 5.2x cannot load a per-expert checkpoint of them back: its conversion only knows the fused layout).
PER_EXPERT_ONLY_IN_ENGINES = {"qwen3_vl_moe": ("gate_proj", "up_proj", "down_proj")}


@dataclass(frozen=True)
class ExpertNames:
    """Per-expert linear names in the family's checkpoints, and whether transformers loads them back."""

    gate: str
    up: str
    down: str
    transformers_loads: bool


def expert_names(model: torch.nn.Module) -> ExpertNames:
    """Per-expert linear names from the model's transformers conversion mapping (the merge of `experts.*.X.weight`
    and `experts.*.Y.weight` into `experts.gate_up_proj`).

    Raises:
        ExportError: the family's checkpoints have no per-expert layout mode-hf knows.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    names: dict[str, list[str]] = {}
    for transform in get_model_conversion_mapping(model):
        if not isinstance(transform, WeightConverter):
            continue
        targets = transform._original_target_patterns
        if len(targets) == 1 and targets[0].endswith(("experts.gate_up_proj", "experts.down_proj")):
            per_expert = [re.search(r"experts\.\*\.(\w+)\.weight$", s) for s in transform._original_source_patterns]
            if all(per_expert):
                names[targets[0].rpartition(".")[2]] = [m.group(1) for m in per_expert]
    if len(names.get("gate_up_proj", [])) == 2 and len(names.get("down_proj", [])) == 1:
        (gate, up), (down,) = names["gate_up_proj"], names["down_proj"]
        return ExpertNames(gate, up, down, transformers_loads=True)
    model_type = getattr(model.config, "model_type", "?")
    if model_type in PER_EXPERT_ONLY_IN_ENGINES:
        return ExpertNames(*PER_EXPERT_ONLY_IN_ENGINES[model_type], transformers_loads=False)
    raise ExportError(
        f"compressed-tensors export does not know the per-expert checkpoint names of {model_type!r} models (their "
        "checkpoints keep the experts fused). Supported: families whose transformers checkpoints store "
        "experts.<e>.gate_proj/up_proj/down_proj or w1/w3/w2 (Qwen3-MoE, Qwen3-Omni, GLM-4.5V, OLMoE, DeepSeek-V3, "
        "Kimi, InternVL, Mixtral) and Qwen3-VL-MoE."
    )


def check_exportable(quantization_config: dict[str, Any]) -> dict[str, int]:
    """The width of every expert set; raises ExportError unless the allocation is layer-uniform and symmetric."""
    if quantization_config.get("quant_method") != "mode" or not quantization_config.get("bit_map"):
        raise ExportError("the checkpoint is not a mode-hf checkpoint (no mode bit_map in config.json).")
    bit_map = quantization_config["bit_map"]
    mixed = {name: sorted(set(w)) for name, w in bit_map.items() if len(set(w)) > 1}
    if mixed:
        name, widths = next(iter(mixed.items()))
        raise ExportError(
            f"{len(mixed)} of {len(bit_map)} expert sets mix widths (e.g. {name}: {widths}); serving engines run "
            "one width per MoE layer. Re-solve at the same budget with one width per layer: "
            f"`mode-hf quantize BASE_MODEL --avg-bits {quantization_config.get('avg_bits')} --scope layer_uniform "
            "--symmetric ...` (or `mode-hf export ... --requantize-from BASE_MODEL` does it for you)."
        )
    if not quantization_config.get("symmetric"):
        raise ExportError(
            "the checkpoint was quantized with zero points (symmetric=False); compressed-tensors export needs "
            "symmetric quantization (transformers decompresses MoE experts without zero points, vLLM's WNA16 MoE "
            "kernels are symmetric). Re-quantize with ModeConfig(symmetric=True, scope='layer_uniform') / "
            "`mode-hf quantize --symmetric --scope layer_uniform` (or `mode-hf export ... --requantize-from "
            "BASE_MODEL` does it for you)."
        )
    return {name: widths[0] for name, widths in bit_map.items()}


def compress(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One linear's compressed-tensors tensors (symmetric pack-quantized) from mode codes [O, K] (unsigned, zero
    point 2**(bits-1)) and float16 scales [O, G]."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    middle = 1 << (bits - 1)
    if not bool((zeros == middle).all()):
        raise ExportError(f"zero points other than {middle} in a {bits}-bit weight: it was not quantized symmetrically.")
    signed = (codes.to(torch.int16) - middle).to(torch.int8)  # [O, K] in [-2**(b-1), 2**(b-1) - 1]
    return {
        "weight_packed": pack_to_int32(signed, bits),
        "weight_scale": scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(codes.shape, dtype=torch.int64),
    }


def quantization_config(groups: dict[tuple[int, int], list[str]]) -> dict[str, Any]:
    """config.json's quantization_config: one group per (bits, group size), targeting its linears by `re:`
    patterns (`engine_target`; per-expert names collapsed to one pattern per expert set and linear)."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    config_groups = {
        f"group_{i}": QuantizationScheme(
            targets=sorted(set(names)),
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size),
        )
        for i, ((bits, group_size), names) in enumerate(sorted(groups.items()))
    }
    config = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed")
    return {**config.model_dump(mode="json"), "quant_method": "compressed-tensors", "version": ct_version}


class _Reader:
    """Tensors of a safetensors checkpoint by name, across shards, read one at a time."""

    def __init__(self, directory: Path) -> None:
        self.files = sorted(directory.glob("*.safetensors"))
        if not self.files:
            raise ExportError(f"no .safetensors files in {directory}.")
        self.where: dict[str, Path] = {}
        for path in self.files:
            with safe_open(path, "pt") as f:
                self.where.update({key: path for key in f.keys()})

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(self.where[key], "pt") as f:
            return f.get_tensor(key)


def _checkpoint_name(module_name: str, keys: list[str]) -> str:
    """The checkpoint spelling of a module name (transformers may rename on save, e.g. Mixtral's
    `mlp` -> `block_sparse_moe`): the key with the same numbers and last component."""
    numbers, last = re.findall(r"\d+", module_name), module_name.rpartition(".")[2]
    if module_name in keys:
        return module_name
    found = [k for k in keys if re.findall(r"\d+", k) == numbers and k.rpartition(".")[2] == last]
    if len(found) != 1:
        raise ExportError(f"cannot find {module_name} in the checkpoint ({len(found)} candidates: {found[:3]}).")
    return found[0]


def _expert_tensors(
    reader: _Reader, prefix: str, bits: int, names: ExpertNames, dims: dict[str, int], scale_dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every expert of one layer-uniform set at checkpoint prefix `prefix`; dims: input
    dimension of "gate_up_proj" and "down_proj"."""
    for proj in ("gate_up_proj", "down_proj"):
        if f"{prefix}.{proj}_bias" in reader.where:
            raise ExportError(f"{prefix} has expert biases, which compressed-tensors' per-expert layout cannot carry.")
        qweight, scales, zeros = (reader[f"{prefix}.{proj}_{kind}_{bits}bit"] for kind in ("qweight", "scales", "zeros"))
        for expert in range(qweight.shape[0]):
            codes = unpack(qweight[expert], bits, dims[proj])  # [O, K]
            half = codes.shape[0] // 2  # canonical gate_up: the gate rows, then the up rows
            parts = {names.down: slice(None)} if proj == "down_proj" else {names.gate: slice(0, half), names.up: slice(half, None)}
            for linear, rows in parts.items():
                for key, value in compress(codes[rows], scales[expert, rows], zeros[expert, rows], bits, scale_dtype).items():
                    yield f"{prefix}.{expert}.{linear}.{key}", value


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, indexed: bool = False) -> None:
    """Write tensors into safetensors shards of at most SHARD_BYTES, each as soon as it is full (one shard in
    memory), then name them `model-0000i-of-0000n.safetensors` with an index (or `model.safetensors` alone, unless
    `indexed`)."""
    files: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    total = size = 0

    def flush() -> None:
        path = out / f"shard-{len(files):05d}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        if shard and size + tensor.nbytes > SHARD_BYTES:
            flush()
            size = 0
        shard[name] = tensor.contiguous()
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    if len(files) == 1 and not indexed:
        files[0][0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(files, 1):
        name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        path.rename(out / name)
        weight_map.update(dict.fromkeys(names, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@dataclass(frozen=True)
class SetExport:
    """One layer-uniform expert set: its width, its tensors' prefix in the checkpoint, and its input dims."""

    bits: int
    prefix: str
    hidden: int
    intermediate: int


@dataclass(frozen=True)
class DenseExport:
    """One `dense_bits` linear: its width, its tensors' prefix in the checkpoint, and its input dim."""

    bits: int
    prefix: str
    in_features: int


@dataclass(frozen=True)
class ExportPlan:
    """Everything an export writes, decided before a file is written: the expert sets and dense linears and their
    config groups {(bits, group size): [`re:` target patterns]}."""

    names: ExpertNames
    sets: dict[str, SetExport]
    dense: dict[str, DenseExport]
    groups: dict[tuple[int, int], list[str]]
    scale_dtype: torch.dtype

    @property
    def owned(self) -> tuple[str, ...]:
        """Checkpoint key prefixes whose tensors the export rewrites (everything else is copied as it is)."""
        return tuple(f"{p}." for p in [*(s.prefix for s in self.sets.values()), *(d.prefix for d in self.dense.values())])


def plan_export(checkpoint: Path, config: dict[str, Any], reader: "_Reader") -> ExportPlan:
    """The export plan of a mode checkpoint directory (its config.json already read as `config`).

    Raises:
        ExportError: per-expert widths, zero points or an unknown per-expert layout.
    """
    import transformers

    quant = config.get("quantization_config") or {}
    widths = check_exportable(quant)
    model_config = transformers.AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = getattr(transformers, model_config.architectures[0])._from_config(model_config)
    names = expert_names(model)
    found = {s.name: s for s in find_expert_sets(model, skip=quant.get("modules_to_not_convert") or ())}
    scale_dtype = torch.float32 if str(config.get("torch_dtype", config.get("dtype"))) in ("float32", "torch.float32") else torch.float16
    group_size = int(quant["group_size"])
    packed_prefixes = [m.group("prefix") for k in reader.where if (m := PACKED_KEY.match(k))]
    dense_keys = [k.removesuffix(".qweight") for k in reader.where if k.endswith(".qweight")]
    sets, dense, groups = {}, {}, {}
    for name, bits in widths.items():
        _, hidden, intermediate = found[name].shape
        sets[name] = SetExport(bits, _checkpoint_name(name, packed_prefixes), hidden, intermediate)
    for name, bits in (quant.get("dense_map") or {}).items():
        dense[name] = DenseExport(bits, _checkpoint_name(name, dense_keys), model.get_submodule(name).in_features)
    owned = tuple(f"{p}." for p in [*(s.prefix for s in sets.values()), *(d.prefix for d in dense.values())])
    modules = {k.rpartition(".")[0] for k in reader.where if not k.startswith(owned)}  # the linears left as they are
    for entry in sets.values():
        modules |= {f"{entry.prefix}.{e}.{linear}" for e in range(found_experts(reader, entry)) for linear in (names.gate, names.up, names.down)}
    modules |= {entry.prefix for entry in dense.values()}
    for entry in sets.values():
        for linear, k in ((names.gate, entry.hidden), (names.up, entry.hidden), (names.down, entry.intermediate)):
            pattern = engine_target(entry.prefix, rf"\.\d+\.{linear}", modules)
            groups.setdefault((entry.bits, resolve_group_size(k, group_size)), []).append(pattern)
    for entry in dense.values():
        groups.setdefault((entry.bits, resolve_group_size(entry.in_features, group_size)), []).append(engine_target(entry.prefix, "", modules))
    return ExportPlan(names, sets, dense, groups, scale_dtype)


def found_experts(reader: "_Reader", entry: SetExport) -> int:
    """The number of experts of a set in the checkpoint (rows of its packed tensor)."""
    with safe_open(reader.where[f"{entry.prefix}.gate_up_proj_qweight_{entry.bits}bit"], "pt") as f:
        return f.get_slice(f"{entry.prefix}.gate_up_proj_qweight_{entry.bits}bit").get_shape()[0]


def engine_target(prefix: str, rest: str, modules: set[str]) -> str:
    """The `re:` target of the linears `prefix` + `rest` (a regex), written to survive engines' renaming.

    Engines rename the part of a module name before the decoder layers (vLLM serves Qwen3-VL's
    `model.language_model.layers.3...` as `language_model.model.layers.3...`) and match `re:` targets from the
    start of their own names without mapping them; the part from the decoder-layer container on
    (`layers.3.mlp.experts`) is the same in both. So the target is that tail after any prefix, unless the tail is
    ambiguous in this checkpoint (it would also match another of `modules`): then the exact name.
    """
    parts = prefix.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit() and i > 0]
    exact = re.compile(rf"^{re.escape(prefix)}{rest}$")
    if numbered:
        tail = re.compile(rf"^(?:.*\.)?{re.escape('.'.join(parts[numbered[0] - 1 :]))}{rest}$")
        if {m for m in modules if tail.match(m)} == {m for m in modules if exact.match(m)}:
            return f"re:{tail.pattern}"
    return f"re:{exact.pattern}"


def _export_tensors(reader: "_Reader", plan: ExportPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the export, in order: the untouched ones, then each expert set's, then each dense linear's."""
    yield from ((k, reader[k]) for k in reader.where if not k.startswith(plan.owned))
    for entry in plan.sets.values():
        dims = {"gate_up_proj": entry.hidden, "down_proj": entry.intermediate}
        yield from _expert_tensors(reader, entry.prefix, entry.bits, plan.names, dims, plan.scale_dtype)
    for entry in plan.dense.values():
        qweight, scales, zeros = (reader[f"{entry.prefix}.{kind}"] for kind in ("qweight", "scales", "zeros"))
        codes = unpack(qweight, entry.bits, entry.in_features)
        yield from ((f"{entry.prefix}.{key}", v) for key, v in compress(codes, scales, zeros, entry.bits, plan.scale_dtype).items())
        if f"{entry.prefix}.bias" in reader.where:
            yield f"{entry.prefix}.bias", reader[f"{entry.prefix}.bias"]


def export_compressed_tensors(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the compressed-tensors checkpoint of a mode checkpoint directory `checkpoint` to `out` (atomically:
    a failed export leaves `out` as it was). Processor and tokenizer files are copied along.

    Returns:
        {"out": str, "layer_widths": sorted widths of the expert sets, "groups": {"<bits>bit/g<group size>": number
        of linear patterns}, "transformers_loads": whether transformers can load it back (a warning says why not)}.

    Raises:
        ExportError: per-expert widths, zero points, expert biases or an unknown per-expert layout.
        ImportError: compressed-tensors is not installed.
    """
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as error:
        raise ImportError("compressed-tensors export needs the compressed-tensors package: pip install mode-hf[export]") from error

    checkpoint, out = Path(checkpoint), Path(out).resolve()
    config = json.loads((checkpoint / "config.json").read_text())
    reader = _Reader(checkpoint)
    plan = plan_export(checkpoint, config, reader)
    layer_widths = sorted({entry.bits for entry in plan.sets.values()})
    loads = plan.names.transformers_loads and len(layer_widths) == 1
    with atomic_directory(out, "exporting") as staging:
        _write_shards(_export_tensors(reader, plan), staging, indexed=not loads)
        if not loads:  # transformers would load it with random or wrongly decompressed experts: make it fail
            write_decoy(staging, [f"{entry.prefix}.{weight}" for entry in plan.sets.values() for weight in EXPERT_WEIGHTS])
        config["quantization_config"] = quantization_config(plan.groups)
        add_engine_config_keys(config)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for entry in checkpoint.iterdir():
            if entry.is_file() and not WEIGHT_FILES.match(entry.name) and entry.name not in ("config.json", "README.md"):
                shutil.copy2(entry, staging / entry.name)
    if not loads:
        logger.warning("mode-hf export: %s", _transformers_caveat(plan.names, layer_widths))
    for line in vllm_support(set(layer_widths), {entry.bits for entry in plan.dense.values()}):
        logger.warning("mode-hf export: %s", line)
    return {
        "out": str(out),
        "layer_widths": layer_widths,
        "groups": {f"{b}bit/g{g}": len(v) for (b, g), v in sorted(plan.groups.items())},
        "transformers_loads": loads,
    }


def _transformers_caveat(names: ExpertNames, layer_widths: list[int]) -> str:
    if not names.transformers_loads:
        return ("transformers cannot load this export back (its conversion for this family only knows fused "
                "experts); serving engines read the per-expert layout. A decoy model.safetensors makes a "
                "transformers load fail instead of running random experts; engines read the index's shards.")
    return (f"the layers use different widths {layer_widths}: transformers (5.2x) decompresses every routed expert "
            "with one config group's scheme, so it loads this export back wrong. The file itself is right (each "
            "layer's config group targets its experts): engines that resolve the scheme per layer read it as "
            "written; a decoy model.safetensors makes a transformers load fail instead; a single-width export "
            "loads in transformers.")
