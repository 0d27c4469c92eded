"""Peer quantizers' checkpoints as 16-bit models of the original layout, for the quality benchmark.

`benchmarks/peers/run_peer.py` (in each peer's own venv) saves AutoRound's, llm-compressor's, GPTQModel's and
transformers GPTQConfig's own packed checkpoints. None of them loads back into the fused Qwen3-VL-MoE with plain
`from_pretrained`: their experts are per-expert modules (`experts.{i}.{gate,up,down}_proj`), which transformers
reports as unexpected while it re-initialises the fused `experts.gate_up_proj` / `down_proj` at random. So
`export_peer` reads the peer's tensors itself, needing no peer library:

- GPTQ layout (AutoRound `auto_round` with `auto_round:auto_gptq` packing, GPTQModel `gptq`, optimum `gptq_v2`):
  `qweight` int32 [in * b / 32, out], `qzeros` int32 [groups, out * b / 32], `scales` fp16 [groups, out], optional
  `g_idx` [in]; v1 (`gptq`) stores each zero point minus 1, v2 stores it as is;
- compressed-tensors `pack-quantized` (llm-compressor): `weight_packed` int32 [out, ceil(in * b / 32)] of q + 2^(b-1),
  `weight_scale` [out, groups], optional `weight_zero_point` / `weight_g_idx`, `weight_shape` [2];
- dense weights where a peer left them dense: per-expert `{i}.{part}.weight` [out, in] or the fused native tensors.

It dequantizes (in float64) every routed expert of every expert set into the ORIGINAL model's own expert layout
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]` for the fused canonical layout; the layout adapter of
`mode_hf.model.layouts` handles the transposed one), does the same for any other module the peer packed
(GPTQConfig's attention), keeps every other weight of the original model as it is, and saves the model in the
original model's dtype (float32 for the bundled bench model; `dtype=` to choose, e.g. torch.bfloat16), with the
original's processor and tokenizer files copied along. It raises `CheckpointError` if any expert matrix of any
set is missing, has the wrong shape, or lies outside the original model: a random expert never gets through.

`peer_export.json` beside the model records the expert payload (codes + scales + zero points), the bytes of the
expert tensors as stored (also g_idx / weight_shape metadata), bits per expert weight for both, and what was
quantized.

`run_in_venv` does the whole path for one peer from this (the project's) environment: `benchmarks/peers/setup.sh`
builds the peer's venv once, `run_peer.py` quantizes in it, `export_peer` exports; `write_calibration` writes the
samples it reads. `python -m mode_hf.bench.peer_export SAVED ORIGINAL OUT --bits B --group-size G` exports from the
command line. Benchmark-only code: the library never imports it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import CheckpointError, ModeError
from ..hf.atomic import atomic_directory
from ..hf.checkpoint import auto_model_class
from ..model.structure import find_expert_sets

EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")  # the per-expert Linears every peer unfuses the experts into
METADATA = ("g_idx", "weight_shape", "weight_g_idx")  # stored but derivable (no act-order): not payload
PROCESSOR_FILES = re.compile(
    r"^(processor_config\.json|preprocessor_config\.json|video_preprocessor_config\.json|tokenizer\.json|"
    r"tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|chat_template\.(jinja|json)|vocab\.json|"
    r"merges\.txt|.*\.model|.*\.tiktoken)$"
)


# ---------------------------------------------------------------------------------------------------------------
# pure unpacking (int32 words -> integer codes)


def unpack_int32_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unsigned `bits`-bit values read from int32 words as one dense bit stream, least significant bit first,
    along the last dimension: value k is bits [k * bits, (k + 1) * bits) of the stream (a value may straddle two
    words, as 3-bit ones do).

    words [..., W] int32 -> [..., count] int64, with 32 * W >= count * bits.
    """
    if words.shape[-1] * 32 < count * bits:
        raise ValueError(f"{words.shape[-1]} int32 words hold fewer than {count} values of {bits} bits")
    unsigned = words.to(torch.int64) & 0xFFFFFFFF  # [..., W]
    stream = (unsigned.unsqueeze(-1) >> torch.arange(32)) & 1  # [..., W, 32], bit j of word w
    stream = stream.flatten(-2)[..., : count * bits]  # [..., count * bits]
    values = stream.reshape(*stream.shape[:-1], count, bits)  # [..., count, bits]
    return (values << torch.arange(bits)).sum(-1)  # [..., count]


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """GPTQ codes: qweight int32 [ceil(in * bits / 32), out], packed along `in` (each column one bit stream)
    -> unsigned codes int64 [out, in]."""
    return unpack_int32_stream(qweight.t(), bits, in_features)  # [out, W] -> [out, in]


