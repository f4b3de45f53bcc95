#!/usr/bin/env bash
# Every GPU benchmark in one go, from the repository root:
#   bash bench/gpu_all.sh OUT_DIR [tune]
# Writes OUT_DIR/{matmul,attention,e2e}.json and one log per bench; with "tune",
# the tile sweeps instead of the table figures (no e2e).
set -uo pipefail
out=${1:?usage: bench/gpu_all.sh OUT_DIR [tune]}
mode=${2:-}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw --format=csv | tee "$out/gpu.txt"
if [ "$mode" = tune ]; then
  python bench/bench_matmul.py --tune ${TUNE_MATMUL:-1} --rep 25 --json "$out/matmul_tune.json" 2>&1 | tee "$out/matmul_tune.log"
  python bench/bench_attention.py --tune --rep 25 --json "$out/attention_tune.json" 2>&1 | tee "$out/attention_tune.log"
else
  python bench/bench_matmul.py --json "$out/matmul.json" 2>&1 | tee "$out/matmul.log"
  python bench/bench_attention.py --json "$out/attention.json" 2>&1 | tee "$out/attention.log"
  python bench/bench_e2e.py ${E2E_ARGS:-} --json "$out/e2e.json" 2>&1 | tee "$out/e2e.log"
fi
