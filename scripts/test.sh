#!/usr/bin/env bash
# Install mode-hf with its test dependencies (CPU torch first: an unpinned torch pulls CUDA builds) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
python -m pytest -q tests "$@"