def unpack_gptq_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, zero_offset: int) -> torch.Tensor:
    """GPTQ zero points: qzeros int32 [groups, ceil(out * bits / 32)], packed along `out` -> zero points int64
    [groups, out]. `zero_offset` is what the format subtracted before packing: 1 for GPTQ v1 (`gptq`, AutoRound's
    `auto_gptq` packing: a symmetric b-bit zero 2^(b-1) is stored as 2^(b-1) - 1), 0 for `gptq_v2`."""
    return unpack_int32_stream(qzeros, bits, out_features) + zero_offset  # [groups, out]


def unpack_pack_quantized(weight_packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """compressed-tensors pack-quantized codes: weight_packed int32 [out, ceil(in * bits / 32)], each row one bit
    stream of q + 2^(bits-1) (compressed_tensors.pack_to_int32, packed_dim=1) -> signed codes int64 [out, in]."""
    return unpack_int32_stream(weight_packed, bits, in_features) - (1 << (bits - 1))  # [out, in]


def dequantize_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
    zero_offset: int, g_idx: torch.Tensor | None = None, in_features: int | None = None,
) -> torch.Tensor:
    """(code - zero) * scale of a GPTQ module: qweight [ceil(in*b/32), out], qzeros [G, ceil(out*b/32)],
    scales [G, out], g_idx [in] (default: column // group_size) -> weight float64 [out, in]. `in_features`
    defaults to all the values qweight holds."""
    in_features = in_features or qweight.shape[0] * 32 // bits
    out_features = scales.shape[1]
    groups = _groups(g_idx, in_features, group_size, scales.shape[0])  # [in]
    codes = unpack_gptq_qweight(qweight, bits, in_features)  # [out, in]
    zeros = unpack_gptq_qzeros(qzeros, bits, out_features, zero_offset)  # [G, out]
    return (codes - zeros[groups].t()).double() * scales.double()[groups].t()


def dequantize_pack_quantized(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, bits: int, group_size: int, in_features: int,
    zero_point: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """(q - zero) * scale of a compressed-tensors pack-quantized module: weight_packed [out, ceil(in*b/32)],
    weight_scale [out, G], zero_point [out, G] or None (symmetric), g_idx [in] -> weight float64 [out, in]."""
    groups = _groups(g_idx, in_features, group_size, weight_scale.shape[1])  # [in]
    q = unpack_pack_quantized(weight_packed, bits, in_features)  # [out, in]
    zero = 0.0 if zero_point is None else zero_point.double()[:, groups]  # [out, in]
    return (q.double() - zero) * weight_scale.double()[:, groups]


def _groups(g_idx: torch.Tensor | None, in_features: int, group_size: int, stored_groups: int) -> torch.Tensor:
    """The group of each input column [in]; checks it against the number of stored groups."""
    groups = g_idx.long() if g_idx is not None else torch.arange(in_features) // group_size
    if groups.numel() != in_features or int(groups.max()) >= stored_groups or stored_groups != math.ceil(in_features / group_size):
        raise CheckpointError(
            f"{stored_groups} stored groups do not fit {in_features} input columns in groups of {group_size}: "
            "export with the group size the peer used."
        )
    return groups


# ---------------------------------------------------------------------------------------------------------------
# reading a peer checkpoint


class _Tensors:
    """The tensors of a checkpoint directory (every *.safetensors file), read on demand."""

    def __init__(self, stack: contextlib.ExitStack, directory: Path):
        from safetensors import safe_open

        self.files: dict[str, Any] = {}
        for path in sorted(directory.glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(path), "pt"))
            self.files.update({key: handle for key in handle.keys()})
        if not self.files:
            raise CheckpointError(f"{directory}: no *.safetensors file.")

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor | None:
        return self.files[key].get_tensor(key) if key in self.files else None


