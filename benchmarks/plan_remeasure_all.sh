#!/usr/bin/env bash
# Re-measure every prediction of #15 back to back, so the fit and the measurements see the same state of the machine:
#   1. slimswarm devices probe (bandwidth + the cost fit on random-weight models, round-robin)   ~45 s
#   2. every variant's decode tok/s, prefill and peak memory in PROCESSES (3) fresh processes     ~3 min
#      each, round-robin over the variants (plan_variants_smollm2.py --remeasure; it runs step 1 itself)
#   3. the example team's plan on two simulated devices, driven at its rates           SECONDS + ~40 s (400 s)
# One thread per process, at normal priority (the timing must not be niced; everything else on the VM is).
# Checkpoints: CHECKPOINTS (default out/variants) holds the five variants; missing ones are built first (~7 min,
# not counted in the estimate). Usage: benchmarks/plan_remeasure_all.sh [SECONDS]   (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN="${1:-400}"
CHECKPOINTS="${CHECKPOINTS:-out/variants}"
PROCESSES="${PROCESSES:-3}"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
est=$((45 + 5 * PROCESSES * 13 + SECONDS_RUN + 40))
echo "plan_remeasure_all: estimated $((est / 60)) min $((est % 60)) s (probe ~45 s + 5 variants x $PROCESSES processes ~$((5 * PROCESSES * 13)) s, simulated devices ~$((SECONDS_RUN + 40)) s); load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(date +%s)
echo "[1+2/3] probe, then every variant re-measured (benchmarks/plan_variants_smollm2.py --remeasure) ..."
"$PY" benchmarks/plan_variants_smollm2.py --remeasure --processes "$PROCESSES" --checkpoints "$CHECKPOINTS" 2>&1 | grep --line-buffered -v "quantize (rtn"
echo "[3/3] the plan on two simulated devices, $SECONDS_RUN s of requests ($(( $(date +%s) - t0 )) s so far) ..."
"$PY" benchmarks/plan_simulated_devices.py --seconds "$SECONDS_RUN"
echo "plan_remeasure_all: done in $(( $(date +%s) - t0 )) s; results: benchmarks/results/plan_variants_smollm2.md, plan_simulated_devices.md"
