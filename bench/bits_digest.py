"""Do the batch-invariant GPU kernels give the same bits under another Triton release?

    python bench/bits_digest.py --json OUT.json       # once per release, e.g. with a carried
                                                      # release first on PYTHONPATH (gpu_triton_release.sh)
    python bench/bits_digest.py --compare A.json B.json

Each kernel runs on fixed inputs (seeded on the GPU); the digest is a SHA-256 of its output's
bytes. Equal digests under two releases mean equal bits for those inputs; a differing one
means the release is part of what decides the numbers, so a ``system_fingerprint`` without
the Triton version would name two configurations as one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _digest(t) -> str:
    """The first 16 hex digits of the SHA-256 of a tensor's bytes."""
    import torch
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()[:16]


def digests() -> dict[str, str]:
    import torch
    from local_backend.kernels import activation, attention, matmul, rmsnorm, softmax
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()

    out = {}
    for M, N, K in [(8, 4096, 4096), (512, 4096, 14336), (2048, 4096, 4096), (512, 14336, 4096)]:
        x, w, b = randn(M, K), randn(N, K, scale=K ** -0.5), randn(N)
        out[f"matmul {M}x{N}x{K}"] = _digest(matmul.linear(x, w, b))
    x = randn(300, 4096)
    out["rms_norm"] = _digest(rmsnorm.rms_norm(x, randn(4096), 1e-6))
    out["silu_mul"] = _digest(activation.silu_mul(randn(300, 14336), randn(300, 14336)))
    out["log_softmax"] = _digest(softmax.log_softmax(torch.randn(8, 32000, device="cuda", generator=gen)))
    k, v = randn(2, 1024, 8, 128), randn(2, 1024, 8, 128)
    slots = torch.arange(2, device="cuda").repeat_interleave(600)
    pos = torch.arange(600, device="cuda").repeat(2)
    q = randn(1200, 32, 128)
    next_slots, next_pos = torch.arange(2, device="cuda"), torch.tensor([900, 650], device="cuda")
    for kernel in ("gluon", "triton"):
        out[f"attention prefill {kernel}"] = _digest(attention.attention(q, k, v, slots, pos, 0.088, kernel=kernel))
        out[f"attention decode {kernel}"] = _digest(attention.attention(q[:2], k, v, next_slots, next_pos, 0.088,
                                                                        kernel=kernel))
    torch.cuda.synchronize()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write {'triton': version, 'digests': {...}} here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="two --json files")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        print(f"{'kernel':28s} | {a['triton']:>16s} | {b['triton']:>16s} | same")
        for name, value in a["digests"].items():
            other = b["digests"].get(name)
            print(f"{name:28s} | {value:>16s} | {other or '-':>16s} | {value == other}")
        return 0
    import triton
    report = {"triton": triton.__version__, "digests": digests()}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