def _format(quant_config: dict, bits: int, group_size: int) -> dict:
    """How the peer stored its weights: {"name", "zero_offset" (GPTQ), "sym"}; checks bits and group size."""
    method = str(quant_config.get("quant_method", "")).lower()
    if not quant_config:
        return {"name": "dense (no quantization_config)", "zero_offset": None, "sym": None}
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in quant_config.get("config_groups", {}).values()]
        declared = {(w.get("num_bits"), w.get("group_size")) for w in weights if w}
        fmt = {"name": f"compressed-tensors {quant_config.get('format')}", "zero_offset": None,
               "sym": all(w.get("symmetric", True) for w in weights)}
    elif method in ("gptq", "auto-round"):
        declared = {(quant_config.get("bits"), quant_config.get("group_size"))}
        checkpoint = str(quant_config.get("checkpoint_format", quant_config.get("format", "gptq"))).lower()
        packing = str(quant_config.get("packing_format", "")).lower()
        if method == "auto-round" and "gptq" not in packing:
            raise CheckpointError(
                f"AutoRound packing_format {packing!r}: only the GPTQ packing (auto_round:auto_gptq, AutoRound's choice "
                "for symmetric weights) is understood."
            )
        offset = 0 if checkpoint == "gptq_v2" else 1
        fmt = {"name": f"{method} ({packing or checkpoint})", "zero_offset": offset, "sym": quant_config.get("sym", True)}
    else:
        raise CheckpointError(f"quant_method {method!r}: not a peer format export_peer knows (gptq, auto-round, compressed-tensors).")
    if (bits, group_size) not in declared:
        raise CheckpointError(f"the peer checkpoint declares (bits, group_size) {sorted(declared)}, not ({bits}, {group_size}).")
    return fmt


