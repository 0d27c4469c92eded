#!/usr/bin/env bash
# The harness tests: build (or reuse) lm-eval's and lmms-eval's environments (scripts/harness_env.sh), then run
# tests/test_harness.py, where each harness scores the bundled tasks on the bundled model and a mode checkpoint of it,
# item by item equal to `mode-hf eval`. A harness that cannot be installed here is reported loudly and its tests are
# skipped; the rest still run. MODE_HF_HARNESS=0 skips all of it on purpose.
set -uo pipefail
cd "$(dirname "$0")/.."
banner() { printf '\n%s\n%s\n%s\n\n' "################################################################" "$*" "################################################################" >&2; }
if [ "${MODE_HF_HARNESS:-1}" = "0" ]; then
    banner "HARNESS TESTS SKIPPED: MODE_HF_HARNESS=0"
    exit 0
fi
for harness in lm-eval lmms-eval; do
    log="$(mktemp)"
    if py="$(bash scripts/harness_env.sh "$harness" 2> >(tee "$log" >&2))"; then
        [ "$harness" = lm-eval ] && export MODE_HF_LMEVAL_PYTHON="$py" || export MODE_HF_LMMS_PYTHON="$py"
    else
        banner "$harness TESTS NOT RUN: its environment could not be built (last lines of its log below)"
        tail -n 20 "$log" >&2
    fi
done
set -e
python -m pytest -q -rs tests/test_harness.py "$@"
