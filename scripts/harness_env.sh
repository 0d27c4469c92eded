#!/usr/bin/env bash
# Build (or reuse) the virtual environment of one evaluation harness with mode-hf installed, and print its python.
#
#   LMEVAL_PY=$(bash scripts/harness_env.sh lm-eval)      # lm-evaluation-harness 0.4.13 ([hf] extra)
#   LMMS_PY=$(bash scripts/harness_env.sh lmms-eval)      # lmms-eval 0.7.3
#
# Each harness gets its own environment (cached in ~/.cache/mode-hf/<harness>-<version>, or $MODE_HF_HARNESS_CACHE),
# with the CPU build of torch pinned first and mode-hf installed editable from this checkout. lmms-eval needs three
# repairs on a CPU machine, each found by running it: its declared torchvision comes from the registry as a CUDA build
# that does not import here ("operator torchvision::nms does not exist") and breaks transformers' imports, so it is
# removed (mode-hf's lmms-eval plug-in makes qwen_vl_utils import without it); filelock 4 has no `filelock._api`, which
# lmms-eval's evaluator imports; its Qwen3-VL module imports decord, which it does not declare.
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS="${1:?usage: harness_env.sh lm-eval|lmms-eval}"
TORCH_VERSION="2.13.0"
case "$HARNESS" in
    lm-eval) VERSION=0.4.13; PACKAGE="lm-eval[hf]==$VERSION"; CHECK="import lm_eval, mode_hf.harness.lm_eval" ;;
    lmms-eval) VERSION=0.7.3; PACKAGE="lmms-eval==$VERSION"; CHECK="import lmms_eval.models, mode_hf; from importlib.metadata import entry_points; assert any(e.value == 'mode_hf.harness.lmms_eval:manifests' for e in entry_points(group='lmms_eval.models'))" ;;
    *) echo "harness_env.sh: unknown harness $HARNESS (lm-eval or lmms-eval)" >&2; exit 2 ;;
esac
VENV="${MODE_HF_HARNESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mode-hf}/$HARNESS-$VERSION"
PY="$VENV/bin/python"
say() { echo "[harness_env $HARNESS] $*" >&2; }
works() { [ -x "$PY" ] && "$PY" -c "$CHECK" >&2; }

if [ -x "$PY" ]; then
    "$PY" -m pip install --quiet --no-deps -e . >&2   # re-point mode-hf at this checkout
    if works; then echo "$PY"; exit 0; fi
    say "the cached environment at $VENV does not work: rebuilding it"
    rm -rf "$VENV"
fi
say "building $VENV ($PACKAGE; a few minutes)"
mkdir -p "$(dirname "$VENV")"
python -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip >&2
"$PY" -m pip install --quiet "torch==$TORCH_VERSION" >&2
"$PY" -m pip install --quiet "$PACKAGE" "torch==$TORCH_VERSION" >&2
if [ "$HARNESS" = "lmms-eval" ]; then
    "$PY" -m pip uninstall --quiet -y torchvision >&2 || true
    "$PY" -m pip install --quiet decord "filelock<4" >&2
fi
"$PY" -m pip install --quiet -e . "torch==$TORCH_VERSION" >&2
works
say "ready: $PY"
echo "$PY"