def _read_linear(tensors: _Tensors, prefix: str, shape: tuple[int, int], fmt: dict, bits: int, group_size: int) -> dict | None:
    """One [out, in] module of the peer checkpoint: {"weight" float64 [out, in], "stored", "payload" (bytes),
    "kind", "tensors"}, or None if the checkpoint has nothing at `prefix`."""
    out_features, in_features = shape
    if f"{prefix}.qweight" in tensors:
        names = ("qweight", "qzeros", "scales", "g_idx")
    elif f"{prefix}.weight_packed" in tensors:
        names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")
    elif f"{prefix}.weight" in tensors:
        names = ("weight",)
    else:
        return None
    t = {n: tensors.get(f"{prefix}.{n}") for n in names if f"{prefix}.{n}" in tensors}
    try:
        if "qweight" in t:
            if fmt["zero_offset"] is None:
                raise CheckpointError("GPTQ tensors in a checkpoint whose quantization_config is not GPTQ")
            words = math.ceil(in_features * bits / 32)
            if tuple(t["qweight"].shape) != (words, out_features) or t["scales"].shape[1] != out_features:
                raise CheckpointError(f"qweight {tuple(t['qweight'].shape)} is not [{words}, {out_features}] ({bits}-bit codes of [{out_features}, {in_features}])")
            weight = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], bits, group_size, fmt["zero_offset"],
                                     t.get("g_idx"), in_features)
            if fmt["sym"]:
                zeros = unpack_gptq_qzeros(t["qzeros"], bits, out_features, fmt["zero_offset"])
                if not bool((zeros == 1 << (bits - 1)).all()):
                    raise CheckpointError(
                        f"symmetric zero points are not all {1 << (bits - 1)} (found {sorted(set(zeros.unique().tolist()))[:6]}): "
                        "wrong GPTQ version (v1 stores zero - 1) or bits"
                    )
            kind = "gptq"
        elif "weight_packed" in t:
            stored_shape = tuple(int(v) for v in t["weight_shape"].tolist()) if "weight_shape" in t else shape
            words = math.ceil(in_features * bits / 32)
            if stored_shape != tuple(shape) or tuple(t["weight_packed"].shape) != (out_features, words):
                raise CheckpointError(
                    f"weight_packed {tuple(t['weight_packed'].shape)} / weight_shape {stored_shape} do not match "
                    f"[{out_features}, {words}] ({bits}-bit dense packing of [{out_features}, {in_features}])"
                )
            weight = dequantize_pack_quantized(t["weight_packed"], t["weight_scale"], bits, group_size, in_features,
                                               t.get("weight_zero_point"), t.get("weight_g_idx"))
            kind = "pack-quantized"
        else:
            weight = t["weight"].double()
            if tuple(weight.shape) != tuple(shape):
                raise CheckpointError(f"weight {tuple(weight.shape)} is not {list(shape)}")
            kind = "dense"
    except CheckpointError as error:
        raise CheckpointError(f"{prefix}: {error}") from None
    stored = sum(v.numel() * v.element_size() for v in t.values())
    payload = sum(v.numel() * v.element_size() for n, v in t.items() if n not in METADATA)
    return {"weight": weight, "stored": stored, "payload": payload, "kind": kind, "tensors": sorted(t)}


# ---------------------------------------------------------------------------------------------------------------
# the export


def export_peer(
    saved_dir: str | Path, original_dir: str | Path, out_dir: str | Path, bits: int, group_size: int,
    dtype: torch.dtype | None = None,
) -> dict:
    """Write the peer checkpoint in `saved_dir` (run_peer.py's output) as a 16-bit model of the original layout.

    Args:
        saved_dir: the peer's own saved checkpoint (with its config.json; peer_run.json is read if present).
        original_dir: the model the peer quantized; every weight the peer did not quantize is taken from it.
        out_dir: written atomically: config, weights, the original's processor / tokenizer files, peer_export.json.
        bits, group_size: the width and group size the peer was run at (checked against its config and shapes).
        dtype: the saved weights' dtype; default the original model's own (dequantized values of fp16/bf16 scales
            times small integers are exact in float32; bfloat16 would round them and every other weight too).

    Returns:
        The report also written to out_dir/peer_export.json.

    Raises:
        CheckpointError: an expert matrix missing, misshapen or outside the original model; a quantized module the
            original has no weight for; a format, width or group size other than declared.
    """
    saved, original, out = Path(saved_dir), Path(original_dir), Path(out_dir)
    config = json.loads((saved / "config.json").read_text())
    fmt = _format(config.get("quantization_config") or {}, bits, group_size)
    model = auto_model_class(original).from_pretrained(str(original), dtype="auto")
    dtype = dtype or model.dtype
    sets = find_expert_sets(model)
    params = dict(model.named_parameters())
    report: dict[str, Any] = {
        "saved_dir": str(saved), "original_dir": str(original), "bits": bits, "group_size": group_size,
        "peer_format": fmt["name"], "dtype": f"{str(dtype).removeprefix('torch.')}"
        + (" (the original model's dtype)" if dtype == model.dtype else f" (original: {str(model.dtype).removeprefix('torch.')})"),
    }
    if (saved / "peer_run.json").exists():
        run = json.loads((saved / "peer_run.json").read_text())
        report["peer"] = {k: run.get(k) for k in ("peer", "version", "transformers", "seconds", "calibration", "options")}
    with contextlib.ExitStack() as stack:
        tensors = _Tensors(stack, saved)
        _check_no_foreign_experts(tensors, [s.name for s in sets])
        experts = {"sets": len(sets), "experts": 0, "matrices": 0, "params": 0, "stored_bytes": 0, "payload_bytes": 0,
                   "kinds": {}, "tensors": set()}
        with torch.no_grad():
            for expert_set in sets:
                _export_set(expert_set, tensors, fmt, bits, group_size, dtype, experts)
            others = _export_other_modules(tensors, params, {s.name for s in sets}, fmt, bits, group_size)
        experts["tensors"] = sorted(experts["tensors"])
        experts["effective_bits"] = 8 * experts["stored_bytes"] / experts["params"]
        experts["payload_bits"] = 8 * experts["payload_bytes"] / experts["params"]
        report["experts"] = experts
        report["other_quantized"] = others
    report["quantized"] = _summary(experts, others)
    with atomic_directory(out, "peer-export") as staging:
        model.to(dtype).save_pretrained(staging)
        copied = [p.name for p in sorted(original.iterdir()) if p.is_file() and PROCESSOR_FILES.match(p.name)]
        for name in copied:
            shutil.copy2(original / name, staging / name)
        report["out_dir"], report["copied_from_original"] = str(out), copied
        (staging / "peer_export.json").write_text(json.dumps(report, indent=1))
    return report


