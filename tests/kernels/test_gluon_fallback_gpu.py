"""On a Hopper GPU whose Triton cannot compile the Gluon kernels (a release that renamed a
Gluon call again), the engine runs the Triton kernels instead: the same bits, one warning
per kernel family, and no second attempt.

The condition is made real, not simulated: the CTA barrier is taken out of the installed
Gluon before the engine is imported, so the compiler itself fails on each Gluon kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.gluon_offline import WITHOUT_CTA_BARRIER

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the Gluon kernels run on Hopper (sm_90) only")

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = r"""
import json, sys, warnings
sys.path.insert(0, "tests/kernels")
import torch
from local_backend.kernels import attention, matmul
from kernel_checks import gpu_linear_operands

out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # attention: two prompts, then each one's next token (the default kernel: Gluon on Hopper)
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(2, 1024, 8, 128, device="cuda", generator=gen).bfloat16()
    v = torch.randn(2, 1024, 8, 128, device="cuda", generator=gen).bfloat16()
    slots = torch.arange(2, device="cuda").repeat_interleave(600)
    pos = torch.arange(600, device="cuda").repeat(2)
    q = torch.randn(1200, 32, 128, device="cuda", generator=gen).bfloat16()
    for label, (qq, ss, pp) in {"prefill": (q, slots, pos),
                                "decode": (q[:2], torch.arange(2, device="cuda"),
                                           torch.tensor([900, 650], device="cuda"))}.items():
        ours = attention.attention(qq, k, v, ss, pp, 0.088)
        again = attention.attention(qq, k, v, ss, pp, 0.088)
        triton_kernel = attention.attention(qq, k, v, ss, pp, 0.088, kernel="triton")
        out["attention_" + label] = bool(torch.equal(ours, triton_kernel) and torch.equal(again, ours))
    # matmul in 2-CTA programs (Triton 3.7 on): its refusal gives way to the 1-CTA programs, whose
    # refusal gives way to the bulk-copy kernel
    x, w, b = gpu_linear_operands(512, 4096, 14336)
    pair = matmul.Tiles(128, 128, 64, 4, 5, tma=True, ws=True, cluster=2)
    ours = matmul.linear(x, w, b, tiles=pair)
    plain = matmul.Tiles(128, 128, 64, 4, 3, tma=True, nested=True)
    out["matmul_pair"] = bool(torch.equal(ours, matmul.linear(x, w, b, tiles=plain)))
    out["multicast"] = matmul.gluon_api.MULTICAST
    # matmul: the table's warp-specialised tiles at 2048 rows, against the bulk-copy kernel's
    x, w, b = gpu_linear_operands(2048, 4096, 4096)
    ws = matmul.Tiles(128, 256, 64, 8, 3, GROUP_M=16, tma=True, ws=True)
    plain = matmul.Tiles(128, 256, 64, 8, 3, GROUP_M=16, tma=True)
    ours = matmul.linear(x, w, b, tiles=ws)
    again = matmul.linear(x, w, b, tiles=ws)
    out["matmul"] = bool(torch.equal(ours, matmul.linear(x, w, b, tiles=plain)) and torch.equal(again, ours))
    torch.cuda.synchronize()
out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print(json.dumps(out))
"""


def test_without_a_gluon_call_the_engine_runs_the_triton_kernels_bits():
    proc = subprocess.run([sys.executable, "-c", WITHOUT_CTA_BARRIER + PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                          os.environ.get("PYTHONPATH")]))})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1])
    assert all(result[key] for key in ("attention_prefill", "attention_decode", "matmul", "matmul_pair")), result
    gluon = [w for w in result["warnings"] if "cannot compile the Gluon" in w]
    families = ["attention", "matmul"] + (["matmul-cluster"] if result["multicast"] else [])
    assert sorted(w.split("the Gluon ")[1].split(" ")[0] for w in gluon) == families, gluon
    assert all("none of barrier, thread_barrier" in w for w in gluon), gluon
