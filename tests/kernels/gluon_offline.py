"""Compile the engine's Gluon kernels for sm_90 on a machine with no GPU.

Why: the Gluon API moves between Triton releases (``gl.thread_barrier`` became
``gl.barrier`` in 3.7), and a GPU user gets whatever Triton their torch pulls in. The
CPU interpreter never runs these kernels, so without this a renamed call surfaces only
as a crash on someone's H100. Here the real host code plans and "launches" each kernel
on CPU tensors; the launch is caught before it reaches a driver, bound the way Triton's
own launcher binds it, and compiled by the installed Triton to sm_90a machine code.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from local_backend.kernels import attention, attention_hopper, combine_hopper, gluon_api, matmul_hopper, tile_plan
from local_backend.kernels._triton import INTERPRET, triton
from local_backend.kernels.pass_memo import one_plan_per_pass
from triton.backends.compiler import GPUTarget

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass
class Launch:
    """One caught launch: the kernel, its grid and its arguments."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)


class _Catcher:
    """Stands in for a kernel object: ``kernel[grid](...)`` records the launch."""

    def __init__(self, kernel, caught: list[Launch]):
        self.kernel, self.caught = kernel, caught

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.caught.append(Launch(self.kernel, tuple(grid), args, kwargs))
        return launch


@contextlib.contextmanager
def catch_launches(*modules, sms: int = 132):
    """Within: every Gluon kernel launched from ``modules`` is recorded, not run, and the
    host code sees a GPU of ``sms`` multiprocessors. Yields the list of launches."""
    caught: list[Launch] = []
    saved = []
    for module in modules:
        for name, value in vars(module).items():
            if hasattr(value, "is_gluon") and value.is_gluon():
                saved.append((module, name, value))
                setattr(module, name, _Catcher(value, caught))
    real_sm_count = tile_plan.sm_count
    counted = [m for m in modules if getattr(m, "sm_count", None) is real_sm_count]
    for module in counted:
        module.sm_count = lambda device: sms
    try:
        yield caught
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for module in counted:
            module.sm_count = real_sm_count