def _check_no_foreign_experts(tensors: _Tensors, set_names: list[str]) -> None:
    """Raise if the checkpoint holds expert weights of an expert set the original model does not have."""
    pattern = re.compile(r"^(.*\.experts)\.(?:\d+\.(?:" + "|".join(EXPERT_PARTS) + r")\.|(?:gate_up_proj|down_proj)$)")
    foreign = sorted({m.group(1) for key in tensors.files if (m := pattern.match(key)) and m.group(1) not in set_names})
    if foreign:
        raise CheckpointError(f"the peer checkpoint holds experts of modules the original model does not have: {foreign[:4]}")


def _export_set(expert_set: Any, tensors: _Tensors, fmt: dict, bits: int, group_size: int, dtype: torch.dtype, experts: dict) -> None:
    """Dequantize one expert set's experts into its module's own weights (in place)."""
    name, module, layout = expert_set.name, expert_set.module, expert_set.layout
    gate_up, down = layout.weights(module)  # canonical [E, 2I, H], [E, H, I]
    count, hidden, inter = gate_up.shape[0], down.shape[1], down.shape[2]
    extra = sorted({int(m.group(1)) for key in tensors.files if (m := re.match(re.escape(name) + r"\.(\d+)\.", key))} - set(range(count)))
    if extra:
        raise CheckpointError(f"{name}: the peer checkpoint has experts {extra[:4]} but the original model has {count}.")
    fused = [tensors.get(f"{name}.{p}") for p in ("gate_up_proj", "down_proj")]
    native = {p: getattr(module, p) for p in ("gate_up_proj", "down_proj")}
    experts["experts"] += count
    experts["matrices"] += 3 * count
    experts["params"] += 3 * count * hidden * inter
    if all(t is not None for t in fused):  # left dense, fused (GPTQConfig; llm-compressor after repack_moe)
        for (p, param), t in zip(native.items(), fused):
            if tuple(t.shape) != tuple(param.shape):
                raise CheckpointError(f"{name}.{p}: {tuple(t.shape)} in the peer checkpoint, {tuple(param.shape)} in the original.")
            param.copy_(t.to(dtype))
            experts["stored_bytes"] += t.numel() * t.element_size()
            experts["payload_bytes"] += t.numel() * t.element_size()
        experts["kinds"]["dense (fused)"] = experts["kinds"].get("dense (fused)", 0) + 3 * count
        experts["tensors"].update(("gate_up_proj", "down_proj"))
        return
    new_gate_up = torch.empty(gate_up.shape, dtype=torch.float64)  # [E, 2I, H]
    new_down = torch.empty(down.shape, dtype=torch.float64)  # [E, H, I]
    missing = []
    for e in range(count):
        for part, target, rows, shape in (
            ("gate_proj", new_gate_up, slice(0, inter), (inter, hidden)),
            ("up_proj", new_gate_up, slice(inter, 2 * inter), (inter, hidden)),
            ("down_proj", new_down, slice(0, hidden), (hidden, inter)),
        ):
            found = _read_linear(tensors, f"{name}.{e}.{part}", shape, fmt, bits, group_size)
            if found is None:
                missing.append(f"{e}.{part}")
                continue
            target[e, rows] = found["weight"]
            experts["stored_bytes"] += found["stored"]
            experts["payload_bytes"] += found["payload"]
            experts["kinds"][found["kind"]] = experts["kinds"].get(found["kind"], 0) + 1
            experts["tensors"].update(found["tensors"])
    if missing:
        raise CheckpointError(
            f"{name}: {len(missing)} of {3 * count} expert matrices are missing from the peer checkpoint "
            f"(e.g. {name}.{missing[0]}); refusing to export a model with experts the peer never produced."
        )
    for p, t in layout.native(new_gate_up, new_down).items():
        native[p].copy_(t.to(dtype))


