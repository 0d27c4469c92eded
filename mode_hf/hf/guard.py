"""Guard tensors: what makes a mode checkpoint fail to load without mode-hf instead of loading with random experts.

transformers has no plug-in discovery: a checkpoint whose config names an unregistered `quant_method` loads as a
plain model, with only a warning, and the experts it cannot find are initialised at random. So every save writes,
beside the packed tensors, one small uint8 tensor under each replaced module's ORIGINAL weight names
(`{set}.gate_up_proj`, `{set}.down_proj`, and `{linear}.weight` for `dense_bits` linears), in a shard of its own
(GUARD_FILE, with an index). A plain load then meets a tensor it cannot use: transformers' weight conversion of the
family fails on it, or its shape does not match the 16-bit parameter, and `from_pretrained` raises. With
`import mode_hf`, the quantizer tells transformers to expect these keys (`ignored_on_load`) and drops the model's
conversions of the replaced weights, so they are skipped. The bytes spell MESSAGE, for whoever reads the file.

transformers' refusal itself names no fix ("issues during automatic conversion of the weights"), so the guard
shard also holds one tensor named HINT, which its load report lists among the UNEXPECTED keys, beside the error:
the name says what to do. mode-hf's loader and its vLLM plugin skip it like the other guards.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

GUARD_FILE = "model-mode-guard.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PACKED_FILE = "model-mode-packed.safetensors"  # a single-file checkpoint's tensors, once the guard makes it two shards
MESSAGE = "mode-hf packed checkpoint: `import mode_hf` before loading it"
HINT = "mode_hf_checkpoint.import_mode_hf_before_loading_it"  # read in transformers' load report of a plain load
HINT_KEY = re.compile(rf"^{re.escape(HINT)}$")  # the hint's checkpoint key, for the loaders that skip it
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
PACKED_EXPERTS = re.compile(r"^(?P<prefix>.+)\.gate_up_proj_qweight_\d+bit$")
PACKED_LINEAR = re.compile(r"^(?P<prefix>.+)\.qweight$")


def checkpoint_keys(directory: Path) -> dict[str, str]:
    """{tensor name: file name} of the checkpoint's safetensors files (through the index when there is one)."""
    index = directory / INDEX_FILE
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    with safe_open(str(directory / SINGLE_FILE), "pt") as handle:
        return dict.fromkeys(handle.keys(), SINGLE_FILE)


def guard_names(keys: Iterable[str]) -> list[str]:
    """The original weight names of every packed module among checkpoint `keys` (as the checkpoint spells them)."""
    names = []
    for key in keys:
        if match := PACKED_EXPERTS.match(key):
            names += [f"{match['prefix']}.{weight}" for weight in EXPERT_WEIGHTS]
        elif match := PACKED_LINEAR.match(key):
            names.append(f"{match['prefix']}.weight")
    return sorted(names)


def write_guard(directory: str | os.PathLike) -> list[str]:
    """Add the guard tensors to a saved mode checkpoint (in place; a single-file checkpoint becomes two shards with
    an index); returns their names."""
    directory = Path(directory)
    keys = checkpoint_keys(Path(directory))
    names = [n for n in guard_names(keys) if n not in keys]
    if not names:
        return []
    names.append(HINT)
    message = torch.tensor(list(MESSAGE.encode()), dtype=torch.uint8)  # 1-D: no 16-bit weight has this shape
    save_file({name: message.clone() for name in names}, str(directory / GUARD_FILE), metadata={"format": "pt"})
    if not (directory / INDEX_FILE).exists():
        os.replace(directory / SINGLE_FILE, directory / PACKED_FILE)
        keys = dict.fromkeys(keys, PACKED_FILE)
    index_path = directory / INDEX_FILE
    index = json.loads(index_path.read_text()) if index_path.exists() else {"metadata": {}}
    weight_map = {**keys, **dict.fromkeys(names, GUARD_FILE)}
    files = set(weight_map.values())
    index["metadata"]["total_size"] = sum((directory / f).stat().st_size for f in files)
    index["weight_map"] = dict(sorted(weight_map.items()))
    index_path.write_text(json.dumps(index, indent=2))
    return names


def ignored_on_load(module_names: Iterable[str]) -> set[str]:
    """Regex patterns (model naming) of the guard keys of the packed modules `module_names`, for transformers'
    `_keys_to_ignore_on_load_unexpected`."""
    weights = "|".join((*EXPERT_WEIGHTS, "weight"))
    return {HINT_KEY.pattern} | {rf"^{re.escape(name)}\.({weights})$" for name in module_names}


def write_decoy(directory: str | os.PathLike, names: Iterable[str]) -> Path:
    """For a sharded checkpoint (an index) that transformers cannot load right: a `model.safetensors` holding only
    guard tensors under `names`. transformers reads a single-file checkpoint before an index, so it loads the decoy
    and fails on the guards; engines that read the index's shards (vLLM) never open it."""
    directory = Path(directory)
    if not (directory / INDEX_FILE).exists():
        raise ValueError(f"{directory} has no {INDEX_FILE}: a decoy would hide the real weights.")
    message = torch.tensor(list(MESSAGE.replace("packed checkpoint", "export for serving engines").encode()), dtype=torch.uint8)
    path = directory / SINGLE_FILE
    save_file({name: message.clone() for name in (*names, HINT)}, str(path), metadata={"format": "pt"})
    return path