def compile_for_hopper(launch: Launch):
    """The launch compiled for sm_90a by the installed Triton (raises its compile error)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from triton.experimental.gluon._runtime import GluonASTSource
    kernel = launch.kernel
    backend = make_backend(HOPPER)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=HOPPER,
                          options=options.__dict__)


def _matmul(M: int, N: int, K: int, chunk: int, bias: bool, block_n: int = 128, cluster: int = 1):
    """One ``matmul_hopper.linear`` (the table's warp-specialised rows), K summed in chunks of
    ``chunk``; ``cluster`` 2: the 2-CTA launch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    out = torch.empty(M, N, dtype=torch.bfloat16)
    b = torch.randn(N, generator=g).bfloat16() if bias else None
    make = matmul_hopper.shared_descriptor if cluster > 1 else matmul_hopper.descriptor
    matmul_hopper.linear(x, make(w, (block_n, 64)), b, out, block_n, 64, 3, 8, chunk, cluster=cluster)


def _attention(lengths: list[int], decode: bool, split_kv: bool | None, hq: int = 32, hkv: int = 8, d: int = 128):
    """One pass of ``attention.attention(kernel="gluon")``: whole prompts (prefill) or each
    sequence's next token (decode)."""
    L = max(lengths) + 64
    k = torch.randn(len(lengths), L, hkv, d).bfloat16()
    v = torch.randn_like(k)
    if decode:
        slots = torch.arange(len(lengths))
        pos = torch.tensor(lengths)
    else:
        slots = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
        pos = torch.cat([torch.arange(n) for n in lengths])
    q = torch.randn(slots.numel(), hq, d).bfloat16()
    with one_plan_per_pass(decode_only=decode):
        attention.attention(q, k, v, slots, pos, d ** -0.5, kernel="gluon", split_kv=split_kv)


CASES = {
    "matmul": lambda: _matmul(256, 512, 1024, 1024, bias=False),
    "matmul-chunked-bias": lambda: _matmul(256, 512, 2048, 512, bias=True),
    "matmul-256": lambda: _matmul(256, 512, 1024, 1024, bias=False, block_n=256),
    "matmul-cluster": lambda: _matmul(512, 512, 2048, 512, bias=True, cluster=2),
    "attention-prefill": lambda: _attention([600, 300], decode=False, split_kv=False),
    "attention-split-kv": lambda: _attention([600, 300], decode=False, split_kv=True),
    "attention-decode": lambda: _attention([599, 300], decode=True, split_kv=True),
}


# Cases that need a release with the multicast bulk copy (Triton 3.7 on); before it the engine
# never launches them (matmul.linear runs the 1-CTA programs), so they are not compiled.
NEEDS_MULTICAST = {"matmul-cluster"}


def launches(case: str):
    """The Gluon launches of one case, caught, not run."""
    with catch_launches(attention, attention_hopper, combine_hopper, matmul_hopper, tile_plan) as caught:
        CASES[case]()
    return caught


def compile_all(cases=None) -> list[dict]:
    """Each case's launches compiled for sm_90a: one row per launch (error: None if it compiled)."""
    rows = []
    for case in cases or CASES:
        if case in NEEDS_MULTICAST and not gluon_api.MULTICAST:
            rows.append(dict(case=case, kernel=None, error=None, skipped=f"Triton {triton.__version__}: no multicast"))
            continue
        for launch in launches(case):
            name = launch.kernel.fn.__name__
            start = time.perf_counter()
            try:
                compiled = compile_for_hopper(launch)
            except Exception as error:  # the compiler's own message is the finding
                rows.append(dict(case=case, kernel=name, error=gluon_api.why(error)))
                continue
            rows.append(dict(case=case, kernel=name, error=None, seconds=round(time.perf_counter() - start, 2),
                             shared=compiled.metadata.shared, cubin_bytes=len(compiled.asm["cubin"]),
                             cubin_sha=hashlib.sha256(compiled.asm["cubin"]).hexdigest()[:16],
                             target=str(compiled.metadata.target.arch)))
    return rows


# Run before the engine is imported: a Gluon without either name of the CTA barrier, as a
# release that renamed it again would be (test_gluon_compiles.py, test_gluon_fallback_gpu.py).
WITHOUT_CTA_BARRIER = ("from triton.experimental.gluon import language as gl\n"
                       "for name in ('barrier', 'thread_barrier'):\n"
                       "    if hasattr(gl, name):\n"
                       "        delattr(gl, name)\n")


def report_in_fresh_process(cases=(), prelude: str = "", path=()) -> dict:
    """``main --json``'s report from a new process: the compiler on (not the interpreter), a
    cold kernel cache, ``path`` (folders holding another ``triton``) first on the import path,
    ``prelude`` run before anything is imported. A process that printed no report gives
    ``rows`` [] and its last stderr lines as ``crash``."""
    root = Path(__file__).resolve().parents[2]
    code = prelude + ("import sys\nfrom tests.kernels import gluon_offline\n"
                      f"sys.exit(gluon_offline.main(['--json', *{list(cases)!r}]))\n")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, path), str(root)]),
               "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache}
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                              timeout=1800)
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if reports:
        return json.loads(reports[-1])
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
    return dict(triton=None, rows=[], crash=f"exit {proc.returncode}: " + " | ".join(tail))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"default: all of {', '.join(CASES)}")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    args = parser.parse_args(argv)
    if INTERPRET:
        parser.error("run with TRITON_INTERPRET=0: under the interpreter Triton's own reductions cannot be compiled")
    rows = compile_all(args.cases)
    if args.json:
        print(json.dumps(dict(triton=triton.__version__, rows=rows)))
    else:
        print(f"Triton {triton.__version__}")
        for r in rows:
            status = r.get("skipped") or ("ok" if r["error"] is None else "FAILED " + r["error"])
            print(f"  {r['case']:22s} {r['kernel'] or '-':24s} {status}")
    return 0 if all(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
