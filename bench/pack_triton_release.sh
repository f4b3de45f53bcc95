#!/usr/bin/env bash
# Cut a Triton wheel down to what compiles and launches for NVIDIA GPUs, as one xz tarball of
# its `triton` package that fits the device's 64 MiB (3.9.0: 286 MB wheel -> 52 MB), for
# bench/gpu_triton_release.sh. The wheel must match the device's Python (3.12 there):
#   pip download --no-deps --python-version 3.12 --only-binary=:all: triton==3.9.0 -d wheels/
#   bash bench/pack_triton_release.sh wheels/triton-3.9.0-cp312-*.whl .t39/t39.tar.xz
set -euo pipefail
wheel=${1:?usage: bench/pack_triton_release.sh WHEEL OUT.tar.xz}
out=$(realpath -m "${2:?usage: bench/pack_triton_release.sh WHEEL OUT.tar.xz}")
work=$(mktemp -d)
unzip -q "$(realpath "$wheel")" 'triton/*' -d "$work"
cd "$work/triton"
# not needed to build or launch for sm_90: the AMD backend, the profilers, test plugins, the
# disassemblers, and the legacy ptxas (from 3.9 sm_90 is built by ptxas-blackwell)
rm -rf backends/amd backends/nvidia/lib/cupti backends/nvidia/lib/cupti-blackwell profiler plugins instrumentation \
       _C/libproton.so backends/nvidia/bin/cuobjdump backends/nvidia/bin/nvdisasm
[ -f backends/nvidia/bin/ptxas-blackwell ] && rm -f backends/nvidia/bin/ptxas
strip --strip-unneeded _C/libtriton.so  # symbols only: 500 -> 192 MB for 3.9.0
cd "$work"
mkdir -p "$(dirname "$out")"
tar -cf - triton | xz -T0 -9 > "$out"
rm -rf "$work"
ls -la "$out"
