#!/usr/bin/env bash
# One device session: CUDA tests, then the benches, each under its own time limit,
# everything packed into OUT_DIR/results.tar.gz (a lease returns few files).
#   bash bench/gpu_check_and_bench.sh OUT_DIR [steps...]    steps: tests attention e2e tune matmul
set -uo pipefail
out=${1:?usage: bench/gpu_check_and_bench.sh OUT_DIR [steps...]}
shift
steps=${*:-tests attention e2e tune matmul}
work=$(mktemp -d)
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw --format=csv | tee "$work/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$work/gpu.txt"
for step in $steps; do
  start=$SECONDS
  case $step in
    tests)  # two processes: tests/local runs CPU engines under the interpreter, chosen before Triton loads
      (timeout 100 python -m pytest -q -p no:warnings tests/kernels
       timeout 150 python -m pytest -q -p no:warnings tests/local) 2>&1 | tail -30 | tee "$work/tests.log" ;;
    attention) timeout 120 python bench/bench_attention.py --json "$work/attention.json" 2>&1 | tee "$work/attention.log" ;;
    e2e) timeout 200 python bench/bench_e2e.py ${E2E_ARGS:-} --json "$work/e2e.json" 2>&1 | tee "$work/e2e.log" ;;
    tune) timeout ${TUNE_S:-150} python bench/bench_attention.py --tune --rep 20 --cases ${TUNE_CASES:-all} \
            --json "$work/attention_tune.json" 2>&1 | tee "$work/attention_tune.log" ;;
    matmul) timeout 120 python bench/bench_matmul.py --json "$work/matmul.json" 2>&1 | tee "$work/matmul.log" ;;
  esac
  echo "== $step: $((SECONDS - start)) s" | tee -a "$work/steps.txt"
  tar -czf "$out/results.tar.gz" -C "$work" .  # after every step: a later timeout loses nothing
done
