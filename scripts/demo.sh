#!/usr/bin/env bash
# Install mode-hf (CPU torch first) and run the main job: quantize the bundled default model, save, reload, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e .
mode-hf demo "$@"
