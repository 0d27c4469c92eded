"""lmms-eval with mode checkpoints: the entry point `lmms_eval.models` (pyproject.toml) runs `manifests()` whenever
lmms-eval imports its models, so the stock command line works:

    lmms-eval --model mode_qwen3_vl --model_args pretrained=CKPT --tasks ... [--include_path DIR/lmms_eval]

`manifests()` imports mode_hf (the quantization method "mode" and the bundled processor's class) and makes
qwen_vl_utils importable without torchvision (its module imports torchvision for video only; the registry's
torchvision is a CUDA build that does not import on a CPU machine). "mode_qwen3_vl" (`ModeQwen3VL`) is lmms-eval's
own `qwen3_vl` wrapper with three changes: the model class comes from the checkpoint's config (the stock wrapper
guesses MoE from an "A<n>B" in the path and would build a dense model, which a mode checkpoint refuses), the dtype is
an argument (stock: always bfloat16; default here float32, what `mode-hf eval` uses), and CPU defaults (device and
device_map "cpu", no system prompt: the bundled models were trained without one).
"""

from __future__ import annotations

import sys
import types
from typing import Any

MODEL_ID = "mode_qwen3_vl"


def manifests() -> list[Any]:
    """The `lmms_eval.models` entry point: register mode-hf, return the wrapper's manifest."""
    from lmms_eval.models.registry_v2 import ModelManifest

    import mode_hf  # noqa: F401 - registers "mode" and the bundled processor class with transformers

    import_qwen_vl_utils()
    return [ModelManifest(model_id=MODEL_ID, simple_class_path="mode_hf.harness.lmms_eval_model.ModeQwen3VL")]


def import_qwen_vl_utils() -> None:
    """Import qwen_vl_utils; where torchvision cannot be imported, with a stub in its place during the import only
    (qwen_vl_utils reads images with PIL; transformers must keep seeing no torchvision afterwards)."""
    try:
        import qwen_vl_utils  # noqa: F401
        return
    except ImportError as error:
        if "torchvision" not in str(error) and getattr(error, "name", "") != "torchvision":
            raise
    except RuntimeError:  # a torchvision that is installed but does not load ("operator torchvision::nms does not exist")
        pass
    names = ("torchvision", "torchvision.io", "torchvision.transforms")
    saved = {name: sys.modules.get(name) for name in names}
    stub = types.ModuleType("torchvision")
    stub.__version__ = "0.0.0"
    stub.io = types.ModuleType("torchvision.io")
    stub.transforms = types.ModuleType("torchvision.transforms")
    stub.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear")
    sys.modules.update({"torchvision": stub, "torchvision.io": stub.io, "torchvision.transforms": stub.transforms})
    for name in [m for m in sys.modules if m.startswith("qwen_vl_utils")]:
        del sys.modules[name]
    try:
        import qwen_vl_utils  # noqa: F401
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
