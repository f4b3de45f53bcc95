"""The Gluon kernels (attention_hopper, combine_hopper, matmul_hopper) compile for sm_90a
under the installed Triton, on any machine: CI's pip takes the newest Triton, whose Gluon
API moves release to release, while the CPU interpreter never compiles these kernels.
Each run plans and launches every kernel mode through the engine's real host code
(``gluon_offline``) and compiles it to machine code with Triton's own compiler and ptxas.

And where a release lacks a call they use, the import still works and the kernel's compile
fails with a message naming the call (on a GPU the engine then runs the Triton kernels:
``test_gluon_fallback_gpu.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"hopper_linear_kernel", "hopper_attention_kernel", "combine_kernel"}


def _compile_all(tmp_path, prelude: str = "") -> dict:
    """gluon_offline's report, run in a fresh process with the compiler on (not the interpreter)
    and a cold kernel cache."""
    code = prelude + "import sys\nfrom tests.kernels import gluon_offline\nsys.exit(gluon_offline.main(['--json']))\n"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert reports, f"no report (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(reports[-1])


def test_every_gluon_kernel_compiles_for_hopper_with_the_installed_triton(tmp_path):
    report = _compile_all(tmp_path)
    rows = report["rows"]
    failed = [f"{r['case']}/{r['kernel']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, f"Triton {report['triton']}:\n" + "\n".join(failed)
    assert {r["kernel"] for r in rows} == KERNELS
    assert {r["case"] for r in rows} >= {"matmul-chunked-bias", "attention-prefill", "attention-split-kv",
                                          "attention-decode"}
    assert all(r["cubin_bytes"] > 10_000 and r["target"] == "90" for r in rows), rows


def test_a_release_without_a_call_fails_the_compile_not_the_import(tmp_path):
    """Gluon with neither name of the CTA barrier (as a future release that renames it again):
    the modules import, and the kernels that use it fail to compile, naming the call."""
    prelude = ("from triton.experimental.gluon import language as gl\n"
               "for name in ('barrier', 'thread_barrier'):\n"
               "    if hasattr(gl, name):\n"
               "        delattr(gl, name)\n")
    rows = _compile_all(tmp_path, prelude)["rows"]
    broken = {r["kernel"] for r in rows if r["error"]}
    assert broken == KERNELS, rows  # every Gluon kernel waits at a CTA barrier somewhere
    assert all("none of barrier, thread_barrier" in r["error"] for r in rows if r["error"]), rows
