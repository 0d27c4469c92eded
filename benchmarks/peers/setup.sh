#!/usr/bin/env bash
# Build the virtual environment of one peer quantizer for the quality benchmark (benchmarks/peers/run_peer.py).
#
#     bash benchmarks/peers/setup.sh VENV_ROOT PEER        PEER: autoround | llmcompressor | gptqmodel | gptqconfig
#
# Makes VENV_ROOT/PEER (a venv with the CPU torch 2.13.0 and the peer at the pinned versions that were verified on
# this model family) and prints its python. Idempotent: a venv holding the marker file .peer-ready is left as it is;
# a half-built one (no marker) is completed by re-running the same pip commands.
#
# Order matters: torch==2.13.0 first (the local CPU wheel; an unpinned torch pulls GBs of CUDA wheels), and torch==2.13.0
# repeated on every later pip line so no dependency can upgrade it. torchvision / torchaudio / torchcodec are never
# installed (the bench processor is image-only and needs none of them); the script fails if one appears.
# Each pip step logs to VENV_ROOT/PEER/setup-STEP.log; on failure the step, its command and the log's tail are
# printed and the script exits non-zero.
#
# Environment: PYTHON (default: python3) makes the venv; it must be the python the torch wheel is built for (3.11 here).
set -euo pipefail

usage() { echo "usage: $0 VENV_ROOT {autoround|llmcompressor|gptqmodel|gptqconfig}" >&2; exit 2; }
[ $# -eq 2 ] || usage
ROOT=$1
PEER=$2
TORCH="torch==2.13.0"

# Pinned versions (what worked on CPU with the Qwen3-VL-MoE bench model):
case "$PEER" in
  autoround)      # AutoRound 0.16.1 on transformers 5.24; pillow is not an auto-round dependency but the image processor needs it
    PKGS=("auto-round==0.16.1" "transformers==5.24.0" "pillow") ;;
  llmcompressor)  # llm-compressor 0.14.0.1 pins transformers<=5.17.0,>=5.15.0: its own 5.17 env
    PKGS=("llmcompressor==0.14.0.1" "transformers==5.17.0" "compressed-tensors==0.19.0" "pillow") ;;
  gptqmodel)      # 7.7.0 needs torch>=2.14.1 (the registry's CUDA build); with torch pinned pip takes 7.6.0 (pure-python sdist)
    PKGS=("gptqmodel==7.6.0" "transformers==5.24.0" "pillow") ;;
  gptqconfig)     # transformers' GPTQConfig needs optimum and gptqmodel
    PKGS=("optimum==2.3.0" "transformers==5.24.0" "gptqmodel==7.6.0" "pillow") ;;
  *) usage ;;
esac
IMPORTS=$(case "$PEER" in
  autoround) echo "import auto_round, transformers, PIL" ;;
  llmcompressor) echo "import llmcompressor, compressed_tensors, transformers, PIL" ;;
  gptqmodel) echo "import gptqmodel, transformers, PIL" ;;
  gptqconfig) echo "import optimum.gptq, gptqmodel, transformers, PIL" ;;
esac)

VENV="$ROOT/$PEER"
MARKER="$VENV/.peer-ready"
if [ -f "$MARKER" ]; then
  echo "$PEER: already built ($MARKER); python: $VENV/bin/python"
  exit 0
fi
mkdir -p "$ROOT"

step() {  # step NAME COMMAND...: run it, its output to a log; on failure say exactly what failed and stop
  local name=$1; shift
  local log="$VENV/setup-$name.log"
  mkdir -p "$VENV"
  echo "$PEER: $name: $*"
  local start=$SECONDS
  local rc=0
  "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "FAILED: $PEER setup step '$name' (exit status $rc)" >&2
    echo "  command: $*" >&2
    echo "  log: $log (last 40 lines follow)" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  echo "$PEER: $name done in $((SECONDS - start)) s"
}

PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  step venv "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --no-input)
step torch "${PIP[@]}" "$TORCH"
step peer "${PIP[@]}" "${PKGS[@]}" "$TORCH"
step check "$VENV/bin/python" - "$IMPORTS" <<'EOF'
import importlib.metadata as md
import sys

exec(sys.argv[1])  # the peer imports
import torch

problems = []
if torch.__version__ != "2.13.0+cpu":
    problems.append(f"torch is {torch.__version__}, expected 2.13.0+cpu")
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        problems.append(f"{name} {md.version(name)} is installed (must not be)")
    except md.PackageNotFoundError:
        pass
if problems:
    sys.exit("; ".join(problems))
print("ok:", sys.argv[1])
EOF
"$VENV/bin/python" -m pip freeze >"$VENV/peer-freeze.txt"
{ echo "peer=$PEER"; echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; grep -iE '^(torch|transformers|auto-round|auto_round|llmcompressor|compressed-tensors|compressed_tensors|gptqmodel|optimum|defuser)==' "$VENV/peer-freeze.txt" || true; } >"$MARKER"
echo "$PEER: ready; python: $VENV/bin/python"
cat "$MARKER"
