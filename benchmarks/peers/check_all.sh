#!/usr/bin/env bash
# End-to-end check of the peer path (not a test): for each peer, build its venv, quantize the bundled bench model's
# routed experts with it, export the peer's checkpoint to a 16-bit model of the original layout, and evaluate that.
#
#     bash benchmarks/peers/check_all.sh WORK_DIR [PEER ...]        (from the repo root, in the project's env)
#
# PEER: autoround llmcompressor gptqmodel gptqconfig (default: all four). Environment (defaults): MODEL (the bundled
# bench model), BITS=3, GROUP=32, COUNT=16 calibration samples, ITERS=20 (AutoRound), PER_FAMILY=20 (evaluation),
# VENVS=WORK_DIR/venvs, REFERENCE=1 also quantizes with mode-hf's own uniform GPTQ / RTN on the same samples, for
# scale. One thread everywhere. A peer that fails is reported and the others still run; the exit status is 1 if
# any step failed. Writes WORK_DIR/summary.md (and prints it).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 WORK_DIR [PEER ...]" >&2; exit 2; }
WORK=$(mkdir -p "$1" && cd "$1" && pwd); shift
PEERS=("$@"); [ ${#PEERS[@]} -gt 0 ] || PEERS=(autoround llmcompressor gptqmodel gptqconfig)
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-mode_hf/bench/assets/bench_model}
BITS=${BITS:-3} GROUP=${GROUP:-32} COUNT=${COUNT:-16} ITERS=${ITERS:-20} PER_FAMILY=${PER_FAMILY:-20}
VENVS=${VENVS:-$WORK/venvs} REFERENCE=${REFERENCE:-1} PYTHON=${PROJECT_PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's mode_hf, installed or not (run from the repo root)
mkdir -p "$WORK/logs"
failed=()

timed() {  # timed NAME LOG COMMAND...: run, log, record seconds in WORK/times.tsv; non-zero on failure
  local name=$1 log=$2; shift 2
  local start=$SECONDS rc=0
  "$@" >"$log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - start))" "$rc" >>"$WORK/times.tsv"
  if [ "$rc" -ne 0 ]; then
    echo "FAILED ($rc): $name; log $log; its last lines:" >&2
    tail -n 15 "$log" >&2
  fi
  return "$rc"
}

: >"$WORK/times.tsv"
CALIB="$WORK/calibration/calibration.jsonl"
timed calibration "$WORK/logs/calibration.log" "$PYTHON" "$HERE/write_calibration.py" "$WORK/calibration" --count "$COUNT" || exit 1
timed eval-original "$WORK/logs/eval-original.log" "$PYTHON" -m mode_hf.bench.evaluation "$MODEL" --per-family "$PER_FAMILY" \
  --json "$WORK/eval-original.json" || failed+=(eval-original)

if [ "$REFERENCE" = 1 ]; then
  for q in gptq rtn; do
    out="$WORK/mode-uniform-$q-w$BITS-g$GROUP"
    if timed "mode-uniform-$q" "$WORK/logs/mode-uniform-$q.log" "$PYTHON" -m mode_hf.cli quantize "$MODEL" --out "$out" \
         --method uniform --quantizer "$q" --avg-bits "$BITS" --bits "$BITS" --group-size "$GROUP" --symmetric \
         --calib "$CALIB" --no-report; then
      timed "eval-mode-uniform-$q" "$WORK/logs/eval-mode-uniform-$q.log" "$PYTHON" -m mode_hf.bench.evaluation "$out" \
        --per-family "$PER_FAMILY" --json "$WORK/eval-mode-uniform-$q.json" || failed+=("eval-mode-uniform-$q")
    else failed+=("mode-uniform-$q"); fi
  done
fi

for peer in "${PEERS[@]}"; do
  saved="$WORK/$peer-w$BITS-g$GROUP"
  timed "setup-$peer" "$WORK/logs/setup-$peer.log" bash "$HERE/setup.sh" "$VENVS" "$peer" || { failed+=("setup-$peer"); continue; }
  rm -rf "$saved" "$saved-export"
  timed "quantize-$peer" "$WORK/logs/quantize-$peer.log" "$VENVS/$peer/bin/python" "$HERE/run_peer.py" --peer "$peer" \
    --model "$MODEL" --calibration "$CALIB" --bits "$BITS" --group-size "$GROUP" --out "$saved" --iters "$ITERS" \
    || { failed+=("quantize-$peer"); continue; }
  timed "export-$peer" "$WORK/logs/export-$peer.log" "$PYTHON" -m mode_hf.bench.peer_export "$saved" "$MODEL" "$saved-export" \
    --bits "$BITS" --group-size "$GROUP" || { failed+=("export-$peer"); continue; }
  timed "eval-$peer" "$WORK/logs/eval-$peer.log" "$PYTHON" -m mode_hf.bench.evaluation "$saved-export" \
    --per-family "$PER_FAMILY" --json "$WORK/eval-$peer.json" || failed+=("eval-$peer")
done

"$PYTHON" - "$WORK" "$BITS" "$GROUP" "${PEERS[@]}" <<'EOF' | tee "$WORK/summary.md"
import json, sys
from pathlib import Path
work, bits, group, peers = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
times = {}
for line in (work / "times.tsv").read_text().splitlines():
    name, seconds, rc = line.split("\t")
    times[name] = (int(seconds), int(rc))
def load(p):
    return json.loads(p.read_text()) if p.exists() else None
def acc(e, fam):
    return f"{100 * e['families'][fam]['accuracy']:.1f}" if e else "-"
def nll(e, fam):
    return f"{e['families'][fam]['nll']:.3f}" if e else "-"
print(f"| row | version | quantized (experts / other) | calibration seen (samples, with images) | expert payload bits | stored bits "
      f"| vision acc % | text acc % | vision NLL | text NLL | quantize s | export s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
e = load(work / "eval-original.json")
print(f"| original (float32) | - | - | - | 32 | 32 | {acc(e,'vision')} | {acc(e,'text')} | {nll(e,'vision')} | {nll(e,'text')} | - | - |")
for q in ("gptq", "rtn"):
    e = load(work / f"eval-mode-uniform-{q}.json")
    if e is None and f"mode-uniform-{q}" not in times:
        continue
    summary = load(work / f"mode-uniform-{q}-w{bits}-g{group}" / "config.json") or {}
    eff = (summary.get("quantization_config", {}).get("summary") or {}).get("effective_bits")
    print(f"| mode-hf uniform {q} | - | experts | same file | {eff if eff is not None else '-'} | - | {acc(e,'vision')} | {acc(e,'text')} "
          f"| {nll(e,'vision')} | {nll(e,'text')} | {times.get(f'mode-uniform-{q}', ('-',))[0]} | - |")
for peer in peers:
    run = load(work / f"{peer}-w{bits}-g{group}" / "peer_run.json") or {}
    exp = load(work / f"{peer}-w{bits}-g{group}-export" / "peer_export.json") or {}
    e = load(work / f"eval-{peer}.json")
    q = run.get("quantized_modules") or {}
    seen = (run.get("calibration") or {}).get("seen_by_model") or {}
    ex = exp.get("experts") or {}
    status = "" if not run.get("error") else f" FAILED: {run['error'][:80]}"
    print(f"| {peer}{status} | {run.get('version', '-')} | {q.get('experts', '-')} / {q.get('non_expert', '-')} "
          f"| {seen.get('samples', '-')}, {seen.get('with_images', '-')} | {ex.get('payload_bits', float('nan')):.3f} "
          f"| {ex.get('effective_bits', float('nan')):.3f} | {acc(e,'vision')} | {acc(e,'text')} | {nll(e,'vision')} | {nll(e,'text')} "
          f"| {times.get(f'quantize-{peer}', ('-',))[0]} | {times.get(f'export-{peer}', ('-',))[0]} |")
EOF

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}" >&2
  exit 1
fi
