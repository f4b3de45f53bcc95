"""How many requests a run (or what is left of it) will send, fillers included, and
how much of it fits in ``--max-cost``.

One home for the counts that ``--dry-run``, ``--max-cost`` and ``--max-errors`` use,
so the three agree with what is sent. Counts come from index ranges and the store's
counts, never from a list of indices: memory does not grow with ``--n``, which is
capped at ``MAX_N`` (the largest integer a JSON reader keeps exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from detaudit import load as load_sweep
from detaudit.probes import Probe

MAX_N = 2 ** 53


class BudgetError(ValueError):
    """A count beyond what detaudit runs; the message says the limit and the fix."""


def check_n(n: int) -> None:
    if n > MAX_N:
        raise BudgetError(f"--n {n:,}: at most {MAX_N:,} samples per run (the largest integer "
                          "JSON keeps exact); split the audit into several runs")


@dataclass
class Segment:
    """Target indices ``start..stop-1`` that share a load level (one segment without a sweep)."""

    start: int
    stop: int
    missing: int  # of them, still to send (never stored, or stored as an error)
    fillers_each: int  # filler requests each target brings, at most


@dataclass
class RequestPlan:
    segments: list[Segment]

    @property
    def targets(self) -> int:
        return sum(s.missing for s in self.segments)

    @property
    def fillers(self) -> int:
        return sum(s.missing * s.fillers_each for s in self.segments)

    @property
    def total(self) -> int:
        return self.targets + self.fillers

    @property
    def filler_caps(self) -> list[int]:
        """Filler requests allowed per level: what ``load.wrap`` enforces."""
        return [s.missing * s.fillers_each for s in self.segments]


def plan_requests(probe: Probe, config: dict[str, Any], n: int, store: Any = None) -> RequestPlan:
    """The requests still to send for ``range(n)``: all of them for a fresh run, the
    indices ``store`` lacks as good samples on a resume."""
    def missing(start: int, stop: int) -> int:
        return (stop - start) - (store.count_done(start, stop) if store is not None else 0)

    if probe.kind != "load-sweep":
        return RequestPlan([Segment(0, n, missing(0, n), 0)])
    remote = config.get("backend") != "local"
    return RequestPlan([Segment(start, stop, missing(start, stop),
                                load_sweep.fillers_per_target(probe, level, remote))
                        for start, stop, level in load_sweep.level_ranges(probe, n)])


def affordable_prefix(plan: RequestPlan, cost: Any, budget_usd: float,
                      store: Any = None) -> tuple[int, RequestPlan]:
    """(end index, plan) of the longest run of missing targets, in index order (the
    order the runner sends them), whose targets and fillers fit in ``budget_usd``;
    ``cost`` is the per-request estimate (``detaudit.cost.CostPlan``; it raises
    ``PriceError`` when no price is known)."""
    cost.affordable(budget_usd)  # no price: refuse before counting
    left = budget_usd
    taken: list[Segment] = []
    for segment in plan.segments:
        fits = min(segment.missing, cost.affordable(left, segment.fillers_each))
        left -= fits * (cost.per_request_usd + cost.per_filler_usd * segment.fillers_each)
        if fits < segment.missing:
            # every missing index before this segment is taken; in it, the first ``fits``
            end = _missing_at(segment, fits - 1, store) + 1 if fits else segment.start
            taken.append(Segment(segment.start, end, fits, segment.fillers_each))
            return end, RequestPlan(taken)
        taken.append(segment)
    return (plan.segments[-1].stop if plan.segments else 0), RequestPlan(taken)


def _missing_at(segment: Segment, k: int, store: Any) -> int:
    """The ``k``-th (0-based) missing index of the segment: ``start + k`` plus the good
    samples below it, found by walking the stored good indices in order."""
    index = segment.start + k
    if store is None:
        return index
    for done in store.done_in(segment.start, segment.stop):
        if done > index:
            break
        index += 1
    return index
