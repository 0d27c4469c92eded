#!/usr/bin/env bash
# Install mode-hf with its test dependencies (CPU torch first: an unpinned torch pulls CUDA builds) and run the tests,
# then the vLLM tests (scripts/vllm_test.sh; MODE_HF_VLLM=0 skips them) and the harness tests (scripts/harness_test.sh;
# MODE_HF_HARNESS=0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
python -m pytest -q tests "$@"
# vLLM itself against transformers, in vLLM's own environment (cached; a loud skip if it cannot be built here)
bash scripts/vllm_test.sh
# lm-eval and lmms-eval scoring the bundled tasks, each in its own environment (cached; loud skip if one cannot be built)
bash scripts/harness_test.sh
