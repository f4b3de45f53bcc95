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

from local_backend.kernels._triton import triton  # noqa: F401  (first: it sets the interpreter switch)
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import tma

# Every thread of the CTA waits here (bar.sync 0); the same instruction in both releases.
cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier

# A bulk tensor copy global -> shared (args: descriptor, coordinates, mbarrier, destination)
# and shared -> global (descriptor, coordinates, source); the same instructions in every release.
tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global
# A per-thread asynchronous copy global -> shared (cp.async; args: destination, pointers, mask=)
cp_async_load = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared

__all__ = ["cp_async_load", "cta_barrier", "tma_load", "tma_store"]
