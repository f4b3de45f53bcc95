#!/usr/bin/env bash
# The GPU kernel tests and benches under another Triton release than the machine's: does a
# user whose torch pulls in that release get kernels that build, give the same bits, and run
# as fast? The release travels as a tarball of its `triton` package (see bench/NOTES.md,
# "Issue 15, round 15", for how one was cut to fit the device's 64 MiB).
#   bash bench/gpu_triton_release.sh TARBALL OUT_DIR [tests matmul attention points bits]
set -uo pipefail
tarball=${1:?usage: bench/gpu_triton_release.sh TARBALL OUT_DIR [steps...]}
out=${2:?usage: bench/gpu_triton_release.sh TARBALL OUT_DIR [steps...]}
shift 2
dir=$(mktemp -d)
tar -xJf "$tarball" -C "$dir" || { echo "cannot unpack $tarball"; exit 2; }
# the release first on the path; its nvidia backend found in its own tree, not by the
# machine's installed Triton's entry points
export PYTHONPATH=$dir:$PWD PYTHONUNBUFFERED=1 TRITON_BACKENDS_IN_TREE=1
python -c "import triton; print('triton', triton.__version__, triton.__file__)" | tee -a "$out/steps.txt"
# Triton 3.9's bindings print a page of nanobind leak notes at every interpreter exit
clean() { grep -v 'leaked \(function\|type\|instance\)\|nanobind\|skipped remainder\|refleaks' "$1"; }
for step in ${*:-tests}; do
  start=$SECONDS
  case $step in
    tests) timeout ${TESTS_S:-300} python -m pytest -q -x -p no:cacheprovider -p no:warnings \
             ${TESTS_FILES:-tests/kernels/test_gluon_compiles.py tests/kernels/test_gluon_fallback_gpu.py \
             tests/kernels/test_attention_hopper.py tests/kernels/test_matmul_hopper.py tests/kernels/test_matmul_kernel.py} \
             > "$out/tests.log" 2>&1; clean "$out/tests.log" | tail -5 ;;
    matmul) timeout ${MATMUL_S:-120} python bench/bench_matmul.py ${MATMUL_ARGS:-} --json "$out/matmul.json" \
              > "$out/matmul.log" 2>&1; clean "$out/matmul.log" | tail -22 ;;
    points) timeout ${POINTS_S:-120} python bench/sweep_matmul_points.py ${POINTS_ARGS:-} --json "$out/points.json" \
              > "$out/points.log" 2>&1; clean "$out/points.log" | tail -12 ;;
    attention) timeout ${ATTN_S:-120} python bench/bench_attention.py ${ATTN_ARGS:-} --json "$out/attention.json" \
                 > "$out/attention.log" 2>&1; clean "$out/attention.log" | tail -14 ;;
    bits) timeout ${BITS_S:-120} python bench/bits_digest.py --json "$out/bits.json" > "$out/bits.log" 2>&1
          clean "$out/bits.log" | tail -3 ;;
    *) echo "unknown step $step" ;;
  esac
  echo "== $step: $((SECONDS - start)) s" | tee -a "$out/steps.txt"
done
