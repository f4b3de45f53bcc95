"""The names of the kernel modes and implementations, without importing torch, so that
the command line can offer them as choices and check them before the engine loads."""

MODES = ("batch-invariant", "default")
# How the batch-invariant ops are carried out. "triton": the Triton kernels (compiled
# on a GPU, under Triton's interpreter on a CPU, where they are slow and only as
# invariant as numpy's BLAS); "cpu-exact": plain torch on the CPU, every reduction
# written out in a fixed order (kernels/exact_cpu.py). "auto" takes Triton on a GPU
# and cpu-exact on a CPU.
IMPLEMENTATIONS = ("auto", "triton", "cpu-exact")
