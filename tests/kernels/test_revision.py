"""KERNELS_REVISION (local_backend/kernels/revision.py): its format, its place in the
engine's fingerprint, and the cpu-exact ops' bits pinned per revision, so a change of
their arithmetic without a bump fails here. cpu-exact gives the same bits on every CPU
with any BLAS (exact_cpu.py says why), so the pin holds on any machine."""

from __future__ import annotations

import hashlib
import re

import torch

from local_backend.kernels import get_ops
from local_backend.kernels.revision import KERNELS_REVISION

# revision -> sha256 of the cpu-exact ops' outputs on the inputs below. A change of the
# kernels' arithmetic bumps KERNELS_REVISION and adds its digest here (old ones stay).
PINNED = {
    "2026.12": "c74e46d2a2bc665c534d95438d76f274346f1b12c0414fea2447d1d368ab63d1",
}


def values(*shape: int, salt: int, dtype=torch.float32) -> torch.Tensor:
    """Numbers fixed by integer arithmetic alone (no RNG, no library's rounding), of
    magnitudes spread over 2^-3 .. 2^3, with a few zeros."""
    i = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int64)
    mantissa = ((i * 2654435761 + salt * 40503) % 2001 - 1000).double() / 257
    scale = torch.pow(2.0, ((i * 7 + salt) % 7 - 3).double())
    return (mantissa * scale).to(dtype).reshape(shape)


def outputs() -> list[tuple[str, torch.Tensor]]:
    """Every op of the cpu-exact implementation, in float32 and bfloat16, on shapes that
    span several 32-wide chunks of the reduced axis and a ragged last one."""
    ops = get_ops("batch-invariant", "cpu", "cpu-exact")
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        x, w, b = values(5, 200, salt=1, dtype=dtype), values(70, 200, salt=2, dtype=dtype), values(70, salt=3, dtype=dtype)
        out.append((f"linear {name}", ops.linear(x, w, b)))
        out.append((f"rms_norm {name}", ops.rms_norm(values(4, 96, salt=4, dtype=dtype),
                                                     values(96, salt=5, dtype=dtype), 1e-6)))
        out.append((f"silu_mul {name}", ops.silu_mul(values(4, 150, salt=6, dtype=dtype),
                                                     values(4, 150, salt=7, dtype=dtype))))
        out.append((f"log_softmax {name}", ops.log_softmax(values(3, 1000, salt=8, dtype=dtype))))
        q = values(3, 4, 16, salt=9, dtype=dtype)
        k, v = values(2, 40, 2, 16, salt=10, dtype=dtype), values(2, 40, 2, 16, salt=11, dtype=dtype)
        slots, positions = torch.tensor([0, 1, 1]), torch.tensor([30, 5, 39])
        out.append((f"attention {name}", ops.attention(q, k, v, slots, positions, 0.25)))
    return out


def digest() -> str:
    h = hashlib.sha256()
    for name, tensor in outputs():
        t = tensor.contiguous()
        h.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
        h.update(t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().tobytes())
    return h.hexdigest()


def test_the_revision_is_digits_and_dots():
    assert re.fullmatch(r"\d{4}\.\d{2}(\.\d+)?", KERNELS_REVISION), KERNELS_REVISION


def test_the_cpu_exact_bits_are_those_pinned_for_this_revision():
    got = digest()
    assert KERNELS_REVISION in PINNED and PINNED[KERNELS_REVISION], (
        f"KERNELS_REVISION {KERNELS_REVISION} has no digest pinned: add "
        f"PINNED[{KERNELS_REVISION!r}] = {got!r} to {__file__}")
    assert got == PINNED[KERNELS_REVISION], (
        f"the cpu-exact ops give other bits than revision {KERNELS_REVISION} did: a change "
        "of the kernels' arithmetic bumps KERNELS_REVISION (local_backend/kernels/revision.py) "
        f"and pins the new digest here ({got!r})")
