"""Without CUDA the kernels switch Triton's interpreter on by themselves, even when
another library (transformers' Llama) imported Triton first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # imports triton first
assert "triton" in sys.modules
import torch
from local_backend.kernels.batch_invariant import BatchInvariantOps
x = torch.randn(4, 32)
out = BatchInvariantOps().log_softmax(x)
assert torch.allclose(out, torch.log_softmax(x, -1), atol=1e-6)
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is the CPU path")
def test_kernels_run_on_cpu_after_triton_was_imported_elsewhere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
