"""The defaults and rules that several commands share, each written once: the probe and
cluster gap a run starts from, the bundled model's name and "is this a local model?",
the local engine's kernel names and batch sizes. Imports nothing heavy (no torch)."""

from __future__ import annotations

from pathlib import Path

from local_backend.kernel_names import IMPLEMENTATIONS as KERNEL_IMPLS, MODES as KERNEL_MODES

DEFAULT_PROBE = "coin-flip"
DEFAULT_THRESHOLD_PCT = 0.01  # cluster gap, in percentage points of probability
LOCAL_MODEL = "tiny"  # the bundled model
DEFAULT_KERNELS = KERNEL_MODES[0]  # batch-invariant
DEFAULT_KERNEL_IMPL = KERNEL_IMPLS[0]  # auto
DEFAULT_BATCH_SIZES = (1, 3, 8, 32)  # the local engine's repeats cycle through these
SENTINEL_LOGPROB = -9999.0  # what OpenAI-style servers send for some tokens / -inf: not a logprob
MAX_LEVEL = 256  # default cap on a load level (requests in flight beside the target)

__all__ = ["DEFAULT_PROBE", "DEFAULT_THRESHOLD_PCT", "LOCAL_MODEL", "KERNEL_MODES",
           "KERNEL_IMPLS", "DEFAULT_KERNELS", "DEFAULT_KERNEL_IMPL", "DEFAULT_BATCH_SIZES",
           "MAX_LEVEL", "is_local_model", "model_id"]


def is_local_model(model: str | None) -> bool:
    """A model the bundled engine runs in process: none given, the bundled ``tiny``, or
    a model folder on this machine (``~`` expanded). Anything else is a remote name."""
    return model is None or model == LOCAL_MODEL or Path(model).expanduser().is_dir()


def model_id(model: str) -> str:
    """The name a local model is served and stored under: ``tiny``, or the folder's name."""
    return model if model == LOCAL_MODEL else Path(model).expanduser().name
