#!/usr/bin/env bash
# The vLLM tests: build (or reuse) vLLM's environment (scripts/vllm_env.sh), then run tests/test_vllm.py, which
# serves mode checkpoints with vLLM and compares them with transformers + mode_hf. If vLLM cannot be installed here
# (no registry, no wheel for this machine) it says so loudly and exits 0, so the rest of CI still counts; a vLLM
# test that fails fails this script. MODE_HF_VLLM=0 skips it on purpose.
set -uo pipefail
cd "$(dirname "$0")/.."
banner() { printf '\n%s\n%s\n%s\n\n' "################################################################" "$*" "################################################################" >&2; }
if [ "${MODE_HF_VLLM:-1}" = "0" ]; then
    banner "vLLM TESTS SKIPPED: MODE_HF_VLLM=0"
    exit 0
fi
log="$(mktemp)"
if ! VLLM_PY="$(bash scripts/vllm_env.sh 2> >(tee "$log" >&2))"; then
    banner "vLLM TESTS NOT RUN: vLLM's environment could not be built (last lines of its log below)"
    tail -n 20 "$log" >&2
    exit 0
fi
export MODE_HF_VLLM_PYTHON="$VLLM_PY" MODE_HF_VLLM_REPORT="${MODE_HF_VLLM_REPORT:-$(pwd)/vllm_report.json}"
set -e
python -m pytest -q -rs tests/test_vllm.py "$@"
echo "vLLM comparison report: $MODE_HF_VLLM_REPORT" >&2
