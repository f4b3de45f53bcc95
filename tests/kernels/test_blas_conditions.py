"""Batch invariance under the conditions that break it: other BLAS kernels, other
vector widths, other thread counts.

A fresh process per condition runs tests/kernels/invariance_probe.py (environment
variables such as OPENBLAS_CORETYPE apply only from a process's first import). Under
Haswell and Zen core types numpy's sgemm gives a row other bits at another place in
its block, which is what made the interpreter's Triton kernels invariant or not by
the CPU they landed on. Every batch-invariant implementation must give the same bits
for a row alone and in any batch under every condition, the cpu-exact ops the same
bits under all of them, and the default kernels must still move somewhere.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROBE = Path(__file__).with_name("invariance_probe.py")
ROOT = PROBE.parents[2]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = _cpu_flags()
X86 = platform.machine() in ("x86_64", "AMD64")
# OpenBLAS core types and what the CPU must have to run them.
CORE_TYPES = {"Haswell": {"avx2", "fma"}, "Zen": {"avx2", "fma"},
              "SkylakeX": {"avx512f", "avx512bw", "avx512dq", "avx512vl"}, "Prescott": {"pni"}}
CONDITIONS = [pytest.param({"OPENBLAS_CORETYPE": core}, id=f"openblas-{core}",
                           marks=pytest.mark.skipif(not X86 or not needs <= FLAGS,
                                                    reason=f"this CPU cannot run OpenBLAS {core} kernels"))
              for core, needs in CORE_TYPES.items()]
CONDITIONS += [
    pytest.param({"ATEN_CPU_CAPABILITY": "default", "DETAUDIT_PROBE_THREADS": "1",
                  "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}, id="torch-scalar-1-thread"),
    pytest.param({"ATEN_CPU_CAPABILITY": "avx2", "DETAUDIT_PROBE_THREADS": "2"}, id="torch-avx2-2-threads",
                 marks=pytest.mark.skipif(not {"avx2", "fma"} <= FLAGS, reason="no AVX2 here")),
]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU conditions; the GPU has its own tests")]

_coin_flips: dict[str, dict] = {}


def run_probe(condition: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY")}
    env.update(condition)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("condition", CONDITIONS)
def test_batch_invariant_under_condition(condition):
    report = run_probe(condition)
    print(f"{condition}: numpy matmul rows differing {report['numpy_matmul_rows_differing']} of 80")
    if condition.get("OPENBLAS_CORETYPE") in ("Haswell", "Zen"):
        # The condition is real: a BLAS matmul here is not row-invariant.
        assert report["numpy_matmul_rows_differing"] > 0, \
            "numpy's matmul was row-invariant under this core type: the condition no longer stresses anything"
    for implementation, found in report["implementations"].items():
        assert all(count == 0 for count in found["rowwise"].values()), (implementation, found["rowwise"])
        assert found["packed_scores_differing"] == 0, implementation  # crosscheck's packed reference
        for label, texts in found["coin_flip"].items():
            assert len(texts) == 1, f"{implementation}: {len(texts)} distinct logprobs of {label}: {texts}"
    exact = report["implementations"]["cpu-exact"]["coin_flip"]
    _coin_flips[str(condition)] = exact
    # cpu-exact is exact arithmetic: the same bits under every condition, not only within one.
    assert all(other == exact for other in _coin_flips.values()), _coin_flips
    default = report["default"]
    moved = sum(default["rowwise"].values()) + sum(len(t) - 1 for t in default["coin_flip"].values())
    assert moved > 0, f"negative control: the default kernels never moved under {condition}"