def _export_other_modules(tensors: _Tensors, params: dict, set_names: set[str], fmt: dict, bits: int, group_size: int) -> dict:
    """Dequantize every non-expert module the peer packed into the original's `{module}.weight` (in place)."""
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors.files if k.endswith((".qweight", ".weight_packed"))})
    names, stored = [], 0
    for prefix in prefixes:
        if any(prefix.startswith(s + ".") for s in set_names):
            continue
        weight = params.get(f"{prefix}.weight")
        if weight is None or weight.dim() != 2:
            raise CheckpointError(f"{prefix}: packed in the peer checkpoint, but the original model has no 2-D {prefix}.weight.")
        found = _read_linear(tensors, prefix, tuple(weight.shape), fmt, bits, group_size)
        weight.copy_(found["weight"].to(weight.dtype))
        names.append(prefix)
        stored += found["stored"]
    return {"count": len(names), "names": names, "stored_bytes": stored}


def _summary(experts: dict, others: dict) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(experts["kinds"].items()))
    text = f"{experts['experts']} experts in {experts['sets']} sets ({experts['matrices']} matrices: {kinds})"
    if others["count"]:
        text += f"; also {others['count']} non-expert modules quantized by the peer (dequantized into the export)"
    return text


# ---------------------------------------------------------------------------------------------------------------
# running a peer in its own venv (benchmarks/peers/setup.sh + run_peer.py of the source checkout), then exporting


class PeerError(ModeError, RuntimeError):
    """A peer that could not be installed or run here; the message holds its own error, verbatim."""


@dataclass(frozen=True)
class VenvPeer:
    """A peer run in its own venv: the widths run_peer.py runs it at and whether it reaches the routed experts."""

    name: str
    bits: tuple[int, ...]
    experts: bool  # False: transformers' GPTQConfig quantizes nn.Linear only (attention), the fused experts stay dense
    description: str


VENV_PEERS = {
    "autoround": VenvPeer("autoround", (2, 3, 4, 8), True, "AutoRound 0.16.1 SignRound (iters), experts unfused by AutoRound"),
    "llmcompressor": VenvPeer("llmcompressor", (2, 3, 4, 8), True, "llm-compressor 0.14.0.1 GPTQModifier (oneshot), transformers 5.17"),
    "gptqmodel": VenvPeer("gptqmodel", (2, 3, 4, 8), True, "GPTQModel 7.6.0 GPTQ, experts unfused by Defuser"),
    "gptqconfig": VenvPeer("gptqconfig", (2, 3, 4, 8), False, "transformers GPTQConfig (optimum 2.3.0 + gptqmodel): attention only"),
}


