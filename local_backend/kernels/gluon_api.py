"""The Gluon calls whose names moved between Triton releases, resolved once for the
installed Triton, so one kernel source compiles under Triton 3.6 through 3.9.

Why: a GPU user gets whichever Triton their torch pulls in, and Gluon is Triton's
experimental layer: Triton 3.7 renamed ``gl.thread_barrier`` to ``gl.barrier``, and 3.9
removed the bulk copies' first names (``tma.async_copy_global_to_shared`` is
``tma.async_load`` from 3.8, ``async_copy_shared_to_global`` ``async_store``, and the
ampere ``async_copy.async_copy_global_to_shared`` ``async_copy.async_load``). The CPU
interpreter never compiles these kernels; ``tests/kernels/test_gluon_compiles.py``
compiles them for sm_90 with the installed Triton, and ``bench/compile_gluon.py`` with
every release named.
"""

from __future__ import annotations

import inspect
import warnings

from local_backend.kernels._triton import triton  # noqa: F401  (first: it sets the interpreter switch)
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.language.core import builtin


def _first(module, *names):
    """The first of ``names`` that ``module`` has (newest name first: Triton 3.9 keeps the old
    names only as stubs that raise "has been removed"). If it has none (a release that renamed the
    call again), a stand-in that fails the kernel's compile with a message naming them: the
    callers then run the Triton kernel (``refuse``), and importing this module never fails."""
    for name in names:
        found = getattr(module, name, None)
        if found is not None:
            return found
    return _missing(f"none of {', '.join(names)}")


def _missing(what: str):
    """A stand-in for a Gluon call this Triton lacks: it fails the compile of any kernel that
    reaches it, saying ``what`` is missing (importing it, or a dead branch naming it, is fine)."""
    @builtin
    def missing(*args, _semantic=None, **kwargs):
        raise RuntimeError(f"Triton {triton.__version__}'s Gluon has {what}")
    return missing


# Every thread of the CTA waits here (bar.sync 0); the same instruction in every release.
cta_barrier = _first(gl, "barrier", "thread_barrier")
# A bulk tensor copy global -> shared (args: descriptor, coordinates, mbarrier, destination)
# and shared -> global (descriptor, coordinates, source); the same instructions in every release.
tma_load = _first(tma, "async_load", "async_copy_global_to_shared")
tma_store = _first(tma, "async_store", "async_copy_shared_to_global")


# Whether this Triton's bulk copy can multicast: one CTA of a cluster copies into every CTA of it
# (Triton 3.7 on).
MULTICAST = "multicast" in inspect.signature(tma_load).parameters


def _with_multicast(load):
    """``load`` with ``multicast=True``, or where it cannot (``MULTICAST`` False) a stand-in
    that fails the compile naming what is missing."""
    if MULTICAST:
        @builtin
        def multicast_load(desc, coord, barrier, result, _semantic=None):
            return load(desc, coord, barrier, result, multicast=True, _semantic=_semantic)
        return multicast_load
    return _missing("no multicast bulk copy (from Triton 3.7)")


# A bulk copy global -> shared into the same place of both CTAs of a 2-CTA cluster, issued by
# the first (args as tma_load's).
tma_multicast_load = _with_multicast(tma_load)
# mbarriers for a cluster: one per CTA, or (two_ctas=True) one per pair, in its first CTA; Triton 3.7 on
allocate_mbarrier = _first(mbarrier, "allocate_mbarrier")
# A per-thread asynchronous copy global -> shared (cp.async; args: destination, pointers, mask=)
cp_async_load = _first(async_copy, "async_load", "async_copy_global_to_shared")

# Kernel families ("attention", "matmul") whose Gluon kernel the installed Triton refused to
# compile, with the line of its error that says why. Each family has a Triton kernel that gives the
# same bits (tests/kernels/test_attention_hopper.py, test_matmul_hopper.py); the callers run
# that one instead, so a Triton release that renames another Gluon call costs speed, not a crash.
_refused: dict[str, str] = {}


def refused(family: str) -> bool:
    """Whether ``family``'s Gluon kernel failed to compile in this process."""
    return family in _refused


def why(error: BaseException) -> str:
    """What a compile error says at its root: Triton wraps the failing call's own message in
    one CompilationError per enclosing function, each ending in a caret line."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and line.strip() != "^"]
    return (lines[-1] if lines else type(error).__name__)[:300]


def refuse(family: str, error: Exception, instead: str = "") -> None:
    """Record that ``family``'s Gluon kernel does not compile here, and say so once (``instead``:
    what runs in its place, by default the Triton kernel of that family)."""
    _refused[family] = reason = why(error)
    warnings.warn(f"Triton {triton.__version__} cannot compile the Gluon {family} kernel ({reason}); "
                  f"running {instead or f'the Triton {family} kernel'} instead: the same bits, slower on Hopper. "
                  "Upgrade detaudit, or install the Triton release your torch was built with.",
                  RuntimeWarning, stacklevel=3)


__all__ = ["MULTICAST", "allocate_mbarrier", "cp_async_load", "cta_barrier", "refuse", "refused", "tma_load",
           "tma_multicast_load", "tma_store", "why"]
