"""The Gluon kernels (attention_hopper, combine_hopper, matmul_hopper) compile for sm_90a
under the installed Triton, on any machine: CI's pip takes the newest Triton, whose Gluon
API moves release to release, while the CPU interpreter never compiles these kernels.
Each run plans and launches every kernel mode through the engine's real host code
(``gluon_offline``) and compiles it to machine code with Triton's own compiler and ptxas.

And where a release lacks a call they use, the import still works and the kernel's compile
fails with a message naming the call (on a GPU the engine then runs the Triton kernels:
``test_gluon_fallback_gpu.py``)."""

from __future__ import annotations

from tests.kernels.gluon_offline import WITHOUT_CTA_BARRIER, report_in_fresh_process

KERNELS = {"hopper_linear_kernel", "hopper_attention_kernel", "combine_kernel"}


def test_every_gluon_kernel_compiles_for_hopper_with_the_installed_triton():
    report = report_in_fresh_process()
    rows = [r for r in report["rows"] if not r.get("skipped")]
    assert rows, report
    failed = [f"{r['case']}/{r['kernel']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, f"Triton {report['triton']}:\n" + "\n".join(failed)
    assert {r["kernel"] for r in rows} == KERNELS
    assert {r["case"] for r in rows} >= {"matmul-chunked-bias", "attention-prefill", "attention-split-kv",
                                          "attention-decode"}
    assert all(r["cubin_bytes"] > 10_000 and r["target"] == "90" for r in rows), rows


def test_a_release_without_a_call_fails_the_compile_not_the_import():
    """Gluon with neither name of the CTA barrier (as a future release that renames it again):
    the modules import, and the kernels that use it fail to compile, naming the call."""
    report = report_in_fresh_process(prelude=WITHOUT_CTA_BARRIER)
    rows = [r for r in report["rows"] if not r.get("skipped")]
    assert rows, report
    broken = {r["kernel"] for r in rows if r["error"]}
    assert broken == KERNELS, rows  # every Gluon kernel waits at a CTA barrier somewhere
    assert all("none of barrier, thread_barrier" in r["error"] for r in rows if r["error"]), rows
