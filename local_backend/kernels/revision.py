"""The kernels' revision, part of every ``system_fingerprint`` (``Engine.fingerprint``).

The fingerprint names the weights, the kernel mode and implementation, the dtype and
the device. Two detaudit releases whose kernels add in another order give other bits
under those same names (a matmul change did, on a GPU, for K >= 6144), and a
determinism audit would take them for one configuration. So the kernels carry a
revision: whoever changes the arithmetic of any op in this package (a reduction order,
a chunk or split size, a tile table that picks one, an exp or log formula, the dtype of
an intermediate), in any implementation, bumps it in the same commit. A change that
leaves every bit alone (speed, launches, host code, checks) does not.

Why a value set by hand, not a hash: a hash of the kernels' sources changes with every
comment and speed-up, so equal numbers from two releases would carry two fingerprints
and the fingerprint would stop telling anything; a hash of the numeric constants misses
changes written as code (the K chunks of that matmul change were). On a CPU the
cpu-exact ops' bits are pinned per revision (tests/kernels/test_revision.py), so a
change there cannot go unbumped; GPU kernels' bits are checked on a GPU only, so there
the bump rests on the author and the review.

Format: the year and month of the change (``2026.12``), then ``.2``, ``.3`` for a second
or third change in one month; digits and dots only (``-`` separates the fingerprint's
parts).
"""

KERNELS_REVISION = "2026.12"
