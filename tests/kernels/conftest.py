"""Fixtures of the kernel tests: the Ops objects and a seeded generator.

``bi`` is every batch-invariant implementation that runs here: the Triton kernels
(compiled on a GPU, under Triton's interpreter on a CPU) and, on a CPU, the
exact-order torch ops the engine runs there. Every kernel test runs against each.
"""

from __future__ import annotations

import pytest
import torch

from local_backend.kernels import get_ops
from local_backend.kernels.torch_ops import TorchOps

from kernel_checks import DEVICE

IMPLEMENTATIONS = ["triton", "cpu-exact"] if DEVICE == "cpu" else ["triton"]


@pytest.fixture(params=IMPLEMENTATIONS)
def bi(request):
    return get_ops("batch-invariant", DEVICE, request.param)


@pytest.fixture
def default_ops() -> TorchOps:
    return TorchOps()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