def write_calibration(samples: Sequence[Mapping[str, Any]], out_dir: str | Path) -> Path:
    """Write calibration samples ({"image": PIL image or None, "text"}) as PNGs + calibration.jsonl for run_peer.py
    (lines {"image": absolute path or null, "text"}); returns the .jsonl path."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "calibration.jsonl"
    with path.open("w") as f:
        for i, sample in enumerate(samples):
            image = sample.get("image")
            image_path = None
            if image is not None:
                image_path = out / f"{i:04d}.png"
                image.convert("RGB").save(image_path)
            f.write(json.dumps({"image": None if image_path is None else str(image_path), "text": sample["text"]}) + "\n")
    return path


def peer_scripts() -> Path:
    """benchmarks/peers of the source checkout this package runs from (setup.sh, run_peer.py)."""
    scripts = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"
    if not (scripts / "setup.sh").exists() or not (scripts / "run_peer.py").exists():
        raise PeerError(f"{scripts}: no setup.sh / run_peer.py; the venv peers run from a source checkout of mode-hf.")
    return scripts


def run_in_venv(
    name: str, model_dir: str | Path, calibration_file: str | Path, bits: int, group_size: int, out_dir: str | Path,
    venv_root: str | Path, iters: int = 200, threads: int = 1,
) -> dict:
    """Build (once) the venv of peer `name`, quantize `model_dir` with it (out_dir/peer: the peer's own checkpoint)
    and export that (out_dir/export); returns export_peer's report plus "out" (the exported model directory) and
    "peer_run" (run_peer.py's record).

    Raises:
        PeerError: an unknown peer or width, or its install or run failed (the message holds the peer's own error).
        CheckpointError: the peer's checkpoint cannot be exported (see export_peer).
    """
    if name not in VENV_PEERS or bits not in VENV_PEERS[name].bits:
        raise PeerError(f"no venv peer {name!r} at {bits} bits (peers: {sorted(VENV_PEERS)}).")
    scripts, out = peer_scripts(), Path(out_dir).absolute()
    saved, exported = out / "peer", out / "export"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    setup = subprocess.run(["bash", str(scripts / "setup.sh"), str(Path(venv_root).absolute()), name],
                           capture_output=True, text=True, env=env)
    if setup.returncode != 0:
        raise PeerError(f"{name}: setup.sh failed (exit {setup.returncode}):\n{_tail(setup.stdout + setup.stderr)}")
    python = Path(venv_root).absolute() / name / "bin" / "python"
    command = [str(python), str(scripts / "run_peer.py"), "--peer", name, "--model", str(Path(model_dir).absolute()),
               "--calibration", str(Path(calibration_file).absolute()), "--bits", str(bits), "--group-size", str(group_size),
               "--out", str(saved), "--iters", str(iters), "--threads", str(threads)]
    shutil.rmtree(saved, ignore_errors=True)
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    record = json.loads((saved / "peer_run.json").read_text()) if (saved / "peer_run.json").exists() else {}
    if run.returncode != 0:
        raise PeerError(f"{name}: run_peer.py failed (exit {run.returncode}): {record.get('error', '')}\n{_tail(run.stderr)}")
    report = export_peer(saved, model_dir, exported, bits, group_size)
    report.update(out=str(exported), peer_run=record)
    return report


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> dict:
    """python -m mode_hf.bench.peers SAVED_DIR ORIGINAL_DIR OUT_DIR --bits B --group-size G [--dtype bfloat16]"""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("saved_dir")
    parser.add_argument("original_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the original model's dtype)")
    args = parser.parse_args(argv)
    report = export_peer(args.saved_dir, args.original_dir, args.out_dir, args.bits, args.group_size,
                         getattr(torch, args.dtype) if args.dtype else None)
    e = report["experts"]
    print(f"{report['out_dir']}: {report['quantized']}; expert payload {e['payload_bits']:.3f} bits/weight, "
          f"stored {e['effective_bits']:.3f} ({e['stored_bytes']} bytes for {e['params']} weights); dtype {report['dtype']}")
    return report


if __name__ == "__main__":
    main()
