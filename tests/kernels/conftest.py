"""Fixtures of the kernel tests: the two Ops objects and a seeded generator.

The batch-invariant kernels run for real, under Triton's interpreter on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from local_backend.kernels.batch_invariant import BatchInvariantOps
from local_backend.kernels.torch_ops import TorchOps


@pytest.fixture
def bi() -> BatchInvariantOps:
    return BatchInvariantOps()


@pytest.fixture
def default_ops() -> TorchOps:
    return TorchOps()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
